"""FSDP2 and activation checkpointing for the trainer (docs/training.md "Sharding").

`fully_shard` (FSDP2) turns every parameter into a DTensor sharded over the ranks; a unit's
parameters are all-gathered just before its forward (and again before its backward) and
freed after. The units here: each source decoder layer, each local (mLSTM) block, the teacher's
input embedding and head, the retained-subword embedding; everything else (norms, projections,
the boundary predictor, the byte head) is in the root unit, the stage objective.

* Precision: bf16 stages gather parameters in bf16 and compute in bf16, gradients are reduced
  in fp32 and the sharded master weights and AdamW state stay fp32 (`MixedPrecisionPolicy`).
* Frozen parts (the teacher; the global blocks in Stage 1) are sharded like the rest: no
  gradients, no optimizer state, 4 bytes per parameter / ranks at rest.
* A model is built once per rank with its parameters on the meta device (buffers real: the
  rotary frequencies and vocabulary masks are computed, not loaded), sharded, then
  materialised empty; the weights come from rank 0 (`load_full_state`, broadcast tensor by
  tensor) or from a DCP checkpoint (each rank reads its own shards).
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch import nn

# accelerate launch passes an FSDP yaml's settings to the processes as these variables.
LAUNCHER_FSDP = "ACCELERATE_USE_FSDP"
LAUNCHER_STRATEGY = "FSDP_SHARDING_STRATEGY"  # FULL_SHARD | HYBRID_SHARD (shard in a node, replicate across)


def launcher_wants_fsdp() -> bool:
    return os.environ.get(LAUNCHER_FSDP, "false").lower() == "true"


def resolve_sharding(sharding: str, world_size: int) -> str:
    """ "fsdp" or "ddp"; one process is never sharded ("ddp" there is plain single-process training)."""
    if world_size == 1:
        return "ddp"
    if sharding == "auto":
        return "fsdp" if launcher_wants_fsdp() else "ddp"
    return sharding


def device_mesh(device: torch.device, world_size: int):
    """1-D mesh (FULL_SHARD), or 2-D (nodes x local ranks) for HYBRID_SHARD (HSDP)."""
    from torch.distributed.device_mesh import init_device_mesh

    local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    if os.environ.get(LAUNCHER_STRATEGY, "FULL_SHARD") == "HYBRID_SHARD" and 1 < local < world_size:
        return init_device_mesh(
            device.type, (world_size // local, local), mesh_dim_names=("replicate", "shard")
        )
    return init_device_mesh(device.type, (world_size,), mesh_dim_names=("shard",))


# ---------------------------------------------------------------- units and activation checkpointing


def block_modules(model) -> list[nn.Module]:
    """The repeated blocks: the source's decoder layers, then the local encoder/decoder blocks."""
    return [
        *model.global_model.model.layers,
        *model.local_encoder.blocks,
        *model.local_decoder.blocks,
    ]


def apply_activation_checkpointing(model) -> None:
    """Wrap each block so its activations are recomputed in backward instead of kept.

    torch's `checkpoint_wrapper` (non-reentrant): a wrapped block's state-dict keys stay the
    same (the wrapper strips its own prefix), so checkpoints do not depend on this switch.
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        checkpoint_wrapper,
    )

    def wrap(blocks: nn.ModuleList) -> None:
        for i, blk in enumerate(blocks):
            blocks[i] = checkpoint_wrapper(blk, checkpoint_impl=CheckpointImpl.NO_REENTRANT)

    wrap(model.global_model.model.layers)
    wrap(model.local_encoder.blocks)
    wrap(model.local_decoder.blocks)


def _units(model) -> list[nn.Module]:
    """FSDP units below the root: blocks and the big embedding/head matrices that are called as modules."""
    t = model.teacher
    units = list(block_modules(model)) + [t.embed_tokens]
    if t.lm_head is not None:  # tied head (SmolLM2): F.linear on the embedding, which stays one unit
        units.append(t.lm_head)
    if model.local_encoder.retained_embedding is not None:
        units.append(model.local_encoder.retained_embedding)
    return units


def mixed_precision(precision: str):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def shard(objective: nn.Module, model, mesh, precision: str) -> None:
    """fully_shard every unit, then the objective as the root (in place)."""
    from torch.distributed.fsdp import fully_shard

    mp = mixed_precision(precision)
    for unit in _units(model):
        fully_shard(unit, mesh=mesh, mp_policy=mp, reshard_after_forward=True)
    # The root's parameters (norms, projections, heads) are gathered for the whole step.
    fully_shard(objective, mesh=mesh, mp_policy=mp, reshard_after_forward=False)


@contextlib.contextmanager
def meta_parameters():
    """Build modules with parameters on the meta device and real buffers (computed at init)."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        yield


def materialize(module: nn.Module, device: torch.device) -> None:
    """Give meta (sharded) parameters real, uninitialised storage; keep the buffers' values."""
    buffers = {n: b.detach().clone() for n, b in module.named_buffers()}
    module.to_empty(device=device)
    with torch.no_grad():
        for n, b in module.named_buffers():
            b.copy_(buffers[n].to(device))


def load_full_state(model: nn.Module, full_state: dict | None) -> None:
    """Every rank's shards from the full state dict that rank 0 holds (None elsewhere); a collective.

    Broadcast tensor by tensor, so no rank but 0 ever holds more than one full tensor.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(
        model,
        full_state or {},
        options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=True),
    )


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Global gradient-norm clipping; the norm of sharded (DTensor) gradients is reduced over ranks."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads, 2.0)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


@contextlib.contextmanager
def gathered(objective: nn.Module, sharded: bool):
    """The root unit's parameters gathered, for code that calls model methods, not the objective.

    Validation calls `model.encode`, `model.patches`, ... directly; the sub-units gather their
    own parameters when called, the root's must be gathered by hand.
    """
    if not sharded:
        yield
        return
    objective.unshard()
    try:
        yield
    finally:
        objective.reshard()
