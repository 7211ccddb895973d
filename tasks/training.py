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
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import INPUTS, TASK_SOURCE
from prefect.logging import get_run_logger

from bolmo_core import checkpoint as ckpt
from bolmo_core import storage
from bolmo_core.callbacks import parse_progress_line

from . import PROJECT_ROOT, tracking

CURVE_FILE = "curve.jsonl"
MLFLOW_CALLBACK = "tasks.mlflow_callback:MlflowCallback"  # light: no Prefect import in the trainer
ERROR_PREFIX = "bolmo_core.train: error:"  # what the trainer prints before exiting on bad input


class TrainingFailed(RuntimeError):
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


@task(name="stage-done", retries=2, retry_delay_seconds=2, cache_policy=None)
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
        # `--cpu --num_processes N` silently runs one process (stack.md §5): --multi_gpu is
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


class _Progress:
    """Turns progress events into a throttled Prefect progress artifact, log lines and a curve."""

    def __init__(self, stage: int, curve: list[dict], logger):
        self.stage, self.curve, self.logger = stage, curve, logger
        self.artifact = create_progress_artifact(0.0, description=f"Stage {stage} training")
        self.last_update = 0.0
        self.last_log = 0.0
        self.summary: dict[str, Any] = {}

    def event(self, ev: dict) -> None:
        kind = ev.get("event")
        step, total = int(ev.get("step", 0)), int(ev.get("total") or 0) or None
        if kind == "start":
            self.total = total
            self.logger.info(f"stage {self.stage}: starting at step {step}/{total}")
        elif kind == "step":
            self.curve.append({"step": step, **{k: v for k, v in ev.get("metrics", {}).items()}})
            now = time.time()
            if total and now - self.last_update > 2.0:
                update_progress_artifact(self.artifact, 100.0 * step / total)
                self.last_update = now
            if now - self.last_log > 15.0:
                m = ev.get("metrics", {})
                self.logger.info(
                    f"stage {self.stage}: step {step}/{total} loss {m.get('loss', float('nan')):.4f}"
                )
                self.last_log = now
        elif kind == "eval":
            self.curve.append({"step": step, **{f"eval/{k}": v for k, v in ev.get("metrics", {}).items()}})
            self.logger.info(f"stage {self.stage}: eval at step {step}: {_short(ev.get('metrics', {}))}")
        elif kind == "checkpoint":
            self.logger.info(f"stage {self.stage}: checkpoint {ev.get('uri')}")
        elif kind == "end":
            self.summary = ev.get("metrics", {}) or {}
            update_progress_artifact(self.artifact, 100.0)
        elif kind == "error":
            self.logger.error(f"stage {self.stage}: trainer error: {ev.get('error')}")


def _short(metrics: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in list(metrics.items())[:6] if isinstance(v, int | float))


def _read_curve(out_uri: str) -> list[dict]:
    uri = storage.join(out_uri, CURVE_FILE)
    if not storage.exists(uri):
        return []
    return [json.loads(line) for line in storage.read_bytes(uri).decode().splitlines() if line.strip()]


def _write_curve(out_uri: str, curve: list[dict]) -> None:
    # Keep the latest record per (step, kind): a resumed run repeats the steps after its checkpoint.
    by_key: dict[tuple, dict] = {}
    for rec in curve:
        by_key[(rec["step"], any(k.startswith("eval/") for k in rec))] = rec
    lines = [json.dumps(r, sort_keys=True) for _, r in sorted(by_key.items(), key=lambda kv: kv[0])]
    storage.write_bytes_atomic(storage.join(out_uri, CURVE_FILE), ("\n".join(lines) + "\n").encode())


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
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
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


def _retry_training(task_obj, task_run, state) -> bool:
    exc = state.data if isinstance(state.data, BaseException) else None
    return not isinstance(exc, TrainingConfigError | ckpt.CheckpointError | ValueError)


# ---------------------------------------------------------------- the task


@task(
    name="train-stage",
    task_run_name="stage-{stage}",
    retries=2,
    retry_delay_seconds=[2, 10],
    retry_condition_fn=_retry_training,
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
        stage_cfg = preset[f"stage{stage}"]
        run_id = tracking.start_stage_run(
            tracking_uri,
            parent_run_id,
            f"stage{stage}",
            {
                "stage": stage,
                "out_uri": out_uri,
                "manifest_hash": manifest_hash,
                "init_hash": init_hash or "",
                "processes": processes,
                "deterministic": deterministic,
                "max_minutes": max_minutes or "",
                **{f"stage{stage}.{k}": v for k, v in tracking.flatten(stage_cfg).items()},
            },
        )
        mlflow_env = {tracking.TRACKING_URI_ENV: tracking_uri, tracking.RUN_ID_ENV: run_id}
        config["callbacks"] = [MLFLOW_CALLBACK]
    curve = _read_curve(out_uri)
    progress = _Progress(stage, curve, logger)
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
    if final is None:  # exit 0 without the marker would be a trainer bug; never pass it on as done
        raise TrainingFailed(f"stage {stage}: trainer exited cleanly but {out_uri} has no committed final/")
    digest = ckpt.checkpoint_hash(final)
    if run_id:
        tracking.client_set_tags(
            tracking_uri, run_id, {"byteify.checkpoint_uri": final, "byteify.checkpoint_hash": digest}
        )
        tracking.end_run(tracking_uri, run_id, "FINISHED")
    logger.info(f"stage {stage}: {final} (sha256 {digest[:12]})")
    return final, digest


def _end_quietly(tracking_uri: str, run_id: str, status: str, logger) -> None:
    try:
        tracking.end_run(tracking_uri, run_id, status)
    except Exception as e:  # noqa: BLE001 - the training error is the one to report
        logger.warning(f"could not mark MLflow run {run_id} {status}: {str(e).splitlines()[0]}")


def curve_uri(final_uri: str) -> str:
    """The training-curve file of the stage that produced `final_uri` (pure)."""
    return storage.join(final_uri.rstrip("/").rsplit("/", 1)[0], CURVE_FILE)
