"""Test helper: committed one-process checkpoints, written by the trainer's own save function."""

from __future__ import annotations

from pathlib import Path


def save_parts(folder: str | Path, name: str, config: dict, **parts) -> str:
    """The URI of checkpoint `name` (e.g. "final", "step-000010") under `folder`, written by one
    process (rank 0 of 1) with `config` as its config.json; `parts` are save_checkpoint's
    (model_state or sharded_state, optimizer_state, trainer_state, rank_state, keep_last ...)."""
    from bolmo_core import checkpoint

    parts.setdefault("rank_state", {})
    return checkpoint.save_checkpoint(
        str(folder), name, rank=0, world_size=1, barrier=lambda: None, config=config, **parts
    )


def save_model(folder: str | Path, name: str, model, preset, stage: int, **parts) -> str:
    """`save_parts` of `model`'s weights, with the preset and stage in the config."""
    config = {"preset": preset.to_dict(), "stage": stage}
    return save_parts(folder, name, config, model_state=model.state_dict(), **parts)
