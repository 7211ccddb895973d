"""Checkpoints: round trip of a real model/optimizer/RNG/loader state, atomicity, pruning, refusal, S3."""

import json
import random

import numpy as np
import pytest
import torch
from model_helpers import save_parts
from train_helpers import OVERRIDES, make_manifest

from bolmo_core import checkpoint as ckpt
from bolmo_core import storage
from bolmo_core.config import get_preset
from bolmo_core.loader import WindowLoader
from bolmo_core.model import BolmoModel
from bolmo_core.source import load_tokenizer
from bolmo_core.subword import SubwordVocab
from bolmo_core.train import build_optimizer, build_scheduler


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    manifest = make_manifest(tmp_path_factory.mktemp("ckdata"), chars=12_000)
    preset = get_preset("tiny", OVERRIDES)
    vocab = SubwordVocab.from_tokenizer(load_tokenizer(preset.model.source))
    return manifest, preset, vocab


def _trained(setup, steps=2):
    """A real tiny BolmoModel after `steps` AdamW steps on real loader batches."""
    manifest, preset, vocab = setup
    torch.manual_seed(0)
    model = BolmoModel.from_source(preset.model, vocab=vocab)
    opt = build_optimizer(model, preset.stage1)
    sched = build_scheduler(opt, preset.stage1)
    loader = WindowLoader.from_config(preset.data, manifest, vocab, 1)
    it = iter(loader)
    for _ in range(steps):
        loss, _ = model.stage1_loss(next(it), preset.stage1.losses)
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    return model, opt, sched, loader


def _save(out, name, model, opt, sched, loader, config=None, keep_last=2, sharded=False):
    """A checkpoint from this one process; `sharded`: the DCP format (the multi-rank path: tests/test_rehearsal.py)."""
    if sharded:
        from bolmo_core.train import sharded_state

        weights = {"sharded_state": sharded_state(model, opt)}
    else:
        weights = {"model_state": model.state_dict(), "optimizer_state": opt.state_dict()}
    return save_parts(
        out,
        name,
        config or {"stage": 1},
        rank_state={"rng": ckpt.capture_rng(), "loader": loader.state_dict()},
        scheduler_state=sched.state_dict(),
        trainer_state={"step": 2},
        keep_last=keep_last,
        **weights,
    )


def test_round_trip_restores_everything(setup, tmp_path):
    model, opt, sched, loader = _trained(setup)
    random.seed(5)
    np.random.seed(6)
    torch.manual_seed(7)
    uri = _save(tmp_path, ckpt.step_name(2), model, opt, sched, loader)
    expected_rand = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    expected_batch = next(iter(loader))

    st = ckpt.load_checkpoint(uri, rank=0)
    manifest, preset, vocab = setup
    fresh = BolmoModel.from_source(preset.model, vocab=vocab, init=False)
    fresh.load_state_dict(st["model"])
    for (k, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), k
    opt2 = build_optimizer(fresh, preset.stage1)
    opt2.load_state_dict(st["optimizer"])
    for s1, s2 in zip(opt.state.values(), opt2.state.values()):
        assert all(torch.equal(s1[k], s2[k]) for k in ("exp_avg", "exp_avg_sq", "step"))
    sched2 = build_scheduler(opt2, preset.stage1)
    sched2.load_state_dict(st["scheduler"])
    assert sched2.get_last_lr() == sched.get_last_lr()
    ckpt.restore_rng(st["rank"]["rng"])
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected_rand
    loader2 = WindowLoader.from_config(preset.data, manifest, vocab, 1)
    loader2.load_state_dict(st["rank"]["loader"])
    got = next(iter(loader2))
    assert all(torch.equal(got[k], expected_batch[k]) for k in got)
    assert st["trainer_state"] == {"step": 2}


def test_shared_tensors_stored_once(tmp_path):
    w = torch.randn(64, 32)
    data = ckpt.state_to_bytes({"embed.weight": w, "head.weight": w, "bias": torch.zeros(3)})
    back = ckpt.state_from_bytes(data)
    assert torch.equal(back["head.weight"], w) and torch.equal(back["embed.weight"], w)
    assert len(data) < 64 * 32 * 4 * 1.5  # one copy of the tied matrix, not two


