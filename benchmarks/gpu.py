"""Device benchmark in one command (issues 7, 12): training throughput, memory, MFU, generation speed,
Triton numerics, and the FSDP2 + sharded-checkpoint path.

    python benchmarks/gpu.py            # CUDA: olmo2-1b architecture; CPU: the tiny preset
    python benchmarks/gpu.py --device cpu --preset tiny

Builds the preset's source architecture with random weights (no hub access: the config comes
from `KNOWN_ARCHITECTURES` or the local tiny source), a synthetic subword vocabulary of the
source's size, and synthetic windows in the real batch format (docs/internals.md), then runs
Stage-1 and Stage-2 optimizer steps (fwd + bwd + clip + AdamW, fp32 master weights, bf16
autocast on CUDA; fp32 on the CPU, whose bf16 matmuls run ~80x slower than fp32 on the dev box), batch-1 and batch-8 generation, and (on CUDA) the Triton mLSTM against ours.
Then `fsdp_dcp`: the trainer's FSDP2 path on a one-rank process group (NCCL on CUDA, gloo on the
CPU): Stage-2 steps with bf16 parameters / fp32 reduction and activation checkpointing, a
sharded DCP checkpoint written, read back into the shards (bit-exact) and consolidated, with its
size and seconds, and the plan's per-step memory next to the measured peak (CUDA).
Prints ONE JSON line. Figures on random weights measure speed only, never quality. On a shared
CPU set OMP_NUM_THREADS=1: with busy cores, two spinning intra-op threads run ~10x slower.

FLOP model (bolmo_core.plan.window_flops; per optimizer step, B windows of P tokens / L byte slots; N_g = global block
parameters, N_loc = local weight matrices (no embeddings), attention per PaLM: 12 * layers * d * P^2
per window for fwd+bwd):
  Stage 1: teacher fwd 2*N_g*P + 1/3 attn; student through k frozen blocks fwd + activation grads
           4*N_g*(k/n)*P + 2/3 attn*(k/n); local 6*N_loc*L; teacher logits 2*d*V*P.
  Stage 2: global 6*N_g*P + attn; local 6*N_loc*L.
  The mLSTM cell itself (< 2% at the released sizes) and norms/elementwise ops are not counted.
MFU = counted FLOPs per second / peak: the datasheet bf16 dense peak for known GPUs, else the
best measured 1024^3 matmul rate on this device in the run's dtype (CPU: always measured).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bolmo_core import generate as gen  # noqa: E402
from bolmo_core.byte_tokenizer import BOS, OFFSET, PAD  # noqa: E402
from bolmo_core.config import get_preset  # noqa: E402
from bolmo_core.global_model import build_source_skeleton  # noqa: E402
from bolmo_core.loader import finish_batch  # noqa: E402
from bolmo_core.mlstm import get_mlstm_backend, mlstm_chunkwise  # noqa: E402
from bolmo_core.model import BolmoModel  # noqa: E402
from bolmo_core.plan import datasheet_peak, measured_matmul_flops, shapes, window_flops  # noqa: E402
from bolmo_core.subword import RetainedIndex, SubwordVocab  # noqa: E402

# ---------------------------------------------------------------- synthetic inputs


def synthetic_vocab(n: int, sep: int, pad: int, seed: int = 0) -> SubwordVocab:
    """n byte strings: the 256 single bytes, then random words (~4.4 bytes mean, half with a leading space)."""
    rng = np.random.default_rng(seed)
    letters = np.frombuffer(b"etaoinshrdlucmfwypvbgkqjxz", np.uint8)
    lens = rng.choice(np.arange(1, 10), size=n, p=[0.04, 0.12, 0.18, 0.2, 0.16, 0.12, 0.09, 0.05, 0.04])
    token_bytes = [bytes([b]) for b in range(min(n, 256))]
    for i in range(len(token_bytes), n):
        w = bytes(rng.choice(letters, lens[i]))
        token_bytes.append(b" " + w[1:] if rng.random() < 0.5 else w)
    special = {sep: b"<|endoftext|>", pad: b"<|pad|>"}
    for i, t in special.items():
        token_bytes[i] = t
    ws = torch.tensor([b[:1] in (b" ", b"\t", b"\n") and i not in special for i, b in enumerate(token_bytes)])
    single = np.arange(256, dtype=np.int64) if n >= 256 else np.full(256, -1, np.int64)
    return SubwordVocab(
        name="synthetic",
        token_bytes=token_bytes,
        special_ids=frozenset(special),
        doc_separator_id=sep,
        pad_id=pad,
        vocab_size=n,
        fingerprint=f"synthetic-{n}-{seed}",
        token_lens=np.array([len(b) for b in token_bytes], np.int64),
        single_byte_ids=single,
        whitespace_start_mask=ws,
        byte_fallback_id=sep,
    )


def synthetic_batch(vocab: SubwordVocab, index: RetainedIndex, B: int, P: int, L: int, rng) -> dict:
    """B windows of a random token stream (a separator every ~400 tokens), built as WindowLoader.make_batch does."""
    sep = vocab.doc_separator_id
    words = np.array([i for i in range(vocab.vocab_size) if i not in vocab.special_ids])
    input_ids = np.full((B, L), PAD, np.int64)
    patch_lens = np.zeros((B, P), np.int64)
    teacher = np.full((B, P), sep, np.int64)
    nxt = np.zeros(B, np.int64)
    for r in range(B):
        toks = rng.choice(words, P)
        toks[1:][rng.random(P - 1) < 1 / 400] = sep
        pieces = [[BOS]] + [
            [BOS] if t == sep else [b + OFFSET for b in vocab.token_bytes[t]] for t in toks[:-1]
        ]
        flat = [x for p in pieces for x in p][:L]
        input_ids[r, : len(flat)] = flat
        patch_lens[r] = [len(p) for p in pieces]
        teacher[r, 1:] = toks[:-1]
        nxt[r] = toks[-1]
    return finish_batch(input_ids, patch_lens, teacher, nxt, index, sep, vocab.pad_id)


# ---------------------------------------------------------------- measuring


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def peak_flops(dev: torch.device, bf16: bool) -> tuple[float, str]:
    if dev.type == "cuda" and bf16:
        name = torch.cuda.get_device_name(dev)
        peak = datasheet_peak(name)
        if peak:
            return peak, f"datasheet bf16 dense ({name})"
    dtype = torch.bfloat16 if bf16 else torch.float32
    return measured_matmul_flops(dev, dtype), f"measured best {str(dtype)[6:]} 1024^3 matmul on this device"


def param_counts(model: BolmoModel) -> dict:
    emb = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    glob = sum(p.numel() for p in model.global_model.parameters())
    skip = (
        {id(p) for p in model.teacher.parameters()} | {id(p) for p in model.global_model.parameters()} | emb
    )
    local = sum(p.numel() for p in model.parameters() if id(p) not in skip)
    return {"global_blocks": glob, "local_non_embedding": local, "total_trainable_stage2": model.num_params()}


def step_flops(model: BolmoModel, stage_cfg, B: int, P: int, L: int) -> float:
    """Model FLOPs of one step of B windows: the plan's count (bolmo_core.plan.window_flops)."""
    return B * window_flops(shapes(model, stage_cfg), stage_cfg.stage, P, L)[0]


