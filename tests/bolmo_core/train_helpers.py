"""Test helper for the trainer tests: a small real data manifest and tiny-preset run configs."""

import json
import os
import subprocess
import sys
from pathlib import Path

from bolmo_core.config import get_preset
from bolmo_core.data import prepare_dataset
from bolmo_core.source import SourceConfig, tiny_corpus

REPO = Path(__file__).resolve().parents[2]

# Tiny preset shrunk so a step takes well under a second: 16-token windows (96 byte slots).
OVERRIDES = {
    "data.window_tokens": 16,
    "data.validation_fraction": 0.1,
    "stage1.steps": 6,
    "stage1.global_batch": 2,
    "stage1.micro_batch": 1,
    "stage1.checkpoint_every": 2,
    "stage1.eval_every": 0,
    "stage1.eval_batches": 1,
    "stage1.keep_last": 2,
    "stage2.steps": 4,
    "stage2.global_batch": 2,
    "stage2.micro_batch": 1,
    "stage2.checkpoint_every": 2,
    "stage2.eval_every": 0,
    "stage2.eval_batches": 1,
}


def make_manifest(folder: Path, chars: int = 30_000, out: Path | None = None) -> str:
    """Real Wikipedia text (the offline extracts) labelled with the tiny-olmo2 tokenizer."""
    folder.mkdir(parents=True, exist_ok=True)
    docs = folder / "docs.jsonl"
    text = "".join(json.dumps({"text": d}) + "\n" for d in tiny_corpus(chars))
    if not docs.exists() or docs.read_text() != text:  # the same bytes (and mtime) when already there
        tmp = docs.with_name(f".docs-{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, docs)
    p = get_preset("tiny", OVERRIDES)
    return prepare_dataset([str(docs)], SourceConfig("tiny-olmo2"), str(out or folder / "data"), p.data)


def run_config(manifest: str, out: str, stage: int = 1, overrides: dict | None = None, **kw) -> dict:
    preset = get_preset("tiny", {**OVERRIDES, **(overrides or {})})
    return {
        "preset": preset.to_dict(),
        "stage": stage,
        "manifest_uri": manifest,
        "out_uri": out,
        "deterministic": True,
        **kw,
    }


def write_config(path: Path, cfg: dict) -> str:
    path.write_text(json.dumps(cfg))
    return str(path)


def launch(config_file: str, nproc: int = 1, launcher: str = "torchrun", **popen_kw) -> subprocess.Popen:
    """Start the trainer as its own process group (so a kill takes every rank down, like a dead machine)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    bin_dir = Path(sys.executable).parent
    if nproc == 1:
        cmd = [sys.executable, "-m", "bolmo_core.train", "--config", config_file]
    elif launcher == "torchrun":
        cmd = [
            str(bin_dir / "torchrun"),
            "--standalone",
            "--nproc_per_node",
            str(nproc),
            "-m",
            "bolmo_core.train",
            "--config",
            config_file,
        ]
    else:
        from conftest import free_port

        cmd = [
            str(bin_dir / "accelerate"),
            "launch",
            "--config_file",
            str(REPO / "deployments/accelerate/cpu_2proc.yaml"),
            "--num_processes",
            str(nproc),
            "--main_process_port",
            str(free_port()),
            "-m",
            "bolmo_core.train",
            "--config",
            config_file,
        ]
    return subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        **popen_kw,
    )
