"""Issue 13's experiment: score every arm's checkpoints on the whole validation split, log the
arms to MLflow and draw the one comparison figure (docs/results.md, "Stage-1 losses side by side").

The arms are trained by scripts/arms13.sh (one arm, one stage, a CPU-minute box each). Then:

    .venv/bin/python scripts/arms13.py eval var/x13/a/stage1/step-000500 var/x13/a/stage1/final ...
    .venv/bin/python scripts/arms13.py report var/x13 --tracking-uri sqlite:///var/x13/mlflow.db \
        --experiment issue13-arms --png docs/img/issue13_arms.png

`eval` writes one JSON per checkpoint under <root>/eval/ (skipped when it exists): the
checkpoint's whole-split metrics (`bolmo_core.evaluate.split_metrics`, causal bpb headline) and
the compute it stands for, the rank-0 CPU seconds from its trainer_state.json, Stage 2 counted
on top of the Stage-1 checkpoint it started from. `report` logs each arm's trainer log as one
MLflow run per stage (scripts/progress_to_mlflow.py) plus the whole-split figures as `split_*`
metrics at their checkpoint's step, reads them back from MLflow for the figure, and prints the
markdown table.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from progress_to_mlflow import log_stages, read_stages  # noqa: E402

ARMS = {  # what scripts/arms13.sh sets on top of the smollm2-135m preset, in words
    "a": "paper losses (L2 + CE + binarised KL + BCE)",
    "b": "+ byte-level targets (byte_kl=1)",
    "c": "byte-level targets instead of the binarised KL (byte_kl=1, distill=0)",
    "d": "c + wider predictor input (boundary_context=4)",
    "e": "d recipe, the 60 CPU-minute budget (Stage 1 40 + Stage 2 20)",
}
KEYS = (  # whole-split metrics logged to MLflow and tabled
    "val_bpb",
    "val_bpb_lookahead",
    "val_source_bpb",
    "val_bpb_ratio",
    "val_boundary_acc",
    "val_boundary_acc_causal",
    "val_bytes_per_patch_pred",
    "val_bytes_per_patch_causal",
    "val_causal_passes",
)


def _state(ckpt: str) -> dict:
    return json.loads((Path(ckpt) / "trainer_state.json").read_text())


def _where(ckpt: str) -> tuple[str, int]:
    """(arm, stage) from <root>/<arm>/stage<N>/<checkpoint>."""
    p = Path(ckpt).resolve()
    return p.parent.parent.name, int(p.parent.name.removeprefix("stage"))


def _stage1_cpu_s(ckpt: str) -> float:
    """CPU seconds of the Stage-1 checkpoint a Stage-2 run started from (its config's init_from)."""
    cfg = json.loads((Path(ckpt) / "config.json").read_text())
    init = cfg.get("init_from") or ""
    s1 = Path(init) if (Path(init) / "trainer_state.json").exists() else Path(init) / "final"
    return float(_state(str(s1))["cpu_s"])


def cmd_eval(args) -> None:
    from bolmo_core.evaluate import split_metrics

    for ckpt in args.checkpoints:
        arm, stage = _where(ckpt)
        st = _state(ckpt)
        out = (
            Path(args.out or Path(ckpt).resolve().parents[2] / "eval")
            / f"{arm}-s{stage}-{st['step']:05d}.json"
        )
        if out.exists():
            print(f"{out}: exists, skipped")
            continue
        manifest = args.manifest or str(Path(ckpt).resolve().parents[2] / "data" / "manifest.json")
        c0, t0 = time.process_time(), time.time()
        metrics = split_metrics(ckpt, manifest)
        before = _stage1_cpu_s(ckpt) if stage == 2 else 0.0
        rec = {
            "arm": arm,
            "stage": stage,
            "step": st["step"],
            "checkpoint": str(Path(ckpt).resolve()),
            "stage_cpu_s": st["cpu_s"],
            "cpu_min": (before + st["cpu_s"]) / 60.0,  # the compute this checkpoint stands for
            "eval_cpu_s": time.process_time() - c0,
            "eval_wall_s": time.time() - t0,
            "metrics": metrics,
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(rec, indent=1, sort_keys=True) + "\n")
        print(f"{out}: bpb {metrics['val_bpb']:.3f} ratio {metrics['val_bpb_ratio']:.3f}", flush=True)


def load_evals(root: str) -> list[dict]:
    recs = [json.loads(Path(p).read_text()) for p in glob.glob(os.path.join(root, "eval", "*.json"))]
    return sorted(recs, key=lambda r: (r["arm"], r["cpu_min"]))


def log_arms(root: str, tracking_uri: str, experiment: str, evals: list[dict]) -> dict[str, list[str]]:
    """One MLflow run per stage per arm (trainer log + whole-split metrics); run ids per arm."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    client = MlflowClient(tracking_uri=tracking_uri)
    runs: dict[str, list[str]] = {}
    for arm in sorted(ARMS):
        log = os.path.join(root, arm, "log.txt")
        if not os.path.exists(log):
            continue
        ids = log_stages(read_stages(log), tracking_uri, experiment, run_prefix=f"{arm}/")
        for stage, rid in enumerate(ids, start=1):
            client.log_batch(rid, params=[Param("arm", arm), Param("arm_description", ARMS[arm])])
            now = int(time.time() * 1000)
            mets = [
                Metric(f"split_{k.removeprefix('val_')}", float(r["metrics"][k]), now, r["step"])
                for r in evals
                if r["arm"] == arm and r["stage"] == stage
                for k in KEYS
                if k in r["metrics"]
            ]
            mets += [
                Metric("split_cpu_minutes", r["cpu_min"], now, r["step"])
                for r in evals
                if r["arm"] == arm and r["stage"] == stage
            ]
            if mets:
                client.log_batch(rid, metrics=mets)
        runs[arm] = ids
    return runs


def plot(tracking_uri: str, runs: dict[str, list[str]], png: str) -> None:
    """Causal-bpb ratio and boundary accuracy against CPU minutes, every arm, read back from MLflow."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    fig, (ax_r, ax_b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, (arm, ids) in enumerate(sorted(runs.items())):
        pts = []
        for rid in ids:
            hist = {
                k: {m.step: m.value for m in client.get_metric_history(rid, k)}
                for k in (
                    "split_cpu_minutes",
                    "split_bpb_ratio",
                    "split_boundary_acc",
                    "split_boundary_acc_causal",
                )
            }
            pts += [
                (x, *(hist[k].get(s) for k in list(hist)[1:])) for s, x in hist["split_cpu_minutes"].items()
            ]
        if not pts:
            continue
        pts.sort()
        x = [p[0] for p in pts]
        color = f"C{i}"
        ax_r.plot(x, [p[1] for p in pts], "o-", color=color, label=f"{arm}: {ARMS[arm]}")
        ax_b.plot(x, [100 * p[2] for p in pts], "o-", color=color, label=f"{arm} predictor")
        ax_b.plot(x, [100 * p[3] for p in pts], "x--", color=color, label=f"{arm} causal flags")
    for y, ls in ((1.5, "-"), (1.2, ":")):
        ax_r.axhline(y, color="k", linewidth=0.8, linestyle=ls)
    for y, ls in ((98.5, "-"), (99.0, ":")):
        ax_b.axhline(y, color="k", linewidth=0.8, linestyle=ls)
    for ax in (ax_r, ax_b):
        ax.axvline(60, color="grey", linewidth=0.8)
        ax.set_xlabel("compute: rank-0 CPU minutes, Stage 1 + Stage 2 (one thread)", fontsize=8)
        ax.grid(alpha=0.3)
    ax_r.set_ylabel("causal bpb, byte model / source (same bytes)", fontsize=8)
    ax_b.set_ylabel("boundary accuracy vs subword ends (%)", fontsize=8)
    ax_r.set_title("whole validation split: bits-per-byte ratio (goal <= 1.5, moonshot <= 1.2)", fontsize=9)
    ax_b.set_title("boundary accuracy (goal >= 98.5 %, moonshot >= 99 %)", fontsize=9)
    ax_r.legend(fontsize=6.5)
    ax_b.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def table(evals: list[dict]) -> str:
    head = (
        "| arm | stage | step | CPU min | causal bpb | look-ahead bpb | source bpb | ratio (causal) "
        "| boundary acc, predictor | boundary acc, causal flags | bytes/patch predictor / causal | passes |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for r in evals:
        m = r["metrics"]
        rows.append(
            f"| {r['arm']} | {r['stage']} | {r['step']} | {r['cpu_min']:.1f} | {m['val_bpb']:.3f} "
            f"| {m['val_bpb_lookahead']:.3f} | {m['val_source_bpb']:.3f} | {m['val_bpb_ratio']:.3f} "
            f"| {100 * m['val_boundary_acc']:.2f} % | {100 * m['val_boundary_acc_causal']:.2f} % "
            f"| {m['val_bytes_per_patch_pred']:.2f} / {m['val_bytes_per_patch_causal']:.2f} "
            f"| {m['val_causal_passes']:.0f} |"
        )
    return head + "\n".join(rows)


def cmd_report(args) -> None:
    evals = load_evals(args.root)
    runs = log_arms(args.root, args.tracking_uri, args.experiment, evals)
    print(json.dumps({"tracking_uri": args.tracking_uri, "experiment": args.experiment, "runs": runs}))
    if args.png:
        plot(args.tracking_uri, runs, args.png)
    print(table(evals))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("eval", help="whole-split metrics of checkpoints, one JSON each")
    e.add_argument("checkpoints", nargs="+")
    e.add_argument("--manifest", default=None, help="default: <root>/data/manifest.json")
    e.add_argument("--out", default=None, help="default: <root>/eval")
    e.set_defaults(func=cmd_eval)
    r = sub.add_parser("report", help="MLflow runs, the figure and the table")
    r.add_argument("root")
    r.add_argument("--tracking-uri", required=True)
    r.add_argument("--experiment", default="issue13-arms")
    r.add_argument("--png", default=None)
    r.set_defaults(func=cmd_report)
    args = ap.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main(sys.argv[1:])
