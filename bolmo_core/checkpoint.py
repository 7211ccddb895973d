"""Training checkpoints: one folder per checkpoint, atomic, local or ``s3://`` (docs/internals.md).

Layout of ``<stage out>/step-000123/`` (or ``<stage out>/final/`` when the stage is done)::

    model.safetensors   every model weight (trainable and frozen; shared tensors once, aliases in metadata)
    optimizer.pt        optimizer.state_dict()  (tensors and plain values; loaded weights_only=True)
    scheduler.pt        lr scheduler state_dict
    rank-00000.pt ...   per rank: RNG states (torch, numpy, python, cuda) and the loader position
    trainer_state.json  step, samples, elapsed time, finished flag
    config.json         the resolved preset, stage, world size, data manifest hash, source identity
    COMMIT              written last; a folder without it is not a checkpoint; holds the sha256 of
                        every file above (from the bytes written), checked whenever one is read

A sharded (FSDP) run writes ``dcp/`` instead of ``model.safetensors`` and ``optimizer.pt``: a
``torch.distributed.checkpoint`` folder (``.metadata`` + ``__<rank>_0.distcp``) holding the
model (``model.*``) and optimizer (``optim.*``) state, each rank writing only its own shards,
nothing gathered anywhere. COMMIT then says ``"format": "dcp"`` and holds the sha256 of each
shard file (hashed by the rank that wrote it) and of ``.metadata``; a load checks them all
first, the ranks sharing the files (`verify_sharded`). DCP reshards on load: a checkpoint written by N
ranks loads into M ranks, or into one process (`consolidated_model_state`, what evaluation
and export use). Its ``.metadata`` is a pickle: it is read with an unpickler that only knows
DCP's own metadata classes, and non-tensor values load with ``weights_only=True``.

Atomicity: locally every file goes into ``.tmp-<name>/``, COMMIT last, then the folder is
renamed into place (a rename is atomic on one file system). On S3, where renames are
copies, the files are uploaded in place and COMMIT is uploaded last; readers ignore a
folder without COMMIT and the next run deletes it.
"""

from __future__ import annotations

import io
import json
import os
import pickle
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
IGNORED_FIELDS = (
    "callbacks",
    "checkpoint_every",
    "keep_last",
    "eval_every",
    "eval_batches",
    "activation_checkpointing",  # recomputes the same activations: same math, less memory
)
FORMAT_FILES, FORMAT_DCP = "files", "dcp"
DCP_DIR = "dcp"


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


