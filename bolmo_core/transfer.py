"""Instruct-delta transfer (task arithmetic, docs/architecture.md §12 "post-training by task arithmetic").

A byte model's global model IS its source's transformer blocks (global_model.py): a byte model
made from a base checkpoint can take the post-training of that base's instruct checkpoint by

    global block tensor  +=  alpha * (instruct tensor - base tensor)

for every global-block parameter (source key ``model.layers.*`` <-> byte key
``global_model.model.layers.*``). Local modules are untouched; the source's embedding, final
norm and LM head belong to the frozen teacher, which is not part of the byte model, so their
deltas are skipped (listed in the report) unless ``retained_embeddings`` adds the input
embedding's delta to the retained-subword table (its first d_local channels, as init.py copies
it; the reference's ``--instructify-embeddings``).

Memory: the two sources are read one tensor at a time from their safetensors files (a local HF
folder, a built-in, or a hub snapshot of ``*.safetensors``), so the transfer costs the byte
model plus two tensors, never two whole models. A GGUF source has no such files: it is loaded
whole through transformers (small models only).

Arithmetic: in float32 (``base.float()``, ``instruct.float()``), cast to the parameter's dtype,
added in place; with alpha = 1 the result is exactly ``param + (instruct - base)`` in that dtype.
Every shape and the architecture are checked before the first tensor changes, so a mismatch is
one line and leaves the model as it was.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import storage
from .hf.configuration_bolmo import MIRRORED
from .source import SourceConfig, SourceError, load_source_config, load_source_model, resolve_source

GLOBAL_PREFIX = "global_model.model."  # byte-model key of a source ``model.*`` block tensor
SOURCE_PREFIX = "model."
EMBED_KEY = "model.embed_tokens.weight"
# Config fields that make two checkpoints "the same architecture" for the blocks' tensors: the
# block shapes are the first six fields the export mirrors (hidden_size .. intermediate_size).
ARCH_FIELDS = (
    "model_type",
    *MIRRORED[: MIRRORED.index("intermediate_size") + 1],
    "hidden_act",
    "attention_bias",
    "mlp_bias",
    "layer_types",
)


class TransferError(ValueError):
    """A transfer that cannot be done (architecture or tensor mismatch), with a one-line reason."""


@dataclass
class TransferReport:
    base: str
    instruct: str
    alpha: float
    tensors: int  # global-block tensors changed
    params: int  # numbers changed in them
    delta_l2: float  # ||alpha * (instruct - base)|| over those tensors
    delta_max_abs: float
    retained_embeddings: bool
    skipped: list[str] = field(default_factory=list)  # source tensors not carried over (teacher-only)

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------- reading a source tensor by tensor


class SourceTensors:
    """A source checkpoint's tensors by name, read lazily from its safetensors files."""

    def __init__(self, src: SourceConfig, role: str):
        self.src, self.role = src, role
        self.name = src.name_or_path
        self._files: dict[str, str] = {}  # tensor name -> safetensors file
        self._state: dict[str, torch.Tensor] | None = None  # GGUF: the whole state dict
        try:
            self.config = load_source_config(src).to_dict()
            path, kw = resolve_source(src)
        except (SourceError, OSError, ValueError) as e:
            raise TransferError(f"--{role} '{self.name}': cannot be loaded ({_first_line(e)})") from None
        if kw.get("gguf_file"):
            self._state = load_source_model(src).state_dict()
            return
        folder = Path(path) if Path(path).is_dir() else _hub_snapshot(src, role)
        self._index(folder)

    def _index(self, folder: Path) -> None:
        from safetensors import safe_open

        index = folder / "model.safetensors.index.json"
        if index.exists():
            wmap = json.loads(index.read_text())["weight_map"]
            self._files = {k: str(folder / f) for k, f in wmap.items()}
        elif (folder / "model.safetensors").exists():
            f = str(folder / "model.safetensors")
            with safe_open(f, framework="pt") as h:
                self._files = {k: f for k in h.keys()}
        else:
            raise TransferError(f"--{self.role} '{self.name}': {folder} holds no *.safetensors weights")

    def keys(self) -> list[str]:
        return list(self._state if self._state is not None else self._files)

    def shape(self, key: str) -> tuple[int, ...]:
        if self._state is not None:
            return tuple(self._state[key].shape)
        from safetensors import safe_open

        with safe_open(self._files[key], framework="pt") as h:
            return tuple(h.get_slice(key).get_shape())

    def get(self, key: str) -> torch.Tensor:
        if self._state is not None:
            return self._state[key]
        from safetensors import safe_open

        try:
            with safe_open(self._files[key], framework="pt") as h:
                return h.get_tensor(key)
        except Exception as e:  # safetensors' own error for a damaged file
            raise TransferError(
                f"--{self.role} '{self.name}': {self._files[key]}: cannot read '{key}' ({_first_line(e)})"
            ) from None


