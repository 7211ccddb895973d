"""The boundary predictor (docs/architecture.md §4): identity init, forced ends, look-ahead, bad config."""

import math

import pytest
import torch

from bolmo_core.boundary_predictor import NEG, BoundaryPredictor


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