def test_uncommitted_folders_ignored_and_cleaned(setup, tmp_path):
    model, opt, sched, loader = _trained(setup, steps=1)
    _save(tmp_path, ckpt.step_name(2), model, opt, sched, loader)
    # a save that died before COMMIT (S3 layout) and a local temp folder left by a crash
    (tmp_path / "step-000004").mkdir()
    (tmp_path / "step-000004" / "model.safetensors").write_bytes(b"partial")
    (tmp_path / ".tmp-step-000006").mkdir()
    assert ckpt.latest_checkpoint(str(tmp_path)).endswith("step-000002")
    assert sorted(ckpt.clean_uncommitted(str(tmp_path))) == [".tmp-step-000006", "step-000004"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000002"]
    with pytest.raises(ckpt.CheckpointError, match="no COMMIT marker"):
        ckpt.load_checkpoint(str(tmp_path / "step-000004"), 0)


def test_keep_last_and_final(setup, tmp_path):
    model, opt, sched, loader = _trained(setup, steps=1)
    for s in (2, 4, 6):
        _save(tmp_path, ckpt.step_name(s), model, opt, sched, loader, keep_last=2)
    assert [s for s, _ in ckpt.committed_steps(str(tmp_path))] == [4, 6]
    assert ckpt.final_checkpoint(str(tmp_path)) is None
    _save(tmp_path, ckpt.FINAL, model, opt, sched, loader, keep_last=2)
    assert ckpt.latest_checkpoint(str(tmp_path)).endswith("/final")
    assert ckpt.resolve_checkpoint(str(tmp_path)).endswith("/final")


def _flip_byte(path) -> None:
    """One bit of the middle byte flipped, the size kept: what only a digest can tell."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _drop_digests(ckpt_dir) -> None:
    """COMMIT as checkpoints wrote it before files had digests (DCP kept its shard digests)."""
    commit = json.loads((ckpt_dir / ckpt.COMMIT).read_text())
    commit["sha256"] = {k: v for k, v in commit.get("sha256", {}).items() if k.endswith(".distcp")}
    (ckpt_dir / ckpt.COMMIT).write_text(json.dumps({k: v for k, v in commit.items() if v}))


def _changed(ckpt_dir, file: str) -> str:
    """The one line a file whose bytes differ from its COMMIT digest gives."""
    return (
        f"{ckpt_dir / file}: sha256 differs from COMMIT (changed or damaged); "
        f"delete {ckpt_dir} and resume from the previous committed one"
    )


def test_commit_holds_the_digest_of_every_file(setup, tmp_path):
    model, opt, sched, loader = _trained(setup, steps=1)
    uri = _save(tmp_path, ckpt.step_name(2), model, opt, sched, loader)
    commit = ckpt.read_commit(uri)
    assert sorted(commit["sha256"]) == sorted(commit["files"])
    for name, digest in commit["sha256"].items():
        assert digest == storage.sha256_uri(storage.join(uri, name)), name
    # lineage: still the weights file's sha256, now taken from COMMIT (the same value, nothing read)
    assert ckpt.checkpoint_hash(uri) == storage.sha256_uri(storage.join(uri, "model.safetensors"))


FILES = [
    "model.safetensors",
    "optimizer.pt",
    "scheduler.pt",
    "rank-00000.pt",
    "trainer_state.json",
    "config.json",
]


@pytest.mark.parametrize("file", FILES)
def test_a_changed_file_is_damaged_in_one_line(setup, tmp_path, file):
    """One flipped bit anywhere: DamagedCheckpoint (what the resume fallback skips), one line."""
    model, opt, sched, loader = _trained(setup, steps=1)
    uri = _save(tmp_path, ckpt.step_name(2), model, opt, sched, loader)
    _flip_byte(tmp_path / "step-000002" / file)
    with pytest.raises(ckpt.DamagedCheckpoint) as e:
        ckpt.load_checkpoint(uri, 0)
    assert str(e.value) == _changed(tmp_path / "step-000002", file)
    if file == "model.safetensors":  # evaluation and export read the weights through this
        with pytest.raises(ckpt.DamagedCheckpoint, match="sha256 differs from COMMIT"):
            ckpt.load_model_state(uri)


def test_checkpoint_without_digests_still_loads(setup, tmp_path):
    """A COMMIT from before files had digests: loads as before; a damaged file is still found by
    parsing, and lineage hashes the weights file (the same value a digest would give)."""
    model, opt, sched, loader = _trained(setup, steps=1)
    uri = _save(tmp_path, ckpt.step_name(2), model, opt, sched, loader)
    h = ckpt.checkpoint_hash(uri)
    _drop_digests(tmp_path / "step-000002")
    assert "sha256" not in ckpt.read_commit(uri)
    st = ckpt.load_checkpoint(uri, 0)
    assert all(torch.equal(st["model"][k], v) for k, v in model.state_dict().items())
    assert ckpt.checkpoint_hash(uri) == h
    (tmp_path / "step-000002" / "optimizer.pt").write_bytes(b"not a torch file")
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.load_checkpoint(uri, 0)
    assert "optimizer.pt: cannot be loaded" in str(e.value) and "\n" not in str(e.value)


def _ident(preset, **kw):
    return {
        "preset": preset.to_dict(),
        "stage": 1,
        "world_size": 1,
        "manifest_hash": "aaa",
        "source": {"source_id": "x"},
        **kw,
    }


@pytest.mark.parametrize(
    "change,field",
    [
        ({"world_size": 2}, "world_size: 1 in the checkpoint, 2 now"),
        ({"manifest_hash": "bbb"}, "manifest_hash: 'aaa' in the checkpoint, 'bbb' now"),
        ({"source": {"source_id": "y"}}, "source:"),
    ],
)
def test_mismatch_named(change, field):
    preset = get_preset("tiny", OVERRIDES)
    with pytest.raises(ckpt.CheckpointMismatch) as e:
        ckpt.check_compatible(_ident(preset), _ident(preset, **change), "out/step-000002")
    msg = str(e.value)
    assert field in msg and "allow_mismatch" in msg and "\n" not in msg
    assert ckpt.check_compatible(_ident(preset), _ident(preset, **change), "x", allow_mismatch=True)


def test_config_mismatch_names_field_and_ignores_logging_fields():
    a = get_preset("tiny", OVERRIDES)
    b = a.with_overrides({"stage1.optim.lr": 0.002})
    with pytest.raises(
        ckpt.CheckpointMismatch, match=r"config stage1\.optim\.lr: 0\.001 in the checkpoint, 0\.002 now"
    ):
        ckpt.check_compatible(_ident(a), _ident(b), "c")
    # where checkpoints go and how often one evaluates do not change the training math
    c = a.with_overrides({"stage1.eval_every": 7, "stage1.keep_last": 5, "stage1.callbacks": ["m:C"]})
    assert ckpt.check_compatible(_ident(a), _ident(c), "c") == []
    # Stage 2 settings do not matter to a Stage-1 resume
    assert ckpt.check_compatible(_ident(a), _ident(a.with_overrides({"stage2.steps": 9})), "c") == []


def test_checkpoint_from_before_a_new_config_field_still_resumes():
    """A preset saved before a field existed compares equal to today's preset with its default."""
    a = get_preset("tiny", OVERRIDES)
    old = _ident(a)
    del old["preset"]["model"]["boundary_context"]  # a field added after this checkpoint was written
    del old["preset"]["stage1"]["losses"]["byte_kl"]
    del old["preset"]["data"]["loader"]
    assert ckpt.check_compatible(old, _ident(a), "c") == []
    # a value that differs from the new field's default is still a mismatch
    b = a.with_overrides({"model.boundary_context": 2})
    with pytest.raises(
        ckpt.CheckpointMismatch, match=r"config model\.boundary_context: 0 in the checkpoint, 2"
    ):
        ckpt.check_compatible(old, _ident(b), "c")
    # a saved preset that breaks today's rules is one line naming the checkpoint, not a traceback
    bad = _ident(a)
    bad["preset"]["stage1"]["steps"] = "abc"
    with pytest.raises(
        ckpt.CheckpointMismatch, match=r"checkpoint c: its saved preset no longer loads \(stage1\.steps="
    ):
        ckpt.check_compatible(bad, _ident(a), "c")


def test_s3_checkpoint(setup, s3_server, tmp_path):
    from conftest import S3_BUCKET

    model, opt, sched, loader = _trained(setup, steps=1)
    out = f"s3://{S3_BUCKET}/ckpt-test/stage1"
    uri = _save(out, ckpt.step_name(2), model, opt, sched, loader, config={"stage": 1, "k": "v"})
    assert ckpt.is_committed(uri)
    storage.write_bytes_atomic(storage.join(out, "step-000004", "model.safetensors"), b"partial")  # no COMMIT
    assert ckpt.latest_checkpoint(out) == uri
    st = ckpt.load_checkpoint(uri, 0)
    assert all(torch.equal(st["model"][k], v) for k, v in model.state_dict().items())
    assert st["config"] == {"stage": 1, "k": "v"}
    commit = json.loads(storage.read_bytes(storage.join(uri, ckpt.COMMIT)))
    assert "model.safetensors" in commit["files"] and "rank-00000.pt" in commit["files"]
    assert ckpt.clean_uncommitted(out) == ["step-000004"]
    assert [name for name in storage.listdir(out)] == ["step-000002"]


# ---------------------------------------------------------------- sharded (DCP) checkpoints


def test_dcp_round_trip_and_consolidation(setup, tmp_path):
    from bolmo_core.train import load_sharded_state, sharded_state

    model, opt, sched, loader = _trained(setup)
    uri = _save(tmp_path, ckpt.step_name(2), model, opt, sched, loader, sharded=True)
    commit = ckpt.read_commit(uri)
    assert (
        commit["format"] == "dcp" and "dcp" in commit["files"] and "model.safetensors" not in commit["files"]
    )
    assert sorted(commit["sha256"]) == sorted(
        [
            "dcp/.metadata",
            "dcp/__0_0.distcp",
            "scheduler.pt",
            "trainer_state.json",
            "config.json",
            "rank-00000.pt",
        ]
    )
    for name, digest in commit["sha256"].items():
        assert digest == storage.sha256_uri(f"{uri}/{name}"), name
    # lineage: the shard digests only (.metadata holds a random save id), as before .metadata had one
    assert ckpt.checkpoint_hash(uri) == storage.sha256_bytes(
        json.dumps({"dcp/__0_0.distcp": commit["sha256"]["dcp/__0_0.distcp"]}, sort_keys=True).encode()
    )

    # one function gives every weight, in one process (evaluation and export go through it)
    full = ckpt.load_model_state(uri)
    assert full.keys() == model.state_dict().keys()
    assert all(torch.equal(full[k], v) for k, v in model.state_dict().items())

    # the resume path: into a fresh model and optimizer, by parameter name
    manifest, preset, vocab = setup
    fresh = BolmoModel.from_source(preset.model, vocab=vocab, init=False)
    opt2 = build_optimizer(fresh, preset.stage1)
    target = sharded_state(fresh, opt2)
    st = ckpt.load_checkpoint(uri, 0, target)
    load_sharded_state(fresh, opt2, target)
    assert st["model"] is None and st["format"] == "dcp" and st["trainer_state"] == {"step": 2}
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))
    for s1, s2 in zip(opt.state.values(), opt2.state.values()):
        assert all(torch.equal(s1[k], s2[k]) for k in ("exp_avg", "exp_avg_sq", "step"))
    assert [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in opt.param_groups]
    with pytest.raises(ckpt.CheckpointError, match="needs target state"):
        ckpt.load_checkpoint(uri, 0)


