"""Evaluator: source bpb against an independent computation (SmolLM2), byte-model metrics (tiny preset)."""

import json
import math

import pytest
import torch

from bolmo_core import evaluate as E
from bolmo_core.config import get_preset
from bolmo_core.model import BolmoModel
from bolmo_core.source import SourceConfig, load_source_model, load_tokenizer, tiny_corpus
from bolmo_core.subword import get_vocab


def _wiki_text(n_bytes: int) -> bytes:
    text = "\n\n".join(tiny_corpus(40_000)).encode("utf-8")[:n_bytes]
    while text[-1] & 0xC0 == 0x80 or text[-1] >= 0xC0:  # end on a whole character
        text = text[:-1]
    return text


# ---------------------------------------------------------------- source model, real weights


def test_source_bpb_matches_independent_computation():
    """Done-when item: evaluator bpb == Σ -log2 p(token) / bytes computed straight from transformers."""
    src = SourceConfig("smollm2-135m")
    tok, model = load_tokenizer(src), load_source_model(src)
    text = _wiki_text(3000)

    report = E.evaluate(
        [text], tok, source_model=model, cfg=E.EvalConfig(window_bytes=1 << 20, cute_tasks=())
    )
    ours = report["source"]["bits_per_byte"]

    # Independent: plain tokenizer call, separator first, one forward, log_softmax, gather, sum.
    sep = tok.convert_tokens_to_ids("<|endoftext|>")
    ids = torch.tensor([[sep] + tok(text.decode("utf-8"), add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        logp = model(ids).logits.log_softmax(-1)
    nll_nats = -logp[0, :-1].gather(-1, ids[0, 1:, None]).sum()
    independent = float(nll_nats) / math.log(2) / len(text)

    assert report["source"]["tokens"] == ids.shape[1] - 1
    assert ours == pytest.approx(independent, rel=1e-4)
    assert 0.5 < ours < 1.3  # offline_data.md measured 0.87 on similar text


# ---------------------------------------------------------------- windows


@pytest.fixture(scope="module")
def tiny():
    preset = get_preset("tiny")
    torch.manual_seed(0)
    model = BolmoModel.from_source(preset.model).eval()
    return preset, model, load_tokenizer(preset.model.source)


def test_windows_cover_the_text_at_token_ends(tiny):
    _, _, tok = tiny
    text = _wiki_text(2500)
    wins = E.make_windows(tok, [text, b"short doc"], 300)
    assert b"".join(w.data for w in wins if w.doc == 0) == text
    assert all(len(w.data) <= 300 and int(w.token_ends[-1]) == len(w.data) for w in wins)
    assert len([w for w in wins if w.doc == 0]) >= math.ceil(len(text) / 300)
    assert wins[-1].data == b"short doc" and wins[-1].start == 0
    with pytest.raises(E.EvalError, match="longer than window_bytes=2"):
        E.make_windows(tok, [text], 2)
    with pytest.raises(E.EvalError, match="empty"):
        E.make_windows(tok, [b""], 300)


def test_windowed_source_bpb_sums_per_window(tiny):
    """Windows are scored independently: the total equals the sum of one-window evaluations."""
    preset, _, tok = tiny
    src = load_source_model(preset.model.source)
    vocab = get_vocab(tok)
    wins = E.make_windows(tok, [_wiki_text(1500)], 200)
    total = E.source_bits(src, vocab, wins, batch_size=3)
    each = sum(E.source_bits(src, vocab, [w])["bits"] for w in wins)
    assert total["bits"] == pytest.approx(each, rel=1e-5)
    assert total["bytes"] == 1500 - (1500 - sum(len(w.data) for w in wins))


# ---------------------------------------------------------------- byte model (tiny preset)


def test_byte_bpb_folds_fused_probabilities(tiny):
    """A head that gives every fused id the same logit: p(byte) = 2/520, so bpb = log2(260) exactly."""
    preset, model, tok = tiny
    vocab = get_vocab(tok)
    wins = E.make_windows(tok, [_wiki_text(300)], preset.data.byte_slots - 1)
    saved = model.lm_head.out.weight.detach().clone()
    try:
        with torch.no_grad():
            model.lm_head.out.weight.zero_()
        stats = E.byte_model_stats(model, vocab, wins)
    finally:
        with torch.no_grad():
            model.lm_head.out.weight.copy_(saved)
    assert stats["bits_per_byte"] == pytest.approx(math.log2(260), rel=1e-6)


def test_byte_bpb_independent_and_batch_invariant(tiny):
    preset, model, tok = tiny
    vocab = get_vocab(tok)
    wins = E.make_windows(tok, [_wiki_text(400), b"A second, shorter document."], 150)
    batched = E.byte_model_stats(model, vocab, wins, batch_size=4)
    single = E.byte_model_stats(model, vocab, wins, batch_size=1)
    for key in ("bits", "bits_lookahead"):
        assert batched[key] == pytest.approx(single[key], rel=1e-5)
    assert batched["patches"] == single["patches"] and batched["patches_causal"] == single["patches_causal"]

    # Independent look-ahead figure: per window, a forward with predicted boundaries, p summed over the flag.
    from bolmo_core.subword import RetainedIndex

    retained, bits = RetainedIndex(vocab), 0.0
    for w in wins:
        ids = torch.tensor([[1] + [b + 4 for b in w.data]])
        exp = torch.as_tensor(retained.expand(ids.numpy())).long()
        exp[0, 0] = vocab.doc_separator_id
        with torch.no_grad():
            p = model(ids, exp).logits.float().softmax(-1)[0]
        p_byte = p[:-1, :260] + p[:-1, 260:]
        bits -= float(torch.log2(p_byte.gather(-1, ids[0, 1:, None])).double().sum())
    assert batched["bits_lookahead"] == pytest.approx(bits, rel=1e-4)
    assert batched["bytes"] == sum(len(w.data) for w in wins)


def _byte_by_byte(model, ids: torch.Tensor, exp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Slow reference of causal scoring, one row: for t = 0, 1, ...: a forward over bytes 0..t with the
    flags decided so far, then byte t+1's flag = flagged vs unflagged logit of the true byte at t."""
    b, logp = [True], []
    for t in range(len(ids) - 1):
        with torch.no_grad():
            out = model(ids[None, : t + 1], exp[None, : t + 1], boundary_mask=torch.tensor([b]))
        lg = out.logits[0, t].float()
        x = int(ids[t + 1])
        b.append(bool(lg[x + 260] > lg[x]))
        lp = lg.log_softmax(-1)
        logp.append(float(torch.logaddexp(lp[x], lp[x + 260])))
    return torch.tensor(b), torch.tensor(logp, dtype=torch.float64)


def test_causal_scores_equal_byte_by_byte_decoding(tiny):
    """The fixed-point iteration == a forward per byte with the flags decided so far (random-ish flags:
    an untrained head flags ~half the bytes, so many passes are needed and checked)."""
    _, model, tok = tiny
    vocab = get_vocab(tok)
    wins = E.make_windows(tok, [_wiki_text(300), b"Short one."], 120)
    ids, exp = E.byte_batch(wins, E.RetainedIndex(vocab), vocab)
    sc = E.score_bytes(model, ids, exp, ids != 0)
    assert sc.passes > 2
    ref_bits = 0.0
    for r, w in enumerate(wins):
        n = len(w.data) + 1
        b_ref, lp_ref = _byte_by_byte(model, ids[r, :n], exp[r, :n])
        assert torch.equal(sc.boundary[r, :n], b_ref) and not sc.boundary[r, n:].any()
        assert 0.2 < b_ref.float().mean() < 0.8
        assert torch.allclose(sc.logp[r, : n - 1].double(), lp_ref, atol=1e-4)
        assert not sc.logp[r, n - 1 :].any()
        ref_bits -= float(lp_ref.sum()) / math.log(2)
    stats = E.byte_model_stats(model, vocab, wins)
    assert stats["bits"] == pytest.approx(ref_bits, rel=1e-5)
    assert stats["bits"] != stats["bits_lookahead"] and stats["causal_passes"] == sc.passes
    # full=True: every row's whole folded distribution on its final boundaries, same numbers
    whole = E.score_bytes(model, ids, exp, ids != 0, full=True)
    assert torch.equal(whole.logp, sc.logp) and torch.equal(whole.boundary, sc.boundary)
    nxt = torch.nn.functional.pad(ids[:, 1:], (0, 1))
    at_true = whole.folded.gather(-1, nxt[..., None])[..., 0]
    assert torch.equal(at_true.masked_fill(sc.logp == 0, 0.0), sc.logp)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    """31 short documents, 30 % of them held out (so the validation split is never empty)."""
    from train_helpers import OVERRIDES

    from bolmo_core.data import prepare_dataset

    folder = tmp_path_factory.mktemp("valdata")
    (folder / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in tiny_corpus(12_000)))
    p = get_preset("tiny", {**OVERRIDES, "data.validation_fraction": 0.3})
    return prepare_dataset([str(folder / "docs.jsonl")], p.model.source, str(folder / "data"), p.data)


def test_validator_scores_with_the_same_scorer(tiny, manifest):
    """The trainer's validation: val_bpb is causal (== byte-by-byte decoding of its batches), and
    val_bpb_lookahead == a plain forward with the predictor's boundaries."""
    from train_helpers import OVERRIDES

    _, model, tok = tiny
    preset = get_preset("tiny", {**OVERRIDES, "data.validation_fraction": 0.3, "stage1.eval_batches": 2})
    vocab = get_vocab(tok)
    val = E.Validator(preset, 1, manifest, vocab, torch.device("cpu"))
    m = val(model)
    causal = look = 0.0
    n_bytes = 0
    for b in val.batches:
        ids, exp, mask = b["input_ids"], b["expanded_ids"], b["byte_mask"].bool()
        with torch.no_grad():
            folded = model(ids, exp, byte_mask=mask).logits.float().log_softmax(-1)
        for r in range(ids.shape[0]):
            n, ends = int(mask[r].sum()), int(b["patch_lens"][r].sum())
            _, lp_ref = _byte_by_byte(model, ids[r, :n], exp[r, :n])
            x = ids[r, 1:ends]
            causal -= float(lp_ref[: ends - 1].sum())
            look -= float(
                torch.logaddexp(
                    folded[r, : ends - 1].gather(-1, x[:, None]),
                    folded[r, : ends - 1].gather(-1, x[:, None] + 260),
                ).sum()
            )
            n_bytes += ends - 1
    assert m["val_bytes"] == n_bytes
    assert m["val_bpb"] == pytest.approx(causal / n_bytes / math.log(2), rel=1e-5)
    assert m["val_bpb_lookahead"] == pytest.approx(look / n_bytes / math.log(2), rel=1e-5)
    assert m["val_bpb_ratio"] == pytest.approx(m["val_bpb"] / m["val_source_bpb"])
    for k in (
        "val_boundary_acc",
        "val_boundary_acc_causal",
        "val_bytes_per_patch_causal",
        "val_causal_passes",
    ):
        assert m[k] == m[k] and m[k] > 0, k


def test_causal_boundaries_are_those_of_greedy_generation(tiny):
    """Greedy generation from BOS alone emits its own flags; scoring its bytes causally places exactly them."""
    from bolmo_core.generate import generate_ids

    _, model, tok = tiny
    vocab = get_vocab(tok)
    gen = generate_ids(model, [b""], max_new_bytes=60, stop_on_eos=False)
    data = gen.sequences[0]
    assert len(data) == 60
    ids = torch.tensor([[1] + [x + 4 for x in data]])
    exp = torch.as_tensor(E.RetainedIndex(vocab).expand(ids.numpy())).long()
    exp[0, 0] = vocab.doc_separator_id
    sc = E.score_bytes(model, ids, exp, ids != 0)
    assert torch.equal(sc.boundary[0], gen.boundaries[0])
    assert 0 < int(gen.boundaries[0][1:].sum()) < 60


def test_source_boundaries_agree_perfectly(tiny):
    """Pooling at the tokenizer's boundaries: the boundary metrics are exactly 1 and patches = tokens."""
    preset, model, tok = tiny
    vocab = get_vocab(tok)
    wins = E.make_windows(tok, [_wiki_text(500)], 250)
    stats = E.byte_model_stats(model, vocab, wins, boundaries="source")
    b = stats["boundary"]
    assert b["accuracy"] == b["precision"] == b["recall"] == 1.0
    assert stats["patches"] == sum(len(w.token_ids) for w in wins)
    predicted = E.byte_model_stats(model, vocab, wins)["boundary"]
    assert predicted["positions"] == b["positions"] and 0.0 <= predicted["accuracy"] <= 1.0


def test_report_and_table(tiny):
    preset, model, tok = tiny
    src = load_source_model(preset.model.source)
    cfg = E.EvalConfig(cute_tasks=("del_char",), cute_items=2, max_bytes=500)
    report = E.evaluate(
        [_wiki_text(5000)],
        tok,
        source_model=src,
        byte_model=model,
        cfg=cfg,
        byte_length=preset.data.byte_slots,
    )
    json.dumps(report)  # JSON-serialisable as is
    assert report["text"]["bytes"] <= 500 and report["text"]["window_bytes"] == preset.data.byte_slots - 1
    assert report["source"]["cute"]["del_char"]["n"] == 2
    assert report["byte_model"]["bits_per_byte"] > 0
    if E.byte_generation_available():
        assert report["byte_model"]["cute"]["del_char"]["n"] == 2
    else:
        assert report["byte_model"]["cute"] is None and any("generate" in n for n in report["notes"])
    table = E.markdown_table(report)
    assert table.splitlines()[0] == "| metric | source | byte model |"
    assert "| CUTE-style (regenerated): del_char |" in table and "| bits per byte |" in table
    assert "| bits per byte, look-ahead boundaries |" in table and "| boundary accuracy (causal) |" in table
    byt = report["byte_model"]
    assert byt["bits_per_byte"] != byt["bits_per_byte_lookahead"] and byt["causal_passes"] >= 1
    assert 0 <= byt["boundary_causal"]["accuracy"] <= 1 and byt["bytes_per_patch_causal"] > 0
    with pytest.raises(E.EvalError, match="give a source model"):
        E.evaluate([b"x"], tok)


def test_source_generation_batch_equals_single(tiny):
    """Left-padded batched greedy generation gives each prompt's own greedy continuation."""
    preset, _, tok = tiny
    src = load_source_model(preset.model.source)
    gen = E.source_generate_fn(src, tok)
    prompts = ['Spell out the word "a". Answer: "', 'Q: Write the much longer word "hello there". Answer: "']
    together = gen(prompts, 12)
    alone = [gen([p], 12)[0] for p in prompts]
    assert together == alone
    assert all(isinstance(t, str) for t in together)


def test_boundary_samples_cut_the_text_both_ways(tiny):
    """Each sample's patches and the source tokens both spell the window; patches follow the model's mask."""
    _, model, tok = tiny
    ascii_text = bytes(b for b in _wiki_text(600) if b < 0x80)  # per-piece decoding can't split a character
    docs = [ascii_text, b"", b"Forty-two bridges cross the river."]
    samples = E.boundary_samples(model, tok, docs, n=3, max_bytes=200)
    assert len(samples) == 2  # the empty document is skipped
    first = E.make_windows(tok, [ascii_text], 200)[0].data.decode()
    assert "".join(samples[0]["patches"]) == first == "".join(samples[0]["tokens"])
    assert (
        "".join(samples[1]["patches"])
        == "Forty-two bridges cross the river."
        == "".join(samples[1]["tokens"])
    )
    assert all(p for s in samples for p in s["patches"])  # no empty patch
    assert len(samples[0]["tokens"]) > 10 and len(samples[0]["patches"]) > 1


@pytest.mark.parametrize("batches", [2, pytest.param(None, marks=pytest.mark.slow)])
def test_split_metrics_of_a_checkpoint(tiny, manifest, tmp_path, capsys, batches):
    """`python -m bolmo_core.evaluate CKPT --manifest M [--batches N]`: a saved checkpoint on the first N
    validation micro-batches, or (slow: every window scored causally) on the whole split."""
    from model_helpers import save_model
    from train_helpers import run_config

    from bolmo_core import checkpoint as ckpt
    from bolmo_core.config import Preset
    from bolmo_core.loader import WindowLoader

    _, model, tok = tiny
    tmp = tmp_path
    preset = Preset.from_dict(run_config(manifest, "x", 1, {"data.validation_fraction": 0.3})["preset"])
    assert preset.model == get_preset("tiny").model
    vocab = get_vocab(tok)
    uri = save_model(
        tmp / "s1", "final", model, preset, 1,
        rank_state={"rng": ckpt.capture_rng()}, trainer_state={"step": 0, "finished": True},
    )  # fmt: skip
    E.main([uri, "--manifest", manifest] + (["--batches", str(batches)] if batches else []))
    m = json.loads(capsys.readouterr().out)
    loader = WindowLoader.from_config(
        preset.data, manifest, vocab, preset.stage1.micro_batch, split="validation"
    )
    scored = list(loader.iter_eval(max_batches=batches))
    want = sum(int(b["patch_lens"].sum(1).sub(1).sum()) for b in scored)
    assert m["val_bytes"] == want > 0
    assert (
        sum(len(b["input_ids"]) for b in scored) == (2 if batches else loader.n_windows)
        and loader.n_windows > 8
    )
    assert m["val_bpb"] > 0 and m["val_bpb_lookahead"] > 0 and m["val_causal_passes"] >= 1
    with pytest.raises(SystemExit) as e:
        E.main([str(tmp / "nothing"), "--manifest", manifest])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "nothing" in err[0]
