"""Prefect task for one training stage: ``accelerate launch -m bolmo_core.train`` as a subprocess.

The trainer never talks to Prefect: rank 0 prints ``BYTEIFY_PROGRESS {json}`` lines, which
this task reads to update a progress artifact and the logs, and keeps as the stage's
training curve (``<out>/curve.jsonl``). A crash of the subprocess (even SIGKILL) is a
failed task; Prefect retries it and the trainer resumes from the newest committed
checkpoint in the same output folder. Deterministic errors (bad config, mismatched
checkpoint) are not retried.

The stage's output folder is named by a hash of what makes the stage (model + data +
stage config, data hash, init checkpoint hash, world size), so a re-run with the same
inputs lands in the same folder; the task cache is keyed on the inputs and this file's
source, and the flow refreshes it when the folder's ``final/COMMIT`` marker is missing.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import INPUTS, TASK_SOURCE
from prefect.logging import get_run_logger

from bolmo_core import checkpoint as ckpt
from bolmo_core import storage
from bolmo_core.callbacks import parse_progress_line

from . import PROJECT_ROOT, tracking
from .artifacts import Progress, read_curve
from .mlflow_callback import RUN_ID_ENV, TRACKING_URI_ENV
from .retries import RETRY, TransientError

CURVE_FILE = "curve.jsonl"
MLFLOW_CALLBACK = "tasks.mlflow_callback:MlflowCallback"  # light: no Prefect import in the trainer
ERROR_PREFIX = "bolmo_core.train: error:"  # what the trainer prints before exiting on bad input


class TrainingFailed(TransientError):
    """The trainer subprocess died (crash, kill, OOM): worth a retry, which resumes."""


class TrainingConfigError(ValueError):
    """The trainer refused its input (config, data, checkpoint mismatch): a retry would fail the same way."""


# ---------------------------------------------------------------- naming


def stage_key(stage: int, preset: dict, manifest_hash: str, init_hash: str | None, processes: int) -> str:
    """Identity of a stage run: what changes the weights it produces."""
    ident = {
        "stage": stage,
        "run": ckpt.run_identity(preset, stage),
        "manifest_hash": manifest_hash,
        "init_hash": init_hash or "",
        "processes": processes,
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]


def stage_out_uri(
    storage_root: str, stage: int, preset: dict, manifest_hash: str, init_hash: str | None, processes: int
) -> str:
    """Where a stage's checkpoints go (pure: no I/O, so the flow may call it)."""
    return storage.join(
        storage_root,
        "checkpoints",
        f"stage{stage}-{stage_key(stage, preset, manifest_hash, init_hash, processes)}",
    )


@task(name="stage-done", cache_policy=None, **RETRY)
def stage_done(out_uri: str) -> bool:
    """True when the stage's output holds a committed ``final`` checkpoint."""
    return ckpt.final_checkpoint(out_uri) is not None


# ---------------------------------------------------------------- launching


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(config_file: str, processes: int, accelerate_config: str | None = None) -> list[str]:
    """The ``accelerate launch`` command line (the venv's accelerate, next to this interpreter)."""
    exe = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    cmd = [exe, "launch"]
    if accelerate_config:  # a multi-GPU / FSDP / multi-node yaml (deployments/accelerate/): it decides
        return cmd + [
            "--config_file",
            accelerate_config,
            "--num_processes",
            str(processes),
            "-m",
            "bolmo_core.train",
            "--config",
            config_file,
        ]
    if processes > 1:
        # `--cpu --num_processes N` silently runs one process (accelerate 1.x): --multi_gpu is
        # what gives N ranks, with gloo on a CPU-only machine.
        cmd += ["--multi_gpu", "--num_processes", str(processes)]
    else:
        cmd += ["--num_processes", "1"]
    cmd += [
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
        "-m",
        "bolmo_core.train",
        "--config",
        config_file,
    ]
    return cmd


def _child_env(processes: int, mlflow_env: dict[str, str]) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **mlflow_env}
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(PROJECT_ROOT), env.get("PYTHONPATH", "")] if p)
    if processes > 1 and "OMP_NUM_THREADS" not in os.environ:
        # N CPU ranks on C cores: one BLAS pool per rank, not N pools of C threads fighting.
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // processes))
    return env


