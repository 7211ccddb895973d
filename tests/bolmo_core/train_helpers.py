"""Test helper for the trainer tests: a small real data manifest and tiny-preset run configs."""

import json
import os
from pathlib import Path

from bolmo_core.config import get_preset
from bolmo_core.data import prepare_dataset
from bolmo_core.source import SourceConfig, tiny_corpus

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
