"""Loading weights and byte models: one line naming the file when weights do not fit."""

import copy

import pytest
import torch
from model_helpers import save_model

from bolmo_core.checkpoint import step_name
from bolmo_core.config import get_preset
from bolmo_core.load import LoadError, load_byte_model, load_weights
from bolmo_core.model import BolmoModel


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    a = BolmoModel.from_source(get_preset("tiny").model)
    b = BolmoModel.from_source(get_preset("tiny", {"model.local.d_local": 32}).model)
    return a, b


def test_fitting_weights_load_exactly(models):
    a, _ = models
    fresh = BolmoModel.from_source(get_preset("tiny").model, init=False)
    assert load_weights(fresh, a.state_dict(), "ckpt") == 0
    for (k, x), y in zip(a.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(x, y), k


def test_other_shape_is_one_line_naming_the_file(models):
    a, b = models
    with pytest.raises(LoadError) as e:
        load_weights(a, b.state_dict(), "init_from /x/final")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("init_from /x/final: weights do not fit the model:")
    assert "tensors of another shape (e.g. local_encoder." in msg and "saved" in msg


def test_missing_and_extra_tensors(models):
    a, _ = models
    state = dict(a.state_dict())
    gone = next(k for k in state if k.startswith("local_decoder."))
    del state[gone]
    with pytest.raises(LoadError, match=f"1 missing \\(e.g. '{gone}'\\)"):
        load_weights(a, state, "f")
    teacherless = {k: v for k, v in a.state_dict().items() if not k.startswith("teacher.")}
    load_weights(a, teacherless, "f", may_miss=("teacher.",))
    extra = {**a.state_dict(), "ghost.weight": torch.zeros(1)}
    with pytest.raises(LoadError, match="1 not in this model \\(e.g. 'ghost.weight'\\)"):
        load_weights(a, extra, "f")
    assert load_weights(a, extra, "f", may_add=True) == 1


def test_byte_model_round_trip(models, tmp_path):
    """A stage folder resolves to its newest committed checkpoint; the model and preset come back exactly."""
    preset = get_preset("tiny")
    model = copy.deepcopy(models[0]).eval()
    with torch.no_grad():  # make the weights differ from a fresh init, so loading is observable
        model.lm_head.out.weight.mul_(3.0)
    save_model(tmp_path / "stage1", step_name(10), model, preset, 1, trainer_state={"step": 10})
    loaded, p = load_byte_model(str(tmp_path / "stage1"))
    assert p.to_dict() == preset.to_dict()
    ids = torch.tensor([[1] + [b + 4 for b in b"Hello, world."]])
    with torch.no_grad():
        a, b = model(ids, ids * 0).logits, loaded(ids, ids * 0).logits
    assert torch.equal(a, b)


def test_not_a_model_folder(tmp_path):
    with pytest.raises(LoadError, match="neither a committed checkpoint"):
        load_byte_model(str(tmp_path))