@pytest.mark.parametrize("file", ["__0_0.distcp", ".metadata"])
def test_damaged_dcp_checkpoint_is_damaged_for_the_resume_fallback(setup, tmp_path, file):
    """What Trainer.resume skips to the previous committed checkpoint: DamagedCheckpoint, one line."""
    from bolmo_core.train import sharded_state

    model, opt, sched, loader = _trained(setup)
    uri = _save(tmp_path, ckpt.step_name(2), model, opt, sched, loader, sharded=True)
    f = tmp_path / "step-000002" / "dcp" / file
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ckpt.DamagedCheckpoint) as e:
        ckpt.load_checkpoint(uri, 0, sharded_state(model, opt))
    assert str(tmp_path / "step-000002") in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("file", ["dcp/__0_0.distcp", "dcp/.metadata", "scheduler.pt"])
def test_a_changed_dcp_file_is_damaged_before_it_is_used(setup, tmp_path, file):
    """One flipped bit in a shard (or DCP's table of contents): caught by its COMMIT digest before
    dcp.load, on the resume path and on the one-process path (evaluation, export)."""
    from bolmo_core.train import sharded_state

    model, opt, sched, loader = _trained(setup, steps=1)
    uri = _save(tmp_path, ckpt.step_name(2), model, opt, sched, loader, sharded=True)
    _flip_byte(tmp_path / "step-000002" / file)
    with pytest.raises(ckpt.DamagedCheckpoint) as e:
        ckpt.load_checkpoint(uri, 0, sharded_state(model, opt))
    assert str(e.value) == _changed(tmp_path / "step-000002", file)
    if file.startswith("dcp/"):
        with pytest.raises(ckpt.DamagedCheckpoint) as e:
            ckpt.load_model_state(uri)
        assert str(e.value) == _changed(tmp_path / "step-000002", file)


