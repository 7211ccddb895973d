"""Test helper: start the trainer the way the tests do, find its processes, read its progress lines.

Every process it finds is below a pid the test started, so a test never touches anyone else's.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def launch(
    config_file: str,
    nproc: int = 1,
    launcher: str = "torchrun",
    accelerate_config: str = "cpu_2proc.yaml",
    env: dict[str, str] | None = None,
    **popen_kw,
) -> subprocess.Popen:
    """Start the trainer as its own process group (so a kill takes every rank down, like a dead machine).

    One process: `python -m bolmo_core.train`; more: torchrun, or `accelerate launch` with
    deployments/accelerate/<accelerate_config>. `env` adds variables (e.g. the ones a yaml sets).
    """
    bin_dir = Path(sys.executable).parent
    train = ["-m", "bolmo_core.train", "--config", config_file]
    if nproc == 1:
        cmd = [sys.executable, *train]
    elif launcher == "torchrun":
        cmd = [str(bin_dir / "torchrun"), "--standalone", "--nproc_per_node", str(nproc), *train]
    else:
        from conftest import free_port

        cmd = [str(bin_dir / "accelerate"), "launch",
               "--config_file", str(REPO / "deployments/accelerate" / accelerate_config),
               "--num_processes", str(nproc), "--main_process_port", str(free_port()), *train]  # fmt: skip
    return subprocess.Popen(
        cmd,
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        **popen_kw,
    )


def finish(proc: subprocess.Popen, timeout: int = 900) -> str:
    """The trainer's stdout once it exited 0 (its process group is SIGKILLed on a timeout)."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert proc.returncode == 0, err[-3000:]
    return out


def descendants(root_pid: int) -> list[int]:
    """PIDs of every process below `root_pid`."""
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parent[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    out, frontier = [], [root_pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out += kids
        frontier += kids
    return out


def trainer_pids(root_pid: int, config_suffix: bytes = b".json", rank: int | None = None) -> list[int]:
    """The trainer processes below `root_pid` (not their launchers) running a config file that ends
    with `config_suffix`; only the one of `rank` when given."""
    pids = []
    for pid in descendants(root_pid):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if rank is not None else []
        except OSError:
            continue
        if b"bolmo_core.train" not in argv or b"launch" in argv:
            continue
        if any(a.endswith(config_suffix) for a in argv) and (rank is None or f"RANK={rank}".encode() in env):
            pids.append(pid)
    return pids


def step_losses(text: str) -> dict[int, float]:
    """{step: loss} from the trainer's progress lines."""
    from bolmo_core.callbacks import parse_progress_line

    return {
        e["step"]: e["metrics"]["loss"]
        for e in map(parse_progress_line, text.splitlines())
        if e and e["event"] == "step"
    }
