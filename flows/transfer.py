"""Instruct-delta transfer as a flow: a byte model + (instruct - base) on its global blocks
(bolmo_core/transfer.py), exported with parity, scored next to the instruct model, registered.

    byte model (a checkpoint or an export of the main flow)
      -> transfer (task arithmetic, export, parity) -> evaluate vs the instruct source -> register

The same as ``byteify transfer BYTE_MODEL --base B --instruct I --out DIR --text FILE`` on the
command line, with the flow's caching (a finished transfer is reused), the evaluation table in
the Prefect UI and a registered MLflow model version carrying base, instruct and alpha as tags.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from flows.byteify import Evaluation, Tracking, _default_root, _flow_run_url
from tasks import artifacts, registry
from tasks import tracking as mlflow_tasks
from tasks.transfer import evaluate_transfer, model_identity, transfer_model


@flow(
    name="byteify-transfer",
    log_prints=True,
    on_failure=[mlflow_tasks.mark_failed],
    on_crashed=[mlflow_tasks.mark_failed],
    on_cancellation=[mlflow_tasks.mark_failed],
)
def byteify_transfer(
    byte_model: str,
    base: str,
    instruct: str,
    alpha: float = 1.0,
    retained_embeddings: bool = False,
    text: str | None = None,
    storage_root: str | None = None,
    evaluation: Evaluation = Evaluation(),
    tracking: Tracking = Tracking(experiment="byteify-transfer", model_name="byteify-instruct"),
) -> dict[str, Any]:
    """Add alpha * (instruct - base) to `byte_model`'s global blocks; export, evaluate, register.

    `base`/`instruct`: hub ids, HF folders, .gguf files or built-ins, of one architecture (the
    byte model's source's). `text`: held-out text to score on (default: the validation split of
    the data a checkpoint was trained on).
    """
    log = get_run_logger()
    root = storage_root or _default_root()
    uri = tracking.tracking_uri or mlflow_tasks.default_tracking_uri()
    fr_id = str(flow_run.id or "local")
    ident = model_identity(byte_model)
    run_id = mlflow_tasks.start_flow_run(
        uri,
        tracking.experiment,
        fr_id,
        {
            "byte_model": ident["uri"],
            "base": base,
            "instruct": instruct,
            "alpha": alpha,
            "retained_embeddings": retained_embeddings,
        },
        run_name=flow_run.name or None,
        artifact_location=tracking.artifact_location,
        flow_run_url=_flow_run_url(fr_id),
    )
    export_uri, export_hash = transfer_model(
        ident["uri"], ident["hash"], base, instruct, alpha, retained_embeddings, root
    )
    report_uri = evaluate_transfer(
        export_uri, export_hash, instruct, text, ident["manifest_uri"], evaluation.max_bytes
    )
    table_md, metrics = artifacts.evaluation_table(report_uri)
    mlflow_tasks.log_to_run(uri, run_id, metrics=metrics, artifacts={"evaluation": report_uri})
    lineage = {
        "source_id": instruct,
        "source_revision": "",
        "byte_model_hash": ident["hash"],
        "base": base,
        "instruct": instruct,
        "alpha": alpha,
        "retained_embeddings": retained_embeddings,
        "export_hash": export_hash,
        "flow_run_id": fr_id,
    }
    reg = registry.register_model(
        uri,
        tracking.model_name,
        export_uri,
        lineage,
        metrics,
        run_id=run_id,
        alias=tracking.alias,
        description=f"`{byte_model}` + {alpha:g} x (`{instruct}` - `{base}`) on the global blocks.\n\n{table_md}",
    )
    mlflow_tasks.finish_flow_run(uri, run_id, {}, f"registered {reg['uri']}\n\n{table_md}")
    log.info(f"registered {reg['uri']}; export at {export_uri}")
    return {
        "export_uri": export_uri,
        "export_hash": export_hash,
        "report_uri": report_uri,
        "model_uri": reg["uri"],
        "metrics": metrics,
        "mlflow_run_id": run_id,
    }
