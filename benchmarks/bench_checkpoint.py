"""What checking a checkpoint's COMMIT digests costs at load time (bolmo_core/checkpoint.py).

One model (`--preset`, default `smollm2-135m`: real SmolLM2-135M blocks, fp32) with its AdamW
state filled by one step on zero gradients (the state has its real shapes; no data needed) is
saved twice in each format, once as written (COMMIT holds every file's sha256) and once with the
digests taken out of COMMIT (as checkpoints were before them, so nothing is checked). The two
copies are then loaded alternately, `--repeats` times each, in this one process:

* files format: `load_checkpoint(uri, rank=0)` (weights, optimizer, scheduler, RNG, JSONs);
  the digest of each file is taken from the bytes already read.
* DCP format, one process: `load_checkpoint(uri, 0, target)` (verify every shard file, then
  `dcp.load` into the model's and optimizer's state) and `load_model_state(uri)` (what
  evaluation and export use: every file is hashed, the model part is loaded).

The files are in the page cache after the first load, so "one extra read" costs here what
hashing costs (the read itself is a memory copy); from S3 or a cold disk the DCP check is one
more read of the checkpoint's bytes, at storage speed.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_checkpoint.py [--preset tiny] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _model_and_optimizer(preset_name: str):
    from bolmo_core.config import get_preset
    from bolmo_core.model import BolmoModel
    from bolmo_core.train import build_optimizer, build_scheduler

    preset = get_preset(preset_name)
    torch.manual_seed(0)
    model = BolmoModel.from_source(preset.model)
    opt = build_optimizer(model, preset.stage1)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    opt.step()  # fills exp_avg / exp_avg_sq with their real shapes
    return model, opt, build_scheduler(opt, preset.stage1)


def _save(folder: Path, model, opt, sched, sharded: bool) -> str:
    from bolmo_core import checkpoint as ckpt
    from bolmo_core.train import sharded_state

    weights = (
        {"sharded_state": sharded_state(model, opt)}
        if sharded
        else {"model_state": model.state_dict(), "optimizer_state": opt.state_dict()}
    )
    return ckpt.save_checkpoint(
        str(folder), ckpt.step_name(1), rank=0, world_size=1, barrier=lambda: None,
        rank_state={"rng": ckpt.capture_rng()}, scheduler_state=sched.state_dict(),
        trainer_state={"step": 1}, config={"stage": 1}, **weights,
    )  # fmt: skip


def _without_digests(uri: str, dst: Path) -> str:
    """A copy whose COMMIT has no digests: loads exactly as before digests existed (nothing checked)."""
    shutil.copytree(uri, dst)
    commit = json.loads((dst / "COMMIT").read_text())
    del commit["sha256"]
    (dst / "COMMIT").write_text(json.dumps(commit))
    return str(dst)


def _size(uri: str) -> int:
    p = Path(uri)
    return p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def _alternate(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each callable, the callables run in turn (load drift hits all alike)."""
    for fn in fns.values():  # warm: page cache, lazy imports
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    from bolmo_core import checkpoint as ckpt
    from bolmo_core import storage
    from bolmo_core.train import sharded_state

    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="smollm2-135m")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, opt, sched = _model_and_optimizer(args.preset)
    with tempfile.TemporaryDirectory(prefix="bench-ckpt-") as tmp:
        files = _save(Path(tmp, "files"), model, opt, sched, sharded=False)
        dcp = _save(Path(tmp, "dcp"), model, opt, sched, sharded=True)
        files_old = _without_digests(files, Path(tmp, "files-old"))
        dcp_old = _without_digests(dcp, Path(tmp, "dcp-old"))
        target = sharded_state(model, opt)
        weights = storage.join(files, ckpt.MODEL_FILE)
        t = _alternate(
            {
                "files": lambda: ckpt.load_checkpoint(files, 0),
                "files, no digests": lambda: ckpt.load_checkpoint(files_old, 0),
                "dcp": lambda: ckpt.load_checkpoint(dcp, 0, target),
                "dcp, no digests": lambda: ckpt.load_checkpoint(dcp_old, 0, target),
                "dcp verify only": lambda: ckpt.verify_sharded(dcp, no_dist=True),
                "dcp consolidate": lambda: ckpt.load_model_state(dcp),
                "dcp consolidate, no digests": lambda: ckpt.load_model_state(dcp_old),
                "sha256 of weights file": lambda: storage.sha256_uri(weights),
            },
            args.repeats,
        )
        sizes = {"files": _size(files), "dcp": _size(dcp), "weights": _size(weights)}
    mb = {k: v / 1e6 for k, v in sizes.items()}
    print(f"preset {args.preset}: files checkpoint {mb['files']:.1f} MB, dcp {mb['dcp']:.1f} MB "
          f"(weights file {mb['weights']:.1f} MB); median of {args.repeats}, alternating")  # fmt: skip
    for k, v in t.items():
        print(f"  {k:30s} {v * 1000:9.1f} ms")
    print(f"  sha256 throughput: {mb['weights'] / t['sha256 of weights file']:.0f} MB/s")
    for name in ("files", "dcp", "dcp consolidate"):
        print(f"  {name}: with digests / without = {t[name] / t[name + ', no digests']:.2f}x")


if __name__ == "__main__":
    main()
