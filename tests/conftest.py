"""Shared fixtures. Offline by design: the hub is switched off for every test."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# ---------------------------------------------------------------- shared servers (issue 3)

import contextlib  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

S3_BUCKET = "byteify-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto(env_extra: dict | None = None) -> tuple[subprocess.Popen, str]:
    """A real moto S3 server on a free loopback port: (process, endpoint URL)."""
    port = free_port()
    exe = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen(
        [str(exe), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **(env_extra or {})},
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=1)
            return proc, url
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"moto_server exited with code {proc.returncode}") from None
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("moto_server did not start within 30 s")


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests (`pytestmark = pytest.mark.usefixtures("one_thread")`):
    their matmuls are small, and OpenMP threads only contend on a shared box."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def s3_server():
    """Endpoint URL of a moto S3 server with bucket `S3_BUCKET`; AWS_* env set for the session."""
    proc, url = start_moto()
    env = {
        "AWS_ENDPOINT_URL": url,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in [*env, "BYTEIFY_S3_ENDPOINT_URL"]}
    os.environ.update(env)
    os.environ.pop("BYTEIFY_S3_ENDPOINT_URL", None)
    try:
        import boto3

        boto3.client("s3", endpoint_url=url).create_bucket(Bucket=S3_BUCKET)
        yield url
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="session")
def prefect_api():
    """A temporary Prefect API for tests that run flows or tasks (request it explicitly)."""
    from prefect.testing.utilities import prefect_test_harness

    # 120 s, not 60: on the shared 2-core box (load ~10) the temporary server can take over a minute.
    with prefect_test_harness(server_startup_timeout=120):
        yield


@contextlib.contextmanager
def flow_run_env(tmp: Path, s3_url: str):
    """What a test that runs the byteify flow sets: Prefect results persisted under `tmp`, MLflow
    artifacts on the S3 server too (direct mode); yields {"tmp", "tracking_uri"} (SQLite under `tmp`)."""
    from prefect.settings import (
        PREFECT_LOCAL_STORAGE_PATH,
        PREFECT_RESULTS_PERSIST_BY_DEFAULT,
        temporary_settings,
    )

    settings = {PREFECT_LOCAL_STORAGE_PATH: str(tmp / "results"), PREFECT_RESULTS_PERSIST_BY_DEFAULT: True}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_S3_ENDPOINT_URL", s3_url)
        with temporary_settings(settings):
            yield {"tmp": tmp, "tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}"}
