"""One config tree: typed dataclasses, the Python presets and the one validator.

A `Preset` is the model, the data windows and both training stages; a `TrainConfig` is one
stage run of a preset. Every entry point (a preset, `--set key=value`, `--config FILE`, the
flow's overrides, a checkpoint's saved config) goes through `Preset.from_dict` or
`Preset.with_overrides`, which check each value's type and range and the cross-field rules and
raise `ConfigError`: one line naming the key, the value and the rule. Overrides are dotted keys
(``stage1.steps=50``), never environment variables. Numbers come from the Bolmo recipe
(docs/architecture.md §3, §8.6, §9.2).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from .source import SourceConfig


class ConfigError(ValueError):
    """A config value that breaks a rule: one line naming the key, the value and the rule."""


def knob(
    default: Any = dataclasses.MISSING, *, factory=None, ge=None, gt=None, le=None, lt=None, choices=None
):
    """A dataclass field with its range rule, checked wherever a config enters."""
    rule = {k: v for k, v in dict(ge=ge, gt=gt, le=le, lt=lt, choices=choices).items() if v is not None}
    if factory is not None:
        return field(default_factory=factory, metadata={"rule": rule})
    return field(default=default, metadata={"rule": rule})


@dataclass
class LocalConfig:
    """The local encoder/decoder (docs/architecture.md §3, §7)."""

    d_local: int | None = knob(None, ge=1)  # None: equal to the global width (the released recipe)
    n_heads: int = knob(16, ge=1)
    ffn_hidden: int = knob(2816, ge=1)
    n_encoder_layers: int = knob(1, ge=1)
    n_decoder_layers: int = knob(4, ge=1)
    qk_dim_factor: float = knob(0.5, gt=0.0, le=1.0)  # q/k width = d_local * 0.5, v width = d_local
    gate_soft_cap: float = knob(15.0, gt=0.0)
    igate_bias_init: float = -10.0
    chunk_size: int = knob(128, ge=1)  # chunkwise mLSTM block length
    block_norm_eps: float = knob(1e-6, gt=0.0)  # pre-norms inside blocks and the LM-head norm
    norm_eps: float = knob(1e-5, gt=0.0)  # post-encoder norm and decoder initial norm
    kernel: str = knob("auto", choices=("auto", "torch", "triton"))  # triton: CUDA only

    def check(self, key: str) -> None:
        if self.d_local is not None:
            if self.d_local % self.n_heads:
                _fail(f"{key}.d_local", self.d_local, f"must be a multiple of n_heads={self.n_heads}")
            if int(self.d_local * self.qk_dim_factor) % self.n_heads:
                _fail(
                    f"{key}.qk_dim_factor",
                    self.qk_dim_factor,
                    "d_local x qk_dim_factor must divide by n_heads",
                )


@dataclass
class ModelConfig:
    source: SourceConfig = field(default_factory=SourceConfig)
    local: LocalConfig = field(default_factory=LocalConfig)
    retained_embeddings: bool = True  # byte + longest-suffix subword embedding (§2)
    boundary_lookahead: int = knob(1, choices=(0, 1))  # 1: the released non-causal predictor; 0: causal
    boundary_threshold: float = knob(0.5, gt=0.0, lt=1.0)  # boundary where p_t > threshold (§4.2)
    boundary_context: int = knob(0, ge=0)  # the predictor also reads this many previous bytes' states (0: §4)
    encoder_loss_layer: int = knob(4, ge=1)  # Stage-1 L2 match after this many global blocks (§8.4)


@dataclass
class DataConfig:
    window_tokens: int = knob(4096, ge=2)  # P: subword tokens per training window = patch slots
    byte_expansion: int = knob(6, ge=1)  # byte slots L = byte_expansion * window_tokens (§10.2)
    shard_docs: int = knob(2048, ge=1)  # documents per Parquet shard
    validation_fraction: float = knob(0.01, ge=0.0, lt=1.0)
    split_seed: int = 0
    loader: str = knob("auto", choices=("auto", "memory", "streaming"))  # training windows (loader.py)

    @property
    def byte_slots(self) -> int:
        return self.byte_expansion * self.window_tokens


@dataclass
class OptimConfig:
    lr: float = knob(7e-4, gt=0.0)  # local modules and the byte head
    global_lr_ratio: float = knob(0.5, ge=0.0)  # global blocks' LR = lr * ratio (Stage 2; frozen in Stage 1)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = knob(1e-8, gt=0.0)
    weight_decay: float = knob(0.1, ge=0.0)  # not applied to embeddings, norms or biases
    grad_clip: float = knob(0.5, gt=0.0)
    warmup_fraction: float = knob(0.1, ge=0.0, lt=1.0)  # linear warm-up, then linear decay to 0

    def check(self, key: str) -> None:
        if not all(0.0 <= b < 1.0 for b in self.betas):
            _fail(f"{key}.betas", list(self.betas), "each beta must be in [0, 1)")


@dataclass
class LossConfig:
    """Outer loss weights (§8.4, §9.1). Every term is a per-valid-element mean."""

    encoder: float = knob(4.0, ge=0.0)  # L2 after global layer `encoder_loss_layer` (1 x [0,0,0,4])
    ce: float = knob(1.0, ge=0.0)
    distill: float = knob(1.0, ge=0.0)
    boundary: float = knob(4.0, ge=0.0)
    distill_tau: float = knob(5.0, gt=0.0)
    whitespace_debias: bool = True
    byte_kl: float = knob(0.0, ge=0.0)  # Stage 1: KL to the teacher's byte-level targets (byte_targets.py)
    boundary_soft: float = knob(0.0, ge=0.0, le=1.0)  # Stage 1: BCE target mixes in the teacher's end mass


# The Linear layers of a Llama/OLMo decoder block (attention and MLP projections).
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LoraConfig:
    """Stage 2 through LoRA adapters on the global blocks (bolmo_core/lora.py); local modules train fully."""

    rank: int = knob(16, ge=1)
    alpha: float = knob(32.0, gt=0.0)  # update scale alpha / rank (PEFT's lora_alpha)
    dropout: float = knob(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))  # module-name suffixes
    lr_ratio: float = knob(1.0, gt=0.0)  # adapters' LR = optim.lr * lr_ratio (the local modules' LR at 1)

    def check(self, key: str) -> None:
        if not self.target_modules or not all(t.strip() for t in self.target_modules):
            _fail(f"{key}.target_modules", self.target_modules, "needs at least one non-empty module name")


@dataclass
class StageConfig:
    stage: int = knob(1, choices=(1, 2))
    steps: int = knob(75_000, ge=1)
    global_batch: int = knob(32, ge=1)  # windows per optimizer step, all ranks together
    micro_batch: int = knob(2, ge=1)  # windows per forward pass per rank
    optim: OptimConfig = field(default_factory=OptimConfig)
    losses: LossConfig = field(default_factory=LossConfig)
    precision: str = knob("fp32", choices=("fp32", "bf16"))  # bf16: autocast; master weights stay fp32
    # Recompute each block's activations in backward (global decoder layers and local blocks):
    # memory for compute, same math (docs/training.md "Activation checkpointing").
    activation_checkpointing: bool = False
    checkpoint_every: int = knob(1000, ge=0)  # 0: only the final checkpoint
    keep_last: int = knob(2, ge=1)
    eval_every: int = knob(0, ge=0)  # 0: only at the end
    eval_batches: int = knob(8, ge=1)
    seed: int = 0
    target_bytes_per_patch: float | None = knob(None, ge=1.0)  # Stage 2: raise compression (§9.3)
    freeze_boundary_predictor: bool = False
    train_global: bool = False  # Stage 1: frozen global model; Stage 2: trained
    teacher_forced_boundaries: bool = True  # Stage 1: subword boundaries; Stage 2: predicted
    callbacks: list[str] = field(default_factory=list)  # "module:Class" on rank 0
    lora: LoraConfig | None = None  # Stage 2: global blocks trained through LoRA adapters (None: fully)

    def check(self, key: str) -> None:
        if self.lora is not None and not self.train_global:
            _fail(
                f"{key}.lora",
                dataclasses.asdict(self.lora),
                "needs train_global=true (a trained global model)",
            )
        if self.global_batch % self.micro_batch:
            _fail(
                f"{key}.global_batch",
                self.global_batch,
                f"must be a multiple of micro_batch={self.micro_batch}",
            )


@dataclass
class Preset:
    name: str
    model: ModelConfig
    data: DataConfig
    stage1: StageConfig
    stage2: StageConfig

    def check(self, key: str) -> None:
        for n in (1, 2):
            if getattr(self, f"stage{n}").stage != n:
                _fail(f"stage{n}.stage", getattr(self, f"stage{n}").stage, f"must be {n}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preset:
        """A checked preset from plain data (missing sub-fields take their defaults)."""
        return from_dict(cls, d)

    def with_overrides(self, overrides: dict[str, Any] | list[str] | None) -> Preset:
        """A checked copy with dotted-key overrides applied, e.g. {"stage1.steps": 50} or ["stage1.steps=50"]."""
        d = self.to_dict()
        items = (overrides or {}).items() if not isinstance(overrides, list) else map(_split_kv, overrides)
        for key, value in items:
            _set_dotted(d, key, value)
        return from_dict(Preset, d)


@dataclass
class TrainConfig:
    """One stage run: the JSON given to ``python -m bolmo_core.train --config FILE``."""

    preset: Preset  # the resolved preset (overrides applied); saved in every checkpoint
    stage: int = knob(choices=(1, 2))
    manifest_uri: str  # data manifest (bolmo_core.data.prepare_dataset)
    out_uri: str  # this stage's output folder: checkpoints step-*/ and final/
    init_from: str | None = (
        None  # Stage 2: Stage-1 checkpoint (or its folder); None: "Stage 2 without Stage 1"
    )
    allow_mismatch: bool = False  # resume from a checkpoint made with another config/data/world size
    deterministic: bool = False  # torch.use_deterministic_algorithms + fixed seeds (bit-exact resume on CPU)
    max_minutes: float | None = knob(None, gt=0.0)  # wall-clock training budget, all restarts together
    max_cpu_minutes: float | None = knob(
        None, gt=0.0
    )  # CPU-time budget of rank 0 (fair arms on a shared box)
    callbacks: list[str] = field(default_factory=list)  # extra "module:Class" callbacks on rank 0
    callback_kwargs: dict[str, dict] = field(default_factory=dict)  # constructor kwargs per callback spec
    ddp_find_unused: bool = False
    # "fsdp": the trainer shards with FSDP2 (docs/training.md "Sharding"); "ddp": whole model per
    # rank; "auto": fsdp when launched by accelerate with an FSDP config (ACCELERATE_USE_FSDP=true).
    sharding: str = knob("auto", choices=("auto", "ddp", "fsdp"))

    def check(self, key: str) -> None:
        for name in ("manifest_uri", "out_uri"):
            if not getattr(self, name):
                _fail(name, getattr(self, name), "required (a URI)")

    @property
    def stage_cfg(self) -> StageConfig:
        return self.preset.stage1 if self.stage == 1 else self.preset.stage2

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        return from_dict(cls, d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- the validator


def _fail(key: str, value: Any, rule: str) -> typing.NoReturn:
    raise ConfigError(f"{key}={json.dumps(value, default=str)}: {rule}")


def _split_kv(s: str) -> tuple[str, Any]:
    if "=" not in s:
        raise ConfigError(f"override '{s}': expected key=value")
    k, v = s.split("=", 1)
    try:
        return k.strip(), json.loads(v)
    except json.JSONDecodeError:
        return k.strip(), v


def _set_dotted(d: dict, key: str, value: Any) -> None:
    *path, last = key.split(".")
    for i, p in enumerate(path):
        if not isinstance(d.get(p), dict):
            raise ConfigError(f"override '{key}': no section '{'.'.join(path[: i + 1])}'")
        d = d[p]
    if last not in d:
        raise ConfigError(f"override '{key}': no field '{last}'")
    d[last] = value


def _type_name(t) -> str:
    return getattr(t, "__name__", str(t))


def _coerce(key: str, t, value: Any) -> Any:
    """`value` as type `t` (JSON shapes in: lists for tuples, ints for floats, dicts for sections)."""
    args = typing.get_args(t)
    if typing.get_origin(t) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (t,) = [a for a in args if a is not type(None)]
        args = typing.get_args(t)
    if dataclasses.is_dataclass(t):
        if isinstance(value, t):
            value = dataclasses.asdict(value)
        if not isinstance(value, dict):
            _fail(key, value, f"expected a section ({_type_name(t)}) as a mapping")
        return from_dict(t, value, key)
    origin = typing.get_origin(t)
    if origin in (tuple, list):
        if not isinstance(value, list | tuple) or (origin is tuple and len(value) != len(args)):
            _fail(
                key, value, f"expected a list of {len(args) if origin is tuple else 'any number of'} values"
            )
        inner = args if origin is tuple else [args[0]] * len(value)
        out = [_coerce(f"{key}[{i}]", a, v) for i, (a, v) in enumerate(zip(inner, value))]
        return tuple(out) if origin is tuple else out
    if t is bool:
        if not isinstance(value, bool):
            _fail(key, value, "expected true or false")
        return value
    if t is int:
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(key, value, "expected an integer")
        return value
    if t is float:
        if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
            _fail(key, value, "expected a number")
        return float(value)
    if t is str:
        if not isinstance(value, str):
            _fail(key, value, "expected a string")
        return value
    return value


def _check_rule(key: str, value: Any, rule: dict) -> None:
    if value is None:
        return
    if "choices" in rule and value not in rule["choices"]:
        _fail(key, value, f"must be one of {', '.join(map(str, rule['choices']))}")
    for op, ok, word in (
        ("ge", lambda a, b: a >= b, ">="),
        ("gt", lambda a, b: a > b, ">"),
        ("le", lambda a, b: a <= b, "<="),
        ("lt", lambda a, b: a < b, "<"),
    ):
        if op in rule and not ok(value, rule[op]):
            _fail(key, value, f"must be {word} {rule[op]}")


def from_dict(cls, d: dict[str, Any], prefix: str = ""):
    """A checked `cls` dataclass from plain data: types, ranges, then the class's cross-field `check`."""
    if not isinstance(d, dict):
        _fail(prefix or cls.__name__, d, f"expected a mapping for {cls.__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ConfigError(
            f"{prefix or cls.__name__}: unknown field '{unknown[0]}' (fields: {', '.join(fields)})"
        )
    kwargs = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name not in d:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{key}: missing (a {cls.__name__} needs every field without a default)")
            continue
        kwargs[name] = _coerce(key, hints[name], d[name])
        _check_rule(key, kwargs[name], f.metadata.get("rule", {}))
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as e:  # e.g. a frozen dataclass's own __post_init__ check
        raise ConfigError(f"{prefix or cls.__name__}: {e}") from None
    if hasattr(obj, "check"):
        obj.check(prefix)
    return obj


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
    """Exercises every path in seconds on a CPU (docs/architecture.md Appendix A)."""
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

    The tiny recipe on a real source: the local width is smaller than the global one (a
    projection on each side) so the byte-level parts train fast on two cores. fp32: on CPUs
    without native bf16 (no AVX512-BF16/AMX, like the 2-core CI box) bf16 matmuls measured
    ~40x slower than fp32.
    """
    p = tiny()
    p.name = "smollm2-135m"
    p.model.source = SourceConfig("smollm2-135m")
    p.model.local = LocalConfig(d_local=256, n_heads=4, ffn_hidden=352, chunk_size=64)
    p.data.shard_docs, p.data.validation_fraction = 1024, 0.02
    # 64-token windows (384 byte slots), 4 per step: ~5 s a Stage-1 step on one core here.
    s1 = dataclasses.replace(p.stage1, steps=300, global_batch=4, eval_every=100, eval_batches=4)
    # Stage 1 learns from the teacher's byte-level targets instead of the binarised KL, and the
    # boundary predictor also reads 4 previous bytes: issue 13's best arm on a CPU budget
    # (docs/results.md, "Stage-1 losses side by side"). PAPER_RECIPE restores the paper's.
    s1.losses = LossConfig(byte_kl=1.0, distill=0.0)
    p.model.boundary_context = 4
    p.stage1 = s1
    p.stage2 = _stage2_from(s1, steps=60, seed=1234, optim=OptimConfig(lr=1e-4, betas=(0.9, 0.95)))
    return p


def olmo2_1b() -> Preset:
    """The released 1B recipe (docs/architecture.md §3.2, §8.6, §9.2)."""
    s1 = StageConfig(
        stage=1,
        steps=75_000,
        global_batch=32,
        micro_batch=2,
        checkpoint_every=1000,
        optim=OptimConfig(lr=7e-4, betas=(0.9, 0.999)),
        precision="bf16",
        activation_checkpointing=True,
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
    """The released 7B recipe (docs/architecture.md §3.2, §8.6, §9.2)."""
    p = olmo2_1b()
    p.name = "olmo3-7b"
    p.model.source = SourceConfig("allenai/Olmo-3-1025-7B")
    p.model.local = LocalConfig(d_local=None, n_heads=16, ffn_hidden=5504, chunk_size=128)
    p.stage1.optim.lr = 5e-4
    p.stage2.optim.lr = 3.66e-5
    p.stage2.micro_batch = 2
    return p


# Overrides that give a preset the paper's Stage-1 recipe (docs/architecture.md §8.4 losses, §4 predictor input)
# where it ships another (smollm2-135m: byte-level targets, wider predictor input).
PAPER_RECIPE = ["stage1.losses.byte_kl=0", "stage1.losses.distill=1", "model.boundary_context=0"]

PRESETS = {"tiny": tiny, "smollm2-135m": smollm2_135m, "olmo2-1b": olmo2_1b, "olmo3-7b": olmo3_7b}


def get_preset(name: str, overrides: dict[str, Any] | list[str] | None = None) -> Preset:
    if name not in PRESETS:
        raise ConfigError(f"preset={json.dumps(name)}: unknown (choose from {', '.join(PRESETS)})")
    return PRESETS[name]().with_overrides(overrides)
