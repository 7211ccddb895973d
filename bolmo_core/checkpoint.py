"""Training checkpoints: one folder per checkpoint, atomic, local or ``s3://`` (DESIGN.md).

Layout of ``<stage out>/step-000123/`` (or ``<stage out>/final/`` when the stage is done)::

    model.safetensors   every model weight (trainable and frozen; shared tensors once, aliases in metadata)
    optimizer.pt        optimizer.state_dict()  (tensors and plain values; loaded weights_only=True)
    scheduler.pt        lr scheduler state_dict
    rank-00000.pt ...   per rank: RNG states (torch, numpy, python, cuda) and the loader position
    trainer_state.json  step, samples, elapsed time, finished flag
    config.json         the resolved preset, stage, world size, data manifest hash, source identity
    COMMIT              written last; a folder without it is not a checkpoint

Atomicity: locally every file goes into ``.tmp-<name>/``, COMMIT last, then the folder is
renamed into place (a rename is atomic on one file system). On S3, where renames are
copies, the files are uploaded in place and COMMIT is uploaded last; readers ignore a
folder without COMMIT and the next run deletes it.
"""

from __future__ import annotations

import io
import json
import os
import random
import re
import shutil
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from . import storage

COMMIT = "COMMIT"
FINAL = "final"
MODEL_FILE = "model.safetensors"
_STEP_RE = re.compile(r"^step-(\d{6,})$")
# Preset fields that do not change the training math: a resume may differ in them.
IGNORED_FIELDS = ("callbacks", "checkpoint_every", "keep_last", "eval_every", "eval_batches")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used, with a one-line reason."""


class DamagedCheckpoint(CheckpointError):
    """A committed checkpoint whose files cannot be read back (truncated, corrupted)."""


class CheckpointMismatch(CheckpointError):
    """A checkpoint made with another config, data manifest, world size or source."""


def step_name(step: int) -> str:
    return f"step-{step:06d}"


def rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.pt"


# ---------------------------------------------------------------- finding checkpoints


def is_committed(ckpt_uri: str) -> bool:
    return storage.exists(storage.join(ckpt_uri, COMMIT))


def committed_steps(out_uri: str) -> list[tuple[int, str]]:
    """(step, uri) of every committed ``step-*`` folder, oldest first."""
    out = []
    for name in storage.listdir(out_uri):
        m = _STEP_RE.match(name)
        if m and is_committed(storage.join(out_uri, name)):
            out.append((int(m.group(1)), storage.join(out_uri, name)))
    return sorted(out)


def final_checkpoint(out_uri: str) -> str | None:
    """The committed ``final`` checkpoint of a finished stage, if any."""
    uri = storage.join(out_uri, FINAL)
    return uri if is_committed(uri) else None


def latest_checkpoint(out_uri: str) -> str | None:
    """The checkpoint to resume from: ``final`` if the stage finished, else the newest step."""
    fin = final_checkpoint(out_uri)
    if fin:
        return fin
    steps = committed_steps(out_uri)
    return steps[-1][1] if steps else None


def resolve_checkpoint(uri: str) -> str:
    """A committed checkpoint folder from either a checkpoint URI or a stage output folder."""
    if is_committed(uri):
        return uri
    found = latest_checkpoint(uri)
    if found is None:
        raise CheckpointError(f"{uri}: no committed checkpoint there (no {COMMIT} marker)")
    return found


def clean_uncommitted(out_uri: str) -> list[str]:
    """Delete folders a crashed save left behind (temp folders, step folders without COMMIT)."""
    removed = []
    for name in storage.listdir(out_uri):
        uri = storage.join(out_uri, name)
        if name.startswith(".tmp-") or ((_STEP_RE.match(name) or name == FINAL) and not is_committed(uri)):
            storage.remove(uri, recursive=True)
            removed.append(name)
    return removed


# ---------------------------------------------------------------- model weights


def state_to_bytes(state: dict[str, torch.Tensor]) -> bytes:
    """safetensors bytes of a state dict; tensors that share memory are stored once."""
    seen: dict[tuple, str] = {}
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for name, t in state.items():
        t = t.detach()
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t.to("cpu").contiguous().clone()
    return st_save(tensors, metadata={"aliases": json.dumps(aliases, sort_keys=True)})


def state_from_bytes(data: bytes) -> dict[str, torch.Tensor]:
    tensors = st_load(data)
    header_len = int.from_bytes(data[:8], "little")
    meta = json.loads(data[8 : 8 + header_len]).get("__metadata__", {}) or {}
    for alias, canonical in json.loads(meta.get("aliases", "{}")).items():
        tensors[alias] = tensors[canonical]
    return tensors


def load_model_state(ckpt_uri: str) -> dict[str, torch.Tensor]:
    uri = storage.join(ckpt_uri, MODEL_FILE)
    try:
        return state_from_bytes(storage.read_bytes(uri))
    except storage.StorageError:
        raise
    except Exception as e:  # truncated or damaged: safetensors' own error, or a bad header
        raise DamagedCheckpoint(
            f"{uri}: damaged ({type(e).__name__}: {str(e).splitlines()[0][:160]}); delete {ckpt_uri} "
            "and resume from the previous committed checkpoint"
        ) from None


# ---------------------------------------------------------------- RNG and torch-saved state


def capture_rng() -> dict[str, Any]:
    """This process's RNG states as tensors and plain values (loadable with weights_only)."""
    py_version, py_state, py_gauss = random.getstate()
    np_state = np.random.get_state()
    out: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python_version": py_version,
        "python_state": torch.tensor(py_state, dtype=torch.int64),
        "python_gauss": py_gauss,
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_has_gauss": int(np_state[3]),
        "numpy_cached_gaussian": float(np_state[4]),
    }
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(
        (
            state["python_version"],
            tuple(int(x) for x in state["python_state"].tolist()),
            state["python_gauss"],
        )
    )
    np.random.set_state(
        (
            "MT19937",
            state["numpy_keys"].numpy().astype(np.uint32),
            state["numpy_pos"],
            state["numpy_has_gauss"],
            state["numpy_cached_gaussian"],
        )
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _torch_load(uri: str) -> Any:
    try:
        return torch.load(io.BytesIO(storage.read_bytes(uri)), map_location="cpu", weights_only=True)
    except storage.StorageError:
        raise
    except Exception as e:  # a truncated or foreign file: one line, not a pickle traceback
        raise DamagedCheckpoint(
            f"{uri}: cannot be loaded ({type(e).__name__}: {str(e).splitlines()[0][:200]}); delete its "
            "checkpoint folder and resume from the previous committed one"
        ) from None


# ---------------------------------------------------------------- save / load


def save_checkpoint(
    out_uri: str,
    name: str,
    *,
    rank: int,
    world_size: int,
    barrier: Callable[[], None],
    rank_state: dict[str, Any],
    model_state: dict[str, torch.Tensor] | None = None,
    optimizer_state: dict | None = None,
    scheduler_state: dict | None = None,
    trainer_state: dict | None = None,
    config: dict | None = None,
    keep_last: int = 2,
) -> str:
    """Write checkpoint ``name`` under ``out_uri`` from every rank; returns its URI.

    Every rank calls this (it contains barriers). Each rank writes its own RNG/loader file;
    rank 0 writes the shared files (``model_state`` etc. are only needed on rank 0), then
    COMMIT, then (locally) renames the folder into place and prunes old step folders.
    """
    final_uri = storage.join(out_uri, name)
    local = storage.is_local(out_uri)
    staging = storage.join(out_uri, f".tmp-{name}") if local else final_uri
    if rank == 0:
        storage.remove(staging, recursive=True)
        if not local:  # an uncommitted leftover of the same name on S3
            storage.remove(final_uri, recursive=True)
        if local:
            os.makedirs(storage.local_path(staging), exist_ok=True)
    barrier()
    storage.write_bytes_atomic(storage.join(staging, rank_file(rank)), _torch_bytes(rank_state))
    barrier()
    if rank == 0:
        storage.write_bytes_atomic(storage.join(staging, MODEL_FILE), state_to_bytes(model_state))
        storage.write_bytes_atomic(storage.join(staging, "optimizer.pt"), _torch_bytes(optimizer_state))
        storage.write_bytes_atomic(storage.join(staging, "scheduler.pt"), _torch_bytes(scheduler_state))
        storage.write_json_atomic(storage.join(staging, "trainer_state.json"), trainer_state or {})
        storage.write_json_atomic(storage.join(staging, "config.json"), config or {})
        files = [MODEL_FILE, "optimizer.pt", "scheduler.pt", "trainer_state.json", "config.json"]
        files += [rank_file(r) for r in range(world_size)]
        storage.write_json_atomic(storage.join(staging, COMMIT), {"files": files, "world_size": world_size})
        if local:
            dst = storage.local_path(final_uri)
            if os.path.exists(dst):
                shutil.rmtree(dst)
            os.replace(storage.local_path(staging), dst)
        prune(out_uri, keep_last)
    barrier()
    return final_uri


def prune(out_uri: str, keep_last: int) -> None:
    """Keep only the newest ``keep_last`` committed step folders (``final`` is never pruned)."""
    steps = committed_steps(out_uri)
    for _, uri in steps[: max(0, len(steps) - max(1, keep_last))]:
        storage.remove(uri, recursive=True)


def load_checkpoint(ckpt_uri: str, rank: int | None) -> dict[str, Any]:
    """Everything a rank needs to resume: model, optimizer, scheduler, its RNG/loader state.

    ``rank=None`` skips the per-rank file (resuming on another world size).
    """
    if not is_committed(ckpt_uri):
        raise CheckpointError(f"{ckpt_uri}: not a committed checkpoint (no {COMMIT} marker)")
    return {
        "model": load_model_state(ckpt_uri),
        "optimizer": _torch_load(storage.join(ckpt_uri, "optimizer.pt")),
        "scheduler": _torch_load(storage.join(ckpt_uri, "scheduler.pt")),
        "rank": None if rank is None else _torch_load(storage.join(ckpt_uri, rank_file(rank))),
        "trainer_state": storage.read_json(storage.join(ckpt_uri, "trainer_state.json")),
        "config": read_config(ckpt_uri),
    }


def read_config(ckpt_uri: str) -> dict:
    return storage.read_json(storage.join(ckpt_uri, "config.json"))


def checkpoint_hash(ckpt_uri: str) -> str:
    """The identity of a checkpoint in lineage: sha256 of its weights file."""
    return storage.sha256_uri(storage.join(ckpt_uri, MODEL_FILE))


# ---------------------------------------------------------------- compatibility


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: list(d) if isinstance(d, tuple) else d}


