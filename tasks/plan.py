"""Prefect task: the flow's first step, the memory / time plan of the run (bolmo_core.plan).

It reads the accelerate config the run will launch with (FSDP or not) and this machine's
devices, logs the plan as a markdown artifact (key ``plan``) and refuses, with one line saying
what to change, a run whose preset does not fit: before any data is prepared or GPU hour spent.
"""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.logging import get_run_logger

from bolmo_core.config import Preset
from bolmo_core.plan import PlanError, check, detect_hardware, markdown, plan

from . import PROJECT_ROOT


class PlanRefused(ValueError):
    """The preset does not fit the machine: one line saying what to change (not retried)."""


def sharding_of(accelerate_config: str | None) -> str:
    """ "fsdp" when the accelerate yaml's distributed_type is FSDP, else "ddp"."""
    if not accelerate_config:
        return "ddp"
    import yaml

    path = Path(accelerate_config)
    path = path if path.is_absolute() else PROJECT_ROOT / path
    try:
        cfg = yaml.safe_load(path.read_text()) or {}
    except OSError as e:
        raise PlanRefused(f"accelerate config {accelerate_config}: cannot be read ({e.strerror})") from None
    return "fsdp" if str(cfg.get("distributed_type", "")).upper() == "FSDP" else "ddp"


@task(name="plan", retries=0, cache_policy=None)
def plan_run(preset: dict, processes: int, accelerate_config: str | None = None) -> dict:
    """The plan of both stages on this machine; raises PlanRefused when a stage does not fit."""
    logger = get_run_logger()
    p = plan(Preset.from_dict(preset), detect_hardware(processes), sharding=sharding_of(accelerate_config))
    report = markdown(p)
    create_markdown_artifact(key="plan", markdown=report, description=f"memory and time plan of {p.preset}")
    for st in p.stages:
        logger.info(
            f"plan: stage {st.stage} needs {st.memory['total'] / 1e9:.3g} GB per device of "
            f"{p.hardware.usable / 1e9:.3g} GB usable, about {st.hours:.3g} h"
        )
    try:
        check(p)
    except PlanError as e:
        raise PlanRefused(str(e)) from None
    return {
        "sharding": p.sharding,
        "hours": [st.hours for st in p.stages],
        "memory_gb": [st.memory["total"] / 1e9 for st in p.stages],
    }
