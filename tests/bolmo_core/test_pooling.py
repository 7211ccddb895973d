"""Pooling / depooling on hand-worked examples (docs/architecture.md §5)."""

import torch

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