def run_identity(preset: dict, stage: int) -> dict[str, Any]:
    """The part of a preset that must match to resume a stage: model, data and this stage."""
    key = f"stage{stage}"
    return {"model": preset["model"], "data": preset["data"], key: preset[key]}


def check_compatible(saved: dict, current: dict, ckpt_uri: str, allow_mismatch: bool = False) -> list[str]:
    """Compare two checkpoint configs; raise CheckpointMismatch naming the first difference.

    Returns the list of differences (empty when identical); with ``allow_mismatch`` they
    are returned instead of raised, so the caller can log them.
    """
    diffs = []
    for field in ("stage", "world_size", "manifest_hash", "source"):
        if saved.get(field) != current.get(field):
            diffs.append(f"{field}: {saved.get(field)!r} in the checkpoint, {current.get(field)!r} now")
    a = _flatten(run_identity(saved["preset"], saved["stage"]) if "preset" in saved else {})
    b = _flatten(run_identity(current["preset"], current["stage"]))
    for k in sorted(set(a) | set(b)):
        if k.rsplit(".", 1)[-1] in IGNORED_FIELDS:
            continue
        if a.get(k) != b.get(k):
            diffs.append(f"config {k}: {a.get(k)!r} in the checkpoint, {b.get(k)!r} now")
    if diffs and not allow_mismatch:
        more = f" (and {len(diffs) - 1} more)" if len(diffs) > 1 else ""
        raise CheckpointMismatch(
            f"checkpoint {ckpt_uri} was made differently: {diffs[0]}{more}; "
            "pass allow_mismatch=true (--allow-mismatch) to resume anyway"
        )
    return diffs
