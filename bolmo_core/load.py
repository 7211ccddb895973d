"""Loading byte models: from a checkpoint folder, from an exported HF folder, or weights into a model.

* `load_byte_model(path)`: a committed checkpoint (``step-NNNNNN/``, ``final/``, or a stage output
  folder holding them) or an exported folder written by `bolmo_core.export`; the model is rebuilt
  around its source architecture without the source initialisation, then the saved weights are
  loaded. Both checkpoint formats: a single-file one, or a sharded (FSDP) DCP one written by any
  number of ranks, consolidated in this process by `checkpoint.load_model_state`.
* `load_weights(model, state, where)`: the one place weights go into a model: every tensor
  must exist and fit, with one line naming the file and the first tensors that do not.

Imports go one way: `export` uses this module, never the reverse.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from . import checkpoint, storage
from .config import ConfigError, Preset
from .lora import add_adapters, merge_adapters, stage_lora

EXPORT_META = "byteify_export.json"


class LoadError(ValueError):
    """A model folder or weights file that cannot be loaded, with a one-line reason."""


def load_weights(
    model: torch.nn.Module,
    state: dict[str, torch.Tensor],
    where: str,
    *,
    may_miss: tuple[str, ...] = (),
    may_add: bool = False,
) -> int:
    """Load `state` into `model`; LoadError naming `where` when tensors are missing or do not fit.

    Keys under a `may_miss` prefix may be absent (e.g. the frozen teacher, which an export leaves
    out); with `may_add`, keys the model does not have are skipped (a Stage-1 checkpoint's teacher
    feeding Stage 2). Returns how many saved tensors were skipped.
    """
    own = model.state_dict()
    wrong = [
        f"{k}: {tuple(state[k].shape)} saved, {tuple(v.shape)} here"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    missing = [k for k in own if k not in state and not k.startswith(may_miss)]
    extra = [k for k in state if k not in own]
    problems = ([f"{len(wrong)} tensors of another shape (e.g. {wrong[0]})"] if wrong else []) + (
        [f"{len(missing)} missing (e.g. '{missing[0]}')"] if missing else []
    )
    if extra and not may_add:
        problems.append(f"{len(extra)} not in this model (e.g. '{extra[0]}')")
    if problems:
        raise LoadError(f"{where}: weights do not fit the model: {'; '.join(problems)}")
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    return len(extra)


def _preset(saved: dict, where: str) -> Preset:
    try:
        return Preset.from_dict(saved)
    except ConfigError as e:
        raise LoadError(f"{where}: the saved preset is invalid ({e})") from None


def is_checkpoint_dir(path: str) -> bool:
    """A committed checkpoint, or a stage output folder that holds one."""
    try:
        checkpoint.resolve_checkpoint(path)
    except (checkpoint.CheckpointError, storage.StorageError, OSError):
        return False
    return True


def load_checkpoint_model(path: str, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, Preset]:
    """(BolmoModel in eval mode, its preset) from a checkpoint folder or a stage output folder."""
    from .model import BolmoModel

    try:
        uri = checkpoint.resolve_checkpoint(path)
        cfg = checkpoint.read_config(uri)
    except storage.StorageError as e:
        raise LoadError(f"model folder '{path}': {e}") from None
    if "preset" not in cfg:
        raise LoadError(f"checkpoint '{uri}': config.json has no 'preset'")
    preset = _preset(cfg["preset"], f"checkpoint '{uri}'")
    # init=False: the saved weights replace everything the source initialisation would set.
    model = BolmoModel.from_source(preset.model, init=False)
    lora_cfg = stage_lora(preset, cfg.get("stage"))
    if lora_cfg is not None:  # saved unmerged (exact resume); merged here, so every reader sees plain weights
        add_adapters(model, lora_cfg)
    load_weights(model, checkpoint.load_model_state(uri), f"checkpoint '{uri}'")
    if lora_cfg is not None:
        merge_adapters(model)
    return model.to(device).eval(), preset


def load_exported(path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, Preset]:
    """(BolmoModel, preset) from an exported folder written by `bolmo_core.export` (needs its preset)."""
    from safetensors.torch import load_file

    from .model import BolmoModel

    meta_path = Path(path, EXPORT_META)
    if not meta_path.exists():
        raise LoadError(f"export folder '{path}': no {EXPORT_META} (not written by byteify)")
    meta = json.loads(meta_path.read_text())
    if not meta.get("preset"):
        raise LoadError(
            f"export folder '{path}': exported without a preset, load it with transformers instead"
        )
    preset = _preset(meta["preset"], f"export folder '{path}'")
    model = BolmoModel.from_source(preset.model, init=False)
    # The retained-subword table travels as buffers for the HF code; the export leaves the teacher out.
    state = {
        k: v
        for k, v in load_file(str(Path(path, "model.safetensors"))).items()
        if not k.startswith("retained_")
    }
    load_weights(model, state, f"export folder '{path}'", may_miss=("teacher.",))
    return model.to(device).eval(), preset


def load_byte_model(path: str, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, Preset]:
    """(BolmoModel, preset) from a checkpoint folder or an exported HF folder."""
    if is_checkpoint_dir(path):
        return load_checkpoint_model(path, device)
    local = Path(storage.local_path(path)) if storage.is_local(path) else None
    if local is not None and (local / "trainer_state.json").exists():
        raise LoadError(
            f"checkpoint '{path}': no {checkpoint.COMMIT} marker, its save did not finish; "
            "use the stage folder (its newest committed checkpoint) or an earlier step"
        )
    if local is not None and (local / "config.json").exists():
        return load_exported(str(local), device=device)
    raise LoadError(
        f"model folder '{path}': neither a committed checkpoint (no COMMIT marker) nor an exported model"
    )
