"""Log a trainer's progress stream (BYTEIFY_PROGRESS lines) into MLflow, and plot its curves from MLflow.

For runs launched by hand (`python -m bolmo_core.train ... > log.txt`) rather than by the flow,
whose MLflow callback logs live: one MLflow run per stage found in the log, every step and eval
metric with its step, the stage's start info as params. The plot reads the metric history back
from MLflow, so the figure shows what the tracking store holds.

    .venv/bin/python scripts/progress_to_mlflow.py var/fid60/log.txt \
        --tracking-uri sqlite:///var/fid60/mlflow.db --experiment fidelity-smollm2 \
        --png docs/img/fidelity_smollm2.png
"""

from __future__ import annotations

import argparse
import json
import sys

from bolmo_core.callbacks import PROGRESS_PREFIX as PREFIX  # the trainer's progress stream

PLOTTED = (
    ("loss_ce", "train CE (nats/byte)"),
    ("loss_encoder", "train encoder L2"),
    ("val_bpb", "val byte bpb"),
    ("val_boundary_acc", "val boundary accuracy"),
)


def read_stages(path: str) -> list[dict]:
    """[{info, steps: [(step, t, metrics)], evals: [...]}] per "start" event, in order."""
    stages: list[dict] = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.startswith(PREFIX):
                continue
            ev = json.loads(line[len(PREFIX) :])
            if ev["event"] == "start":
                stages.append({"info": ev.get("info", {}), "steps": [], "evals": []})
            elif ev["event"] in ("step", "eval") and stages:
                stages[-1][ev["event"] + "s"].append((int(ev["step"]), float(ev["time"]), ev["metrics"]))
    if not stages:
        raise SystemExit(f"{path}: no BYTEIFY_PROGRESS start event found")
    return stages


def log_stages(stages: list[dict], tracking_uri: str, experiment: str, run_prefix: str = "") -> list[str]:
    """One MLflow run per stage, named `<run_prefix>stage<N>`; returns the run ids."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
    run_ids = []
    for st in stages:
        info = st["info"]
        run = client.create_run(exp_id, run_name=f"{run_prefix}stage{info.get('stage', '?')}")
        params = [Param(k, str(v)[:500]) for k, v in info.items() if not isinstance(v, dict | list)]
        metrics = [
            Metric(k, float(v), int(t * 1000), step)
            for step, t, m in st["steps"] + st["evals"]
            for k, v in m.items()
            if isinstance(v, int | float) and v == v
        ]
        for i in range(0, len(metrics), 1000):  # MLflow's batch limit
            client.log_batch(run.info.run_id, metrics=metrics[i : i + 1000], params=params if i == 0 else [])
        client.set_terminated(run.info.run_id)
        run_ids.append(run.info.run_id)
    return run_ids


def plot(tracking_uri: str, run_ids: list[str], png: str) -> None:
    """Curves of PLOTTED, read back from MLflow; stages laid end to end on one step axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    fig, axes = plt.subplots(1, len(PLOTTED), figsize=(4 * len(PLOTTED), 3.2))
    offset = 0
    for n, rid in enumerate(run_ids):
        last = 0
        for ax, (key, title) in zip(axes, PLOTTED):
            hist = sorted((m.step, m.value) for m in client.get_metric_history(rid, key))
            if hist:
                xs, ys = zip(*hist)
                ax.plot(
                    [x + offset for x in xs],
                    ys,
                    marker="o" if key.startswith("val") else None,
                    markersize=3,
                    linewidth=1,
                    label=f"stage {n + 1}",
                )
                last = max(last, xs[-1])
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("step (stages end to end)", fontsize=8)
        offset += last
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("log")
    ap.add_argument("--tracking-uri", required=True)
    ap.add_argument("--experiment", default="fidelity")
    ap.add_argument("--png", default=None)
    args = ap.parse_args(argv)
    run_ids = log_stages(read_stages(args.log), args.tracking_uri, args.experiment)
    print(json.dumps({"tracking_uri": args.tracking_uri, "experiment": args.experiment, "runs": run_ids}))
    if args.png:
        plot(args.tracking_uri, run_ids, args.png)


if __name__ == "__main__":
    main(sys.argv[1:])
