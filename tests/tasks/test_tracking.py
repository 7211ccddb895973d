"""MLflow tracking and registry on real stores: a SQLite store, the Prefect test API, and a
real MLflow server that goes down (slow)."""

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
from prefect import flow

from bolmo_core.source import SourceConfig, resolve_source
from flows.byteify import Tracking
from tasks import tracking
from tasks.mlflow_callback import MlflowCallback
from tasks.retries import is_transient
from tasks.training import TrainingConfigError, TrainingFailed

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
def store(tmp_path_factory) -> str:
    """One SQLite store for the module (creating one costs seconds); tests use their own names in it."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def test_flow_run_opens_training_experiment_links_prefect_and_survives_a_retry(tmp_path, store):
    uri = store
    url = "http://127.0.0.1:4200/runs/flow-run/fr-1"
    params = {"preset": "tiny", "preset_config": {"stage1": {"steps": 6, "lrs": [1e-3, 2e-3]}}}
    run_id = tracking.start_flow_run.fn(uri, "links", "fr-1", params, run_name="brave-fox", flow_run_url=url)
    assert tracking.start_flow_run.fn(uri, "links", "fr-1", params, run_name="brave-fox") == run_id  # retry
    client = tracking.client(uri)
    run = client.get_run(run_id)
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    db = Path(uri.removeprefix("sqlite:///"))
    assert exp.artifact_location == (db.parent / "artifacts" / "links").resolve().as_uri()
    assert run.data.tags["byteify.flow_run_url"] == url
    assert f"[brave-fox]({url})" in run.data.tags["mlflow.note.content"]
    assert run.data.params["preset_config.stage1.lrs"] == "[0.001, 0.002]"
    assert tracking.run_url(uri, run_id).endswith(f"/runs/{run_id}?workflowType=machine_learning")
    assert tracking.experiment_url(uri, exp.experiment_id).endswith("/runs?workflowType=machine_learning")


def test_stage_runs_nest_under_the_flow_run_and_are_reused_by_a_retry(tmp_path, store):
    uri = store
    parent = tracking.start_flow_run.fn(uri, "t", "fr-2", {})
    stage = tracking.start_stage_run(uri, parent, "stage1", {"steps": 25})
    tracking.end_run(uri, stage, "FAILED")
    assert tracking.start_stage_run(uri, parent, "stage1", {"steps": 25}) == stage
    run = tracking.client(uri).get_run(stage)
    assert run.info.status == "RUNNING"  # the retry runs it again
    assert run.data.tags["mlflow.parentRunId"] == parent and run.data.tags["byteify.flow_run_id"] == "fr-2"


def test_log_to_run_batches_metrics_files_and_tags(tmp_path, store):
    uri = store
    run = tracking.start_flow_run.fn(uri, "t", "fr-3", {})
    (tmp_path / "report.json").write_text('{"ok": true}')
    metrics = {f"m/{i}": float(i) for i in range(1100)}  # more than one log_batch request holds
    tracking.log_to_run.fn(uri, run, metrics, {"evaluation": str(tmp_path / "report.json")}, {"k": "v"})
    client = tracking.client(uri)
    data = client.get_run(run).data
    assert len(data.metrics) == 1100 and data.metrics["m/1099"] == 1099.0 and data.tags["k"] == "v"
    assert [a.path for a in client.list_artifacts(run, "evaluation")] == ["evaluation/report.json"]


def test_register_typed_pyfunc_with_lineage_once_per_lineage(tmp_path, hf_folder, store):
    import mlflow

    uri = store
    run_id = tracking.start_flow_run.fn(uri, "registry", "fr-1", {"preset": "tiny"})
    tracking.log_to_run.fn(uri, run_id, metrics=EVAL)
    first = tracking.register_model.fn(
        uri, "byteify-t", hf_folder, LINEAGE, EVAL, run_id=run_id, description="d"
    )
    assert (first["version"], first["created"]) == ("1", True)
    again = tracking.register_model.fn(
        uri, "byteify-t", hf_folder, {**LINEAGE, "flow_run_id": "fr-2"}, EVAL, run_id=run_id
    )
    assert (again["version"], again["created"]) == ("1", False)  # same lineage: no second version

    client = tracking.client(uri)
    mv = client.get_model_version_by_alias("byteify-t", "candidate")
    assert str(mv.version) == "1" and mv.status == "READY" and mv.description == "d"
    for key in (*tracking.LINEAGE_KEYS, "flow_run_url", "code_version", "lineage_hash"):
        assert mv.tags.get(f"byteify.{key}"), key
    assert mv.tags["byteify.flow_run_id"] == "fr-1"  # the run that made it, not the re-run
    assert mv.tags["byteify.eval.byte_model.bits_per_byte"] == "2.5"
    assert not [k for k in mv.tags if "__" in k]
    model = client.get_logged_model(mv.source.removeprefix("models:/"))
    assert {m.key for m in model.metrics} == set(EVAL)  # step-0 run metrics linked to the model

    newer = tracking.register_model.fn(
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
    h = tracking.lineage_hash(LINEAGE)
    client.create_model_version("byteify-h", source=hf_folder, tags={"byteify.lineage_hash": h})
    out = tracking.register_model.fn(uri, "byteify-h", hf_folder, LINEAGE, EVAL)
    assert (out["version"], out["created"]) == ("1", False)
    mv = client.get_model_version_by_alias("byteify-h", "candidate")
    assert (
        mv.tags["byteify.manifest_hash"] == "m" * 64
        and mv.tags["byteify.eval.source.bits_per_byte"] == "1.25"
    )
    assert len(client.search_model_versions("name = 'byteify-h'")) == 1
    with pytest.raises(tracking.TrackingError, match="model name"):
        tracking.register_model.fn(uri, "bad'name", hf_folder, LINEAGE)


def test_cached_rerun_says_which_stages_it_reused_and_who_trained_them(tmp_path, store):
    uri = store
    first = tracking.start_flow_run.fn(uri, "reuse", "fr-a", {}, run_name="first")
    for stage, digest in (("stage1", "1" * 64), ("stage2", "2" * 64)):
        run = tracking.start_stage_run(uri, first, stage, {})
        tracking.set_tags(uri, run, {"byteify.checkpoint_hash": digest})
        tracking.end_run(uri, run)
    hashes = {"stage1": "1" * 64, "stage2": "2" * 64}
    assert tracking.finish_flow_run.fn(uri, first, hashes, "first run") == []
    second = tracking.start_flow_run.fn(uri, "reuse", "fr-b", {}, run_name="second")
    assert tracking.finish_flow_run.fn(uri, second, hashes, "second run") == ["stage1", "stage2"]
    run = tracking.client(uri).get_run(second)
    assert run.info.status == "FINISHED" and run.data.tags["byteify.reused_stages"] == "stage1,stage2"
    note = run.data.tags["mlflow.note.content"]
    assert note.startswith("second run") and note.count("reused (cached), trained by [stage") == 2
    assert "trained in this run" in tracking.client(uri).get_run(first).data.tags["mlflow.note.content"]


_MADE: dict[str, str] = {}


@flow(on_failure=[tracking.mark_failed], on_crashed=[tracking.mark_failed])
def _failing_flow(uri: str, tracking: Tracking = Tracking()):  # noqa: F811 - the parameter the hook reads, as in byteify
    from prefect.runtime import flow_run

    from tasks import tracking as trk

    _MADE["parent"] = trk.start_flow_run.fn(uri, "fails", str(flow_run.id), {})
    _MADE["stage"] = trk.start_stage_run(uri, _MADE["parent"], "stage1", {})
    raise ValueError("bad data")


def test_failed_flow_marks_its_mlflow_runs_failed(tmp_path, prefect_api, store):
    """Issue 15: the byteify flow's hooks end the parent and stage runs FAILED, not RUNNING forever."""
    uri = store
    assert _failing_flow(uri, Tracking(tracking_uri=uri, experiment="fails"), return_state=True).is_failed()
    client = tracking.client(uri)
    assert client.get_run(_MADE["parent"]).info.status == "FAILED"
    assert client.get_run(_MADE["stage"]).info.status == "FAILED"


