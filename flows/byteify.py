"""The byteify flow: plan -> prepare data -> Stage 1 -> Stage 2 -> evaluate -> export -> register.

Parameters are pydantic models, so the Prefect UI shows a form. The flow only chains
tasks: every read and write happens inside a task, and tasks hand each other URIs and
hashes. Re-running the same parameters reuses every finished stage (task cache on inputs
+ source, checked against each stage's commit marker).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prefect import get_run_logger

from bolmo_core.config import Preset, get_preset
from flows.common import (
    Compute,
    Evaluation,
    RunIds,
    Tracking,
    default_root,
    register,
    run_stage,
    start_run,
    tracked_flow,
)
from tasks import artifacts, registry
from tasks import tracking as mlflow_tasks
from tasks.data import data_out_uri, prepare_data, token_budget
from tasks.evaluation import evaluate_model
from tasks.export import export_model
from tasks.plan import plan_run
from tasks.training import curve_uri


@dataclass(frozen=True)
class _Stages:
    """The two stages' final checkpoints, their weights hashes and the plot of their curves."""

    ckpt1: str | None  # None: Stage 1 skipped (the skip_stage1 ablation)
    hash1: str | None
    ckpt2: str
    hash2: str
    curves_png: str


@tracked_flow("byteify")
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
    root = storage_root or default_root()
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
    return _summary(
        reg, run_url, ids, st,
        export_uri=export_uri, export_hash=export_hash,
        manifest_uri=manifest_uri, manifest_hash=manifest_hash,
        report_uri=report_uri, report_hash=report_hash, metrics=metrics, evaluation_table=table_md,
    )  # fmt: skip


# ---------------------------------------------------------------- the steps (each only calls tasks)


def _start_tracking(
    preset: str, p: Preset, data_sources: list[str], root: str, compute: Compute, tracking: Tracking
) -> RunIds:
    """The flow's MLflow run (the same one again on a retry), with the run's inputs as params."""
    params = {
        "preset": preset,
        "source": p.model.source.name_or_path,
        "data_sources": ",".join(data_sources),
        "storage_root": root,
        "processes": compute.processes,
        "preset_config": p.to_dict(),
    }
    return start_run(tracking, params)


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
    ids: RunIds,
    skip_stage1: bool = False,
) -> _Stages:
    """Stage 1, then Stage 2 from its checkpoint; a stage's cache is refreshed when its final checkpoint is gone.

    `skip_stage1`: Stage 2 starts from the source (a stage folder of its own: no init hash)."""
    ids_kw = {"tracking_uri": ids.tracking_uri, "parent_run_id": ids.mlflow_run_id}
    manifest = (manifest_uri, manifest_hash)
    ckpt1 = hash1 = None
    if not skip_stage1:
        ckpt1, hash1 = run_stage(1, cfg, manifest, root, compute, **ids_kw)
    ckpt2, hash2 = run_stage(2, cfg, manifest, root, compute, (ckpt1, hash1), **ids_kw)
    curves_png = artifacts.training_curves(
        {**({"stage 1": curve_uri(ckpt1)} if ckpt1 else {}), "stage 2": curve_uri(ckpt2)},
        artifacts.plots_uri(root, hash2),
    )
    return _Stages(ckpt1, hash1, ckpt2, hash2, curves_png)


def _evaluate(
    st: _Stages, manifest_uri: str, manifest_hash: str, root: str, evaluation: Evaluation, ids: RunIds
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
    ids: RunIds,
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
    made = f"Byte-level `{lineage['source_id']}` (preset `{preset}`), made by {ids.made_by}."
    reg = register(ids, tracking, export_uri, lineage, metrics, f"{made}\n\n{table_md}")
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


def _summary(reg: dict[str, Any], run_url: str, ids: RunIds, st: _Stages, **outputs: Any) -> dict[str, Any]:
    """One flat dict of everything a caller chains on: each step's URIs and hashes (`outputs`),
    the model version, the MLflow and Prefect ids."""
    return {
        **{k: reg[k] for k in ("version", "alias_uri", "created")},
        "model_name": reg["name"],
        "model_uri": reg["uri"],
        "model_version_url": reg["url"],
        "stage1_checkpoint": st.ckpt1,
        "stage1_hash": st.hash1,
        "stage2_checkpoint": st.ckpt2,
        "stage2_hash": st.hash2,
        "tracking_uri": ids.tracking_uri,
        "mlflow_run_id": ids.mlflow_run_id,
        "mlflow_run_url": run_url,
        "flow_run_id": ids.flow_run_id,
        **outputs,
    }
