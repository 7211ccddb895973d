"""Cached batched generation (spec §4.4, §11; Appendix A checks 7 and 8) on the tiny preset."""

import pytest
import torch

from bolmo_core.byte_tokenizer import EOS, FUSED_OFFSET
from bolmo_core.config import get_preset
from bolmo_core.generate import GenerationError, generate, generate_ids, retained_index, stream, utf8_chunks
from bolmo_core.model import BolmoModel

PROMPTS = [b"Hello world, this is", b"ab", b"", "Caf\u00e9 au lait, un peu plus long encore".encode()]


@pytest.fixture(scope="module")
def model():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread avoids OpenMP contention on a shared box
    torch.manual_seed(0)
    m = BolmoModel.from_source(get_preset("tiny").model).eval()
    with torch.no_grad():  # open the input gates so the mLSTM states actually matter
        for blk in [*m.local_encoder.blocks, *m.local_decoder.blocks]:
            blk.mlstm.i_gate.bias.fill_(0.0)
    yield m
    torch.set_num_threads(threads)


def test_cache_consistency_matches_full_forward(model):
    """Check 7: every incremental decoder output equals a full forward with the same boundaries."""
    out = generate_ids(model, PROMPTS, max_new_bytes=24, stop_on_eos=False, trace=True)
    index = retained_index(model)
    for r, p in enumerate(PROMPTS):
        seq = torch.tensor([[1, *(c + 4 for c in p), *(v % FUSED_OFFSET for v in out.fused_ids[r])]])
        b = out.boundaries[r][None]
        assert b.shape == seq.shape and bool(b[0, 0])
        assert len(out.sequences[r]) == 24
        with torch.no_grad():
            full = model(seq, index.expand(seq), boundary_mask=b).logits[0, :-1].float()
        assert out.logits[r].shape == full.shape
        torch.testing.assert_close(out.logits[r], full, atol=1e-4, rtol=1e-4)
        assert out.n_patches[r] == int(b[0].sum())  # one global position per closed patch


def test_batch_invariance_greedy(model):
    """Check 8: a batch of prompts of different lengths generates exactly what each does alone."""
    batch = generate_ids(model, PROMPTS, max_new_bytes=32, stop_on_eos=False)
    for sync in (0.0, 1.0):  # scheduling of global steps never changes results
        assert (
            generate_ids(model, PROMPTS, max_new_bytes=32, stop_on_eos=False, sync=sync).fused_ids
            == batch.fused_ids
        )
    for r, p in enumerate(PROMPTS):
        alone = generate_ids(model, [p], max_new_bytes=32, stop_on_eos=False)
        assert alone.fused_ids[0] == batch.fused_ids[r]
    # rows really closed patches at different times (otherwise the test would be trivial)
    flags = [[v >= FUSED_OFFSET for v in ids] for ids in batch.fused_ids]
    assert len({tuple(f) for f in flags}) > 1 and any(any(f) for f in flags)


def test_stream_never_splits_a_character(model):
    text = "h\u00e9llo \u20ac \U0001f600 end"
    chunks = list(utf8_chunks(bytes([c]) for c in text.encode()))
    assert "".join(chunks) == text and "\ufffd" not in "".join(chunks)
    assert "\U0001f600" in chunks  # the 4-byte emoji comes out whole, once its last byte arrived
    got = "".join(stream(model, "Caf\u00e9", max_new_bytes=40, stop_on_eos=False))
    want = generate(model, ["Caf\u00e9"], max_new_bytes=40, stop_on_eos=False)[0]
    assert got == want.decode("utf-8", errors="replace")


def test_sampling_options(model):
    kw = dict(max_new_bytes=20, stop_on_eos=False)
    greedy = generate(model, PROMPTS[:2], **kw)
    assert generate(model, PROMPTS[:2], temperature=0.7, top_k=1, seed=3, **kw) == greedy
    a = generate(model, PROMPTS[:2], temperature=1.5, top_p=0.95, seed=7, **kw)
    assert a == generate(model, PROMPTS[:2], temperature=1.5, top_p=0.95, seed=7, **kw)
    assert a != greedy and all(len(x) == 20 for x in a)


def test_eos_and_budget(model):
    hook = model.lm_head.register_forward_hook(
        lambda m, i, o: o.index_add(-1, torch.tensor([EOS]), torch.full((*o.shape[:-1], 1), 50.0))
    )
    try:
        out = generate_ids(model, PROMPTS[:2], max_new_bytes=10)
        assert out.sequences == [b"", b""] and out.stop_reasons == ["eos", "eos"]
        assert all(ids[-1] % FUSED_OFFSET == EOS for ids in out.fused_ids)
        out = generate_ids(model, PROMPTS[:2], max_new_bytes=10, stop_on_eos=False)
        assert [len(s) for s in out.sequences] == [10, 10] and out.stop_reasons == ["length", "length"]
    finally:
        hook.remove()
    assert generate(model, PROMPTS[:1], max_new_bytes=0) == [b""]


def test_bad_input(model):
    with pytest.raises(GenerationError, match="temperature"):
        generate(model, [b"x"], temperature=-1.0)
    with pytest.raises(GenerationError, match="top_p"):
        generate(model, [b"x"], temperature=1.0, top_p=0.0)
    with pytest.raises(GenerationError, match="prompts"):
        generate(model, [])
    with pytest.raises(GenerationError, match="prompt"):
        generate(model, [123])
