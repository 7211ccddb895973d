"""`byteify eval` on a real checkpoint folder of the tiny preset; loader round trip; clear errors."""

import json

import pytest
import torch

from bolmo_core import checkpoint
from bolmo_core.cli import main
from bolmo_core.config import get_preset
from bolmo_core.load import LoadError, load_byte_model
from bolmo_core.model import BolmoModel
from bolmo_core.source import tiny_corpus


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A committed Stage-1-style checkpoint written by the trainer's own save function."""
    preset = get_preset("tiny")
    torch.manual_seed(0)
    model = BolmoModel.from_source(preset.model).eval()
    with torch.no_grad():  # make the weights differ from a fresh init, so loading is observable
        model.lm_head.out.weight.mul_(3.0)
    out = str(tmp_path_factory.mktemp("stage1"))
    uri = checkpoint.save_checkpoint(
        out,
        checkpoint.step_name(10),
        rank=0,
        world_size=1,
        barrier=lambda: None,
        rank_state={},
        model_state=model.state_dict(),
        optimizer_state={},
        scheduler_state={},
        trainer_state={"step": 10},
        config={"preset": preset.to_dict(), "stage": 1},
    )
    return out, uri, model, preset


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("text") / "heldout.txt"
    f.write_bytes(tiny_corpus(20_000)[5].encode("utf-8")[:400].decode("utf-8", "ignore").encode("utf-8"))
    return f


def test_load_byte_model_round_trip(ckpt):
    out, uri, model, preset = ckpt
    loaded, p = load_byte_model(out)  # a stage folder resolves to its newest checkpoint
    assert p.to_dict() == preset.to_dict()
    ids = torch.tensor([[1] + [b + 4 for b in b"Hello, world."]])
    with torch.no_grad():
        a, b = model(ids, ids * 0).logits, loaded(ids, ids * 0).logits
    assert torch.equal(a, b)


def test_eval_prints_json_report(ckpt, text_file, tmp_path, capsys):
    out, uri, _, preset = ckpt
    md = tmp_path / "table.md"
    rc = main(
        [
            "eval",
            uri,
            "--text",
            str(text_file),
            "--cute-tasks",
            "contains_char",
            "--cute-items",
            "2",
            "--markdown",
            str(md),
        ]
    )
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["source_name"] == "tiny-olmo2"
    assert report["text"]["bytes"] == len(text_file.read_bytes())
    assert report["text"]["window_bytes"] == preset.data.byte_slots - 1
    assert report["source"]["bits_per_byte"] > 0 and report["byte_model"]["bits_per_byte"] > 0
    assert report["source"]["cute"]["contains_char"]["n"] == 2
    assert "bytes_per_patch" in report["byte_model"]
    assert md.read_text().startswith("| metric | source | byte model |")


def test_eval_errors_are_one_line(ckpt, text_file, tmp_path, capsys):
    out, _, _, _ = ckpt
    assert main(["eval", out, "--text", str(tmp_path / "nope.txt")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("byteify eval: error: --text") and "\n" not in err
    (tmp_path / "empty").mkdir()
    assert main(["eval", str(tmp_path / "empty"), "--text", str(text_file), "--cute-tasks", ""]) == 2
    err = capsys.readouterr().err.strip()
    assert "neither a committed checkpoint" in err and "\n" not in err
    with pytest.raises(LoadError):
        load_byte_model(str(tmp_path / "empty"))
    assert main(["eval", out, "--text", str(text_file), "--cute-tasks", "spelling"]) == 2
    assert "unknown" in capsys.readouterr().err
