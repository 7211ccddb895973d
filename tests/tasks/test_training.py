"""The training task's display: trainer events -> one progress artifact with step, loss, ETA."""

from __future__ import annotations

import logging


def test_stage_progress_follows_the_trainer_events(prefect_api):
    from prefect import task
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from tasks.training import _StageProgress

    def bar():
        with get_client(sync_client=True) as client:
            arts = client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["stage-7-progress"]))
            )
        assert len(arts) == 1  # one artifact, updated in place
        return float(arts[0].data), arts[0].description

    @task
    def stage():
        curve: list[dict] = []
        p = _StageProgress(7, curve, logging.getLogger("test"))
        p.bar.min_interval_s = 0
        seen = []
        p.event({"event": "start", "step": 2, "total": 10})
        seen.append(bar())
        for step in range(3, 11):
            p.event(
                {
                    "event": "step",
                    "step": step,
                    "total": 10,
                    "metrics": {"loss": 1.0 / step, "step_time_s": 0.25},
                }
            )
        seen.append(bar())
        p.event({"event": "eval", "step": 10, "metrics": {"val_bpb": 2.5}})
        p.event({"event": "end", "step": 10, "metrics": {"val_bpb": 2.5}})
        seen.append(bar())
        return curve, seen

    curve, seen = stage()
    assert seen[0] == (20.0, "Stage 7 training: step 2/10 (resumed)")
    assert seen[1][0] == 100.0 and seen[1][1].startswith(
        "Stage 7 training: step 10/10 · loss 0.1000 · 0.25 s/step · ETA "
    )
    assert seen[2][0] == 100.0
    assert seen[2][1].startswith("Stage 7 training: done in ")
    assert seen[2][1].endswith("10 steps · last loss 0.1000 · validation 2.500 bits per byte")
    assert [r["step"] for r in curve] == [*range(3, 11), 10] and curve[-1] == {
        "step": 10,
        "eval/val_bpb": 2.5,
    }
