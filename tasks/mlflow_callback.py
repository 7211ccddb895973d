"""The trainer's MLflow callback, kept light: the trainer subprocess imports it by name on
rank 0, so it must not pull in Prefect (seconds of import per stage) and imports MLflow's
client only when there is a run to log to.

The parent task hands over the run via ``MLFLOW_TRACKING_URI`` and ``MLFLOW_RUN_ID``.
"""

from __future__ import annotations

import os
import re
import sys
import time

from bolmo_core.callbacks import Callback

RUN_ID_ENV = "MLFLOW_RUN_ID"
TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"


def _metric_key(k: str) -> str:
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", str(k))[:250]


def _is_number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and v == v  # drop NaN


def _client(tracking_uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


class MlflowCallback(Callback):
    """Trainer callback (rank 0, inside the training subprocess): metrics to the stage's run in batches.

    A tracking outage never stops training: failed batches are kept and sent with the next flush.
    """

    def __init__(self, flush_every: int = 20, flush_seconds: float = 10.0):
        self.tracking_uri = os.environ.get(TRACKING_URI_ENV, "")
        self.run_id = os.environ.get(RUN_ID_ENV, "")
        self.flush_every = flush_every
        self.flush_seconds = flush_seconds
        self.buffer: list = []
        self.steps_buffered = 0
        self.last_flush = time.time()

    @property
    def active(self) -> bool:
        return bool(self.tracking_uri and self.run_id)

    def _add(self, step: int, metrics: dict[str, float], prefix: str = "") -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.buffer += [
            Metric(_metric_key(prefix + k), float(v), now, int(step))
            for k, v in metrics.items()
            if _is_number(v)
        ]

    def flush(self) -> None:
        if not self.active or not self.buffer:
            return
        try:
            _client(self.tracking_uri).log_batch(self.run_id, metrics=self.buffer)  # it chunks itself
            self.buffer = []
        except Exception as e:  # noqa: BLE001 - tracking must not kill training
            print(
                f"MlflowCallback: could not log {len(self.buffer)} metrics ({str(e).splitlines()[0]})",
                file=sys.stderr,
                flush=True,
            )
        self.steps_buffered = 0
        self.last_flush = time.time()

    def on_train_start(self, step, total_steps, info):
        if self.active:
            try:
                client = _client(self.tracking_uri)
                client.set_tag(self.run_id, "byteify.total_steps", str(total_steps))
                client.set_tag(self.run_id, "byteify.resumed_from_step", str(step))
            except Exception as e:  # noqa: BLE001
                print(f"MlflowCallback: {str(e).splitlines()[0]}", file=sys.stderr, flush=True)

    def on_step_end(self, step, metrics):
        self._add(step, metrics)
        self.steps_buffered += 1
        if self.steps_buffered >= self.flush_every or time.time() - self.last_flush > self.flush_seconds:
            self.flush()

    def on_eval(self, step, metrics):
        self._add(step, metrics, prefix="eval/")
        self.flush()

    def on_checkpoint(self, step, uri):
        self.flush()

    def on_error(self, step, error):
        self.flush()

    def on_train_end(self, step, metrics):
        self._add(step, metrics, prefix="final/")
        self.flush()
