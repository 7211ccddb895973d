"""Hugging Face export of a byte model (docs/architecture.md §12, done right) and the parity check that gates it.

The folder holds `config.json` (model_type "bolmo", `auto_map` to the remote code, the FULL source
config as `global_config` so the global blocks are rebuilt offline by transformers' own class for
that architecture, with rope_theta / rope_scaling / sliding windows / norm eps mirrored at the top
level), `model.safetensors` (local modules, global blocks, and the retained-subword table as
buffers: entry ids + their byte strings), the tokenizer files, and the self-contained remote code
copied from `bolmo_core/hf/` (it never imports bolmo_core). `check_parity` loads the folder with
`trust_remote_code=True` and compares its logits with the in-memory model; it raises on failure.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from . import storage
from .byte_tokenizer import BOS, OFFSET
from .load import EXPORT_META, load_checkpoint_model

HF_DIR = Path(__file__).parent / "hf"
REMOTE_FILES = ("configuration_bolmo.py", "modeling_bolmo.py", "tokenization_bolmo.py")
AUTO_MAP = {
    "AutoConfig": "configuration_bolmo.BolmoConfig",
    "AutoModelForCausalLM": "modeling_bolmo.BolmoForCausalLM",
    "AutoTokenizer": ["tokenization_bolmo.BolmoTokenizer", None],
}
PARITY_PROMPTS = (
    "The quick brown fox jumps over the lazy dog.",
    "Byte-level models spell: s-t-r-a-w-b-e-r-r-y has 3 r's.",
    "Caf\u00e9 cr\u00e8me, na\u00efve \u2014 \u65e5\u672c\u8a9e \U0001f600 ok",
    "def f(x):\n    return x * 2  # code\n",
    "",
)
# Source-config fields that must survive the export unchanged (docs/architecture.md §12: rope_theta was lost there).
CRITICAL_FIELDS = (
    "rope_parameters",
    "rope_scaling",
    "rope_theta",
    "sliding_window",
    "layer_types",
    "rms_norm_eps",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_size",
    "intermediate_size",
    "max_position_embeddings",
    "attention_bias",
    "hidden_act",
)


class ExportError(ValueError):
    """An export that cannot be written or loaded, with a one-line reason."""


class ParityError(ExportError):
    """The exported model does not reproduce the in-memory model."""


def _global_config(model) -> dict:
    """The source config as a plain dict (private/local fields dropped)."""
    d = model.global_model.config.to_dict()
    d = {
        k: v
        for k, v in d.items()
        if not k.startswith("_") and k not in ("quantization_config", "transformers_version")
    }
    if "model_type" not in d:
        raise ExportError("source config has no model_type: the global blocks could not be rebuilt")
    return d


def retained_table(vocab) -> tuple[np.ndarray, np.ndarray, bytes]:
    """(entry ids, offsets, concatenated bytes): what RetainedIndex matches (non-special, lowest id per string)."""
    seen: dict[bytes, int] = {}
    for i, b in enumerate(vocab.token_bytes):
        if b and i not in vocab.special_ids and b not in seen:
            seen[b] = i
    ids = np.fromiter(seen.values(), dtype=np.int64, count=len(seen))
    lens = np.fromiter((len(b) for b in seen), dtype=np.int64, count=len(seen))
    return ids, np.concatenate([[0], np.cumsum(lens)]).astype(np.int64), b"".join(seen)


def _resolve(model_or_dir):
    if isinstance(model_or_dir, str | os.PathLike):
        return load_checkpoint_model(str(model_or_dir))
    return model_or_dir, None


TOKENIZER_CONFIG = {
    "tokenizer_class": "BolmoTokenizer",
    "auto_map": {"AutoTokenizer": AUTO_MAP["AutoTokenizer"]},
    "pad_token": "<pad>",
    "bos_token": "<bos>",
    "eos_token": "<bos>",
    "add_bos_token": True,
    "padding_side": "left",
    "model_max_length": 1_000_000_000,
}
PARITY_FILE = "byteify_parity.json"  # written next to an export by the flow's export task, after parity


def export_model(
    model_or_dir,
    out_dir: str | os.PathLike,
    preset=None,
    vocab=None,
    overwrite: bool = False,
    extra_meta: dict | None = None,
) -> Path:
    """Write the HF folder for a BolmoModel (or a checkpoint folder) to `out_dir`, atomically.

    `overwrite` replaces an earlier byteify export only: a folder holding files byteify did not
    write there, or a checkpoint, is refused and left as it is. `extra_meta` goes into the
    byteify marker (e.g. what an instruct-delta transfer did, bolmo_core/transfer.py).
    """
    if "://" in str(out_dir) and not str(out_dir).startswith("file://"):
        raise ExportError(
            f"export folder '{out_dir}': must be a local path (copy the finished folder to object storage)"
        )
    out = Path(str(out_dir).removeprefix("file://"))
    _check_out(out, overwrite)
    model, ckpt_preset = _resolve(model_or_dir)
    preset = preset or ckpt_preset
    state = {
        k: v.detach().to("cpu").clone().contiguous()
        for k, v in model.state_dict().items()
        if not k.startswith("teacher.")
    }
    extra = {}
    if model.local_encoder.retained_embedding is not None:
        extra = _add_retained(model, state, vocab)
    meta = {
        "format": "byteify-bolmo-hf/1",
        "source": model.cfg.source.name_or_path,
        "source_revision": model.cfg.source.revision,
        "preset": preset.to_dict() if preset is not None else None,
        **(extra_meta or {}),
    }
    with storage.atomic_local_dir(out) as tmp:
        _write_folder(tmp, _hf_config(model, extra), state, meta)
    return out


def _check_out(out: Path, overwrite: bool) -> None:
    """Refuse an output folder that holds anything but an earlier byteify export."""
    if not out.exists() or not any(out.iterdir()):
        return
    if not out.is_dir():
        raise ExportError(f"export folder '{out}': is a file")
    if not overwrite:
        raise ExportError(f"export folder '{out}': exists and is not empty (pass overwrite=True)")
    from .checkpoint import COMMIT

    for root, _, files in os.walk(out):
        if COMMIT in files:
            raise ExportError(f"export folder '{out}': holds a checkpoint ({root}); choose another folder")
    meta = out / EXPORT_META
    written = set(json.loads(meta.read_text()).get("files", [])) if meta.exists() else set()
    written.add(PARITY_FILE)
    unknown = sorted(
        str(p.relative_to(out))
        for p in out.rglob("*")
        if p.is_file() and str(p.relative_to(out)) not in written
    )
    if unknown or not meta.exists():
        what = f"'{unknown[0]}' was not written by byteify" if unknown else f"no {EXPORT_META}"
        raise ExportError(
            f"export folder '{out}': {what}; --overwrite replaces only an earlier byteify export"
        )


def _add_retained(model, state: dict, vocab) -> dict:
    """The retained-subword table as buffers (the HF code matches byte suffixes against it); config fields."""
    if vocab is None:
        from .source import load_tokenizer
        from .subword import get_vocab

        vocab = get_vocab(load_tokenizer(model.cfg.source))
    ids, offsets, blob = retained_table(vocab)
    state["retained_ids"] = torch.from_numpy(ids)
    state["retained_offsets"] = torch.from_numpy(offsets)
    state["retained_bytes"] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
    return dict(
        retained_vocab_size=model.local_encoder.retained_embedding.weight.shape[0],
        retained_entries=len(ids),
        retained_bytes=len(blob),
        retained_sep_id=vocab.doc_separator_id,
        retained_pad_id=vocab.pad_id,
        retained_fallback_id=vocab.byte_fallback_id,
    )


def _hf_config(model, extra: dict):
    """The HF config: the preset's own field names (LocalConfig, ModelConfig's boundary fields), no renames."""
    from .hf.configuration_bolmo import BolmoConfig

    cfg = model.cfg
    local = {
        k: v
        for k, v in dataclasses.asdict(cfg.local).items()
        if k not in ("chunk_size", "kernel", "igate_bias_init")
    }
    boundary = {k: getattr(cfg, k) for k in ("boundary_lookahead", "boundary_threshold", "boundary_context")}
    return BolmoConfig(
        global_config=_global_config(model),
        **{**local, "d_local": model.d_local},
        **boundary,
        architectures=["BolmoForCausalLM"],
        auto_map=AUTO_MAP,
        **{"retained_vocab_size": 0, "retained_entries": 0, "retained_bytes": 0, **extra},
    )


def _write_folder(tmp: Path, hf_cfg, state: dict, meta: dict) -> None:
    """Config, weights, remote code, tokenizer config; the byteify marker (listing every file) last."""
    from safetensors.torch import save_file

    hf_cfg.save_pretrained(tmp)
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    for name in REMOTE_FILES:
        shutil.copyfile(HF_DIR / name, tmp / name)
    (tmp / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=1) + "\n")
    files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
    (tmp / EXPORT_META).write_text(json.dumps({**meta, "files": [*files, EXPORT_META]}, indent=1) + "\n")


def load_hf(export_dir, device: str | torch.device = "cpu"):
    """The exported model through transformers' Auto classes (remote code, fp32, eval mode)."""
    from transformers import AutoModelForCausalLM

    if not Path(export_dir, "config.json").exists():
        raise ExportError(f"export folder '{export_dir}': no config.json")
    m = AutoModelForCausalLM.from_pretrained(str(export_dir), trust_remote_code=True, dtype=torch.float32)
    return m.to(device).eval()


