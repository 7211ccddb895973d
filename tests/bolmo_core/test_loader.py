"""Training windows, in memory and streamed: batch format (docs/internals.md), shuffling, rank split, exact resume."""

import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bolmo_core import data as D
from bolmo_core.byte_tokenizer import BOS, OFFSET, PAD
from bolmo_core.config import DataConfig
from bolmo_core.loader import StreamingWindowLoader, WindowLoader, split_texts
from bolmo_core.source import SourceConfig, load_tokenizer, tiny_corpus
from bolmo_core.subword import RetainedIndex, get_vocab

TINY = SourceConfig("tiny-olmo2")
P = 32


@pytest.fixture(scope="module")
def vocab():
    return get_vocab(load_tokenizer(TINY))


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    d = tmp_path_factory.mktemp("loader")
    docs = tiny_corpus(60_000)[:80] + ["tab\there\x00nul 👋 é"]
    (d / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    return D.prepare_dataset(
        [str(d / "docs.jsonl")], TINY, str(d / "out"), DataConfig(shard_docs=20, validation_fraction=0.2)
    )


def stream(manifest, split, vocab):
    """The packed token stream, rebuilt plainly from the shards (the reference)."""
    m = D.read_manifest(manifest)
    toks = []
    for e in m["shards"]:
        if e["split"] == split:
            for r in D.read_shard(str(Path(manifest).parent / e["uri"])).to_pylist():
                toks += r["token_ids"] + [vocab.doc_separator_id]
    return np.array(toks)


def test_batch_format(manifest, vocab):
    ld = WindowLoader(manifest, vocab, window_tokens=P, batch_size=3, seed=1)
    b = next(iter(ld))
    L = 6 * P
    shapes = {
        "input_ids": (3, L),
        "expanded_ids": (3, L),
        "patch_lens": (3, P),
        "teacher_ids": (3, P),
        "teacher_next": (3,),
        "byte_mask": (3, L),
        "patch_mask": (3, P),
    }
    assert {k: tuple(v.shape) for k, v in b.items()} == shapes
    assert b["byte_mask"].dtype == torch.bool and b["patch_mask"].dtype == torch.bool
    assert all(b[k].dtype == torch.long for k in shapes if "mask" not in k)
    ref = stream(manifest, "train", vocab)
    sep = vocab.doc_separator_id
    for r in range(3):
        ids, lens, teach = b["input_ids"][r], b["patch_lens"][r], b["teacher_ids"][r]
        assert ids[0] == BOS and lens[0] == 1 and teach[0] == sep
        assert teach[1] != sep  # leading separators are stripped
        ends = torch.cumsum(lens, 0)
        for k in range(1, P):  # patch k holds the bytes of teacher input k
            got = ids[ends[k - 1] : ends[k]]
            tid = int(teach[k])
            want = [BOS] if tid == sep else [x + OFFSET for x in vocab.token_bytes[tid]]
            assert got.tolist() == want
        n = int(ends[-1])
        assert b["byte_mask"][r].tolist() == [True] * n + [False] * (L - n)
        assert (ids[n:] == PAD).all()
        # The window is P consecutive tokens of the packed stream; teacher_next is the last.
        window = teach[1:].tolist() + [int(b["teacher_next"][r])]
        hits = [s for s in range(len(ref) - P + 1) if ref[s : s + P].tolist() == window]
        assert hits
    assert torch.equal(
        b["expanded_ids"], torch.as_tensor(RetainedIndex(vocab).expand(b["input_ids"].numpy()))
    )
    assert (b["expanded_ids"][:, 0] == sep).all()
    assert (b["expanded_ids"][~b["byte_mask"]] == vocab.pad_id).all()


def test_truncation_zeroes_patches_that_do_not_fit(manifest, vocab):
    ld = WindowLoader(manifest, vocab, window_tokens=P, batch_size=4, byte_expansion=1)
    b = next(iter(ld))
    assert b["byte_mask"].all()  # P bytes are always fewer than the bytes of P tokens here
    lens, mask = b["patch_lens"], b["patch_mask"]
    assert (~mask).any()
    assert (lens[~mask] == 0).all() and (lens[mask] > 0).all()
    assert (lens.sum(1) <= P).all()
    assert (mask.int().diff(dim=1) <= 0).all()  # once a patch is cut, all later ones are too


def test_nul_bytes_are_data(manifest, vocab):
    # The document split depends on the fixture's temp path, and a window drops its last
    # token (skip_last), so one window size can miss the NUL byte by chance: use several.
    ids = []
    for split in ("train", "validation"):
        for w in (5, 6, 7, 8, 9):
            ld = WindowLoader(manifest, vocab, window_tokens=w, batch_size=1, split=split)
            if ld.n_windows:
                ids.append(ld.make_batch(np.arange(ld.n_windows))["input_ids"].reshape(-1))
    ids = torch.cat(ids)
    assert (ids == OFFSET).any()  # byte 0x00 is id 4, never the pad id


def _check_resume(ld, fresh, skip: int, n: int) -> dict:
    """After `skip` batches of `ld`, `fresh` loaded with ld's state (through JSON, as a checkpoint
    keeps it) gives ld's next `n` batches, which cross into epoch 1; returns the state."""
    it = iter(ld)
    for _ in range(skip):
        next(it)
    state = json.loads(json.dumps(ld.state_dict()))
    following = [next(it) for _ in range(n)]
    fresh.load_state_dict(state)
    again = [b for b, _ in zip(fresh, range(n))]
    for a, b in zip(following, again):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert fresh.state_dict()["epoch"] == 1
    return state


def test_resume_mid_epoch_and_across_epochs(manifest, vocab):
    make = lambda: WindowLoader(manifest, vocab, window_tokens=P, batch_size=2, seed=7)
    ld = make()
    assert len(ld) >= 3
    state = _check_resume(ld, make(), len(ld) - 1, 4)
    with pytest.raises(D.DataError, match="seed/world_size 7/1, this loader 8/1"):
        WindowLoader(manifest, vocab, window_tokens=P, batch_size=2, seed=8).load_state_dict(state)


def test_shuffle_is_seeded_per_epoch(manifest, vocab):
    a = WindowLoader(manifest, vocab, window_tokens=P, batch_size=1, seed=3)
    b = WindowLoader(manifest, vocab, window_tokens=P, batch_size=1, seed=3)
    assert np.array_equal(a._rank_windows(0), b._rank_windows(0))
    assert not np.array_equal(a._rank_windows(0), a._rank_windows(1))
    assert sorted(a._rank_windows(1).tolist()) == list(range(a.n_windows))


def test_ranks_get_disjoint_windows(manifest, vocab):
    loaders = [
        WindowLoader(manifest, vocab, window_tokens=P, batch_size=1, seed=3, rank=r, world_size=3)
        for r in range(3)
    ]
    for epoch in (0, 1):
        parts = [set(ld._rank_windows(epoch).tolist()) for ld in loaders]
        assert len(set.union(*parts)) == sum(map(len, parts)) == 3 * (loaders[0].n_windows // 3)
        assert len({len(p) for p in parts}) == 1  # equal steps on every rank
    firsts = [next(iter(ld))["teacher_ids"] for ld in loaders]
    assert not torch.equal(firsts[0], firsts[1])


def test_validation_iterates_once_in_order(manifest, vocab):
    ld = WindowLoader(manifest, vocab, window_tokens=P, batch_size=4, split="validation")
    batches = list(ld.iter_eval())
    assert sum(b["input_ids"].shape[0] for b in batches) == ld.n_windows > 0
    firsts = torch.cat([b["teacher_ids"][:, 1] for b in batches])
    want = [int(ld.tok[s]) for s in ld.window_starts]
    assert firsts.tolist() == want


def test_bad_loader_inputs(manifest, vocab, tmp_path):
    other = dataclasses.replace(vocab, fingerprint="0" * 64)
    with pytest.raises(
        D.DataError, match=r"manifest.json: prepared with tokenizer \w{12}, loader given 000000000000"
    ):
        WindowLoader(manifest, other, window_tokens=P, batch_size=2)
    with pytest.raises(D.DataError, match=r"fewer than world_size x batch_size = 10000"):
        next(iter(WindowLoader(manifest, vocab, window_tokens=P, batch_size=10_000)))
    with pytest.raises(D.DataError, match=r"unknown split 'test'"):
        WindowLoader(manifest, vocab, window_tokens=P, batch_size=2, split="test")
    # A shard changed after the manifest was written is refused.
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(Path(manifest).parent, copy)
    m = D.read_manifest(str(copy / "manifest.json"))
    shard = copy / m["shards"][0]["uri"]
    shard.write_bytes(shard.read_bytes()[:-10] + b"0" * 10)
    with pytest.raises(D.DataError, match=r"sha256 differs from the manifest"):
        WindowLoader(str(copy / "manifest.json"), vocab, window_tokens=P, batch_size=2)


# ---------------------------------------------------------------- streaming loader


def rank_stream(ld: StreamingWindowLoader, epoch: int, vocab) -> np.ndarray:
    """A rank's packed token stream for one epoch, rebuilt plainly from its shards (the reference)."""
    toks = []
    for i in ld._rank_shards(epoch):
        for r in D.read_shard(ld.shards[i][0]).to_pylist():
            toks += r["token_ids"] + [vocab.doc_separator_id]
    return np.array(toks)


def windows_of(b) -> list[list[int]]:
    return [t[1:] + [n] for t, n in zip(b["teacher_ids"].tolist(), b["teacher_next"].tolist())]


@pytest.fixture(scope="module")
def big_manifest(tmp_path_factory):
    """Several shards per split, so two ranks each get their own."""
    d = tmp_path_factory.mktemp("streaming")
    (d / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in tiny_corpus(200_000)))
    return D.prepare_dataset(
        [str(d / "docs.jsonl")], TINY, str(d / "out"), DataConfig(shard_docs=40, validation_fraction=0.2)
    )


def test_split_texts_reads_only_the_shards_it_needs(big_manifest, tmp_path, monkeypatch):
    """Held-out text for evaluation: the split's documents in shard order, up to max_bytes, each
    shard read once and only while needed, checked against the manifest."""
    from bolmo_core import storage

    m = D.read_manifest(big_manifest)
    val = [e for e in m["shards"] if e["split"] == "validation" and e["rows"]]
    assert len(val) >= 2
    want = [
        bytes(t)
        for e in val
        for t in D.read_shard(str(Path(big_manifest).parent / e["uri"])).column("text_bytes").to_pylist()
    ]
    assert split_texts(big_manifest, "validation", 1 << 40) == want
    assert split_texts(str(Path(big_manifest).parent), "validation", 1 << 40) == want  # the folder

    reads = []
    real = storage.read_bytes
    monkeypatch.setattr(storage, "read_bytes", lambda uri: reads.append(uri) or real(uri))
    first_two = split_texts(big_manifest, "validation", len(want[0]) + 1)
    assert first_two == want[:2]
    assert [u for u in reads if u.endswith(".parquet")] == [str(Path(big_manifest).parent / val[0]["uri"])]
    monkeypatch.undo()

    out = tmp_path / "copy"
    shutil.copytree(Path(big_manifest).parent, out)
    shard = out / val[0]["uri"]
    shard.write_bytes(shard.read_bytes()[:-1] + b"x")
    with pytest.raises(D.DataError, match=rf"^{re.escape(str(shard))}: sha256 differs from the manifest"):
        split_texts(str(out), "validation", 10)


def test_streaming_windows_are_the_rank_stream_block_shuffled(big_manifest, vocab):
    ld = StreamingWindowLoader(big_manifest, vocab, window_tokens=P, batch_size=3, seed=1, shuffle_windows=7)
    ref, sep = rank_stream(ld, 0, vocab), vocab.doc_separator_id
    nw = ld._n_windows(ld._rank_shards(0))
    starts = [w * P + int(ref[w * P] == sep) for w in range(nw)]
    seen = []
    it = iter(ld)
    for j in range(len(ld)):
        b = next(it)
        idx = ld._windows(0, j, nw, {})
        assert windows_of(b) == [ref[starts[w] : starts[w] + P].tolist() for w in idx]
        assert (idx // 7 == np.arange(j * 3, j * 3 + 3) // 7).all()  # shuffled within blocks of 7
        assert b["input_ids"].shape == (3, 6 * P) and (b["teacher_ids"][:, 1] != sep).all()
        seen += idx.tolist()
    # Each window at most once per epoch; only the last block may leave some out.
    assert len(set(seen)) == len(seen) == len(ld) * 3 and max(seen) < nw
    assert set(range(len(seen) // 7 * 7)) <= set(seen)
    assert seen != sorted(seen)
    assert ld.state_dict()["epoch"] == 0 and next(it) is not None and ld.state_dict()["epoch"] == 1


def test_streaming_batch_format_equals_in_memory_for_the_same_windows(manifest, vocab):
    """iter_eval walks the split in order in both loaders: the same windows give the same tensors."""
    mem = WindowLoader(manifest, vocab, window_tokens=P, batch_size=2, split="validation")
    st = StreamingWindowLoader(manifest, vocab, window_tokens=P, batch_size=2, split="validation")
    a, b = list(mem.iter_eval(batch_size=1)), list(st.iter_eval(batch_size=1))
    assert len(b) >= len(a) - 1 > 0  # streaming may leave out the very last window
    for x, y in zip(a, b):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    assert len(list(st.iter_eval(batch_size=1, max_batches=2))) == 2


def test_streaming_ranks_read_only_their_own_shards(big_manifest, vocab, monkeypatch):
    from bolmo_core import loader as loader_mod

    read = []
    real = loader_mod.read_shard_checked
    monkeypatch.setattr(loader_mod, "read_shard_checked", lambda uri, sha: read.append(uri) or real(uri, sha))
    mine = {}
    for r in range(2):
        ld = StreamingWindowLoader(
            big_manifest, vocab, P, 2, seed=5, rank=r, world_size=2, shuffle_windows=4, prefetch=1
        )
        read.clear()
        for _, _b in zip(range(len(ld)), ld):
            pass
        mine[r] = set(read)
        assert mine[r] == {ld.shards[i][0] for i in ld._rank_shards(0)}
        assert ld.stream.max_held <= ld.prefetch + 3  # bounded read-ahead
    assert not mine[0] & mine[1]
    assert len(mine[0] | mine[1]) == sum(
        e["split"] == "train" for e in D.read_manifest(big_manifest)["shards"]
    )


def test_streaming_resume_mid_epoch_and_across_epochs(big_manifest, vocab):
    make = lambda: StreamingWindowLoader(big_manifest, vocab, P, 3, seed=7, shuffle_windows=5)
    ld = make()
    state = _check_resume(ld, make(), len(ld) - 2, 5)
    with pytest.raises(D.DataError, match="loader state is from the streaming loader, this one is memory"):
        WindowLoader(big_manifest, vocab, P, 3, seed=7).load_state_dict(state)


RESUME_RUN = """
import hashlib, json, sys
from bolmo_core.loader import StreamingWindowLoader
from bolmo_core.source import SourceConfig, load_tokenizer
from bolmo_core.subword import get_vocab
vocab = get_vocab(load_tokenizer(SourceConfig("tiny-olmo2")))
out = []
for state in json.loads(sys.argv[2]):
    ld = StreamingWindowLoader(sys.argv[1], vocab, 32, 2, seed=3, rank=state["rank"],
                               world_size=state["world_size"], shuffle_windows=6)
    ld.load_state_dict(state)
    it = iter(ld)
    out.append([hashlib.sha256(b"".join(v.numpy().tobytes() for v in next(it).values())).hexdigest()
                for _ in range(3)])
print(json.dumps(out))
"""


def test_streaming_resume_is_bit_exact_in_fresh_processes(big_manifest, vocab):
    """1 and 2 ranks: a rank's state after 5 batches, restored in a new process, yields the same
    next batches as the uninterrupted loader. Rank 0 of world 2 and rank 0 of world 1 resume in
    one process, rank 1 of world 2 in another, side by side."""
    digest = lambda b: hashlib.sha256(b"".join(v.numpy().tobytes() for v in b.values())).hexdigest()
    states, want = [], []
    for world, rank in ((1, 0), (2, 0), (2, 1)):
        ld = StreamingWindowLoader(
            big_manifest, vocab, 32, 2, seed=3, rank=rank, world_size=world, shuffle_windows=6
        )
        it = iter(ld)
        for _ in range(5):
            next(it)
        states.append(ld.state_dict())
        want.append([digest(next(it)) for _ in range(3)])
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RESUME_RUN, big_manifest, json.dumps(group)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        for group in (states[:2], states[2:])
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e[-2000:] for _, e in outs]
    assert sum((json.loads(o.splitlines()[-1]) for o, _ in outs), []) == want
    assert want[1] != want[2]  # the two ranks got different batches


def test_from_config_picks_the_loader_by_size(big_manifest, vocab, monkeypatch):
    from bolmo_core import loader as loader_mod

    cfg = DataConfig(window_tokens=P)
    assert type(WindowLoader.from_config(cfg, big_manifest, vocab, 2)) is WindowLoader  # small: in memory
    forced = dataclasses.replace(cfg, loader="streaming")
    assert type(WindowLoader.from_config(forced, big_manifest, vocab, 2, rank=1, world_size=2)) is (
        StreamingWindowLoader
    )
    monkeypatch.setattr(loader_mod, "IN_MEMORY_MAX_BYTES", 0)
    assert type(WindowLoader.from_config(cfg, big_manifest, vocab, 2)) is StreamingWindowLoader
    many = len(D.read_manifest(big_manifest)["shards"])
    assert type(WindowLoader.from_config(cfg, big_manifest, vocab, 1, world_size=many)) is WindowLoader
    v = WindowLoader.from_config(cfg, big_manifest, vocab, 2, split="validation")
    assert type(v) is StreamingWindowLoader and next(v.iter_eval(max_batches=1))["input_ids"].shape[0] == 2
    with pytest.raises(D.DataError, match=r"data.loader 'disk': choose one of auto, memory, streaming"):
        WindowLoader.from_config(dataclasses.replace(cfg, loader="disk"), big_manifest, vocab, 2)


def test_streaming_from_s3(s3_server, tmp_path, vocab):
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in tiny_corpus(60_000)))
    cfg = DataConfig(shard_docs=20, validation_fraction=0.2)
    remote = D.prepare_dataset([str(docs)], TINY, f"s3://byteify-test/stream-{tmp_path.name}", cfg)
    local = D.prepare_dataset([str(docs)], TINY, str(tmp_path / "local"), cfg)
    a = StreamingWindowLoader(remote, vocab, P, 2, seed=2, rank=1, world_size=2)
    b = StreamingWindowLoader(local, vocab, P, 2, seed=2, rank=1, world_size=2)
    for x, y, _ in zip(a, b, range(3)):
        assert all(torch.equal(x[k], y[k]) for k in x)


# ---------------------------------------------------------------- the trainer on the streaming loader (slow)


def _train_events(proc, kill_after_checkpoint: bool) -> int | dict:
    """Follow a launched trainer's progress; SIGKILL its process group a step after its first
    checkpoint when asked (returns that step), else wait for it to finish (returns its start event)."""
    import signal

    from bolmo_core.callbacks import parse_progress_line

    ckpt_step, start = None, {}
    for line in proc.stdout:
        e = parse_progress_line(line)
        if not e:
            continue
        start = e if e["event"] == "start" else start
        if e["event"] == "checkpoint" and ckpt_step is None:
            ckpt_step = e["step"]
        if kill_after_checkpoint and ckpt_step is not None and e["event"] == "step" and e["step"] > ckpt_step:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(60)
            return e["step"]
    proc.wait(900)
    assert proc.returncode == 0, proc.stderr.read()[-3000:]
    return start


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_trainer_resume_on_the_streaming_loader_is_bit_exact(tmp_path, nproc):
    """Stage 1 on the streaming loader, SIGKILLed after a checkpoint and resumed, ends with the
    same weights as the same run straight through (1 process, and 2 ranks with torchrun)."""
    from procs import launch
    from safetensors.torch import load_file
    from train_helpers import run_config, write_config

    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in tiny_corpus(60_000)))
    manifest = D.prepare_dataset(
        [str(docs)],
        TINY,
        str(tmp_path / "data"),
        DataConfig(window_tokens=16, shard_docs=8, validation_fraction=0.1),
    )
    over = {"data.loader": "streaming"}
    straight = write_config(tmp_path / "a.json", run_config(manifest, str(tmp_path / "a"), 1, over))
    killed = write_config(tmp_path / "b.json", run_config(manifest, str(tmp_path / "b"), 1, over))
    _train_events(launch(straight, nproc), kill_after_checkpoint=False)
    assert _train_events(launch(killed, nproc), kill_after_checkpoint=True) < 6
    assert not (tmp_path / "b" / "final").exists()
    start = _train_events(launch(killed, nproc), kill_after_checkpoint=False)
    assert start["info"]["resumed_from"] and start["step"] >= 2  # resumed mid-run, loader position restored
    a = load_file(str(tmp_path / "a" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    state = torch.load(str(tmp_path / "b" / "final" / "rank-00000.pt"), weights_only=True)
    assert state["loader"]["loader"] == "streaming"
