"""MLflow tracking and registry on real stores: a SQLite store, and a real MLflow server that goes down."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from bolmo_core.source import SourceConfig, resolve_source
from tasks import tracking

LINEAGE = {
    "source_id": "byteify/tiny-olmo2",
    "source_revision": "",
    "source_file_sha256": "",
    "manifest_hash": "m" * 64,
    "stage1_checkpoint_hash": "a" * 64,
    "stage2_checkpoint_hash": "b" * 64,
    "export_hash": "c" * 64,
    "flow_run_id": "fr-1",
    "eval_summary": {"byte_model.bits_per_byte": 2.5},
}


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> str:
    """A real HF-format causal LM folder (the tiny OLMo 2 source) standing in for an export."""
    src, _ = resolve_source(SourceConfig("tiny-olmo2"))
    dest = tmp_path_factory.mktemp("export") / "hf"
    shutil.copytree(src, dest)
    return str(dest)


def _sqlite(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_register_pyfunc_with_lineage_once_per_lineage(tmp_path, hf_folder):
    import mlflow

    uri = _sqlite(tmp_path)
    run_id = tracking.start_flow_run(uri, "t", "fr-1", {"preset": {"name": "tiny"}})
    first = tracking.register_model(uri, "byteify-t", hf_folder, LINEAGE, run_id=run_id)
    assert (first["version"], first["created"]) == ("1", True)
    again = tracking.register_model(
        uri, "byteify-t", hf_folder, {**LINEAGE, "flow_run_id": "fr-2"}, run_id=run_id
    )
    assert (again["version"], again["created"]) == ("1", False)  # same lineage: no second version

    client = tracking._client(uri)
    mv = client.get_model_version_by_alias("byteify-t", "candidate")
    assert str(mv.version) == "1" and mv.status == "READY"
    tags = mv.tags
    for key in (
        "source_id",
        "manifest_hash",
        "stage1_checkpoint_hash",
        "stage2_checkpoint_hash",
        "flow_run_id",
        "code_version",
        "eval_summary",
        "lineage_hash",
    ):
        assert tags.get(f"byteify.{key}"), key
    assert tags["byteify.stage2_checkpoint_hash"] == "b" * 64
    assert '"byte_model.bits_per_byte": 2.5' in tags["byteify.eval_summary"]

    newer = tracking.register_model(
        uri, "byteify-t", hf_folder, {**LINEAGE, "stage2_checkpoint_hash": "d" * 64}
    )
    assert (newer["version"], newer["created"]) == ("2", True)
    assert str(client.get_model_version_by_alias("byteify-t", "candidate").version) == "2"
    assert len(client.search_model_versions("name = 'byteify-t'")) == 2

    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model("models:/byteify-t/1")
    out = model.predict(["The capital of France is"], params={"max_new_tokens": 4})
    assert len(out) == 1 and isinstance(out[0], str) and out[0]


def test_half_done_registration_is_completed_not_duplicated(tmp_path, hf_folder):
    """An attempt that created the version and then died (no tags, no alias) is finished by the next."""
    uri = _sqlite(tmp_path)
    client = tracking._client(uri)
    client.create_registered_model("byteify-h")
    h = tracking.lineage_hash(LINEAGE)
    client.create_model_version("byteify-h", source=hf_folder, tags={"byteify.lineage_hash": h})
    out = tracking.register_model(uri, "byteify-h", hf_folder, LINEAGE)
    assert (out["version"], out["created"]) == ("1", False)
    assert (
        client.get_model_version_by_alias("byteify-h", "candidate").tags["byteify.manifest_hash"] == "m" * 64
    )
    assert len(client.search_model_versions("name = 'byteify-h'")) == 1


def test_mlflow_callback_batches_metrics_into_the_stage_run(tmp_path, monkeypatch):
    uri = _sqlite(tmp_path)
    parent = tracking.start_flow_run(uri, "t", "fr-cb", {})
    stage = tracking.start_stage_run(uri, parent, "stage1", {"steps": 25})
    assert tracking.start_stage_run(uri, parent, "stage1", {}) == stage  # a retry reuses the stage run
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_RUN_ID", stage)
    cb = tracking.MlflowCallback(flush_every=10, flush_seconds=1e9)
    cb.on_train_start(0, 25, {"stage": 1})
    for step in range(1, 26):
        cb.on_step_end(step, {"loss": 10.0 / step, "lr/local": 1e-3})
        assert len(cb.buffer) == 2 * (step % 10)  # flushed every 10 steps, as one batch
    cb.on_eval(25, {"val_bpb": 3.5})
    cb.on_train_end(25, {"val_bpb": 3.5})
    client = tracking._client(uri)
    hist = client.get_metric_history(stage, "loss")
    assert [m.step for m in sorted(hist, key=lambda m: m.step)] == list(range(1, 26))
    assert client.get_metric_history(stage, "eval/val_bpb")[0].value == 3.5
    run = client.get_run(stage)
    assert run.data.tags["mlflow.parentRunId"] == parent and run.data.tags["byteify.total_steps"] == "25"


def test_callback_survives_tracking_outage_and_errors_are_classified(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    port = _free_port()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("MLFLOW_RUN_ID", "0" * 32)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    cb = tracking.MlflowCallback(flush_every=1000)
    cb.on_step_end(1, {"loss": 1.0})
    cb.flush()  # server down: reported on stderr, training goes on, metrics kept for the next flush
    assert len(cb.buffer) == 1
    with pytest.raises(Exception) as down:
        MlflowClient(f"http://127.0.0.1:{port}").search_experiments()
    assert tracking.is_transient(down.value)
    with pytest.raises(tracking.TrackingError, match="model name"):
        tracking.register_model(_sqlite(tmp_path), "bad'name", str(tmp_path), LINEAGE)
    assert not tracking.is_transient(tracking.TrackingError("model name 'x': bad"))
    assert not tracking.is_transient(ValueError("bad input"))


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


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def prefect_api_patient():
    """A temporary Prefect API like conftest's `prefect_api`, with room for a slow start on a busy box."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=300):
        yield


@pytest.mark.slow
def test_registration_retried_while_mlflow_server_is_down(tmp_path, hf_folder, prefect_api_patient):
    from prefect import flow
    from prefect.client.orchestration import get_client

    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    server = _start_mlflow(tmp_path, port)
    restarted: list[subprocess.Popen] = []
    try:
        _wait_health(port)
        run_id = tracking.start_flow_run(uri, "t", "fr-down", {})
        _stop(server)  # down before registration starts
        threading.Timer(3.0, lambda: restarted.append(_start_mlflow(tmp_path, port))).start()

        @flow
        def register_flow():
            return tracking.mlflow_register(
                uri, "byteify-down", hf_folder, LINEAGE, run_id=run_id, return_state=True
            )

        state = register_flow()
        result = state.result()
        assert (result["version"], result["created"]) == ("1", True)
        with get_client(sync_client=True) as client:
            assert client.read_task_run(state.state_details.task_run_id).run_count > 1  # it was retried
        again = register_flow().result()
        assert (again["version"], again["created"]) == ("1", False)
        assert len(tracking._client(uri).search_model_versions("name = 'byteify-down'")) == 1
    finally:
        _stop(server)
        for p in restarted:
            _stop(p)
