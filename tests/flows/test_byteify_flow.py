"""The byteify flow end to end on the tiny preset: real Prefect API, real MLflow store, data on moto S3.

Three runs share one module: a run on s3:// (checked for registry, lineage and artifacts),
the same parameters again (fully cached), and a run whose Stage-1 trainer is SIGKILLed
mid-way (retried, resumed, and bit-identical to the uninterrupted run).
"""

from __future__ import annotations

import glob
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from procs import trainer_pids

pytestmark = pytest.mark.slow

OVERRIDES = {"stage1.steps": 6, "stage2.steps": 4, "stage1.checkpoint_every": 3, "stage2.checkpoint_every": 2}


@pytest.fixture(scope="module")
def prefect_api_patient():
    """A temporary Prefect API like conftest's `prefect_api`, with room for a slow start on a busy box."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=300):
        yield


@pytest.fixture(scope="module")
def env(tmp_path_factory, s3_server, prefect_api_patient):
    from conftest import flow_run_env

    with flow_run_env(tmp_path_factory.mktemp("flow"), s3_server) as e:
        yield e


def _run(env, storage_root: str, return_state: bool = False):
    from flows.byteify import Compute, Evaluation, Tracking, byteify

    return byteify(
        preset="tiny",
        storage_root=storage_root,
        overrides=OVERRIDES,
        compute=Compute(deterministic=True),
        evaluation=Evaluation(max_bytes=3000, cute_items=0),
        tracking=Tracking(
            tracking_uri=env["tracking_uri"],
            experiment="e2e",
            model_name="byteify-e2e",
            artifact_location="s3://byteify-test/mlflow",
        ),
        return_state=return_state,
    )


@pytest.fixture(scope="module")
def first(env):
    state = _run(env, "s3://byteify-test/run", return_state=True)
    return state.result(), state.state_details.flow_run_id


def _task_runs(flow_run_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


def test_flow_on_s3_registers_model_with_lineage_and_artifacts(env, first):
    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from bolmo_core import storage

    out, flow_run_id = first
    for key in ("manifest_uri", "stage1_checkpoint", "stage2_checkpoint", "report_uri", "export_uri"):
        assert out[key].startswith("s3://byteify-test/run/"), key
    assert storage.exists(storage.join(out["stage2_checkpoint"], "COMMIT"))
    assert storage.exists(storage.join(out["export_uri"], "config.json"))

    client = MlflowClient(env["tracking_uri"], registry_uri=env["tracking_uri"])
    mv = client.get_model_version_by_alias("byteify-e2e", "candidate")
    assert str(mv.version) == out["version"] and mv.status == "READY"
    tags = mv.tags
    assert tags["byteify.source_id"] == "byteify/tiny-olmo2"
    assert tags["byteify.manifest_hash"] == out["manifest_hash"]
    assert tags["byteify.stage1_checkpoint_hash"] == out["stage1_hash"]
    assert tags["byteify.stage2_checkpoint_hash"] == out["stage2_hash"]
    assert tags["byteify.flow_run_id"] == str(flow_run_id)
    assert tags["byteify.code_version"] not in ("", "unknown")
    assert float(tags["byteify.eval.byte_model.bits_per_byte"]) > 0
    assert tags["byteify.source_revision"] and tags["byteify.source_file_sha256"]  # built-in: package + hash

    parent = client.get_run(out["mlflow_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.info.artifact_uri.startswith("s3://byteify-test/mlflow")
    arts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"data", "evaluation", "plots"} <= arts
    assert [a.path for a in client.list_artifacts(parent.info.run_id, "evaluation")] == [
        "evaluation/report.json"
    ]
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    stages = {r.data.tags["byteify.stage"]: r for r in children}
    assert set(stages) == {"stage1", "stage2"}
    assert len(client.get_metric_history(stages["stage1"].info.run_id, "loss")) == 6
    assert len(client.get_metric_history(stages["stage2"].info.run_id, "loss")) == 4
    assert out["metrics"]["byte_model/bits_per_byte"] > 0

    with get_client(sync_client=True) as pc:
        artifacts = pc.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    keys = {a.key for a in artifacts if a.key}
    assert {
        "data-manifest",
        "training-curves",
        "evaluation",
        "boundaries",
        "mlflow-run",
        "mlflow-experiment",
        "mlflow-model",
    } <= keys
    progress = {a.key: a for a in artifacts if a.type == "progress"}
    assert set(progress) == {
        "data-progress",
        "stage-1-progress",
        "stage-2-progress",
        "evaluation-progress",
        "export-progress",
    }
    assert all(float(a.data) == 100.0 and " done in " in a.description for a in progress.values())
    boundaries = next(a for a in artifacts if a.key == "boundaries")
    assert "data:image/png;base64," in boundaries.data


def test_rerun_same_parameters_is_fully_cached(env, first):
    out, _ = first
    t0 = time.time()
    state = _run(env, "s3://byteify-test/run", return_state=True)
    wall = time.time() - t0
    again = state.result()
    assert (again["version"], again["created"]) == (out["version"], False)
    for key in ("manifest_hash", "stage1_hash", "stage2_hash", "export_hash", "report_hash"):
        assert again[key] == out[key], key
    runs = _task_runs(state.state_details.flow_run_id)
    cached = {r.name.split("-")[0] for r in runs if r.state and r.state.name == "Cached"}
    assert {"stage", "evaluate", "export"} <= cached, sorted((r.name, r.state.name) for r in runs)
    assert wall < 15, f"cached re-run took {wall:.1f} s"
    # One MLflow run that says what it reused (and links who trained it), not an empty-looking run.
    from mlflow import MlflowClient

    run = MlflowClient(env["tracking_uri"]).get_run(again["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["byteify.reused_stages"] == "stage1,stage2"
    assert run.data.tags["mlflow.note.content"].count("reused (cached), trained by [stage") == 2


def _kill_stage1_when_checkpointed(root: Path, killed: list) -> None:
    """SIGKILL this test's own Stage-1 trainer process once its step-3 checkpoint is committed."""
    deadline = time.time() + 900
    while time.time() < deadline and not killed:
        if glob.glob(str(root / "checkpoints" / "stage1-*" / "step-000003" / "COMMIT")):
            # The trainer itself (not its accelerate launcher), running a Stage-1 config file.
            for pid in trainer_pids(os.getpid(), b"/stage1.json"):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            return
        time.sleep(0.1)


