"""Training throughput: a Stage-2 Bolmo step vs a training step of the source subword model.

Both train on the same text (the same windows of the offline Wikipedia extracts, SmolLM2
tokenizer), in the same precision (`--precision`: fp32, or bf16 autocast with fp32 master
weights), and a step is the
same work for both: forward, backward, gradient clipping and an AdamW update of every
trainable weight. Bolmo: `smollm2-135m` preset, Stage 2 (everything trained, predicted
boundaries, CE + 4 x BCE) on B windows of P tokens = 6P byte slots; the source:
SmolLM2-135M as a causal LM on the same B x P tokens. Throughput is counted in text bytes
(the bytes the window covers), so the ratio is Bolmo bytes/s over source bytes/s (goal
>= 0.7). Steps alternate (source, Bolmo, source, ...) so load changes hit both alike.

    .venv/bin/python benchmarks/bench_train.py [--windows 4] [--steps 3] [--window-tokens 64] [--precision fp32]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _batch(work: Path, preset, vocab, windows: int) -> dict:
    from bolmo_core.data import prepare_dataset
    from bolmo_core.loader import WindowLoader
    from bolmo_core.source import tiny_corpus

    docs = work / "docs.jsonl"
    with open(docs, "w") as f:
        for t in tiny_corpus(60_000):
            f.write(json.dumps({"text": t}) + "\n")
    manifest = prepare_dataset([str(docs)], preset.model.source, str(work / "data"), preset.data)
    return next(iter(WindowLoader.from_config(preset.data, manifest, vocab, windows)))


def _step(params, opt, loss_fn, precision: str) -> float:
    t = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        loss = loss_fn()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 0.5)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=4, help="windows per step (batch)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per model (after 1 warm-up step)")
    ap.add_argument("--window-tokens", type=int, default=64)
    # fp32 by default: CPUs without native bf16 (like the CI box) run bf16 matmuls ~40x slower.
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    args = ap.parse_args()

    from bolmo_core.config import get_preset
    from bolmo_core.model import BolmoModel
    from bolmo_core.source import load_source_model, load_tokenizer
    from bolmo_core.subword import SubwordVocab
    from bolmo_core.train import build_optimizer

    torch.manual_seed(0)
    preset = get_preset("smollm2-135m", {"data.window_tokens": args.window_tokens})
    vocab = SubwordVocab.from_tokenizer(load_tokenizer(preset.model.source))
    with tempfile.TemporaryDirectory() as tmp:
        batch = _batch(Path(tmp), preset, vocab, args.windows)
    text_bytes = int(batch["patch_lens"][:, 1:].sum())  # bytes of the tokens both models are trained on

    bolmo = BolmoModel.from_source(preset.model, vocab=vocab)
    bolmo.train()
    b_opt = build_optimizer(bolmo, preset.stage2)  # configures Stage 2: everything but the teacher trains
    b_params = [p for p in bolmo.parameters() if p.requires_grad]

    source = load_source_model(preset.model.source)
    source.train()
    s_params = list(source.parameters())
    s_opt = torch.optim.AdamW(s_params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    ids = batch["teacher_ids"]
    labels = torch.cat([ids[:, 1:], batch["teacher_next"][:, None]], 1)

    runs = {
        "source": lambda: _step(
            s_params,
            s_opt,
            lambda: torch.nn.functional.cross_entropy(
                source(input_ids=ids).logits.flatten(0, 1).float(), labels.flatten()
            ),
            args.precision,
        ),
        "bolmo": lambda: _step(
            b_params,
            b_opt,
            lambda: bolmo.stage2_loss(batch, preset.stage2.losses)[0],
            args.precision,
        ),
    }
    times: dict[str, list[float]] = {k: [] for k in runs}
    for fn in runs.values():  # warm-up (allocations, first-call overheads)
        fn()
    for i in range(args.steps):
        for k, fn in runs.items():
            times[k].append(fn())
            print(f"  step {i} {k}: {times[k][-1]:.2f} s", flush=True)

    bps = {k: text_bytes / min(v) for k, v in times.items()}
    print(
        f"threads={torch.get_num_threads()} windows={args.windows} x {args.window_tokens} tokens, "
        f"{text_bytes} text bytes per step, {args.precision}, fwd+bwd+clip+AdamW, best of {args.steps}"
    )
    print(f"{'model':<28}{'step s (best)':>14}{'bytes/s':>12}")
    print(f"{'source SmolLM2-135M':<28}{min(times['source']):>14.2f}{bps['source']:>12.1f}")
    print(f"{'Bolmo Stage 2 (smollm2)':<28}{min(times['bolmo']):>14.2f}{bps['bolmo']:>12.1f}")
    print(f"ratio Bolmo/source bytes/s: {bps['bolmo'] / bps['source']:.2f}x (goal >= 0.7x)")


if __name__ == "__main__":
    main()
