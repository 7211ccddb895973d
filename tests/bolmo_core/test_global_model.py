"""Global-model adapter: alignment with the source's own forward (docs/architecture.md Appendix A check 4), cache, counts."""

import pytest
import torch
from bolmo_batches import text_batch

from bolmo_core.byte_tokenizer import BOS, OFFSET
from bolmo_core.config import get_preset
from bolmo_core.global_model import GlobalModel, GlobalModelError, build_source_skeleton
from bolmo_core.model import BolmoModel
from bolmo_core.pooling import boundaries_from_patch_lens, patch_ids, pool
from bolmo_core.source import SourceConfig, load_source_model, load_tokenizer, tiny_corpus
from bolmo_core.subword import SubwordVocab


def _docs(n_rows: int) -> list[list[str]]:
    texts = tiny_corpus(60_000)
    return [[texts[2 * r][:100], texts[2 * r + 1]] for r in range(n_rows)]  # a separator inside each window


def check_alignment(name):
    """Teacher embeddings pooled from bytes through the global blocks == the source's hidden states."""
    src = SourceConfig(name)
    tok = load_tokenizer(src)
    vocab = SubwordVocab.from_tokenizer(tok)
    P = 48
    batch = text_batch(tok, vocab, _docs(2), P)
    lm = load_source_model(src)
    with torch.no_grad():
        ref = lm(input_ids=batch["teacher_ids"], output_hidden_states=True)
    cfg = get_preset("tiny").model
    cfg.source = src
    model = BolmoModel.from_source(cfg, source_model=lm, init=False, vocab=vocab)

    ids, pl, tids = batch["input_ids"], batch["patch_lens"], batch["teacher_ids"]
    L = ids.shape[1]
    b = boundaries_from_patch_lens(pl, L) & batch["byte_mask"]
    # BOS <-> separator and skip_last: patch k's bytes spell teacher token k, the separator is byte 1
    assert (tids[:, 0] == vocab.doc_separator_id).all() and (ids[:, 0] == BOS).all()
    assert (tids == vocab.doc_separator_id)[:, 1:].any(), "the test windows should contain a separator"
    starts = pl.cumsum(1) - pl
    for r in range(ids.shape[0]):
        for k in range(1, P):
            if not batch["patch_mask"][r, k]:
                continue
            got = ids[r, starts[r, k] : starts[r, k] + pl[r, k]].tolist()
            want = (
                [BOS]
                if tids[r, k] == vocab.doc_separator_id
                else [x + OFFSET for x in vocab.token_bytes[tids[r, k]]]
            )
            assert got == want
    assert batch["teacher_next"].tolist() == [lm_ids[P - 1] for lm_ids in _token_rows(tok, vocab, _docs(2))]

    with torch.no_grad():
        # every byte carries its token's teacher embedding; pooling must pick patch k's at slot k
        emb = model.teacher.embed(tids)
        pid = patch_ids(b).clamp(max=P - 1)
        per_byte = emb.gather(1, pid.unsqueeze(-1).expand(-1, -1, emb.shape[-1]))
        reps, patch_mask, overflow, _ = pool(per_byte, b, P)
        assert not overflow.any() and torch.equal(patch_mask, batch["patch_mask"])
        out = model.global_model(reps, output_hidden_states=True)
        logits = model.teacher.logits(out.hidden)
    m = patch_mask
    n = model.global_model.n_layers
    for i in range(n):  # ref.hidden_states[i] = input of block i
        torch.testing.assert_close(out.hidden_states[i][m], ref.hidden_states[i][m], rtol=1e-4, atol=1e-4)
    # HF's last entry is after the final norm; ours is the raw residual stream
    torch.testing.assert_close(
        model.teacher.norm(out.hidden)[m], ref.hidden_states[n][m], rtol=1e-4, atol=1e-4
    )
    torch.testing.assert_close(logits[m], ref.logits[m], rtol=1e-4, atol=1e-3)


def test_alignment_tiny_olmo2():
    check_alignment("tiny-olmo2")


def _token_rows(tok, vocab, docs):
    rows = []
    for row in docs:
        ids = []
        for i, text in enumerate(row):
            if i:
                ids.append(vocab.doc_separator_id)
            ids.extend(tok.encode(text, add_special_tokens=False))
        rows.append(ids)
    return rows


@pytest.fixture(scope="module")
def tiny_global():
    lm = load_source_model(SourceConfig("tiny-olmo2"))
    gm, teacher = GlobalModel.split_source(lm)
    return gm, teacher


def test_partial_run_equals_hidden_state(tiny_global):
    gm, _ = tiny_global
    x = torch.randn(2, 10, gm.d_model)
    with torch.no_grad():
        full = gm(x, output_hidden_states=True)
        part = gm(x, n_layers=4)
    torch.testing.assert_close(part.hidden, full.hidden_states[4])
    assert gm.model.config.num_hidden_layers == 6  # restored after the partial run
    with pytest.raises(GlobalModelError, match="n_layers"):
        gm(x, n_layers=7)


def test_kv_cache_incremental_equals_full(tiny_global):
    gm, _ = tiny_global
    x = torch.randn(2, 9, gm.d_model)
    with torch.no_grad():
        full = gm(x).hidden
        cache = gm.new_cache()
        a = gm(x[:, :5], cache=cache, use_cache=True)
        steps = [a.hidden]
        for t in range(5, 9):
            steps.append(gm(x[:, t : t + 1], cache=a.cache, use_cache=True).hidden)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)


def test_tied_lm_head_kept_single():
    """SmolLM2 ties its LM head to the input embedding: the teacher keeps one tensor."""
    lm = build_source_skeleton(SourceConfig("smollm2-135m"))
    _, teacher = GlobalModel.split_source(lm)
    assert teacher.lm_head is None


def test_unknown_offline_source_is_a_clear_error():
    from bolmo_core.source import SourceError

    with pytest.raises(SourceError, match="no-such-org/no-such-model"):
        build_source_skeleton(SourceConfig("no-such-org/no-such-model"))


def test_split_source_rejects_unknown_layout():
    with pytest.raises(GlobalModelError, match="model.model"):
        GlobalModel.split_source(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("preset,expected", [("olmo2-1b", 1.47e9), ("olmo3-7b", 7.63e9)])
def test_parameter_counts(preset, expected):
    """Released presets on the meta device from KNOWN_ARCHITECTURES (no hub): within 2 % of docs/architecture.md §6."""
    cfg = get_preset(preset).model
    with torch.device("meta"):
        lm = build_source_skeleton(cfg.source)
        model = BolmoModel.from_source(cfg, source_model=lm, init=False)
    n = model.num_params()
    print(f"{preset}: {n:,} parameters (the paper: {expected:,.0f})")
    assert abs(n - expected) / expected < 0.02
    if preset == "olmo3-7b":
        types = model.global_model.config.layer_types
        assert types.count("full_attention") == 8 and types[3] == types[-1] == "full_attention"