def load_model_state(ckpt_uri: str, commit: dict | None = None) -> dict[str, torch.Tensor]:
    """Every weight of a checkpoint as one state dict, whatever its format (the one entry point).
    `commit`: its COMMIT record when the caller has already read it."""
    commit = commit or read_commit(ckpt_uri)
    if commit["format"] == FORMAT_DCP:
        return consolidated_model_state(ckpt_uri)
    uri = storage.join(ckpt_uri, MODEL_FILE)
    data = _read_file(uri, _digests(commit).get(MODEL_FILE))
    try:
        return state_from_bytes(data)
    except Exception as e:  # truncated or damaged: safetensors' own error, or a bad header
        raise _damaged_file(uri, f"damaged ({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None


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


def _damaged_file(uri: str, what: str, folder: str | None = None) -> DamagedCheckpoint:
    """One line: the file of a committed checkpoint, what is wrong with it, and what to do."""
    folder = folder or storage.dirname(uri)
    return DamagedCheckpoint(f"{uri}: {what}; delete {folder} and resume from the previous committed one")


CHANGED = "sha256 differs from COMMIT (changed or damaged)"


def _digests(commit: dict) -> dict[str, str]:
    """COMMIT's {file: sha256}; empty for a checkpoint written before files had digests."""
    sums = commit.get("sha256")
    return sums if isinstance(sums, dict) else {}


def _read_file(uri: str, sha256: str | None = None) -> bytes:
    """A file of a committed checkpoint, checked against its COMMIT digest when it has one.

    The digest is checked before the bytes are parsed: nothing reads bytes that were not
    committed. Hashing bytes already in memory costs a fraction of reading them.
    """
    try:
        data = storage.read_bytes(uri)
    except storage.StorageError:
        if storage.exists(uri):  # unreadable for another reason (permissions, network): not damage
            raise
        raise _damaged_file(uri, "missing from a committed checkpoint") from None
    if sha256 is not None and storage.sha256_bytes(data) != sha256:
        raise _damaged_file(uri, CHANGED)
    return data


def _read_json(uri: str, sha256: str | None = None) -> Any:
    data = _read_file(uri, sha256)
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _damaged_file(uri, f"damaged (not valid JSON: {_first_line(e)})") from None


def _torch_load(uri: str, sha256: str | None = None) -> Any:
    data = _read_file(uri, sha256)
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: one line, not a pickle traceback
        raise _damaged_file(
            uri, f"cannot be loaded ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
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
    sharded_state: dict | None = None,
    scheduler_state: dict | None = None,
    trainer_state: dict | None = None,
    config: dict | None = None,
    keep_last: int = 2,
) -> str:
    """Write checkpoint ``name`` under ``out_uri`` from every rank; returns its URI.

    Every rank calls this (it contains barriers). Each rank writes its own RNG/loader file.
    With ``sharded_state`` (``{"model": ..., "optim": ...}`` of DTensors, every rank) the weights
    and optimizer go through DCP, each rank writing its shards; otherwise rank 0 writes
    ``model_state``/``optimizer_state`` (only needed there). Rank 0 then writes the shared
    files and COMMIT, renames the folder into place (locally) and prunes old step folders.
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
    sums: dict[str, str] = {}  # {file: sha256} of what this rank wrote, for COMMIT
    _put(staging, rank_file(rank), _torch_bytes(rank_state), sums)
    commit: dict[str, Any] = {"format": FORMAT_FILES, "world_size": world_size}
    if sharded_state is not None:
        commit["format"] = FORMAT_DCP
        sums |= save_sharded(staging, sharded_state, rank)
    sums = _gathered(sums)  # rank 0 writes COMMIT: it needs every rank's digests
    barrier()
    if rank == 0:
        files = _write_shared(staging, model_state, optimizer_state, sharded_state is not None, sums)
        _put(staging, "scheduler.pt", _torch_bytes(scheduler_state), sums)
        _put(staging, "trainer_state.json", storage.json_bytes(trainer_state or {}), sums)
        _put(staging, "config.json", storage.json_bytes(config or {}), sums)
        files += ["scheduler.pt", "trainer_state.json", "config.json"]
        commit["files"] = files + [rank_file(r) for r in range(world_size)]
        commit["sha256"] = dict(sorted(sums.items()))
        storage.write_json_atomic(storage.join(staging, COMMIT), commit)
        if local:
            dst = storage.local_path(final_uri)
            if os.path.exists(dst):
                shutil.rmtree(dst)
            os.replace(storage.local_path(staging), dst)
        prune(out_uri, keep_last)
    barrier()
    return final_uri


def _put(folder: str, name: str, data: bytes, sums: dict[str, str]) -> None:
    """Write one file of a checkpoint and note its sha256 (of the bytes in hand: nothing is read back)."""
    storage.write_bytes_atomic(storage.join(folder, name), data)
    sums[name] = storage.sha256_bytes(data)


def _gathered(sums: dict[str, str]) -> dict[str, str]:
    """Every rank's {file: sha256}, on every rank (one process, or no process group: its own)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return sums
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, sums)
    return {k: v for d in every for k, v in d.items()}


def _write_shared(staging: str, model_state, optimizer_state, sharded: bool, sums: dict) -> list[str]:
    """Rank 0: the full weights and optimizer files of an unsharded run (a sharded one wrote DCP)."""
    if sharded:
        return [DCP_DIR]
    _put(staging, MODEL_FILE, state_to_bytes(model_state), sums)
    _put(staging, "optimizer.pt", _torch_bytes(optimizer_state), sums)
    return [MODEL_FILE, "optimizer.pt"]


