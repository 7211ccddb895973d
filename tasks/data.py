"""Prefect tasks for data preparation: plan -> label shards (mapped) -> manifest.

Thin wrappers over `bolmo_core.data`: they load the tokenizer, retry transient storage
errors (never bad input), and cache on inputs + task source (not the run id). Each shard
also writes a done-marker after its files, so a restarted run redoes only unfinished
shards even when Prefect's cache is gone, and ``prepare_data`` returns at once when the
output already holds the manifest of the same inputs and tokenizer.

Parallelism: ``prepare_data(workers=N)`` runs the shard tasks on a ``ThreadPoolTaskRunner``
(the Rust tokenizer releases the GIL; see docs/benchmarks.md for threads vs processes on
this machine). On many machines the same ``label_shard`` tasks run on a Dask or Ray
cluster: pass ``task_runner=DaskTaskRunner(address=...)`` (prefect-dask) or
``RayTaskRunner(address=...)`` (prefect-ray); every worker needs the same storage
credentials (``AWS_*``) and writes straight to ``out_uri``. The output is byte-identical
whatever runs it: each shard depends only on the plan.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from functools import lru_cache

from prefect import task
from prefect.cache_policies import INPUTS, NO_CACHE, TASK_SOURCE
from prefect.task_runners import ThreadPoolTaskRunner

from bolmo_core import data as D
from bolmo_core import storage
from bolmo_core.config import DataConfig
from bolmo_core.source import SourceConfig, load_tokenizer

from .artifacts import Progress, shards_text
from .retries import RETRY


def data_out_uri(root: str, sources: list[str], preset) -> str:
    """One data folder per (sources, tokenizer source, data config) (pure: the flow may call it)."""
    ident = [sorted(sources), dataclasses.asdict(preset.model.source), dataclasses.asdict(preset.data)]
    key = hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return storage.join(root, "data", key)


@lru_cache(maxsize=4)
def _tokenizer(src: SourceConfig):
    return load_tokenizer(src)


# Not cached: the plan reads the inputs' sizes and counts, which may change under the same URIs.
@task(cache_policy=NO_CACHE, **RETRY)
def plan_shards(
    sources: list[str],
    tokenizer_source: SourceConfig,
    out_uri: str,
    data_cfg: DataConfig,
    world_size: int = 1,
    text_column: str = "text",
) -> dict:
    """Resolve the inputs and cut them into shard ranges (the plan is small JSON)."""
    tok = _tokenizer(tokenizer_source)
    return D.plan_shards(
        sources, D.tokenizer_info(tok, tokenizer_source), out_uri, data_cfg, world_size, text_column
    )


@task(cache_policy=INPUTS + TASK_SOURCE, persist_result=True, **RETRY)
def label_shard(plan: dict, index: int, tokenizer_source: SourceConfig) -> dict:
    """Read, label and write one shard (both splits); its manifest entries."""
    return D.label_shard(plan, index, _tokenizer(tokenizer_source))


@task(**RETRY)
def write_manifest(plan: dict, results: list[dict]) -> tuple[str, str]:
    """Write the manifest last: (manifest_uri, manifest_hash)."""
    return D.write_manifest(plan, results)


@task(**RETRY)
def prepare_data(
    sources: list[str],
    tokenizer_source: SourceConfig,
    out_uri: str,
    data_cfg: DataConfig,
    workers: int = 1,
    world_size: int = 1,
    text_column: str = "text",
    task_runner=None,
) -> tuple[str, str]:
    """Shards + manifest under `out_uri`: (manifest_uri, manifest_hash); no work if already there."""
    plan = plan_shards(sources, tokenizer_source, out_uri, data_cfg, world_size, text_column)
    done = D.existing_manifest(plan)
    if done:
        return done, D.read_manifest(done)["manifest_hash"]
    runner = task_runner or ThreadPoolTaskRunner(max_workers=max(1, workers))
    with runner:
        futures = [
            runner.submit(label_shard, {"plan": plan, "index": i, "tokenizer_source": tokenizer_source})
            for i in range(len(plan["shards"]))
        ]
        bar, results = Progress("data-progress", "Data preparation"), []
        for f in futures:
            results.append(f.result())
            bar.update(len(results), len(futures), shards_text(results, len(futures)))
    out = write_manifest(plan, results)
    bar.finish(shards_text(results, len(futures)))
    return out
