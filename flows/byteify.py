"""The byteify flow: plan -> prepare data -> Stage 1 -> Stage 2 -> evaluate -> export -> register.

Parameters are pydantic models, so the Prefect UI shows a form. The flow only chains
tasks: every read and write happens inside a task, and tasks hand each other URIs and
hashes. Re-running the same parameters reuses every finished stage (task cache on inputs
+ source, checked against each stage's commit marker).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Literal

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from pydantic import BaseModel, Field

from bolmo_core.config import Preset, get_preset
from tasks import PROJECT_ROOT, artifacts, registry
from tasks import tracking as mlflow_tasks
from tasks.data import data_out_uri, prepare_data, token_budget
from tasks.evaluation import evaluate_model
from tasks.export import export_model
from tasks.plan import plan_run
from tasks.training import curve_uri, stage_done, stage_out_uri, train_stage


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


def _default_root() -> str:
    return os.environ.get("BYTEIFY_STORAGE_ROOT") or os.path.join(PROJECT_ROOT, "var", "runs")


def _flow_run_url(flow_run_id: str) -> str:
    """This flow run in the Prefect UI (the local UI's address when the API is ephemeral)."""
    from prefect.settings import PREFECT_UI_URL

    return f"{PREFECT_UI_URL.value() or 'http://127.0.0.1:4200'}/runs/flow-run/{flow_run_id}"


@dataclass(frozen=True)
class _RunIds:
    """This flow run and its MLflow run: what every tracking step after the start names."""

    tracking_uri: str
    mlflow_run_id: str
    flow_run_id: str
    flow_run_url: str
    made_by: str  # markdown link to the flow run, for descriptions


@dataclass(frozen=True)
class _Stages:
    """The two stages' final checkpoints, their weights hashes and the plot of their curves."""

    ckpt1: str | None  # None: Stage 1 skipped (the skip_stage1 ablation)
    hash1: str | None
    ckpt2: str
    hash2: str
    curves_png: str


# A failed, crashed or cancelled run ends its MLflow runs FAILED / KILLED instead of leaving
# them RUNNING forever (the hooks run in the flow's process; see tasks.tracking.mark_failed).
@flow(
    name="byteify",
    log_prints=True,
    on_failure=[mlflow_tasks.mark_failed],
    on_crashed=[mlflow_tasks.mark_failed],
    on_cancellation=[mlflow_tasks.mark_failed],
)
def byteify(
    preset: str = "smollm2-135m",
    overrides: dict[str, Any] = {},  # noqa: B006 - pydantic copies defaults
    data_sources: list[str] = ["builtin:wiki"],  # noqa: B006
    storage_root: str | None = None,
    skip_stage1: bool = False,
    compute: Compute = Compute(),
    evaluation: Evaluation = Evaluation(),
    tracking: Tracking = Tracking(),
) -> dict[str, Any]:
    """Byteify a subword LM (Bolmo recipe) and register the result in MLflow; returns a summary.

    `preset` names a preset of bolmo_core.config; `overrides` are dotted keys into it, checked by
    the same validator as every other entry point, e.g. {"stage1.steps": 200,
    "model.source.name_or_path": "allenai/OLMo-2-0425-1B"}. The paper's ablations are parameters:
    `skip_stage1` trains Stage 2 straight from the source ("Stage 2 without Stage 1"), and
    {"model.boundary_lookahead": 0} gives the causal boundary predictor.
    """
    root = storage_root or _default_root()
    p = get_preset(preset, overrides)  # one line naming the key, the value and the rule, if bad
    cfg = p.to_dict()
    # Plan first: memory per device and hours per stage (artifact "plan"); refuses what cannot fit.
    plan_run(cfg, compute.processes, compute.accelerate_config)
    ids = _start_tracking(preset, p, data_sources, root, compute, tracking)
    # The pipeline: prepare data -> Stage 1 -> Stage 2 -> evaluate -> export -> register.
    manifest_uri, manifest_hash = _prepare(data_sources, p, root, compute, evaluation)
    st = _train_stages(cfg, manifest_uri, manifest_hash, root, compute, ids, skip_stage1)
    report_uri, report_hash, table_md, metrics = _evaluate(
        st, manifest_uri, manifest_hash, root, evaluation, ids
    )
    export_uri, export_hash = export_model(st.ckpt2, st.hash2, root)
    lineage = {
        **registry.source_lineage(p.model.source),
        "manifest_hash": manifest_hash,
        "stage1_checkpoint_hash": st.hash1 or "skipped",
        "stage2_checkpoint_hash": st.hash2,
        "export_hash": export_hash,
        "flow_run_id": ids.flow_run_id,
        "flow_run_url": ids.flow_run_url,
    }
    reg, run_url = _register(ids, tracking, preset, st, export_uri, lineage, metrics, table_md)
    return {
        **{k: reg[k] for k in ("version", "alias_uri", "created")},
        "model_name": reg["name"],
        "model_uri": reg["uri"],
        "model_version_url": reg["url"],
        "export_uri": export_uri,
        "export_hash": export_hash,
        "manifest_uri": manifest_uri,
        "manifest_hash": manifest_hash,
        "stage1_checkpoint": st.ckpt1,
        "stage1_hash": st.hash1,
        "stage2_checkpoint": st.ckpt2,
        "stage2_hash": st.hash2,
        "report_uri": report_uri,
        "report_hash": report_hash,
        "metrics": metrics,
        "evaluation_table": table_md,
        "tracking_uri": ids.tracking_uri,
        "mlflow_run_id": ids.mlflow_run_id,
        "mlflow_run_url": run_url,
        "flow_run_id": ids.flow_run_id,
    }


# ---------------------------------------------------------------- the steps (each only calls tasks)


def _start_tracking(
    preset: str, p: Preset, data_sources: list[str], root: str, compute: Compute, tracking: Tracking
) -> _RunIds:
    """The flow's MLflow run (the same one again on a retry), with the run's inputs as params."""
    uri = tracking.tracking_uri or mlflow_tasks.default_tracking_uri()
    fr_id = str(flow_run.id or "local")
    fr_url = _flow_run_url(fr_id)
    run_id = mlflow_tasks.start_flow_run(
        uri,
        tracking.experiment,
        fr_id,
        {
            "preset": preset,
            "source": p.model.source.name_or_path,
            "data_sources": ",".join(data_sources),
            "storage_root": root,
            "processes": compute.processes,
            "preset_config": p.to_dict(),
        },
        run_name=flow_run.name or None,
        artifact_location=tracking.artifact_location,
        flow_run_url=fr_url,
    )
    return _RunIds(uri, run_id, fr_id, fr_url, f"[Prefect flow run {flow_run.name or fr_id}]({fr_url})")


def _prepare(
    data_sources: list[str], p: Preset, root: str, compute: Compute, evaluation: Evaluation
) -> tuple[str, str]:
    """Byte shards labeled with the source tokenizer, as much as the stages consume: (manifest URI, hash)."""
    manifest_uri, manifest_hash = prepare_data(
        data_sources,
        p.model.source,
        data_out_uri(root, data_sources, p),
        p.data,
        workers=compute.data_workers,
        budget=token_budget(p.to_dict(), validation_bytes=evaluation.max_bytes),
        dask_address=compute.dask_address,
    )
    artifacts.manifest_summary(manifest_uri)
    return manifest_uri, manifest_hash


def _train_stages(
    cfg: dict,
    manifest_uri: str,
    manifest_hash: str,
    root: str,
    compute: Compute,
    ids: _RunIds,
    skip_stage1: bool = False,
) -> _Stages:
    """Stage 1, then Stage 2 from its checkpoint; a stage's cache is refreshed when its final checkpoint is gone.

    `skip_stage1`: Stage 2 starts from the source (a stage folder of its own: no init hash)."""
    common = dict(
        preset=cfg,
        manifest_uri=manifest_uri,
        manifest_hash=manifest_hash,
        storage_root=root,
        processes=compute.processes,
        accelerate_config=compute.accelerate_config,
        deterministic=compute.deterministic,
        max_minutes=compute.max_minutes,
        tracking_uri=ids.tracking_uri,
        parent_run_id=ids.mlflow_run_id,
    )
    out1 = stage_out_uri(root, 1, cfg, manifest_hash, None, compute.processes)
    ckpt1 = hash1 = None
    if not skip_stage1:
        ckpt1, hash1 = train_stage.with_options(refresh_cache=not stage_done(out1))(stage=1, **common)
    out2 = stage_out_uri(root, 2, cfg, manifest_hash, hash1, compute.processes)
    ckpt2, hash2 = train_stage.with_options(refresh_cache=not stage_done(out2))(
        stage=2, init_from=ckpt1, init_hash=hash1, **common
    )
    curves_png = artifacts.training_curves(
        {**({"stage 1": curve_uri(ckpt1)} if ckpt1 else {}), "stage 2": curve_uri(ckpt2)},
        artifacts.plots_uri(root, hash2),
    )
    return _Stages(ckpt1, hash1, ckpt2, hash2, curves_png)


def _evaluate(
    st: _Stages, manifest_uri: str, manifest_hash: str, root: str, evaluation: Evaluation, ids: _RunIds
) -> tuple[str, str, str, dict[str, float]]:
    """Score the Stage-2 model beside its source, show it, log it on the flow's MLflow run.

    Returns (report URI, its hash, markdown table, summary metrics).
    """
    report_uri, report_hash, samples_uri = evaluate_model(
        st.ckpt2, st.hash2, manifest_uri, manifest_hash, root, evaluation.model_dump()
    )
    table_md, metrics = artifacts.evaluation_table(report_uri)
    artifacts.boundary_view(samples_uri)
    mlflow_tasks.log_to_run(
        ids.tracking_uri,
        ids.mlflow_run_id,
        metrics=metrics,  # step 0: MLflow links them to the model registered later
        artifacts={"data": manifest_uri, "evaluation": report_uri, "plots": st.curves_png},
    )
    return report_uri, report_hash, table_md, metrics


def _register(
    ids: _RunIds,
    tracking: Tracking,
    preset: str,
    st: _Stages,
    export_uri: str,
    lineage: dict[str, str],
    metrics: dict[str, float],
    table_md: str,
) -> tuple[dict[str, Any], str]:
    """Register the export with its lineage, link it, end the flow's MLflow run: (version, run URL)."""
    log = get_run_logger()
    reg = registry.register_model(
        ids.tracking_uri,
        tracking.model_name,
        export_uri,
        lineage,
        metrics,
        run_id=ids.mlflow_run_id,
        alias=tracking.alias,
        description=f"Byte-level `{lineage['source_id']}` (preset `{preset}`), made by {ids.made_by}.\n\n{table_md}",
    )
    run_url = artifacts.mlflow_links(ids.tracking_uri, ids.mlflow_run_id, reg["url"], reg["uri"])
    version = f"[{reg['uri']}]({reg['url']})" + (
        "" if reg["created"] else " (existing version: same lineage)"
    )
    reused = mlflow_tasks.finish_flow_run(
        ids.tracking_uri,
        ids.mlflow_run_id,
        {**({"stage1": st.hash1} if st.hash1 else {}), "stage2": st.hash2},
        f"{ids.made_by} · preset `{preset}` · registered {version}\n\n{table_md}",
    )
    if reused:
        log.info(f"reused (cached) stages: {', '.join(reused)}")
    log.info(f"registered {reg['uri']} (alias {reg['alias_uri']}); export at {export_uri}")
    return reg, run_url
