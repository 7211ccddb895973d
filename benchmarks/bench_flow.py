"""Flow overhead: the byteify flow vs the same steps called from one plain script (tiny preset).

Both do the same work on fresh folders: prepare a small corpus, Stage 1 and Stage 2
(`accelerate launch -m bolmo_core.train`, as the task does), evaluate, export with the
parity check, register in MLflow. The flow adds Prefect (task runs, result persistence,
artifacts, progress stream parsing) and MLflow runs with per-stage metrics; the script
calls the functions directly. Prefect's temporary API is started before timing (a server
is a one-off cost, not per-run overhead); its start-up time is printed separately.

    .venv/bin/python benchmarks/bench_flow.py [--steps 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _corpus(path: Path, chars: int) -> str:
    from bolmo_core.source import tiny_corpus

    with open(path, "w") as f:
        for text in tiny_corpus(chars):
            f.write(json.dumps({"text": text}) + "\n")
    return str(path)


def plain(work: Path, corpus: str, steps: int, tracking_uri: str) -> dict:
    """The same steps as the flow, in order, without Prefect."""
    from bolmo_core import checkpoint as ckpt
    from bolmo_core.config import get_preset
    from bolmo_core.data import prepare_dataset, read_manifest
    from tasks import registry
    from tasks.evaluation import run_evaluation
    from tasks.export import export_model
    from tasks.training import launch_command

    preset = get_preset("tiny", {"stage1.steps": steps, "stage2.steps": steps})
    manifest = prepare_dataset([corpus], preset.model.source, str(work / "data"), preset.data)
    mhash = read_manifest(manifest)["manifest_hash"]
    init = None
    for stage in (1, 2):
        out = str(work / f"stage{stage}")
        conf = work / f"stage{stage}.json"
        conf.write_text(
            json.dumps(
                {
                    "preset": preset.to_dict(),
                    "stage": stage,
                    "manifest_uri": manifest,
                    "out_uri": out,
                    "init_from": init,
                }
            )
        )
        subprocess.run(launch_command(str(conf), 1), check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        init = ckpt.final_checkpoint(out)
    h2 = ckpt.checkpoint_hash(init)
    run_evaluation(init, manifest, str(work / "eval"), max_bytes=3000)
    export_uri, export_hash = export_model.fn(init, h2, str(work))
    registry.register_model.fn(
        tracking_uri,
        "bench-plain",
        export_uri,
        {"manifest_hash": mhash, "stage2_checkpoint_hash": h2, "export_hash": export_hash},
    )
    return {"stage2_hash": h2}


def flow(work: Path, corpus: str, steps: int, tracking_uri: str) -> dict:
    from flows.byteify import Evaluation, Tracking, byteify

    out = byteify(
        preset="tiny",
        data_sources=[corpus],
        storage_root=str(work),
        overrides={"stage1.steps": steps, "stage2.steps": steps},
        evaluation=Evaluation(max_bytes=3000),
        tracking=Tracking(tracking_uri=tracking_uri, experiment="bench", model_name="bench-flow"),
    )
    return {"stage2_hash": out["stage2_hash"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2, help="steps per stage")
    ap.add_argument("--chars", type=int, default=60_000, help="corpus size (characters)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-flow-"))
    os.environ.update(
        {
            "PREFECT_HOME": str(tmp / "prefect"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_LOCAL_STORAGE_PATH": str(tmp / "results"),
            "HF_HUB_OFFLINE": "1",
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
            "PREFECT_LOGGING_LEVEL": "WARNING",
        }
    )
    corpus = _corpus(tmp / "corpus.jsonl", args.chars)
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    from prefect.testing.utilities import prefect_test_harness

    from tasks import tracking

    t = time.time()
    tracking.client(uri).search_experiments()  # create the MLflow tables once, outside both timings
    with prefect_test_harness(server_startup_timeout=180):
        api_s = time.time() - t
        t = time.time()
        a = plain(tmp / "plain", corpus, args.steps, uri)
        plain_s = time.time() - t
        t = time.time()
        b = flow(tmp / "flow", corpus, args.steps, uri)
        flow_s = time.time() - t
    same = a["stage2_hash"] == b["stage2_hash"]
    print(
        f"tiny preset, {args.steps} steps per stage, {args.chars} chars of text; Prefect API start-up "
        f"(not counted) {api_s:.1f} s"
    )
    print(f"{'what':<44}{'wall s':>10}{'ratio':>8}")
    print(f"{'plain script (same steps, no Prefect)':<44}{plain_s:>10.1f}{1.0:>8.2f}")
    print(f"{'byteify flow (Prefect + MLflow tracking)':<44}{flow_s:>10.1f}{flow_s / plain_s:>8.2f}")
    print(f"same Stage-2 weights: {same}  (goal: ratio <= 1.10)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