class _StageProgress:
    """Trainer events -> the stage's progress artifact (step, loss, s/step, ETA), log lines and curve."""

    def __init__(self, stage: int, curve: list[dict], logger):
        self.stage, self.curve, self.logger = stage, curve, logger
        self.bar = Progress(f"stage-{stage}-progress", f"Stage {stage} training")
        self.last_log = 0.0
        self.summary: dict[str, Any] = {}
        self.eval: dict[str, Any] = {}
        self.last_loss, self.finished = float("nan"), False

    def event(self, ev: dict) -> None:
        kind = ev.get("event")
        step, total = int(ev.get("step", 0)), int(ev.get("total") or 0)
        m = ev.get("metrics") or {}
        if kind == "start":
            self.logger.info(f"stage {self.stage}: starting at step {step}/{total}")
            self.bar.update(step, total, f"step {step}/{total}" + (" (resumed)" if step else ""), force=True)
        elif kind == "step":
            self.curve.append({"step": step, **m})
            self.last_loss = m.get("loss", float("nan"))
            text = f"step {step}/{total} · loss {m.get('loss', float('nan')):.4f}"
            if m.get("step_time_s"):
                text += f" · {m['step_time_s']:.2f} s/step"
            self.bar.update(step, total, text)
            if time.time() - self.last_log > 15.0:
                self.logger.info(f"stage {self.stage}: {text}")
                self.last_log = time.time()
        elif kind == "eval":
            self.curve.append({"step": step, **{f"eval/{k}": v for k, v in m.items()}})
            self.eval = m
            self.logger.info(f"stage {self.stage}: eval at step {step}: {_short(m)}")
        elif kind == "checkpoint":
            self.logger.info(f"stage {self.stage}: checkpoint {ev.get('uri')}")
        elif kind == "end":
            self.summary, self.finished = m, True
            text = f"{step} steps · last loss {self.last_loss:.4f}"
            if "val_bpb" in (m or self.eval):
                text += f" · validation {(m or self.eval)['val_bpb']:.3f} bits per byte"
            self.bar.finish(text)
        elif kind == "error":
            self.logger.error(f"stage {self.stage}: trainer error: {ev.get('error')}")


def _short(metrics: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in list(metrics.items())[:6] if isinstance(v, int | float))


def _write_curve(out_uri: str, curve: list[dict]) -> None:
    # Keep the latest record per (step, kind): a resumed run repeats the steps after its checkpoint.
    by_key: dict[tuple, dict] = {}
    for rec in curve:
        by_key[(rec["step"], any(k.startswith("eval/") for k in rec))] = rec
    lines = [json.dumps(r, sort_keys=True) for _, r in sorted(by_key.items(), key=lambda kv: kv[0])]
    storage.write_bytes_atomic(storage.join(out_uri, CURVE_FILE), ("\n".join(lines) + "\n").encode())


