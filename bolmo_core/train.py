"""The Stage 1 / Stage 2 trainer (docs/architecture.md §8-§9): one code path from one CPU process to many GPUs.

Run it as ``python -m bolmo_core.train --config FILE`` (one process), under ``torchrun`` or
under ``accelerate launch -m bolmo_core.train --config FILE`` (several processes, DDP;
FSDP through an accelerate config, see docs/training.md). The config file is JSON
(`TrainConfig`): the resolved preset, the stage, the data manifest, the output folder,
the Stage-1 checkpoint for Stage 2, and run switches.

What one optimizer step does: ``accum = global_batch / (micro_batch x world_size)``
micro-batches per rank, each loss divided by ``accum`` (DDP averages over ranks), so the
gradient is the mean of the micro-batch losses over the global batch whatever the world
size; clip to 0.5; AdamW; linear warm-up over 10 % of the steps, then linear decay to 0.

Restarts: the output folder is the stage's identity. Starting again resumes from the
newest committed checkpoint there (model, optimizer, scheduler, every rank's RNG and
loader position), bit-exact on a CPU in deterministic mode; a folder holding ``final`` is
a finished stage and is skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import sys
import time
from typing import Any

import numpy as np
import torch

from . import checkpoint as ckpt
from . import fsdp, storage
from .callbacks import (
    Callback,
    CallbackList,
    PeriodicCheckpoint,
    PeriodicValidation,
    ProgressStreamCallback,
    TimeBudget,
    load_callback,
)
from .coarsen import coarsen_batch
from .config import ConfigError, StageConfig, TrainConfig
from .evaluate import EvalError, Validator
from .load import load_weights
from .loader import WindowLoader

__all__ = ["Trainer", "TrainConfig", "TrainError", "train", "main"]


class TrainError(ValueError):
    """A training run that cannot start, with a one-line reason."""


class SaidOnRankZero(TrainError):
    """The same refusal on a rank other than 0: rank 0 prints the line, this rank only exits."""


# ---------------------------------------------------------------- schedule, optimizer, determinism


def lr_factor(step: int, total: int, warmup_fraction: float) -> float:
    """Linear warm-up over ``warmup_fraction`` of the steps, then linear decay to 0 at ``total``."""
    warm = max(1, int(round(warmup_fraction * total)))
    if step < warm:
        return (step + 1) / warm
    return max(0.0, (total - step) / max(1, total - warm))


def build_optimizer(model, stage_cfg: StageConfig):
    """AdamW over the model's parameter groups (per-group lr/weight decay; docs/architecture.md §8.6, §9.2)."""
    o = stage_cfg.optim
    groups = [g for g in model.param_groups(stage_cfg) if any(p.requires_grad for p in g["params"])]
    if not groups:
        raise TrainError(f"stage {stage_cfg.stage}: the model has no trainable parameters")
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)


def build_scheduler(optimizer, stage_cfg: StageConfig):
    total, warm = stage_cfg.steps, stage_cfg.optim.warmup_fraction
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, warm))


