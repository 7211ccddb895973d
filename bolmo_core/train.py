"""The Stage 1 / Stage 2 trainer (spec §8-9): one code path from one CPU process to many GPUs.

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
import dataclasses
import json
import os
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from . import checkpoint as ckpt
from . import storage
from .callbacks import Callback, CallbackList, ProgressStreamCallback, load_callback
from .coarsen import coarsen_batch
from .config import Preset, StageConfig
from .evaluate import EvalError, Validator
from .loader import WindowLoader


class TrainError(ValueError):
    """A training run that cannot start, with a one-line reason."""


@dataclass
class TrainConfig:
    """One stage run (the JSON given to ``--config``)."""

    preset: dict  # Preset.to_dict() of the resolved preset (overrides already applied)
    stage: int  # 1 or 2
    manifest_uri: str  # data manifest (bolmo_core.data.prepare_dataset)
    out_uri: str  # this stage's output folder: checkpoints step-*/ and final/
    init_from: str | None = (
        None  # Stage 2: Stage-1 checkpoint (or its folder); None = "Stage 2 without Stage 1"
    )
    allow_mismatch: bool = False  # resume from a checkpoint made with another config/data/world size
    deterministic: bool = False  # torch.use_deterministic_algorithms + fixed seeds (bit-exact resume on CPU)
    max_minutes: float | None = None  # training-time budget (all restarts together); then stop as finished
    callbacks: list[str] = field(default_factory=list)  # extra "module:Class" callbacks on rank 0
    callback_kwargs: dict[str, dict] = field(default_factory=dict)  # constructor kwargs per callback spec
    ddp_find_unused: bool = False

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise TrainError(f"train config: unknown field '{unknown[0]}'")
        missing = [n for n in ("preset", "stage", "manifest_uri", "out_uri") if n not in d]
        if missing:
            raise TrainError(f"train config: missing field '{missing[0]}'")
        cfg = cls(**d)
        if cfg.stage not in (1, 2):
            raise TrainError(f"train config: stage must be 1 or 2, got {cfg.stage!r}")
        return cfg

    @classmethod
    def load(cls, uri: str) -> TrainConfig:
        try:
            return cls.from_dict(storage.read_json(uri))
        except storage.StorageError as e:
            raise TrainError(f"train config {e}") from None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- schedule, optimizer, determinism


def lr_factor(step: int, total: int, warmup_fraction: float) -> float:
    """Linear warm-up over ``warmup_fraction`` of the steps, then linear decay to 0 at ``total``."""
    warm = max(1, int(round(warmup_fraction * total)))
    if step < warm:
        return (step + 1) / warm
    return max(0.0, (total - step) / max(1, total - warm))


def build_optimizer(model, stage_cfg: StageConfig):
    """AdamW over the model's parameter groups (per-group lr/weight decay; spec §8.6, §9.2)."""
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


def build_model(cfg: TrainConfig, preset: Preset, vocab):
    """Stage 1: from the source (initialised per spec §2.3). Stage 2: the Stage-1 weights on top."""
    from .model import BolmoModel

    from_stage1 = cfg.stage == 2 and bool(cfg.init_from)
    model = BolmoModel.from_source(preset.model, init=not from_stage1, vocab=vocab)
    info: dict[str, Any] = {}
    if from_stage1:
        src = ckpt.resolve_checkpoint(cfg.init_from)
        state = ckpt.load_model_state(src)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing:
            raise TrainError(f"init_from {src}: {len(missing)} model weights missing (e.g. '{missing[0]}')")
        info = {
            "init_from": src,
            "init_from_hash": ckpt.checkpoint_hash(src),
            "ignored_keys": len(unexpected),
        }
    return model, info


