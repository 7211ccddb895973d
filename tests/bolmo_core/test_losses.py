"""Loss functions on hand-computed cases (docs/architecture.md §4.3, §7.2, §8.4)."""

import math

import pytest
import torch
import torch.nn.functional as F

from bolmo_core import losses
from bolmo_core.source import SourceConfig, load_tokenizer
from bolmo_core.subword import SubwordVocab


def test_log1mexp_matches_naive_and_is_stable():
    x = torch.tensor([-1e-8, -1e-3, -0.5, -math.log(2.0), -1.0, -10.0, -50.0], dtype=torch.float64)
    want = torch.log(1 - torch.exp(x))
    torch.testing.assert_close(losses.log1mexp(x), want, rtol=1e-6, atol=1e-15)
    assert torch.isfinite(losses.log1mexp(torch.tensor([-1e-30, -1e5]))).all()


def test_boundary_bce_hand_computed():
    p = torch.tensor([[0.9, 0.2, 0.6, 0.5]])
    y = torch.tensor([[True, False, False, True]])
    mask = torch.tensor([[True, True, True, False]])
    want = -(math.log(0.9) + math.log(0.8) + math.log(0.4)) / 3
    got = losses.boundary_bce(p.log(), y, mask)
    assert abs(float(got) - want) < 1e-5


def test_boundary_bce_clips_certain_boundaries():
    """log p = 0 (BOS) is clipped to -1e-3, so a 0 label there is finite (log(1 - e^-0.001))."""
    got = losses.boundary_bce(
        torch.zeros(1, 1), torch.zeros(1, 1, dtype=torch.bool), torch.ones(1, 1, dtype=torch.bool)
    )
    assert abs(float(got) + math.log(1 - math.exp(-1e-3))) < 1e-4


def test_binarised_kl_zero_when_equal_and_hand_value():
    y = torch.tensor([[-0.1, -2.0, -7.5]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    assert float(losses.binarised_kl(y, y, mask, tau=5.0)) < 1e-7
    t, s = torch.tensor([[-1.0]]), torch.tensor([[-3.0]])
    pa, pb = math.exp(-1.0 / 5 - 1e-6), math.exp(-3.0 / 5 - 1e-6)
    want = pa * math.log(pa / pb) + (1 - pa) * math.log((1 - pa) / (1 - pb))
    assert abs(float(losses.binarised_kl(t, s, torch.ones(1, 1, dtype=torch.bool), 5.0)) - want) < 1e-5
    assert float(losses.binarised_kl(t, s, torch.zeros(1, 1, dtype=torch.bool), 5.0)) == 0.0


def test_binarised_kl_gradient_only_to_student():
    t = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    s = torch.tensor([[-3.0, -0.5]], requires_grad=True)
    losses.binarised_kl(t.detach(), s, torch.ones(1, 2, dtype=torch.bool)).backward()
    assert s.grad[0, 0] < 0 < s.grad[0, 1]  # pull each student log-likelihood toward the teacher's


def test_encoder_l2_hand_computed():
    a = torch.zeros(1, 2, 4)
    b = torch.tensor([[[2.0, 0, 0, 0], [1.0, 1.0, 1.0, 1.0]]])
    got = losses.encoder_l2(a, b, torch.tensor([[True, True]]))
    assert abs(float(got) - (2 / 2 + 2 / 2) / 2) < 1e-6
    assert abs(float(losses.encoder_l2(a, b, torch.tensor([[True, False]]))) - 1.0) < 1e-6


def test_fused_ce_matches_cross_entropy_on_valid():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 520)
    labels = torch.randint(0, 520, (2, 5))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 1, 1, 0]], dtype=torch.bool)
    want = F.cross_entropy(logits[mask], labels[mask])
    torch.testing.assert_close(losses.fused_ce(logits, labels, mask), want)


def test_whitespace_debias_mask_from_vocab():
    """The teacher-side mask = tokens whose bytes start with space/tab/newline, from the vocabulary."""
    vocab = SubwordVocab.from_tokenizer(load_tokenizer(SourceConfig("tiny-olmo2")))
    mask = vocab.whitespace_start_mask
    for i, b in enumerate(vocab.token_bytes):
        starts_ws = len(b) > 0 and b[:1] in (b" ", b"\t", b"\n") and i not in vocab.special_ids
        assert bool(mask[i]) == starts_ws
    assert 0 < int(mask.sum()) < len(mask)


def test_byte_kl_hand_computed_zero_at_target_and_masked():
    from bolmo_core.losses import byte_kl

    q = torch.tensor([[[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]], [[0.2, 0.3, 0.5], [0.0, 0.0, 1.0]]])
    s = torch.tensor([[[0.25, 0.25, 0.5], [0.5, 0.25, 0.25]], [[0.2, 0.3, 0.5], [1 / 3, 1 / 3, 1 / 3]]])
    mask = torch.tensor([[True, True], [True, False]])
    logp = s.log().requires_grad_(True)
    got = byte_kl(q, logp, mask)
    want = (math.log(2) + math.log(2) + 0.0) / 3  # KL per position: log 2, log 2, 0 (last one masked)
    assert float(got) == pytest.approx(want, rel=1e-6)
    got.backward()
    assert torch.allclose(logp.grad[0, 0], -q[0, 0] / 3) and (logp.grad[1, 1] == 0).all()
    assert float(byte_kl(q, q.clamp_min(1e-30).log(), torch.ones(2, 2, dtype=torch.bool))) == pytest.approx(
        0, abs=1e-6
    )
