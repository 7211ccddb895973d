"""The CPU rehearsal of `byteify/olmo-7b` (docs/scale.md "Training at scale").

The deployment's own parameters (deployments/prefect.yaml) with a tiny Olmo 3 (random weights,
sliding-window layers) instead of the 7B and a few steps instead of 225,000: the gpu_fsdp.yaml
family with 2 CPU processes over gloo (FSDP2, bf16 parameters, activation checkpointing,
sharded DCP checkpoints), storage on a moto s3:// server.

* fast (make test): Stage 1 under accelerate + FSDP on S3, one rank SIGKILLed after the first
  checkpoint, relaunched: the repeated step's loss and the final shards are bit-identical; the
  2-process checkpoint then resumes in 1 process (resharding) and continues the same data.
* slow: the whole flow (plan -> prepare -> Stage 1 -> SIGKILL one rank -> Prefect retry ->
  Stage 2 -> evaluate -> export -> register) on a real Prefect API and MLflow store; the resumed
  Stage 1 matches an uninterrupted run step for step; the plan's estimate against the measured
  memory of the rehearsal's steps.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import threading
from pathlib import Path

import pytest
import yaml
from procs import finish, launch, step_losses, trainer_pids

ROOT = Path(__file__).resolve().parents[1]
PROBE = "bolmo_core.callbacks:MemoryProbe"

# What the rehearsal changes in `byteify/olmo-7b`: the model's size ...
SIZE = {
    "model.source.name_or_path": "tiny-olmo3",
    "model.local.n_heads": 4,
    "model.local.ffn_hidden": 88,
    "model.local.chunk_size": 16,
    "data.window_tokens": 32,
    "data.shard_docs": 256,
    "data.validation_fraction": 0.05,
}
# ... and the step counts (with the batch sizes and intervals that scale with them).
STEPS = {
    **{
        f"stage{n}.{k}": v
        for n in (1, 2)
        for k, v in {"global_batch": 4, "micro_batch": 1, "eval_batches": 2}.items()
    },
    "stage1.steps": 6,
    "stage1.checkpoint_every": 2,
    "stage1.eval_every": 3,
    "stage2.steps": 4,
    "stage2.checkpoint_every": 2,
    "stage1.callbacks": [PROBE],
    "stage2.callbacks": [PROBE],
}


def deployment_parameters(name: str = "olmo-7b") -> dict:
    spec = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
    return copy.deepcopy(next(d for d in spec["deployments"] if d["name"] == name)["parameters"])


def rehearsal_parameters(storage_root: str, tracking_uri: str) -> dict:
    """`byteify/olmo-7b`'s parameters with only size and step counts changed (and offline data)."""
    p = deployment_parameters()
    p["overrides"] = {**p.get("overrides", {}), **SIZE, **STEPS}
    # the same accelerate family on 2 CPU processes instead of 8 GPUs
    p["compute"] = {
        **p["compute"],
        "processes": 2,
        "accelerate_config": "deployments/accelerate/cpu_fsdp.yaml",
    }
    p["data_sources"] = ["builtin:wiki"]  # the hub is out of reach here
    p["evaluation"] = {**p["evaluation"], "max_bytes": 3000, "cute_items": 0}
    p["storage_root"] = storage_root
    p["tracking"] = {**p["tracking"], "tracking_uri": tracking_uri}
    return p