def train_stage(model, stage_cfg, vocab, index, P, L, micro, steps, warmup, dev, rng, bf16) -> dict:
    """Timed optimizer steps; on CUDA OOM the micro batch is halved and the stage restarts."""
    while True:
        try:
            return _train(model, stage_cfg, vocab, index, P, L, micro, steps, warmup, dev, rng, bf16)
        except torch.cuda.OutOfMemoryError:
            if micro == 1:
                raise
            micro //= 2
            torch.cuda.empty_cache()


def _train(model, stage_cfg, vocab, index, P, L, micro, steps, warmup, dev, rng, bf16) -> dict:
    groups = model.param_groups(stage_cfg)
    o = stage_cfg.optim
    opt = torch.optim.AdamW(groups, betas=o.betas, eps=o.eps, fused=dev.type == "cuda")
    params = [p for g in groups for p in g["params"]]
    batch = {k: v.to(dev) for k, v in synthetic_batch(vocab, index, micro, P, L, rng).items()}
    model.train()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = 0.0
    for s in range(warmup + steps):
        if s == warmup:
            _sync(dev)
            t0 = time.perf_counter()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            loss, metrics = model.loss(batch, stage_cfg)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, o.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    _sync(dev)
    dt = time.perf_counter() - t0
    del opt
    flops = step_flops(model, stage_cfg, micro, P, L)
    out = {
        "micro_batch": micro,
        "steps": steps,
        "step_s": dt / steps,
        "tokens_per_s": micro * P * steps / dt,
        "bytes_per_s": float(batch["byte_mask"].sum()) * steps / dt,
        "byte_slots_per_s": micro * L * steps / dt,
        "flops_per_step": flops,
        "flops_per_s": flops * steps / dt,
        "loss": metrics["loss"],
    }
    if dev.type == "cuda":
        out["peak_mem_bytes"] = torch.cuda.max_memory_allocated(dev)
    return out


