"""MLflow runs for byteify: one run per flow run, a nested run per stage, links into the UI.

Built on MLflow's own client (it splits ``log_batch`` over its request limits, re-logging an
identical param is allowed). What is ours is idempotency: runs are found again by their
tags, so a Prefect retry after a half-done call finishes it instead of doing it twice.
The model registry is in tasks/registry.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from prefect import task

from bolmo_core import storage

from . import PROJECT_ROOT
from .retries import RETRY

# MLflow's own HTTP retry ladder (7 tries, factor 2) takes minutes before it raises; keep it
# short so a dead server surfaces as a failed attempt that Prefect retries visibly.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no progress bars in task logs

# MLflow 3's UI opens an experiment without this tag on its GenAI pages (traces, assistant);
# this kind makes it open on the training runs.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def default_tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI, else the project's SQLite store under var/mlflow."""
    if uri := os.environ.get("MLFLOW_TRACKING_URI"):
        return uri
    path = PROJECT_ROOT / "var" / "mlflow" / "mlflow.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def client(tracking_uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def code_version() -> str:
    """The project's git commit (``+dirty`` when tracked files changed), or 'unknown'."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()

    try:
        head, dirty = git("rev-parse", "HEAD"), git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "") if head else "unknown"


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested dict -> {"a.b": "value"} (MLflow params are flat strings)."""
    out: dict[str, str] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v) if isinstance(v, list | tuple) else str(v)
    return out


# ---------------------------------------------------------------- links


def ui_base(tracking_uri: str) -> str:
    """The MLflow UI for this store: the server itself, or where `mlflow ui` serves a local store."""
    return tracking_uri.rstrip("/") if tracking_uri.startswith("http") else "http://127.0.0.1:5000"


# Without workflowType the UI falls back to its GenAI navigation (traces, assistant panel).
_ML = "workflowType=machine_learning"


def experiment_url(tracking_uri: str, experiment_id: str) -> str:
    return f"{ui_base(tracking_uri)}/#/experiments/{experiment_id}/runs?{_ML}"


def run_url(tracking_uri: str, run_id: str) -> str:
    exp = client(tracking_uri).get_run(run_id).info.experiment_id
    return f"{ui_base(tracking_uri)}/#/experiments/{exp}/runs/{run_id}?{_ML}"


def model_version_url(tracking_uri: str, name: str, version: str) -> str:
    return f"{ui_base(tracking_uri)}/#/models/{name}/versions/{version}?{_ML}"


# ---------------------------------------------------------------- runs


def _experiment_id(mlc, name: str, artifact_location: str | None, tracking_uri: str) -> str:
    exp = mlc.get_experiment_by_name(name)
    if exp is None:
        if artifact_location is None and tracking_uri.startswith("sqlite:///"):
            # A local store keeps artifacts beside its database, not in ./mlartifacts of the cwd.
            db = Path(tracking_uri.removeprefix("sqlite:///"))
            artifact_location = (db.parent / "artifacts" / name).resolve().as_uri()
        try:
            return mlc.create_experiment(name, artifact_location=artifact_location, tags=EXPERIMENT_KIND)
        except Exception:  # noqa: BLE001 - created meanwhile by another process: use that one
            exp = mlc.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.tags.get("mlflow.experimentKind") != EXPERIMENT_KIND["mlflow.experimentKind"]:
        mlc.set_experiment_tag(exp.experiment_id, *next(iter(EXPERIMENT_KIND.items())))
    return exp.experiment_id


def _find_run(mlc, experiment_ids: list[str], tags: dict[str, str]):
    flt = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    runs = mlc.search_runs(experiment_ids, filter_string=flt, max_results=1, order_by=["start_time ASC"])
    return runs[0] if runs else None


def _log_params(mlc, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    # Re-sending an identical param is allowed, so a retry may log the same dict again.
    mlc.log_batch(run_id, params=[Param(k, v[:6000]) for k, v in flatten(params).items()])


@task(name="mlflow-start-run", **RETRY)
def start_flow_run(
    tracking_uri: str,
    experiment: str,
    flow_run_id: str,
    params: dict[str, Any],
    run_name: str | None = None,
    artifact_location: str | None = None,
    flow_run_url: str | None = None,
) -> str:
    """The flow run's MLflow run id (the same run again on a retry)."""
    mlc = client(tracking_uri)
    exp_id = _experiment_id(mlc, experiment, artifact_location, tracking_uri)
    key = {"byteify.flow_run_id": flow_run_id, "byteify.kind": "flow"}
    run = _find_run(mlc, [exp_id], key)
    if run is None:
        tags = {**key, "byteify.code_version": code_version()}
        if flow_run_url:
            tags["byteify.flow_run_url"] = flow_run_url
            tags["mlflow.note.content"] = f"Prefect flow run: [{run_name or flow_run_id}]({flow_run_url})"
        run = mlc.create_run(exp_id, run_name=run_name, tags=tags)
    _log_params(mlc, run.info.run_id, params)
    return run.info.run_id


def start_stage_run(tracking_uri: str, parent_run_id: str, stage: str, params: dict[str, Any]) -> str:
    """A nested run for one stage under the flow's run (the same run, RUNNING again, on a retry)."""
    mlc = client(tracking_uri)
    parent = mlc.get_run(parent_run_id)
    key = {"mlflow.parentRunId": parent_run_id, "byteify.stage": stage}
    run = _find_run(mlc, [parent.info.experiment_id], key)
    if run is None:
        tags = {**key, "byteify.flow_run_id": parent.data.tags.get("byteify.flow_run_id", "")}
        run_id = mlc.create_run(parent.info.experiment_id, run_name=stage, tags=tags).info.run_id
    else:
        run_id = run.info.run_id
        mlc.update_run(run_id, status="RUNNING")
    _log_params(mlc, run_id, params)
    return run_id


def end_run(tracking_uri: str, run_id: str, status: str = "FINISHED") -> None:
    client(tracking_uri).set_terminated(run_id, status=status)


def set_tags(tracking_uri: str, run_id: str, tags: dict[str, Any]) -> None:
    from mlflow.entities import RunTag

    client(tracking_uri).log_batch(run_id, tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items()])


