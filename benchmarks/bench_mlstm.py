"""fwd+bwd time of bolmo_core.mlstm.mlstm_chunkwise vs mlstm_kernels' pure-torch chunkwise kernel.

Usage: .venv/bin/python benchmarks/bench_mlstm.py [--reps N]
Both run in this process on the same inputs, alternating, fp32 on CPU; prints ms and the ratio
(baseline / ours: > 1 means ours is faster). Baseline: mlstm_kernels 2.0.6 "chunkwise--native_autograd".
"""

import argparse
import functools
import os
import statistics
import time

import torch
from mlstm_kernels.torch import get_mlstm_kernel

from bolmo_core.mlstm import mlstm_chunkwise

# (name, B, H, L, Dqk, Dv, chunk)
SHAPES = [
    ("smollm2 preset", 4, 4, 768, 32, 64, 64),
    ("olmo-like, scaled", 2, 16, 1024, 64, 128, 128),
]


def make(B, H, L, Dqk, Dv, seed=0):
    g = torch.Generator().manual_seed(seed)
    ts = [
        torch.randn(B, H, L, Dqk, generator=g),
        torch.randn(B, H, L, Dqk, generator=g),
        torch.randn(B, H, L, Dv, generator=g),
        3 * torch.randn(B, H, L, generator=g),
        2 * torch.randn(B, H, L, generator=g) + 3,
    ]
    return [t.requires_grad_(True) for t in ts]


def fwd_bwd(fn, ins, w):
    for t in ins:
        t.grad = None
    t0 = time.perf_counter()
    (fn(*ins) * w).sum().backward()
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ref = get_mlstm_kernel("chunkwise--native_autograd")
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, load avg {load}, fp32, fwd+bwd, median of {args.reps}"
    )
    print("| shape | B,H,L,Dqk,Dv,chunk | ours ms | mlstm_kernels ms | ratio (ref/ours) |")
    print("|---|---|---|---|---|")
    for name, B, H, L, Dqk, Dv, c in SHAPES:
        ins = make(B, H, L, Dqk, Dv)
        w = torch.randn(B, H, L, Dv)
        ours = functools.partial(mlstm_chunkwise, chunk_size=c)
        theirs = functools.partial(ref, chunk_size=c)
        # same math: check before timing (fp32 random inputs are ill-conditioned: both are ~1e-4 off fp64)
        with torch.no_grad():
            a, b = ours(*ins), theirs(*ins)
        rel = ((a - b).norm() / b.norm()).item()
        assert rel < 2e-3, f"outputs differ (relative norm {rel:.1e})"
        fwd_bwd(ours, ins, w), fwd_bwd(theirs, ins, w)  # warm-up
        t_ours, t_ref = [], []
        for _ in range(args.reps):  # alternate so drift from other load hits both equally
            t_ours.append(fwd_bwd(ours, ins, w))
            t_ref.append(fwd_bwd(theirs, ins, w))
        mo, mr = statistics.median(t_ours) * 1e3, statistics.median(t_ref) * 1e3
        print(f"| {name} | {B},{H},{L},{Dqk},{Dv},{c} | {mo:.1f} | {mr:.1f} | {mr / mo:.2f} |")


if __name__ == "__main__":
    main()