def test_dcp_checkpoint_without_file_digests_still_loads(setup, tmp_path):
    """Before this change a DCP COMMIT held the shard digests only: it loads, and they are checked."""
    model, opt, sched, loader = _trained(setup, steps=1)
    uri = _save(tmp_path, ckpt.step_name(2), model, opt, sched, loader, sharded=True)
    h = ckpt.checkpoint_hash(uri)
    _drop_digests(tmp_path / "step-000002")
    assert list(ckpt.read_commit(uri)["sha256"]) == ["dcp/__0_0.distcp"] and ckpt.checkpoint_hash(uri) == h
    full = ckpt.load_model_state(uri)
    assert all(torch.equal(full[k], v) for k, v in model.state_dict().items())
    _flip_byte(tmp_path / "step-000002" / "dcp" / "__0_0.distcp")
    with pytest.raises(ckpt.DamagedCheckpoint, match="__0_0.distcp: sha256 differs from COMMIT"):
        ckpt.load_model_state(uri)


def test_dcp_metadata_never_unpickles_foreign_objects(setup, tmp_path):
    import os
    import pickle

    model, opt, sched, loader = _trained(setup, steps=1)
    uri = _save(tmp_path, ckpt.step_name(2), model, opt, sched, loader, sharded=True)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (tmp_path / "step-000002" / "dcp" / ".metadata").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(ckpt.DamagedCheckpoint, match="metadata: sha256 differs from COMMIT"):
        ckpt.load_model_state(uri)  # its COMMIT digest refuses it before it is unpickled
    _drop_digests(tmp_path / "step-000002")  # a checkpoint from before .metadata had a digest
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.load_model_state(uri)
    assert "not DCP metadata" in str(e.value) and "\n" not in str(e.value)
    assert not marker.exists()


