"""The byteify-transfer flow on a tiny base/instruct pair: transfer + export + parity, evaluation next
to the instruct model, one registered version with base/instruct/alpha tags; a re-run reuses it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bolmo_core"))
from transfer_pair import make_pair  # noqa: E402

pytestmark = pytest.mark.slow


def test_transfer_flow(tmp_path, prefect_api):
    import torch
    from mlflow import MlflowClient
    from safetensors.torch import load_file

    from bolmo_core.config import get_preset
    from bolmo_core.export import export_model
    from bolmo_core.model import BolmoModel
    from bolmo_core.source import tiny_corpus
    from flows.byteify import Evaluation, Tracking
    from flows.transfer import byteify_transfer

    base, instruct, _ = make_pair(tmp_path / "pair")
    preset = get_preset("tiny", {"model.source.name_or_path": base})
    torch.manual_seed(0)
    byte_dir = export_model(BolmoModel.from_source(preset.model), tmp_path / "byte", preset=preset)
    text = tmp_path / "heldout.txt"
    text.write_text(" ".join(tiny_corpus(5000)), encoding="utf-8")
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    kw = dict(
        byte_model=str(byte_dir),
        base=base,
        instruct=instruct,
        text=str(text),
        storage_root=str(tmp_path / "runs"),
        evaluation=Evaluation(max_bytes=1500),
        tracking=Tracking(tracking_uri=store, experiment="transfer-test", model_name="instructed"),
    )
    out = byteify_transfer(**kw)
    weights = load_file(str(Path(out["export_uri"]) / "model.safetensors"))
    instr = load_file(f"{instruct}/model.safetensors")
    assert torch.equal(
        weights["global_model.model.layers.0.mlp.up_proj.weight"], instr["model.layers.0.mlp.up_proj.weight"]
    )
    meta = json.loads((Path(out["export_uri"]) / "transfer.json").read_text())
    assert meta["parity"]["passed"] and meta["tensors"] > 0
    assert out["metrics"]["byte_model/bits_per_byte"] > 0 and out["metrics"]["source/bits_per_byte"] > 0
    (v,) = MlflowClient(store).search_model_versions("name = 'instructed'")
    assert v.tags["byteify.instruct"] == instruct and v.tags["byteify.alpha"] == "1.0"
    again = byteify_transfer(**kw)
    assert again["model_uri"] == out["model_uri"] and again["export_hash"] == out["export_hash"]
