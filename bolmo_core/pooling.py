"""Pooling bytes -> patches and depooling back (docs/architecture.md §5), with static shapes.

A patch is the encoder state at its last byte. Boundary positions are listed in order by
argsorting key_t = t + L*[not boundary]; the first P indices are the patch slots (fillers after
the real patches are masked). Rows with more than P boundaries lose their extra patches; this
is counted and returned (`overflow`), never silent.
"""

from __future__ import annotations

import torch


def pool(h: torch.Tensor, boundary: torch.Tensor, n_patches: int):
    """h (B, L, d), boundary (B, L) bool -> (reps (B, P, d), patch_mask (B, P), overflow (B,) bool, idx)."""
    B, L, _ = h.shape
    t = torch.arange(L, device=h.device)
    key = t + L * (~boundary).long()
    idx = key.argsort(dim=1)
    if n_patches > L:  # more slots than bytes: pad the index list with the last position
        idx = torch.cat([idx, idx[:, -1:].expand(B, n_patches - L)], 1)
    idx = idx[:, :n_patches]
    reps = h.gather(1, idx.unsqueeze(-1).expand(-1, -1, h.shape[-1]))
    count = boundary.sum(1)
    patch_mask = torch.arange(n_patches, device=h.device) < count.unsqueeze(1)
    return reps, patch_mask, count > n_patches, idx


def depool_index(boundary: torch.Tensor, n_patches: int) -> torch.Tensor:
    """idx_t = clip(cumsum(b)_t - 1, 0, P-1): the latest patch whose last byte is <= t."""
    return (boundary.long().cumsum(1) - 1).clamp(0, n_patches - 1)


def depool(g: torch.Tensor, boundary: torch.Tensor) -> torch.Tensor:
    """g (B, P, d), boundary (B, L) -> (B, L, d); a boundary byte gets its own patch's output."""
    idx = depool_index(boundary, g.shape[1])
    return g.gather(1, idx.unsqueeze(-1).expand(-1, -1, g.shape[-1]))


def boundaries_from_patch_lens(patch_lens: torch.Tensor, length: int) -> torch.Tensor:
    """(B, P) patch lengths -> (B, L) bool, True at each patch's last byte (0-length patches skipped)."""
    ends = patch_lens.long().cumsum(1) - 1
    ok = (patch_lens > 0) & (ends < length)
    out = torch.zeros(patch_lens.shape[0], length + 1, dtype=torch.bool, device=patch_lens.device)
    out.scatter_(1, torch.where(ok, ends, length), True)  # invalid ends land in a spare column
    return out[:, :length]


def patch_ids(boundary: torch.Tensor) -> torch.Tensor:
    """Patch index of every byte: boundaries strictly before t (a patch ends at its boundary byte)."""
    b = boundary.long()
    return b.cumsum(1) - b
