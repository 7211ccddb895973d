"""MLflow for byteify: one run per flow run, a nested run per stage, batched metrics, and the
registry (the exported model as a pyfunc version with lineage tags and the ``candidate`` alias).

Everything here is idempotent, so a Prefect retry after a half-done call (MLflow server
gone mid-way) finds what the first attempt made instead of making it twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from prefect import task
from prefect.tasks import exponential_backoff

from bolmo_core import storage

from . import PROJECT_ROOT
from .mlflow_callback import MlflowCallback, _is_number, _metric_key  # noqa: F401 - re-exported

# MLflow's own HTTP retry ladder (7 tries, factor 2) takes minutes before it raises; keep
# it short so a dead server surfaces as a failed attempt that Prefect retries visibly.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no progress bars in task logs

RUN_ID_ENV = "MLFLOW_RUN_ID"
TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
ALIAS = "candidate"
LINEAGE_KEYS = (  # what names a model version; flow run id and eval summary are tags, not identity
    "source_id",
    "source_revision",
    "source_file_sha256",
    "manifest_hash",
    "stage1_checkpoint_hash",
    "stage2_checkpoint_hash",
    "export_hash",
)
PIP_REQUIREMENTS = [
    "torch==2.13.0",
    "transformers>=5.0,<6",
    "safetensors>=0.5",
    "tokenizers>=0.22",
    "mlflow==3.17.2",
]


class TrackingError(RuntimeError):
    """A tracking or registry call that cannot succeed as asked (not a transient outage)."""


# ---------------------------------------------------------------- transient or not

_TRANSIENT_TEXT = (
    "Max retries exceeded",
    "Failed to establish",
    "Connection refused",
    "Connection aborted",
    "Read timed out",
    "temporarily unavailable",
    "database is locked",
    "503",
    "502",
    "504",
)


def is_transient(exc: BaseException | None) -> bool:
    """True for outages worth retrying (server down, timeouts, locked sqlite), False for bugs and bad input."""
    seen = 0
    while exc is not None and seen < 5:
        if isinstance(exc, ConnectionError | TimeoutError):
            return True
        name = type(exc).__name__
        if name in (
            "ConnectionError",
            "ConnectTimeout",
            "ReadTimeout",
            "EndpointConnectionError",
            "OperationalError",
        ):
            return True
        code = getattr(exc, "error_code", None)
        if code in ("TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"):
            return True
        if any(t in str(exc) for t in _TRANSIENT_TEXT):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def retry_if_transient(task_obj, task_run, state) -> bool:
    """Prefect ``retry_condition_fn``: retry outages, fail fast on deterministic errors."""
    exc = state.data if isinstance(state.data, BaseException) else None
    if exc is None:
        try:
            state.result(raise_on_failure=True)
        except BaseException as e:  # noqa: BLE001 - we only classify it
            exc = e
    return is_transient(exc)


# ---------------------------------------------------------------- runs


def default_tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI, else the project's local SQLite store under var/mlflow."""
    uri = os.environ.get(TRACKING_URI_ENV)
    if uri:
        return uri
    path = PROJECT_ROOT / "var" / "mlflow" / "mlflow.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def _client(tracking_uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def code_version() -> str:
    """The git commit of the project (``+dirty`` when tracked files changed), or 'unknown'."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=PROJECT_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head + ("+dirty" if dirty else "")) if head else "unknown"


def ensure_experiment(tracking_uri: str, name: str, artifact_location: str | None = None) -> str:
    client = _client(tracking_uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    if artifact_location is None and tracking_uri.startswith("sqlite:///"):
        # A local store keeps artifacts beside its database, not in ./mlartifacts of the cwd.
        db = Path(tracking_uri[len("sqlite:///") :])
        artifact_location = (db.parent / "artifacts" / name).resolve().as_uri()
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except Exception:  # created meanwhile by another process
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested dict -> {"a.b": "value"} with values cut to MLflow's 6000-character limit."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = (json.dumps(v) if isinstance(v, list | tuple) else str(v))[:6000]
    return out


def _log_params(client, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(_metric_key(k), v) for k, v in flatten(params).items()]
    existing = client.get_run(run_id).data.params
    items = [p for p in items if p.key not in existing]  # params are write-once; a retry re-sends them
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i : i + 100])


def _find_run(client, experiment_id: str, tags: dict[str, str]) -> str | None:
    flt = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    runs = client.search_runs([experiment_id], filter_string=flt, max_results=1)
    return runs[0].info.run_id if runs else None


def start_flow_run(
    tracking_uri: str,
    experiment: str,
    flow_run_id: str,
    params: dict[str, Any],
    run_name: str | None = None,
    artifact_location: str | None = None,
) -> str:
    """The MLflow run of one flow run (found again on retry by its flow-run tag)."""
    client = _client(tracking_uri)
    exp_id = ensure_experiment(tracking_uri, experiment, artifact_location)
    key = {"byteify.flow_run_id": flow_run_id, "byteify.kind": "flow"}
    run_id = _find_run(client, exp_id, key)
    if run_id is None:
        tags = {**key, "byteify.code_version": code_version()}
        run_id = client.create_run(exp_id, run_name=run_name, tags=tags).info.run_id
    _log_params(client, run_id, params)
    return run_id


def start_stage_run(tracking_uri: str, parent_run_id: str, stage: str, params: dict[str, Any]) -> str:
    """A nested run under the flow's run for one stage (same run again on a task retry)."""
    client = _client(tracking_uri)
    parent = client.get_run(parent_run_id)
    exp_id = parent.info.experiment_id
    key = {"mlflow.parentRunId": parent_run_id, "byteify.stage": stage}
    run_id = _find_run(client, exp_id, key)
    if run_id is None:
        run_id = client.create_run(exp_id, run_name=stage, tags=key).info.run_id
    else:
        client.update_run(run_id, status="RUNNING")
    _log_params(client, run_id, params)
    return run_id