def test_dcp_keep_last_prunes_after_commit(setup, tmp_path):
    model, opt, sched, loader = _trained(setup, steps=1)
    for s in (2, 4, 6):
        _save(tmp_path, ckpt.step_name(s), model, opt, sched, loader, keep_last=2, sharded=True)
    assert [s for s, _ in ckpt.committed_steps(str(tmp_path))] == [4, 6]
    # a DCP save that died before COMMIT: its shards are ignored, then cleaned
    (tmp_path / "step-000008" / "dcp").mkdir(parents=True)
    (tmp_path / "step-000008" / "dcp" / "__0_0.distcp").write_bytes(b"partial")
    assert ckpt.latest_checkpoint(str(tmp_path)).endswith("step-000006")
    assert ckpt.clean_uncommitted(str(tmp_path)) == ["step-000008"]


def test_s3_dcp_checkpoint(setup, s3_server):
    from conftest import S3_BUCKET

    model, opt, sched, loader = _trained(setup, steps=1)
    out = f"s3://{S3_BUCKET}/ckpt-test/dcp"
    uri = _save(out, ckpt.step_name(2), model, opt, sched, loader, sharded=True)
    assert sorted(storage.listdir(storage.join(uri, "dcp"))) == [".metadata", "__0_0.distcp"]
    full = ckpt.load_model_state(uri)
    assert all(torch.equal(full[k], v) for k, v in model.state_dict().items())
    digest = storage.sha256_uri(f"{uri}/dcp/__0_0.distcp")  # hashed at save time by the writing rank
    assert ckpt.read_commit(uri)["sha256"]["dcp/__0_0.distcp"] == digest
    storage.write_bytes_atomic(f"{uri}/dcp/__0_0.distcp", b"replaced")  # verified on S3 too
    with pytest.raises(ckpt.DamagedCheckpoint, match="__0_0.distcp: sha256 differs from COMMIT"):
        ckpt.load_model_state(uri)


