"""The trainer on the real tiny model and real loader.

Fast tests run the trainer in this process (schedule, compression knob, Stage 1 -> Stage 2,
finished-stage skip, refusal of mismatched checkpoints, errors). The `slow` ones run it as
separate processes (1 and 2 ranks), SIGKILL it mid-run and check bit-exact resume, and
compare 2 ranks against 1 rank at the same global batch.
"""

import json
import os
import random
import signal
import sys
from pathlib import Path

import pytest
import torch
from procs import finish, launch
from safetensors.torch import load_file
from train_helpers import OVERRIDES, make_manifest, run_config, write_config

from bolmo_core import checkpoint as ckpt
from bolmo_core.callbacks import parse_progress_line
from bolmo_core.config import get_preset
from bolmo_core.train import TrainConfig, lr_factor, main, train


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return make_manifest(tmp_path_factory.mktemp("traindata"))


def _events(text: str) -> list[dict]:
    return [e for e in map(parse_progress_line, text.splitlines()) if e]


def test_lr_schedule_warmup_then_linear_decay():
    f = [lr_factor(s, 100, 0.1) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)  # 10 warm-up steps
    assert f[10] == pytest.approx(1.0) and f[55] == pytest.approx(0.5) and f[99] == pytest.approx(1 / 90)
    assert lr_factor(100, 100, 0.1) == 0.0
    assert all(a <= b for a, b in zip(f[:10], f[1:10])) and all(a >= b for a, b in zip(f[10:], f[11:]))


RECORDER = """
import json
from bolmo_core.callbacks import Callback
class Recorder(Callback):
    def __init__(self, path):
        self.path = path
    def _w(self, *a):
        with open(self.path, "a") as f:
            f.write(json.dumps(a, default=str) + "\\n")
    def on_train_start(self, step, total, info): self._w("start", step, total)
    def on_step_end(self, step, m): self._w("step", step, sorted(m))
    def on_eval(self, step, m): self._w("eval", step, m)
    def on_checkpoint(self, step, uri): self._w("checkpoint", step, uri)
    def on_error(self, step, e): self._w("error", step, str(e))
    def on_train_end(self, step, m): self._w("end", step)
"""


def _assert_stage1_reported(out: dict, log, stdout: str) -> None:
    """A 4-step Stage 1 with eval every 2: its summary, the callbacks' events and the progress stream."""
    assert out["step"] == 4 and not out["skipped"] and out["final"].endswith("/final")
    m = out["metrics"]
    for k in ("val_bpb", "val_source_bpb", "val_boundary_acc", "val_patch_cos", "val_overflow_frac"):
        assert k in m and m[k] == m[k], k  # present and not NaN
    assert 0 < m["val_bpb"] < 12 and 0 < m["val_source_bpb"] < 16 and 0 <= m["val_boundary_acc"] <= 1
    rec = [json.loads(line) for line in log.read_text().splitlines()]
    kinds = [r[0] for r in rec]
    assert (
        kinds[0] == "start" and kinds[-1] == "end" and kinds.count("step") == 4 and kinds.count("eval") == 2
    )
    assert [r[1] for r in rec if r[0] == "checkpoint"] == [2, 4]
    step_keys = next(r[2] for r in rec if r[0] == "step")
    for k in (
        "loss",
        "loss_ce",
        "loss_distill",
        "loss_encoder",
        "loss_boundary",
        "boundary_acc",
        "boundary_precision",
        "boundary_recall",
        "bytes_per_s",
        "grad_norm",
        "lr/local",
    ):
        assert k in step_keys, k
    stdout_events = _events(stdout)  # the progress stream is always on
    assert [e["event"] for e in stdout_events][:2] == ["start", "step"] and stdout_events[-1][
        "event"
    ] == "end"


