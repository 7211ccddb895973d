"""What the Prefect UI shows: progress artifacts updated in place, the evaluation table and its
metric names, the curves and the predicted-patches image (real Prefect test API)."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from tasks import artifacts


def _artifacts(key: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))


def test_duration_reads_like_a_person_would_say_it():
    assert [artifacts.duration(s) for s in (4.6, 65, 3 * 3600 + 20 * 60 + 5)] == [
        "5 s",
        "1 min 5 s",
        "3 h 20 min",
    ]


def test_progress_is_one_artifact_updated_in_place_with_text_and_eta(prefect_api):
    from prefect import task

    @task
    def long_step():
        bar = artifacts.Progress("test-progress", "Stage 9 training", min_interval_s=0)
        bar.update(10, 40, "step 10/40 · loss 3.2")  # resumed at step 10: the ETA starts from here
        seen = []
        for step in (20, 30):
            bar.update(step, 40, f"step {step}/40")
            seen.append(_artifacts("test-progress")[0].description)
        bar.finish("40 steps")
        return seen

    seen = long_step()
    arts = _artifacts("test-progress")
    assert len(arts) == 1  # updated in place, not one artifact per update
    assert float(arts[0].data) == 100.0
    assert arts[0].description.startswith("Stage 9 training: done in ") and arts[0].description.endswith(
        "40 steps"
    )
    assert seen[0].startswith("Stage 9 training: step 20/40 · ETA ") and seen[0].endswith(" s")


REPORT = {
    "source": {
        "bits_per_byte": 1.5,
        "bytes_per_token": 4.1,
        "cute": {"spell": {"accuracy": 0.5}},
        "cute_mean": 0.5,
    },
    "byte_model": {
        "bits_per_byte": 1.75,
        "bytes_per_patch": 4.3,
        "boundary": {"accuracy": 0.97, "precision": 0.9, "recall": 0.8},
        "cute": {"spell": {"accuracy": 0.75}},
        "cute_mean": 0.75,
    },
    "cute": {"tasks": ["spell"]},
}


def test_eval_metric_names_are_snake_case_and_say_what_they_are():
    assert artifacts.eval_summary(REPORT) == {
        "source/bits_per_byte": 1.5,
        "byte_model/bits_per_byte": 1.75,
        "source/bytes_per_token": 4.1,
        "byte_model/bytes_per_patch": 4.3,
        "byte_model/boundary_accuracy": 0.97,
        "byte_model/boundary_precision": 0.9,
        "byte_model/boundary_recall": 0.8,
        "source/char_spell_accuracy": 0.5,
        "byte_model/char_spell_accuracy": 0.75,
        "source/char_mean_accuracy": 0.5,
        "byte_model/char_mean_accuracy": 0.75,
    }


def test_evaluation_table_artifact(prefect_api, tmp_path):
    path = tmp_path / "report.json"
    path.write_text(json.dumps(REPORT))
    markdown, metrics = artifacts.evaluation_table(str(path))
    assert (
        "| bits per byte | 1.5 | 1.75 |" in markdown
        and "| boundary accuracy (predictor) | — | 0.97 |" in markdown
    )
    assert metrics["byte_model/bytes_per_patch"] == 4.3
    rows = json.loads(_artifacts("evaluation")[0].data)
    assert rows[0] == {"metric": "bits per byte", "source": 1.5, "byte_model": 1.75}


def _curve(steps: int, **metrics) -> list[dict]:
    return [{"step": s, **{k: f(s) for k, f in metrics.items()}} for s in range(1, steps + 1)]


def test_curves_give_each_stage_its_own_rows_and_step_axis(prefect_api, tmp_path):
    s1 = _curve(60, loss=lambda s: 5 / s, boundary_acc=lambda s: 1 - 1 / s)
    s2 = _curve(20, loss=lambda s: 3 / s, boundary_acc=lambda s: 1 - 1 / s)
    one = Image.open(io.BytesIO(artifacts.plot_curves({"stage 1": s1})))
    both = Image.open(io.BytesIO(artifacts.plot_curves({"stage 1": s1, "stage 2": s2})))
    assert 900 <= one.width <= 1100 and both.width == one.width  # two panels a row, readable in the pane
    assert both.height == pytest.approx(2 * one.height, rel=0.05)  # stage 2 below stage 1, not over it
    for stage, curve in (("stage 1", s1), ("stage 2", s2)):
        (tmp_path / f"{stage}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in curve))
    out = artifacts.training_curves(
        {s: str(tmp_path / f"{s}.jsonl") for s in ("stage 1", "stage 2")}, str(tmp_path / "curves.png")
    )
    assert Image.open(out).size == both.size
    assert "data:image/png;base64," in _artifacts("training-curves")[0].data


def _colour_at(img: Image.Image, x: float, y: float) -> str:
    return "#{:02x}{:02x}{:02x}".format(*img.getpixel((int(x), int(y))))


def test_patches_image_colours_each_patch_and_each_token_beneath(prefect_api, tmp_path):
    sample = {"patches": ["The ", "cat", "\n"], "tokens": ["The", " cat", "\n"]}
    img = Image.open(io.BytesIO(artifacts.patches_png([sample])))
    cw = 15 * 0.602  # DejaVu Sans Mono's advance at 15 px
    top, low = 12 + 26 + 19, 12 + 26 + 21 + 15  # the bottom of each row's boxes: below the glyphs

    def cell(i: int) -> float:
        return 12 + (i + 0.5) * cw  # the middle of character i's box

    p0, p1 = artifacts.PATCH_COLOURS
    t0, t1 = artifacts.TOKEN_COLOURS
    assert [_colour_at(img, cell(i), top) for i in (0, 3, 4, 6, 7)] == [
        p0,
        p0,
        p1,
        p1,
        p0,
    ]  # 'The ', 'cat', '⏎'
    assert [_colour_at(img, cell(i), low) for i in (0, 2, 3, 6, 7)] == [
        t0,
        t0,
        t1,
        t1,
        t0,
    ]  # 'The', ' cat', '⏎'
    (tmp_path / "samples.json").write_text(json.dumps([sample]))
    artifacts.boundary_view(str(tmp_path / "samples.json"))
    assert "data:image/png;base64," in _artifacts("boundaries")[0].data


def test_manifest_summary_artifact(prefect_api, tmp_path):
    m = {
        "manifest_hash": "h" * 64,
        "splits": {"train": {"rows": 90, "bytes": 9000}, "validation": {"rows": 10, "bytes": 1000}},
        "shards": [
            {"uri": "train-00000.parquet", "split": "train", "rows": 90, "bytes": 9000, "tokens": 2000}
        ],
    }
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    artifacts.manifest_summary(str(tmp_path / "manifest.json"))
    md = _artifacts("data-manifest")[0].data
    assert "| train | 9000 | 90 |" in md and "1 shard file(s)" in md