def test_sigkill_of_stage1_trainer_resumes_to_identical_weights(env, first, tmp_path):
    out, _ = first
    root = tmp_path / "killed"
    killed: list[int] = []
    watcher = threading.Thread(target=_kill_stage1_when_checkpointed, args=(root, killed), daemon=True)
    watcher.start()
    state = _run(env, str(root), return_state=True)
    watcher.join(5)
    assert killed, "the Stage-1 trainer was never killed"
    res = state.result()
    stage1 = [r for r in _task_runs(state.state_details.flow_run_id) if r.name == "stage-1"]
    assert stage1 and stage1[0].run_count == 2  # failed once (SIGKILL), retried, resumed
    assert res["stage1_hash"] == out["stage1_hash"]  # weights identical to the uninterrupted run
    assert res["stage2_hash"] == out["stage2_hash"]
    # Registered with its own lineage (the manifest hash names the code commit, which may have moved).
    from mlflow import MlflowClient

    mv = MlflowClient(env["tracking_uri"], registry_uri=env["tracking_uri"]).get_model_version(
        "byteify-e2e", res["version"]
    )
    assert mv.tags["byteify.stage1_checkpoint_hash"] == out["stage1_hash"]


def test_a_stage_failing_on_bad_data_fails_its_mlflow_runs(env, tmp_path):
    """Issue 15: the flow's failure hook ends the parent run FAILED; the stage run is FAILED too."""
    import json

    from mlflow import MlflowClient

    docs = tmp_path / "too-small.jsonl"  # prepares fine, but holds fewer windows than one batch
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("Hello.", "Bonjour.", "Hola.")))
    from flows.byteify import Compute, Evaluation, Tracking, byteify

    state = byteify(
        preset="tiny",
        overrides=OVERRIDES,
        data_sources=[str(docs)],
        storage_root=str(tmp_path / "runs"),
        compute=Compute(deterministic=True),
        evaluation=Evaluation(max_bytes=3000, cute_items=0),
        tracking=Tracking(
            tracking_uri=env["tracking_uri"], experiment="e2e-fails", model_name="byteify-fails"
        ),
        return_state=True,
    )
    assert state.is_failed()
    client = MlflowClient(env["tracking_uri"])
    exp = client.get_experiment_by_name("e2e-fails")
    runs = client.search_runs(
        [exp.experiment_id], f"tags.`byteify.flow_run_id` = '{state.state_details.flow_run_id}'"
    )
    by_kind = {r.data.tags.get("byteify.stage", "flow"): r.info.status for r in runs}
    assert by_kind == {"flow": "FAILED", "stage1": "FAILED"}
