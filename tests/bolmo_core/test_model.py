"""BolmoModel on the tiny preset: Stage 1/2 losses, gradient flow, static shapes, init, param groups."""

import copy
import math

import pytest
import torch
from bolmo_batches import brute_targets, text_batch

from bolmo_core.byte_tokenizer import FUSED_VOCAB
from bolmo_core.config import get_preset
from bolmo_core.model import BatchError, BolmoModel
from bolmo_core.source import load_source_model, load_tokenizer, tiny_corpus
from bolmo_core.subword import RetainedIndex, SubwordVocab

P = 32


@pytest.fixture(scope="module")
def setup():
    preset = get_preset("tiny")
    tok = load_tokenizer(preset.model.source)
    vocab = SubwordVocab.from_tokenizer(tok)
    texts = tiny_corpus(40_000)
    batch = text_batch(tok, vocab, [[texts[0][:60], texts[1]], [texts[2]]], P)
    torch.manual_seed(0)
    model = BolmoModel.from_source(preset.model, vocab=vocab)
    return preset, vocab, batch, model


def _backward(model, batch, stage, losses=None) -> dict:
    """The model set up for `stage` (a StageConfig), gradients cleared, one loss and its backward: its metrics."""
    model.configure_stage(stage)
    model.zero_grad(set_to_none=True)
    loss_fn = model.stage1_loss if stage.stage == 1 else model.stage2_loss
    loss, m = loss_fn(batch, losses or stage.losses)
    loss.backward()
    return m


def _grads(module):
    return [p.grad for p in module.parameters()]


def test_stage1_loss_and_gradient_flow(setup):
    preset, _, batch, model = setup
    m = _backward(model, batch, preset.stage1)
    for key in (
        "loss_encoder",
        "loss_ce",
        "loss_distill",
        "loss_boundary",
        "boundary_acc",
        "boundary_precision",
        "boundary_recall",
        "boundary_rate_pred",
        "overflow_frac",
        "bytes_per_patch",
        "loss",
    ):
        assert isinstance(m[key], float), key
    w = preset.stage1.losses
    want = (
        w.encoder * m["loss_encoder"]
        + w.ce * m["loss_ce"]
        + w.distill * m["loss_distill"]
        + w.boundary * m["loss_boundary"]
    )
    assert abs(m["loss"] - want) < 1e-4 * abs(want)
    assert m["overflow_frac"] == 0.0
    assert (
        abs(m["bytes_per_patch"] - batch["byte_mask"].sum().item() / batch["patch_mask"].sum().item()) < 1e-6
    )
    enc = model.local_encoder
    assert enc.byte_embedding.weight.grad.abs().sum() > 0
    assert enc.retained_embedding.weight.grad.abs().sum() > 0
    assert all(g is not None and g.abs().sum() > 0 for g in _grads(enc.blocks))
    assert model.out_projection.weight.grad.abs().sum() > 0  # only via the L2 loss through frozen blocks
    assert model.boundary_predictor.q.weight.grad is not None
    assert all(g is None for g in _grads(model.global_model)) and all(
        g is None for g in _grads(model.teacher)
    )


def test_stage1_encoder_loss_reaches_encoder_through_frozen_blocks(setup):
    preset, _, batch, model = setup
    only_enc = copy.deepcopy(preset.stage1.losses)
    only_enc.ce = only_enc.distill = only_enc.boundary = 0.0
    _backward(model, batch, preset.stage1, only_enc)
    assert model.local_encoder.byte_embedding.weight.grad.abs().sum() > 0
    g = model.local_decoder.in_projection.weight.grad
    assert g is None or not g.any()  # the decoder is not on this path


def test_stage2_gradient_reaches_global(setup):
    preset, _, batch, model = setup
    m = _backward(model, batch, preset.stage2)
    assert set(m) >= {"loss_ce", "loss_boundary", "overflow_frac", "clipped_byte_frac", "bytes_per_patch"}
    assert all(g is not None for g in _grads(model.global_model))
    assert model.global_model.model.layers[0].mlp.down_proj.weight.grad.abs().sum() > 0
    assert all(g is None for g in _grads(model.teacher))
    model.configure_stage(preset.stage1)


