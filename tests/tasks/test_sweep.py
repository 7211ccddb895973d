"""The sweep's result: Pareto front, rows, table and plot from measured numbers; the source's ratio."""

import pytest

from tasks.sweep import bytes_per_token, pareto_front, pareto_png, sweep_rows, to_markdown


def test_pareto_front():
    # (bytes/s, bpb): faster is better, lower bpb is better
    pts = [(10.0, 2.0), (20.0, 2.5), (15.0, 3.0), (5.0, 1.5), (20.0, 2.5)]
    assert pareto_front(pts) == [True, True, False, True, True]  # ties dominate neither
    assert pareto_front([(1.0, 1.0)]) == [True]


def _speed():
    rates = lambda s, bpp: {"bytes_per_s": s, "bytes_per_cpu_s": 2 * s, "bytes_per_patch": bpp}  # noqa: E731
    return {
        "source": {
            "1": {"bytes_per_s": 50.0, "bytes_per_cpu_s": 55.0, "bytes_per_token": 4.4},
            "8": {"bytes_per_s": 160.0, "bytes_per_cpu_s": 170.0},
        },
        "1x": {"1": rates(30.0, 4.5), "8": rates(90.0, 4.5)},
        "1.5x": {"1": rates(42.0, 6.6), "8": rates(120.0, 6.6)},
        "config": {"batches": [1, 8]},
    }


def test_rows_table_and_plot():
    points = [
        {
            "name": "1x",
            "stage1": "shared",
            "overrides": {"stage2.target_bytes_per_patch": None},
            "target": None,
            "bytes_per_patch": 4.4,
            "bits_per_byte": 1.9,
            "source_bpb": 1.0,
            "model_uri": "models:/m/1",
        },
        {
            "name": "1.5x",
            "stage1": "shared",
            "overrides": {"stage2.target_bytes_per_patch": 6.6},
            "target": 6.6,
            "bytes_per_patch": 6.4,
            "bits_per_byte": 2.1,
            "source_bpb": 1.0,
            "model_uri": "models:/m/2",
        },
    ]
    rows = sweep_rows(points, _speed())
    assert [r["point"] for r in rows] == ["source", "1x", "1.5x"]
    assert rows[0]["bits_per_byte"] == 1.0 and rows[0]["bytes_per_patch"] == 4.4
    assert rows[2]["speed_vs_source_b1"] == pytest.approx(42 / 50)
    # the source is faster and better than both: the only point on the front
    assert [r["pareto_b1"] for r in rows] == [True, False, False]
    md = to_markdown(rows, ["1", "8"])
    assert md.splitlines()[0].startswith("| point | Stage 1 | changes |") and "`models:/m/2`" in md
    assert "| 1.5x | shared | stage2.target_bytes_per_patch=6.6 | 6.60 | 6.40 | 2.100 | 42.0 | 0.84 |" in md
    assert pareto_png(rows, ["1", "8"], "t")[:4] == b"\x89PNG"
    cpu = sweep_rows(points, _speed(), clock="cpu")  # per CPU second both points are faster than the source
    assert cpu[2]["bytes_per_s_b1"] == 84.0 and [r["pareto_b1"] for r in cpu] == [True, True, True]


def test_bytes_per_token_from_manifest():
    assert bytes_per_token({"splits": {"train": {"bytes": 440, "tokens": 100}}}) == 4.4
    shards = [
        {"split": "train", "bytes": 300, "tokens": 100},
        {"split": "validation", "bytes": 9, "tokens": 1},
    ]
    assert bytes_per_token({"shards": shards}) == 3.0
    with pytest.raises(ValueError, match="no training tokens"):
        bytes_per_token({"shards": []})
