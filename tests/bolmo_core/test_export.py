"""HF export (docs/architecture.md §12) and its parity check, on the tiny preset and on real SmolLM2 blocks."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from bolmo_core.byte_tokenizer import FUSED_OFFSET
from bolmo_core.config import get_preset
from bolmo_core.export import ExportError, ParityError, check_parity, export_model, load_hf
from bolmo_core.generate import generate_ids
from bolmo_core.load import load_exported
from bolmo_core.model import BolmoModel

pytestmark = pytest.mark.usefixtures("one_thread")


def _build(name: str) -> BolmoModel:
    torch.manual_seed(0)
    m = BolmoModel.from_source(get_preset(name).model).eval()
    with torch.no_grad():  # open the input gates so the mLSTM states matter in the comparison
        for blk in [*m.local_encoder.blocks, *m.local_decoder.blocks]:
            blk.mlstm.i_gate.bias.fill_(0.0)
    return m


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    m = _build("tiny")
    out = export_model(m, tmp_path_factory.mktemp("exp") / "tiny", preset=get_preset("tiny"))
    return m, out


def test_tiny_export_parity_tokenizer_and_generate(tiny_export):
    from transformers import AutoTokenizer

    m, out = tiny_export
    names = {p.name for p in out.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer_config.json",
        "modeling_bolmo.py",
        "configuration_bolmo.py",
        "tokenization_bolmo.py",
    } <= names
    assert "bolmo_core" not in (out / "modeling_bolmo.py").read_text()
    cfg = json.loads((out / "config.json").read_text())
    assert (
        cfg["model_type"] == "bolmo"
        and cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_bolmo.BolmoForCausalLM"
    )
    assert cfg["rope_theta"] == 500000.0 and cfg["global_config"]["model_type"] == "olmo2"

    report = check_parity(out, m)
    assert report["passed"] and report["max_abs_diff"] < 1e-4 and report["prompts"] == 5

    tok = AutoTokenizer.from_pretrained(str(out), trust_remote_code=True)
    text = "Caf\u00e9 \U0001f600"
    ids = tok(text)["input_ids"]
    assert ids == [1, *(b + 4 for b in text.encode())]
    assert tok.decode(ids, skip_special_tokens=True) == text

    # the exported generate() is the same algorithm: greedy bytes equal bolmo_core.generate's
    hf = load_hf(out)
    prompts = ["Hello world, this is", "ab", ""]
    enc = tok(prompts, return_tensors="pt", padding=True)
    seqs = hf.generate(**enc, max_new_tokens=16, eos_token_id=None)[:, enc["input_ids"].shape[1] :]
    ours = generate_ids(m, prompts, max_new_bytes=16, stop_on_eos=False)
    assert seqs.tolist() == [[v % FUSED_OFFSET for v in row] for row in ours.fused_ids]


def test_load_exported_roundtrip(tiny_export):
    m, out = tiny_export
    back, preset = load_exported(out)
    assert preset.name == "tiny"
    ids = torch.tensor([[1, 76, 105, 112, 112, 115]])
    from bolmo_core.generate import retained_index

    with torch.no_grad():
        torch.testing.assert_close(
            back(ids, retained_index(m).expand(ids)).logits, m(ids, retained_index(m).expand(ids)).logits
        )


def test_parity_check_catches_a_bad_export(tiny_export, tmp_path):
    m, out = tiny_export
    with pytest.raises(ExportError, match="not empty"):
        export_model(m, out)
    bad = export_model(m, tmp_path / "bad")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["global_config"]["rope_parameters"]["rope_theta"] = 10000.0  # the reference's lost rope_theta
    cfg["rope_theta"] = 10000.0
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ParityError, match="rope"):
        check_parity(bad, m)
    bad2 = export_model(m, tmp_path / "bad2")
    w = load_file(str(bad2 / "model.safetensors"))
    w["local_decoder.in_projection.bias"] = w["local_decoder.in_projection.bias"] + 0.01
    save_file(w, str(bad2 / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ParityError, match="logit diff"):
        check_parity(bad2, m)


RELOAD = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
d = sys.argv[1]
tok = AutoTokenizer.from_pretrained(d, trust_remote_code=True)
m = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True, dtype=torch.float32).eval()
enc = tok(["The capital of France is"], return_tensors="pt")
out = m.generate(**enc, max_new_tokens=8, eos_token_id=None)
print(json.dumps({"rope_theta": m.config.rope_theta, "new": out[0, enc["input_ids"].shape[1]:].tolist()}))
"""