def end_run(tracking_uri: str, run_id: str, status: str = "FINISHED") -> None:
    _client(tracking_uri).set_terminated(run_id, status=status)


def client_set_tags(tracking_uri: str, run_id: str, tags: dict[str, str]) -> None:
    client = _client(tracking_uri)
    for k, v in tags.items():
        client.set_tag(run_id, k, str(v)[:5000])


def log_metrics(tracking_uri: str, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(_metric_key(k), float(v), now, step) for k, v in metrics.items() if _is_number(v)]
    if batch:
        _client(tracking_uri).log_batch(run_id, metrics=batch)


def log_artifact_uri(tracking_uri: str, run_id: str, uri: str, artifact_path: str | None = None) -> None:
    """Copy a file or folder at any storage URI into the run's artifacts."""
    client = _client(tracking_uri)
    fs, path = storage.get_fs(uri)
    with tempfile.TemporaryDirectory(prefix="byteify-art-") as tmp:
        local = os.path.join(tmp, os.path.basename(path.rstrip("/")))
        if fs.isdir(path):
            fs.get(path.rstrip("/") + "/", local, recursive=True)
            client.log_artifacts(run_id, local, artifact_path=artifact_path)
        else:
            fs.get(path, local)
            client.log_artifact(run_id, local, artifact_path=artifact_path)


def log_file(
    tracking_uri: str, run_id: str, name: str, data: bytes, artifact_path: str | None = None
) -> None:
    with tempfile.TemporaryDirectory(prefix="byteify-art-") as tmp:
        p = os.path.join(tmp, name)
        Path(p).write_bytes(data)
        _client(tracking_uri).log_artifact(run_id, p, artifact_path=artifact_path)


def run_url(tracking_uri: str, run_id: str) -> str:
    """A link to the run in the MLflow UI (a CLI hint for a local store)."""
    client = _client(tracking_uri)
    exp_id = client.get_run(run_id).info.experiment_id
    base = _ui_base(tracking_uri)
    return f"{base}/#/experiments/{exp_id}/runs/{run_id}"


def model_version_url(tracking_uri: str, name: str, version: str) -> str:
    return f"{_ui_base(tracking_uri)}/#/models/{name}/versions/{version}"


def _ui_base(tracking_uri: str) -> str:
    if tracking_uri.startswith(("http://", "https://")):
        return tracking_uri.rstrip("/")
    # A file/sqlite store has no server: `mlflow ui --backend-store-uri <uri>` serves it here.
    return "http://127.0.0.1:5000"


