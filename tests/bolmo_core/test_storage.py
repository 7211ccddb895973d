"""Storage: URIs, atomic writes, and the folder lock with real processes (local disk and moto S3)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bolmo_core import storage

HOLD = """
import sys, time
from bolmo_core import storage
with storage.lock_folder(sys.argv[1], "training stage1", lease_s=float(sys.argv[2])):
    print("held", flush=True)
    time.sleep(float(sys.argv[3]))
print("released", flush=True)
"""


def _holder(folder: str, lease: float = 120, hold: float = 60) -> subprocess.Popen:
    p = subprocess.Popen(
        [sys.executable, "-c", HOLD, folder, str(lease), str(hold)],
        stdout=subprocess.PIPE,
        text=True,
        env=os.environ,
    )
    assert p.stdout.readline().strip() == "held"
    return p


def test_atomic_write_and_read(tmp_path):
    uri = str(tmp_path / "a" / "b.json")
    storage.write_json_atomic(uri, {"x": 1})
    assert storage.read_json(uri) == {"x": 1} and storage.listdir(str(tmp_path / "a")) == ["b.json"]
    with pytest.raises(storage.StorageError, match="does not exist"):
        storage.read_bytes(str(tmp_path / "nope"))


def test_second_process_is_refused_with_one_line(tmp_path):
    p = _holder(str(tmp_path))
    try:
        with pytest.raises(storage.LockHeld) as e:
            storage.lock_folder(str(tmp_path), "training stage1")
        msg = str(e.value)
        assert "\n" not in msg and f"pid {p.pid}" in msg and "in use by training stage1" in msg
    finally:
        p.kill()
        p.wait()


def test_dead_holder_on_this_host_is_taken_over_at_once(tmp_path):
    p = _holder(str(tmp_path))
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert json.loads((tmp_path / storage.LOCK_NAME).read_text())["pid"] == p.pid  # left behind
    with storage.lock_folder(str(tmp_path), "training stage1") as lk:
        assert json.loads((tmp_path / storage.LOCK_NAME).read_text())["token"] == lk.token
    assert not (tmp_path / storage.LOCK_NAME).exists()  # released


def test_lock_on_s3_with_lease_expiry(s3_server):
    folder = f"s3://byteify-test/locks/{time.time_ns()}"
    p = _holder(folder, lease=2.0, hold=60)
    try:
        with pytest.raises(storage.LockHeld):
            storage.lock_folder(folder, "prepare", lease_s=2.0)
        os.kill(p.pid, signal.SIGSTOP)  # frozen: alive, but no heartbeat (another host's view)
        time.sleep(3.0)
        lk = storage.lock_folder(folder, "prepare", lease_s=2.0)  # stale heartbeat: taken over
        os.kill(p.pid, signal.SIGCONT)
        time.sleep(1.5)
        lk.release()
        assert not storage.exists(folder + "/" + storage.LOCK_NAME)
    finally:
        p.kill()
        p.wait()


def test_local_copy_is_the_path_itself_or_a_download(s3_server, tmp_path):
    """A local folder is used in place; a folder or a file on S3 is downloaded whole into tmp."""
    local = tmp_path / "model"
    local.mkdir()
    (local / "config.json").write_text("{}")
    assert storage.local_copy(str(local), str(tmp_path / "tmp")) == str(local)
    folder = f"s3://byteify-test/copies/{time.time_ns()}/model"
    storage.write_bytes_atomic(f"{folder}/config.json", b"{}")
    storage.write_bytes_atomic(f"{folder}/sub/weights.bin", b"\x00\x01")
    got = storage.local_copy(folder, str(tmp_path))
    assert got == str(tmp_path / "model")
    files = sorted(p.relative_to(got).as_posix() for p in Path(got).rglob("*") if p.is_file())
    assert files == ["config.json", "sub/weights.bin"]
    one = storage.local_copy(f"{folder}/sub/weights.bin", str(tmp_path))
    assert open(one, "rb").read() == b"\x00\x01"
