"""One retry policy for every task: outages (by exception type) are retried, bad input is not."""

from __future__ import annotations

import socket

import pytest

from tasks.registry import RegistryError
from tasks.retries import is_transient
from tasks.training import TrainingConfigError, TrainingFailed


def test_outages_are_told_apart_from_bad_input_by_type(monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(Exception) as down:
        MlflowClient(f"http://127.0.0.1:{port}").search_experiments()
    assert type(down.value).__name__ == "MlflowException" and is_transient(down.value)  # via its context
    assert is_transient(TrainingFailed("stage 1 trainer killed by signal 9"))
    assert not is_transient(TrainingConfigError("split 'train' has 0 windows"))
    assert not is_transient(RegistryError("model name 'x': bad"))
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