def test_static_shapes(setup):
    _, _, batch, model = setup
    B, L = batch["input_ids"].shape
    with torch.no_grad():
        out = model(batch["input_ids"], batch["expanded_ids"], byte_mask=batch["byte_mask"], n_patches=P)
        d = model.d_global
        assert out.logits.shape == (B, L, FUSED_VOCAB) and out.boundary_logp.shape == (B, L)
        assert out.patch_reps.shape == (B, P, d) and out.global_hidden.shape == (B, P, d)
        assert out.patch_mask.shape == (B, P) and out.overflow.shape == (B,)
        # teacher-forced boundaries: the patch mask is the batch's
        from bolmo_core.pooling import boundaries_from_patch_lens

        b = boundaries_from_patch_lens(batch["patch_lens"], L) & batch["byte_mask"]
        out2 = model(batch["input_ids"], batch["expanded_ids"], boundary_mask=b, n_patches=P)
        assert torch.equal(out2.patch_mask, batch["patch_mask"])


def test_fused_labels():
    ids = torch.tensor([[1, 10, 11, 12, 0]])
    b = torch.tensor([[1, 0, 1, 1, 0]], dtype=torch.bool)
    mask = ids != 0
    labels, valid = BolmoModel.fused_labels(ids, b, mask)
    assert labels.tolist() == [[10, 11 + 260, 12 + 260, 0, 0]] and valid.tolist() == [
        [True, True, True, False, False]
    ]


def test_boundary_targets_eos_joins_previous_patch(setup):
    _, _, _, model = setup
    ids = torch.tensor([[1, 10, 11, 1, 12, 13, 0]])
    b = torch.tensor([[1, 0, 1, 1, 0, 1, 0]], dtype=torch.bool)
    labels, mask = model.boundary_targets(ids, b, ids != 0)
    assert labels.tolist() == [[True, False, False, True, False, True, False]]
    assert mask.tolist() == [[True, True, True, True, True, False, False]]  # no label without a next byte


def test_causal_predictor_in_model_does_not_look_ahead(setup):
    preset, vocab, batch, _ = setup
    cfg = copy.deepcopy(preset.model)
    cfg.boundary_lookahead = 0
    lm = load_source_model(cfg.source)
    model = BolmoModel.from_source(cfg, source_model=lm, init=False, vocab=vocab)
    ids = batch["input_ids"][:1, :40].clone()
    t = 20
    ids2 = ids.clone()
    ids2[0, t + 1] = 4 + (ids[0, t + 1] - 4 + 7) % 256
    ri = RetainedIndex(vocab)
    with torch.no_grad():
        a = model.encode(ids, ri.expand(ids))[1]
        b = model.encode(ids2, ri.expand(ids2))[1]
    assert torch.equal(a[0, : t + 1], b[0, : t + 1]) and not torch.equal(a[0, t + 1], b[0, t + 1])


def test_init_matches_teacher_embedding_statistics(setup):
    _, vocab, _, model = setup
    emb_t = model.teacher.embed_tokens.weight.detach()
    assert torch.equal(model.local_encoder.retained_embedding.weight, emb_t[: vocab.vocab_size])
    mean_t, std_t = emb_t.mean(0), emb_t.std(0)
    g = torch.Generator().manual_seed(123)  # a fresh sample, not the one init used
    ids = torch.randint(4, 260, (1, 8192), generator=g)
    with torch.no_grad():
        h, _ = model.local_encoder(ids, RetainedIndex(vocab).expand(ids))
        reps = model.out_projection(h[0])
    ratio = reps.std(0) / std_t
    assert 0.9 < ratio.min() and ratio.max() < 1.1
    assert ((reps.mean(0) - mean_t).abs() / std_t).max() < 0.1
    byte_std = model.local_encoder.byte_embedding.weight.std(0) / std_t
    assert 0.7 < byte_std.median() < 1.3
    assert torch.all(model.boundary_predictor.q.weight == torch.eye(model.d_local))