def _hub_snapshot(src: SourceConfig, role: str) -> Path:
    """A hub model's config + safetensors files in the local HF cache (downloaded once)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                src.name_or_path, revision=src.revision, allow_patterns=["*.json", "*.safetensors"]
            )
        )
    except Exception as e:  # offline, unknown repo, no access: one line, not the hub's traceback
        raise TransferError(f"--{role} '{src.name_or_path}': cannot be fetched ({_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


# ---------------------------------------------------------------- checks


def _arch(config: dict) -> dict:
    return {k: config.get(k) for k in ARCH_FIELDS if k in config}


def check_architectures(want_config: dict, what: str, *sources: SourceTensors) -> None:
    """Every source has the architecture of `want_config` (`what` names it in the error)."""
    want = _arch(want_config)
    for who in sources:
        got = _arch(who.config)
        for k in sorted(set(want) | set(got)):
            if json.dumps(got.get(k)) != json.dumps(want.get(k)):
                raise TransferError(
                    f"--{who.role} '{who.name}': {k}={json.dumps(got.get(k))} but {what} "
                    f"{json.dumps(want.get(k))} (not the same architecture)"
                )


def plan_transfer(model, base: SourceTensors, instruct: SourceTensors) -> list[tuple[str, str]]:
    """(byte-model parameter name, source key) for every global-block parameter; checks every shape."""
    params = dict(model.named_parameters())
    base_keys, instr_keys = set(base.keys()), set(instruct.keys())
    pairs = []
    for name, p in params.items():
        if not name.startswith(GLOBAL_PREFIX):
            continue
        key = SOURCE_PREFIX + name[len(GLOBAL_PREFIX) :]
        for who, keys in ((base, base_keys), (instruct, instr_keys)):
            if key not in keys:
                raise TransferError(
                    f"--{who.role} '{who.name}': no tensor '{key}' (the byte model has {name})"
                )
            if who.shape(key) != tuple(p.shape):
                raise TransferError(
                    f"--{who.role} '{who.name}': '{key}' has shape {list(who.shape(key))}, "
                    f"the byte model's {name} {list(p.shape)}"
                )
        pairs.append((name, key))
    if not pairs:
        raise TransferError("byte model: no global-block parameters (global_model.model.*) to transfer to")
    return pairs


# ---------------------------------------------------------------- the arithmetic


@torch.no_grad()
def apply_delta(
    model,
    base: SourceTensors,
    instruct: SourceTensors,
    alpha: float = 1.0,
    retained_embeddings: bool = False,
) -> TransferReport:
    """Add alpha * (instruct - base) to `model`'s global blocks in place (every check first)."""
    check_architectures(
        model.global_model.config.to_dict(), "the byte model's global blocks have", base, instruct
    )
    pairs = plan_transfer(model, base, instruct)
    retained = model.local_encoder.retained_embedding if retained_embeddings else None
    if retained_embeddings:
        _check_retained(retained, base, instruct)
    params = dict(model.named_parameters())
    sq, mx, n = 0.0, 0.0, 0
    for name, key in pairs:
        p = params[name]
        delta = (instruct.get(key).float() - base.get(key).float()).to(p.device)
        if alpha != 1.0:
            delta = delta * alpha
        delta = delta.to(p.dtype)
        p.add_(delta)
        sq += float(delta.double().pow(2).sum())
        mx = max(mx, float(delta.abs().max())) if delta.numel() else mx
        n += p.numel()
    if retained is not None:
        w = retained.weight
        rows, cols = w.shape
        d = instruct.get(EMBED_KEY).float() - base.get(EMBED_KEY).float()
        w.add_((d[:rows, :cols] * alpha).to(w.dtype).to(w.device))
    used = {k for _, k in pairs} | ({EMBED_KEY} if retained is not None else set())
    return TransferReport(
        base=base.name,
        instruct=instruct.name,
        alpha=alpha,
        tensors=len(pairs),
        params=n,
        delta_l2=sq**0.5,
        delta_max_abs=mx,
        retained_embeddings=retained is not None,
        skipped=sorted(k for k in base.keys() if k not in used),
    )


def _check_retained(retained, base: SourceTensors, instruct: SourceTensors) -> None:
    if retained is None:
        raise TransferError("--retained-embeddings: the byte model has no retained-subword table")
    rows, cols = retained.weight.shape
    for who in (base, instruct):
        if EMBED_KEY not in who.keys():
            raise TransferError(f"--{who.role} '{who.name}': no tensor '{EMBED_KEY}'")
        shape = who.shape(EMBED_KEY)
        if shape[0] < rows or shape[1] < cols:
            raise TransferError(
                f"--{who.role} '{who.name}': '{EMBED_KEY}' {list(shape)} is smaller than the "
                f"retained table {[rows, cols]}"
            )


# ---------------------------------------------------------------- transfer + export


def transfer_export(
    byte_model_path: str,
    base: str | SourceConfig,
    instruct: str | SourceConfig,
    out_dir: str | os.PathLike,
    alpha: float = 1.0,
    retained_embeddings: bool = False,
    overwrite: bool = False,
):
    """Load a byte model (checkpoint or export), add the delta, export to `out_dir` and check parity.

    The export is written next to `out_dir`, parity-checked, and only then moved into place, so a
    failure leaves `out_dir` as it was. Returns (model, preset, report dict with the parity report).
    """
    from .export import _check_out, check_parity, export_model
    from .load import load_byte_model

    if not alpha == alpha or alpha in (float("inf"), float("-inf")):
        raise TransferError(f"--alpha {alpha}: must be a finite number")
    out = Path(str(out_dir).removeprefix("file://"))
    _check_out(out, overwrite)
    base_t = SourceTensors(_src(base), "base")
    instr_t = SourceTensors(_src(instruct), "instruct")
    check_architectures(base_t.config, "--base has", instr_t)  # before the byte model loads
    model, preset = load_byte_model(byte_model_path)
    report = apply_delta(model, base_t, instr_t, alpha, retained_embeddings).to_dict()
    report["byte_model"] = str(byte_model_path)
    report["byte_model_source"] = model.cfg.source.name_or_path
    with storage.atomic_local_dir(out) as staging:  # into place only once parity holds
        export_model(model, staging, preset=preset, extra_meta={"transfer": report})
        report["parity"] = check_parity(staging, model)
    report["out_dir"] = str(out)
    return model, preset, report


def _src(s: str | SourceConfig) -> SourceConfig:
    return s if isinstance(s, SourceConfig) else SourceConfig(str(s))
