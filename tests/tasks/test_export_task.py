"""The export task on a real tiny checkpoint: HF folder, parity marker, progress, reuse."""

from __future__ import annotations

from pathlib import Path

import pytest
from task_helpers import make_checkpoint

from tasks import export


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> tuple[str, str]:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"))


def test_export_task_checks_parity_shows_progress_and_reuses_the_folder(
    prefect_api, tiny_checkpoint, tmp_path
):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    ckpt_uri, ckpt_hash = tiny_checkpoint
    out, digest = export.export_model.fn(ckpt_uri, ckpt_hash, str(tmp_path))
    assert (Path(out) / "config.json").exists() and (Path(out) / export.PARITY).exists()
    assert digest == export.folder_hash(out)
    with get_client(sync_client=True) as client:
        bars = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["export-progress"]))
        )
    assert len(bars) == 1 and float(bars[0].data) == 100.0
    assert (
        bars[0].description.startswith("Export: done in ")
        and f"parity passed, sha256 {digest[:12]}" in bars[0].description
    )
    assert export.export_model.fn(ckpt_uri, ckpt_hash, str(tmp_path)) == (out, digest)