def _batch_to(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _scalar(v) -> float:
    return float(v.detach().float().item()) if torch.is_tensor(v) else float(v)


# ---------------------------------------------------------------- distributed state


def _is_fsdp(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def _full_states(accelerator, objective, optimizer) -> tuple[dict | None, dict | None]:
    """(model state, optimizer state) gathered in full on rank 0 (None elsewhere under FSDP)."""
    if _is_fsdp(accelerator):  # every rank must take part in the gather
        from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.state_dict_type(
            objective,
            StateDictType.FULL_STATE_DICT,
            FullStateDictConfig(offload_to_cpu=True, rank0_only=True),
            FullOptimStateDictConfig(offload_to_cpu=True, rank0_only=True),
        ):
            msd = objective.state_dict()
            osd = FSDP.optim_state_dict(objective, optimizer)
        if accelerator.process_index != 0:
            return None, None
        return {k.removeprefix("model."): v for k, v in msd.items()}, osd
    if accelerator.process_index != 0:
        return None, None
    return accelerator.unwrap_model(objective).model.state_dict(), optimizer.state_dict()


def _load_full_states(accelerator, objective, optimizer, model_state: dict, optim_state: dict) -> None:
    if _is_fsdp(accelerator):
        from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.state_dict_type(
            objective,
            StateDictType.FULL_STATE_DICT,
            FullStateDictConfig(offload_to_cpu=True, rank0_only=False),
            FullOptimStateDictConfig(offload_to_cpu=True, rank0_only=False),
        ):
            objective.load_state_dict({"model." + k: v for k, v in model_state.items()})
            optimizer.load_state_dict(FSDP.optim_state_dict_to_load(objective, optimizer, optim_state))
        return
    accelerator.unwrap_model(objective).model.load_state_dict(model_state)
    optimizer.load_state_dict(optim_state)


def _reduce_mean(accelerator, values: dict[str, float]) -> dict[str, float]:
    """Mean over ranks of scalar metrics (every rank has the same keys)."""
    if accelerator.num_processes == 1 or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=accelerator.device)
    t = accelerator.reduce(t, reduction="mean")
    return dict(zip(keys, t.tolist()))


def _any_rank(accelerator, flag: bool) -> bool:
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(t, reduction="sum").item() > 0)


def build_callbacks(cfg: TrainConfig, stage_cfg: StageConfig, rank: int) -> CallbackList:
    """Rank 0: the progress stream plus every named callback; other ranks: none."""
    if rank != 0:
        return CallbackList([])
    cbs: list[Callback] = [ProgressStreamCallback()]
    for spec in list(cfg.callbacks) + [s for s in stage_cfg.callbacks if s not in cfg.callbacks]:
        cbs.append(load_callback(spec, **cfg.callback_kwargs.get(spec, {})))
    return CallbackList(cbs)


# ---------------------------------------------------------------- the run


def run_identity(cfg: TrainConfig, preset: Preset, world_size: int) -> dict:
    """What a checkpoint of this run records and a resume must match (checkpoint.check_compatible)."""
    from .data import read_manifest
    from .source import source_identity

    return {
        "preset": preset.to_dict(),
        "stage": cfg.stage,
        "world_size": world_size,
        "manifest_uri": cfg.manifest_uri,
        "manifest_hash": read_manifest(cfg.manifest_uri)["manifest_hash"],
        "source": source_identity(preset.model.source),
        "init_from": cfg.init_from,
    }


def _check_batch(stage_cfg: StageConfig, world_size: int) -> int:
    per_step = stage_cfg.micro_batch * world_size
    if stage_cfg.global_batch % per_step:
        raise TrainError(
            f"stage{stage_cfg.stage}.global_batch {stage_cfg.global_batch} is not a multiple of "
            f"micro_batch {stage_cfg.micro_batch} x world size {world_size}"
        )
    return stage_cfg.global_batch // per_step