def set_determinism(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


# ---------------------------------------------------------------- model


class StageObjective(torch.nn.Module):
    """The stage's loss as a module forward, so DDP/FSDP see every call (they hook forward())."""

    def __init__(self, model, stage: int, losses):
        super().__init__()
        self.model = model
        self.stage = stage
        self.losses = losses

    def forward(self, batch: dict):
        fn = self.model.stage1_loss if self.stage == 1 else self.model.stage2_loss
        return fn(batch, self.losses)


def build_model(cfg: TrainConfig, vocab):
    """Stage 1: from the source (initialised per docs/architecture.md §2.3). Stage 2: the Stage-1 weights on top."""
    from .model import BolmoModel

    from_stage1 = cfg.stage == 2 and bool(cfg.init_from)
    model = BolmoModel.from_source(cfg.preset.model, init=not from_stage1, vocab=vocab)
    info: dict[str, Any] = {}
    if from_stage1:
        src = ckpt.resolve_checkpoint(cfg.init_from)
        # A Stage-1 checkpoint holds the whole model (teacher included); nothing may be missing.
        skipped = load_weights(model, ckpt.load_model_state(src), f"init_from {src}", may_add=True)
        info = {"init_from": src, "init_from_hash": ckpt.checkpoint_hash(src), "ignored_keys": skipped}
    if cfg.stage_cfg.lora is not None:  # after the Stage-1 weights: the adapters wrap them (lora.py)
        from .lora import LoraError, add_adapters

        try:
            info["lora_params"] = add_adapters(model, cfg.stage_cfg.lora)
        except LoraError as e:
            raise TrainError(str(e)) from None
    return model, info


def check_lora_sharding(stage_cfg, sharded: bool) -> None:
    """LoRA adapters are added to a whole model (build_model); the FSDP2 path builds a meta-device
    skeleton without them, so LoRA there would silently train every weight: refuse it."""
    if sharded and stage_cfg.lora is not None:
        raise TrainError(
            f"stage{stage_cfg.stage}.lora: not supported with FSDP sharding yet; "
            "train it with sharding ddp (one whole model per rank) or without lora"
        )


def skeleton_model(cfg: TrainConfig, vocab):
    """The stage's model with its parameters on the meta device (shapes only) and real buffers."""
    from transformers import AutoModelForCausalLM

    from .global_model import source_config
    from .model import BolmoModel
    from .source import ATTN_IMPLEMENTATION

    with fsdp.meta_parameters():
        lm = AutoModelForCausalLM.from_config(
            source_config(cfg.preset.model.source), attn_implementation=ATTN_IMPLEMENTATION
        )
        return BolmoModel.from_source(cfg.preset.model, source_model=lm, init=False, vocab=vocab)


def init_sharded_weights(trainer: Trainer, load: bool) -> dict:
    """Fill a sharded model's shards with its starting weights (`load`); the init info either way.

    Stage 2 from a DCP Stage-1 checkpoint: each rank reads its own shards (resharded as needed).
    Otherwise rank 0 builds the whole model (source + docs/architecture.md §2.3 initialisation, or a Stage-1
    ``model.safetensors``) and the shards are broadcast from it, one tensor at a time.
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    cfg, model = trainer.cfg, trainer.model
    if cfg.stage == 2 and cfg.init_from:
        src = ckpt.resolve_checkpoint(cfg.init_from)
        info = {"init_from": src, "init_from_hash": ckpt.checkpoint_hash(src), "ignored_keys": 0}
        if ckpt.checkpoint_format(src) == ckpt.FORMAT_DCP:
            if load:
                state = {"model": get_model_state_dict(model)}
                ckpt.load_sharded(src, state)
                set_model_state_dict(model, state["model"])
            return info
    else:
        info = {}
    if load:
        full = None
        if trainer.rank == 0:
            full_model, info = build_model(cfg, trainer.vocab)
            full = full_model.state_dict()
        fsdp.load_full_state(model, full)
    return info


def _batch_to(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _scalar(v) -> float:
    return float(v.detach().float().item()) if torch.is_tensor(v) else float(v)


# ---------------------------------------------------------------- distributed state


def _full_states(accelerator, objective, optimizer) -> tuple[dict | None, dict | None]:
    """(model state, optimizer state) of an unsharded run on rank 0 (None elsewhere)."""
    if accelerator.process_index != 0:
        return None, None
    return accelerator.unwrap_model(objective).model.state_dict(), optimizer.state_dict()


def _load_full_states(accelerator, objective, optimizer, model_state: dict, optim_state: dict) -> None:
    accelerator.unwrap_model(objective).model.load_state_dict(model_state)
    optimizer.load_state_dict(optim_state)


def sharded_state(model, optimizer) -> dict:
    """{"model", "optim"} state dicts keyed by parameter name (DTensors under FSDP), for DCP."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optimizer)
    return {"model": msd, "optim": osd}


def load_sharded_state(model, optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import set_state_dict

    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def _reduce_mean(accelerator, values: dict[str, float]) -> dict[str, float]:
    """Mean over ranks of scalar metrics (every rank has the same keys)."""
    if accelerator.num_processes == 1 or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=accelerator.device)
    t = accelerator.reduce(t, reduction="mean")
    return dict(zip(keys, t.tolist()))


def build_callbacks(trainer: Trainer) -> CallbackList:
    """Every rank: validation, checkpoints and time budgets (they take part in collectives).
    Rank 0 only, before them: every named callback, then the progress stream."""
    cfg, stage_cfg = trainer.cfg, trainer.stage_cfg
    cbs: list[Callback] = []
    if trainer.rank == 0:
        for spec in list(cfg.callbacks) + [s for s in stage_cfg.callbacks if s not in cfg.callbacks]:
            try:
                cbs.append(load_callback(spec, **cfg.callback_kwargs.get(spec, {})))
            except ValueError as e:
                raise TrainError(str(e)) from None
        # After the named ones: a callback may add to a step's metrics (MemoryProbe), the stream carries them.
        cbs.append(ProgressStreamCallback())
    cbs.append(PeriodicValidation(trainer, stage_cfg.eval_every))
    cbs.append(PeriodicCheckpoint(trainer, stage_cfg.checkpoint_every))
    if cfg.max_minutes or cfg.max_cpu_minutes:
        cbs.append(TimeBudget(trainer, cfg.max_minutes, cfg.max_cpu_minutes))
    return CallbackList(cbs)


def run_identity(cfg: TrainConfig, world_size: int) -> dict:
    """What a checkpoint of this run records and a resume must match (checkpoint.check_compatible)."""
    from .data import read_manifest
    from .source import source_identity

    return {
        "preset": cfg.preset.to_dict(),
        "stage": cfg.stage,
        "world_size": world_size,
        "manifest_uri": cfg.manifest_uri,
        "manifest_hash": read_manifest(cfg.manifest_uri)["manifest_hash"],
        "source": source_identity(cfg.preset.model.source),
        "init_from": cfg.init_from,
    }


def accumulation_steps(stage_cfg: StageConfig, world_size: int) -> int:
    """Micro-batches per rank and step; the global batch must split evenly over the ranks."""
    per_step = stage_cfg.micro_batch * world_size
    if stage_cfg.global_batch % per_step:
        raise TrainError(
            f"stage{stage_cfg.stage}.global_batch {stage_cfg.global_batch} is not a multiple of "
            f"micro_batch {stage_cfg.micro_batch} x world size {world_size}"
        )
    return stage_cfg.global_batch // per_step


def build_accelerator(cfg: TrainConfig):
    """accelerate for the process group, device and collectives; never for FSDP (fsdp.py drives it).

    Under an FSDP launch config, accelerate would wrap the model with its own FSDP on a GPU and
    silently fall back to DDP on a CPU: its FSDP switch is turned off while it is built, so the
    trainer's FSDP2 is the one path on both.
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    saved = os.environ.get(fsdp.LAUNCHER_FSDP)
    os.environ[fsdp.LAUNCHER_FSDP] = "false"
    try:
        return Accelerator(
            cpu=not torch.cuda.is_available(),
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=cfg.ddp_find_unused)],
        )
    finally:
        if saved is None:
            os.environ.pop(fsdp.LAUNCHER_FSDP, None)
        else:
            os.environ[fsdp.LAUNCHER_FSDP] = saved


# ---------------------------------------------------------------- the trainer


class Trainer:
    """One stage (docs/training.md): `fit()` resumes or starts, steps to the end, validates, saves `final`.

    `train_step()` is one optimizer step, `evaluate()` the validation, `save()` one checkpoint,
    `resume()` loads the newest committed one. What is optional is a callback (`build_callbacks`):
    periodic validation and checkpoints and the time budgets on every rank, progress and
    tracking on rank 0.
    """

    def __init__(self, cfg: TrainConfig, accelerator=None):
        self.cfg, self.preset, self.stage_cfg = cfg, cfg.preset, cfg.stage_cfg
        self.accelerator = accelerator or build_accelerator(cfg)
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        self.sharded = fsdp.resolve_sharding(cfg.sharding, self.world) == "fsdp"
        check_lora_sharding(self.stage_cfg, self.sharded)
        self.out = cfg.out_uri
        self.step = 0  # optimizer steps done
        self.stop_reason: str | None = None  # set by a callback (a time budget) to end the stage early
        self.last_eval: dict[str, float] = {}
        self.spent_before = {"elapsed_s": 0.0, "cpu_s": 0.0}  # budget used by earlier runs of this stage
        self.callbacks = build_callbacks(self)

    # ------------------------------------------------------------ the stage

    def fit(self) -> dict:
        """Run (or resume, or skip) the stage holding its folder's lock; a summary with the final checkpoint URI."""
        self.lock = None
        try:
            # Checks that read only (the global batch split, the data manifest) come before the lock.
            self.accum = accumulation_steps(self.stage_cfg, self.world)
            self.identity = run_identity(self.cfg, self.world)
            self.lock = self.take_lock()
            return self._fit()
        except BaseException as e:  # tell the callbacks (MLflow run -> FAILED), then fail loudly
            self.callbacks.on_error(self.step, e)
            raise
        finally:
            if self.lock is not None:
                self.lock.release()

    def take_lock(self) -> storage.FolderLock | None:
        """Rank 0 locks the output folder before anything there is read or written (a collective).

        A second trainer on the same folder would resume from the first one's half-written step
        or overwrite its ``final``: it is refused with one line naming the folder and the holder.
        The other ranks learn the outcome from rank 0, so either every rank goes on or none does.
        """
        lock, err = None, None
        if self.rank == 0:
            try:
                lock = storage.lock_folder(self.out, f"stage {self.cfg.stage} training")
            except storage.StorageError as e:
                err = e
        if self.world > 1:
            import torch.distributed as dist

            msg = [str(err) if err else None]
            dist.broadcast_object_list(msg, src=0)
            if msg[0] and err is None:
                raise SaidOnRankZero(msg[0])
        if err is not None:
            raise err
        return lock

    def _fit(self) -> dict:
        if self.rank == 0:
            ckpt.clean_uncommitted(self.out)
        self.accelerator.wait_for_everyone()
        fin = ckpt.final_checkpoint(self.out)
        if fin:
            return self._skip(fin)
        self.setup()
        resumed = self.resume()
        self.callbacks.on_train_start(self.step, self.stage_cfg.steps, self.info(resumed))
        self._t0, self._c0 = time.time(), time.process_time()
        self._batches = iter(self.loader)
        while self.step < self.stage_cfg.steps:
            self.callbacks.on_step_start(self.step)
            if self.stop_reason:
                break
            metrics = self.train_step()
            self.callbacks.on_step_end(self.step, metrics)
        self.last_eval = self.evaluate()
        final = self.save(ckpt.FINAL, finished=True, metrics=self.last_eval)
        self.callbacks.on_train_end(self.step, self.last_eval)
        reason = self.stop_reason or "steps"
        return {
            "final": final,
            "skipped": False,
            "step": self.step,
            "reason": reason,
            "metrics": self.last_eval,
        }

    def _skip(self, fin: str) -> dict:
        """A finished stage: check it is this stage, report it, do nothing else."""
        ckpt.check_compatible(ckpt.read_config(fin), self.identity, fin, self.cfg.allow_mismatch)
        state = ckpt.read_trainer_state(fin)
        self.callbacks.on_train_start(
            state.get("step", 0), self.stage_cfg.steps, {"skipped": True, "final": fin}
        )
        self.callbacks.on_train_end(state.get("step", 0), state.get("metrics", {}))
        return {"final": fin, "skipped": True, **state}

    def setup(self) -> None:
        """Model, loader, optimizer, scheduler, validator; the order fixes every random draw."""
        from .source import load_tokenizer
        from .subword import SubwordVocab

        cfg, stage_cfg, acc = self.cfg, self.stage_cfg, self.accelerator
        set_determinism(stage_cfg.seed, cfg.deterministic)  # same seed on every rank: identical init
        self.vocab = SubwordVocab.from_tokenizer(load_tokenizer(self.preset.model.source))
        if self.sharded:
            self._setup_sharded_model()
        else:
            self.model, self.init_info = build_model(cfg, self.vocab)
            self.model.configure_stage(stage_cfg)  # requires_grad per stage, before DDP registers its hooks
            if stage_cfg.activation_checkpointing:
                fsdp.apply_activation_checkpointing(self.model)
            self.model.to(acc.device)
        self.loader = WindowLoader.from_config(
            self.preset.data,
            cfg.manifest_uri,
            self.vocab,
            stage_cfg.micro_batch,
            seed=stage_cfg.seed,
            rank=self.rank,
            world_size=self.world,
        )
        if not self.sharded:
            self.objective = acc.prepare_model(StageObjective(self.model, cfg.stage, stage_cfg.losses))
        self.optimizer = build_optimizer(self.model, stage_cfg)
        self.scheduler = build_scheduler(self.optimizer, stage_cfg)
        # Every rank scores its share of the validation windows; the counts are summed over ranks.
        self.validator = Validator(
            self.preset,
            cfg.stage,
            cfg.manifest_uri,
            self.vocab,
            acc.device,
            self.rank,
            self.world,
            self.sum_over_ranks,
        )
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.autocast = _autocast(stage_cfg.precision, acc.device)
        # Per-rank randomness from here on (the model itself is already identical everywhere).
        set_determinism(stage_cfg.seed + 1 + self.rank, cfg.deterministic)

    def _setup_sharded_model(self) -> None:
        """FSDP2: a meta-device model, sharded, materialised, then its starting weights (fsdp.py).

        A stage that will resume skips the starting weights: the checkpoint replaces them all.
        """
        cfg, stage_cfg = self.cfg, self.stage_cfg
        self.model = skeleton_model(cfg, self.vocab)
        self.model.configure_stage(stage_cfg)
        if stage_cfg.activation_checkpointing:
            fsdp.apply_activation_checkpointing(self.model)
        self.objective = StageObjective(self.model, cfg.stage, stage_cfg.losses)
        mesh = fsdp.device_mesh(self.accelerator.device, self.world)
        fsdp.shard(self.objective, self.model, mesh, stage_cfg.precision)
        fsdp.materialize(self.objective, self.accelerator.device)
        resuming = ckpt.latest_checkpoint(self.out) is not None
        self.init_info = init_sharded_weights(self, load=not resuming)

    def info(self, resumed: str | None) -> dict:
        return {
            "stage": self.cfg.stage,
            "world_size": self.world,
            "accum": self.accum,
            "resumed_from": resumed,
            "mismatches_allowed": self._diffs if resumed else [],
            "out_uri": self.out,
            "n_params": sum(p.numel() for p in self.model.parameters()),
            "n_trainable": sum(p.numel() for p in self.params),
            **self.init_info,
        }

    # ------------------------------------------------------------ one step

    def train_step(self) -> dict[str, float]:
        """One optimizer step over `accum` micro-batches per rank; the metrics, averaged over ranks."""
        acc, stage_cfg = self.accelerator, self.stage_cfg
        t0 = time.time()
        self.objective.train()
        sums: dict[str, float] = {}
        n_bytes = 0
        for micro in range(self.accum):
            batch = next(self._batches)
            if self.cfg.stage == 2:
                batch = coarsen_batch(batch, stage_cfg.target_bytes_per_patch)
            n_bytes += int(batch["byte_mask"].sum())
            batch = _batch_to(batch, acc.device)
            # DDP reduces gradients on the last micro-batch only; FSDP reduce-scatters every one (its
            # gradients stay sharded: unsynced ones would be whole-model sized).
            last = micro == self.accum - 1
            sync = contextlib.nullcontext() if last or self.sharded else acc.no_sync(self.objective)
            with sync:
                with self.autocast():
                    loss, metrics = self.objective(batch)
                acc.backward(loss / self.accum)
            for k, v in {"loss": loss, **metrics}.items():
                sums[k] = sums.get(k, 0.0) + _scalar(v) / self.accum
        if self.sharded:
            grad_norm = fsdp.clip_grad_norm(self.params, stage_cfg.optim.grad_clip)
        else:
            grad_norm = acc.clip_grad_norm_(self.params, stage_cfg.optim.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        dt = time.time() - t0
        sums["grad_norm"] = _scalar(grad_norm)
        metrics = _reduce_mean(acc, sums)
        metrics["bytes_per_s"] = n_bytes * self.world / dt
        metrics["step_time_s"] = dt
        for i, g in enumerate(self.optimizer.param_groups):
            metrics[f"lr/{g.get('name', i)}"] = g["lr"]
        return metrics

    # ------------------------------------------------------------ validation, checkpoints

    def evaluate(self) -> dict[str, float]:
        """Validation on every rank (a collective) with the RNG forked: it never changes the training stream."""
        with torch.random.fork_rng(devices=[]), fsdp.gathered(self.objective, self.sharded):
            metrics = self.validator(self.model)
        self.callbacks.on_eval(self.step, metrics)
        self.last_eval = metrics
        return metrics

    def sum_over_ranks(self, values: list[float]) -> list[float]:
        """Element-wise sums over ranks (a collective); float64 so byte counts stay exact."""
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.accelerator.device)
        return self.accelerator.reduce(t, reduction="sum").tolist()

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when it is True on one (a collective: call it on every rank)."""
        if self.world == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.accelerator.device)
        return bool(self.accelerator.reduce(t, reduction="sum").item() > 0)

    def spent(self) -> dict[str, float]:
        """Wall-clock and rank-0 CPU seconds used by this stage so far, all restarts together."""
        return {
            "elapsed_s": self.spent_before["elapsed_s"] + time.time() - self._t0,
            "cpu_s": self.spent_before["cpu_s"] + time.process_time() - self._c0,
        }

    def save(self, name: str, finished: bool = False, metrics: dict | None = None) -> str:
        """Checkpoint `name` from every rank (collective); its URI."""
        if self.any_rank(self.lock is not None and self.lock.lost):  # frozen past the lease: not ours now
            lost = SaidOnRankZero if self.rank else TrainError  # every rank stops; one line says why
            raise lost(f"{self.out}: another process took over this folder's lock; {name} not written")
        if self.sharded:  # every rank writes its own shards through DCP
            msd, osd, shards = None, None, sharded_state(self.model, self.optimizer)
        else:
            msd, osd = _full_states(self.accelerator, self.objective, self.optimizer)
            shards = None
        trainer_state = {
            "step": self.step,
            **self.spent(),
            "finished": finished,
            "reason": (self.stop_reason or "steps") if finished else None,
            "metrics": metrics or {},
            "samples": self.step * self.stage_cfg.global_batch,
        }
        uri = ckpt.save_checkpoint(
            self.out,
            name,
            rank=self.rank,
            world_size=self.world,
            barrier=self.accelerator.wait_for_everyone,
            rank_state={"rng": ckpt.capture_rng(), "loader": self.loader.state_dict()},
            model_state=msd,
            optimizer_state=osd,
            sharded_state=shards,
            scheduler_state=self.scheduler.state_dict() if self.rank == 0 else None,
            trainer_state=trainer_state,
            config=self.identity,
            keep_last=self.stage_cfg.keep_last,
        )
        self.callbacks.on_checkpoint(self.step, uri)
        return uri

    def resume(self) -> str | None:
        """Load the newest intact committed checkpoint of this stage, if any; its URI.

        A damaged newest checkpoint (truncated weights, a missing file) is skipped with one
        warning line naming it, and the one before it is used; it stays where it is (nothing
        is deleted) and the next save of that step replaces it. Any checkpoint format into any
        layout: DCP reshards, a full checkpoint loads as is. At another world size
        (allow_mismatch) the loader continues at the same global position (`_regrid_loader`);
        the per-rank RNG is not carried over.
        """
        self._diffs: list[str] = []
        candidates = [uri for _, uri in reversed(ckpt.committed_steps(self.out))]
        for uri in candidates:
            err = None
            try:
                st, same_layout, same_data, target = self._read_checkpoint(uri)
            except ckpt.DamagedCheckpoint as e:
                err = e
            if self.any_rank(err is not None):  # a collective: every rank skips it, or none does
                if self.rank == 0:
                    why = str(err) if err else "damaged on another rank"
                    print(f"bolmo_core.train: warning: skipping checkpoint {uri}: {why}", file=sys.stderr)
                continue
            self._load_weights_and_optimizer(uri, st, target)
            self.scheduler.load_state_dict(st["scheduler"])
            if same_layout:
                ckpt.restore_rng(st["rank"]["rng"])
                self.loader.load_state_dict(st["rank"]["loader"])
            elif same_data:
                self.loader.load_state_dict(
                    _regrid_loader(st["rank"]["loader"], self.world, self.loader.kind)
                )
            ts = st["trainer_state"]
            self.step = int(ts["step"])
            self.spent_before = {
                "elapsed_s": float(ts.get("elapsed_s", 0.0)),
                "cpu_s": float(ts.get("cpu_s", 0.0)),
            }
            return uri
        if candidates:
            raise TrainError(
                f"{self.out}: every committed checkpoint is damaged (newest {candidates[0]}); "
                "delete them to start the stage over"
            )
        return None

    def _read_checkpoint(self, uri: str) -> tuple[dict, bool, bool, dict | None]:
        """Everything this rank needs from checkpoint `uri`, read before anything is changed.

        A DCP checkpoint is read into the model's own (sharded) state: a damaged one leaves
        it half-loaded, which the next candidate overwrites completely.
        """
        saved = ckpt.read_config(uri)
        self._diffs = ckpt.check_compatible(saved, self.identity, uri, self.cfg.allow_mismatch)
        same_data = saved.get("manifest_hash") == self.identity["manifest_hash"]
        same_layout = saved.get("world_size") == self.world and same_data
        fmt = ckpt.checkpoint_format(uri)
        target = sharded_state(self.model, self.optimizer) if fmt == ckpt.FORMAT_DCP else None
        st = ckpt.load_checkpoint(uri, self.rank if same_layout else 0 if same_data else None, target)
        return st, same_layout, same_data, target

    def _load_weights_and_optimizer(self, uri: str, st: dict, target: dict | None) -> None:
        if target is not None:
            load_sharded_state(self.model, self.optimizer, target)
        elif self.sharded:  # optimizer.pt is keyed by parameter index, the sharded optimizer by name
            raise ckpt.CheckpointError(
                f"{uri}: written by an unsharded (DDP or single-process) run; a sharded run cannot "
                "resume its optimizer state: resume it with sharding=ddp, or start a new output folder"
            )
        else:
            _load_full_states(self.accelerator, self.objective, self.optimizer, st["model"], st["optimizer"])


def _regrid_loader(state: dict, world: int, kind: str) -> dict:
    """A loader position saved at another world size, for `world` ranks of a `kind` loader.

    At a step boundary every rank has taken the same number of micro-batches, so the global
    count is batch x saved world; it divides by any world size the global batch allows. The
    in-memory loader deals global micro-batch k to rank k mod world: the same windows follow.
    The streaming loader deals shards to ranks, so another world size reads other windows:
    the same number of windows into the same epoch, not the same windows.
    """
    global_batches = int(state["batch"]) * int(state["world_size"])
    return {**state, "batch": global_batches // world, "world_size": world, "rank": None, "loader": kind}


def _autocast(precision: str, device):
    if precision == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def train(cfg: TrainConfig) -> dict:
    """Run (or resume, or skip) one stage; returns a summary with the final checkpoint URI."""
    return Trainer(cfg).fit()


# ---------------------------------------------------------------- command line


def config_from_args(args) -> TrainConfig:
    """A checked TrainConfig from ``--config FILE`` or ``--preset/--stage/--manifest/--out [--set k=v ...]``."""
    if args.config:
        try:
            d = storage.read_json(args.config)
        except storage.StorageError as e:
            raise TrainError(f"train config {e}") from None
        if not isinstance(d, dict):
            raise TrainError(f"train config {args.config}: expected a JSON object")
    else:
        missing = [f"--{n}" for n in ("preset", "stage", "manifest", "out") if getattr(args, n) is None]
        if missing:
            raise TrainError(
                f"give --config FILE, or all of --preset --stage --manifest --out (missing {missing[0]})"
            )
        from .config import get_preset

        d = {
            "preset": get_preset(args.preset, args.set or None).to_dict(),
            "stage": args.stage,
            "manifest_uri": args.manifest,
            "out_uri": args.out,
            "init_from": args.init_from,
            "deterministic": args.deterministic,
        }
    if args.allow_mismatch:
        d["allow_mismatch"] = True
    for name in ("max_minutes", "max_cpu_minutes"):
        if getattr(args, name) is not None:
            d[name] = getattr(args, name)
    where = f" {args.config}" if args.config else ""
    try:
        return TrainConfig.from_dict(d)
    except ConfigError as e:
        raise TrainError(f"train config{where}: {e}") from None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bolmo_core.train", description=__doc__.splitlines()[0])
    ap.add_argument("--config", help="JSON TrainConfig (local path or URI)")
    ap.add_argument(
        "--preset", help="instead of --config: preset name (tiny, smollm2-135m, olmo2-1b, olmo3-7b)"
    )
    ap.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="preset override, e.g. stage1.steps=50"
    )
    ap.add_argument("--stage", type=int, choices=(1, 2))
    ap.add_argument("--manifest", help="data manifest URI")
    ap.add_argument("--out", help="the stage's output folder (local or s3://)")
    ap.add_argument("--init-from", default=None, help="Stage 2: the Stage-1 checkpoint or output folder")
    ap.add_argument("--deterministic", action="store_true")
    ap.add_argument("--allow-mismatch", action="store_true", help="resume from a checkpoint made differently")
    ap.add_argument(
        "--max-minutes", type=float, default=None, help="training-time budget (all restarts together)"
    )
    ap.add_argument(
        "--max-cpu-minutes",
        type=float,
        default=None,
        help="CPU-time budget of rank 0 (all restarts together)",
    )
    args = ap.parse_args(argv)
    from .data import DataError
    from .load import LoadError
    from .source import SourceError, quiet_progress_bars

    quiet_progress_bars()

    try:
        summary = train(config_from_args(args))
    except (
        TrainError,
        ConfigError,
        EvalError,
        ckpt.CheckpointError,
        DataError,
        LoadError,  # Stage 2's init_from: weights of another model shape
        SourceError,
        storage.StorageError,
    ) as e:
        if not isinstance(e, SaidOnRankZero):
            print(f"bolmo_core.train: error: {e}", file=sys.stderr, flush=True)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"summary": summary}, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
