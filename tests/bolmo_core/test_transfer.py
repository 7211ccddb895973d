"""Instruct-delta transfer (bolmo_core/transfer.py) on a tiny random base/instruct pair.

The pair is built like source.py's tiny-olmo2 with every weight on a 2^-12 grid and a known
delta on the same grid, so (instruct - base) is exactly the delta in float32 and the byte
model's global blocks (made from the base) must come out bit-for-bit equal to the instruct
model's blocks.
"""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transfer_pair import make_pair, save_source

from bolmo_core.cli import main
from bolmo_core.config import get_preset
from bolmo_core.export import export_model
from bolmo_core.load import load_exported
from bolmo_core.model import BolmoModel
from bolmo_core.source import SourceConfig, load_tokenizer, tiny_corpus
from bolmo_core.transfer import SourceTensors, TransferError, apply_delta

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(base folder, instruct folder, the known delta by source key), weights on a dyadic grid."""
    return make_pair(tmp_path_factory.mktemp("pair"))


def _byte_model(base: str):
    preset = get_preset("tiny", {"model.source.name_or_path": base})
    torch.manual_seed(0)
    return BolmoModel.from_source(preset.model).eval(), preset


@pytest.fixture(scope="module")
def byte_export(pair, tmp_path_factory):
    model, preset = _byte_model(pair[0])
    out = export_model(model, tmp_path_factory.mktemp("byte") / "export", preset=preset)
    return str(out), model


def test_cli_transfer_is_exact_and_reloads_with_parity(pair, byte_export, tmp_path, capsys):
    base, instruct, delta = pair
    export_dir, before = byte_export
    out = tmp_path / "instructed"
    text = tmp_path / "heldout.txt"
    text.write_text(" ".join(tiny_corpus(4000)), encoding="utf-8")
    argv = ["transfer", export_dir, "--base", base, "--instruct", instruct, "--out", str(out)]
    rc = main([*argv, "--text", str(text), "--max-bytes", "1500"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["parity"]["passed"] and report["parity"]["max_abs_diff"] < 1e-4
    ev = report["evaluation"]  # the result scored next to the instruct model, on the same bytes
    assert ev["text"]["bytes"] == 1500 and ev["source"]["bits_per_byte"] > 0
    assert ev["byte_model"]["bits_per_byte"] > 0

    after, _ = load_exported(str(out))
    instr = load_file(f"{instruct}/model.safetensors")
    old, new = before.state_dict(), after.state_dict()
    n_global = 0
    for k, v in new.items():
        if k.startswith("global_model.model.layers."):
            src_key = "model." + k.removeprefix("global_model.model.")
            assert torch.equal(v, instr[src_key]), k  # base + delta, bit for bit
            assert not torch.equal(v, old[k]), k
            n_global += 1
        elif not k.startswith("teacher."):
            assert torch.equal(v, old[k]), k  # local modules untouched
    assert n_global == report["tensors"] == len([k for k in delta if ".layers." in k])
    assert report["skipped"] == ["lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"]
    meta = json.loads((out / "byteify_export.json").read_text())
    assert meta["transfer"]["instruct"] == instruct and meta["transfer"]["alpha"] == 1.0


def test_alpha_and_retained_embeddings(pair):
    base, instruct, delta = pair
    model, _ = _byte_model(base)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    b, i = SourceTensors(SourceConfig(base), "base"), SourceTensors(SourceConfig(instruct), "instruct")
    report = apply_delta(model, b, i, alpha=0.5, retained_embeddings=True)
    assert report.retained_embeddings and "model.embed_tokens.weight" not in report.skipped
    state = model.state_dict()
    for k, v in state.items():
        if k.startswith("global_model.model.layers."):
            d = delta["model." + k.removeprefix("global_model.model.")]
            assert torch.equal(v, before[k] + 0.5 * d), k
    w = state["local_encoder.retained_embedding.weight"]
    rows, cols = w.shape
    d_emb = delta["model.embed_tokens.weight"][:rows, :cols]
    assert torch.equal(w, before["local_encoder.retained_embedding.weight"] + 0.5 * d_emb)
    assert torch.equal(state["lm_head.out.weight"], before["lm_head.out.weight"])


def test_architecture_mismatch_is_one_line(pair, byte_export, tmp_path, capsys):
    from transformers import AutoConfig, AutoModelForCausalLM

    base, _, _ = pair
    cfg = AutoConfig.from_pretrained(base)
    cfg.intermediate_size = 128
    other = save_source(
        AutoModelForCausalLM.from_config(cfg), load_tokenizer(SourceConfig(base)), tmp_path / "o"
    )
    out = tmp_path / "never"
    capsys.readouterr()  # save_pretrained's progress bar
    rc = main(["transfer", byte_export[0], "--base", base, "--instruct", other, "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "--instruct" in err and "intermediate_size=128" in err and "not the same architecture" in err
    assert not out.exists()
    # a base/instruct pair of another architecture than the byte model's global blocks
    rc = main(["transfer", byte_export[0], "--base", other, "--instruct", other, "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and "--base" in err and "the byte model's global blocks have 256" in err
    assert not out.exists()


def test_missing_or_reshaped_tensor_is_refused_before_any_change(pair, tmp_path):
    base, instruct, _ = pair
    state = load_file(f"{instruct}/model.safetensors")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(open(f"{instruct}/config.json").read())
    k = "model.layers.3.mlp.up_proj.weight"
    state[k] = state[k][:, :-1].contiguous()
    save_file(state, str(bad / "model.safetensors"))
    model, _ = _byte_model(base)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TransferError, match=r"'model.layers.3.mlp.up_proj.weight' has shape \[256, 63\]"):
        apply_delta(
            model,
            SourceTensors(SourceConfig(base), "base"),
            SourceTensors(SourceConfig(str(bad)), "instruct"),
        )
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
