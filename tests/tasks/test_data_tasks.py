"""Prefect data tasks: the same output as the pure path on a thread pool or a Dask cluster; idempotent."""

import json
import time
from pathlib import Path

import pytest

from bolmo_core import data as D
from bolmo_core.config import DataConfig, get_preset
from bolmo_core.source import SourceConfig, tiny_corpus

TINY = SourceConfig("tiny-olmo2")
CFG = DataConfig(shard_docs=25, validation_fraction=0.1)
BUDGET = {"train_tokens": 20_000, "validation_tokens": 500, "validation_bytes": 0}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    p = tmp_path_factory.mktemp("src") / "docs.jsonl"
    p.write_text("".join(json.dumps({"text": t}) + "\n" for t in tiny_corpus(200_000)))
    return str(p)


def unit_bytes(source: str) -> int:
    return Path(source).stat().st_size // 6  # six units


def test_prepare_data_task_matches_pure_path_and_reruns_as_no_op(prefect_api, source, tmp_path):
    from tasks.data import prepare_data

    ub = unit_bytes(source)
    pure = D.prepare_dataset([source], TINY, str(tmp_path / "pure"), CFG, unit_bytes=ub)
    uri, h = prepare_data([source], TINY, str(tmp_path / "flow"), CFG, workers=2, unit_bytes=ub)
    assert Path(uri).read_bytes() == Path(pure).read_bytes()
    assert h == D.read_manifest(pure)["manifest_hash"]
    for e in D.read_manifest(uri)["shards"]:
        assert (Path(uri).parent / e["uri"]).read_bytes() == (Path(pure).parent / e["uri"]).read_bytes()
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "flow").rglob("*")}
    assert prepare_data([source], TINY, str(tmp_path / "flow"), CFG, workers=2, unit_bytes=ub) == (uri, h)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "flow").rglob("*")} == stamps


def test_dask_cluster_of_two_processes_gives_the_thread_pool_manifest(prefect_api, source, tmp_path):
    """A real local Dask cluster (two worker processes on loopback) labels the units up to a token
    budget; the manifest is byte-identical to the thread pool's."""
    from distributed import Client, LocalCluster, get_task_stream

    from tasks.data import prepare_data

    ub = unit_bytes(source)
    threads, _ = prepare_data(
        [source], TINY, str(tmp_path / "threads"), CFG, workers=2, budget=BUDGET, unit_bytes=ub
    )
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        pids = set(client.run(lambda: __import__("os").getpid()).values())
        with get_task_stream(client) as ts:
            dask, _ = prepare_data(
                [source],
                TINY,
                str(tmp_path / "dask"),
                CFG,
                budget=BUDGET,
                dask_address=cluster.scheduler_address,
                unit_bytes=ub,
            )
        workers = {t["worker"] for t in ts.data}
    assert Path(dask).read_bytes() == Path(threads).read_bytes()
    assert len(pids) == 2 and len(workers) == 2, workers  # both worker processes labelled units
    m = D.read_manifest(dask)
    assert m["budget_met"] and m["inputs"]["units_planned"] > len(m["inputs"]["units"]) >= 2


def test_token_budget_from_a_resolved_preset():
    from tasks.data import token_budget

    p = get_preset("smollm2-135m", {"stage1.steps": 60, "stage2.steps": 20})
    b = token_budget(p.to_dict(), validation_bytes=8000)
    assert b == {
        "train_tokens": (60 + 20) * 4 * 64,
        "validation_tokens": 4 * 4 * 65,
        "validation_bytes": 8000,
    }
    assert token_budget(p.to_dict(), max_tokens=123)["train_tokens"] == 123


def test_bad_input_fails_without_retrying(prefect_api, tmp_path):
    from prefect.states import State

    from tasks.data import plan_dataset

    state: State = plan_dataset(
        [str(tmp_path / "missing.jsonl")], TINY, str(tmp_path / "o"), CFG, return_state=True
    )
    assert state.is_failed()
    with pytest.raises(D.DataError, match=r"missing.jsonl: does not exist$"):
        state.result()
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    # Bad input is not retried (retries=2 are for storage). Task runs reach the API as events: poll.
    with get_client(sync_client=True) as client:
        for _ in range(60):
            try:
                run = client.read_task_run(state.state_details.task_run_id)
                if run.state is not None and run.state.is_final():
                    break
            except ObjectNotFound:
                pass
            time.sleep(0.5)
        assert run.run_count == 1 and run.state.is_failed()


def test_progress_text_counts_units_shards_and_tokens():
    from tasks.data import _done_of, units_text

    pair = lambda rows, tokens: {
        "entries": [
            {"split": "train", "rows": rows, "bytes": 2_000_000, "tokens": tokens},
            {"split": "validation", "rows": 1, "bytes": 10, "tokens": 3},
        ]
    }
    results = [{"pairs": [pair(900, 500_000), pair(300, 810_000)]}, {"pairs": []}]
    assert units_text(results, 8) == "2/8 units · 4 shards · 1,202 documents · 4.0 MB · 1.31 M tokens"
    assert _done_of(results, 8, None) == (2, 8)
    assert _done_of(results, 8, {"train_tokens": 2_000_000}) == (1_310_000, 2_000_000)
