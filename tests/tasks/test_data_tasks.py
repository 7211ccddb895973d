"""Prefect data tasks: the same output as the pure path, whatever the parallelism; idempotent."""

import json
import time
from pathlib import Path

import pytest

from bolmo_core import data as D
from bolmo_core.config import DataConfig
from bolmo_core.source import SourceConfig, tiny_corpus

TINY = SourceConfig("tiny-olmo2")
CFG = DataConfig(shard_docs=25, validation_fraction=0.1)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    p = tmp_path_factory.mktemp("src") / "docs.jsonl"
    p.write_text("".join(json.dumps({"text": t}) + "\n" for t in tiny_corpus(60_000)[:100]))
    return str(p)


def test_prepare_data_task_matches_pure_path_and_reruns_as_no_op(prefect_api, source, tmp_path):
    from tasks.data import prepare_data

    pure = D.prepare_dataset([source], TINY, str(tmp_path / "pure"), CFG, workers=1, world_size=2)
    uri, h = prepare_data([source], TINY, str(tmp_path / "flow"), CFG, workers=2, world_size=2)
    assert Path(uri).read_bytes() == Path(pure).read_bytes()
    assert h == D.read_manifest(pure)["manifest_hash"]
    m = D.read_manifest(uri)
    assert sum(e["split"] == "train" for e in m["shards"]) % 2 == 0
    for e in m["shards"]:
        assert (Path(uri).parent / e["uri"]).read_bytes() == (Path(pure).parent / e["uri"]).read_bytes()
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "flow").rglob("*")}
    assert prepare_data([source], TINY, str(tmp_path / "flow"), CFG, workers=2, world_size=2) == (uri, h)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "flow").rglob("*")} == stamps


def test_bad_input_fails_without_retrying(prefect_api, tmp_path):
    from prefect.states import State

    from tasks.data import plan_shards

    state: State = plan_shards(
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
