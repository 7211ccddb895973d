"""The local stack as the README drives it: its `make up` / env / deployment run / `make down`
block is read from README.md and run line by line in one bash shell, as a user would paste
it (without the venv on PATH, so the env line must provide the tools), then what the user
sees is checked: progress artifacts, MLflow runs, lineage, the registered pyfunc, a quick
`make down`."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def readme_stack_commands() -> list[str]:
    """The command lines of the README's first bash block under "A local stack"."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## A local stack") :]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "README: no ```bash block in 'A local stack'"
    return [ln for ln in block.group(1).splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def test_readme_stack_block_is_the_documented_sequence():
    cmds = readme_stack_commands()
    assert cmds[0] == "make up" and cmds[-1] == "make down"
    assert 'eval "$(deployments/stack.sh env)"' in cmds
    assert any(c.startswith("prefect deployment run byteify/") and c.endswith("--watch") for c in cmds)


def test_stack_env_puts_the_venv_tools_on_path(tmp_path):
    env = {**os.environ, "BYTEIFY_VAR": str(tmp_path), "BYTEIFY_BIN": str(Path(sys.executable).parent)}
    out = subprocess.run(
        [
            "bash",
            "-c",
            'eval "$(deployments/stack.sh env)"; command -v prefect; command -v mlflow; echo "$PATH"',
        ],
        cwd=ROOT,
        env={**env, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    bin_dir = str(Path(sys.executable).parent)
    assert out[0] == f"{bin_dir}/prefect" and out[1] == f"{bin_dir}/mlflow"
    assert out[2].startswith(bin_dir + ":")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _user_env(var: Path) -> dict[str, str]:
    """A user's shell: no venv on PATH, no stack variables; the stack's state under `var`."""
    bin_dir = str(Path(sys.executable).parent)
    path = ":".join(p for p in os.environ["PATH"].split(":") if p and Path(p) != Path(bin_dir))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "VIRTUAL_ENV"))}
    return {
        **env,
        "PATH": path,
        "BYTEIFY_VAR": str(var),
        "PREFECT_PORT": str(_free_port()),
        "MLFLOW_PORT": str(_free_port()),
        "OMP_NUM_THREADS": "1",
    }


