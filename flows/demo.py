"""`make demo`: the whole byteify flow in-process on SmolLM2-135M with a CPU-sized budget.

Embedded mode: Prefect's ephemeral API (its database under var/prefect), an MLflow SQLite
store under var/mlflow, data and checkpoints under var/runs. Prints the evaluation table,
the registered model and how to open both UIs, and writes a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VAR = Path(os.environ.get("BYTEIFY_VAR", ROOT / "var"))


def _embedded_env() -> None:
    """Settings for the embedded run; set before Prefect is imported so they take effect."""
    defaults = {
        "PREFECT_HOME": str(VAR / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",  # its telemetry call hangs without internet
        "PREFECT_LOCAL_STORAGE_PATH": str(VAR / "prefect" / "results"),
        "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",  # a busy 2-core box needs more than 20 s
        "PREFECT_LOGGING_LEVEL": "INFO",
        "MLFLOW_TRACKING_URI": f"sqlite:///{VAR / 'mlflow' / 'mlflow.db'}",
        "BYTEIFY_STORAGE_ROOT": str(VAR / "runs"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    for k, v in defaults.items():
        os.environ.setdefault(k, v)
    (VAR / "mlflow").mkdir(parents=True, exist_ok=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flows.demo", description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="smollm2-135m")
    ap.add_argument("--stage1-steps", type=int, default=60)
    ap.add_argument("--stage2-steps", type=int, default=20)
    ap.add_argument("--max-minutes", type=float, default=6.0, help="per-stage training budget")
    ap.add_argument("--eval-bytes", type=int, default=8000)
    ap.add_argument("--cute-items", type=int, default=5)
    ap.add_argument("--summary", default=str(VAR / "demo" / "summary.json"))
    args = ap.parse_args(argv)
    _embedded_env()
    t0 = time.time()

    from flows.byteify import Compute, Evaluation, Tracking, byteify

    out = byteify(
        preset=args.preset,
        overrides={"stage1.steps": args.stage1_steps, "stage2.steps": args.stage2_steps},
        compute=Compute(max_minutes=args.max_minutes),
        evaluation=Evaluation(
            max_bytes=args.eval_bytes,
            cute_items=args.cute_items,
            precision="fp32",  # bf16 is far slower than fp32 on CPUs without native bf16
        ),
        tracking=Tracking(experiment="byteify-demo", model_name=f"byteify-{args.preset}"),
    )
    wall = time.time() - t0
    path = Path(args.summary)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_summary(out, wall), indent=1, sort_keys=True) + "\n")
    _print_result(out, wall, path)
    return 0


def _summary(out: dict, wall: float) -> dict:
    """The demo's JSON summary: where the model, its data and its tracking ended up."""
    keys = ["model_name", "version", "model_uri", "alias_uri", "metrics", "tracking_uri", "mlflow_run_id"]
    keys += ["stage1_checkpoint", "stage2_checkpoint", "manifest_uri", "report_uri", "flow_run_id"]
    return {**{k: out[k] for k in keys}, "export_folder": out["export_uri"], "wall_seconds": round(wall, 1)}


def _print_result(out: dict, wall: float, summary_path: Path) -> None:
    """The evaluation table, the registered model and how to open both UIs on it."""
    db = os.environ["MLFLOW_TRACKING_URI"]
    print(f"\n== byteify demo finished in {wall:.0f} s ==\n")
    print(out["evaluation_table"])
    print(f"\nRegistered model: {out['model_uri']}  (alias: {out['alias_uri']})")
    print(f"Exported HF folder: {out['export_uri']}")
    print(f"Summary JSON: {summary_path}")
    print("\nOpen the UIs (each in its own terminal, from this folder):")
    print(
        f"  Prefect: PREFECT_HOME={os.environ['PREFECT_HOME']} PREFECT_SERVER_ANALYTICS_ENABLED=false "
        ".venv/bin/prefect server start   -> http://127.0.0.1:4200"
    )
    print(f"  MLflow:  .venv/bin/mlflow ui --backend-store-uri {db} --port 5000   -> http://127.0.0.1:5000")
    print(f"  then this run: {out['mlflow_run_url']}")
    print(
        f"\nLoad it: mlflow.pyfunc.load_model('{out['alias_uri']}').predict(['Hello'])  "
        f"(with MLFLOW_TRACKING_URI={db})"
    )


if __name__ == "__main__":
    sys.exit(main())
