"""Generation speed side by side (bolmo_core/speed.py) on the tiny preset: what is measured and counted."""

import pytest
import torch

from bolmo_core.config import get_preset
from bolmo_core.model import BolmoModel
from bolmo_core.source import load_source_model, load_tokenizer, tiny_corpus
from bolmo_core.speed import SpeedConfig, measure

pytestmark = pytest.mark.usefixtures("one_thread")


def test_measure_interleaves_source_and_byte_models():
    p = get_preset("tiny")
    torch.manual_seed(0)
    models = {"a": BolmoModel.from_source(p.model).eval(), "b": BolmoModel.from_source(p.model).eval()}
    src, tok = load_source_model(p.model.source), load_tokenizer(p.model.source)
    prompts = [t.encode()[:60] for t in tiny_corpus(20_000)[:3]]
    r = measure(models, src, tok, prompts, SpeedConfig(batches=(1, 4), new_bytes=16, repeats=2))
    assert set(r) == {"source", "a", "b", "config"} and r["config"]["prompts"] == 3
    for name in ("a", "b"):
        for b in ("1", "4"):
            row = r[name][b]
            assert row["bytes"] == 16 * int(b) and row["runs"] == 2  # no early stop: every row full
            assert row["bytes_per_s"] > 0 and row["bytes_per_cpu_s"] > 0 and row["bytes_per_patch"] >= 1
    for b in ("1", "4"):
        assert r["source"][b]["bytes"] > 0 and 1 <= r["source"][b]["bytes_per_token"] < 16
    with pytest.raises(ValueError, match="no prompts"):
        measure(models, src, tok, [], SpeedConfig())
