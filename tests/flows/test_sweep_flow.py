"""The compression sweep flow on the tiny preset: two points as parallel subflows from one Stage-1
checkpoint, real Prefect API, real MLflow (SQLite), real trainer subprocesses.

One sweep run is checked for what it publishes (points, table, Pareto plot, Prefect artifacts,
the parent MLflow run's files, one registered model with a version per point); the same sweep
again reuses every point (cached stages, the same model versions). The ablation switches are
checked on the configs they produce (running them is the same code path as the points above).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bolmo_core"))
from train_helpers import OVERRIDES, make_manifest, run_config  # noqa: E402

STAGE2 = {"stage2.steps": 2, "stage2.checkpoint_every": 0, "stage2.eval_batches": 1}


@pytest.fixture(scope="module")
def prefect_api_own():
    """A Prefect API of this module's own: the sweep's artifacts (evaluation tables, progress) must
    not be seen by later tests that read the latest artifact of a key from the session API."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=300):
        yield


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    """A Stage-1 checkpoint of the shrunk tiny preset (2 steps, in this process)."""
    import torch

    from bolmo_core.train import TrainConfig, train

    d = tmp_path_factory.mktemp("sweep-s1")
    manifest = make_manifest(d)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = train(TrainConfig.from_dict(run_config(manifest, str(d / "s1"), 1, {"stage1.steps": 2})))
    finally:
        torch.set_num_threads(threads)
    return out["final"]


def _sweep(stage1, root: Path, store: str):
    from flows.byteify import Evaluation, Tracking
    from flows.sweep import Speed, byteify_sweep

    return byteify_sweep(
        stage1_checkpoint=stage1,
        targets=[1.0, 1.5],
        overrides=STAGE2,
        storage_root=str(root),
        evaluation=Evaluation(max_bytes=1000),
        speed=Speed(batches=[1, 2], new_bytes=8, repeats=1, prompts=2, prompt_bytes=24),
        tracking=Tracking(tracking_uri=store, experiment="sweep-test", model_name="sweep-tiny"),
        return_state=True,
    )


@pytest.fixture(scope="module")
def swept(stage1, tmp_path_factory, prefect_api_own):
    root = tmp_path_factory.mktemp("sweep")
    store = f"sqlite:///{root / 'mlflow.db'}"
    state = _sweep(stage1, root / "runs", store)
    return state.result(), state.state_details.flow_run_id, root, store


def test_two_points_published(swept):
    from mlflow import MlflowClient

    out, _, root, store = swept
    pts = {p["name"]: p for p in out["points"]}
    assert set(pts) == {"1x", "1.5x"}
    assert pts["1x"]["target"] is None and pts["1.5x"]["target"] > 1.0  # 1.5 x the data's bytes/token
    assert pts["1x"]["stage2_hash"] != pts["1.5x"]["stage2_hash"]
    for p in pts.values():
        assert p["bits_per_byte"] > 0 and p["bytes_per_patch"] > 1 and p["source_bpb"] > 0
    folder = Path(out["folder"])
    assert (folder / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    table = (folder / "table.md").read_text()
    assert table.splitlines()[2].startswith("| source |") and "| 1x |" in table and "| 1.5x |" in table

    mlc = MlflowClient(store)
    versions = mlc.search_model_versions("name = 'sweep-tiny'")
    assert sorted(v.tags["byteify.sweep_point"] for v in versions) == ["1.5x", "1x"]
    by_point = {v.tags["byteify.sweep_point"]: v for v in versions}
    assert by_point["1x"].tags["byteify.target_bytes_per_patch"] == "source"
    assert float(by_point["1.5x"].tags["byteify.target_bytes_per_patch"]) == pytest.approx(
        pts["1.5x"]["target"]
    )
    assert mlc.get_model_version_by_alias("sweep-tiny", "sweep-1-5x").version == by_point["1.5x"].version
    run = mlc.get_run(out["mlflow_run_id"])
    files = {f.path for f in mlc.list_artifacts(run.info.run_id, "sweep")}
    assert {"sweep/pareto.png", "sweep/table.md", "sweep/sweep.json"} <= files
    assert run.data.metrics["1.5x/bits_per_byte"] == pytest.approx(pts["1.5x"]["bits_per_byte"])
    assert "source/bytes_per_s_b1" in run.data.metrics and run.info.status == "FINISHED"


def test_subflows_and_artifacts_in_prefect(swept):
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    _, flow_run_id, _, _ = swept

    async def read():
        async with get_client() as c:
            children = await c.read_flow_runs(
                flow_run_filter=FlowRunFilter(
                    parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id])
                )
            )
            arts = await c.read_artifacts()
            return children, arts

    children, arts = asyncio.run(read())
    points = [r for r in children if r.parameters.get("point", {}).get("name") in ("1x", "1.5x")]
    assert len(points) == 2 and all(r.state.is_completed() for r in points)
    keys = {a.key for a in arts}
    assert {"sweep-table", "sweep-pareto"} <= keys