def test_rehearsal_changes_only_size_and_steps():
    dep, reh = deployment_parameters(), rehearsal_parameters("s3://b/r", "sqlite:///x.db")
    assert dep["preset"] == reh["preset"] == "olmo3-7b"
    assert set(reh["overrides"]) == set(SIZE) | set(STEPS)
    assert {k: v for k, v in reh["compute"].items() if k not in ("processes", "accelerate_config")} == {
        k: v for k, v in dep["compute"].items() if k not in ("processes", "accelerate_config")
    }
    assert dep["compute"]["accelerate_config"] == "deployments/accelerate/gpu_fsdp.yaml"
    fam = [
        yaml.safe_load((ROOT / c).read_text())
        for c in (dep["compute"]["accelerate_config"], reh["compute"]["accelerate_config"])
    ]
    assert (
        fam[0]["distributed_type"] == fam[1]["distributed_type"] == "FSDP"
        and fam[0]["fsdp_config"] == fam[1]["fsdp_config"]
    )
    assert (
        reh["evaluation"]["precision"] == dep["evaluation"]["precision"]
        and reh["tracking"]["model_name"] == dep["tracking"]["model_name"]
    )
    from bolmo_core.config import get_preset

    p = get_preset("olmo3-7b", reh["overrides"])
    assert p.stage1.precision == p.stage2.precision == "bf16"  # the 7B recipe's precision and memory switches
    assert p.stage1.activation_checkpointing and p.stage2.activation_checkpointing


# ---------------------------------------------------------------- helpers


def _tiny_olmo3_manifest(folder: Path) -> str:
    from bolmo_core.config import get_preset
    from bolmo_core.data import prepare_dataset
    from bolmo_core.source import tiny_corpus

    folder.mkdir(parents=True, exist_ok=True)
    docs = folder / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": d}) + "\n" for d in tiny_corpus(30_000)))
    p = get_preset("olmo3-7b", SIZE)
    return prepare_dataset([str(docs)], p.model.source, str(folder / "data"), p.data)


# ---------------------------------------------------------------- fast: Stage 1 under FSDP, kill, reshard


def test_fsdp_rank_killed_then_resumed_in_one_process(s3_server, tmp_path, capsys):
    """Two FSDP ranks on S3, rank 1 SIGKILLed after the step-2 checkpoint; the 2-rank sharded
    checkpoint then resumes in ONE process (resharded, the loader at the same global position):
    the repeated step 3 has the loss the 2 ranks computed. (The bit-exact 2-rank resume and the
    whole flow: the slow test below.)"""
    from conftest import S3_BUCKET

    from bolmo_core import checkpoint as ckpt
    from bolmo_core.callbacks import parse_progress_line
    from bolmo_core.config import get_preset
    from bolmo_core.train import TrainConfig, train

    # fp32 here (the slow rehearsal keeps bf16): one process has no FSDP, so its bf16 would be
    # autocast over fp32 weights, not FSDP's bf16 parameters; in fp32 both compute the same.
    over = {**SIZE, **STEPS, "stage1.steps": 4, "stage1.eval_every": 0, "stage1.eval_batches": 1}
    over |= {"stage1.callbacks": [], "stage1.precision": "fp32"}
    out = f"s3://{S3_BUCKET}/rehearsal-fast/stage1"
    cfg = {"preset": get_preset("olmo3-7b", over).to_dict(), "stage": 1,
           "manifest_uri": _tiny_olmo3_manifest(tmp_path / "d"), "out_uri": out}  # fmt: skip
    cfg_file = tmp_path / "stage1.json"
    cfg_file.write_text(json.dumps(cfg))

    # Two ranks as accelerate launches them with cpu_fsdp.yaml: torchrun with the variable that
    # yaml sets (the flow test goes through accelerate itself); torchrun saves accelerate's ~8 s start.
    proc = launch(str(cfg_file), 2, env={"ACCELERATE_USE_FSDP": "true"})
    seen = ""
    for line in proc.stdout:
        seen += line
        if '"event": "step"' in line and '"step": 3,' in line:
            os.kill(trainer_pids(proc.pid, rank=1)[0], signal.SIGKILL)
            break
    rest, err = proc.communicate(timeout=300)
    assert proc.returncode != 0 and ckpt.final_checkpoint(out) is None, err[-2000:]
    two = step_losses(seen + rest)
    latest = ckpt.latest_checkpoint(out)
    assert latest.endswith("step-000002") and ckpt.checkpoint_format(latest) == "dcp"
    sums = ckpt.read_commit(latest)["sha256"]
    assert sorted(f for f in sums if f.endswith(".distcp")) == ["dcp/__0_0.distcp", "dcp/__1_0.distcp"]
    assert {"rank-00000.pt", "rank-00001.pt", "dcp/.metadata"} <= set(sums)  # every rank's files, gathered

    capsys.readouterr()
    summary = train(TrainConfig.from_dict({**cfg, "allow_mismatch": True}))
    events = capsys.readouterr().out
    one = step_losses(events)
    start = next(e for e in map(parse_progress_line, events.splitlines()) if e and e["event"] == "start")
    assert (
        start["info"]["resumed_from"] == latest
        and "world_size: 2 in the checkpoint, 1 now" in start["info"]["mismatches_allowed"][0]
    )
    assert summary["step"] == 4 and sorted(one) == [3, 4]
    assert one[3] == pytest.approx(two[3], rel=1e-5), (one[3], two[3])
    assert ckpt.checkpoint_format(summary["final"]) == "files"  # one process writes the single-file format