VERIFY_TWO_RANKS = """
import json, sys
import torch.distributed as dist
from bolmo_core import checkpoint as ckpt, storage

dist.init_process_group("gloo")
rank, (uri, out) = dist.get_rank(), sys.argv[1:]
hashed, real = [], storage.sha256_uri
storage.sha256_uri = lambda u: hashed.append(u) or real(u)  # the real hash, and which files it read
report = {}
for case in ("intact", "changed"):
    if case == "changed" and rank == 0:  # the shard rank 1 hashes: rank 0 learns of it by the gather
        path = uri + "/dcp/__0_0.distcp"
        data = bytearray(open(path, "rb").read())
        data[len(data) // 2] ^= 1
        open(path, "wb").write(bytes(data))
    dist.barrier()
    hashed.clear()
    try:
        ckpt.verify_sharded(uri)
        report[case] = {"hashed": list(hashed), "error": None}
    except ckpt.DamagedCheckpoint as e:
        report[case] = {"hashed": list(hashed), "error": str(e)}
json.dump(report, open(f"{out}/rank{rank}.json", "w"))
dist.destroy_process_group()
"""


def test_dcp_files_are_verified_once_in_all_over_two_ranks(setup, tmp_path):
    """Two gloo processes verify one DCP checkpoint: each hashes only its share (file i by rank
    i % 2), and a changed shard found by rank 1 is the same one line on both ranks."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    model, opt, sched, loader = _trained(setup, steps=1)
    uri = _save(tmp_path / "ck", ckpt.step_name(2), model, opt, sched, loader, sharded=True)
    (tmp_path / "verify.py").write_text(VERIFY_TWO_RANKS)
    torchrun = Path(sys.executable).parent / "torchrun"
    proc = subprocess.run(
        [
            str(torchrun),
            "--standalone",
            "--nproc_per_node",
            "2",
            str(tmp_path / "verify.py"),
            uri,
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    files = [f"{uri}/dcp/.metadata", f"{uri}/dcp/__0_0.distcp"]  # sorted: rank 0 takes .metadata
    assert (r0["intact"], r1["intact"]) == (
        {"hashed": files[:1], "error": None},
        {"hashed": files[1:], "error": None},
    )
    want = _changed(tmp_path / "ck" / "step-000002", "dcp/__0_0.distcp")
    assert r0["changed"]["error"] == r1["changed"]["error"] == want
    assert r0["changed"]["hashed"] == files[:1]  # rank 0 read only its own share, and still knows