def test_same_sweep_again_reuses_every_point(swept, stage1):
    out, _, root, store = swept
    again = _sweep(stage1, root / "runs", store).result()
    first = {p["name"]: p for p in out["points"]}
    for p in again["points"]:
        assert p["stage2_hash"] == first[p["name"]]["stage2_hash"]
        assert p["model_uri"] == first[p["name"]]["model_uri"]  # the same version, not a new one
    assert again["speed_uri"] == out["speed_uri"]


def test_ablation_switches_give_different_configs():
    from bolmo_core.config import get_preset
    from flows.sweep import SweepPoint, point_preset, target_points
    from tasks.training import stage_out_uri

    base = get_preset("tiny", OVERRIDES).to_dict()
    causal = point_preset(base, STAGE2, SweepPoint(name="causal", overrides={"model.boundary_lookahead": 0}))
    default = point_preset(base, STAGE2, SweepPoint(name="default"))
    assert causal.model.boundary_lookahead == 0 and default.model.boundary_lookahead == 1
    # different Stage-1 and Stage-2 folders: nothing of one run is reused for the other
    for stage, init in ((1, None), (2, "h1")):
        assert stage_out_uri("r", stage, causal.to_dict(), "m", init, 1) != stage_out_uri(
            "r", stage, default.to_dict(), "m", init, 1
        )
    # skipping Stage 1: Stage 2 without an init checkpoint is another stage than from Stage 1
    assert stage_out_uri("r", 2, default.to_dict(), "m", None, 1) != stage_out_uri(
        "r", 2, default.to_dict(), "m", "h1", 1
    )
    (p1, t1), (p2, t2) = target_points([1.0, 1.25], True, 4.0)
    assert (p1.name, t1, p2.name, t2) == ("1x", None, "1.25x", 5.0)
    assert point_preset(base, {}, p2).stage2.target_bytes_per_patch == 5.0
    with pytest.raises(ValueError, match=r"model\.boundary_lookahead=2: must be one of 0, 1"):
        point_preset(base, {}, SweepPoint(name="bad", overrides={"model.boundary_lookahead": 2}))


@pytest.mark.slow
def test_without_a_stage1_checkpoint_the_main_flows_stage1_is_trained(tmp_path, prefect_api_own):
    """The deployments' path: no `stage1_checkpoint`, so data and Stage 1 come from the main flow's
    steps, into the folders the main flow would use (its cache is shared)."""
    from bolmo_core.config import get_preset
    from flows.byteify import Evaluation, Tracking
    from flows.sweep import Speed, byteify_sweep
    from tasks.sweep import stage1_info
    from tasks.training import stage_out_uri

    overrides = {**OVERRIDES, **STAGE2}
    root = tmp_path / "runs"
    out = byteify_sweep(
        preset="tiny",
        targets=[1.0],
        overrides=overrides,
        storage_root=str(root),
        evaluation=Evaluation(max_bytes=1000, cute_items=0),
        speed=Speed(batches=[1], new_bytes=8, repeats=1, prompts=1, prompt_bytes=24),
        tracking=Tracking(
            tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="sweep-s1", model_name="sweep-s1"
        ),
    )
    s1 = stage1_info.fn(out["stage1_checkpoint"])
    main_flows = stage_out_uri(
        str(root), 1, get_preset("tiny", overrides).to_dict(), s1["manifest_hash"], None, 1
    )
    assert Path(out["stage1_checkpoint"]).parent == Path(main_flows)
    assert [p["name"] for p in out["points"]] == ["1x"] and out["points"][0]["bits_per_byte"] > 0