def generation_speed(model, vocab, batch: int, new_bytes: int, rng, precision: str) -> dict:
    words = [
        vocab.token_bytes[i] for i in rng.integers(256, vocab.vocab_size, 200) if i not in vocab.special_ids
    ]
    prompt = b"".join(words)[:64]
    gen.generate_ids(
        model, [prompt] * batch, max_new_bytes=4, stop_on_eos=False, precision=precision
    )  # warm-up
    dev = next(model.parameters()).device
    _sync(dev)
    t = time.perf_counter()
    out = gen.generate_ids(
        model, [prompt] * batch, max_new_bytes=new_bytes, stop_on_eos=False, precision=precision
    )
    _sync(dev)
    dt = time.perf_counter() - t
    n = sum(len(f) for f in out.fused_ids)
    return {"batch": batch, "new_bytes": n, "s": dt, "bytes_per_s": n / dt}


def triton_check(dev: torch.device, H: int, Dqk: int, Dv: int, chunk: int, L: int = 2048) -> dict:
    """Triton xl_chunk vs our chunkwise mLSTM in fp32: outputs, carried state, gradients."""
    if dev.type != "cuda":
        return {"skipped": "no CUDA device: mlstm_kernels' Triton kernels run on CUDA only"}
    triton = get_mlstm_backend("triton", dev)
    g = torch.Generator(device=dev).manual_seed(0)
    r = lambda *s: torch.randn(*s, device=dev, generator=g)
    q, k, v = r(2, H, L, Dqk), r(2, H, L, Dqk), r(2, H, L, Dv)
    i, f = r(2, H, L), 3.0 + r(2, H, L)  # forget gates near 1, as trained models have them
    half = L // 2
    _, s0 = mlstm_chunkwise(
        q[:, :, :half],
        k[:, :, :half],
        v[:, :, :half],
        i[:, :, :half],
        f[:, :, :half],
        chunk_size=chunk,
        return_last_state=True,
    )
    rest = [t[:, :, half:] for t in (q, k, v, i, f)]
    h_ref, s_ref = mlstm_chunkwise(*rest, chunk_size=chunk, initial_state=s0, return_last_state=True)
    h_tri, s_tri = triton(*rest, chunk_size=chunk, initial_state=s0, return_last_state=True)
    out = {
        "kernel": triton.__name__,
        "shape": [2, H, L, Dqk, Dv],
        "chunk_size": chunk,
        "h_max_abs_diff": float((h_ref - h_tri).abs().max()),
        "h_max_abs": float(h_ref.abs().max()),
        "state_C_max_rel_diff": float((s_ref[0] - s_tri[0]).abs().max() / s_ref[0].abs().max()),
        "state_m_max_abs_diff": float((s_ref[2] - s_tri[2]).abs().max()),
    }
    grads = {}
    for name, fn in (("ref", mlstm_chunkwise), ("tri", triton)):
        xs = [t.clone().requires_grad_(True) for t in (q, k, v, i, f)]
        fn(*xs, chunk_size=chunk).square().sum().backward()
        grads[name] = [x.grad for x in xs]
    out["grad_max_rel_diff"] = {
        n: float((a - b).abs().max() / a.abs().max()) for n, a, b in zip("qkvif", grads["ref"], grads["tri"])
    }
    return out


# ---------------------------------------------------------------- FSDP + sharded checkpoints


def _process_group(dev: torch.device) -> bool:
    """A one-process group (NCCL on CUDA, gloo on the CPU) unless one exists; True if started here."""
    import socket

    import torch.distributed as dist

    if dist.is_initialized():
        return False
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    backend = "nccl" if dev.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    return True


def fsdp_model(preset, full_state: dict, vocab, dev: torch.device, stage_cfg):
    """The trainer's FSDP2 path (bolmo_core.fsdp): meta build, activation checkpointing, shard, load."""
    from transformers import AutoModelForCausalLM

    from bolmo_core import fsdp
    from bolmo_core.global_model import source_config
    from bolmo_core.train import StageObjective

    with fsdp.meta_parameters():
        lm = AutoModelForCausalLM.from_config(source_config(preset.model.source), attn_implementation="sdpa")
        model = BolmoModel(preset.model, lm, vocab)
    model.configure_stage(stage_cfg)
    fsdp.apply_activation_checkpointing(model)
    objective = StageObjective(model, stage_cfg.stage, stage_cfg.losses)
    fsdp.shard(objective, model, fsdp.device_mesh(dev, 1), stage_cfg.precision)
    fsdp.materialize(objective, dev)
    fsdp.load_full_state(model, full_state)
    return model, objective


