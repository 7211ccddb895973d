"""Typed configuration and the Python presets (spec: ../shared/reference/bolmo_spec.md).

One preset = the model, the data windows and both training stages. Presets are plain
dataclasses; overrides are dotted keys (``stage1.steps=50``), never environment variables.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from .source import SourceConfig


@dataclass
class LocalConfig:
    """The local encoder/decoder (spec §3, §7)."""

    d_local: int | None = None  # None: equal to the global width (the released recipe)
    n_heads: int = 16
    ffn_hidden: int = 2816
    n_encoder_layers: int = 1
    n_decoder_layers: int = 4
    qk_dim_factor: float = 0.5  # q/k width = d_local * 0.5, v width = d_local
    gate_soft_cap: float = 15.0
    igate_bias_init: float = -10.0
    chunk_size: int = 128  # chunkwise mLSTM; must divide the byte length in training
    block_norm_eps: float = 1e-6  # pre-norms inside blocks and the LM-head norm
    norm_eps: float = 1e-5  # post-encoder norm and decoder initial norm
    kernel: str = "auto"  # auto | torch | triton (CUDA only)


@dataclass
class ModelConfig:
    source: SourceConfig = field(default_factory=SourceConfig)
    local: LocalConfig = field(default_factory=LocalConfig)
    retained_embeddings: bool = True  # byte + longest-suffix subword embedding (spec §2)
    boundary_lookahead: int = 1  # 1: the released non-causal predictor; 0: causal ablation
    boundary_threshold: float = 0.5  # boundary where p_t > threshold (spec §4.2)
    encoder_loss_layer: int = 4  # Stage-1 L2 match after this many global blocks (spec §8.4)


@dataclass
class DataConfig:
    window_tokens: int = 4096  # P: subword tokens per training window = patch slots
    byte_expansion: int = 6  # byte slots L = byte_expansion * window_tokens (spec §10.2)
    shard_docs: int = 2048  # documents per Parquet shard
    validation_fraction: float = 0.01
    split_seed: int = 0
    loader: str = "auto"  # training windows: auto | memory | streaming (bolmo_core/loader.py)

    @property
    def byte_slots(self) -> int:
        return self.byte_expansion * self.window_tokens


@dataclass
class OptimConfig:
    lr: float = 7e-4  # local modules and the byte head
    global_lr_ratio: float = 0.5  # global blocks' LR = lr * ratio (Stage 2 only; frozen in Stage 1)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.1  # not applied to embeddings, norms or biases
    grad_clip: float = 0.5
    warmup_fraction: float = 0.1  # linear warm-up, then linear decay to 0


@dataclass
class LossConfig:
    """Outer loss weights (spec §8.4, §9.1). Every term is a per-valid-element mean."""

    encoder: float = 4.0  # L2 after global layer `encoder_loss_layer` (1 x [0,0,0,4])
    ce: float = 1.0
    distill: float = 1.0
    boundary: float = 4.0
    distill_tau: float = 5.0
    whitespace_debias: bool = True


@dataclass
class StageConfig:
    stage: int = 1
    steps: int = 75_000
    global_batch: int = 32  # windows per optimizer step, all ranks together
    micro_batch: int = 2  # windows per forward pass per rank
    optim: OptimConfig = field(default_factory=OptimConfig)
    losses: LossConfig = field(default_factory=LossConfig)
    precision: str = "fp32"  # fp32 | bf16 (autocast; master weights stay fp32)
    checkpoint_every: int = 1000
    keep_last: int = 2
    eval_every: int = 0  # 0: only at the end
    eval_batches: int = 8
    seed: int = 0
    target_bytes_per_patch: float | None = None  # Stage 2: raise compression above the source's
    freeze_boundary_predictor: bool = False
    train_global: bool = False  # Stage 1: frozen global model; Stage 2: trained
    teacher_forced_boundaries: bool = True  # Stage 1: subword boundaries; Stage 2: predicted
    callbacks: list[str] = field(default_factory=list)  # "module:Class" on rank 0


@dataclass
class Preset:
    name: str
    model: ModelConfig
    data: DataConfig
    stage1: StageConfig
    stage2: StageConfig

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preset:
        return _from_dict(cls, d)

    def with_overrides(self, overrides: dict[str, Any] | list[str] | None) -> Preset:
        """A copy with dotted-key overrides applied, e.g. {"stage1.steps": 50}."""
        out = copy.deepcopy(self)
        if not overrides:
            return out
        items = overrides.items() if isinstance(overrides, dict) else (_split_kv(s) for s in overrides)
        for key, value in items:
            _set_dotted(out, key, value)
        return out


def _split_kv(s: str) -> tuple[str, Any]:
    if "=" not in s:
        raise ValueError(f"override '{s}': expected key=value")
    k, v = s.split("=", 1)
    try:
        return k.strip(), json.loads(v)
    except json.JSONDecodeError:
        return k.strip(), v


def _set_dotted(obj: Any, key: str, value: Any) -> None:
    parts = key.split(".")
    for p in parts[:-1]:
        if not dataclasses.is_dataclass(obj) or not hasattr(obj, p):
            raise ValueError(f"override '{key}': no field '{p}'")
        obj = getattr(obj, p)
    last = parts[-1]
    if not dataclasses.is_dataclass(obj) or last not in {f.name for f in dataclasses.fields(obj)}:
        raise ValueError(f"override '{key}': no field '{last}'")
    current = getattr(obj, last)
    if dataclasses.is_dataclass(current) and isinstance(value, dict):
        value = _from_dict(type(current), value)
    elif isinstance(current, tuple) and isinstance(value, list):
        value = tuple(value)
    elif isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    setattr(obj, last, value)


def _from_dict(cls, d: dict[str, Any]):
    kwargs = {}
    hints = {f.name: f for f in dataclasses.fields(cls)}
    import typing

    types = typing.get_type_hints(cls)
    for name, value in d.items():
        if name not in hints:
            raise ValueError(f"config for {cls.__name__}: unknown field '{name}'")
        t = types[name]
        if dataclasses.is_dataclass(t) and isinstance(value, dict):
            value = _from_dict(t, value)
        elif isinstance(value, list) and getattr(t, "__origin__", None) is tuple:
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


# ---------------------------------------------------------------- presets


def _stage2_from(stage1: StageConfig, **kw) -> StageConfig:
    s = copy.deepcopy(stage1)
    s.stage = 2
    s.train_global = True
    s.teacher_forced_boundaries = False
    s.losses = LossConfig(encoder=0.0, ce=1.0, distill=0.0, boundary=4.0)
    for k, v in kw.items():
        setattr(s, k, v)
    return s


def tiny() -> Preset:
    """Exercises every path in seconds on a CPU (spec Appendix A)."""
    s1 = StageConfig(
        stage=1,
        steps=200,
        global_batch=8,
        micro_batch=4,
        checkpoint_every=50,
        keep_last=2,
        optim=OptimConfig(lr=1e-3, betas=(0.9, 0.999)),
        eval_every=0,
        eval_batches=2,
    )
    s2 = _stage2_from(s1, steps=200, seed=1234, optim=OptimConfig(lr=3e-4, betas=(0.9, 0.95)))
    return Preset(
        name="tiny",
        model=ModelConfig(
            source=SourceConfig("tiny-olmo2"),
            local=LocalConfig(d_local=None, n_heads=4, ffn_hidden=88, chunk_size=16),
        ),
        data=DataConfig(window_tokens=64, byte_expansion=6, shard_docs=256, validation_fraction=0.05),
        stage1=s1,
        stage2=s2,
    )


def smollm2_135m() -> Preset:
    """The CPU demo on real weights: SmolLM2-135M-Instruct (d=576, 30 layers) as the global model.

    The local width is smaller than the global one (a projection on each side) so the
    byte-level parts train fast on two cores. fp32: on CPUs without native bf16 (no
    AVX512-BF16/AMX, like the 2-core CI box) bf16 matmuls measured ~40x slower than fp32.
    """
    # 64-token windows (384 byte slots), 4 per step: ~5 s a Stage-1 step on one core here.
    s1 = StageConfig(
        stage=1,
        steps=300,
        global_batch=4,
        micro_batch=4,
        checkpoint_every=50,
        keep_last=2,
        optim=OptimConfig(lr=1e-3, betas=(0.9, 0.999)),
        precision="fp32",
        eval_every=100,
        eval_batches=4,
    )
    s2 = _stage2_from(s1, steps=60, seed=1234, optim=OptimConfig(lr=1e-4, betas=(0.9, 0.95)))
    return Preset(
        name="smollm2-135m",
        model=ModelConfig(
            source=SourceConfig("smollm2-135m"),
            local=LocalConfig(d_local=256, n_heads=4, ffn_hidden=352, chunk_size=64),
        ),
        data=DataConfig(window_tokens=64, byte_expansion=6, shard_docs=1024, validation_fraction=0.02),
        stage1=s1,
        stage2=s2,
    )


def olmo2_1b() -> Preset:
    """The released 1B recipe (spec §3.2, §8.6, §9.2)."""
    s1 = StageConfig(
        stage=1,
        steps=75_000,
        global_batch=32,
        micro_batch=2,
        checkpoint_every=1000,
        optim=OptimConfig(lr=7e-4, betas=(0.9, 0.999)),
        precision="bf16",
    )
    s2 = _stage2_from(
        s1,
        steps=150_000,
        global_batch=64,
        micro_batch=4,
        checkpoint_every=1000,
        seed=1234,
        optim=OptimConfig(lr=5.2e-5, global_lr_ratio=0.5, betas=(0.9, 0.95)),
    )
    return Preset(
        name="olmo2-1b",
        model=ModelConfig(
            source=SourceConfig("allenai/OLMo-2-0425-1B"),
            local=LocalConfig(d_local=None, n_heads=16, ffn_hidden=2816, chunk_size=128),
        ),
        data=DataConfig(window_tokens=4096, byte_expansion=6),
        stage1=s1,
        stage2=s2,
    )


def olmo3_7b() -> Preset:
    """The released 7B recipe (spec §3.2, §8.6, §9.2)."""
    p = olmo2_1b()
    p.name = "olmo3-7b"
    p.model.source = SourceConfig("allenai/Olmo-3-1025-7B")
    p.model.local = LocalConfig(d_local=None, n_heads=16, ffn_hidden=5504, chunk_size=128)
    p.stage1.optim.lr = 5e-4
    p.stage2.optim.lr = 3.66e-5
    p.stage2.micro_batch = 2
    return p


PRESETS = {"tiny": tiny, "smollm2-135m": smollm2_135m, "olmo2-1b": olmo2_1b, "olmo3-7b": olmo3_7b}


def get_preset(name: str, overrides: dict[str, Any] | list[str] | None = None) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"preset '{name}': unknown (choose from {', '.join(PRESETS)})")
    return PRESETS[name]().with_overrides(overrides)
