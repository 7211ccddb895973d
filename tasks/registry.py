"""The model registry for byteify: the exported model as a pyfunc version with lineage tags,
its evaluation and an alias; one version per lineage.

MLflow does the waiting (``create_model_version(await_creation_for=...)``), the signature
(from ``predict``'s type hints and an input example) and links the run's step-0 metrics to
the logged model. What is ours is idempotency: a logged model and a version are found again
by their lineage hash, so a retry or a re-run never registers the same weights twice.
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from prefect import task

from bolmo_core import storage

from .retries import RETRY
from .tracking import client, code_version, model_version_url

ALIAS = "candidate"
LINEAGE_KEYS = (  # what names a model version; the flow run and the evaluation are tags, not identity
    "source_id",
    "source_revision",
    "source_file_sha256",
    "manifest_hash",
    "stage1_checkpoint_hash",
    "stage2_checkpoint_hash",
    "export_hash",
)
PIP_REQUIREMENTS = ["torch==2.13.0", "transformers>=5.0,<6", "safetensors>=0.5", "mlflow==3.17.2"]


class RegistryError(ValueError):
    """A registration that cannot succeed as asked (not an outage)."""


@task(name="source-lineage", cache_policy=None, **RETRY)
def source_lineage(source_config) -> dict[str, str]:
    """Source model id, revision and weights-file hash (bolmo_core.source.source_identity)."""
    from bolmo_core.source import source_identity

    return {k: str(v) for k, v in source_identity(source_config).items()}


def lineage_hash(lineage: dict[str, Any]) -> str:
    """The identity of a model version: hash of the lineage fields that name its inputs and weights."""
    ident = {k: str(lineage.get(k, "")) for k in LINEAGE_KEYS}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def version_tags(lineage: dict[str, Any], evaluation: dict[str, float]) -> dict[str, str]:
    """Lineage as ``byteify.<key>`` and each evaluation number as ``byteify.eval.<side>.<metric>``."""
    tags = {f"byteify.{k}": str(v)[:5000] for k, v in lineage.items()}
    tags |= {f"byteify.eval.{k.replace('/', '.')}": f"{v:.6g}" for k, v in evaluation.items()}
    tags["byteify.lineage_hash"] = lineage_hash(lineage)
    return tags


def find_version(tracking_uri: str, model_name: str, lineage: dict[str, Any]):
    """The existing model version with this lineage, or None."""
    flt = f"name = '{model_name}' and tags.`byteify.lineage_hash` = '{lineage_hash(lineage)}'"
    found = client(tracking_uri).search_model_versions(flt)
    return min(found, key=lambda v: int(v.version)) if found else None


def _local_copy(uri: str, tmp: str) -> str:
    """A local folder with the exported model (downloaded when it lives on S3)."""
    fs, path = storage.get_fs(uri)
    if not fs.isdir(path):
        raise RegistryError(f"export folder '{uri}': does not exist")
    return storage.local_copy(uri, tmp)


def _log_pyfunc(tracking_uri: str, run_id: str | None, export_uri: str, lineage_h: str) -> str:
    """The pyfunc (HF folder inside) logged once per lineage: its ``models:/m-...`` URI."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    mlc = client(tracking_uri)
    exp_ids = [mlc.get_run(run_id).info.experiment_id] if run_id else None
    if exp_ids:
        flt = f"tags.`byteify.lineage_hash` = '{lineage_h}'"
        ready = [
            m for m in mlc.search_logged_models(exp_ids, filter_string=flt) if str(m.status).endswith("READY")
        ]
        if ready:
            return f"models:/{ready[0].model_id}"
    with (
        tempfile.TemporaryDirectory(prefix="byteify-reg-") as tmp,
        mlflow.start_run(run_id=run_id) if run_id else nullcontext(),
    ):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(Path(__file__).with_name("pyfunc_model.py")),  # models from code: no pickle
            artifacts={"hf_model": _local_copy(export_uri, tmp)},
            # The example is validated against predict's type hints and served as the version's example.
            input_example=(["The capital of France is"], {"max_new_tokens": 16, "temperature": 0.0}),
            pip_requirements=PIP_REQUIREMENTS,  # skips ~7 s of requirement inference
            tags={"byteify.lineage_hash": lineage_h},
        )
    return info.model_uri


def _ensure_registered_model(mlc, model_name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        mlc.create_registered_model(
            model_name, description="Byte-level models made by byteify (Bolmo recipe)."
        )
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def _complete_version(mlc, mv, tags: dict[str, str], replace_eval: bool) -> None:
    """Tags an existing version lacks. Lineage that is there stays (the version names the flow run
    that made it); with `replace_eval`, the `byteify.eval.*` tags become exactly the latest
    evaluation's, so a re-scored model does not keep stale numbers."""
    evals = {k for k in tags.keys() | mv.tags.keys() if k.startswith("byteify.eval.")}
    for k, v in tags.items():
        if k not in mv.tags or (replace_eval and k in evals and mv.tags[k] != v):
            mlc.set_model_version_tag(mv.name, mv.version, k, v)
    for k in (evals - tags.keys()) if replace_eval else ():
        mlc.delete_model_version_tag(mv.name, mv.version, k)


@task(name="mlflow-register", **RETRY)
def register_model(
    tracking_uri: str,
    model_name: str,
    export_uri: str,
    lineage: dict[str, Any],
    evaluation: dict[str, float] | None = None,
    run_id: str | None = None,
    alias: str = ALIAS,
    description: str = "",
    timeout_s: int = 300,
) -> dict[str, Any]:
    """Register the exported folder as a pyfunc version with lineage tags and `alias` (one version per lineage)."""
    if not re.fullmatch(r"[A-Za-z0-9_.\-/ ]+", model_name or ""):
        raise RegistryError(f"model name '{model_name}': use letters, digits, '_', '-', '.', '/'")
    mlc = client(tracking_uri)
    _ensure_registered_model(mlc, model_name)
    lineage = {"code_version": code_version(), **lineage}
    tags = version_tags(lineage, evaluation or {})
    mv = find_version(tracking_uri, model_name, lineage)
    created = mv is None
    if created:
        source = _log_pyfunc(tracking_uri, run_id, export_uri, tags["byteify.lineage_hash"])
        # Every tag goes in with the create call, so a crash right after it leaves a complete version.
        mv = mlc.create_model_version(
            model_name,
            source=source,
            run_id=run_id,
            tags=tags,
            description=description or None,
            await_creation_for=timeout_s,
            model_id=source.removeprefix("models:/") if source.startswith("models:/m-") else None,
        )
    else:  # an earlier attempt or run made it: complete what it may have left out
        _complete_version(mlc, mv, tags, replace_eval=bool(evaluation))
    version = str(mv.version)
    mlc.set_registered_model_alias(model_name, alias, version)
    return {
        "name": model_name,
        "version": version,
        "alias": alias,
        "created": created,
        "uri": f"models:/{model_name}/{version}",
        "alias_uri": f"models:/{model_name}@{alias}",
        "lineage_hash": tags["byteify.lineage_hash"],
        "url": model_version_url(tracking_uri, model_name, version),
    }
