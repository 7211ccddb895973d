"""Cached batched generation (docs/architecture.md §4.4, §11; Appendix A checks 7 and 8) on the tiny preset."""

import copy

import pytest
import torch
from tiny_olmo3 import WINDOW, tiny_olmo3_bolmo

from bolmo_core import generate as generate_mod
from bolmo_core.byte_tokenizer import BOS, EOS, FUSED_OFFSET, OFFSET
from bolmo_core.config import get_preset
from bolmo_core.generate import (
    GenerationConfig,
    GenerationError,
    _Engine,
    _row_window_masks,
    _which,
    generate,
    generate_ids,
    retained_index,
    stream,
    utf8_chunks,
)
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


# ---------------------------------------------------------------- the engine's steps, one at a time


def _full(model, prompt: bytes, st, r: int):
    """Full forward of row r's bytes so far ([BOS] + prompt + chosen bytes) with the boundaries the
    engine recorded: (encoder output (L, d), decoder-side patch values (P, d), logits (L, 520))."""
    seq = torch.tensor([[BOS, *(c + OFFSET for c in prompt), *(v % FUSED_OFFSET for v in st.out_ids[r])]])
    b = torch.tensor([st.flags[r]])
    exp = retained_index(model).expand(seq)
    with torch.no_grad():
        out = model(seq, exp, boundary_mask=b)
        h = model.encode(seq, exp)[0]
        values = model.local_decoder.project_global(out.global_hidden)
    return h[0], values[0], out.logits[0].float()


def _close(a, b):
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_engine_steps_each_match_a_full_forward(model):
    """prefill, choose_first, encoder_step, global_step (rows apart, with masked slots),
    decoder_step and choose, each checked against a full forward of the same bytes."""
    prompts = [b"Hello world, this is", b"", b"ab"]
    cfg = GenerationConfig(max_new_bytes=8, boundary_bias=50.0)  # every chosen byte closes its patch
    with torch.inference_mode():
        eng = _Engine(model, cfg, trace=False)
        st, logits = eng.prefill(prompts)
        for r, p in enumerate(prompts):  # the prompt minus its last byte, with predicted boundaries
            seq = torch.tensor([[BOS, *(c + OFFSET for c in p)]])
            out = model(seq, retained_index(model).expand(seq))
            n = max(len(p), 1)
            assert st.flags[r] == out.boundary_mask[0, :n].tolist()
            assert int(st.n_patches[r]) == sum(st.flags[r]) == int(st.attn[r].sum())
            _close(logits[r], out.logits[0, n - 1].float())
            assert int(st.pend_x[r]) == int(seq[0, -1]) and bool(st.need_enc[r]) == (not p)

        events = eng.choose_first(st, logits)
        assert [r for r, _ in events] == [1]  # only the empty prompt emits; the others decided a flag
        assert st.pend_b.tolist() == [True, True, True]
        assert [int(st.pend_x[r]) for r in (0, 2)] == [prompts[0][-1] + OFFSET, prompts[2][-1] + OFFSET]

        before_h, before_c = st.h_cur.clone(), [s[0].clone() for s in st.enc_state]
        eng.encoder_step(st, _which(st.active & st.need_enc))  # row 1 only
        for r in (0, 2):  # rows that did not step are untouched, state included
            assert torch.equal(st.h_cur[r], before_h[r])
            assert all(torch.equal(c[r], c0[r]) for c, c0 in zip((s[0] for s in st.enc_state), before_c))
        for r, p in enumerate(prompts):
            _close(st.h_cur[r], _full(model, p, st, r)[0][-1])

        for waiting in ([True, False, True], [False, True, False]):  # row 1's position skips a slot
            st.waiting = torch.tensor(waiting)
            kept, n0 = st.last_value.clone(), st.n_patches.clone()
            eng.global_step(st)
            assert st.attn[:, -1].tolist() == [int(w) for w in waiting]
            assert (st.n_patches - n0).tolist() == [int(w) for w in waiting]
            for r, p in enumerate(prompts):
                if waiting[r]:
                    _close(st.last_value[r], _full(model, p, st, r)[1][-1])
                else:
                    assert torch.equal(st.last_value[r], kept[r])

        logits = eng.decoder_step(st, None)
        for r, p in enumerate(prompts):
            _close(logits[r], _full(model, p, st, r)[2][-1])
        events = eng.choose(st, None, logits)
        assert [r for r, _ in events] == [0, 1, 2] and all(v >= FUSED_OFFSET for _, v in events)
        assert st.pend_x.tolist() == [v % FUSED_OFFSET for _, v in events]
        assert all(len(st.flags[r]) == len(p) + 1 + len(st.out_ids[r]) for r, p in enumerate(prompts))


