"""Pure helpers the flow uses to name things: resolved preset, output URIs. No I/O here.

The flow may call these directly (they only compute strings and configs); everything
that touches storage, models or servers is a task.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from bolmo_core import storage
from bolmo_core.config import get_preset
from bolmo_core.source import SourceConfig

PROJECT_ROOT = str(Path(__file__).resolve().parent.parent)


def resolve(
    preset: str, source: dict[str, Any] | None = None, budget: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The preset with the source and budget applied, as plain data plus the typed pieces tasks take."""
    budget = budget or {}
    overrides: dict[str, Any] = dict(budget.get("overrides") or {})
    if budget.get("stage1_steps"):
        overrides["stage1.steps"] = budget["stage1_steps"]
    if budget.get("stage2_steps"):
        overrides["stage2.steps"] = budget["stage2_steps"]
    p = get_preset(preset, overrides)
    src = {k: v for k, v in (source or {}).items() if v}
    if src.get("name_or_path"):
        p.model.source = SourceConfig(
            name_or_path=src["name_or_path"], revision=src.get("revision"), gguf_file=src.get("gguf_file")
        )
    d = p.to_dict()
    return {
        "preset": d,
        "source": d["model"]["source"],
        "source_config": p.model.source,
        "data_config": p.data,
    }


def _key(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def data_out_uri(root: str, sources: list[str], cfg: dict[str, Any]) -> str:
    """One folder per (sources, tokenizer source, data config)."""
    return storage.join(root, "data", _key([sorted(sources), cfg["source"], cfg["preset"]["data"]]))


def plots_uri(root: str, checkpoint_hash: str) -> str:
    return storage.join(root, "plots", f"curves-{checkpoint_hash[:16]}.png")
