"""Helpers for the task tests: a committed tiny checkpoint and a small prepared dataset.

Plain functions (not a conftest.py here: it would shadow tests/conftest.py for the tests
that import helpers from it).
"""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from functools import cache
from pathlib import Path


def make_checkpoint(folder: Path) -> tuple[str, str]:
    """(URI, weights hash) of a committed `final` checkpoint of the tiny preset's model (untrained)."""
    import torch
    from model_helpers import save_model

    from bolmo_core import checkpoint as ckpt
    from bolmo_core.config import get_preset
    from bolmo_core.model import BolmoModel

    preset = get_preset("tiny")
    torch.manual_seed(0)
    model = BolmoModel.from_source(preset.model)
    uri = save_model(folder / "stage2", ckpt.FINAL, model, preset, 2)
    return uri, ckpt.checkpoint_hash(uri)


def make_manifest(folder: Path) -> str:
    """A real prepared dataset (offline Wikipedia text, tiny-olmo2 tokenizer): its manifest URI."""
    from bolmo_core.config import get_preset
    from bolmo_core.data import prepare_dataset
    from bolmo_core.source import SourceConfig, tiny_corpus

    (folder / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in tiny_corpus(30_000)))
    data_cfg = get_preset("tiny", {"data.validation_fraction": 0.2}).data
    return prepare_dataset(
        [str(folder / "docs.jsonl")], SourceConfig("tiny-olmo2"), str(folder / "out"), data_cfg
    )


@cache
def mlflow_store() -> str:
    """One SQLite MLflow store for the test session (creating one costs seconds); tests use their own names in it."""
    folder = tempfile.mkdtemp(prefix="byteify-mlflow-test-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return f"sqlite:///{folder}/mlflow.db"