def train(cfg: TrainConfig) -> dict:
    """Run (or resume, or skip) one stage; returns a summary with the final checkpoint URI."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    preset = Preset.from_dict(cfg.preset)
    stage_cfg = preset.stage1 if cfg.stage == 1 else preset.stage2
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=cfg.ddp_find_unused)],
    )
    callbacks = build_callbacks(cfg, stage_cfg, accelerator.process_index)
    progress = {"step": 0}
    try:
        return _train(cfg, preset, stage_cfg, accelerator, callbacks, progress)
    except BaseException as e:  # tell the callbacks (MLflow run -> FAILED), then fail loudly
        callbacks.on_error(progress["step"], e)
        raise


def _train(cfg, preset, stage_cfg, accelerator, callbacks, progress: dict) -> dict:
    from .source import load_tokenizer
    from .subword import SubwordVocab

    rank, world = accelerator.process_index, accelerator.num_processes
    barrier = accelerator.wait_for_everyone
    accum = _check_batch(stage_cfg, world)
    ident = run_identity(cfg, preset, world)
    out = cfg.out_uri
    if rank == 0:
        ckpt.clean_uncommitted(out)
    barrier()

    fin = ckpt.final_checkpoint(out)
    if fin:  # a finished stage: check it is this stage, then skip
        ckpt.check_compatible(ckpt.read_config(fin), ident, fin, cfg.allow_mismatch)
        state = storage.read_json(storage.join(fin, "trainer_state.json"))
        callbacks.on_train_start(state.get("step", 0), stage_cfg.steps, {"skipped": True, "final": fin})
        callbacks.on_train_end(state.get("step", 0), state.get("metrics", {}))
        return {"final": fin, "skipped": True, **state}

    set_determinism(stage_cfg.seed, cfg.deterministic)  # same seed on every rank: identical init
    vocab = SubwordVocab.from_tokenizer(load_tokenizer(preset.model.source))
    model, init_info = build_model(cfg, preset, vocab)
    model.configure_stage(stage_cfg)  # requires_grad per stage, before DDP registers its hooks
    model.to(accelerator.device)
    loader = WindowLoader.from_config(
        preset.data,
        cfg.manifest_uri,
        vocab,
        stage_cfg.micro_batch,
        seed=stage_cfg.seed,
        rank=rank,
        world_size=world,
    )
    objective = accelerator.prepare_model(StageObjective(model, cfg.stage, stage_cfg.losses))
    optimizer = build_optimizer(model, stage_cfg)
    scheduler = build_scheduler(optimizer, stage_cfg)
    evaluator = (
        Validator(preset, cfg.stage, cfg.manifest_uri, vocab, accelerator.device)
        if rank == 0 and not _is_fsdp(accelerator)
        else None
    )
    # Per-rank randomness from here on (the model itself is already identical everywhere).
    set_determinism(stage_cfg.seed + 1 + rank, cfg.deterministic)

    step, elapsed_before, resumed, diffs = 0, 0.0, None, []
    latest = ckpt.latest_checkpoint(out)
    if latest:
        saved = ckpt.read_config(latest)
        diffs = ckpt.check_compatible(saved, ident, latest, cfg.allow_mismatch)
        # Per-rank RNG/loader positions only mean something for the same world size and data.
        same_layout = (
            saved.get("world_size") == world and saved.get("manifest_hash") == ident["manifest_hash"]
        )
        st = ckpt.load_checkpoint(latest, rank if same_layout else None)
        _load_full_states(accelerator, objective, optimizer, st["model"], st["optimizer"])
        scheduler.load_state_dict(st["scheduler"])
        if same_layout:
            ckpt.restore_rng(st["rank"]["rng"])
            loader.load_state_dict(st["rank"]["loader"])
        step = int(st["trainer_state"]["step"])
        elapsed_before = float(st["trainer_state"].get("elapsed_s", 0.0))
        resumed = latest

    progress["step"] = step
    info = {
        "stage": cfg.stage,
        "world_size": world,
        "accum": accum,
        "resumed_from": resumed,
        "mismatches_allowed": diffs if resumed else [],
        "out_uri": out,
        "n_params": sum(p.numel() for p in model.parameters()),
        "n_trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        **init_info,
    }
    callbacks.on_train_start(step, stage_cfg.steps, info)

    autocast = (
        (lambda: torch.autocast(accelerator.device.type, dtype=torch.bfloat16))
        if stage_cfg.precision == "bf16"
        else contextlib.nullcontext
    )
    params = [p for p in model.parameters() if p.requires_grad]
    t_start = time.time()
    budget_s = cfg.max_minutes * 60 if cfg.max_minutes else None
    it = iter(loader)
    reason = "steps"
    last_eval: dict[str, float] = {}

    def save(name: str, finished: bool, metrics: dict) -> str:
        msd, osd = _full_states(accelerator, objective, optimizer)
        trainer_state = {
            "step": step,
            "elapsed_s": elapsed_before + time.time() - t_start,
            "finished": finished,
            "reason": reason if finished else None,
            "metrics": metrics,
            "samples": step * stage_cfg.global_batch,
        }
        rank_state = {"rng": ckpt.capture_rng(), "loader": loader.state_dict()}
        uri = ckpt.save_checkpoint(
            out,
            name,
            rank=rank,
            world_size=world,
            barrier=barrier,
            rank_state=rank_state,
            model_state=msd,
            optimizer_state=osd,
            scheduler_state=scheduler.state_dict() if rank == 0 else None,
            trainer_state=trainer_state,
            config=ident,
            keep_last=stage_cfg.keep_last,
        )
        callbacks.on_checkpoint(step, uri)
        return uri

    while step < stage_cfg.steps:
        if budget_s is not None and _any_rank(
            accelerator, elapsed_before + time.time() - t_start >= budget_s
        ):
            reason = "max_minutes"
            break
        t0 = time.time()
        objective.train()
        sums: dict[str, float] = {}
        n_bytes = 0
        for micro in range(accum):
            batch = next(it)
            if cfg.stage == 2:
                batch = coarsen_batch(batch, stage_cfg.target_bytes_per_patch)
            n_bytes += int(batch["byte_mask"].sum())
            batch = _batch_to(batch, accelerator.device)
            sync = contextlib.nullcontext() if micro == accum - 1 else accelerator.no_sync(objective)
            with sync:
                with autocast():
                    loss, metrics = objective(batch)
                accelerator.backward(loss / accum)
            sums["loss"] = sums.get("loss", 0.0) + _scalar(loss) / accum
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + _scalar(v) / accum
        grad_norm = accelerator.clip_grad_norm_(params, stage_cfg.optim.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        progress["step"] = step
        dt = time.time() - t0
        sums["grad_norm"] = _scalar(grad_norm)
        metrics = _reduce_mean(accelerator, sums)
        metrics["bytes_per_s"] = n_bytes * world / dt
        metrics["step_time_s"] = dt
        for i, g in enumerate(optimizer.param_groups):
            metrics[f"lr/{g.get('name', i)}"] = g["lr"]
        callbacks.on_step_end(step, metrics)
        if stage_cfg.eval_every and step % stage_cfg.eval_every == 0 and step < stage_cfg.steps:
            last_eval = _run_eval(evaluator, model, accelerator, callbacks, step, stage_cfg)
        if stage_cfg.checkpoint_every and step % stage_cfg.checkpoint_every == 0 and step < stage_cfg.steps:
            save(ckpt.step_name(step), False, metrics)

    last_eval = _run_eval(evaluator, model, accelerator, callbacks, step, stage_cfg) or last_eval
    fin = save(ckpt.FINAL, True, last_eval)
    summary = {"final": fin, "skipped": False, "step": step, "reason": reason, "metrics": last_eval}
    callbacks.on_train_end(step, last_eval)
    return summary


def _run_eval(evaluator, model, accelerator, callbacks, step, stage_cfg) -> dict:
    """Validation on rank 0 with its RNG forked (evaluation never changes the training stream)."""
    metrics: dict[str, float] = {}
    if evaluator is not None:
        with torch.random.fork_rng(devices=[]):
            metrics = evaluator(model)
        callbacks.on_eval(step, metrics)
    accelerator.wait_for_everyone()
    return metrics


# ---------------------------------------------------------------- command line


def config_from_args(args) -> TrainConfig:
    """A TrainConfig from ``--config FILE`` or from ``--preset/--stage/--manifest/--out [--set k=v ...]``."""
    if args.config:
        cfg = TrainConfig.load(args.config)
    else:
        missing = [f"--{n}" for n in ("preset", "stage", "manifest", "out") if getattr(args, n) is None]
        if missing:
            raise TrainError(
                f"give --config FILE, or all of --preset --stage --manifest --out (missing {missing[0]})"
            )
        from .config import get_preset

        try:
            preset = get_preset(args.preset, args.set or None)
        except ValueError as e:
            raise TrainError(str(e)) from None
        cfg = TrainConfig(
            preset=preset.to_dict(),
            stage=args.stage,
            manifest_uri=args.manifest,
            out_uri=args.out,
            init_from=args.init_from,
            deterministic=args.deterministic,
        )
    if args.allow_mismatch:
        cfg.allow_mismatch = True
    if args.max_minutes is not None:
        cfg.max_minutes = args.max_minutes
    return cfg


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
    args = ap.parse_args(argv)
    from .data import DataError
    from .source import SourceError

    try:
        summary = train(config_from_args(args))
    except (TrainError, EvalError, ckpt.CheckpointError, DataError, SourceError, storage.StorageError) as e:
        print(f"bolmo_core.train: error: {e}", file=sys.stderr, flush=True)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"summary": summary}, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
