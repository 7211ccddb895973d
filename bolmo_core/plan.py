"""The plan before the spend: what a preset needs per GPU and how long each stage takes (docs/scale.md).

`plan(preset, Hardware(...))` builds the model on the meta device (no weights, no download:
the source's config, or `KNOWN_ARCHITECTURES` offline), counts parameters per part, and for
each stage reports, per GPU:

* weights: every parameter in fp32 (the master copy; the frozen teacher and, in Stage 1, the
  global blocks included), divided by the ranks under FSDP; plus the working copies: under
  FSDP the root unit and the two largest units gathered in the compute dtype (one computing,
  one prefetched), under DDP with bf16 autocast the bf16 casts of the weights that backward
  needs;
* gradients: fp32, trainable parameters only (DDP keeps a second copy in its buckets;
  FSDP keeps a shard and, transiently, one unit's unsharded gradient);
* optimizer: AdamW's two fp32 moments per trainable parameter (sharded under FSDP);
* activations: what autograd keeps for backward over one micro-batch, plus what backward
  itself allocates at its peak; counted tensor by tensor from the code (`activation_terms`),
  with and without activation checkpointing.

Then tokens, text bytes and byte slots per stage, FLOPs per optimizer step (the model in
`step_flops`, counted the same way as benchmarks/gpu.py's MFU), and hours per stage at a stated
hardware utilisation. A stage that does not fit is refused (`PlanError`) with one line saying
what to change.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from .config import Preset, StageConfig

GB = 1e9
GIB = 2**30
FUSED_VOCAB = 520  # byte head outputs (docs/architecture.md §1.1)
# bf16 dense tensor-core peaks (FLOP/s) from the vendors' datasheets, matched on the device name.
GPU_PEAKS = {
    "H200": 989.4e12,
    "H100": 989.4e12,
    "GH200": 989.4e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
    "L4": 121e12,
    "B200": 2250e12,
}
DEFAULT_PEAK_FLOPS = GPU_PEAKS["H100"]


class PlanError(ValueError):
    """A configuration that does not fit, with one line saying what to change."""


@dataclass
class Hardware:
    gpus: int = 8
    gpu_memory: float = 80 * GB  # bytes per GPU
    peak_flops: float = DEFAULT_PEAK_FLOPS  # per GPU, in the compute dtype
    utilisation: float = 0.40  # achieved / peak hardware FLOPs, all recomputation included
    # CUDA context, NCCL buffers and allocator fragmentation: the rest is usable.
    reserved_fraction: float = 0.10
    reserved_bytes: float = 2 * GIB
    device: str = "cuda"  # "cpu": the CPU rehearsal's kernels (our torch mLSTM) instead of Triton

    @property
    def usable(self) -> float:
        return self.gpu_memory * (1 - self.reserved_fraction) - self.reserved_bytes


def datasheet_peak(device_name: str) -> float | None:
    for key in sorted(GPU_PEAKS, key=len, reverse=True):
        if key in device_name:
            return GPU_PEAKS[key]
    return None


def detect_hardware(processes: int) -> Hardware:
    """This machine as `Hardware`: its GPUs (memory, datasheet peak), else its CPU (RAM per process,
    a measured fp32 matmul peak; the CPU rehearsal's kernels)."""
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        peak = datasheet_peak(props.name) or DEFAULT_PEAK_FLOPS
        return Hardware(gpus=processes, gpu_memory=float(props.total_memory), peak_flops=peak)
    import os

    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return Hardware(
        gpus=processes,
        gpu_memory=ram / processes,
        peak_flops=measured_matmul_flops(torch.device("cpu"), torch.float32, n=512),
        device="cpu",
        reserved_fraction=0.25,  # the OS, the data loader and the other processes share the RAM
        reserved_bytes=0.0,
    )


def measured_matmul_flops(dev: torch.device, dtype: torch.dtype, n: int = 1024, reps: int = 3) -> float:
    """Best FLOP/s of n x n x n matmuls on `dev` in `dtype`."""
    import time

    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    a @ b
    best = 0.0
    for _ in range(reps):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t = time.perf_counter()
        a @ b
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        best = max(best, 2 * n**3 / (time.perf_counter() - t))
    return best


def parse_bytes(text: str) -> float:
    """'80GB', '141 GB', '24GiB', '512MiB' -> bytes."""
    t = text.strip().replace(" ", "")
    units = {"GIB": GIB, "MIB": 2**20, "TB": 1e12, "GB": GB, "MB": 1e6, "B": 1}
    for u, scale in units.items():
        if t.upper().endswith(u):
            try:
                return float(t[: -len(u)]) * scale
            except ValueError:
                break
    raise PlanError(f"memory '{text}': expected a number with a unit, e.g. 80GB or 24GiB")


# ---------------------------------------------------------------- the model on the meta device


def meta_model(preset: Preset):
    """BolmoModel with every tensor on the meta device (shapes only)."""
    from .global_model import build_source_skeleton
    from .model import BolmoModel

    lm = build_source_skeleton(preset.model.source, device="meta")
    with torch.device("meta"):
        return BolmoModel(preset.model, lm, vocab=None)


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


def param_parts(model) -> dict[str, int]:
    """Parameters per part (each tensor counted once)."""
    enc, dec, t = model.local_encoder, model.local_decoder, model.teacher
    return {
        "byte embedding": _count(enc.byte_embedding),
        "retained subword embedding": _count(enc.retained_embedding),
        "local encoder blocks": _count(enc.blocks) + _count(enc.norm),
        "boundary predictor": _count(model.boundary_predictor),
        "patch out-projection": _count(model.out_projection),
        "global blocks": _count(model.global_model),
        "local decoder": _count(dec),
        "byte head": _count(model.lm_head),
        "teacher embedding + head (frozen)": _count(t),
    }


@dataclass
class Shapes:
    """What the memory and FLOP counts need from a model and a stage."""

    n_all: int
    n_trainable: int
    n_global: int  # global blocks
    n_local_matmul: int  # local weights that multiply every byte position (no embeddings)
    largest_unit: int  # FSDP: the biggest unit (a global block, the retained table, ...)
    root_unit: int  # FSDP: parameters outside every unit
    d_l: int
    d_g: int
    ffn_l: int
    ffn_g: int
    heads_l: int
    dqk: int
    chunk: int
    n_enc: int
    n_dec: int
    n_glob: int
    heads_g: int
    kv_g: int
    vocab_src: int
    k_enc: int  # Stage 1: global blocks the student patches pass through


def shapes(model, stage_cfg: StageConfig) -> Shapes:
    from . import fsdp

    model.configure_stage(stage_cfg)
    emb = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    glob = {id(p) for p in model.global_model.parameters()} | {id(p) for p in model.teacher.parameters()}
    local_mm = sum(p.numel() for p in model.parameters() if id(p) not in glob | emb and p.ndim >= 2)
    units = fsdp._units(model)
    in_units = {id(p) for u in units for p in u.parameters()}
    gcfg = model.global_model.config
    mlstm = model.local_encoder.blocks[0].mlstm
    return Shapes(
        n_all=_count(model),
        n_trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
        n_global=_count(model.global_model),
        n_local_matmul=local_mm,
        largest_unit=max(_count(u) for u in units),
        root_unit=sum(p.numel() for p in model.parameters() if id(p) not in in_units),
        d_l=model.d_local,
        d_g=model.d_global,
        ffn_l=model.cfg.local.ffn_hidden,
        ffn_g=gcfg.intermediate_size,
        heads_l=mlstm.h,
        dqk=mlstm.dqk,
        chunk=mlstm.chunk_size,
        n_enc=len(model.local_encoder.blocks),
        n_dec=len(model.local_decoder.blocks),
        n_glob=gcfg.num_hidden_layers,
        heads_g=gcfg.num_attention_heads,
        kv_g=gcfg.num_key_value_heads or gcfg.num_attention_heads,
        vocab_src=model.teacher.embed_tokens.weight.shape[0],
        k_enc=model.cfg.encoder_loss_layer,
    )


# ---------------------------------------------------------------- activations, tensor by tensor


def _norm(width: int, trainable: bool = True) -> float:
    """RMSNorm (ours and HF's): the input as fp32, 1/rms, and (for the weight's gradient) x/rms."""
    return (8 if trainable else 4) * width + 4


def local_block_bytes(s: Shapes, cb: int, xin: int, kernel: str) -> float:
    """Bytes one LocalBlock keeps per byte position (docs/scale.md has the term-by-term table).

    cb: compute dtype bytes (4 fp32, 2 bf16); xin: the block input's bytes. Under autocast an
    fp32 input is cast once per linear layer (6 in the mLSTM, 2 in the FFN), a bf16 one is shared.
    """
    d, H, dqk, c, f = s.d_l, s.heads_l, s.dqk, s.chunk, s.ffn_l
    dv = d
    linear_in = (d * cb + d * cb) if xin == cb else (6 * d * cb + 2 * d * cb)
    gates = 2 * H * cb + 2 * H * 4  # capped i/f gates, then their fp32 copies for the cell
    if kernel == "triton":  # mlstm_kernels saves q, k, v, i, f (fp32) and n, m; states are recomputed
        cell = 4 * (2 * dqk + dv + 4 * H)
    else:  # bolmo_core.mlstm.mlstm_chunkwise (fp32): per-position gate terms, chunked q/k/v,
        # c x c intra-chunk matrices, chunk states, and the (L/c)^2 inter-chunk weights
        n_chunks_per_pos = 1 / c
        cell = (
            44 * H
            + 24 * dqk
            + 8 * (dv + H)
            + 8 * dqk * (dv / H + 1) * n_chunks_per_pos
            + 12 * H * c
            + 8 * H / c
        )
    head_norm = 8 * dv + 4 * H + 4 * d  # fp32 h, 1/std, centred h; the reshaped normalised h
    out_gate = 3 * d * cb  # normalised h, sigmoid(o), their product (the out projection's input)
    ffn = 4 * f * cb  # gate, up, silu(gate), silu(gate) * up
    return 2 * _norm(d) + linear_in + gates + cell + head_norm + out_gate + ffn


def mlstm_inter_chunk_bytes(s: Shapes, L: int, kernel: str) -> float:
    """Per block and row: the torch kernel's (L/c + 1)^2 inter-chunk weights (twice, fp32)."""
    return 0.0 if kernel == "triton" else 8 * s.heads_l * (L / s.chunk + 1) ** 2


def global_layer_bytes(s: Shapes, cb: int, trainable: bool) -> float:
    """Bytes one source decoder layer (OLMo 2 / Olmo 3: QK-norm, post-norms, SwiGLU) keeps per token."""
    d, f = s.d_g, s.ffn_g
    dk = d // s.heads_g * s.kv_g
    norms = 3 * _norm(d, trainable) + _norm(dk, trainable)  # q_norm, k_norm, post-attention, post-FFN
    attention = (d + 2 * dk) * cb + d * cb + 4 * s.heads_g  # q, k, v after RoPE; output; logsumexp
    mlp = 3 * f * cb  # gate, up, silu(gate)
    linear_in = (2 * d + f) * cb if trainable else 0  # frozen weights: no inputs kept for their gradients
    return norms + attention + mlp + linear_in


def activation_terms(
    s: Shapes, stage: int, B: int, P: int, L: int, cb: int, sharded: bool, checkpointing: bool, kernel: str
) -> dict[str, float]:
    """Bytes of one micro-batch's activations, by part; "peak extra" is what backward adds at its peak."""
    E, T = B * L, B * P
    # Block inputs: bf16 under FSDP (bf16 parameters make bf16 embeddings); with fp32 weights
    # and autocast the encoder's stream stays fp32 (fp32 embeddings), as does Stage 1's decoder
    # (it adds the teacher's fp32 states); Stage 2's decoder stream is bf16.
    xin_enc = cb if sharded else 4
    xin_dec = cb if sharded or stage == 2 else 4
    blk = {
        "enc": local_block_bytes(s, cb, xin_enc, kernel),
        "dec": local_block_bytes(s, cb, xin_dec, kernel),
    }
    inter = mlstm_inter_chunk_bytes(s, L, kernel) * B
    n_glob = s.k_enc if stage == 1 else s.n_glob
    glob = global_layer_bytes(s, cb, trainable=stage == 2)
    terms: dict[str, float] = {}
    if checkpointing:  # each block keeps only its input; one block is recomputed at a time in backward
        terms["local blocks (inputs)"] = E * (s.n_enc * s.d_l * xin_enc + s.n_dec * s.d_l * xin_dec)
        terms["global blocks (inputs)"] = T * n_glob * s.d_g * (cb if sharded else 4)
        recompute = max(E * blk["enc"] + inter, E * blk["dec"] + inter, T * glob)
    else:
        terms["local blocks"] = (
            E * (s.n_enc * blk["enc"] + s.n_dec * blk["dec"]) + (s.n_enc + s.n_dec) * inter
        )
        terms["global blocks"] = T * n_glob * glob
        recompute = 0.0
    d = s.d_l
    terms["embeddings, norms, boundary predictor"] = E * (16 + _norm(d) + 5 * d * 4 + d * cb + 24)
    terms["pooling, depooling, decoder input"] = T * (d * cb + _norm(s.d_g)) + E * (8 + d * cb)
    terms["byte head"] = E * (_norm(d) + d * cb)
    n_softmax = 2 if stage == 1 else 1  # CE; Stage 1 also scores patches for the distillation
    logits = E * FUSED_VOCAB * 4
    terms["log-softmax over 520 outputs"] = n_softmax * logits
    if stage == 1:
        terms["teacher targets (no grad)"] = T * s.d_g * 4 * 2  # encoder-loss targets, final states
    # Backward's first steps hold the logits' gradients (one per log-softmax, plus one for their sum).
    terms["peak extra (backward)"] = max((n_softmax + 1) * logits, recompute)
    return terms


# ---------------------------------------------------------------- FLOPs (shared with benchmarks/gpu.py)


def window_flops(s: Shapes, stage: int, P: int, L: int, checkpointing: bool = False) -> tuple[float, float]:
    """(model FLOPs, hardware FLOPs incl. recomputation) per window of P tokens / L byte slots.

    Stage 1: teacher forward 2*N_g*P + attn/3; student patches through the first k frozen blocks,
    forward + activation gradients 4*N_g*(k/n)*P + 2/3*attn*(k/n); local 6*N_loc*L; teacher logits
    2*d*V*P. Stage 2: 6*N_g*P + attn + 6*N_loc*L. attn = 12*n*d*P^2 (PaLM, fwd + bwd). The mLSTM
    cell itself (< 2 % at the released sizes), norms and elementwise ops are not counted.
    Activation checkpointing adds one more forward of every trained-through block.
    """
    n, d = s.n_glob, s.d_g
    attn = 12 * n * d * P * P
    local = 6 * s.n_local_matmul * L
    if stage == 2:
        model = 6 * s.n_global * P + attn + local
        recompute = 2 * s.n_global * P + attn / 3 + 2 * s.n_local_matmul * L
    else:
        k = s.k_enc / n
        teacher = 2 * s.n_global * P + attn / 3 + 2 * d * s.vocab_src * P
        model = teacher + 4 * s.n_global * k * P + 2 / 3 * attn * k + local
        recompute = 2 * s.n_global * k * P + attn / 3 * k + 2 * s.n_local_matmul * L
    return model, model + (recompute if checkpointing else 0.0)


# ---------------------------------------------------------------- the plan


@dataclass
class StagePlan:
    stage: int
    steps: int
    global_batch: int
    micro_batch: int
    accum: int
    trainable: int
    frozen: int
    memory: dict[str, float]  # bytes per GPU
    activations: dict[str, float]  # bytes per micro-batch, by part
    tokens: float
    text_bytes: float
    byte_slots: float
    flops_per_step: float  # model FLOPs
    hw_flops_per_step: float  # with recomputation
    hours: float
    fits: bool
    advice: str = ""


@dataclass
class Plan:
    preset: str
    source: str
    sharding: str
    precision: dict[str, str]
    checkpointing: dict[str, bool]
    kernel: str
    hardware: Hardware
    parts: dict[str, int]
    stages: list[StagePlan] = field(default_factory=list)
    bytes_per_token: float = 4.4

    def to_dict(self) -> dict:
        d = asdict(self)
        d["hardware"]["usable"] = self.hardware.usable
        return d


def _weights_working(s: Shapes, sharded: bool, cb: int) -> float:
    if sharded:
        return (s.root_unit + 2 * s.largest_unit) * cb
    if cb == 2:  # autocast's bf16 casts of the weights that backward multiplies with
        return 2 * s.n_trainable
    return 0.0


def stage_memory(s: Shapes, stage_cfg: StageConfig, act: dict, gpus: int, sharded: bool) -> dict[str, float]:
    cb = 2 if stage_cfg.precision == "bf16" else 4
    shard = gpus if sharded else 1
    # FSDP: a shard, plus one unit's unsharded gradient while it is reduce-scattered; DDP: the
    # gradients plus its all-reduce buckets (one process: no DDP, no buckets).
    extra = 4 * s.largest_unit if sharded else 4 * s.n_trainable if gpus > 1 else 0.0
    grads = 4 * s.n_trainable / shard + extra
    return {
        "weights": 4 * s.n_all / shard,
        "weights (working copies)": _weights_working(s, sharded, cb),
        "gradients": grads,
        "optimizer": 8 * s.n_trainable / shard,
        "activations": sum(act.values()),
    }


def plan_stage(
    s: Shapes,
    stage_cfg: StageConfig,
    preset: Preset,
    hw: Hardware,
    sharded: bool,
    kernel: str,
    bytes_per_token: float,
    micro_batch: int | None = None,
    checkpointing: bool | None = None,
) -> StagePlan:
    P, L = preset.data.window_tokens, preset.data.byte_slots
    mb = micro_batch or stage_cfg.micro_batch
    ac = stage_cfg.activation_checkpointing if checkpointing is None else checkpointing
    cb = 2 if stage_cfg.precision == "bf16" else 4
    act = activation_terms(s, stage_cfg.stage, mb, P, L, cb, sharded, ac, kernel)
    mem = stage_memory(s, stage_cfg, act, hw.gpus, sharded)
    mem["total"] = sum(mem.values())
    model_f, hw_f = window_flops(s, stage_cfg.stage, P, L, ac)
    G = stage_cfg.global_batch
    tokens = float(stage_cfg.steps) * G * P
    per_rank = mb * hw.gpus
    return StagePlan(
        stage=stage_cfg.stage,
        steps=stage_cfg.steps,
        global_batch=G,
        micro_batch=mb,
        accum=G // per_rank if G % per_rank == 0 else 0,
        trainable=s.n_trainable,
        frozen=s.n_all - s.n_trainable,
        memory=mem,
        activations=act,
        tokens=tokens,
        text_bytes=tokens * bytes_per_token,
        byte_slots=float(stage_cfg.steps) * G * L,
        flops_per_step=model_f * G,
        hw_flops_per_step=hw_f * G,
        hours=stage_cfg.steps * hw_f * G / (hw.gpus * hw.peak_flops * hw.utilisation) / 3600,
        fits=mem["total"] <= hw.usable and G % per_rank == 0,
    )


def resolve_kernel(preset: Preset, device: str) -> str:
    k = preset.model.local.kernel
    if k == "auto":
        return "triton" if device == "cuda" else "torch"
    return k


def plan(
    preset: Preset,
    hw: Hardware,
    sharding: str = "auto",
    checkpointing: bool | None = None,
    bytes_per_token: float = 4.4,
) -> Plan:
    """The plan of both stages. sharding: "ddp", "fsdp", or "auto" (DDP when it fits, else FSDP)."""
    model = meta_model(preset)
    kernel = resolve_kernel(preset, hw.device)
    if hw.gpus < 1:
        raise PlanError(f"gpus={hw.gpus}: must be at least 1")
    chosen = sharding
    if sharding == "auto":
        ddp = _stages(model, preset, hw, False, kernel, bytes_per_token, checkpointing)
        chosen = "ddp" if hw.gpus == 1 or all(st.fits for st in ddp) else "fsdp"
    stages = _stages(model, preset, hw, chosen == "fsdp", kernel, bytes_per_token, checkpointing)
    p = Plan(
        preset=preset.name,
        source=preset.model.source.name_or_path,
        sharding=chosen,
        precision={f"stage{st.stage}": st.precision for st in (preset.stage1, preset.stage2)},
        checkpointing={
            f"stage{st.stage}": st.activation_checkpointing if checkpointing is None else checkpointing
            for st in (preset.stage1, preset.stage2)
        },
        kernel=kernel,
        hardware=hw,
        parts=param_parts(model),
        stages=stages,
        bytes_per_token=bytes_per_token,
    )
    for st in p.stages:
        if not st.fits:
            st.advice = advice(model, preset, hw, p, st, bytes_per_token)
    return p


def _stages(model, preset, hw, sharded, kernel, bpt, checkpointing) -> list[StagePlan]:
    out = []
    for stage_cfg in (preset.stage1, preset.stage2):
        s = shapes(model, stage_cfg)
        out.append(plan_stage(s, stage_cfg, preset, hw, sharded, kernel, bpt, checkpointing=checkpointing))
    return out


def advice(model, preset: Preset, hw: Hardware, p: Plan, st: StagePlan, bpt: float) -> str:
    """One line: the first change (in this order) that makes the stage fit."""
    stage_cfg = preset.stage1 if st.stage == 1 else preset.stage2
    s = shapes(model, stage_cfg)
    key = f"stage{st.stage}"
    if not st.accum:  # the trainer refuses a global batch that does not split over the ranks
        mb = next((m for m in range(st.micro_batch, 0, -1) if st.global_batch % (m * hw.gpus) == 0), None)
        fix = f"set {key}.micro_batch={mb}" if mb else f"set {key}.global_batch to a multiple of {hw.gpus}"
        return f"{key}.global_batch {st.global_batch} is not a multiple of micro_batch {st.micro_batch} x {hw.gpus} GPUs: {fix}"
    have = f"{key} needs {st.memory['total'] / GB:.1f} GB per GPU, {hw.usable / GB:.1f} GB usable of {hw.gpu_memory / GB:.0f} GB"

    def fits(**kw) -> bool:
        opts = dict(sharded=p.sharding == "fsdp", checkpointing=p.checkpointing[key]) | kw
        return plan_stage(
            s,
            stage_cfg,
            preset,
            hw,
            opts["sharded"],
            p.kernel,
            bpt,
            micro_batch=kw.get("micro_batch"),
            checkpointing=opts["checkpointing"],
        ).fits

    if p.sharding == "ddp" and fits(sharded=True):
        return f"{have}: shard it with FSDP (--sharding fsdp; deployments/accelerate/gpu_fsdp.yaml)"
    if not p.checkpointing[key] and fits(checkpointing=True):
        return f"{have}: turn on activation checkpointing ({key}.activation_checkpointing=true)"
    mb = st.micro_batch // 2
    while mb >= 1:
        if fits(micro_batch=mb) and stage_cfg.global_batch % (mb * hw.gpus) == 0:
            return f"{have}: lower the micro-batch ({key}.micro_batch={mb})"
        mb //= 2
    n = _gpus_needed(s, stage_cfg, preset, hw, p, bpt)
    if n:
        return f"{have}: use {n} GPUs or more (FSDP, {key}.micro_batch=1{', activation checkpointing' if not p.checkpointing[key] else ''})"
    return f"{have}: no number of these GPUs holds one window of {preset.data.window_tokens} tokens; use GPUs with more memory"


def _gpus_needed(s, stage_cfg, preset, hw, p, bpt) -> int | None:
    for n in (8, 16, 32, 64, 128, 256, 512, 1024):
        if n <= hw.gpus or stage_cfg.global_batch % n:
            continue
        more = Hardware(**{**asdict(hw), "gpus": n})
        if plan_stage(
            s, stage_cfg, preset, more, True, p.kernel, bpt, micro_batch=1, checkpointing=True
        ).fits:
            return n
    return None


def check(p: Plan) -> None:
    """Raise PlanError with the first stage that does not fit (its one-line advice)."""
    for st in p.stages:
        if not st.fits:
            raise PlanError(
                f"{p.preset} on {p.hardware.gpus} x {p.hardware.gpu_memory / GB:.0f} GB: {st.advice}"
            )


# ---------------------------------------------------------------- the table


def _gb(x: float) -> str:
    return f"{x / GB:.3g}" if x < 10 * GB else f"{x / GB:.1f}"


def _n(x: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {unit}"
    return f"{x:.0f}"


def markdown(p: Plan) -> str:
    """The plan as a markdown report (the CLI prints it; the flow logs it as an artifact)."""
    hw = p.hardware
    lines = [
        f"# Plan: {p.preset} ({p.source}) on {hw.gpus} x {hw.gpu_memory / GB:.0f} GB, {p.sharding.upper()}",
        "",
        f"Usable per GPU: {_gb(hw.usable)} GB ({hw.reserved_fraction:.0%} and {hw.reserved_bytes / GIB:.0f} GiB "
        f"kept for the CUDA context, NCCL and fragmentation). mLSTM kernel: {p.kernel}. Hours at "
        f"{hw.utilisation:.0%} of {hw.peak_flops / 1e12:.0f} TFLOP/s per GPU (recomputation included); "
        f"text bytes at {p.bytes_per_token} bytes per token.",
        "",
        "| part | parameters |",
        "|---|---:|",
        *[f"| {k} | {_n(v)} |" for k, v in p.parts.items()],
        f"| **total** | **{_n(sum(p.parts.values()))}** |",
        "",
        "| per GPU (GB) | " + " | ".join(f"Stage {st.stage}" for st in p.stages) + " |",
        "|---|" + "---:|" * len(p.stages),
    ]
    for key in p.stages[0].memory:
        lines.append(f"| {key} | " + " | ".join(_gb(st.memory[key]) for st in p.stages) + " |")
    lines.append("| fits | " + " | ".join("yes" if st.fits else "**no**" for st in p.stages) + " |")
    lines += [
        "",
        "| per stage | " + " | ".join(f"Stage {st.stage}" for st in p.stages) + " |",
        "|---|" + "---:|" * len(p.stages),
    ]
    rows = {
        "precision / activation checkpointing": lambda st: (
            f"{p.precision[f'stage{st.stage}']} / {'on' if p.checkpointing[f'stage{st.stage}'] else 'off'}"
        ),
        "trainable / frozen parameters": lambda st: f"{_n(st.trainable)} / {_n(st.frozen)}",
        "steps x global batch (micro x GPUs x accum)": lambda st: (
            f"{st.steps:,} x {st.global_batch} ({st.micro_batch} x {hw.gpus} x {st.accum or '?'})"
        ),
        "subword tokens": lambda st: _n(st.tokens),
        "text bytes": lambda st: _n(st.text_bytes),
        "byte slots": lambda st: _n(st.byte_slots),
        "FLOPs per step (model / with recompute)": lambda st: (
            f"{st.flops_per_step:.3g} / {st.hw_flops_per_step:.3g}"
        ),
        "hours": lambda st: f"{st.hours:,.1f}",
    }
    for name, fn in rows.items():
        lines.append(f"| {name} | " + " | ".join(fn(st) for st in p.stages) + " |")
    lines += [
        "",
        "Activations per micro-batch (GB):",
        "",
        "| part | " + " | ".join(f"Stage {st.stage}" for st in p.stages) + " |",
        "|---|" + "---:|" * len(p.stages),
    ]
    keys = list(dict.fromkeys(k for st in p.stages for k in st.activations))
    for k in keys:
        lines.append(f"| {k} | " + " | ".join(_gb(st.activations.get(k, 0.0)) for st in p.stages) + " |")
    for st in p.stages:
        if not st.fits:
            lines += ["", f"**Does not fit**: {st.advice}"]
    return "\n".join(lines)
