"""Prefect task: export the Stage-2 checkpoint as a Hugging Face folder and check parity.

A thin wrapper over ``bolmo_core.export``: the export lands in a folder named by the
checkpoint's hash; the parity check (exported model vs checkpoint on the same bytes) must
pass or the task fails without retry (a parity failure is deterministic). The parity
result is written last and is the folder's commit marker.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile

from prefect import task
from prefect.cache_policies import INPUTS, TASK_SOURCE

from bolmo_core import storage
from bolmo_core.export import PARITY_FILE

from .artifacts import Progress
from .retries import RETRY

PARITY = PARITY_FILE  # the parity report, written last: this folder's commit marker


class ExportParityError(RuntimeError):
    """The exported model does not reproduce the checkpoint's outputs."""


def export_out_uri(storage_root: str, checkpoint_hash: str) -> str:
    return storage.join(storage_root, "export", checkpoint_hash[:16])


def folder_hash(uri: str) -> str:
    """sha256 over (name, sha256) of every file in the export folder except the parity marker."""
    fs, path = storage.get_fs(uri)
    h = hashlib.sha256()
    for f in sorted(fs.find(path)):
        rel = f[len(path.rstrip("/")) + 1 :]
        if rel == PARITY:
            continue
        h.update(rel.encode() + b"\0" + storage.sha256_uri(storage.join(uri, rel)).encode() + b"\n")
    return h.hexdigest()


@task(name="export", cache_policy=INPUTS + TASK_SOURCE, persist_result=True, **RETRY)
def export_model(checkpoint_uri: str, checkpoint_hash: str, storage_root: str) -> tuple[str, str]:
    """(export folder URI, its content hash); parity-checked against the checkpoint."""
    from bolmo_core.export import ParityError, check_parity
    from bolmo_core.export import export_model as write_hf
    from bolmo_core.load import load_checkpoint_model

    out = export_out_uri(storage_root, checkpoint_hash)
    marker = storage.join(out, PARITY)
    if storage.exists(marker) and storage.read_json(marker).get("passed"):
        return out, folder_hash(out)
    remote = not storage.is_local(out)
    bar, total = Progress("export-progress", "Export"), 4 if remote else 3
    bar.update(0, total, f"1/{total} loading the Stage 2 checkpoint", force=True, eta=False)
    model, preset = load_checkpoint_model(checkpoint_uri)
    with tempfile.TemporaryDirectory(prefix="byteify-export-") as tmp:
        local = os.path.join(tmp, "model") if remote else storage.local_path(out)
        bar.update(1, total, f"2/{total} writing the Hugging Face folder", force=True, eta=False)
        write_hf(model, local, preset=preset, overwrite=True)
        bar.update(2, total, f"3/{total} parity: exported model vs checkpoint", force=True, eta=False)
        try:
            parity = check_parity(local, model)
        except ParityError as e:
            raise ExportParityError(str(e)) from None
        if remote:  # object storage: upload the finished folder, marker last
            bar.update(3, total, f"4/{total} uploading to {out}", force=True, eta=False)
            fs, path = storage.get_fs(out)
            fs.put(local.rstrip("/") + "/", path.rstrip("/") + "/", recursive=True)
        storage.write_json_atomic(marker, json.loads(json.dumps(parity, default=str)))
    digest = folder_hash(out)
    bar.finish(f"{out} (parity passed, sha256 {digest[:12]})")
    return out, digest
