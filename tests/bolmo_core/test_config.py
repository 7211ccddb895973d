"""The config tree: presets, dotted overrides, and the one validator every entry point goes through."""

import json

import pytest

from bolmo_core.config import PAPER_RECIPE, PRESETS, ConfigError, LossConfig, Preset, TrainConfig, get_preset


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_is_valid_and_round_trips(name):
    p = get_preset(name)
    assert p.name == name
    back = Preset.from_dict(json.loads(p.to_json()))
    assert back == p and back.stage1.stage == 1 and back.stage2.stage == 2


def test_overrides_as_dict_or_key_value_strings():
    a = get_preset("tiny", {"stage1.steps": 5, "stage2.optim.lr": 1})
    b = get_preset("tiny", ["stage1.steps=5", "stage2.optim.lr=1"])
    assert (
        a == b and a.stage1.steps == 5 and a.stage2.optim.lr == 1.0 and isinstance(a.stage2.optim.lr, float)
    )
    assert get_preset("tiny", ['stage1.callbacks=["m:C"]']).stage1.callbacks == ["m:C"]
    assert (
        get_preset("tiny", ["model.source.name_or_path=smollm2-135m"]).model.source.name_or_path
        == "smollm2-135m"
    )
    assert get_preset("tiny", {"stage1.optim": {"lr": 0.5}}).stage1.optim.betas == (
        0.9,
        0.999,
    )  # a section: defaults fill in
    assert get_preset("tiny") == get_preset("tiny")  # overrides never leak into the preset


def test_smollm2_ships_issue13_winner_and_paper_recipe_stays_one_override_away():
    """smollm2-135m trains Stage 1 on byte-level targets with a wider predictor input
    (docs/results.md); PAPER_RECIPE gives back the paper's losses and predictor, nothing else."""
    p = get_preset("smollm2-135m")
    assert (p.stage1.losses.byte_kl, p.stage1.losses.distill, p.model.boundary_context) == (1.0, 0.0, 4)
    paper = get_preset("smollm2-135m", PAPER_RECIPE)
    assert paper.stage1.losses == LossConfig() and paper.model.boundary_context == 0
    assert paper.stage2 == p.stage2 and paper.data == p.data
    assert paper.stage1.optim == p.stage1.optim and paper.stage1.steps == p.stage1.steps
    # the presets that ship the paper's recipe are unchanged by it
    for name in ("tiny", "olmo2-1b"):
        assert get_preset(name, PAPER_RECIPE) == get_preset(name)


BAD = [
    (["stage1.steps=abc"], 'stage1.steps="abc": expected an integer'),
    (["stage1.steps=0"], "stage1.steps=0: must be >= 1"),
    (["stage1.steps=-3"], "stage1.steps=-3: must be >= 1"),
    (["stage1.steps=2.5"], "stage1.steps=2.5: expected an integer"),
    (["stage1.micro_batch=0"], "stage1.micro_batch=0: must be >= 1"),
    (["stage1.global_batch=0"], "stage1.global_batch=0: must be >= 1"),
    (["stage1.global_batch=6"], "stage1.global_batch=6: must be a multiple of micro_batch=4"),
    (["stage1.optim.lr=-0.1"], "stage1.optim.lr=-0.1: must be > 0.0"),
    (["stage1.optim.betas=[0.9, 1.5]"], "stage1.optim.betas=[0.9, 1.5]: each beta must be in [0, 1)"),
    (["stage1.optim.betas=[0.9]"], "stage1.optim.betas=[0.9]: expected a list of 2 values"),
    (["stage1.precision=fp16"], 'stage1.precision="fp16": must be one of fp32, bf16'),
    (["stage1.deterministic=true"], "override 'stage1.deterministic': no field 'deterministic'"),
    (["stagex.steps=1"], "override 'stagex.steps': no section 'stagex'"),
    (["stage1.steps"], "override 'stage1.steps': expected key=value"),
    (["data.window_tokens=1"], "data.window_tokens=1: must be >= 2"),
    (["data.validation_fraction=1"], "data.validation_fraction=1.0: must be < 1.0"),
    (["model.boundary_lookahead=2"], "model.boundary_lookahead=2: must be one of 0, 1"),
    (["model.local.d_local=30"], "model.local.d_local=30: must be a multiple of n_heads=4"),
    (["model.local.kernel=cuda"], 'model.local.kernel="cuda": must be one of auto, torch, triton'),
    (["model.retained_embeddings=1"], "model.retained_embeddings=1: expected true or false"),
    (["model.source.name_or_path=7"], "model.source.name_or_path=7: expected a string"),
    (["stage2.target_bytes_per_patch=0.5"], "stage2.target_bytes_per_patch=0.5: must be >= 1.0"),
    (["stage2.stage=1"], "stage2.stage=1: must be 2"),
    (["stage1.optim=3"], "stage1.optim=3: expected a section (OptimConfig) as a mapping"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[b[0][0] for b in BAD])
def test_bad_values_are_one_line_naming_key_value_and_rule(overrides, message):
    with pytest.raises(ConfigError) as e:
        get_preset("tiny", overrides)
    assert str(e.value) == message


def test_unknown_preset_and_partial_preset():
    with pytest.raises(ConfigError, match=r'preset="big": unknown \(choose from tiny, smollm2-135m'):
        get_preset("big")
    d = get_preset("tiny").to_dict()
    del d["stage2"]
    with pytest.raises(ConfigError, match="^stage2: missing"):
        Preset.from_dict(d)
    d = get_preset("tiny").to_dict()
    d["stage1"]["optim"]["lrr"] = 1
    with pytest.raises(ConfigError, match="^stage1.optim: unknown field 'lrr'"):
        Preset.from_dict(d)


def test_saved_presets_without_newer_fields_still_load():
    d = get_preset("tiny").to_dict()
    del d["stage1"]["losses"]["whitespace_debias"]  # an older checkpoint's config
    assert Preset.from_dict(d) == get_preset("tiny")


def test_train_config():
    p = get_preset("tiny").to_dict()
    cfg = TrainConfig.from_dict({"preset": p, "stage": 2, "manifest_uri": "m.json", "out_uri": "o"})
    assert cfg.stage_cfg is cfg.preset.stage2 and TrainConfig.from_dict(cfg.to_dict()) == cfg
    for d, msg in (
        ({"stage": 1, "manifest_uri": "m", "out_uri": "o"}, "preset: missing"),
        ({"preset": p, "stage": 1, "manifest_uri": "", "out_uri": "o"}, 'manifest_uri="": required'),
        (
            {"preset": p, "stage": 1, "manifest_uri": "m", "out_uri": "o", "max_minutes": 0},
            "max_minutes=0.0: must be > 0.0",
        ),
    ):
        with pytest.raises(ConfigError, match=f"^{msg}"):
            TrainConfig.from_dict(d)


def test_train_config_rejects_bad_fields():
    preset = get_preset("tiny").to_dict()
    with pytest.raises(ValueError, match="unknown field 'stages'"):
        TrainConfig.from_dict(
            {"preset": preset, "stages": 1, "stage": 1, "manifest_uri": "m", "out_uri": "o"}
        )
    with pytest.raises(ValueError, match="stage=3: must be one of 1, 2"):
        TrainConfig.from_dict({"preset": preset, "stage": 3, "manifest_uri": "m", "out_uri": "o"})
    with pytest.raises(ValueError, match="preset.name: missing"):
        TrainConfig.from_dict({"preset": {}, "stage": 1, "manifest_uri": "m", "out_uri": "o"})
