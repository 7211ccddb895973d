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

`--stage1-losses`: instead, the cost of Stage-1 loss options side by side on the same batch
(issue 13): the paper's losses (L2 + CE + binarised KL + BCE), + the exact byte-level targets
(`losses.byte_kl=1`), byte-level targets replacing the binarised KL, and + the soft boundary
target. Each arm is a full Stage-1 optimizer step (fwd + bwd + clip + AdamW over the local
parts, frozen global blocks), arms interleaved step by step; best and median per arm and the
ratio to the paper's losses, in CPU seconds of this process (`time.process_time`, one thread:
what a step computes, less exposed than wall time to other jobs on a shared box), plus the
teacher's part alone (logits -> token log-probs, whitespace mass, and the targets).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_train.py --stage1-losses [--steps 8]
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


def _step(params, opt, loss_fn, precision: str, clock=time.perf_counter) -> float:
    t = clock()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        loss = loss_fn()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 0.5)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return clock() - t


STAGE1_ARMS = {
    "paper losses": {},
    "+ byte_kl": {"byte_kl": 1.0},
    "byte_kl instead of distill": {"byte_kl": 1.0, "distill": 0.0},
    "+ byte_kl + soft boundary": {"byte_kl": 1.0, "boundary_soft": 0.5},
}


def stage1_losses(args, preset, vocab, batch) -> None:
    """Stage-1 step time per loss option, interleaved, against the paper's losses."""
    import dataclasses
    import statistics

    from bolmo_core.model import BolmoModel
    from bolmo_core.train import build_optimizer

    model = BolmoModel.from_source(preset.model, vocab=vocab)
    model.train()
    opt = build_optimizer(model, preset.stage1)  # configures Stage 1: frozen global blocks and teacher
    params = [p for p in model.parameters() if p.requires_grad]
    arms = {k: dataclasses.replace(preset.stage1.losses, **v) for k, v in STAGE1_ARMS.items()}
    clock = time.process_time
    runs = {
        k: (lambda w=w: _step(params, opt, lambda: model.stage1_loss(batch, w)[0], args.precision, clock))
        for k, w in arms.items()
    }
    runs.update(_teacher_parts(model, batch, clock))
    times: dict[str, list[float]] = {k: [] for k in runs}
    for fn in runs.values():  # warm-up, and the byte-target table is built once here
        fn()
    for i in range(args.steps):
        for k, fn in runs.items():
            times[k].append(fn())
        print(f"  round {i}: " + "  ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()), flush=True)
    print(
        f"threads={torch.get_num_threads()} windows={args.windows} x {args.window_tokens} tokens, Stage 1, "
        f"{args.precision}, {args.steps} interleaved rounds, CPU seconds (process_time)"
    )
    print(f"{'arm':<34}{'best s':>9}{'median s':>10}{'best ratio':>12}{'median ratio':>14}")
    for group, base in (("step", "paper losses"), ("teacher", "teacher: paper losses")):
        bb, bm = min(times[base]), statistics.median(times[base])
        for k, v in times.items():
            if k.startswith("teacher") == (group == "teacher"):
                b, m = min(v), statistics.median(v)
                print(f"{k:<34}{b:>9.3f}{m:>10.3f}{b / bb:>12.3f}{m / bm:>14.3f}")


def _teacher_parts(model, batch, clock) -> dict:
    """The teacher's part of a Stage-1 loss alone: frozen blocks' output -> what the losses read."""
    from bolmo_core import byte_targets

    with torch.no_grad():
        t_final = model.global_model(model.teacher.embed(batch["teacher_ids"])).hidden
    tokens = byte_targets.patch_tokens(model.target_table, batch)

    def timed(byte_tokens):
        t = clock()
        model._teacher_token_logp(t_final, batch["teacher_ids"], True, byte_tokens)
        return clock() - t

    return {"teacher: paper losses": lambda: timed(None), "teacher: + byte targets": lambda: timed(tokens)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=4, help="windows per step (batch)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per model (after 1 warm-up step)")
    ap.add_argument("--window-tokens", type=int, default=64)
    # fp32 by default: CPUs without native bf16 (like the CI box) run bf16 matmuls ~40x slower.
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--stage1-losses", action="store_true", help="compare Stage-1 loss options instead")
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
    if args.stage1_losses:
        stage1_losses(args, preset, vocab, batch)
        return

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
