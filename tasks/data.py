"""Prefect tasks for data preparation: plan -> label units (on a thread pool or a Dask cluster) -> manifest.

Thin wrappers over `bolmo_core.data`: they load the tokenizer, retry transient storage
errors (never bad input), and hand each other small JSON (the plan, unit results).

Where the unit tasks run: ``prepare_data(workers=N)`` uses a ``ThreadPoolTaskRunner`` (the
Rust tokenizer releases the GIL); ``prepare_data(dask_address="tcp://host:8786")`` uses
prefect-dask's ``DaskTaskRunner`` connected to that scheduler, so the units spread over every
Dask worker (processes, machines). Every worker needs this package, the same storage
credentials (``AWS_*``) and the Prefect API settings; it reads its unit straight from the
sources and writes its shards straight to ``out_uri``. The output is byte-identical whatever
runs it: each unit depends only on the plan (docs/scale.md, "Data preparation").

Caching: a unit's done-marker in ``out_uri`` is its cache (it lives in the shared output
storage, so it is valid on every machine; Prefect's result cache would live on one worker's
disk), and ``prepare_data`` returns at once when ``out_uri`` holds the manifest of the same
inputs, fingerprints and budget with every shard intact; a missing shard is rebuilt.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from functools import lru_cache
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from bolmo_core import data as D
from bolmo_core import storage
from bolmo_core.config import DataConfig, Preset
from bolmo_core.source import SourceConfig, load_tokenizer

from .artifacts import Progress
from .retries import RETRY


def data_out_uri(root: str, sources: list[str], preset) -> str:
    """One data folder per (sources, tokenizer source, data config) (pure: the flow may call it).

    A changed input or token budget prepares again in the same folder (the old manifest is kept
    beside the new one, ``bolmo_core.data.write_manifest``).
    """
    ident = [sorted(sources), dataclasses.asdict(preset.model.source), dataclasses.asdict(preset.data)]
    key = hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return storage.join(root, "data", key)


@lru_cache(maxsize=4)
def _tokenizer(src: SourceConfig):
    return load_tokenizer(src)


def token_budget(
    preset: dict[str, Any], max_tokens: int | None = None, validation_bytes: int = 0
) -> dict[str, int]:
    """The budget the stages of a resolved preset (``Preset.to_dict()``) consume, as plain data."""
    return dataclasses.asdict(
        D.TokenBudget.for_preset(Preset.from_dict(preset), max_tokens, validation_bytes)
    )


# Not cached: the plan reads the inputs' listings and fingerprints, which change under the same URIs.
@task(cache_policy=NO_CACHE, **RETRY)
def plan_dataset(
    sources: list[str],
    tokenizer_source: SourceConfig,
    out_uri: str,
    data_cfg: DataConfig,
    text_column: str = "text",
    budget: dict[str, int] | None = None,
    unit_bytes: int = D.UNIT_BYTES,
) -> dict:
    """Resolve the inputs into units (listings and footers only; the plan is small JSON)."""
    tok = _tokenizer(tokenizer_source)
    info = D.tokenizer_info(tok, tokenizer_source)
    b = D.TokenBudget(**budget) if budget else None
    return D.plan_dataset(sources, info, out_uri, data_cfg, text_column, budget=b, unit_bytes=unit_bytes)


@task(cache_policy=NO_CACHE, **RETRY)
def label_unit(job: dict, index: int, unit: dict, tokenizer_source: SourceConfig) -> dict:
    """Read, label and write one unit (shards of both splits); its result (the done-marker's content)."""
    return D.label_unit(job, index, unit, _tokenizer(tokenizer_source))


@task(cache_policy=NO_CACHE, **RETRY)
def write_manifest(plan: dict, results: list[dict]) -> tuple[str, str]:
    """Write the manifest last: (manifest_uri, manifest_hash)."""
    return D.write_manifest(plan, results)


def units_text(results: list[dict], total: int) -> str:
    """'3/8 units · 12 shards · 1,204 documents · 5.6 MB · 1.31 M tokens' from label_unit results."""
    entries = [e for r in results for p in r["pairs"] for e in p["entries"]]
    docs, nbytes, tokens = (sum(e[k] for e in entries) for k in ("rows", "bytes", "tokens"))
    return (
        f"{len(results)}/{total} units · {len(entries)} shards · {docs:,} documents · "
        f"{nbytes / 1e6:.1f} MB · {tokens / 1e6:.2f} M tokens"
    )


def _done_of(results: list[dict], n: int, budget: dict | None) -> tuple[int, int]:
    """(done, total) for the progress bar: units, or training tokens against a budget."""
    if not budget:
        return len(results), n
    got = sum(e["tokens"] for r in results for p in r["pairs"] for e in p["entries"] if e["split"] == "train")
    return min(got, budget["train_tokens"]), max(1, budget["train_tokens"])


def _runner(workers: int, dask_address: str | None):
    if not dask_address:
        return ThreadPoolTaskRunner(max_workers=max(1, workers))
    from prefect_dask import DaskTaskRunner

    return DaskTaskRunner(address=dask_address)


def _in_flight(runner, workers: int) -> int:
    """Units submitted at once: `workers`, or every thread of the Dask cluster."""
    client = getattr(runner, "client", None) if type(runner).__name__ == "DaskTaskRunner" else None
    if client is None:
        return max(1, workers)
    return max(workers, sum(client.nthreads().values()))


@task(cache_policy=NO_CACHE, **RETRY)
def prepare_data(
    sources: list[str],
    tokenizer_source: SourceConfig,
    out_uri: str,
    data_cfg: DataConfig,
    workers: int = 1,
    text_column: str = "text",
    budget: dict[str, int] | None = None,
    dask_address: str | None = None,
    task_runner=None,
    unit_bytes: int = D.UNIT_BYTES,
) -> tuple[str, str]:
    """Shards + manifest under `out_uri`: (manifest_uri, manifest_hash); no work if already there.

    `budget`: ``TokenBudget`` fields (see `token_budget`); None prepares every document.
    `unit_bytes`: input bytes per unit task (parallelism grain).
    """
    plan = plan_dataset(sources, tokenizer_source, out_uri, data_cfg, text_column, budget, unit_bytes)
    done = D.existing_manifest(plan)
    if done:
        return done, D.read_manifest(done)["manifest_hash"]
    D.check_output(plan["out_uri"])  # a missing bucket fails here, before any labelling
    job = D.job_of(plan)
    runner = task_runner or _runner(workers, dask_address)
    n, bar = len(plan["units"]), Progress("data-progress", "Data preparation")
    with storage.lock_folder(plan["out_uri"], "data preparation"), runner:
        params = lambda i: {
            "job": job,
            "index": i,
            "unit": plan["units"][i],
            "tokenizer_source": tokenizer_source,
        }
        results = D.run_units(
            plan,
            lambda i: runner.submit(label_unit, params(i)),
            _in_flight(runner, workers),
            on_result=lambda rs: bar.update(*_done_of(rs, n, plan["budget"]), units_text(rs, n)),
        )
        out = write_manifest(plan, results)
    bar.finish(units_text(results, n))
    return out