def prune(out_uri: str, keep_last: int) -> None:
    """Keep only the newest ``keep_last`` committed step folders (``final`` is never pruned)."""
    steps = committed_steps(out_uri)
    for _, uri in steps[: max(0, len(steps) - max(1, keep_last))]:
        storage.remove(uri, recursive=True)


def read_commit(ckpt_uri: str) -> dict:
    """The COMMIT record (older checkpoints wrote ``files``/``world_size`` only: format ``files``)."""
    if not is_committed(ckpt_uri):
        raise CheckpointError(f"{ckpt_uri}: not a committed checkpoint (no {COMMIT} marker)")
    commit = _read_json(storage.join(ckpt_uri, COMMIT))
    return {"format": FORMAT_FILES, **(commit if isinstance(commit, dict) else {})}


def checkpoint_format(ckpt_uri: str) -> str:
    return read_commit(ckpt_uri)["format"]


def load_checkpoint(ckpt_uri: str, rank: int | None, sharded_state: dict | None = None) -> dict[str, Any]:
    """Everything a rank needs to resume: model, optimizer, scheduler, its RNG/loader state.

    ``rank=None`` skips the per-rank file (resuming on another world size). A DCP checkpoint is
    read into ``sharded_state`` in place (the caller's ``{"model", "optim"}`` targets, any
    sharding: each rank reads what its shards need); "model"/"optimizer" are then None.
    """
    commit = read_commit(ckpt_uri)
    fmt, sums = commit["format"], _digests(commit)
    part = lambda name: (storage.join(ckpt_uri, name), sums.get(name))  # its uri, its digest
    if fmt == FORMAT_DCP:
        if sharded_state is None:
            raise CheckpointError(f"{ckpt_uri}: a sharded (DCP) checkpoint needs target state to load into")
        load_sharded(ckpt_uri, sharded_state)
        model, optim = None, None
    else:
        model = load_model_state(ckpt_uri, commit)
        optim = _torch_load(*part("optimizer.pt"))
    return {
        "format": fmt,
        "model": model,
        "optimizer": optim,
        "scheduler": _torch_load(*part("scheduler.pt")),
        "rank": None if rank is None else _torch_load(*part(rank_file(rank))),
        "trainer_state": _read_json(*part("trainer_state.json")),
        "config": _read_json(*part("config.json")),
    }


def read_config(ckpt_uri: str) -> dict:
    return _read_committed_json(ckpt_uri, "config.json")


def read_trainer_state(ckpt_uri: str) -> dict:
    return _read_committed_json(ckpt_uri, "trainer_state.json")


def _read_committed_json(ckpt_uri: str, name: str) -> Any:
    return _read_json(storage.join(ckpt_uri, name), _digests(read_commit(ckpt_uri)).get(name))


def checkpoint_hash(ckpt_uri: str) -> str:
    """The identity of a checkpoint in lineage: sha256 of its weights file.

    Taken from COMMIT (the digest written with the file), so nothing is read again; a checkpoint
    from before files had digests is hashed. A DCP checkpoint: sha256 over its shard files'
    digests (``.metadata`` left out: it holds a random save id, and lineage must be reproducible).
    """
    commit = read_commit(ckpt_uri)
    sums = _digests(commit)
    if commit["format"] == FORMAT_DCP:
        shards = {k: v for k, v in sums.items() if k.startswith(f"{DCP_DIR}/") and k.endswith(".distcp")}
        return storage.sha256_bytes(json.dumps(shards, sort_keys=True).encode())
    return sums.get(MODEL_FILE) or storage.sha256_uri(storage.join(ckpt_uri, MODEL_FILE))


# ---------------------------------------------------------------- sharded (DCP) state


def _dcp_uri(ckpt_uri: str) -> str:
    return storage.join(ckpt_uri, DCP_DIR)


