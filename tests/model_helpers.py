"""Test helper: a committed one-process checkpoint of a model, written by the trainer's own save function."""

from __future__ import annotations

from pathlib import Path


def save_model(folder: str | Path, name: str, model, preset, stage: int, **state) -> str:
    """The URI of checkpoint `name` (e.g. "final", "step-000010") of `model` under `folder`, with the
    preset and stage in its config; `state` adds the other parts (trainer_state, rank_state, ...)."""
    from bolmo_core import checkpoint

    return checkpoint.save_checkpoint(
        str(folder),
        name,
        rank=0,
        world_size=1,
        barrier=lambda: None,
        rank_state=state.pop("rank_state", {}),
        model_state=model.state_dict(),
        config={"preset": preset.to_dict(), "stage": stage},
        **state,
    )
