"""How well can subword boundaries be predicted from k bytes of left context and a lookahead?

A count model (majority vote per context, backing off from 12 to 1 left bytes) is fit on a
prepared dataset's train split and scored on its validation split, for lookaheads of 1-3
bytes. It is a floor on what the boundary predictor (docs/architecture.md §4.1: full left context, ONE byte
ahead) could reach, and shows how much the lookahead limits it.

    .venv/bin/python scripts/boundary_ceiling.py var/fid/data/manifest.json
"""

from __future__ import annotations

import sys

import numpy as np

from bolmo_core.data import read_manifest, read_shard
from bolmo_core.storage import join

PAD = 16  # zero bytes around each document: contexts never cross documents
KS = (12, 10, 8, 6, 4, 3, 2, 1)


def load(manifest_uri: str, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(bytes + 1 as uint64, boundary-after-byte labels, valid mask), documents end to end."""
    m = read_manifest(manifest_uri)
    root = manifest_uri.rsplit("/", 1)[0]
    bs, ls, vs = [], [], []
    for sh in m["shards"]:
        if sh["split"] != split:
            continue
        t = read_shard(join(root, sh["uri"]))
        for data, ends in zip(t.column("text_bytes").to_pylist(), t.column("token_ends").to_pylist()):
            b = np.frombuffer(data, np.uint8).astype(np.uint64) + 1
            lab = np.zeros(len(b), bool)
            e = np.asarray(ends, np.int64)
            lab[e[e > 0] - 1] = True
            z = np.zeros(PAD, np.uint64)
            bs.append(np.concatenate([z, b, z]))
            ls.append(np.concatenate([np.zeros(PAD, bool), lab, np.zeros(PAD, bool)]))
            vs.append(np.concatenate([np.zeros(PAD, bool), np.ones(len(b), bool), np.zeros(PAD, bool)]))
    return np.concatenate(bs), np.concatenate(ls), np.concatenate(vs)


def keys(b: np.ndarray, k: int, ahead: int) -> np.ndarray:
    """A 64-bit hash of bytes t-k+1 .. t+ahead at every position t."""
    h = np.zeros(len(b), np.uint64)
    for o in range(-k + 1, ahead + 1):
        h = h * np.uint64(1099511628211) + np.roll(b, -o)
    return h


def main(manifest_uri: str) -> None:
    (tb, tl, tv), (vb, vl, vv) = load(manifest_uri, "train"), load(manifest_uri, "validation")
    y = vl[vv]
    print(f"train bytes {int(tv.sum())}, validation bytes {int(vv.sum())}, boundary rate {y.mean():.3f}")
    for ahead in (1, 2, 3):
        pred_all, done, per_k = np.zeros(len(y), bool), np.zeros(len(y), bool), []
        for k in KS:
            kt, kv = keys(tb, k, ahead)[tv], keys(vb, k, ahead)[vv]
            uk, inv = np.unique(kt, return_inverse=True)
            pos = np.bincount(inv, weights=tl[tv], minlength=len(uk))
            cnt = np.bincount(inv, minlength=len(uk))
            idx = np.minimum(np.searchsorted(uk, kv), len(uk) - 1)
            seen = uk[idx] == kv
            pred = pos[idx] * 2 > cnt[idx]
            use = seen & ~done
            pred_all[use], done = pred[use], done | seen
            per_k.append(f"k={k}: {(pred[seen] == y[seen]).mean():.4f} on {seen.mean():.0%} seen")
        print(f"lookahead {ahead}: back-off accuracy {(pred_all == y).mean():.4f} | " + "; ".join(per_k))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: boundary_ceiling.py MANIFEST_URI")
    main(sys.argv[1])