# ---------------------------------------------------------------- slow: the whole flow, as deployed


@pytest.fixture(scope="module")
def flow_env(tmp_path_factory, s3_server):
    from conftest import flow_run_env
    from prefect.testing.utilities import prefect_test_harness

    with flow_run_env(tmp_path_factory.mktemp("rehearsal"), s3_server) as e:
        with prefect_test_harness(server_startup_timeout=300):
            yield e


def _kill_one_rank_after(root: str, step_dir: str, killed: list, stop: threading.Event) -> None:
    """SIGKILL this test's own Stage-1 rank 1 once a Stage-1 checkpoint `step_dir` is committed on S3."""
    from bolmo_core import storage

    fs, _ = storage.get_fs(root)
    pattern = f"{root.removeprefix('s3://')}/checkpoints/stage1-*/{step_dir}/COMMIT"
    while not stop.is_set() and not killed:
        fs.invalidate_cache()  # s3fs caches listings: look again each time
        if fs.glob(pattern):
            for pid in trainer_pids(os.getpid(), b"/stage1.json", rank=1)[:1]:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
        stop.wait(0.2)


def _task_runs(flow_run_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


@pytest.mark.slow
def test_rehearsal_of_olmo_7b_deployment(flow_env, s3_server, tmp_path):
    from conftest import S3_BUCKET

    from bolmo_core import checkpoint as ckpt

    root = f"s3://{S3_BUCKET}/rehearsal"
    params = rehearsal_parameters(root, flow_env["tracking_uri"])
    out, flow_run_id, killed = _run_flow_killing_one_rank(params, root)
    assert killed, "no Stage-1 rank was killed"
    runs = {r.name: r for r in _task_runs(flow_run_id)}
    assert runs["stage-1"].run_count == 2 and runs["stage-2"].run_count == 1  # killed, retried, resumed
    assert (
        ckpt.checkpoint_format(out["stage1_checkpoint"])
        == ckpt.checkpoint_format(out["stage2_checkpoint"])
        == "dcp"
    )
    _check_stage1_against_uninterrupted(out, flow_env["tracking_uri"], f"{root}/reference/stage1", tmp_path)
    _check_registered_and_planned(out, params, flow_env["tracking_uri"], flow_run_id)
    _check_plan_against_curve(params, out)  # the plan's estimate against the steps' measured memory


def _run_flow_killing_one_rank(params: dict, root: str):
    """The flow with the rehearsal's parameters while a watcher SIGKILLs Stage-1 rank 1 after step 2."""
    from flows.byteify import Compute, Evaluation, Tracking, byteify

    killed: list[int] = []
    stop = threading.Event()
    watcher = threading.Thread(
        target=_kill_one_rank_after, args=(root, "step-000002", killed, stop), daemon=True
    )
    watcher.start()
    state = byteify(
        preset=params["preset"],
        overrides=params["overrides"],
        data_sources=params["data_sources"],
        storage_root=root,
        compute=Compute(**params["compute"]),
        evaluation=Evaluation(**params["evaluation"]),
        tracking=Tracking(**params["tracking"]),
        return_state=True,
    )
    stop.set()
    watcher.join(5)
    return state.result(), state.state_details.flow_run_id, killed


def _check_stage1_against_uninterrupted(out: dict, tracking_uri: str, ref_out: str, tmp_path: Path) -> None:
    """Every logged Stage-1 loss (the killed attempt's and the resumed one's) equals an uninterrupted
    run of the same config, launched the same way; the final shards hash the same."""
    from mlflow import MlflowClient

    from bolmo_core import checkpoint as ckpt

    saved = ckpt.read_config(out["stage1_checkpoint"])
    ref = {"preset": saved["preset"], "stage": 1, "manifest_uri": out["manifest_uri"], "out_uri": ref_out}
    (tmp_path / "stage1.json").write_text(json.dumps(ref))
    reference = step_losses(
        finish(launch(str(tmp_path / "stage1.json"), 2, "accelerate", "cpu_fsdp.yaml"), timeout=1200)
    )
    client = MlflowClient(tracking_uri)
    parent = client.get_run(out["mlflow_run_id"])
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    s1_run = next(r for r in children if r.data.tags["byteify.stage"] == "stage1")
    history: dict[int, list[float]] = {}
    for m in client.get_metric_history(s1_run.info.run_id, "loss"):
        history.setdefault(m.step, []).append(m.value)
    assert sorted(history) == sorted(reference) == list(range(1, 7))
    for step, values in history.items():
        assert all(v == reference[step] for v in values), (step, values, reference[step])
    assert ckpt.checkpoint_hash(ckpt.final_checkpoint(ref_out)) == out["stage1_hash"]


def _check_registered_and_planned(out: dict, params: dict, tracking_uri: str, flow_run_id) -> None:
    """Registered with lineage; evaluated and exported from the sharded checkpoint; the plan artifact."""
    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from bolmo_core import storage

    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    mv = client.get_model_version_by_alias(params["tracking"]["model_name"], "candidate")
    assert mv.tags["byteify.source_id"] == "byteify/tiny-olmo3"
    assert mv.tags["byteify.stage1_checkpoint_hash"] == out["stage1_hash"]
    assert out["metrics"]["byte_model/bits_per_byte"] > 0
    assert storage.exists(storage.join(out["export_uri"], "config.json"))
    with get_client(sync_client=True) as pc:
        arts = pc.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    plan_md = next(a for a in arts if a.key == "plan").data
    assert "FSDP" in plan_md and "| fits | yes | yes |" in plan_md


def _check_plan_against_curve(params: dict, out: dict) -> None:
    from bolmo_core import storage
    from bolmo_core.config import get_preset
    from bolmo_core.plan import Hardware, plan
    from tasks.training import curve_uri

    p = plan(get_preset("olmo3-7b", params["overrides"]), Hardware(gpus=2, device="cpu"), sharding="fsdp")
    for st, final in zip(p.stages, (out["stage1_checkpoint"], out["stage2_checkpoint"])):
        curve = [
            json.loads(x) for x in storage.read_bytes(curve_uri(final)).decode().splitlines() if x.strip()
        ]
        measured = next(r["mem_step_peak_bytes"] for r in curve if "mem_step_peak_bytes" in r)
        step = st.memory["activations"] + st.memory["gradients"] + st.memory["weights (working copies)"]
        print(f"stage {st.stage}: plan {step / 2**20:.2f} MB per step, measured {measured / 2**20:.2f} MB")
        assert abs(step - measured) <= 0.25 * measured, (st.stage, step, measured)