# ---------------------------------------------------------------- trainer callback

# ---------------------------------------------------------------- registry


def lineage_hash(lineage: dict[str, Any]) -> str:
    """The identity of a model version: hash of the lineage fields that name its inputs and weights."""
    ident = {k: str(lineage.get(k, "")) for k in LINEAGE_KEYS}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def lineage_tags(lineage: dict[str, Any]) -> dict[str, str]:
    tags = {}
    for k, v in lineage.items():
        tags[f"byteify.{k}"] = (v if isinstance(v, str) else json.dumps(v, sort_keys=True))[:5000]
    tags["byteify.lineage_hash"] = lineage_hash(lineage)
    return tags


def _ensure_registered_model(client, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException as e:
        if getattr(e, "error_code", "") != "RESOURCE_DOES_NOT_EXIST":
            raise
        try:
            client.create_registered_model(
                name, description="Byte-level models made by byteify (Bolmo recipe)."
            )
        except MlflowException as e2:
            if getattr(e2, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
                raise


def find_version(tracking_uri: str, model_name: str, lineage: dict[str, Any]):
    """The existing model version with this lineage, or None."""
    client = _client(tracking_uri)
    h = lineage_hash(lineage)
    try:
        found = client.search_model_versions(f"name = '{model_name}' and tags.`byteify.lineage_hash` = '{h}'")
    except Exception as e:
        if "RESOURCE_DOES_NOT_EXIST" in str(e):
            return None
        raise
    return min(found, key=lambda v: int(v.version)) if found else None


def _wait_ready(client, name: str, version: str, timeout_s: float) -> None:
    deadline = time.time() + timeout_s
    while True:
        mv = client.get_model_version(name, version)
        if mv.status == "READY":
            return
        if mv.status == "FAILED_REGISTRATION":
            raise TrackingError(
                f"model '{name}' version {version}: registration failed ({mv.status_message})"
            )
        if time.time() > deadline:
            raise TimeoutError(f"model '{name}' version {version}: not READY after {timeout_s:.0f} s")
        time.sleep(1.0)


def _local_copy(uri: str, tmp: str) -> str:
    """A local folder with the exported model (downloaded when it lives on S3)."""
    if storage.is_local(uri):
        path = storage.local_path(uri)
        if not os.path.isdir(path):
            raise TrackingError(f"export folder '{uri}': does not exist")
        return path
    fs, path = storage.get_fs(uri)
    if not fs.isdir(path):
        raise TrackingError(f"export folder '{uri}': does not exist")
    dest = os.path.join(tmp, "hf_model")
    fs.get(path.rstrip("/") + "/", dest, recursive=True)
    return dest


def _log_pyfunc(tracking_uri: str, run_id: str | None, export_uri: str, tags: dict[str, str]) -> str:
    """Log the pyfunc (HF folder inside) once per lineage; returns its ``models:/m-...`` URI."""
    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    mlflow.set_tracking_uri(tracking_uri)
    client = _client(tracking_uri)
    exp_ids = [client.get_run(run_id).info.experiment_id] if run_id else None
    h = tags["byteify.lineage_hash"]
    prior = (
        mlflow.search_logged_models(
            experiment_ids=exp_ids, filter_string=f"tags.`byteify.lineage_hash` = '{h}'", output_format="list"
        )
        if exp_ids
        else []
    )
    ready = [m for m in prior if str(m.status).endswith("READY")]
    if ready:
        return f"models:/{ready[0].model_id}"
    signature = ModelSignature(
        inputs=Schema([ColSpec("string")]),  # a list of prompts
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema(
            [ParamSpec("max_new_tokens", "long", 32), ParamSpec("temperature", "double", 0.0)]
        ),
    )
    with tempfile.TemporaryDirectory(prefix="byteify-reg-") as tmp:
        folder = _local_copy(export_uri, tmp)
        ctx = mlflow.start_run(run_id=run_id) if run_id else _nullcontext()
        with ctx:
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(Path(__file__).with_name("pyfunc_model.py")),
                artifacts={"hf_model": folder},
                signature=signature,
                pip_requirements=PIP_REQUIREMENTS,  # skips the ~7 s requirement inference (stack.md M3)
                tags={"byteify.lineage_hash": h},
            )
    return info.model_uri


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


def register_model(
    tracking_uri: str,
    model_name: str,
    export_uri: str,
    lineage: dict[str, Any],
    run_id: str | None = None,
    alias: str = ALIAS,
    timeout_s: float = 300,
) -> dict[str, Any]:
    """Register the exported folder as a pyfunc model version with lineage tags and `alias`.

    One lineage, one version: an existing version with the same lineage hash is reused (and
    finished: tags, READY, alias), so retries and re-runs never add a duplicate.
    """
    if not re.fullmatch(r"[A-Za-z0-9_.\-/ ]+", model_name or ""):
        raise TrackingError(f"model name '{model_name}': use letters, digits, '_', '-', '.', '/'")
    client = _client(tracking_uri)
    _ensure_registered_model(client, model_name)
    lineage = {"code_version": code_version(), **lineage}
    tags = lineage_tags(lineage)
    mv = find_version(tracking_uri, model_name, lineage)
    created = mv is None
    if mv is None:
        source = _log_pyfunc(tracking_uri, run_id, export_uri, tags)
        # The lineage hash goes in with the version itself (create call), so a crash right
        # after creation still leaves a version the next attempt finds.
        mv = client.create_model_version(
            model_name,
            source=source,
            run_id=run_id,
            tags={"byteify.lineage_hash": tags["byteify.lineage_hash"]},
            model_id=source.split("/", 1)[1] if source.startswith("models:/m-") else None,
        )
    version = str(mv.version)
    _wait_ready(client, model_name, version, timeout_s)
    for k, v in tags.items():
        client.set_model_version_tag(model_name, version, k, v)
    client.set_registered_model_alias(model_name, alias, version)
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


# ---------------------------------------------------------------- Prefect tasks

_RETRY = dict(
    retries=5,
    retry_delay_seconds=exponential_backoff(backoff_factor=2),
    retry_jitter_factor=0.2,
    retry_condition_fn=retry_if_transient,
)


@task(name="mlflow-start-run", **_RETRY)
def mlflow_start_run(
    tracking_uri: str,
    experiment: str,
    flow_run_id: str,
    params: dict[str, Any],
    run_name: str | None = None,
    artifact_location: str | None = None,
) -> str:
    """The flow run's MLflow run id."""
    return start_flow_run(tracking_uri, experiment, flow_run_id, params, run_name, artifact_location)


@task(name="mlflow-log", **_RETRY)
def mlflow_log(
    tracking_uri: str,
    run_id: str,
    metrics: dict[str, float] | None = None,
    artifacts: dict[str, str] | None = None,
    tags: dict[str, str] | None = None,
) -> None:
    """Metrics, artifacts ({artifact folder: storage URI}) and tags on a run."""
    if metrics:
        log_metrics(tracking_uri, run_id, metrics)
    for dest, uri in (artifacts or {}).items():
        log_artifact_uri(tracking_uri, run_id, uri, artifact_path=dest or None)
    client = _client(tracking_uri)
    for k, v in (tags or {}).items():
        client.set_tag(run_id, k, v)


@task(name="source-lineage", retries=2, retry_delay_seconds=5, cache_policy=None)
def source_lineage(source_config) -> dict[str, str]:
    """Source model id, revision and weights-file hash (bolmo_core.source.source_identity)."""
    from bolmo_core.source import source_identity

    return {k: str(v) for k, v in source_identity(source_config).items()}


@task(name="mlflow-end-run", **_RETRY)
def mlflow_end_run(tracking_uri: str, run_id: str, status: str = "FINISHED") -> None:
    end_run(tracking_uri, run_id, status)


@task(name="mlflow-register", **_RETRY)
def mlflow_register(
    tracking_uri: str,
    model_name: str,
    export_uri: str,
    lineage: dict[str, Any],
    run_id: str | None = None,
    alias: str = ALIAS,
) -> dict[str, Any]:
    """Register the exported model (idempotent per lineage); returns name, version, URIs."""
    return register_model(tracking_uri, model_name, export_uri, lineage, run_id=run_id, alias=alias)