def test_global_due_follows_sync(model):
    with torch.inference_mode():
        st, _ = _Engine(model, GenerationConfig(), trace=False).prefill([b"ab", b"cd", b"ef"])
    st.waiting = torch.tensor([True, False, True])
    some_ready, none_ready = torch.tensor([False, True, False]), torch.zeros(3, dtype=torch.bool)
    full_sync = _Engine(model, GenerationConfig(sync=1.0), trace=False)
    assert not full_sync.global_due(st, some_ready)  # row 1 can still advance
    assert full_sync.global_due(st, none_ready)  # nothing else can happen
    assert _Engine(model, GenerationConfig(sync=0.5), trace=False).global_due(st, some_ready)  # 2 >= 1.5
    st.waiting = torch.zeros(3, dtype=torch.bool)
    assert not full_sync.global_due(st, none_ready)


# ---------------------------------------------------------------- sliding-window sources (Olmo 3)


@pytest.fixture(scope="module")
def olmo3(model):  # `model` sets one thread for the module
    return tiny_olmo3_bolmo()


def test_row_window_masks_count_each_rows_positions(olmo3):
    """Row 1 has masked slots 1 and 3: its window (2) spans its own positions 0, 1, 2, not slots."""
    from transformers.masking_utils import create_sliding_window_causal_mask

    cfg = olmo3.global_model.config
    attn = torch.tensor([[1, 1, 1, 1, 1], [1, 0, 1, 0, 1]])
    x = torch.zeros(2, 5, cfg.hidden_size)
    pos = torch.arange(5).expand(2, 5)
    cfg_w2 = copy.deepcopy(cfg)
    cfg_w2.sliding_window = 2
    masks = _row_window_masks(cfg_w2, x, attn, None, pos, window=2)
    sliding, full = masks["sliding_attention"][:, 0], masks["full_attention"][:, 0]
    # a row without masked slots gets exactly transformers' own sliding-window mask
    own = create_sliding_window_causal_mask(
        cfg_w2, x[:1], attn[:1], None, pos[:1], allow_is_causal_skip=False
    )
    assert torch.equal(sliding[0], own[0, 0])
    want = [
        [1, 0, 0, 0, 0],
        [1, 0, 0, 0, 0],  # a masked slot's query repeats position 0: it still sees the row's patch
        [1, 0, 1, 0, 0],
        [1, 0, 1, 0, 0],
        [0, 0, 1, 0, 1],  # position 2 sees positions 1 and 2 (slots 2 and 4), not slot 0
    ]
    assert sliding[1].int().tolist() == want
    assert full[1, 4].int().tolist() == [1, 0, 1, 0, 1]


def test_sliding_window_batch_matches_rows_alone(olmo3, monkeypatch):
    """Check 8 on a source with sliding-window layers: rows of different prompt lengths and patch
    counts, generating well past the window, give in a batch exactly what each gives alone."""
    kw = dict(max_new_bytes=40, stop_on_eos=False)
    batch = generate_ids(olmo3, PROMPTS, **kw)
    assert len(set(batch.n_patches)) > 1 and min(batch.n_patches) > 2 * WINDOW  # crossed the window
    assert generate_ids(olmo3, PROMPTS, sync=0.0, **kw).fused_ids == batch.fused_ids
    alone = [generate_ids(olmo3, [p], **kw) for p in PROMPTS]
    assert [a.fused_ids[0] for a in alone] == batch.fused_ids
    assert [a.n_patches[0] for a in alone] == batch.n_patches
    # without the per-row window (slots counted instead of positions) rows would change in a batch
    monkeypatch.setattr(generate_mod, "_sliding_window", lambda config: None)
    assert generate_ids(olmo3, PROMPTS, **kw).fused_ids != batch.fused_ids


def test_sliding_window_cache_consistency(olmo3):
    """Check 7 on the sliding-window source, batched: every decoder output equals a full forward."""
    out = generate_ids(olmo3, PROMPTS, max_new_bytes=32, stop_on_eos=False, trace=True)
    index = retained_index(olmo3)
    for r, p in enumerate(PROMPTS):
        seq = torch.tensor([[1, *(c + 4 for c in p), *(v % FUSED_OFFSET for v in out.fused_ids[r])]])
        with torch.no_grad():
            full = olmo3(seq, index.expand(seq), boundary_mask=out.boundaries[r][None]).logits[0, :-1]
        torch.testing.assert_close(out.logits[r], full.float(), atol=1e-4, rtol=1e-4)
    assert max(out.n_patches) > 2 * WINDOW
