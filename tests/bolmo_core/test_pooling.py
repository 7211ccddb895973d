"""Pooling / depooling on hand-worked examples (spec §5) and the boundary predictor (spec §4)."""

import math

import pytest
import torch

from bolmo_core.boundary_predictor import NEG, BoundaryPredictor
from bolmo_core.pooling import boundaries_from_patch_lens, depool, depool_index, patch_ids, pool

B_HAND = torch.tensor([[1, 0, 1, 0, 0, 1]], dtype=torch.bool)  # patches [0] [1 2] [3 4 5]


def test_pool_hand_worked():
    h = torch.arange(6.0).view(1, 6, 1) * 10
    reps, mask, overflow, idx = pool(h, B_HAND, 4)
    assert idx.tolist() == [[0, 2, 5, 1]]  # boundaries in order, then the first filler
    assert reps[..., 0].tolist() == [[0.0, 20.0, 50.0, 10.0]]
    assert mask.tolist() == [[True, True, True, False]]
    assert overflow.tolist() == [False]


def test_depool_hand_worked():
    assert depool_index(B_HAND, 4).tolist() == [[0, 0, 1, 1, 1, 2]]  # a boundary byte gets its own patch
    g = torch.tensor([[[100.0], [200.0], [300.0], [400.0]]])
    assert depool(g, B_HAND)[..., 0].tolist() == [[100, 100, 200, 200, 200, 300]]


def test_overflow_counted_not_silent():
    h = torch.arange(6.0).view(1, 6, 1)
    _, mask, overflow, idx = pool(h, B_HAND, 2)
    assert overflow.tolist() == [True] and mask.tolist() == [[True, True]] and idx.tolist() == [[0, 2]]
    assert depool_index(B_HAND, 2).tolist() == [[0, 0, 1, 1, 1, 1]]  # clipped to the last slot


def test_static_shapes_more_slots_than_bytes():
    reps, mask, overflow, _ = pool(torch.randn(2, 3, 4), torch.ones(2, 3, dtype=torch.bool), 5)
    assert reps.shape == (2, 5, 4) and mask.sum().item() == 6 and not overflow.any()


def test_boundaries_from_patch_lens_and_patch_ids():
    pl = torch.tensor([[1, 2, 3, 0]])
    assert torch.equal(boundaries_from_patch_lens(pl, 6), B_HAND)
    assert patch_ids(B_HAND).tolist() == [[0, 1, 1, 2, 2, 2]]
    # a patch cut by truncation (end past L) gives no boundary
    assert boundaries_from_patch_lens(torch.tensor([[1, 2, 9]]), 6).tolist() == [
        [True, False, True, False, False, False]
    ]


def test_predictor_identity_init_and_forced_ends():
    pred = BoundaryPredictor(4, lookahead=1)
    assert torch.equal(pred.q.weight, torch.eye(4)) and torch.equal(pred.k.weight, torch.eye(4))
    h = torch.tensor([[[1.0, 0, 0, 0], [1.0, 0, 0, 0], [-1.0, 0, 0, 0], [0, 1.0, 0, 0]]])
    logp = pred(h).detach()
    assert logp[0, 0] == 0 and logp[0, -1] == NEG  # BOS always a boundary; no future for the last byte
    # cos(h1,h2) = -1 -> p = 1 (clipped: log(1 - (-1))... = 0); cos(h2,h3) = 0 -> p = 0.5
    assert abs(float(logp[0, 1]) - 0.0) < 1e-6
    assert abs(float(logp[0, 2]) - math.log(0.5)) < 1e-6
    assert pred.decide(logp).tolist() == [[True, True, False, False]]  # p > 0.5 strictly
    same = pred(torch.ones(1, 3, 4)).detach()
    assert abs(float(same[0, 1]) - (math.log(1e-3) - math.log(2))) < 1e-4  # cos = 1 clipped to 1 - 1e-3


@pytest.mark.parametrize("lookahead", [0, 1])
def test_predictor_lookahead_dependence(lookahead):
    """Perturbing h_{t+1}: p_t changes for the released predictor, not for the causal variant."""
    torch.manual_seed(0)
    pred = BoundaryPredictor(8, lookahead=lookahead)
    h = torch.randn(1, 6, 8)
    h2 = h.clone()
    h2[0, 4] += torch.randn(8)
    a, b = pred(h), pred(h2)
    assert torch.equal(a[0, :3], b[0, :3])
    assert torch.equal(a[0, 3], b[0, 3]) == (lookahead == 0)


def test_predictor_bad_config():
    with pytest.raises(ValueError, match="boundary_lookahead"):
        BoundaryPredictor(4, lookahead=2)
    with pytest.raises(ValueError, match="boundary_threshold"):
        BoundaryPredictor(4, threshold=1.5)
