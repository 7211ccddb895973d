"""LoRA Stage 2 vs full Stage 2, side by side, on the same budget (bolmo_core/lora.py).

Two parts, both on the `smollm2-135m` preset (real SmolLM2-135M blocks), fp32:

1. **Step cost, one process.** Two Stage-2 models with the same starting weights (the Stage-1
   checkpoint) and the same batch; steps alternate (full, LoRA, full, ...) so load changes hit both
   alike. Per arm: trainable parameters; optimizer state (AdamW moments, counted tensor by
   tensor); gradient bytes; the peak of one step's allocations above what was allocated before
   it (torch's profiler records every CPU allocation and free: activations, gradients, optimizer
   temporaries); the resident total = weights + optimizer state + that step peak; step time
   (median of the timed steps, forward + backward + clip + AdamW).
2. **Quality, same budget.** Both arms trained by the real Trainer for `--steps` Stage-2 steps
   from that Stage-1 checkpoint (same data order, same local learning rate), then scored by
   `bolmo_core.evaluate.evaluate` on the manifest's held-out bytes next to the source: bits per
   byte (the evaluation's scorer; causal once docs/architecture.md §13 causal scoring is in).

Data and Stage 1: `--manifest` and `--init-from` name existing ones (e.g. the sweep's); without
them the offline Wikipedia extracts are prepared and Stage 1 is trained here (`--stage1-steps`)
in `--work` (a finished stage is reused on the next run).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_lora.py [--steps 60] [--rank 16] [--work var/bench/lora]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _preset(args, lora: bool):
    from bolmo_core.config import get_preset

    o = {
        "stage1.steps": args.stage1_steps,
        "stage1.eval_every": 0,
        "stage2.steps": args.steps,
        "stage2.checkpoint_every": 0,
        "stage2.eval_every": 0,
    }
    if lora:
        o["stage2.lora"] = {"rank": args.rank, "alpha": args.alpha, "lr_ratio": args.lr_ratio}
    return get_preset(args.preset, o)


def _manifest(args, preset) -> str:
    if args.manifest:
        return args.manifest
    from bolmo_core.data import prepare_dataset
    from bolmo_core.source import tiny_corpus

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    docs = work / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in tiny_corpus(400_000)))
    return prepare_dataset([str(docs)], preset.model.source, str(work / "data"), preset.data)


def _train(preset, stage: int, manifest: str, out: str, init_from: str | None = None) -> dict:
    from bolmo_core.train import TrainConfig, train

    cfg = {"preset": preset.to_dict(), "stage": stage, "manifest_uri": manifest, "out_uri": out}
    return train(TrainConfig.from_dict({**cfg, "init_from": init_from}))


# ---------------------------------------------------------------- part 1: step cost


def _step_peak_bytes(step) -> int:
    """Peak of the CPU allocator's bytes during `step()` above those allocated at its start."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    )
    total = peak = 0
    for _, n in events:
        total += n
        peak = max(peak, total)
    return peak


def _arm(preset, init_from: str, vocab):
    from bolmo_core.config import TrainConfig
    from bolmo_core.train import build_model, build_optimizer

    cfg = TrainConfig.from_dict(
        {"preset": preset.to_dict(), "stage": 2, "manifest_uri": "-", "out_uri": "-", "init_from": init_from}
    )
    model, _ = build_model(cfg, vocab)
    model.train()
    opt = build_optimizer(model, preset.stage2)
    params = [p for p in model.parameters() if p.requires_grad]

    def step(batch) -> float:
        t = time.perf_counter()
        loss, _ = model.stage2_loss(batch, preset.stage2.losses)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, preset.stage2.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    return model, opt, params, step


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def step_cost(args, presets: dict, init_from: str, manifest: str) -> dict:
    from bolmo_core.loader import WindowLoader
    from bolmo_core.source import load_tokenizer
    from bolmo_core.subword import SubwordVocab

    vocab = SubwordVocab.from_tokenizer(load_tokenizer(presets["full"].model.source))
    p = presets["full"]
    batch = next(iter(WindowLoader.from_config(p.data, manifest, vocab, p.stage2.micro_batch)))
    arms = {k: _arm(v, init_from, vocab) for k, v in presets.items()}
    out: dict = {}
    for name, (model, opt, params, step) in arms.items():
        step(batch)  # warm-up; AdamW allocates its state here
        out[name] = {
            "trainable_params": sum(x.numel() for x in params),
            "total_params": model.num_params(),
            "weights_bytes": _bytes(model.state_dict().values()),
            "grad_bytes": _bytes(params),
            "optimizer_state_bytes": _bytes(
                t for s in opt.state.values() for t in s.values() if torch.is_tensor(t)
            ),
            "step_peak_bytes": _step_peak_bytes(lambda s=step: s(batch)),
            "step_s": [],
        }
        out[name]["resident_bytes"] = (
            out[name]["weights_bytes"] + out[name]["optimizer_state_bytes"] + out[name]["step_peak_bytes"]
        )
    for _ in range(args.timed_steps):  # interleaved
        for name, (_, _, _, step) in arms.items():
            out[name]["step_s"].append(step(batch))
    for v in out.values():
        v["step_s_median"] = statistics.median(v["step_s"])
    return out


# ---------------------------------------------------------------- part 2: same budget, bpb


