"""Generation speed, side by side on the CPU: the byte model vs its source's HF `generate` (KV cache).

Byte model: the smollm2-135m preset (real SmolLM2-135M blocks as the global model, init-only local
modules). An untrained model's boundary flags are arbitrary, so, like the reference benchmark
("random generation steps marked as boundaries", docs/architecture.md §11.5), a hook on the byte head sets each
row's flag at random with p = 1 / (the source's bytes per token in this very run): the byte model
runs its global model as often per byte as a trained Bolmo, which mimics the source's
segmentation, would. The actual bytes/patch is printed. Source:
SmolLM2-135M-Instruct, greedy, `min_new_tokens` so nothing stops early. bytes/s = generated
bytes / wall time of the whole call (prefill included, same prompts). Greedy everywhere. The source's
own batch-8 speed-up is printed too: on a CPU it shows how much batching a same-size global model
can gain at all on this machine (small-batch matmuls turn compute-bound), next to the byte model's.

    .venv/bin/python benchmarks/bench_generate.py [--threads 1] [--new-bytes 96] [--repeats 2] [--precision fp32|bf16]

`--olmo3`: the sliding-window path instead (issue 12). The global model is an Olmo 3 architecture
of SmolLM2-135M's shape (30 blocks, d=576, random weights, every 4th block full attention, the
others a sliding window of 16 patches, which every row crosses); batch 8 with its rows
generated together (per-row window masks) vs the same 8 rows one at a time (what generation did
for sliding-window sources before), and batch 1, side by side, same random boundary flags.

`--against REV`: this tree's generation vs `bolmo_core/generate.py` as of git revision REV (loaded
from `git show`, next to this tree's other modules), batch 1 and 8, interleaved in one process:
wall and CPU-time bytes/s and the median of the paired ratios (CPU time is steadier on a shared box).
"""

from __future__ import annotations

import argparse
import time

import torch

from bolmo_core.config import get_preset
from bolmo_core.generate import generate_ids
from bolmo_core.model import BolmoModel
from bolmo_core.source import load_source_config, load_source_model, load_tokenizer

PROMPT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
    "combined movable metal type, oil-based ink and a wooden press into a practical system. "
)


def source_bytes_per_s(model, tok, new_bytes: int, precision: str, batch: int = 1) -> tuple[float, float]:
    """(bytes/s, bytes/token) of HF greedy generate over `batch` prompts of different lengths
    (left-padded); tokens are sized to give about `new_bytes` bytes per row."""
    tok.padding_side = "left"
    prompts = [PROMPT[: len(PROMPT) - 7 * r] for r in range(batch)]
    enc = tok(prompts, return_tensors="pt", padding=True)
    n_tok = max(8, round(new_bytes / 4.0))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    kw = dict(max_new_tokens=n_tok, min_new_tokens=n_tok, do_sample=False, use_cache=True, pad_token_id=pad)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        model.generate(
            **enc, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=pad
        )  # warm-up
        t = time.perf_counter()
        out = model.generate(**enc, **kw)
        dt = time.perf_counter() - t
    new = out[:, enc["input_ids"].shape[1] :]
    n_bytes = sum(len(tok.decode(row, skip_special_tokens=False).encode("utf-8")) for row in new)
    return n_bytes / dt, n_bytes / new.numel()


def random_flags(model, p: float, seed: int = 0):
    """Forward hook on the byte head: each position's boundary flag is on with probability p."""
    gen = torch.Generator().manual_seed(seed)

    def hook(mod, inp, out):
        on = torch.rand(out.shape[:-1], generator=gen) < p
        shift = torch.where(on, 100.0, -100.0).to(out.dtype)[..., None]
        return torch.cat([out[..., :260], out[..., 260:] + shift], -1)

    return model.lm_head.register_forward_hook(hook)