def _run_lines(cmds: list[str], env: dict[str, str], log: Path) -> tuple[dict[int, float], dict[str, str]]:
    """Run `cmds` in ONE bash shell, as pasted; (seconds per line, the shell's environment after).

    Fails naming the first line that fails, with the end of its output.
    """
    script = ["set -o pipefail"]
    for i, c in enumerate(cmds):
        script += [f'echo "@@ start {i} $(date +%s.%N)"', c, f'rc=$?; echo "@@ end {i} $rc $(date +%s.%N)"']
        script.append('[ "$rc" = 0 ] || exit "$rc"')
    script.append("python3 -c 'import json, os; print(\"@@ env \" + json.dumps(dict(os.environ)))'")
    with open(log, "w") as out:
        subprocess.run(
            ["bash", "-c", "\n".join(script)], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    text = log.read_text()
    starts = {int(i): float(t) for i, t in re.findall(r"@@ start (\d+) (\S+)", text)}
    ends = {int(i): (int(rc), float(t)) for i, rc, t in re.findall(r"@@ end (\d+) (\d+) (\S+)", text)}
    for i, c in enumerate(cmds):
        assert i in ends and ends[i][0] == 0, f"README line {c!r} failed:\n{text[-4000:]}"
    after = json.loads(re.search(r"^@@ env (.*)$", text, re.M).group(1))
    return {i: ends[i][1] - starts[i] for i in ends}, after


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """Every README line but the last (`make down`) run as written; the shell's state after."""
    tmp = tmp_path_factory.mktemp("stack")
    env = _user_env(tmp / "var")
    log = tmp / "readme.log"
    try:
        _, after = _run_lines(readme_stack_commands()[:-1], env, log)
        yield {"env": after, "var": tmp / "var", "log": log.read_text()}
    finally:  # whatever happened, leave nothing running (a no-op after the make-down test)
        subprocess.run(
            ["bash", "deployments/stack.sh", "down"], cwd=ROOT, env=env, capture_output=True, timeout=120
        )


@pytest.fixture(scope="module")
def prefect_of(stack):
    """The stack's Prefect API, for reading what its UI shows."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: stack["env"]["PREFECT_API_URL"]}):
        yield


def _flow_run(stack):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=1)[0]


@pytest.mark.slow
def test_deployment_run_completes(stack, prefect_of):
    assert "Flow run finished successfully in 'Completed'" in stack["log"]
    assert _flow_run(stack).state.is_completed()


@pytest.mark.slow
def test_one_progress_artifact_per_long_step_with_its_own_text(stack, prefect_of):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterId,
    )

    fr = _flow_run(stack)
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[fr.id]))
        )
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[fr.id])))
    progress = {a.key: a for a in arts if a.type == "progress"}
    titles = {
        "data-progress": "Data preparation: done in",
        "stage-1-progress": "Stage 1 training: done in",
        "stage-2-progress": "Stage 2 training: done in",
        "evaluation-progress": "Evaluation: done in",
        "export-progress": "Export: done in",
    }
    assert set(progress) == set(titles)
    for key, title in titles.items():
        assert float(progress[key].data) == 100.0 and progress[key].description.startswith(title), key
    assert "shards" in progress["data-progress"].description
    assert "bits per byte" in progress["stage-1-progress"].description
    # One retry policy, one integer delay: the UI shows a list of delays as "NaN".
    delays = {r.name: r.empirical_policy.retry_delay for r in runs}
    assert all(isinstance(d, int | None) for d in delays.values()), delays
    assert delays["stage-1"] == 10


@pytest.mark.slow
def test_gpu_deployments_say_what_they_need(stack, prefect_of):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        for name in ("byteify/olmo-7b", "byteify/olmo2-1b"):
            d = client.read_deployment_by_name(name)
            assert "Not Ready" in d.description and "prefect worker start --pool byteify-gpu" in d.description


@pytest.mark.slow
def test_mlflow_shows_training_runs_clean_metric_names_and_full_lineage(stack):
    from mlflow import MlflowClient

    uri = stack["env"]["MLFLOW_TRACKING_URI"]
    client = MlflowClient(uri, registry_uri=uri)
    exp = client.get_experiment_by_name("byteify-tiny")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    fr_id = str(_flow_run_id(stack))
    parent = client.search_runs(
        [exp.experiment_id], f"tags.`byteify.flow_run_id` = '{fr_id}' and tags.`byteify.kind` = 'flow'"
    )[0]
    assert parent.info.status == "FINISHED"
    assert "byte_model/bits_per_byte" in parent.data.metrics
    assert not [k for k in parent.data.metrics if "__" in k or " " in k]
    assert f"/runs/flow-run/{fr_id}" in parent.data.tags["mlflow.note.content"]
    mv = client.get_model_version_by_alias("byteify-tiny", "candidate")
    tags = mv.tags
    for key in ("source_id", "source_revision", "source_file_sha256", "manifest_hash", "stage1_checkpoint_hash",
                "stage2_checkpoint_hash", "export_hash", "code_version", "lineage_hash"):  # fmt: skip
        assert tags.get(f"byteify.{key}"), key
    assert tags["byteify.flow_run_url"].startswith(
        stack["env"]["PREFECT_API_URL"].removesuffix("/api") + "/runs/flow-run/"
    )
    assert float(tags["byteify.eval.byte_model.bits_per_byte"]) > 0
    assert "bits per byte" in mv.description


def _flow_run_id(stack):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: stack["env"]["PREFECT_API_URL"]}):
        return _flow_run(stack).id


@pytest.mark.slow
def test_registered_pyfunc_loads_and_predicts_without_noise(stack, tmp_path):
    code = (
        "import mlflow\n"
        "m = mlflow.pyfunc.load_model('models:/byteify-tiny@candidate')\n"
        "out = m.predict(['The capital of France is'], params={'max_new_tokens': 4})\n"
        "assert len(out) == 1 and isinstance(out[0], str)\n"
        "print(m.metadata.signature.to_dict()['params'])\n"
    )
    res = subprocess.run(
        ["python", "-c", code], cwd=tmp_path, env=stack["env"], capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "max_new_tokens" in res.stdout
    assert "type hints" not in res.stderr and "\x1b[" not in res.stderr and "%|" not in res.stderr, res.stderr


@pytest.mark.slow
def test_make_down_as_written_stops_everything_in_seconds(stack, tmp_path):
    last = readme_stack_commands()[-1]
    seconds, _ = _run_lines([last], stack["env"], tmp_path / "down.log")
    assert seconds[0] < 15, f"{last!r} took {seconds[0]:.1f} s"
    assert not list((stack["var"] / "pids").glob("*.pid")), "a PID file was left behind"
