"""Prefect tasks for the instruct-delta transfer (flows/transfer.py): a thin wrapper over
``bolmo_core.transfer`` (task arithmetic on the global blocks, export, parity) and the
evaluation of the result next to the instruct source.

The result lands in a folder named by the byte model's hash and the transfer's settings; its
``transfer.json`` (the report, with the parity check) is written last and is the commit marker.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Any

from prefect import task
from prefect.cache_policies import INPUTS, TASK_SOURCE

from bolmo_core import storage

from .evaluation import SCORED, scoring_code, write_report
from .export import folder_hash
from .retries import RETRY

REPORT = "transfer.json"


@task(name="model-identity", cache_policy=None, **RETRY)
def model_identity(byte_model_uri: str) -> dict[str, Any]:
    """A byte model's weights hash and the data it was trained on (a checkpoint's manifest, if any)."""
    from bolmo_core import checkpoint as ckpt
    from bolmo_core.load import is_checkpoint_dir

    if is_checkpoint_dir(byte_model_uri):
        uri = ckpt.resolve_checkpoint(byte_model_uri)
        cfg = ckpt.read_config(uri)
        return {"uri": uri, "hash": ckpt.checkpoint_hash(uri), "manifest_uri": cfg.get("manifest_uri")}
    if not storage.exists(storage.join(byte_model_uri, "config.json")):
        raise ValueError(
            f"byte_model '{byte_model_uri}': neither a committed checkpoint nor an exported model"
        )
    return {"uri": byte_model_uri, "hash": folder_hash(byte_model_uri), "manifest_uri": None}


def transfer_out_uri(storage_root: str, model_hash: str, settings: dict) -> str:
    key = json.dumps([model_hash, settings], sort_keys=True)
    return storage.join(storage_root, "transfer", hashlib.sha256(key.encode()).hexdigest()[:16])


@task(name="transfer", cache_policy=INPUTS + TASK_SOURCE, persist_result=True, **RETRY)
def transfer_model(
    byte_model_uri: str,
    model_hash: str,
    base: str,
    instruct: str,
    alpha: float,
    retained_embeddings: bool,
    storage_root: str,
) -> tuple[str, str]:
    """(exported folder URI, its content hash) of the byte model plus alpha * (instruct - base)."""
    from bolmo_core.transfer import transfer_export

    settings = {
        "base": base,
        "instruct": instruct,
        "alpha": alpha,
        "retained_embeddings": retained_embeddings,
    }
    out = transfer_out_uri(storage_root, model_hash, settings)
    marker = storage.join(out, REPORT)
    if storage.exists(marker):
        return out, folder_hash(out)
    with tempfile.TemporaryDirectory(prefix="byteify-transfer-") as tmp:
        local = os.path.join(tmp, "model") if not storage.is_local(out) else storage.local_path(out)
        _, _, report = transfer_export(
            byte_model_uri,
            base,
            instruct,
            local,
            alpha=alpha,
            retained_embeddings=retained_embeddings,
            overwrite=True,
        )
        if not storage.is_local(out):  # object storage: the finished folder, the marker last
            fs, path = storage.get_fs(out)
            fs.put(local.rstrip("/") + "/", path.rstrip("/") + "/", recursive=True)
        storage.write_json_atomic(marker, json.loads(json.dumps(report, default=str)))
    return out, folder_hash(out)


@task(name="evaluate-transfer", cache_policy=SCORED, persist_result=True, **RETRY)
def evaluate_transfer(
    export_uri: str,
    export_hash: str,
    instruct: str,
    text_uri: str | None,
    manifest_uri: str | None,
    max_bytes: int,
) -> str:
    """The transferred model scored next to the instruct model on held-out bytes; the report's URI."""
    import torch

    from bolmo_core.evaluate import EvalConfig, evaluate
    from bolmo_core.load import load_byte_model
    from bolmo_core.loader import split_texts
    from bolmo_core.source import SourceConfig, load_source_model, load_tokenizer

    out = storage.join(export_uri, f"evaluation-{scoring_code()}.json")  # a report per scoring code
    if storage.exists(out):
        return out
    if text_uri:
        docs = [storage.read_bytes(text_uri)]
    elif manifest_uri:
        docs = split_texts(manifest_uri, "validation", max_bytes)
    else:
        raise ValueError("evaluation: give `text` (a held-out text file) for a byte model without a manifest")
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="byteify-transfer-eval-") as tmp:
        model, preset = load_byte_model(storage.local_copy(export_uri, tmp))
    report = evaluate(
        docs,
        load_tokenizer(preset.model.source),
        source_model=load_source_model(SourceConfig(instruct)),
        byte_model=model,
        cfg=EvalConfig(max_bytes=max_bytes, cute_tasks=()),
        byte_length=preset.data.byte_slots,
    )
    report["compared_with"] = instruct
    write_report(out, report)
    return out
