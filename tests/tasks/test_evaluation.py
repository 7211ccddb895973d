"""The evaluation task on a real tiny checkpoint and dataset: report, samples, progress by phase."""

from __future__ import annotations

import pytest
from task_helpers import make_checkpoint, make_manifest

from tasks import evaluation


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> tuple[str, str]:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def tiny_manifest(tmp_path_factory) -> str:
    return make_manifest(tmp_path_factory.mktemp("data"))


def _progress(key: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))


def test_phases_announced_are_the_phases_counted(tiny_checkpoint, tiny_manifest, tmp_path):
    phases: list[str] = []
    options = {"max_bytes": 1500, "cute_items": 0}
    evaluation.run_evaluation(
        tiny_checkpoint[0], tiny_manifest, str(tmp_path), on_phase=phases.append, **options
    )
    assert len(phases) == evaluation._phase_count(options)
    assert phases[0].startswith("loading") and phases[-1].startswith("predicted patches")
    assert [p.split(":")[0] for p in phases[1:3]] == ["source model", "byte model"]


def test_evaluate_task_writes_report_and_shows_progress_then_reuses_it(
    prefect_api, tiny_checkpoint, tiny_manifest, tmp_path
):
    ckpt_uri, ckpt_hash = tiny_checkpoint
    args = (ckpt_uri, ckpt_hash, tiny_manifest, "m" * 64, str(tmp_path), {"max_bytes": 1500, "cute_items": 0})
    report_uri, report_hash, samples_uri = evaluation.evaluate_model.fn(*args)
    bar = _progress("evaluation-progress")
    assert len(bar) == 1 and float(bar[0].data) == 100.0
    text = bar[0].description
    assert (
        text.startswith("Evaluation: done in ")
        and "held-out bytes · byte model " in text
        and text.endswith("bits per byte")
    )
    assert evaluation.evaluate_model.fn(*args) == (
        report_uri,
        report_hash,
        samples_uri,
    )  # the report is the marker
    assert len(_progress("evaluation-progress")) == 1  # nothing ran, nothing shown


def test_a_report_made_by_other_scoring_code_is_not_reused(
    prefect_api, tiny_checkpoint, tiny_manifest, tmp_path, monkeypatch
):
    """The report folder and the Prefect cache key both hold the scoring code's digest: after a
    change to bolmo_core the same checkpoint is scored again, never answered from an old report."""
    import json
    from pathlib import Path

    from prefect.cache_policies import CacheKeyFnPolicy

    from bolmo_core import evaluate as E

    ckpt_uri, ckpt_hash = tiny_checkpoint
    args = (ckpt_uri, ckpt_hash, tiny_manifest, "m" * 64, str(tmp_path), {"max_bytes": 600, "cute_items": 0})
    old_uri = evaluation.evaluate_model.fn(*args)[0]
    assert json.loads(Path(old_uri).read_text())["scorer"] == E.scorer_digest()

    monkeypatch.setattr(E, "scorer_digest", lambda: "0123456789abcdef")  # as if the code changed
    new_uri = evaluation.evaluate_model.fn(*args)[0]
    assert Path(new_uri).parent != Path(old_uri).parent and Path(old_uri).exists()
    assert json.loads(Path(new_uri).read_text())["scorer"] == "0123456789abcdef"
    # Prefect's cache key has the same part, so a cached task result is not returned either
    (key_part,) = [
        p for p in evaluation.evaluate_model.cache_policy.policies if isinstance(p, CacheKeyFnPolicy)
    ]
    assert key_part.compute_key(None, {}, {}) == "0123456789abcdef"
