"""Byte-level teacher targets (bolmo_core/byte_targets.py) against brute-force enumeration of the vocabulary.

The brute force reads the rules straight off the module docstring: for byte j of a token with
prefix u, sum p over every non-special entry that starts with u and is longer than j, grouped by
(byte j, ends after it), plus the separator's mass on BOS+260 at j = 0, then renormalise.
"""

import math

import pytest
import torch
from bolmo_batches import brute_targets, text_batch

from bolmo_core import byte_targets as BT
from bolmo_core.byte_tokenizer import OFFSET
from bolmo_core.source import SourceConfig, load_source_model, load_tokenizer, tiny_corpus
from bolmo_core.subword import SubwordVocab


def _check(vocab, table, logits, tokens, n_check=None):
    out = BT.teacher_pass(table, logits, tokens)
    lg64 = logits.double()
    logz = lg64.logsumexp(-1)
    p = (lg64 - logz[:, None]).exp()
    assert torch.allclose(out.logz.double(), logz, atol=1e-5)
    ws = vocab.whitespace_start_mask[: logits.shape[1]]
    assert torch.allclose(out.ws_logp.double(), lg64[:, ws].logsumexp(-1) - logz, atol=1e-5)
    # every byte of every token with targets, in order, once
    want_rows = [
        (r, j) for r, t in enumerate(tokens.tolist()) if t >= 0 for j in range(len(vocab.token_bytes[t]))
    ]
    assert list(zip(out.row.tolist(), out.j.tolist())) == want_rows
    picks = (
        range(len(want_rows)) if n_check is None else torch.linspace(0, len(want_rows) - 1, n_check).long()
    )
    worst = 0.0
    for i in map(int, picks):
        r, j = want_rows[i]
        q, z = brute_targets(vocab, p[r], int(tokens[r]), j)
        worst = max(worst, float((out.probs[i].double() - q).abs().max()))
        assert float(out.mass[i]) == pytest.approx(z, rel=1e-5)
        assert float(out.probs[i].sum()) == pytest.approx(1.0, abs=1e-5)
    assert worst < 1e-6
    _check.worst = worst
    return out


@pytest.fixture(scope="module")
def tiny_vocab():
    return SubwordVocab.from_tokenizer(load_tokenizer(SourceConfig("tiny-olmo2")))


@pytest.fixture(scope="module")
def smollm2():
    src = SourceConfig("smollm2-135m")
    tok = load_tokenizer(src)
    return tok, SubwordVocab.from_tokenizer(tok), load_source_model(src)


def test_small_vocabulary_matches_brute_force(tiny_vocab):
    """Every target of 40 tokens (short, long, prefixes of each other) under wide random logits."""
    vocab = tiny_vocab
    table = BT.build_table(vocab)
    spelled = [i for i in range(vocab.vocab_size) if i not in vocab.special_ids]
    assert table.n_sorted == len(spelled) == vocab.vocab_size - len(vocab.special_ids)
    g = torch.Generator().manual_seed(0)
    longest = max(spelled, key=lambda i: len(vocab.token_bytes[i]))
    tokens = [spelled[int(i)] for i in torch.randint(len(spelled), (37,), generator=g)] + [longest, -1, -1]
    # a token that is a prefix of another one (both present): "the"-like pairs
    pref = next(
        i
        for i in spelled
        if any(vocab.token_bytes[k].startswith(vocab.token_bytes[i]) and k != i for k in spelled)
        and len(vocab.token_bytes[i]) > 1
    )
    tokens[0] = pref
    logits = torch.randn(len(tokens), vocab.vocab_size, generator=g) * 4
    out = _check(vocab, table, logits, torch.tensor(tokens))
    assert not (out.row >= 38).any()  # rows without a token get no targets


def test_smollm2_teacher_targets_match_brute_force(smollm2):
    """Real SmolLM2 teacher logits on real text (a slice of 32 positions, every one of the 49,152 ids)."""
    tok, vocab, model = smollm2
    table = BT.table_for(vocab)
    assert BT.table_for(vocab) is table  # built once per vocabulary
    assert table.n_sorted == 49_135  # 49,152 ids less the 17 specials
    # one node per distinct prefix (the root is the empty one)
    prefixes = {
        b[:k]
        for i, b in enumerate(vocab.token_bytes)
        if i not in vocab.special_ids
        for k in range(len(b) + 1)
    }
    assert table.edge_ptr.numel() - 1 == len(prefixes)
    text = tiny_corpus(3_000)[0]
    ids = [vocab.doc_separator_id] + tok.encode(text, add_special_tokens=False)[:32]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].float()
    tokens = torch.tensor(ids[1:])
    _check(vocab, table, logits, tokens, n_check=24)


def test_separator_mass_and_patch_rules(smollm2):
    """The separator's mass lands on BOS+260 at j = 0 only; patches of specials or of other bytes get none."""
    tok, vocab, _ = smollm2
    table = BT.table_for(vocab)
    sep = vocab.doc_separator_id
    long_texts = [t for t in tiny_corpus(40_000) if len(t) > 400]
    batch = text_batch(tok, vocab, [[long_texts[0][:80], long_texts[1]], [long_texts[2]]], 32)
    tokens = BT.patch_tokens(table, batch)
    teacher = batch["teacher_ids"]
    nxt = torch.nn.functional.pad(teacher[:, 1:], (0, 1), value=-1)
    has_sep = (nxt == sep).any()
    assert has_sep and (tokens[nxt == sep] == -1).all()  # the separator's patch: no targets
    assert (tokens[:, -1] == -1).all()  # teacher_next: its bytes are not in the window
    normal = (nxt != sep) & (nxt >= 0)
    assert torch.equal(tokens[normal], nxt[normal])
    # a patch whose bytes are not its token's spelling (as for a byte-fallback id) gets none
    bad = dict(batch)
    bad["input_ids"] = batch["input_ids"].clone()
    start = int(batch["patch_lens"][1, :5].sum())  # first byte of patch 5 (= teacher position 4's token)
    bad["input_ids"][1, start] = (bad["input_ids"][1, start] - OFFSET + 1) % 256 + OFFSET
    assert BT.patch_tokens(table, bad)[1, 4] == -1 and BT.patch_tokens(table, batch)[1, 4] >= 0

    logits = torch.randn(3, len(vocab.token_bytes))
    logits[:, sep] = 3.0
    word = tok.encode(" hello", add_special_tokens=False)
    assert len(word) == 1
    out = BT.teacher_pass(table, logits, torch.tensor([word[0], -1, word[0]]))
    p_sep = torch.softmax(logits.double(), -1)[:, sep]
    at0 = out.j == 0
    assert torch.allclose(out.probs[at0, 1 + 260].double() * out.mass[at0], p_sep[[0, 2]], rtol=1e-5)
    assert (out.probs[~at0, 1 + 260] == 0).all() and (out.probs[:, :OFFSET].sum() == 0)


def test_precision_floor_is_rare_on_real_text(smollm2):
    """Prefix masses under MIN_PREFIX_MASS (targets dropped) on real text: counted, and rare."""
    tok, vocab, model = smollm2
    text = " ".join(tiny_corpus(20_000))[:6000]
    ids = [vocab.doc_separator_id] + tok.encode(text, add_special_tokens=False)[:400]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].float()
    out = BT.teacher_pass(BT.table_for(vocab), logits, torch.tensor(ids[1:]))
    low = float((out.mass < BT.MIN_PREFIX_MASS).float().mean())
    assert out.row.numel() > 1000 and low < 0.005
    assert math.isfinite(float(out.probs.sum()))