def check_parity(export_dir, model, prompts=PARITY_PROMPTS, atol: float = 1e-4) -> dict:
    """Exported vs in-memory fp32 logits on fixed prompts, and the source config fields; raises ParityError."""
    from .generate import retained_index

    hf = load_hf(export_dir, device=next(model.parameters()).device)
    src = _global_config(model)
    problems = [
        f"{k}: exported {getattr(hf.config, k, None)!r} != source {src[k]!r}"
        for k in CRITICAL_FIELDS
        if k in src and _norm(getattr(hf.config, k, None)) != _norm(src[k])
    ]
    problems += [
        f"global_config.{k} differs" for k in src if _norm(hf.config.global_config.get(k)) != _norm(src[k])
    ]
    index = retained_index(model)
    was_training = model.training
    model.eval()
    per = []
    try:
        with torch.no_grad():
            for p in prompts:
                ids = torch.tensor([[BOS, *(b + OFFSET for b in p.encode("utf-8"))]], device=hf.device)
                ours = model(ids, None if index is None else index.expand(ids)).logits.float()
                theirs = hf(ids).logits.float()
                per.append(float((ours - theirs).abs().max()))
    finally:
        model.train(was_training)
    report = {
        "export_dir": str(export_dir),
        "prompts": len(per),
        "max_abs_diff": max(per),
        "per_prompt": per,
        "atol": atol,
        "rope_theta": getattr(hf.config, "rope_theta", None),
        "config_problems": problems,
    }
    report["passed"] = report["max_abs_diff"] < atol and not problems
    if not report["passed"]:
        why = problems[0] if problems else f"max |logit diff| {report['max_abs_diff']:.3g} >= {atol}"
        raise ParityError(f"export '{export_dir}' fails the parity check: {why}")
    return report


def _norm(v):
    """JSON round trip, so tuples/lists and int/float keys compare as saved."""
    return json.loads(json.dumps(v, sort_keys=True, default=str))
