"""Prefect task: evaluate the byte model against its source on the held-out split.

A thin wrapper over ``bolmo_core.evaluate``: it reads the validation documents named by the
data manifest, loads both models, writes the JSON report (and a few texts with their
predicted patches, for the boundary view) next to the checkpoints, and returns URIs and
hashes. Cached on inputs + source + the scoring code's digest; the report file is the commit
marker it checks.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from typing import Any

from prefect import task
from prefect.cache_policies import INPUTS, TASK_SOURCE, CacheKeyFnPolicy

from bolmo_core import storage

from .artifacts import Progress
from .retries import RETRY

REPORT = "report.json"
SAMPLES = "boundary_samples.json"


def eval_out_uri(
    storage_root: str, checkpoint_hash: str, manifest_hash: str, options: dict[str, Any], scorer: str
) -> str:
    """Where the report for this checkpoint, data, options and scoring code goes (pure)."""
    key = hashlib.sha256(
        json.dumps([checkpoint_hash, manifest_hash, options, scorer], sort_keys=True).encode()
    ).hexdigest()
    return storage.join(storage_root, "eval", key[:16])


def scoring_code(*_) -> str:
    """`bolmo_core.evaluate.scorer_digest`: a report made by other scoring code is not reused."""
    from bolmo_core.evaluate import scorer_digest

    return scorer_digest()


# The cache policy of every task that scores a model: its inputs, its source and the scoring code.
SCORED = INPUTS + TASK_SOURCE + CacheKeyFnPolicy(cache_key_fn=scoring_code)


def run_evaluation(
    checkpoint_uri: str,
    manifest_uri: str,
    out_uri: str,
    max_bytes: int = 20_000,
    cute_items: int = 0,
    cute_tasks: list[str] | None = None,
    precision: str = "fp32",
    batch_size: int = 4,
    on_phase=None,
) -> dict:
    """Evaluate, write report + samples under `out_uri`; return the report.

    `on_phase(description)` is told what starts next (loading, each model's scoring, ...).
    """
    import torch

    from bolmo_core import cute
    from bolmo_core.evaluate import EvalConfig, boundary_samples, evaluate
    from bolmo_core.load import load_byte_model
    from bolmo_core.loader import split_texts
    from bolmo_core.source import load_source_model, load_tokenizer

    phase = on_phase or (lambda _: None)
    torch.manual_seed(0)
    phase("loading the byte model, the source model and the held-out text")
    byte_model, preset = load_byte_model(checkpoint_uri)
    tok = load_tokenizer(preset.model.source)
    source_model = load_source_model(preset.model.source)
    docs = split_texts(manifest_uri, "validation", max_bytes)
    tasks = tuple(cute_tasks) if cute_tasks is not None else (cute.CHAR_TASKS if cute_items > 0 else ())
    cfg = EvalConfig(
        batch_size=batch_size,
        precision=precision,
        max_bytes=max_bytes,
        cute_tasks=tasks if cute_items > 0 else (),
        cute_items=max(1, cute_items),
    )
    report = evaluate(
        docs,
        tok,
        source_model=source_model,
        byte_model=byte_model,
        cfg=cfg,
        byte_length=preset.data.byte_slots,
        on_phase=phase,
    )
    report.update(
        {
            "checkpoint_uri": checkpoint_uri,
            "manifest_uri": manifest_uri,
            "source_name": preset.model.source.name_or_path,
            "eval_config": asdict(cfg),
        }
    )
    phase("predicted patches of a few held-out texts")
    _write_report(out_uri, report, boundary_samples(byte_model, tok, docs))
    return report


def _write_report(out_uri: str, report: dict, samples: list) -> None:
    """Samples first, then the report (strict JSON): the report is this folder's commit marker."""
    storage.write_json_atomic(storage.join(out_uri, SAMPLES), samples)
    write_report(storage.join(out_uri, REPORT), report)


def write_report(uri: str, report: dict) -> None:
    """An evaluation report as strict JSON (NaN/inf -> null: MLflow and browsers choke on NaN)."""
    storage.write_bytes_atomic(
        uri, json.dumps(_finite(report), indent=1, sort_keys=True, default=str).encode()
    )


def _finite(x):
    """NaN/inf -> None, recursively."""
    if isinstance(x, float):
        return x if x == x and abs(x) != float("inf") else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite(v) for v in x]
    return x


# Phases reported to the progress artifact: loading, then per model scoring and (when asked)
# character tasks, then the patch samples.
def _phase_count(options: dict[str, Any]) -> int:
    return 1 + (2 if options.get("cute_items") else 1) * 2 + 1


@task(
    name="evaluate",
    cache_policy=SCORED,
    persist_result=True,
    **RETRY,
)
def evaluate_model(
    checkpoint_uri: str,
    checkpoint_hash: str,
    manifest_uri: str,
    manifest_hash: str,
    storage_root: str,
    options: dict[str, Any] | None = None,
) -> tuple[str, str, str]:
    """(report URI, report sha256, boundary-samples URI) for the byte model vs its source."""
    options = options or {}
    out_uri = eval_out_uri(storage_root, checkpoint_hash, manifest_hash, options, scoring_code())
    report_uri = storage.join(out_uri, REPORT)
    if storage.exists(report_uri):
        return report_uri, storage.sha256_uri(report_uri), storage.join(out_uri, SAMPLES)
    bar, total, done = Progress("evaluation-progress", "Evaluation"), _phase_count(options), [0]

    def phase(text: str) -> None:
        done[0] += 1
        bar.update(done[0] - 1, total, f"{done[0]}/{total} {text}", force=True, eta=False)

    report = run_evaluation(checkpoint_uri, manifest_uri, out_uri, on_phase=phase, **options)
    byt, src = report.get("byte_model") or {}, report.get("source") or {}
    bar.finish(
        f"{report['text']['bytes']} held-out bytes · byte model {byt.get('bits_per_byte', float('nan')):.3f} "
        f"vs source {src.get('bits_per_byte', float('nan')):.3f} bits per byte"
    )
    return report_uri, storage.sha256_uri(report_uri), storage.join(out_uri, SAMPLES)
