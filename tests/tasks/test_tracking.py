"""MLflow tracking and registry on real stores: a SQLite store, the Prefect test API, and a
real MLflow server that goes down (slow)."""

from __future__ import annotations

from pathlib import Path

import pytest
from prefect import flow
from task_helpers import mlflow_store

from flows.byteify import Tracking
from tasks import tracking


@pytest.fixture(scope="module")
def store() -> str:
    return mlflow_store()


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