def test_init_narrow_local_width(setup):
    """d_l < d_g: projections on both sides; init rescale on the output axis still matches the teacher."""
    preset, vocab, batch, _ = setup
    cfg = copy.deepcopy(preset.model)
    cfg.local.d_local = 32
    torch.manual_seed(0)
    model = BolmoModel.from_source(cfg, vocab=vocab)
    assert model.out_projection.weight.shape == (64, 32)
    emb_t = model.teacher.embed_tokens.weight.detach()
    ids = torch.randint(4, 260, (1, 4096), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        h, _ = model.local_encoder(ids, RetainedIndex(vocab).expand(ids))
        ratio = model.out_projection(h[0]).std(0) / emb_t.std(0)
        loss, m = model.stage1_loss(batch, preset.stage1.losses)
    assert 0.85 < ratio.min() and ratio.max() < 1.15
    assert torch.isfinite(loss)


def test_param_groups(setup):
    preset, _, _, model = setup
    g1 = {g["name"]: g for g in model.param_groups(preset.stage1)}
    assert set(g1) == {"local", "local_no_decay"}
    no_decay = {id(p) for p in g1["local_no_decay"]["params"]}
    assert id(model.local_encoder.byte_embedding.weight) in no_decay
    assert id(model.out_projection.bias) in no_decay and id(model.lm_head.norm.weight) in no_decay
    assert id(model.lm_head.out.weight) in {id(p) for p in g1["local"]["params"]}
    assert g1["local_no_decay"]["weight_decay"] == 0.0 and g1["local"]["weight_decay"] == 0.1
    assert not any(p.requires_grad for p in model.global_model.parameters())
    g2 = {g["name"]: g for g in model.param_groups(preset.stage2)}
    opt = preset.stage2.optim
    assert g2["global"]["lr"] == pytest.approx(opt.lr * opt.global_lr_ratio) and g2["local"]["lr"] == opt.lr
    teacher = {id(p) for p in model.teacher.parameters()}
    assert not any(id(p) in teacher for g in g2.values() for p in g["params"])
    n = sum(p.numel() for g in g2.values() for p in g["params"])
    assert n == model.num_params()
    model.configure_stage(preset.stage1)


def test_bad_batch_is_rejected(setup):
    preset, _, batch, model = setup
    bad = dict(batch)
    del bad["teacher_ids"]
    with pytest.raises(BatchError, match="teacher_ids"):
        model.stage1_loss(bad)
    bad = dict(batch, patch_mask=batch["patch_mask"][:, :-1])
    with pytest.raises(BatchError, match="patch_mask"):
        model.stage2_loss(bad)


def test_distillation_matches_explicit_loop(setup):
    """The vectorised patch log-likelihoods + debiasing == a per-patch loop written from docs/architecture.md §8.4."""
    import math

    from bolmo_core.losses import binarised_kl
    from bolmo_core.pooling import boundaries_from_patch_lens

    preset, vocab, batch, model = setup
    w = copy.deepcopy(preset.stage1.losses)
    with torch.no_grad():
        _, m = model.stage1_loss(batch, w)
        ids, pl, tids = batch["input_ids"], batch["patch_lens"], batch["teacher_ids"]
        B, L = ids.shape
        b = boundaries_from_patch_lens(pl, L) & batch["byte_mask"]
        t_final = model.global_model(model.teacher.embed(tids)).hidden
        t_logp = model.teacher.logits(t_final).float().log_softmax(-1)
        h, _, _ = model.encode(ids, batch["expanded_ids"])
        s_logp = model.decode(h, t_final, b)[0].float().log_softmax(-1)
    ws_ids = [4 + 32, 4 + 9, 4 + 10]
    ws_mask = vocab.whitespace_start_mask
    ys, yt = [], []
    for r in range(B):
        ends = (pl[r].cumsum(0) - 1).tolist()
        for k in range(1, P):
            if not batch["patch_mask"][r, k] or pl[r, k] == 0:
                continue
            s_ll = 0.0
            for t in range(ends[k - 1], ends[k]):  # bytes whose next byte lies in patch k
                flag = 260 if t + 1 == ends[k] else 0
                s_ll += float(s_logp[r, t, int(ids[r, t + 1]) + flag])
            s_ll += float(torch.logsumexp(s_logp[r, ends[k], ws_ids], 0))
            t_ll = float(t_logp[r, k - 1, tids[r, k]]) + float(torch.logsumexp(t_logp[r, k][ws_mask], 0))
            ys.append(s_ll)
            yt.append(t_ll)
    want = binarised_kl(
        torch.tensor(yt), torch.tensor(ys), torch.ones(len(ys), dtype=torch.bool), w.distill_tau
    )
    assert len(ys) > 30 and math.isfinite(m["loss_distill"])
    assert abs(m["loss_distill"] - float(want)) < 1e-4 * max(1.0, float(want))


def test_bf16_autocast_losses(setup):
    """The CPU presets train under bf16 autocast: both stages give finite losses and gradients."""
    preset, _, batch, model = setup
    for stage in (preset.stage1, preset.stage2):
        model.configure_stage(stage)
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, m = model.loss(batch, stage)
        loss.backward()
        assert torch.isfinite(loss) and all(v == v for v in m.values())
        assert torch.isfinite(model.local_encoder.byte_embedding.weight.grad).all()
    model.configure_stage(preset.stage1)


# ---------------------------------------------------------------- byte-level targets (issue 13)


def _explicit_targets(model, vocab, batch):
    """{(row, byte position): brute-force target} from a loop over patches, written from the rules."""
    ids, pl, tids = batch["input_ids"], batch["patch_lens"], batch["teacher_ids"]
    with torch.no_grad():
        t_final = model.global_model(model.teacher.embed(tids)).hidden
        p = model.teacher.logits(t_final).double().softmax(-1)
    out = {}
    for r in range(ids.shape[0]):
        ends = (pl[r].cumsum(0) - 1).tolist()
        for k in range(P - 1):  # teacher position k -> patch k+1
            tok, n = int(tids[r, k + 1]), int(pl[r, k + 1])
            if not batch["patch_mask"][r, k + 1] or n == 0 or tok in vocab.special_ids:
                continue
            assert vocab.token_bytes[tok] == bytes(int(x) - 4 for x in ids[r, ends[k] + 1 : ends[k] + 1 + n])
            for j in range(n):
                out[(r, ends[k] + j)] = brute_targets(vocab, p[r, k], tok, j)[0]
    return out


def test_byte_kl_matches_explicit_loop_and_trains_the_student(setup):
    """loss_byte_kl == mean over target positions of KL(brute-force target || student), with each target
    at end(patch k) + j; the gradient reaches the byte model's local parts and never the teacher."""
    preset, vocab, batch, model = setup
    w = copy.deepcopy(preset.stage1.losses)
    w.byte_kl, w.distill, w.encoder = 1.0, 0.0, 0.0
    m = _backward(model, batch, preset.stage1, w)
    targets = _explicit_targets(model, vocab, batch)
    with torch.no_grad():
        h, _, _ = model.encode(batch["input_ids"], batch["expanded_ids"])
        t_final = model.global_model(model.teacher.embed(batch["teacher_ids"])).hidden
        from bolmo_core.pooling import boundaries_from_patch_lens

        b = boundaries_from_patch_lens(batch["patch_lens"], h.shape[1]) & batch["byte_mask"]
        s_logp = model.decode(h, t_final, b)[0].double().log_softmax(-1)
    kls = [float((q * (q.clamp_min(1e-300).log() - s_logp[r, t])).sum()) for (r, t), q in targets.items()]
    assert len(kls) > 100
    assert m["loss_byte_kl"] == pytest.approx(sum(kls) / len(kls), rel=1e-4)
    n_ce = int((batch["byte_mask"][:, :-1] & batch["byte_mask"][:, 1:]).sum())
    assert m["byte_target_frac"] == pytest.approx(len(kls) / n_ce)
    assert model.lm_head.out.weight.grad.abs().sum() > 0
    assert all(g is not None and g.abs().sum() > 0 for g in _grads(model.local_decoder.blocks))
    assert model.local_encoder.byte_embedding.weight.grad.abs().sum() > 0
    assert all(g is None for g in _grads(model.teacher))


def test_byte_kl_is_zero_when_the_student_is_the_targets(setup):
    from bolmo_core import byte_targets, losses

    preset, _, batch, model = setup
    with torch.no_grad():
        t_final = model.global_model(model.teacher.embed(batch["teacher_ids"])).hidden
        tokens = byte_targets.patch_tokens(model.target_table, batch)
        _, _, tp = model._teacher_token_logp(t_final, batch["teacher_ids"], False, tokens)
        h, _, _ = model.encode(batch["input_ids"], batch["expanded_ids"])
        from bolmo_core.pooling import boundaries_from_patch_lens

        b = boundaries_from_patch_lens(batch["patch_lens"], h.shape[1]) & batch["byte_mask"]
        _, _, _, ends = model.patches(h, b, P)
        labels, ce_mask = model.fused_labels(batch["input_ids"], b, batch["byte_mask"])
        q, mask = model._dense_targets(tp, ends, ce_mask)
    assert mask.sum() > 100
    student = q.clamp_min(1e-30).log().log_softmax(-1)  # the student's distribution is the target
    assert float(losses.byte_kl(q, student, mask)) == pytest.approx(0.0, abs=1e-5)
    assert float(losses.byte_kl(q, torch.full_like(q, -math.log(FUSED_VOCAB)), mask)) > 1.0


def test_soft_boundary_target_mixes_the_teachers_end_mass(setup):
    """boundary_soft=a: BCE target at byte t = (1-a) subword end + a q(x_t ends)/(q(x_t ends)+q(x_t goes on))
    from the target at t-1; bytes without a target and the byte before a separator keep the hard label."""
    from bolmo_core import losses
    from bolmo_core.byte_tokenizer import BOS
    from bolmo_core.pooling import boundaries_from_patch_lens

    preset, vocab, batch, model = setup
    ids, byte_mask = batch["input_ids"], batch["byte_mask"]
    w = copy.deepcopy(preset.stage1.losses)
    _, hard = model.stage1_loss(batch, w)
    w.boundary_soft = 0.7
    _, soft = model.stage1_loss(batch, w)
    targets = _explicit_targets(model, vocab, batch)
    with torch.no_grad():
        _, logp, _ = model.encode(ids, batch["expanded_ids"])
    b = boundaries_from_patch_lens(batch["patch_lens"], ids.shape[1]) & byte_mask
    labels, mask = model.boundary_targets(ids, b, byte_mask)
    want = labels.double()
    n_soft = 0
    for (r, t), q in targets.items():
        x = int(ids[r, t + 1])
        if t + 2 < ids.shape[1] and int(ids[r, t + 2]) == BOS:
            continue
        want[r, t + 1] = 0.3 * want[r, t + 1] + 0.7 * q[x + 260] / (q[x + 260] + q[x])
        n_soft += 1
    assert n_soft > 100
    assert soft["loss_boundary"] == pytest.approx(float(losses.boundary_bce(logp, want, mask)), rel=1e-5)
    assert hard["loss_boundary"] == pytest.approx(float(losses.boundary_bce(logp, labels, mask)), rel=1e-6)
    assert soft["boundary_acc"] == hard["boundary_acc"]  # metrics stay against the subword ends


def test_boundary_context_widens_without_lookahead(setup):
    """boundary_context=c: starts as docs/architecture.md's predictor, reads c previous bytes once trained, never byte t+2."""
    from bolmo_core.boundary_predictor import BoundaryPredictor

    torch.manual_seed(0)
    plain, wide = BoundaryPredictor(16), BoundaryPredictor(16, context=3)
    h = torch.randn(2, 12, 16)
    assert torch.equal(plain(h), wide(h))  # zero-initialised context: identical at the start
    with torch.no_grad():
        wide.widen.weight.normal_(std=0.3)
    base = wide(h)
    t = 6
    later, earlier = h.clone(), h.clone()
    later[:, t + 2 :] += 1.0
    earlier[:, t - 3] += 1.0
    assert torch.equal(wide(later)[:, : t + 1], base[:, : t + 1])  # p_t reads bytes <= t+1 only
    assert not torch.allclose(wide(earlier)[:, t], base[:, t])  # ... and byte t-3
    assert torch.equal(wide(earlier)[:, : t - 4], base[:, : t - 4])  # p_s, s < t-4, never reads byte t-3
    with pytest.raises(ValueError, match="boundary_context"):
        BoundaryPredictor(16, context=-1)

    preset, vocab, batch, _ = setup
    cfg = copy.deepcopy(preset.model)
    cfg.boundary_context = 2
    torch.manual_seed(0)
    model = BolmoModel.from_source(cfg, vocab=vocab)
    assert model.boundary_predictor.widen.weight.abs().sum() == 0  # init_from_source keeps it at zero
    model.configure_stage(preset.stage1)
    loss, _ = model.stage1_loss(batch, preset.stage1.losses)
    loss.backward()
    assert model.boundary_predictor.widen.weight.grad.abs().sum() > 0
