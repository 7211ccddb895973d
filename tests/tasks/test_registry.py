"""The model registry on real stores: a SQLite store, and a real MLflow server that goes down (slow)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from task_helpers import mlflow_store

from bolmo_core.source import SourceConfig, resolve_source
from tasks import registry, tracking
from tasks.training import stop_group

LINEAGE = {
    "source_id": "byteify/tiny-olmo2",
    "source_revision": "byteify==0.1.0 built-in",
    "source_file_sha256": "f" * 64,
    "manifest_hash": "m" * 64,
    "stage1_checkpoint_hash": "a" * 64,
    "stage2_checkpoint_hash": "b" * 64,
    "export_hash": "c" * 64,
    "flow_run_id": "fr-1",
    "flow_run_url": "http://127.0.0.1:4200/runs/flow-run/fr-1",
}
EVAL = {"byte_model/bits_per_byte": 2.5, "source/bits_per_byte": 1.25}


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> str:
    """A real HF-format causal LM folder (the tiny OLMo 2 source) standing in for an export."""
    src, _ = resolve_source(SourceConfig("tiny-olmo2"))
    dest = tmp_path_factory.mktemp("export") / "hf"
    shutil.copytree(src, dest)
    return str(dest)


@pytest.fixture(scope="module")
def store() -> str:
    return mlflow_store()


def test_register_typed_pyfunc_with_lineage_once_per_lineage(tmp_path, hf_folder, store):
    import mlflow

    uri = store
    run_id = tracking.start_flow_run.fn(uri, "registry", "fr-1", {"preset": "tiny"})
    tracking.log_to_run.fn(uri, run_id, metrics=EVAL)
    first = registry.register_model.fn(
        uri, "byteify-t", hf_folder, LINEAGE, EVAL, run_id=run_id, description="d"
    )
    assert (first["version"], first["created"]) == ("1", True)
    again = registry.register_model.fn(
        uri, "byteify-t", hf_folder, {**LINEAGE, "flow_run_id": "fr-2"}, EVAL, run_id=run_id
    )
    assert (again["version"], again["created"]) == ("1", False)  # same lineage: no second version

    client = tracking.client(uri)
    mv = client.get_model_version_by_alias("byteify-t", "candidate")
    assert str(mv.version) == "1" and mv.status == "READY" and mv.description == "d"
    for key in (*registry.LINEAGE_KEYS, "flow_run_url", "code_version", "lineage_hash"):
        assert mv.tags.get(f"byteify.{key}"), key
    assert mv.tags["byteify.flow_run_id"] == "fr-1"  # the run that made it, not the re-run
    assert mv.tags["byteify.eval.byte_model.bits_per_byte"] == "2.5"
    assert not [k for k in mv.tags if "__" in k]
    model = client.get_logged_model(mv.source.removeprefix("models:/"))
    assert {m.key for m in model.metrics} == set(EVAL)  # step-0 run metrics linked to the model

    newer = registry.register_model.fn(
        uri, "byteify-t", hf_folder, {**LINEAGE, "stage2_checkpoint_hash": "d" * 64}, run_id=run_id
    )
    assert (newer["version"], newer["created"]) == ("2", True)
    assert str(client.get_model_version_by_alias("byteify-t", "candidate").version) == "2"

    mlflow.set_tracking_uri(uri)
    loaded = mlflow.pyfunc.load_model("models:/byteify-t/1")
    sig = loaded.metadata.signature
    assert sig.inputs.to_dict() == [{"type": "string", "required": True}]
    assert {p.name: p.default for p in sig.params.params} == {"max_new_tokens": 16, "temperature": 0.0}
    out = loaded.predict(["The capital of France is", "Hello"], params={"max_new_tokens": 4})
    assert len(out) == 2 and all(isinstance(o, str) for o in out)
    with pytest.raises(Exception, match="(?i)type"):
        loaded.predict([1, 2])  # checked against predict's type hints


def test_half_done_registration_is_completed_not_duplicated(tmp_path, hf_folder, store):
    """An attempt that created the version and then died (no tags, no alias) is finished by the next."""
    uri = store
    client = tracking.client(uri)
    client.create_registered_model("byteify-h")
    h = registry.lineage_hash(LINEAGE)
    client.create_model_version("byteify-h", source=hf_folder, tags={"byteify.lineage_hash": h})
    out = registry.register_model.fn(uri, "byteify-h", hf_folder, LINEAGE, EVAL)
    assert (out["version"], out["created"]) == ("1", False)
    mv = client.get_model_version_by_alias("byteify-h", "candidate")
    assert (
        mv.tags["byteify.manifest_hash"] == "m" * 64
        and mv.tags["byteify.eval.source.bits_per_byte"] == "1.25"
    )
    assert len(client.search_model_versions("name = 'byteify-h'")) == 1
    with pytest.raises(registry.RegistryError, match="model name"):
        registry.register_model.fn(uri, "bad'name", hf_folder, LINEAGE)


def test_a_re_scored_version_carries_its_latest_evaluation(tmp_path, hf_folder, store):
    """Same weights scored again (e.g. by fixed scoring code): the one version's eval tags follow
    the new numbers; its lineage still names the run that made it."""
    uri = store
    registry.register_model.fn(uri, "byteify-e", hf_folder, LINEAGE, {**EVAL, "byte_model/old_metric": 1.0})
    rescored = {**EVAL, "byte_model/bits_per_byte": 2.25}
    out = registry.register_model.fn(
        uri, "byteify-e", hf_folder, {**LINEAGE, "flow_run_id": "fr-9"}, rescored
    )
    assert (out["version"], out["created"]) == ("1", False)
    mv = tracking.client(uri).get_model_version("byteify-e", "1")
    assert mv.tags["byteify.eval.byte_model.bits_per_byte"] == "2.25"
    assert mv.tags["byteify.eval.source.bits_per_byte"] == "1.25"
    assert "byteify.eval.byte_model.old_metric" not in mv.tags  # not in the latest evaluation
    assert mv.tags["byteify.flow_run_id"] == LINEAGE["flow_run_id"]


# ---------------------------------------------------------------- a real server that goes down


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_mlflow(tmp_path: Path, port: int) -> subprocess.Popen:
    exe = Path(sys.executable).with_name("mlflow")
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(
        [
            str(exe),
            "server",
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'srv.db'}",
            "--artifacts-destination",
            str(tmp_path / "art"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        start_new_session=True,
    )
    return proc


def _wait_health(port: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
            return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError("mlflow server did not come up")


@pytest.fixture(scope="module")
def prefect_api_patient():
    """A temporary Prefect API like conftest's `prefect_api`, with room for a slow start on a busy box."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=300):
        yield


