"""Load a trained byte model from a checkpoint folder (docs/internals.md: Checkpoints).

A checkpoint folder (``step-NNNNNN/`` or ``final/``, or a stage output folder holding them)
has ``model.safetensors`` and ``config.json`` with the preset; the model is rebuilt around
its source architecture without the source initialisation, then the saved weights are
loaded strictly. Exported Hugging Face folders are loaded by ``bolmo_core.export``.
"""

from __future__ import annotations

import torch

from . import checkpoint, storage
from .config import Preset


class LoadError(ValueError):
    """A model folder that cannot be loaded, with a one-line reason."""


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
    except storage.StorageError as e:
        raise LoadError(f"model folder '{path}': {e}") from None
    cfg = checkpoint.read_config(uri)
    if "preset" not in cfg:
        raise LoadError(f"checkpoint '{uri}': config.json has no 'preset'")
    try:
        preset = Preset.from_dict(cfg["preset"])
    except (TypeError, ValueError) as e:
        raise LoadError(f"checkpoint '{uri}': config.json preset is invalid ({e})") from None
    # init=False: the saved weights replace everything the source initialisation would set.
    model = BolmoModel.from_source(preset.model, init=False)
    state = checkpoint.load_model_state(uri)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise LoadError(f"checkpoint '{uri}': weights do not fit the preset's model ({what})")
    return model.to(device).eval(), preset


def load_byte_model(path: str, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, Preset]:
    """(BolmoModel, preset) from a checkpoint folder, or from an exported HF folder via bolmo_core.export."""
    if is_checkpoint_dir(path):
        return load_checkpoint_model(path, device)
    try:
        from .export import load_exported
    except ImportError:
        load_exported = None
    if load_exported is not None and storage.exists(storage.join(path, "config.json")):
        return load_exported(path, device=device)
    raise LoadError(
        f"model folder '{path}': neither a committed checkpoint (no COMMIT marker) "
        "nor a loadable exported model"
    )
