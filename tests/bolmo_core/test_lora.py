"""LoRA Stage 2 (bolmo_core/lora.py) through the real trainer on the tiny preset.

Stage 1 -> Stage 2 with adapters on the global blocks: only adapters and local modules change;
checkpoints hold the adapters unmerged and a resume from one reproduces the straight run bit
for bit; loading merges them, and the merged model matches the adapter model and exports with
parity into the same HF layout as a full Stage 2.
"""

import json
import shutil

import pytest
import torch
from train_helpers import make_manifest, run_config

from bolmo_core import checkpoint as ckpt
from bolmo_core.callbacks import parse_progress_line
from bolmo_core.config import ConfigError, get_preset
from bolmo_core.export import check_parity, export_model
from bolmo_core.generate import retained_index
from bolmo_core.load import load_checkpoint_model
from bolmo_core.lora import LoraError, add_adapters, is_adapter_param
from bolmo_core.model import BolmoModel
from bolmo_core.train import TrainConfig, TrainError, train

LORA = {"stage2.lora": {"rank": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj", "down_proj"]}}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A Stage-1 run, then a LoRA Stage 2 straight through 4 steps (checkpoints at 2 and 4)."""
    d = tmp_path_factory.mktemp("lora")
    manifest = make_manifest(d)
    s1 = train(TrainConfig.from_dict(run_config(manifest, str(d / "s1"), 1, {"stage1.steps": 2})))
    cfg2 = run_config(manifest, str(d / "s2"), 2, LORA, init_from=s1["final"])
    s2 = train(TrainConfig.from_dict(cfg2))
    return {"manifest": manifest, "s1": s1["final"], "s2": s2["final"], "cfg2": cfg2, "dir": d}


def test_config_rules():
    p = get_preset("tiny", {"stage2.lora": {"rank": 8}})
    assert p.stage2.lora.rank == 8 and p.stage2.lora.target_modules[0] == "q_proj"
    assert get_preset("tiny").stage2.lora is None
    with pytest.raises(ConfigError, match=r"stage1\.lora=.*needs train_global=true"):
        get_preset("tiny", {"stage1.lora": {"rank": 8}})
    with pytest.raises(ConfigError, match=r"stage2\.lora\.rank=0: must be >= 1"):
        get_preset("tiny", {"stage2.lora": {"rank": 0}})
    with pytest.raises(ConfigError, match=r"stage2\.lora\.target_modules=\[\]: needs at least one"):
        get_preset("tiny", {"stage2.lora": {"target_modules": []}})


def test_lora_under_fsdp_is_refused_in_one_line():
    from bolmo_core.train import check_lora_sharding

    lora = get_preset("tiny", {"stage2.lora": {"rank": 8}}).stage2
    check_lora_sharding(lora, sharded=False)  # whole model per rank: adapters are added
    check_lora_sharding(get_preset("tiny").stage2, sharded=True)
    with pytest.raises(TrainError, match=r"stage2\.lora: not supported with FSDP sharding yet"):
        check_lora_sharding(lora, sharded=True)


def test_only_adapters_and_local_modules_train(runs):
    s1, s2 = ckpt.load_model_state(runs["s1"]), ckpt.load_model_state(runs["s2"])
    adapters = [k for k in s2 if is_adapter_param(k)]
    assert adapters and all(".lora_A.default." in k or ".lora_B.default." in k for k in adapters)
    assert {k.split(".")[-4] for k in adapters} == {"q_proj", "v_proj", "down_proj"}
    assert any(float(s2[k].abs().max()) > 0 for k in adapters if ".lora_B." in k)  # B left zero init
    for k, v in s2.items():
        plain = k.replace(".base_layer.", ".")
        if k.startswith("global_model.") and not is_adapter_param(k):
            assert torch.equal(v, s1[plain]), k  # frozen: the Stage-1 (= source) blocks, bit for bit
    assert not torch.equal(s2["lm_head.out.weight"], s1["lm_head.out.weight"])  # locals train fully


def test_resume_from_a_lora_checkpoint_is_bit_exact(runs, tmp_path, capsys):
    out = tmp_path / "s2"
    out.mkdir()
    step2 = ckpt.resolve_checkpoint(str(runs["dir"] / "s2" / ckpt.step_name(2)))
    shutil.copytree(step2, out / ckpt.step_name(2))  # the run as a kill after step 2 would leave it
    capsys.readouterr()
    resumed = train(TrainConfig.from_dict({**runs["cfg2"], "out_uri": str(out)}))
    start = next(e for e in map(parse_progress_line, capsys.readouterr().out.splitlines()) if e)
    assert start["event"] == "start" and start["step"] == 2
    assert start["info"]["resumed_from"].endswith(ckpt.step_name(2)) and resumed["step"] == 4
    a, b = ckpt.load_model_state(runs["s2"]), ckpt.load_model_state(resumed["final"])
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_activation_checkpointing_around_adapters_changes_nothing(runs, tmp_path):
    """Blocks wrapped for recomputation with PEFT adapters inside: the same checkpoint keys (the
    wrapper strips its prefix) and the same weights as the straight LoRA run, step for step."""
    cfg = run_config(
        runs["manifest"], str(tmp_path / "s2"), 2, {**LORA, "stage2.activation_checkpointing": True}
    )
    out = train(TrainConfig.from_dict({**cfg, "init_from": runs["s1"]}))
    assert ckpt.read_config(out["final"])["preset"]["stage2"]["activation_checkpointing"] is True
    a, b = ckpt.load_model_state(runs["s2"]), ckpt.load_model_state(out["final"])
    assert a.keys() == b.keys() and any(is_adapter_param(k) for k in b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_merged_model_matches_adapters_and_exports_with_parity(runs, tmp_path):
    merged, preset = load_checkpoint_model(runs["s2"])
    assert not any(is_adapter_param(k) or ".base_layer." in k for k in merged.state_dict())
    # the same checkpoint, adapters kept apart (as the trainer ran it)
    unmerged = BolmoModel.from_source(preset.model, init=False)
    add_adapters(unmerged, preset.stage2.lora)
    unmerged.load_state_dict(ckpt.load_model_state(runs["s2"]))
    unmerged.eval()
    ids = torch.tensor([[1, *(b + 4 for b in "LoRA merge parity: café 42".encode())]])
    exp = retained_index(merged).expand(ids)
    with torch.no_grad():
        diff = (merged(ids, exp).logits - unmerged(ids, exp).logits).abs().max()
    assert diff < 1e-5
    out = export_model(merged, tmp_path / "export", preset=preset)
    assert check_parity(out, merged)["passed"]
    plain = BolmoModel.from_source(preset.model, init=False).state_dict()
    exported = json.loads((out / "byteify_export.json").read_text())["files"]
    assert "model.safetensors" in exported
    from safetensors.torch import load_file

    keys = {k for k in load_file(str(out / "model.safetensors")) if not k.startswith("retained_")}
    assert keys == {k for k in plain if not k.startswith("teacher.")}  # the full Stage 2 layout


def test_unknown_target_module_is_one_line(runs, tmp_path):
    cfg = run_config(
        runs["manifest"],
        str(tmp_path / "bad"),
        2,
        {"stage2.lora": {"target_modules": ["qkv_proj"]}},
        init_from=runs["s1"],
    )
    with pytest.raises(TrainError, match=r"stage2\.lora\.target_modules=\['qkv_proj'\]: .*q_proj"):
        train(TrainConfig.from_dict(cfg))
    m = BolmoModel.from_source(get_preset("tiny").model, init=False)
    add_adapters(m, get_preset("tiny", LORA).stage2.lora)
    with pytest.raises(LoraError, match="already has LoRA adapters"):
        add_adapters(m, get_preset("tiny", LORA).stage2.lora)
