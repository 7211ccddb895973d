"""The Stage-2 compression knob: label patches merged to a target bytes per patch."""

import torch

from bolmo_core.coarsen import coarsen_patch_lens


def test_coarsen_patch_lens_reaches_target_by_merging_neighbours():
    g = torch.Generator().manual_seed(0)
    lens = torch.randint(1, 6, (3, 40), generator=g)
    lens[:, 0] = 1
    lens[2, 30:] = 0  # truncated tail
    out = coarsen_patch_lens(lens, 6.0)
    for r in range(3):
        a, b = lens[r][lens[r] > 0], out[r][out[r] > 0]
        assert b.sum() == a.sum() and b[0] == 1  # bytes kept, BOS untouched
        assert a.sum() / len(b) >= 6.0 > a.sum() / (len(b) + 1)  # just enough merges
        assert set(b.cumsum(0).tolist()) <= set(a.cumsum(0).tolist())  # only merges of neighbours
    assert torch.equal(out, coarsen_patch_lens(lens, 6.0))
    assert torch.equal(coarsen_patch_lens(lens, 1.0), lens)  # already coarser than asked: unchanged
