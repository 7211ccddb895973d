"""The flow's parameters: one schema (the preset dataclasses via dotted overrides), checked at once."""

import pytest


def test_form_has_preset_overrides_and_deployment_groups():
    from flows.byteify import byteify

    props = byteify.parameters.model_dump()["properties"]
    assert set(props) == {
        "preset",
        "overrides",
        "data_sources",
        "storage_root",
        "skip_stage1",
        "compute",
        "evaluation",
        "tracking",
    }
    ok = byteify.validate_parameters(
        {"preset": "tiny", "overrides": {"stage1.steps": 3}, "compute": {"processes": 2}}
    )
    assert ok["compute"].processes == 2 and ok["overrides"] == {"stage1.steps": 3}
    assert ok["skip_stage1"] is False and props["skip_stage1"]["type"] == "boolean"
    assert byteify.validate_parameters({"skip_stage1": True})["skip_stage1"] is True
    with pytest.raises(Exception, match="processes"):
        byteify.validate_parameters({"compute": {"processes": 0}})


def test_bad_override_fails_the_run_at_once_with_one_line(prefect_api, tmp_path):
    from flows.byteify import Tracking, byteify

    state = byteify(
        preset="tiny",
        overrides={"stage1.micro_batch": 0},
        storage_root=str(tmp_path / "runs"),
        tracking=Tracking(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}"),
        return_state=True,
    )
    assert state.is_failed()
    with pytest.raises(ValueError) as e:
        state.result()
    assert str(e.value) == "stage1.micro_batch=0: must be >= 1"
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()  # nothing started