def _check_stage2_from(manifest, tmp_path, s1_final: str, capsys) -> None:
    """Stage 2 from the Stage-1 output folder, with the compression knob: it starts from Stage 1's weights."""
    capsys.readouterr()
    s2 = run_config(
        manifest,
        str(tmp_path / "s2"),
        2,
        {"stage2.steps": 2, "stage2.target_bytes_per_patch": 5.0},
        deterministic=False,
        init_from=str(tmp_path / "s1"),
    )
    out2 = train(TrainConfig.from_dict(s2))
    assert out2["step"] == 2
    cfg2 = ckpt.read_config(out2["final"])
    assert cfg2["init_from"] == str(tmp_path / "s1") and cfg2["stage"] == 2
    ev = _events(capsys.readouterr().out)
    info = next(e for e in ev if e["event"] == "start")["info"]
    assert info["init_from"].endswith("/final") and len(info["init_from_hash"]) == 64
    step = next(e for e in ev if e["event"] == "step")["metrics"]
    assert "overflow_frac" in step and "clipped_byte_frac" in step
    assert step["boundary_rate_label"] < 1 / 4.0  # labels coarsened to >= 5 bytes per patch (+ BOS)
    # Stage 2 weights started from Stage 1: the byte embedding differs from a fresh init only by 2 steps
    w1 = ckpt.load_model_state(s1_final)
    w2 = ckpt.load_model_state(out2["final"])
    k = next(k for k in w1 if "byte_embedding" in k)
    assert (w1[k] - w2[k]).abs().max() < 0.05


def test_stage1_then_stage2_skip_and_refusals(manifest, tmp_path, monkeypatch, capsys):
    (tmp_path / "rec_cb.py").write_text(RECORDER)
    monkeypatch.syspath_prepend(str(tmp_path))
    log = tmp_path / "events.jsonl"
    s1 = run_config(
        manifest,
        str(tmp_path / "s1"),
        1,
        {"stage1.steps": 4, "stage1.eval_every": 2},
        deterministic=False,
        callbacks=["rec_cb:Recorder"],
        callback_kwargs={"rec_cb:Recorder": {"path": str(log)}},
    )
    out = train(TrainConfig.from_dict(s1))
    _assert_stage1_reported(out, log, capsys.readouterr().out)

    # a finished stage is recognised and skipped
    again = train(TrainConfig.from_dict(s1))
    assert again["skipped"] and again["step"] == 4

    # refusal: another config for the same output folder names the field
    other = run_config(
        manifest, str(tmp_path / "s1"), 1, {"stage1.steps": 4, "stage1.optim.lr": 0.002}, deterministic=False
    )
    with pytest.raises(
        ckpt.CheckpointMismatch, match=r"config stage1\.optim\.lr: 0\.001 in the checkpoint, 0\.002 now"
    ):
        train(TrainConfig.from_dict(other))

    # Stage 2 from the Stage-1 checkpoint, with the compression knob
    _check_stage2_from(manifest, tmp_path, out["final"], capsys)


def test_manifest_mismatch_refused(manifest, tmp_path_factory, tmp_path):
    out = str(tmp_path / "s1")
    train(TrainConfig.from_dict(run_config(manifest, out, 1, {"stage1.steps": 2}, deterministic=False)))
    other = make_manifest(tmp_path_factory.mktemp("otherdata"), chars=24_000)
    with pytest.raises(
        ckpt.CheckpointMismatch, match="manifest_hash: '[0-9a-f]+' in the checkpoint, '[0-9a-f]+' now"
    ):
        train(TrainConfig.from_dict(run_config(other, out, 1, {"stage1.steps": 2}, deterministic=False)))
    # the user may override the refusal: the finished stage is then accepted as it is
    assert train(
        TrainConfig.from_dict(
            run_config(other, out, 1, {"stage1.steps": 2}, deterministic=False, allow_mismatch=True)
        )
    )["skipped"]


def test_time_budget_ends_stage_as_finished(manifest, tmp_path):
    cfg = run_config(
        manifest, str(tmp_path / "s1"), 1, {"stage1.steps": 50}, deterministic=False, max_minutes=1e-6
    )
    out = train(TrainConfig.from_dict(cfg))
    assert out["reason"] == "max_minutes" and out["step"] < 50 and out["final"].endswith("/final")
    state = json.loads((tmp_path / "s1" / "final" / "trainer_state.json").read_text())
    assert state["finished"] and state["reason"] == "max_minutes"
    assert train(TrainConfig.from_dict(cfg))["skipped"]