def stop_group(proc: subprocess.Popen, grace_s: float) -> None:
    """End a still-running process started with start_new_session and everything it started:
    SIGTERM to its group, SIGKILL after `grace_s` seconds."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def run_trainer(
    config: dict, processes: int, accelerate_config: str | None, mlflow_env: dict[str, str], on_event, logger
) -> None:
    """Launch the trainer, stream its output; raise TrainingFailed / TrainingConfigError on a bad exit."""
    with tempfile.TemporaryDirectory(prefix=f"byteify-stage{config['stage']}-") as tmp:
        cfg_file = os.path.join(tmp, f"stage{config['stage']}.json")
        Path(cfg_file).write_text(json.dumps(config, indent=1))
        cmd = launch_command(cfg_file, processes, accelerate_config)
        logger.info("launching: " + " ".join(cmd))
        tail: collections.deque[str] = collections.deque(maxlen=60)
        # Own process group: cancelling the task takes the launcher and every rank down with it.
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            env=_child_env(processes, mlflow_env),
            cwd=str(PROJECT_ROOT),
            start_new_session=True,
        )
        try:
            for line in proc.stdout:
                line = line.rstrip("\n")
                ev = parse_progress_line(line)
                if ev is not None:
                    on_event(ev)
                elif line.strip():
                    tail.append(line)
            rc = proc.wait()
        finally:
            stop_group(proc, grace_s=15)
        if rc == 0:
            return
        refused = [ln for ln in tail if ERROR_PREFIX in ln]
        if refused:
            raise TrainingConfigError(refused[-1].split(ERROR_PREFIX, 1)[1].strip())
        how = f"killed by signal {-rc}" if rc < 0 else f"exit code {rc}"
        logger.error("trainer output (last lines):\n" + "\n".join(tail))
        raise TrainingFailed(
            f"stage {config['stage']} trainer {how}; last line: {tail[-1] if tail else '(none)'}"
        )


# ---------------------------------------------------------------- the task


@task(
    name="train-stage",
    task_run_name="stage-{stage}",
    **RETRY,
    # Tracking ids change every flow run; they must not change the cache key.
    cache_policy=(INPUTS - "tracking_uri" - "parent_run_id") + TASK_SOURCE,
    persist_result=True,
)
def train_stage(
    stage: int,
    preset: dict,
    manifest_uri: str,
    manifest_hash: str,
    storage_root: str,
    init_from: str | None = None,
    init_hash: str | None = None,
    processes: int = 1,
    accelerate_config: str | None = None,
    deterministic: bool = False,
    max_minutes: float | None = None,
    tracking_uri: str | None = None,
    parent_run_id: str | None = None,
) -> tuple[str, str]:
    """Train (or resume, or skip) one stage; returns (final checkpoint URI, its weights hash)."""
    logger = get_run_logger()
    out_uri = stage_out_uri(storage_root, stage, preset, manifest_hash, init_hash, processes)
    config = {
        "preset": preset,
        "stage": stage,
        "manifest_uri": manifest_uri,
        "out_uri": out_uri,
        "init_from": init_from,
        "allow_mismatch": False,
        "deterministic": deterministic,
        "max_minutes": max_minutes,
        "callbacks": [],
    }
    mlflow_env: dict[str, str] = {}
    run_id = None
    if tracking_uri and parent_run_id:
        run_id = _start_stage_run(tracking_uri, parent_run_id, config, manifest_hash, init_hash, processes)
        mlflow_env = {TRACKING_URI_ENV: tracking_uri, RUN_ID_ENV: run_id}
        config["callbacks"] = [MLFLOW_CALLBACK]
    curve = read_curve(storage.join(out_uri, CURVE_FILE))
    progress = _StageProgress(stage, curve, logger)
    try:
        run_trainer(config, processes, accelerate_config, mlflow_env, progress.event, logger)
    except BaseException:
        if run_id:
            _end_quietly(tracking_uri, run_id, "FAILED", logger)
        raise
    finally:
        if curve:
            _write_curve(out_uri, curve)
    final = ckpt.final_checkpoint(out_uri)
    if final is not None and not progress.finished:
        progress.bar.finish("already trained: its committed final checkpoint was found")
    if final is None:  # exit 0 without the marker would be a trainer bug; never pass it on as done
        raise TrainingFailed(f"stage {stage}: trainer exited cleanly but {out_uri} has no committed final/")
    digest = ckpt.checkpoint_hash(final)
    if run_id:
        tracking.set_tags(
            tracking_uri, run_id, {"byteify.checkpoint_uri": final, "byteify.checkpoint_hash": digest}
        )
        tracking.end_run(tracking_uri, run_id, "FINISHED")
    logger.info(f"stage {stage}: {final} (sha256 {digest[:12]})")
    return final, digest


def _start_stage_run(
    tracking_uri: str,
    parent_run_id: str,
    config: dict,
    manifest_hash: str,
    init_hash: str | None,
    processes: int,
) -> str:
    """The stage's MLflow run, nested under the flow's, with the stage's inputs and config as params."""
    stage = config["stage"]
    return tracking.start_stage_run(
        tracking_uri,
        parent_run_id,
        f"stage{stage}",
        {
            "stage": stage,
            "out_uri": config["out_uri"],
            "manifest_hash": manifest_hash,
            "init_hash": init_hash or "",
            "processes": processes,
            "deterministic": config["deterministic"],
            "max_minutes": config["max_minutes"] or "",
            **{
                f"stage{stage}.{k}": v for k, v in tracking.flatten(config["preset"][f"stage{stage}"]).items()
            },
        },
    )


def _end_quietly(tracking_uri: str, run_id: str, status: str, logger) -> None:
    try:
        tracking.end_run(tracking_uri, run_id, status)
    except Exception as e:  # noqa: BLE001 - the training error is the one to report
        logger.warning(f"could not mark MLflow run {run_id} {status}: {str(e).splitlines()[0]}")


def curve_uri(final_uri: str) -> str:
    """The training-curve file of the stage that produced `final_uri` (pure)."""
    return storage.join(final_uri.rstrip("/").rsplit("/", 1)[0], CURVE_FILE)
