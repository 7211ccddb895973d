"""The trainer's callbacks: everything optional in a stage run.

Built in, on every rank (they take part in collectives): periodic validation, periodic
checkpoints, time budgets. On rank 0: the progress stream and any ``"module:Class"`` named in
the run config. `bolmo_core` knows neither Prefect nor MLflow: a callback that needs them lives
outside the package (``tasks/``) and the trainer imports it by name.
"""

from __future__ import annotations

import importlib
import json
import sys
import time
from typing import IO, Any


class Callback:
    """Hooks the trainer calls on rank 0. Every method is optional."""

    def on_train_start(self, step: int, total_steps: int, info: dict[str, Any]) -> None: ...

    def on_step_start(self, step: int) -> None: ...

    def on_step_end(self, step: int, metrics: dict[str, float]) -> None: ...

    def on_eval(self, step: int, metrics: dict[str, float]) -> None: ...

    def on_checkpoint(self, step: int, uri: str) -> None: ...

    def on_error(self, step: int, error: BaseException) -> None: ...

    def on_train_end(self, step: int, metrics: dict[str, float]) -> None: ...


class CallbackList(Callback):
    """Fan a hook out to several callbacks."""

    def __init__(self, callbacks: list[Callback]):
        self.callbacks = list(callbacks)

    def _call(self, name: str, *args) -> None:
        for cb in self.callbacks:
            getattr(cb, name)(*args)

    def on_train_start(self, step, total_steps, info):
        self._call("on_train_start", step, total_steps, info)

    def on_step_start(self, step):
        self._call("on_step_start", step)

    def on_step_end(self, step, metrics):
        self._call("on_step_end", step, metrics)

    def on_eval(self, step, metrics):
        self._call("on_eval", step, metrics)

    def on_checkpoint(self, step, uri):
        self._call("on_checkpoint", step, uri)

    def on_error(self, step, error):
        self._call("on_error", step, error)

    def on_train_end(self, step, metrics):
        self._call("on_train_end", step, metrics)


class PeriodicValidation(Callback):
    """Validate every `every` steps (the last step validates anyway, before `final`)."""

    def __init__(self, trainer, every: int):
        self.trainer, self.every = trainer, every

    def on_step_end(self, step, metrics):
        if self.every and step % self.every == 0 and step < self.trainer.stage_cfg.steps:
            self.trainer.evaluate()


class PeriodicCheckpoint(Callback):
    """Save ``step-NNNNNN`` every `every` steps (the last step is saved as ``final`` anyway)."""

    def __init__(self, trainer, every: int):
        self.trainer, self.every = trainer, every

    def on_step_end(self, step, metrics):
        if self.every and step % self.every == 0 and step < self.trainer.stage_cfg.steps:
            from .checkpoint import step_name

            self.trainer.save(step_name(step), metrics=metrics)


class TimeBudget(Callback):
    """End the stage early, as finished, once its wall-clock or rank-0 CPU budget is spent.

    Budgets add up over restarts (the checkpoint keeps what was spent). The CPU budget lets
    arms of an experiment that share a busy machine get the same compute.
    """

    def __init__(self, trainer, max_minutes: float | None, max_cpu_minutes: float | None):
        self.trainer = trainer
        self.limits = {"elapsed_s": max_minutes, "cpu_s": max_cpu_minutes}

    def on_step_start(self, step):
        spent = self.trainer.spent()
        hit = [k for k, m in self.limits.items() if m and spent[k] >= 60 * m]
        # Every rank must stop at the same step: one rank's verdict is everyone's.
        if self.trainer.any_rank(bool(hit)):
            self.trainer.stop_reason = "max_cpu_minutes" if hit == ["cpu_s"] else "max_minutes"


class MemoryProbe(Callback):
    """Measures the memory one training step allocates above what was allocated before it.

    Adds ``mem_step_peak_bytes`` to that step's metrics: the peak of the bytes allocated during
    step `step` above those allocated at its start (activations, this rank's gradients, gathered
    shards, optimizer temporaries).
    CUDA: the caching allocator's own counters. CPU: torch's profiler records every allocation
    and free of the CPU allocator with its size; their running sum over the step is the
    allocated-bytes curve, and its maximum the peak (exact, no sampling; allocator caching and
    fragmentation are not in it). One step only: profiling slows that step down.
    Named in a stage's ``callbacks`` (rank 0); the plan's activation estimate is checked against it.
    """

    def __init__(self, step: int = 2):
        self.step = step  # not step 1: AdamW allocates its state there
        self.prof = None
        self.device = None

    def on_step_start(self, step):
        if step + 1 != self.step:
            return
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
            self.base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            return
        from torch.profiler import ProfilerActivity, profile

        self.prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self.prof.__enter__()

    def on_step_end(self, step, metrics):
        if step != self.step:
            return
        import torch

        if self.prof is None:
            torch.cuda.synchronize()
            metrics["mem_step_peak_bytes"] = float(torch.cuda.max_memory_allocated() - self.base)
            return
        self.prof.__exit__(None, None, None)
        events = sorted(
            (e.start_ns(), e.nbytes())
            for e in self.prof.profiler.kineto_results.events()
            if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
        )
        self.prof, total, peak = None, 0, 0
        for _, n in events:
            total += n
            peak = max(peak, total)
        metrics["mem_step_peak_bytes"] = float(peak)


PROGRESS_PREFIX = "BYTEIFY_PROGRESS "


class ProgressStreamCallback(Callback):
    """Writes one JSON line per event, prefixed so a parent process can pick them out of stdout.

    This is the stream the orchestration task reads to update its progress artifact: the
    trainer itself never talks to the orchestrator.
    """

    def __init__(self, stream: IO[str] | None = None, every: int = 1):
        self.stream = stream or sys.stdout
        self.every = max(1, every)
        self.total = 0

    def _emit(self, event: str, **payload) -> None:
        payload = {"event": event, "time": time.time(), **payload}
        self.stream.write(PROGRESS_PREFIX + json.dumps(payload, default=float) + "\n")
        self.stream.flush()

    def on_train_start(self, step, total_steps, info):
        self.total = total_steps
        self._emit("start", step=step, total=total_steps, info=info)

    def on_step_end(self, step, metrics):
        if step % self.every == 0 or step == self.total:
            self._emit("step", step=step, total=self.total, metrics=metrics)

    def on_eval(self, step, metrics):
        self._emit("eval", step=step, metrics=metrics)

    def on_checkpoint(self, step, uri):
        self._emit("checkpoint", step=step, uri=uri)

    def on_error(self, step, error):
        self._emit("error", step=step, error=f"{type(error).__name__}: {error}")

    def on_train_end(self, step, metrics):
        self._emit("end", step=step, metrics=metrics)


def parse_progress_line(line: str) -> dict | None:
    """The event in a progress line, or None for any other output line."""
    if not line.startswith(PROGRESS_PREFIX):
        return None
    try:
        return json.loads(line[len(PROGRESS_PREFIX) :])
    except json.JSONDecodeError:
        return None


def load_callback(spec: str, **kwargs) -> Callback:
    """Instantiate a callback named ``"package.module:ClassName"``."""
    module_name, _, cls_name = spec.partition(":")
    if not cls_name:
        raise ValueError(f"callback '{spec}': expected 'module:ClassName'")
    try:
        cls = getattr(importlib.import_module(module_name), cls_name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"callback '{spec}': cannot be imported ({e})") from None
    return cls(**kwargs)