def test_error_reaches_callbacks_and_exits_nonzero(manifest, tmp_path, capsys):
    bad = tmp_path / "manifest.json"
    m = json.loads(open(manifest).read())
    m["splits"]["train"]["rows"] += 1  # edited after the fact: its hash no longer matches
    bad.write_text(json.dumps(m))
    cfg = write_config(tmp_path / "run.json", run_config(str(bad), str(tmp_path / "out"), 1))
    assert main(["--config", cfg]) == 2
    cap = capsys.readouterr()
    err = [line for line in cap.err.splitlines() if line.strip()]
    assert len(err) == 1 and "manifest_hash does not match" in err[0]
    assert [e["event"] for e in _events(cap.out)] == ["error"]
    assert main(["--config", str(tmp_path / "missing.json")]) == 2
    assert "missing.json: does not exist" in capsys.readouterr().err


def test_activation_checkpointing_changes_memory_not_losses(manifest, tmp_path, capsys):
    """Recomputing blocks in backward gives the same losses, bit for bit (CPU, deterministic)."""
    probe = {"stage1.callbacks": ["bolmo_core.callbacks:MemoryProbe"], "stage1.steps": 3}
    runs = {}
    for ac in (False, True):
        cfg = run_config(
            manifest, str(tmp_path / f"ac{ac}"), 1, {**probe, "stage1.activation_checkpointing": ac}
        )
        capsys.readouterr()
        train(TrainConfig.from_dict(cfg))
        runs[ac] = [e["metrics"] for e in _events(capsys.readouterr().out) if e["event"] == "step"]
    for a, b in zip(runs[False], runs[True]):
        assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"]
    off, on = runs[False][1]["mem_step_peak_bytes"], runs[True][1]["mem_step_peak_bytes"]
    assert on < 0.7 * off, (on, off)  # measured on the step the probe watched (step 2)
    a = ckpt.load_model_state(str(tmp_path / "acFalse" / "final"))
    b = ckpt.load_model_state(str(tmp_path / "acTrue" / "final"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # same keys: no wrapper prefix


def test_validation_shares_sum_to_the_one_rank_metrics(manifest):
    """Each rank scores batches k = rank mod world (a short share repeats a batch at weight 0) and
    every rank runs the same forward passes (the causal-boundary passes included); the summed
    counts give the one-rank metrics. Two ranks as two threads with an all-reduce built on a
    barrier: a rank running a pass more or less than the other would time the barrier out."""
    import copy
    import threading

    from bolmo_core.evaluate import Validator
    from bolmo_core.model import BolmoModel
    from bolmo_core.source import load_tokenizer
    from bolmo_core.subword import SubwordVocab

    preset = get_preset("tiny", {**OVERRIDES, "stage1.eval_batches": 3})
    vocab = SubwordVocab.from_tokenizer(load_tokenizer(preset.model.source))
    torch.manual_seed(0)
    model = BolmoModel.from_source(preset.model, vocab=vocab)
    args = (preset, 1, manifest, vocab, torch.device("cpu"))
    one = Validator(*args)(model)

    barrier, slots = threading.Barrier(2, timeout=120), [None, None]

    def all_reduce(rank: int, xs: list[float]) -> list[float]:
        slots[rank] = list(xs)
        barrier.wait()
        total = [a + b for a, b in zip(*slots)]
        barrier.wait()
        return total

    results: dict[int, dict] = {}
    validators = {
        r: Validator(*args, rank=r, world=2, reduce=lambda xs, r=r: all_reduce(r, xs)) for r in (0, 1)
    }

    def run(r: int) -> None:
        results[r] = validators[r](copy.deepcopy(model))

    threads = [threading.Thread(target=run, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert validators[1].weights == [1, 0] and validators[0].weights == [1, 1]  # batch 1, then a repeat
    assert results[0] == results[1] and results[0].keys() == one.keys()
    for k in one:
        if k != "val_causal_passes":  # the most passes a batch needed: a batch now waits for its partner
            assert results[0][k] == pytest.approx(one[k], rel=1e-9, abs=1e-12), k


# ---------------------------------------------------------------- processes, SIGKILL, resume (slow)


def _kill_after_checkpoint(proc, total: int, rng: random.Random) -> int:
    """Read progress until a checkpoint exists, then SIGKILL the whole group at a random later step."""
    ckpt_step, kill_at = None, None
    for line in proc.stdout:
        e = parse_progress_line(line)
        if not e:
            continue
        if e["event"] == "checkpoint" and ckpt_step is None:
            ckpt_step = e["step"]
            kill_at = rng.randint(ckpt_step + 1, total - 1)
        if e["event"] == "step" and kill_at is not None and e["step"] >= kill_at:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(60)
            return e["step"]
    raise AssertionError(f"trainer ended before it could be killed: {proc.stderr.read()[-2000:]}")


def _weights(final_uri: str) -> dict:
    return load_file(os.path.join(final_uri, "model.safetensors"))


@pytest.fixture(scope="module")
def straight_runs(manifest, tmp_path_factory):
    """The same Stage-1 run straight through with 1 process and with 2 (accelerate launch, CPU)."""
    d = tmp_path_factory.mktemp("straight")
    out = {}
    for n, launcher in ((1, None), (2, "accelerate")):
        cfg = write_config(d / f"run{n}.json", run_config(manifest, str(d / f"out{n}"), 1))
        finish(launch(cfg, n, launcher or "torchrun"))
        out[n] = str(d / f"out{n}" / "final")
    return out


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_sigkill_resume_is_bit_exact(manifest, straight_runs, tmp_path, nproc):
    cfg = write_config(tmp_path / "run.json", run_config(manifest, str(tmp_path / "out"), 1))
    killed_at = _kill_after_checkpoint(launch(cfg, nproc), 6, random.Random(nproc))
    assert not os.path.exists(tmp_path / "out" / "final") and killed_at < 6
    out = finish(launch(cfg, nproc))
    start = next(e for e in _events(out) if e["event"] == "start")
    assert start["info"]["resumed_from"].endswith(ckpt.step_name(start["step"])) and start["step"] >= 2
    a, b = _weights(straight_runs[nproc]), _weights(str(tmp_path / "out" / "final"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    opt_a = torch.load(os.path.join(straight_runs[nproc], "optimizer.pt"), weights_only=True)
    opt_b = torch.load(str(tmp_path / "out" / "final" / "optimizer.pt"), weights_only=True)
    for i, s in opt_a["state"].items():
        assert torch.equal(s["exp_avg"], opt_b["state"][i]["exp_avg"])


@pytest.mark.slow
def test_two_processes_match_one(straight_runs):
    a, b = _weights(straight_runs[1]), _weights(straight_runs[2])
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < 1e-5, worst
    changed = max(
        float(
            (
                a[k]
                - load_file(
                    os.path.join(os.path.dirname(straight_runs[1]), "step-000002", "model.safetensors")
                )[k]
            )
            .abs()
            .max()
        )
        for k in a
    )
    assert changed > 1e-4  # the comparison is not vacuous: training moved the weights


@pytest.mark.slow
def test_fsdp_matches_ddp(manifest, straight_runs, tmp_path):
    """The same 2-rank Stage 1 sharded with FSDP2 (fp32, sharded DCP checkpoints) ends where DDP does."""
    cfg = write_config(
        tmp_path / "fsdp.json", run_config(manifest, str(tmp_path / "out"), 1, sharding="fsdp")
    )
    finish(launch(cfg, 2))
    final = str(tmp_path / "out" / "final")
    assert ckpt.checkpoint_format(final) == "dcp"
    a, b = _weights(straight_runs[2]), ckpt.load_model_state(final)
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < 1e-5, worst


@pytest.mark.slow
def test_world_size_mismatch_refused(straight_runs, tmp_path):
    cfg_path = os.path.join(os.path.dirname(os.path.dirname(straight_runs[2])), "run2.json")
    proc = launch(cfg_path, 1)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 2
    assert "world_size: 2 in the checkpoint, 1 now" in err and "allow_mismatch" in err


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


PINNED = Path(__file__).with_name("pinned_losses.json")
PINNED_DATA = Path("/tmp/byteify-pinned-losses")


def test_losses_pinned_step_for_step(tmp_path, monkeypatch):
    """Stage 1 (6 steps) then Stage 2 (4 steps), deterministic, tiny preset: the losses of every step
    equal the ones recorded before the trainer was refactored (tests/bolmo_core/pinned_losses.json).

    The documents live at a fixed path: their ids (file URI + line) decide the train/validation
    split, so the same path gives the same data on every machine."""
    manifest = make_manifest(PINNED_DATA, out=tmp_path / "data")
    (tmp_path / "loss_rec.py").write_text(LOSS_RECORDER)
    monkeypatch.syspath_prepend(str(tmp_path))
    log = tmp_path / "losses.jsonl"
    cb = {
        "callbacks": ["loss_rec:LossRecorder"],
        "callback_kwargs": {"loss_rec:LossRecorder": {"path": str(log)}},
    }
    train(TrainConfig.from_dict(run_config(manifest, str(tmp_path / "s1"), 1, **cb)))
    s2 = run_config(manifest, str(tmp_path / "s2"), 2, init_from=str(tmp_path / "s1"), **cb)
    train(TrainConfig.from_dict(s2))
    got = [json.loads(line) for line in log.read_text().splitlines()]
    want = json.loads(PINNED.read_text())
    assert [(r["stage"], r["step"]) for r in got] == [(r["stage"], r["step"]) for r in want]
    for g, w in zip(got, want):
        for k, v in w.items():
            assert g[k] == pytest.approx(v, rel=1e-6, abs=1e-7), (w["stage"], w["step"], k)


LOSS_RECORDER = """
import json
from bolmo_core.callbacks import Callback
class LossRecorder(Callback):
    def __init__(self, path):
        self.path, self.stage = path, None
    def on_train_start(self, step, total, info):
        self.stage = info.get("stage")
    def on_step_end(self, step, m):
        keep = {k: v for k, v in m.items() if k.startswith("loss") or k == "grad_norm"}
        with open(self.path, "a") as f:
            f.write(json.dumps({"stage": self.stage, "step": step, **keep}) + "\\n")
"""


# ---------------------------------------------------------------- the folder lock and intact fallback (real processes)


@pytest.mark.slow
def test_second_trainer_on_one_folder_is_refused_in_a_real_process(manifest, tmp_path):
    """Two `python -m bolmo_core.train` on one --out: the second is refused with one line naming the
    folder and the holder; it writes nothing; the first one's lock dies with it (SIGKILL)."""
    from bolmo_core import storage

    out = tmp_path / "out"
    first = launch(
        write_config(tmp_path / "a.json", run_config(manifest, str(out), 1, {"stage1.steps": 5000}))
    )
    try:
        for line in first.stdout:  # the lock is taken before the first step
            e = parse_progress_line(line)
            if e and e["event"] == "step":
                break
        else:
            raise AssertionError(first.stderr.read()[-2000:])
        before = sorted(p.name for p in out.iterdir())
        second = launch(write_config(tmp_path / "b.json", run_config(manifest, str(out), 1)))
        _, err = second.communicate(timeout=300)
        assert second.returncode == 2, err[-2000:]
        lines = err.strip().splitlines()
        assert len(lines) == 1, err
        assert lines[0].startswith(f"bolmo_core.train: error: {out}: in use by stage 1 training")
        assert f"pid {first.pid} on " in lines[0]
        assert set(before) <= {p.name for p in out.iterdir()}  # nothing of the first run removed
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(60)
    # a SIGKILLed holder on this host does not block the folder: the next taker gets it at once
    with storage.lock_folder(str(out), "test", lease_s=3600):
        pass


def test_a_locked_folder_is_refused_in_one_line_under_two_ranks(manifest, tmp_path):
    """Under torchrun, rank 0 takes the lock and tells rank 1: the refusal is said once, not per rank."""
    from bolmo_core import storage

    out = tmp_path / "out"
    with storage.lock_folder(str(out), "a test holding the folder", lease_s=3600):
        proc = launch(write_config(tmp_path / "a.json", run_config(manifest, str(out), 1)), nproc=2)
        _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0
    said = [ln for ln in err.splitlines() if ln.startswith("bolmo_core.train: error:")]
    assert len(said) == 1, err[-3000:]
    assert said[0].startswith(f"bolmo_core.train: error: {out}: in use by a test holding the folder")
    assert list(out.iterdir()) == []  # nothing written there (the lock went with its holder)


def _assert_resumed_as_straight(events, ref, steps, straight_final, resumed_final) -> None:
    """The resumed run's steps are `steps`, each with the straight run's loss, and it ends with the
    straight run's weights, bit for bit (any checkpoint format)."""
    losses = {e["step"]: e["metrics"]["loss"] for e in events if e["event"] == "step"}
    ref_losses = {e["step"]: e["metrics"]["loss"] for e in ref if e["event"] == "step"}
    assert sorted(losses) == steps and all(losses[s] == ref_losses[s] for s in losses)
    a, b = ckpt.load_model_state(str(straight_final)), ckpt.load_model_state(str(resumed_final))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_resume_skips_a_truncated_newest_checkpoint_in_a_real_process(manifest, tmp_path):
    """The newest step's weights truncated: the resume warns naming it, continues from the one
    before, and ends bit-exact with the run that was never interrupted (losses and weights)."""
    import shutil

    straight = tmp_path / "straight"
    cfg = run_config(manifest, str(straight), 1)
    ref = _events(finish(launch(write_config(tmp_path / "a.json", cfg))))
    out = tmp_path / "out"  # the same run, as if killed while saving `final`, with step 4 damaged
    shutil.copytree(straight, out, ignore=shutil.ignore_patterns("final"))
    weights = out / "step-000004" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    proc = launch(write_config(tmp_path / "b.json", {**cfg, "out_uri": str(out)}))
    stdout, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert "Loading weights" not in err  # no library progress bars on the command's stderr
    warnings = [ln for ln in err.splitlines() if "warning" in ln]
    assert (
        len(warnings) == 1
        and f"skipping checkpoint {out}/step-000004: {weights}: sha256 differs from COMMIT" in warnings[0]
    )
    events = _events(stdout)
    start = next(e for e in events if e["event"] == "start")
    assert start["step"] == 2 and start["info"]["resumed_from"] == str(out / "step-000002")
    _assert_resumed_as_straight(events, ref, [3, 4, 5, 6], straight / "final", out / "final")


@pytest.mark.slow
def test_resume_skips_a_changed_dcp_shard_under_two_fsdp_ranks(manifest, tmp_path):
    """FSDP over 2 gloo ranks (torchrun): one flipped bit in a shard of the newest step, its size
    kept (only the COMMIT digest can tell), is skipped with one warning naming it; the resume
    from the step before ends bit-exact with the run that was never interrupted. The flipped
    shard, __0_0, is hashed by rank 1 (file i by rank i % 2): rank 0 learns it from the
    gathered verdicts, and both ranks skip it together."""
    import shutil

    straight = tmp_path / "straight"
    over = {"stage1.steps": 3, "stage1.checkpoint_every": 1}
    cfg = run_config(manifest, str(straight), 1, over, sharding="fsdp")
    ref = _events(finish(launch(write_config(tmp_path / "a.json", cfg), 2)))
    out = tmp_path / "out"  # the same run, as if killed while saving `final`, with step 2 changed
    shutil.copytree(straight, out, ignore=shutil.ignore_patterns("final"))
    shard = out / "step-000002" / "dcp" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    proc = launch(write_config(tmp_path / "b.json", {**cfg, "out_uri": str(out)}), 2)
    stdout, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    warnings = [ln for ln in err.splitlines() if ln.startswith("bolmo_core.train: warning")]
    assert len(warnings) == 1, err[-3000:]  # said once (rank 0), though both ranks skip it
    assert f"skipping checkpoint {out}/step-000002: {shard}: sha256 differs from COMMIT" in warnings[0]
    events = _events(stdout)
    start = next(e for e in events if e["event"] == "start")
    assert start["step"] == 1 and start["info"]["resumed_from"] == str(out / "step-000001")
    _assert_resumed_as_straight(events, ref, [2, 3], straight / "final", out / "final")
