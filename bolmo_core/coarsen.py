"""The Stage-2 compression knob (docs/architecture.md §9.3): coarser label patches than the source's tokens.

``stage2.target_bytes_per_patch = r`` merges adjacent label patches of every row until it has
at least r bytes per patch; the boundary predictor then learns to place fewer boundaries.
"""

from __future__ import annotations

import heapq
import math

import torch


def coarsen_patch_lens(patch_lens: torch.Tensor, target: float) -> torch.Tensor:
    """Merge adjacent label patches until each row has at least ``target`` bytes per patch.

    Deterministic "shortest pair first" scheme (a BPE-like variant of docs/architecture.md §9.3): repeatedly
    merge the adjacent pair with the smallest combined length (ties: leftmost), never the
    BOS patch 0, until bytes / patches >= target. Merged lengths stay in order, packed
    left; freed slots become 0 (no patch).
    """
    out = torch.zeros_like(patch_lens)
    for r, row in enumerate(patch_lens.tolist()):
        lens = [x for x in row[1:] if x > 0]
        total = sum(lens) + row[0]
        keep = max(1, math.floor(total / target) - 1)  # patches besides BOS
        merges = len(lens) - keep
        if merges > 0:
            lens = _merge_shortest(lens, merges)
        merged = [row[0]] + lens
        out[r, : len(merged)] = torch.tensor(merged, dtype=patch_lens.dtype)
    return out


def _merge_shortest(lens: list[int], merges: int) -> list[int]:
    n = len(lens)
    nxt, prv, alive = list(range(1, n + 1)), list(range(-1, n - 1)), [True] * n
    cur = list(lens)
    heap = [(cur[i] + cur[i + 1], i, i + 1) for i in range(n - 1)]
    heapq.heapify(heap)
    done = 0
    while done < merges and heap:
        s, i, j = heapq.heappop(heap)
        if not (alive[i] and alive[j]) or nxt[i] != j or cur[i] + cur[j] != s:
            continue  # stale entry
        cur[i] += cur[j]
        alive[j] = False
        nxt[i] = nxt[j]
        if nxt[i] < n:
            prv[nxt[i]] = i
            heapq.heappush(heap, (cur[i] + cur[nxt[i]], i, nxt[i]))
        if prv[i] >= 0:
            heapq.heappush(heap, (cur[prv[i]] + cur[i], prv[i], i))
        done += 1
    return [cur[i] for i in range(n) if alive[i]]


def coarsen_batch(batch: dict, target: float | None) -> dict:
    if not target:
        return batch
    b = dict(batch)
    b["token_patch_lens"] = batch["patch_lens"]  # one patch per source token (source bpb needs these)
    b["patch_lens"] = coarsen_patch_lens(batch["patch_lens"], target)
    b["patch_mask"] = b["patch_lens"] > 0
    b["patch_mask"][:, 0] = True
    return b