def quality(args, presets: dict, init_from: str, manifest: str) -> dict:
    from bolmo_core import checkpoint as ckpt
    from bolmo_core.evaluate import EvalConfig, evaluate
    from bolmo_core.load import load_checkpoint_model
    from bolmo_core.loader import split_texts
    from bolmo_core.source import load_source_model, load_tokenizer

    finals = {}
    for name, preset in presets.items():
        t, out = time.perf_counter(), str(Path(args.work) / f"stage2-{name}")
        if args.rescore:  # the arm's finished checkpoint as it is (made by an earlier version, say)
            finals[name] = {"final": ckpt.final_checkpoint(out), "train_wall_s": None, "val": {}}
            if finals[name]["final"] is None:
                raise SystemExit(f"--rescore: {out} has no finished checkpoint")
            continue
        summary = _train(preset, 2, manifest, out, init_from)
        finals[name] = {
            "final": summary["final"],
            "train_wall_s": time.perf_counter() - t if not summary["skipped"] else None,
            "val": summary.get("metrics", {}),
        }
    src_cfg = presets["full"].model.source
    tok, source = load_tokenizer(src_cfg), load_source_model(src_cfg)
    docs = split_texts(manifest, "validation", args.eval_bytes)
    cfg = EvalConfig(max_bytes=args.eval_bytes, cute_tasks=())
    for f in finals.values():
        model, preset = load_checkpoint_model(f["final"])  # LoRA: merged on load
        rep = evaluate(
            docs, tok, source_model=source, byte_model=model, cfg=cfg, byte_length=preset.data.byte_slots
        )
        f["bpb"] = rep["byte_model"]["bits_per_byte"]
        f["source_bpb"] = rep["source"]["bits_per_byte"]
        f["bpb_lookahead"] = rep["byte_model"].get("bits_per_byte_lookahead")  # None before causal scoring
        f["bytes_per_patch"] = rep["byte_model"].get(
            "bytes_per_patch_causal", rep["byte_model"].get("bytes_per_patch")
        )
        f["eval_bytes"] = rep["text"]["bytes"]
    return finals


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="smollm2-135m", help="tiny: a smoke run of the script")
    ap.add_argument("--steps", type=int, default=60, help="Stage-2 steps per arm (the budget)")
    ap.add_argument(
        "--stage1-steps", type=int, default=150, help="Stage 1 here when --init-from is not given"
    )
    ap.add_argument("--init-from", help="a Stage-1 checkpoint (or stage folder) of the smollm2-135m preset")
    ap.add_argument("--manifest", help="the data manifest that checkpoint was trained on")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--lr-ratio", type=float, default=1.0)
    ap.add_argument("--timed-steps", type=int, default=4, help="part 1: timed steps per arm, interleaved")
    ap.add_argument("--eval-bytes", type=int, default=20_000)
    ap.add_argument("--work", default=str(ROOT / "var" / "bench" / "lora"))
    ap.add_argument("--skip-quality", action="store_true", help="part 1 only")
    ap.add_argument("--skip-cost", action="store_true", help="part 2 only")
    ap.add_argument(
        "--rescore", action="store_true", help="part 2: score the arms' finished checkpoints, no training"
    )
    args = ap.parse_args()

    presets = {"full": _preset(args, False), "lora": _preset(args, True)}
    manifest = _manifest(args, presets["full"])
    init_from = (
        args.init_from or _train(presets["full"], 1, manifest, str(Path(args.work) / "stage1"))["final"]
    )
    cost = None if args.skip_cost else step_cost(args, presets, init_from, manifest)
    qual = None if args.skip_quality else quality(args, presets, init_from, manifest)
    result = {"args": vars(args), "init_from": init_from, "manifest": manifest, "cost": cost, "quality": qual}
    Path(args.work).mkdir(parents=True, exist_ok=True)
    (Path(args.work) / "result.json").write_text(json.dumps(result, indent=1, default=str))
    _print_table(args, cost, qual)


def _print_table(args, cost: dict | None, qual: dict | None) -> None:
    mb = 1 / 2**20
    print(
        f"threads={torch.get_num_threads()} {args.preset} Stage 2, micro-batch as the preset, fp32; "
        f"LoRA rank {args.rank} alpha {args.alpha} on the default targets; {args.timed_steps} timed steps each"
    )
    print("| | full Stage 2 | LoRA Stage 2 | LoRA / full |")
    print("|---|---|---|---|")
    rows = [] if cost is None else _cost_rows(cost, mb)
    if qual:
        for key, label in (
            ("bpb", "bits per byte"),
            ("bpb_lookahead", "bits per byte, look-ahead boundaries"),
        ):
            if qual["full"].get(key) is not None:
                rows.append(
                    (f"{label} after {args.steps} steps", qual["full"][key], qual["lora"][key], "{:.4f}")
                )
    for name, a, b, fmt in rows:
        print(f"| {name} | {fmt.format(a)} | {fmt.format(b)} | {b / a:.3f}x |")
    if qual:
        print(
            f"source bits per byte on the same {qual['full']['eval_bytes']} bytes: {qual['full']['source_bpb']:.4f}"
        )


def _cost_rows(cost: dict, mb: float) -> list[tuple]:
    f, lo = cost["full"], cost["lora"]
    return [
        ("trainable parameters", f["trainable_params"], lo["trainable_params"], "{:,}"),
        ("gradients MB", f["grad_bytes"] * mb, lo["grad_bytes"] * mb, "{:.1f}"),
        ("AdamW state MB", f["optimizer_state_bytes"] * mb, lo["optimizer_state_bytes"] * mb, "{:.1f}"),
        ("one step's peak allocation MB", f["step_peak_bytes"] * mb, lo["step_peak_bytes"] * mb, "{:.1f}"),
        (
            "resident peak MB (weights + state + step)",
            f["resident_bytes"] * mb,
            lo["resident_bytes"] * mb,
            "{:.1f}",
        ),
        ("step time s (median)", f["step_s_median"], lo["step_s_median"], "{:.2f}"),
    ]


if __name__ == "__main__":
    main()
