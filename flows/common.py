"""What the flows share: their parameter groups, the tracked-flow decorator, the flow's MLflow run
and one training stage as the main flow runs it (so the sweep reuses the main flow's stages)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

from prefect import flow
from prefect.runtime import flow_run
from pydantic import BaseModel, Field

from tasks import PROJECT_ROOT, registry
from tasks import tracking as mlflow_tasks
from tasks.training import stage_done, stage_out_uri, train_stage


class Compute(BaseModel):
    """Where training runs: processes per stage (CPU ranks or GPUs) and an accelerate config."""

    processes: int = Field(1, ge=1, description="training processes (GPUs, or CPU ranks)")
    accelerate_config: str | None = Field(
        None, description="accelerate yaml (deployments/accelerate/), for GPUs/FSDP"
    )
    deterministic: bool = Field(False, description="bit-exact resume on CPU (slower)")
    data_workers: int = Field(1, ge=1, description="parallel shard-labeling tasks")
    dask_address: str | None = Field(
        None, description="Dask scheduler (tcp://host:8786) for data preparation; empty: a thread pool"
    )
    max_minutes: float | None = Field(None, gt=0, description="per stage, wall-clock training budget")


class Evaluation(BaseModel):
    max_bytes: int = Field(20_000, ge=1000, description="held-out bytes scored by both models")
    cute_items: int = Field(0, ge=0, description="items per CUTE-style char task (0: skip them)")
    precision: Literal["fp32", "bf16"] = "fp32"


class Tracking(BaseModel):
    """MLflow: where to log, and the registered model's name."""

    tracking_uri: str | None = Field(
        None, description="MLflow URI; empty: $MLFLOW_TRACKING_URI or var/mlflow/mlflow.db"
    )
    experiment: str = "byteify"
    artifact_location: str | None = Field(
        None, description="new experiments' artifact root, e.g. s3://bucket/mlflow"
    )
    model_name: str = "byteify"
    alias: str = "candidate"


def default_root() -> str:
    return os.environ.get("BYTEIFY_STORAGE_ROOT") or os.path.join(PROJECT_ROOT, "var", "runs")


def flow_run_url(flow_run_id: str) -> str:
    """This flow run in the Prefect UI (the local UI's address when the API is ephemeral)."""
    from prefect.settings import PREFECT_UI_URL

    return f"{PREFECT_UI_URL.value() or 'http://127.0.0.1:4200'}/runs/flow-run/{flow_run_id}"


def tracked_flow(name: str):
    """`@flow` for a flow with an MLflow run of its own: a failed, crashed or cancelled run ends its
    MLflow runs FAILED / KILLED instead of leaving them RUNNING forever (the hooks run in the
    flow's process; see tasks.tracking.mark_failed)."""
    hooks = [mlflow_tasks.mark_failed]
    return flow(name=name, log_prints=True, on_failure=hooks, on_crashed=hooks, on_cancellation=hooks)


@dataclass(frozen=True)
class RunIds:
    """This flow run and its MLflow run: what every tracking step after the start names."""

    tracking_uri: str
    mlflow_run_id: str
    flow_run_id: str
    flow_run_url: str
    made_by: str  # markdown link to the flow run, for descriptions


def start_run(tracking: Tracking, params: dict) -> RunIds:
    """The flow's MLflow run (the same one again on a retry), with the run's inputs as params."""
    uri = tracking.tracking_uri or mlflow_tasks.default_tracking_uri()
    fr_id = str(flow_run.id or "local")
    fr_url = flow_run_url(fr_id)
    run_id = mlflow_tasks.start_flow_run(
        uri,
        tracking.experiment,
        fr_id,
        params,
        run_name=flow_run.name or None,
        artifact_location=tracking.artifact_location,
        flow_run_url=fr_url,
    )
    return RunIds(uri, run_id, fr_id, fr_url, f"[Prefect flow run {flow_run.name or fr_id}]({fr_url})")


def register(
    ids: RunIds, tracking: Tracking, export_uri: str, lineage: dict, metrics: dict, description: str
) -> dict:
    """The export as a version of `tracking.model_name` (aliased `tracking.alias`) with its lineage,
    linked to the flow's MLflow run; re-registering the same lineage finds the same version."""
    return registry.register_model(
        ids.tracking_uri,
        tracking.model_name,
        export_uri,
        lineage,
        metrics,
        run_id=ids.mlflow_run_id,
        alias=tracking.alias,
        description=description,
    )


def run_stage(
    stage: int,
    cfg: dict,
    manifest: tuple[str, str],
    root: str,
    compute: Compute,
    init: tuple[str | None, str | None] = (None, None),
    **tracking: str,
) -> tuple[str, str]:
    """One stage through the train_stage task: (final checkpoint URI, weights hash).

    `manifest`: (URI, hash) of the data; `init`: Stage 2's (checkpoint, hash) to start from
    ((None, None): the source); `tracking`: tracking_uri and parent_run_id, or nothing. The
    task's cache is refreshed when the stage's final checkpoint is gone."""
    out = stage_out_uri(root, stage, cfg, manifest[1], init[1], compute.processes)
    starts = {"init_from": init[0], "init_hash": init[1]} if stage == 2 else {}
    return train_stage.with_options(refresh_cache=not stage_done(out))(
        stage=stage,
        preset=cfg,
        manifest_uri=manifest[0],
        manifest_hash=manifest[1],
        storage_root=root,
        processes=compute.processes,
        accelerate_config=compute.accelerate_config,
        deterministic=compute.deterministic,
        max_minutes=compute.max_minutes,
        **starts,
        **tracking,
    )