def save_sharded(ckpt_uri: str, state: dict, rank: int) -> dict[str, str]:
    """dcp.save from every rank (a collective); {"dcp/<file>": sha256} of the files this rank wrote.

    Each rank hashes its own files (DCP writes them itself, so they are read back once, in
    parallel over the ranks); rank 0, DCP's coordinator, also hashes ``.metadata``.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

    uri = _dcp_uri(ckpt_uri)
    # fsync on S3 objects means os.sync() of the whole machine; an S3 PUT is durable when it returns.
    writer = FsspecWriter(uri, sync_files=storage.is_local(uri), **storage.fsspec_options(uri))
    meta = dcp.save(state, storage_writer=writer)
    mine = {i.relative_path for i in meta.storage_data.values() if i.relative_path.startswith(f"__{rank}_")}
    if rank == 0:
        mine.add(".metadata")
    return {f"{DCP_DIR}/{f}": storage.sha256_uri(storage.join(uri, f)) for f in sorted(mine)}


def verify_sharded(ckpt_uri: str, no_dist: bool = False) -> None:
    """Check a DCP checkpoint's files against COMMIT before any of them is used.

    Every byte is hashed once in all: file i (sorted) by rank i % world, the ranks in
    parallel, streamed (memory bounded). The verdicts are gathered, so every rank raises the
    same one line or none does (a collective unless `no_dist`; one process hashes them all).
    A checkpoint written before files had digests has nothing to check.
    """
    import torch.distributed as dist

    sums = {k: v for k, v in _digests(read_commit(ckpt_uri)).items() if k.startswith(f"{DCP_DIR}/")}
    collective = not no_dist and dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if collective else (0, 1)
    mine = (_verdict(storage.join(ckpt_uri, f), sums[f]) for f in sorted(sums)[rank::world])
    verdict = next((v for v in mine if v), None)  # this rank stops at its first bad file
    if collective and world > 1:
        every: list = [None] * world
        dist.all_gather_object(every, verdict)
        verdict = next((v for v in every if v), None)  # the lowest rank's: the same on every rank
    if verdict:
        uri, what, damaged = verdict
        if damaged:
            raise _damaged_file(uri, what, folder=ckpt_uri)
        raise storage.StorageError(f"{uri}: {what}")


def _verdict(uri: str, sha256: str) -> tuple[str, str, bool] | None:
    """None when the file is as committed; else (uri, what is wrong, whether that is damage)."""
    try:
        got = storage.sha256_uri(uri)
    except FileNotFoundError:
        return uri, "missing from a committed checkpoint", True
    except OSError as e:  # unreadable for another reason (permissions, network): not damage
        return uri, f"cannot be read ({_first_line(e)})", False
    return None if got == sha256 else (uri, CHANGED, True)


def load_sharded(ckpt_uri: str, state: dict, no_dist: bool = False) -> None:
    """Check the files (`verify_sharded`), then dcp.load into `state` in place (resharding as
    needed); a collective unless `no_dist`."""
    verify_sharded(ckpt_uri, no_dist)
    _dcp_load(ckpt_uri, state, no_dist)


def _dcp_load(ckpt_uri: str, state: dict, no_dist: bool) -> None:
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with (
            warnings.catch_warnings()
        ):  # "torch.distributed is disabled ...": a one-process load is the intent
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            reader = _SafeReader(_dcp_uri(ckpt_uri))
            dcp.load(state, storage_reader=reader, planner=_SafePlanner(), no_dist=no_dist)
    except CheckpointException as e:  # DCP gathers the ranks' failures: report the first one
        first = next(iter(e.failures.values()))[0] if e.failures else e
        if isinstance(first, CheckpointError):
            raise first from None
        raise _damaged(ckpt_uri, first) from None
    except CheckpointError:
        raise
    except (RuntimeError, KeyError, ValueError, OSError, EOFError, pickle.UnpicklingError) as e:
        raise _damaged(ckpt_uri, e) from None


def _damaged(ckpt_uri: str, e: BaseException) -> DamagedCheckpoint:
    return DamagedCheckpoint(
        f"{ckpt_uri}: sharded state cannot be loaded ({_first_line(e)}); "
        f"delete {ckpt_uri} and resume from the previous committed checkpoint"
    )


def consolidated_model_state(ckpt_uri: str) -> dict[str, torch.Tensor]:
    """The full model state dict of a DCP checkpoint, in this process (evaluation, export, Stage-2 init).

    Reads every model shard, whatever the number of ranks that wrote them; no process group needed.
    """
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    verify_sharded(ckpt_uri, no_dist=True)  # before .metadata is read: it decides the targets
    meta = _SafeReader(_dcp_uri(ckpt_uri)).read_metadata()
    target = {
        k: torch.empty(tuple(m.size), dtype=m.properties.dtype)
        for k, m in meta.state_dict_metadata.items()
        if k.startswith("model.") and isinstance(m, TensorStorageMetadata)
    }
    if not target:
        raise CheckpointError(f"{ckpt_uri}: the sharded checkpoint holds no model weights")
    _dcp_load(ckpt_uri, {"model": {k[len("model.") :]: v for k, v in target.items()}}, no_dist=True)
    return {k[len("model.") :]: v for k, v in target.items()}


def _first_line(e: BaseException) -> str:
    msg = (str(e).strip().splitlines() or [""])[0][:300]
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


# DCP's .metadata is a pickle of these classes only; anything else is refused, never imported.
_DCP_METADATA_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", n)
    for n in (
        "Metadata",
        "MetadataIndex",
        "StorageMeta",
        "TensorProperties",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),
    ("torch", "Size"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        is_dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if (module, name) not in _DCP_METADATA_GLOBALS and not is_dtype:
            raise CheckpointError(f"DCP metadata refers to {module}.{name}, which is not DCP metadata")
        return super().find_class(module, name)


def _reader_base():
    # torch 2.13 keeps DCP's fsspec storage in this module (its own HF storage imports it from here).
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

    return FsspecReader


class _SafeReader(_reader_base()):
    """FsspecReader whose metadata is unpickled with the allowlist above (and our S3 options)."""

    def __init__(self, uri: str):
        super().__init__(uri, **storage.fsspec_options(uri))
        self.uri = uri

    def read_metadata(self, *args, **kwargs):
        from torch.distributed.checkpoint.metadata import StorageMeta

        path = self.fs.concat_path(self.path, ".metadata")
        try:
            with self.fs.create_stream(path, "rb") as f:
                meta = _MetadataUnpickler(f).load()
        except FileNotFoundError:
            raise DamagedCheckpoint(f"{self.uri}: no .metadata (not a DCP checkpoint)") from None
        except (pickle.UnpicklingError, EOFError, AttributeError) as e:
            raise DamagedCheckpoint(f"{self.uri}/.metadata: cannot be read ({_first_line(e)})") from None
        if getattr(meta, "storage_meta", None) is None:
            meta.storage_meta = StorageMeta()
        meta.storage_meta.load_id = self.load_id
        return meta


def _planner_base():
    from torch.distributed.checkpoint import DefaultLoadPlanner

    return DefaultLoadPlanner


class _SafePlanner(_planner_base()):
    """DefaultLoadPlanner that loads non-tensor values (optimizer hyperparameters) weights_only."""

    def load_bytes(self, read_item, value) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._traverse import set_element

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


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


def _normalised(preset: dict, ckpt_uri: str) -> dict:
    """A saved preset through the config tree: fields added since it was written take their defaults."""
    from .config import ConfigError, Preset

    try:
        return Preset.from_dict(preset).to_dict()
    except ConfigError as e:
        raise CheckpointMismatch(f"checkpoint {ckpt_uri}: its saved preset no longer loads ({e})") from None


def check_compatible(saved: dict, current: dict, ckpt_uri: str, allow_mismatch: bool = False) -> list[str]:
    """Compare two checkpoint configs; raise CheckpointMismatch naming the first difference.

    Returns the list of differences (empty when identical); with ``allow_mismatch`` they
    are returned instead of raised, so the caller can log them.
    """
    diffs = []
    for field in ("stage", "world_size", "manifest_hash", "source"):
        if saved.get(field) != current.get(field):
            diffs.append(f"{field}: {saved.get(field)!r} in the checkpoint, {current.get(field)!r} now")
    a = _flatten(
        run_identity(_normalised(saved["preset"], ckpt_uri), saved["stage"]) if "preset" in saved else {}
    )
    b = _flatten(run_identity(_normalised(current["preset"], ckpt_uri), current["stage"]))
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