def test_mlflow_callback_batches_metrics_into_the_stage_run(tmp_path, monkeypatch, store):
    uri = store
    parent = tracking.start_flow_run.fn(uri, "t", "fr-cb", {})
    stage = tracking.start_stage_run(uri, parent, "stage1", {"steps": 25})
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_RUN_ID", stage)
    cb = MlflowCallback(flush_every=10, flush_seconds=1e9)
    cb.on_train_start(0, 25, {"stage": 1})
    for step in range(1, 26):
        cb.on_step_end(step, {"loss": 10.0 / step, "lr/local": 1e-3})
        assert len(cb.buffer) == 2 * (step % 10)  # flushed every 10 steps, as one batch
    cb.on_eval(25, {"val_bpb": 3.5})
    cb.on_train_end(25, {"val_bpb": 3.5})
    client = tracking.client(uri)
    hist = client.get_metric_history(stage, "loss")
    assert [m.step for m in sorted(hist, key=lambda m: m.step)] == list(range(1, 26))
    assert client.get_metric_history(stage, "eval/val_bpb")[0].value == 3.5
    run = client.get_run(stage)
    assert run.data.tags["mlflow.parentRunId"] == parent and run.data.tags["byteify.total_steps"] == "25"


def test_callback_survives_tracking_outage_and_outages_are_told_apart_by_type(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    port = _free_port()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("MLFLOW_RUN_ID", "0" * 32)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    cb = MlflowCallback(flush_every=1000)
    cb.on_step_end(1, {"loss": 1.0})
    cb.flush()  # server down: reported on stderr, training goes on, metrics kept for the next flush
    assert len(cb.buffer) == 1
    with pytest.raises(Exception) as down:
        MlflowClient(f"http://127.0.0.1:{port}").search_experiments()
    assert type(down.value).__name__ == "MlflowException" and is_transient(down.value)  # via its context
    assert is_transient(TrainingFailed("stage 1 trainer killed by signal 9"))
    assert not is_transient(TrainingConfigError("split 'train' has 0 windows"))
    assert not is_transient(tracking.TrackingError("model name 'x': bad"))
    assert not is_transient(ValueError("bad input: 502 in the text is not an outage"))


def test_retry_policy_retries_outages_only(prefect_api):
    from prefect import task

    from tasks.retries import RETRY

    calls = {"outage": 0, "bad": 0}

    @task(**{**RETRY, "retry_delay_seconds": 0, "retry_jitter_factor": None})
    def flaky(kind: str) -> str:
        calls[kind] += 1
        if kind == "outage" and calls[kind] == 1:
            raise ConnectionRefusedError("server down")
        if kind == "bad":
            raise ValueError("bad input")
        return "ok"

    assert flaky("outage") == "ok" and calls["outage"] == 2
    assert flaky("bad", return_state=True).is_failed() and calls["bad"] == 1


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
        run_id = tracking.start_flow_run.fn(uri, "t", "fr-down", {})
        _stop(server)  # down before registration starts
        threading.Timer(3.0, lambda: restarted.append(_start_mlflow(tmp_path, port))).start()

        @flow
        def register_flow():
            return tracking.register_model(
                uri, "byteify-down", hf_folder, LINEAGE, run_id=run_id, return_state=True
            )

        state = register_flow()
        result = state.result()
        assert (result["version"], result["created"]) == ("1", True)
        with get_client(sync_client=True) as client:
            assert client.read_task_run(state.state_details.task_run_id).run_count > 1  # it was retried
        again = register_flow().result()
        assert (again["version"], again["created"]) == ("1", False)
        assert len(tracking.client(uri).search_model_versions("name = 'byteify-down'")) == 1
    finally:
        _stop(server)
        for p in restarted:
            _stop(p)