def fsdp_dcp_check(preset, full_model, vocab, index, dev, steps: int, rng, bf16: bool) -> dict:
    """Stage-2 steps under FSDP2 (bf16 parameters, fp32 reduce, activation checkpointing), a sharded
    DCP checkpoint written, read back into the same shards and consolidated; timings, sizes, and
    the plan's per-step memory next to the measured one (CUDA)."""
    import copy

    import torch.distributed as dist

    from bolmo_core import fsdp
    from bolmo_core.plan import Hardware, plan
    from bolmo_core.train import build_optimizer

    started = _process_group(dev)
    stage_cfg = copy.deepcopy(preset.stage2)
    stage_cfg.precision, stage_cfg.activation_checkpointing = ("bf16" if bf16 else "fp32"), True
    model, objective = fsdp_model(preset, full_model.state_dict(), vocab, dev, stage_cfg)
    opt = build_optimizer(model, stage_cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    P, L, B = preset.data.window_tokens, preset.data.byte_slots, stage_cfg.micro_batch
    batch = {k: v.to(dev) for k, v in synthetic_batch(vocab, index, B, P, L, rng).items()}
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    for _ in range(steps):
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            loss, _ = objective(batch)
        loss.backward()
        fsdp.clip_grad_norm(params, stage_cfg.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    _sync(dev)
    out = {"steps": steps, "step_s": (time.perf_counter() - t0) / steps, "loss": float(loss.detach())}
    if dev.type == "cuda":
        out["step_peak_mem_bytes"] = torch.cuda.max_memory_allocated(dev) - base
    st = plan(preset.with_overrides({"stage2.activation_checkpointing": True, "stage2.precision": stage_cfg.precision}),
              Hardware(gpus=1, device=dev.type), sharding="fsdp").stages[1]  # fmt: skip
    out["plan_step_mem_bytes"] = sum(
        st.memory[k] for k in ("activations", "gradients", "weights (working copies)")
    )
    out.update(dcp_round_trip(model, opt, dev))
    if started:
        dist.destroy_process_group()
    return out


def dcp_round_trip(model, opt, dev) -> dict:
    """Save the sharded state through DCP, overwrite the shards, load them back, consolidate."""
    import tempfile

    import torch.distributed as dist

    from bolmo_core import checkpoint as ckpt
    from bolmo_core.train import load_sharded_state, sharded_state

    with tempfile.TemporaryDirectory(prefix="byteify-dcp-") as tmp:
        kept = {n: p.detach().to_local().clone() for n, p in model.named_parameters()}
        _sync(dev)
        t = time.perf_counter()
        uri = ckpt.save_checkpoint(tmp, "step-000001", rank=0, world_size=1, barrier=dist.barrier,
                                   rank_state={}, sharded_state=sharded_state(model, opt), scheduler_state={},
                                   trainer_state={"step": 1}, config={})  # fmt: skip
        save_s = time.perf_counter() - t
        size = sum(f.stat().st_size for f in Path(uri, "dcp").iterdir())
        with torch.no_grad():
            for p in model.parameters():
                p.to_local().zero_()
        t = time.perf_counter()
        target = sharded_state(model, opt)
        ckpt.load_checkpoint(uri, 0, target)
        load_sharded_state(model, opt, target)
        _sync(dev)
        load_s = time.perf_counter() - t
        same = all(torch.equal(kept[n], p.detach().to_local()) for n, p in model.named_parameters())
        t = time.perf_counter()
        full = ckpt.consolidated_model_state(uri)
        consolidate_s = time.perf_counter() - t
    return {
        "dcp_bytes": size,
        "dcp_save_s": save_s,
        "dcp_load_s": load_s,
        "dcp_consolidate_s": consolidate_s,
        "dcp_save_gb_per_s": size / save_s / 1e9,
        "dcp_round_trip_exact": same,
        "dcp_consolidated_tensors": len(full),
    }


# ---------------------------------------------------------------- main


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda[:i]")
    ap.add_argument("--preset", default=None, help="default: olmo2-1b on CUDA, tiny on the CPU")
    ap.add_argument(
        "--steps", type=int, default=None, help="timed optimizer steps per stage (default 3 CUDA, 2 CPU)"
    )
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--micro-batch", type=int, default=None, help="windows per step (default: the stage's)")
    ap.add_argument(
        "--gen-bytes", type=int, default=None, help="new bytes per row (default 128 CUDA, 16 CPU)"
    )
    ap.add_argument("--kernel", default="auto", help="LocalConfig.kernel: auto | torch | triton")
    ap.add_argument(
        "--precision",
        default=None,
        choices=("bf16", "fp32"),
        help="autocast dtype (default bf16 on CUDA, fp32 on the CPU, where bf16 matmuls are slow)",
    )
    a = ap.parse_args(argv)
    t_start = time.perf_counter()
    dev = torch.device(
        "cuda"
        if a.device == "auto" and torch.cuda.is_available()
        else "cpu"
        if a.device == "auto"
        else a.device
    )
    preset = get_preset(a.preset or ("olmo2-1b" if dev.type == "cuda" else "tiny"))
    preset.model.local.kernel = a.kernel
    precision = a.precision or ("bf16" if dev.type == "cuda" else "fp32")
    bf16 = precision == "bf16"
    steps = a.steps or (3 if dev.type == "cuda" else 2)
    P, L = preset.data.window_tokens, preset.data.byte_slots
    torch.manual_seed(0)
    rng = np.random.default_rng(0)

    src_lm = build_source_skeleton(preset.model.source, device=dev)  # random weights, fp32 master copy
    cfg = src_lm.config
    sep = cfg.eos_token_id if cfg.eos_token_id is not None else cfg.vocab_size - 1
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else sep
    vocab = synthetic_vocab(cfg.vocab_size, int(sep), int(pad))
    index = RetainedIndex(vocab)
    model = BolmoModel(preset.model, src_lm, vocab).to(dev)
    gen._INDEXES[model] = index  # generation's suffix index: the synthetic vocabulary, not a hub tokenizer

    out = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "preset": preset.name,
        "window_tokens": P,
        "byte_slots": L,
        "precision": f"{precision} autocast, fp32 weights",
        "mlstm_kernel": get_mlstm_backend(a.kernel, dev).__name__,
        "attn_implementation": model.global_model.config._attn_implementation,
        "params": param_counts(model),
        "torch_threads": torch.get_num_threads(),
    }
    peak, peak_src = peak_flops(dev, bf16)
    out["peak_flops"], out["peak_source"] = peak, peak_src
    for stage_cfg in (preset.stage1, preset.stage2):
        micro = a.micro_batch or stage_cfg.micro_batch
        out[f"stage{stage_cfg.stage}"] = r = train_stage(
            model, stage_cfg, vocab, index, P, L, micro, steps, a.warmup, dev, rng, bf16
        )
        r["mfu"] = r["flops_per_s"] / peak
    model.zero_grad(set_to_none=True)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    new = a.gen_bytes or (128 if dev.type == "cuda" else 16)
    out["generation"] = {f"batch{b}": generation_speed(model, vocab, b, new, rng, precision) for b in (1, 8)}
    out["fsdp_dcp"] = fsdp_dcp_check(preset, model, vocab, index, dev, steps, rng, bf16)
    m = model.local_encoder.blocks[0].mlstm
    out["triton_check"] = triton_check(dev, m.h, m.dqk // m.h, m.d // m.h, preset.model.local.chunk_size)
    # headline fields (Stage 2: the whole model trains)
    s2 = out["stage2"]
    out.update(
        tokens_per_s=s2["tokens_per_s"],
        bytes_per_s=s2["bytes_per_s"],
        mfu=s2["mfu"],
        gen_bytes_per_s_b1=out["generation"]["batch1"]["bytes_per_s"],
        gen_bytes_per_s_b8=out["generation"]["batch8"]["bytes_per_s"],
    )
    if dev.type == "cuda":
        out["peak_mem_bytes"] = max(out["stage1"]["peak_mem_bytes"], s2["peak_mem_bytes"])
        out["peak_mem_kind"] = "torch.cuda.max_memory_allocated"
    else:
        out["peak_mem_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        out["peak_mem_kind"] = "process max RSS"
    out["flop_model"] = (
        "stage1: 2*N_g*P + attn/3 (teacher) + 4*N_g*(k/n)*P + 2/3*attn*(k/n) (student, frozen blocks) "
        "+ 6*N_loc*L + 2*d*V*P (teacher logits); stage2: 6*N_g*P + attn + 6*N_loc*L; "
        "attn = 12*n*d*P^2; per window"
    )
    out["wall_s"] = time.perf_counter() - t_start
    print(json.dumps(out, sort_keys=True))
    return out


if __name__ == "__main__":
    main()