def byte_run(model, batch: int, new_bytes: int, precision: str):
    prompts = [PROMPT[: len(PROMPT) - 7 * r] for r in range(batch)]  # different lengths on purpose
    t = time.perf_counter()
    out = generate_ids(model, prompts, max_new_bytes=new_bytes, stop_on_eos=False, precision=precision)
    dt = time.perf_counter() - t
    n_bytes = sum(len(s) for s in out.sequences)
    patches = sum(sum(1 for v in ids if v >= 260) for ids in out.fused_ids)
    return n_bytes / dt, n_bytes / max(patches, 1)


def olmo3_of_smollm2_shape(preset, window: int = 16) -> BolmoModel:
    """SmolLM2-135M's shape as an Olmo 3 source (random weights): 3 sliding-window blocks to 1 full."""
    from transformers import AutoModelForCausalLM, Olmo3Config

    tok = load_tokenizer(preset.model.source)
    smol = load_source_config(preset.model.source)  # SmolLM2-135M's own config: its shape, not restated
    shape = (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
    )
    cfg = Olmo3Config(
        **{k: getattr(smol, k) for k in shape},
        vocab_size=len(tok),
        sliding_window=window,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    src = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    return BolmoModel.from_source(preset.model, source_model=src).eval()


def sliding(args) -> None:
    model = olmo3_of_smollm2_shape(get_preset("smollm2-135m"))
    random_flags(model, 1.0 / 5.71)  # SmolLM2's bytes per token on this prompt (the default run prints it)
    prompts = [PROMPT[: len(PROMPT) - 7 * r] for r in range(8)]
    patches = generate_ids(
        model, prompts, max_new_bytes=args.new_bytes, stop_on_eos=False
    ).n_patches  # warm-up
    best = {"b1": 0.0, "b8": 0.0, "alone": 0.0}
    for _ in range(args.repeats):  # interleaved, best of each
        best["b1"] = max(best["b1"], byte_run(model, 1, args.new_bytes, args.precision)[0])
        best["b8"] = max(best["b8"], byte_run(model, 8, args.new_bytes, args.precision)[0])
        t = time.perf_counter()
        kw = dict(max_new_bytes=args.new_bytes, stop_on_eos=False, precision=args.precision)
        n = sum(len(generate_ids(model, [p], **kw).sequences[0]) for p in prompts)
        best["alone"] = max(best["alone"], n / (time.perf_counter() - t))
    print(f"Olmo 3 of SmolLM2-135M's shape (window 16 patches), threads={args.threads} {args.precision}")
    print(f"new_bytes={args.new_bytes} per row, best of {args.repeats}")
    print("| run | bytes/s | ratio |")
    print("|---|---|---|")
    print(f"| byte model, batch 1 | {best['b1']:.1f} | 1.00x |")
    print(f"| byte model, 8 rows one at a time | {best['alone']:.1f} | {best['alone'] / best['b1']:.2f}x |")
    print(f"| byte model, batch 8 (rows together) | {best['b8']:.1f} | {best['b8'] / best['b1']:.2f}x |")
    print(f"patches per row (batch 8): {patches}")


def generate_at(rev: str):
    """`bolmo_core/generate.py` as of git revision `rev`, imported beside this tree's modules."""
    import importlib.util
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    src = subprocess.run(
        ["git", "show", f"{rev}:bolmo_core/generate.py"], cwd=root, capture_output=True, check=True
    ).stdout
    path = Path(tempfile.mkdtemp()) / "generate.py"
    path.write_bytes(src)
    name = "bolmo_core._generate_at_rev"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def against(args) -> None:
    import statistics

    import bolmo_core.generate as now

    then = generate_at(args.against)
    torch.manual_seed(0)
    model = BolmoModel.from_source(get_preset("smollm2-135m").model).eval()
    random_flags(model, 1.0 / 5.71)  # SmolLM2's bytes per token on this prompt (the default run prints it)

    def run(mod, batch: int) -> tuple[float, float]:
        prompts = [PROMPT[: len(PROMPT) - 7 * r] for r in range(batch)]
        wall, cpu = time.perf_counter(), time.process_time()
        out = mod.generate_ids(model, prompts, max_new_bytes=args.new_bytes, stop_on_eos=False)
        n = sum(len(s) for s in out.sequences)
        return n / (time.perf_counter() - wall), n / (time.process_time() - cpu)

    run(then, 2), run(now, 2)  # warm-up
    print(
        f"this tree vs generate.py at {args.against}, new_bytes={args.new_bytes}, {args.repeats} paired runs"
    )
    print(
        "| batch | bytes/s then (wall, cpu) | bytes/s now (wall, cpu) | median ratio now/then (wall, cpu) |"
    )
    print("|---|---|---|---|")
    for batch in (1, 8):
        pairs = [(run(then, batch), run(now, batch)) for _ in range(args.repeats)]
        med = [statistics.median(p[k][i] for p in pairs) for k in (0, 1) for i in (0, 1)]
        ratio = [statistics.median(b[i] / a[i] for a, b in pairs) for i in (0, 1)]
        print(
            f"| {batch} | {med[0]:.1f}, {med[1]:.1f} | {med[2]:.1f}, {med[3]:.1f} | {ratio[0]:.3f}, {ratio[1]:.3f} |"
        )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--new-bytes", type=int, default=96)
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--olmo3", action="store_true", help="the sliding-window path (see the docstring)")
    ap.add_argument("--against", metavar="REV", help="this tree's generation vs generate.py at git REV")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.olmo3:
        return sliding(args)
    if args.against:
        return against(args)
    preset = get_preset("smollm2-135m")
    src = load_source_model(preset.model.source)
    tok = load_tokenizer(preset.model.source)
    torch.manual_seed(0)
    model = BolmoModel.from_source(preset.model).eval()
    if args.precision == "bf16":
        src = src.to(torch.bfloat16)
        model.global_model.to(torch.bfloat16)
    src_bps, src_bpt = source_bytes_per_s(src, tok, args.new_bytes, args.precision)
    src8 = source_bytes_per_s(src, tok, args.new_bytes, args.precision, batch=8)[0]
    random_flags(model, 1.0 / src_bpt)
    byte_run(model, 1, 8, args.precision)  # warm-up
    b1, bpp1 = byte_run(model, 1, args.new_bytes, args.precision)
    b8, bpp8 = byte_run(model, 8, args.new_bytes, args.precision)
    for _ in range(args.repeats - 1):  # interleaved repeats, best of each: a shared box is noisy
        src_bps = max(src_bps, source_bytes_per_s(src, tok, args.new_bytes, args.precision)[0])
        src8 = max(src8, source_bytes_per_s(src, tok, args.new_bytes, args.precision, batch=8)[0])
        b1 = max(b1, byte_run(model, 1, args.new_bytes, args.precision)[0])
        b8 = max(b8, byte_run(model, 8, args.new_bytes, args.precision)[0])
    print(
        f"threads={args.threads} precision={args.precision} new_bytes={args.new_bytes} per row, "
        f"best of {args.repeats}"
    )
    print("| run | bytes/s | bytes per patch/token | ratio |")
    print("|---|---|---|---|")
    print(f"| source HF generate, batch 1 | {src_bps:.1f} | {src_bpt:.2f} | 1.00x source |")
    print(f"| source HF generate, batch 8 | {src8:.1f} | - | {src8 / src_bps:.2f}x source batch 1 |")
    print(f"| byte model, batch 1 | {b1:.1f} | {bpp1:.2f} | {b1 / src_bps:.2f}x source |")
    print(
        f"| byte model, batch 8 | {b8:.1f} | {bpp8:.2f} | {b8 / b1:.2f}x byte batch 1 ({b8 / src_bps:.2f}x source) |"
    )


if __name__ == "__main__":
    main()
