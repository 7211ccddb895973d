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

from prefect import get_run_logger

from flows.common import Evaluation, RunIds, Tracking, default_root, register, start_run, tracked_flow
from tasks import artifacts
from tasks import tracking as mlflow_tasks
from tasks.transfer import evaluate_transfer, model_identity, transfer_model


@tracked_flow("byteify-transfer")
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
    root = storage_root or default_root()
    ident = model_identity(byte_model)
    params = {
        "byte_model": ident["uri"],
        "base": base,
        "instruct": instruct,
        "alpha": alpha,
        "retained_embeddings": retained_embeddings,
    }
    ids = start_run(tracking, params)
    # The figure: transfer (task arithmetic, export, parity) -> evaluate vs the instruct source -> register.
    export_uri, export_hash = transfer_model(
        ident["uri"], ident["hash"], base, instruct, alpha, retained_embeddings, root
    )
    report_uri, table_md, metrics = _evaluate(ids, export_uri, export_hash, instruct, text, ident, evaluation)
    lineage = {
        "source_id": instruct,
        "source_revision": "",
        "byte_model_hash": ident["hash"],
        "base": base,
        "instruct": instruct,
        "alpha": alpha,
        "retained_embeddings": retained_embeddings,
        "export_hash": export_hash,
        "flow_run_id": ids.flow_run_id,
    }
    made = f"`{byte_model}` + {alpha:g} x (`{instruct}` - `{base}`) on the global blocks."
    reg = register(ids, tracking, export_uri, lineage, metrics, f"{made}\n\n{table_md}")
    mlflow_tasks.finish_flow_run(
        ids.tracking_uri, ids.mlflow_run_id, {}, f"registered {reg['uri']}\n\n{table_md}"
    )
    get_run_logger().info(f"registered {reg['uri']}; export at {export_uri}")
    return {
        "export_uri": export_uri,
        "export_hash": export_hash,
        "report_uri": report_uri,
        "model_uri": reg["uri"],
        "metrics": metrics,
        "mlflow_run_id": ids.mlflow_run_id,
    }


def _evaluate(
    ids: RunIds,
    export_uri: str,
    export_hash: str,
    instruct: str,
    text: str | None,
    ident: dict,
    evaluation: Evaluation,
) -> tuple[str, str, dict[str, float]]:
    """Score the transferred export next to the instruct source, show it, log it on the flow's MLflow run.

    Returns (report URI, markdown table, summary metrics)."""
    report_uri = evaluate_transfer(
        export_uri, export_hash, instruct, text, ident["manifest_uri"], evaluation.max_bytes
    )
    table_md, metrics = artifacts.evaluation_table(report_uri)
    mlflow_tasks.log_to_run(
        ids.tracking_uri, ids.mlflow_run_id, metrics=metrics, artifacts={"evaluation": report_uri}
    )
    return report_uri, table_md, metrics
