"""scripts/progress_to_mlflow.py: a trainer progress stream lands in a real MLflow store, one run per stage."""

import importlib.util
import io
from pathlib import Path

import pytest

from bolmo_core.callbacks import ProgressStreamCallback

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "progress_to_mlflow.py"


def _load():
    spec = importlib.util.spec_from_file_location("progress_to_mlflow", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_stages_and_metrics_round_trip(tmp_path):
    buf = io.StringIO()
    cb = ProgressStreamCallback(buf)
    for stage, n in ((1, 5), (2, 3)):
        cb.on_train_start(0, n, {"stage": stage, "out_uri": f"out/stage{stage}"})
        for s in range(1, n + 1):
            cb.on_step_end(s, {"loss_ce": 3.0 / s, "boundary_acc": 0.9})
        cb.on_eval(n, {"val_bpb": 2.0 + stage, "val_boundary_acc": 0.97})
    log = tmp_path / "log.txt"
    log.write_text("unrelated line\n" + buf.getvalue())

    mod = _load()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mod.main([str(log), "--tracking-uri", uri, "--experiment", "t", "--png", str(tmp_path / "c.png")])

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs(
        [client.get_experiment_by_name("t").experiment_id], order_by=["attributes.start_time"]
    )
    assert sorted(r.data.params["stage"] for r in runs) == ["1", "2"]
    by_stage = {r.data.params["stage"]: r.info.run_id for r in runs}
    ce = sorted((m.step, m.value) for m in client.get_metric_history(by_stage["1"], "loss_ce"))
    assert ce == [(s, pytest.approx(3.0 / s)) for s in range(1, 6)]
    assert [m.value for m in client.get_metric_history(by_stage["2"], "val_bpb")] == [4.0]
    assert (tmp_path / "c.png").stat().st_size > 1000


def test_log_without_progress_is_refused(tmp_path):
    log = tmp_path / "log.txt"
    log.write_text("nothing here\n")
    with pytest.raises(SystemExit, match="no BYTEIFY_PROGRESS start event"):
        _load().read_stages(str(log))
