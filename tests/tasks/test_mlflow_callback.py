"""The trainer's MLflow callback: batched metrics into the stage run; an outage never stops training."""

from __future__ import annotations

import pytest
from task_helpers import mlflow_store

from tasks import tracking
from tasks.mlflow_callback import MlflowCallback


@pytest.fixture(scope="module")
def store() -> str:
    return mlflow_store()


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


def test_callback_survives_a_tracking_outage(monkeypatch):
    port = _free_port()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("MLFLOW_RUN_ID", "0" * 32)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    cb = MlflowCallback(flush_every=1000)
    cb.on_step_end(1, {"loss": 1.0})
    cb.flush()  # server down: reported on stderr, training goes on, metrics kept for the next flush
    assert len(cb.buffer) == 1


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