def log_artifact_uri(tracking_uri: str, run_id: str, uri: str, artifact_path: str | None = None) -> None:
    """Copy a file or folder at any storage URI into the run's artifacts."""
    with tempfile.TemporaryDirectory(prefix="byteify-art-") as tmp:
        local = storage.local_copy(uri, tmp)
        if os.path.isdir(local):
            client(tracking_uri).log_artifacts(run_id, local, artifact_path=artifact_path)
        else:
            client(tracking_uri).log_artifact(run_id, local, artifact_path=artifact_path)


@task(name="mlflow-log", **RETRY)
def log_to_run(
    tracking_uri: str,
    run_id: str,
    metrics: dict[str, float] | None = None,
    artifacts: dict[str, str] | None = None,
    tags: dict[str, Any] | None = None,
) -> None:
    """Metrics (step 0), artifacts ({artifact folder: storage URI}) and tags on a run."""
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)  # the client splits batches over its request limits itself
    batch = [Metric(k, float(v), now, 0) for k, v in (metrics or {}).items() if v == v]  # drop NaN
    client(tracking_uri).log_batch(run_id, metrics=batch)
    for dest, uri in (artifacts or {}).items():
        log_artifact_uri(tracking_uri, run_id, uri, artifact_path=dest or None)
    if tags:
        set_tags(tracking_uri, run_id, tags)


@task(name="mlflow-end-run", **RETRY)
def finish_flow_run(tracking_uri: str, run_id: str, stage_hashes: dict[str, str], note: str) -> list[str]:
    """End the flow's run FINISHED with `note` as its description, naming the runs of reused stages.

    A stage whose cached result this flow run reused has no nested run here; the note links
    the run that trained it, so a fully cached re-run reads as such instead of as an empty run.
    Returns the reused stages.
    """
    mlc = client(tracking_uri)
    exp = mlc.get_run(run_id).info.experiment_id
    lines, reused = [note, "", "| stage | run |", "|---|---|"], []
    for stage, digest in stage_hashes.items():
        here = _find_run(mlc, [exp], {"mlflow.parentRunId": run_id, "byteify.stage": stage})
        if here is not None:
            lines.append(
                f"| {stage} | trained in this run: [{stage}]({run_url(tracking_uri, here.info.run_id)}) |"
            )
            continue
        reused.append(stage)
        made = _find_run(mlc, [exp], {"byteify.checkpoint_hash": digest})
        where = (
            f"[{made.info.run_name}]({run_url(tracking_uri, made.info.run_id)})" if made else "an earlier run"
        )
        lines.append(f"| {stage} | reused (cached), trained by {where} |")
    set_tags(
        tracking_uri,
        run_id,
        {"mlflow.note.content": "\n".join(lines), "byteify.reused_stages": ",".join(reused) or "none"},
    )
    end_run(tracking_uri, run_id)
    return reused


def mark_failed(flow, flow_run, state) -> None:
    """Flow hook (on_failure / on_crashed / on_cancellation): end this flow run's RUNNING MLflow runs."""
    params = flow_run.parameters or {}
    trk = params.get("tracking") or {}
    trk = trk if isinstance(trk, dict) else trk.model_dump()
    uri = trk.get("tracking_uri") or default_tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        return  # failed before anything was tracked: leave no empty store behind
    mlc = client(uri)
    exp = mlc.get_experiment_by_name(trk.get("experiment") or "byteify")
    if exp is None:
        return
    status = "KILLED" if state.is_cancelled() or state.is_cancelling() else "FAILED"
    flt = f"tags.`byteify.flow_run_id` = '{flow_run.id}' and attributes.status = 'RUNNING'"
    for run in mlc.search_runs([exp.experiment_id], filter_string=flt):
        mlc.set_terminated(run.info.run_id, status=status)
