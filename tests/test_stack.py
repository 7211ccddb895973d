"""The local stack for real: `deployments/stack.sh up` (Prefect server, worker, MLflow server),
`prefect deployment run byteify/tiny --watch`, the registered version, then `down`."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STACK = ROOT / "deployments" / "stack.sh"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stack(cmd: str, env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(STACK), cmd], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.slow
def test_stack_up_runs_tiny_deployment_and_registers(tmp_path):
    from mlflow import MlflowClient

    var = tmp_path / "var"
    env = {
        **os.environ,
        "BYTEIFY_VAR": str(var),
        "PREFECT_PORT": str(_free_port()),
        "MLFLOW_PORT": str(_free_port()),
        "BYTEIFY_BIN": str(Path(sys.executable).parent),
    }
    for k in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "PREFECT_HOME"):
        env.pop(k, None)
    up = _stack("up", env)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert (
            "byteify/tiny" in up.stdout
            and "byteify/smollm2-135m" in up.stdout
            and "byteify/olmo-7b" in up.stdout
        )
        exports = _stack("env", env).stdout
        run_env = dict(env)
        for line in exports.splitlines():
            k, v = line.removeprefix("export ").split("=", 1)
            run_env[k] = v.strip('"')
        run = subprocess.run(
            [str(Path(sys.executable).with_name("prefect")), "deployment", "run", "byteify/tiny", "--watch"],
            env=run_env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=1800,
        )
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        assert "Completed" in run.stdout

        uri = run_env["MLFLOW_TRACKING_URI"]
        client = MlflowClient(uri, registry_uri=uri)
        mv = client.get_model_version_by_alias("byteify-tiny", "candidate")
        assert mv.status == "READY"
        assert mv.tags["byteify.source_id"] == "byteify/tiny-olmo2"
        assert len(mv.tags["byteify.stage2_checkpoint_hash"]) == 64
        assert (var / "logs" / "worker.log").exists() and (var / "logs" / "mlflow.log").exists()
    finally:
        down = _stack("down", env, timeout=120)
        assert down.returncode == 0, down.stderr
        assert not list((var / "pids").glob("*.pid")), "a PID file was left behind"