@pytest.mark.slow  # ~60-90 s on 2 shared cores: a 135M model built, exported, parity-checked and reloaded
def test_smollm2_export_keeps_rope_theta_and_reloads_offline(tmp_path):
    m = _build("smollm2-135m")
    out = export_model(m, tmp_path / "smol", preset=get_preset("smollm2-135m"))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rope_theta"] == 100000.0 and cfg["global_config"]["rope_parameters"]["rope_theta"] == 100000.0
    assert cfg["rms_norm_eps"] == m.global_model.config.rms_norm_eps and cfg["num_key_value_heads"] == 3
    report = check_parity(out, m, prompts=("The capital of France is", "Caf\u00e9 \U0001f600"))
    assert report["passed"] and report["max_abs_diff"] < 1e-4 and report["rope_theta"] == 100000.0

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        [sys.executable, "-c", RELOAD, str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=tmp_path,
    )  # a fresh process, away from the repo: no bolmo_core import
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["rope_theta"] == 100000.0
    ours = generate_ids(m, ["The capital of France is"], max_new_bytes=8, stop_on_eos=False)
    assert got["new"] == [v % FUSED_OFFSET for v in ours.fused_ids[0]]


def test_sliding_window_export_generates_batched_like_bolmo_core(tmp_path):
    """A tiny Olmo 3 source (sliding-window layers): the exported generate() runs rows together and
    gives the same bytes as bolmo_core's batch, which equals each row alone (test_generate)."""
    from tiny_olmo3 import tiny_olmo3_bolmo
    from transformers import AutoTokenizer

    m = tiny_olmo3_bolmo()
    out = export_model(m, tmp_path / "olmo3", preset=get_preset("tiny"))
    assert (
        json.loads((out / "config.json").read_text())["global_config"]["layer_types"][0]
        == "sliding_attention"
    )
    assert check_parity(out, m)["passed"]
    hf, tok = load_hf(out), AutoTokenizer.from_pretrained(str(out), trust_remote_code=True)
    prompts = ["Hello world, this is", "ab", "", "Caf\u00e9 au lait, un peu plus long encore"]
    enc = tok(prompts, return_tensors="pt", padding=True)
    seqs = hf.generate(**enc, max_new_tokens=32, eos_token_id=None)[:, enc["input_ids"].shape[1] :]
    ours = generate_ids(m, prompts, max_new_bytes=32, stop_on_eos=False)
    assert min(ours.n_patches) > 8  # past the window of 4 patches
    assert seqs.tolist() == [[v % FUSED_OFFSET for v in row] for row in ours.fused_ids]


def test_overwrite_replaces_only_an_earlier_byteify_export(tiny_export, tmp_path):
    m, _ = tiny_export
    out = export_model(m, tmp_path / "exp")
    (out / "byteify_parity.json").write_text("{}")  # the flow's marker beside it is known too
    export_model(m, out, overwrite=True)  # an earlier export: replaced
    assert json.loads((out / "byteify_export.json").read_text())["files"][-1] == "byteify_export.json"

    (out / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="'notes.txt' was not written by byteify"):
        export_model(m, out, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine" and (out / "model.safetensors").exists()

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "data.bin").write_bytes(b"x")
    with pytest.raises(ExportError, match="'data.bin' was not written by byteify"):
        export_model(m, foreign, overwrite=True)
    assert (foreign / "data.bin").read_bytes() == b"x"

    ck = tmp_path / "stage1" / "final"
    ck.mkdir(parents=True)
    (ck / "COMMIT").write_text("{}")
    with pytest.raises(ExportError, match="holds a checkpoint"):
        export_model(m, tmp_path / "stage1", overwrite=True)
    assert (ck / "COMMIT").exists()


def test_wider_boundary_predictor_exports_with_parity(tmp_path):
    """`model.boundary_context` > 0 (an experiment option): the HF predictor reads the same previous states."""
    torch.manual_seed(0)
    m = BolmoModel.from_source(get_preset("tiny", {"model.boundary_context": 3}).model).eval()
    with torch.no_grad():  # a trained widening, not the zero it starts from
        m.boundary_predictor.widen.weight.normal_(0, 0.05)
    out = export_model(m, tmp_path / "ctx")
    assert json.loads((out / "config.json").read_text())["boundary_context"] == 3
    assert check_parity(out, m)["passed"]