def _task_run_count(task_run_id, timeout_s: float = 60.0) -> int:
    """The task run's attempts as the Prefect API records them. Task-run states reach the API
    as events, sent in the background: on a busy box the run may not be there yet when the flow
    returns, so ask again for a while."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    deadline = time.time() + timeout_s
    with get_client(sync_client=True) as client:
        while True:
            try:
                run = client.read_task_run(task_run_id)
                if run.state_type is not None and run.state_type.value == "COMPLETED":
                    return run.run_count
            except ObjectNotFound:
                pass
            if time.time() > deadline:
                raise AssertionError(f"task run {task_run_id} not recorded as completed in {timeout_s} s")
            time.sleep(1.0)


@pytest.mark.slow
def test_registration_retried_while_mlflow_server_is_down(tmp_path, hf_folder, prefect_api_patient):
    from prefect import flow

    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    server = _start_mlflow(tmp_path, port)
    restarted: list[subprocess.Popen] = []
    try:
        _wait_health(port)
        run_id = tracking.start_flow_run.fn(uri, "t", "fr-down", {})
        stop_group(server, grace_s=20)  # down before registration starts
        threading.Timer(3.0, lambda: restarted.append(_start_mlflow(tmp_path, port))).start()

        @flow
        def register_flow():
            return registry.register_model(
                uri, "byteify-down", hf_folder, LINEAGE, run_id=run_id, return_state=True
            )

        state = register_flow()
        result = state.result()
        assert (result["version"], result["created"]) == ("1", True)
        assert _task_run_count(state.state_details.task_run_id) > 1  # it was retried
        again = register_flow().result()
        assert (again["version"], again["created"]) == ("1", False)
        assert len(tracking.client(uri).search_model_versions("name = 'byteify-down'")) == 1
    finally:
        stop_group(server, grace_s=20)
        for p in restarted:
            stop_group(p, grace_s=20)
