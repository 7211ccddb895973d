"""Storage through fsspec: local paths, ``file://`` and ``s3://`` URIs, with atomic writes.

S3-compatible servers: set ``AWS_ENDPOINT_URL`` (botocore honours it) or
``BYTEIFY_S3_ENDPOINT_URL``; credentials come from the usual ``AWS_*`` variables, never
from arguments that could end up in logs or params.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import fsspec


class StorageError(OSError):
    """A URI that cannot be read or written, with a one-line reason."""


def _storage_options(protocol: str) -> dict:
    if protocol in ("s3", "s3a"):
        endpoint = os.environ.get("BYTEIFY_S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL")
        opts: dict[str, Any] = {}
        if endpoint:
            opts["client_kwargs"] = {"endpoint_url": endpoint}
        # Fail in seconds, not minutes, when an endpoint is unreachable.
        opts["config_kwargs"] = {"connect_timeout": 5, "read_timeout": 60, "retries": {"max_attempts": 3}}
        return opts
    return {}


def fsspec_options(uri: str) -> dict:
    """The filesystem options this module uses for `uri` (for libraries that open URIs themselves)."""
    return _storage_options(uri.split("://", 1)[0] if "://" in uri else "file")


def get_fs(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path-within-it) for a URI or a plain local path."""
    protocol = uri.split("://", 1)[0] if "://" in uri else "file"
    fs, path = fsspec.core.url_to_fs(uri, **_storage_options(protocol))
    return fs, path


def is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def local_path(uri: str) -> str:
    return uri[len("file://") :] if uri.startswith("file://") else uri


def join(uri: str, *parts: str) -> str:
    out = uri.rstrip("/")
    for p in parts:
        out = out + "/" + p.strip("/")
    return out


def exists(uri: str) -> bool:
    fs, path = get_fs(uri)
    return fs.exists(path)


def _describe(uri: str, e: Exception) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return f"{uri}: {msg}"


def write_bytes_atomic(uri: str, data: bytes) -> None:
    """Write a whole object so that a reader sees either nothing or all of it.

    Locally: write a temp file in the same folder, fsync, rename. On S3 a single PUT is
    already atomic (an object appears only once complete).
    """
    fs, path = get_fs(uri)
    try:
        if is_local(uri):
            d = os.path.dirname(path) or "."
            os.makedirs(d, exist_ok=True)
            tmp = os.path.join(d, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:8]}")
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            finally:  # a failed write (full disk) leaves no orphan temp file
                if os.path.exists(tmp):
                    os.remove(tmp)
        else:
            fs.pipe_file(path, data)
    except FileNotFoundError as e:
        raise StorageError(_describe(uri, e)) from None
    except PermissionError as e:
        raise StorageError(_describe(uri, e)) from None
    except OSError as e:
        raise StorageError(_describe(uri, e)) from None


def read_bytes(uri: str) -> bytes:
    fs, path = get_fs(uri)
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        raise StorageError(f"{uri}: does not exist") from None
    except OSError as e:
        raise StorageError(_describe(uri, e)) from None


def json_bytes(obj: Any) -> bytes:
    """The bytes `write_json_atomic` writes (so a caller can hash what it writes)."""
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()


def write_json_atomic(uri: str, obj: Any) -> None:
    write_bytes_atomic(uri, json_bytes(obj))


def read_json(uri: str) -> Any:
    data = read_bytes(uri)
    try:
        return json.loads(data)
    except json.JSONDecodeError as e:
        raise StorageError(f"{uri}: not valid JSON ({e.msg} at line {e.lineno})") from None


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_uri(uri: str) -> str:
    fs, path = get_fs(uri)
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def local_copy(uri: str, tmp: str) -> str:
    """A local path holding `uri` (a file or a folder): the path itself when it is local, else a
    copy downloaded into `tmp` (the caller's temporary folder)."""
    if is_local(uri):
        return local_path(uri)
    fs, path = get_fs(uri)
    local = os.path.join(tmp, os.path.basename(path.rstrip("/")))
    if fs.isdir(path):
        fs.get(path.rstrip("/") + "/", local, recursive=True)
    else:
        fs.get(path, local)
    return local


def remove(uri: str, recursive: bool = False) -> None:
    fs, path = get_fs(uri)
    if fs.exists(path):
        fs.rm(path, recursive=recursive)


def listdir(uri: str) -> list[str]:
    """Names (not full paths) directly under a folder URI; empty if it does not exist."""
    fs, path = get_fs(uri)
    if not fs.exists(path):
        return []
    return sorted(os.path.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))


@contextmanager
def atomic_local_dir(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp folder next to `dest`; on success it replaces `dest` in one rename.

    A failure (or a kill) leaves `dest` as it was: readers never see a half-written folder.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".tmp", dir=dest.parent))
    try:
        yield tmp
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------- folder locks

LOCK_NAME = ".byteify.lock"


class LockHeld(StorageError):
    """Another live process holds the folder's lock."""


class FolderLock:
    """An exclusive lease on a folder (local or ``s3://``), kept alive by a heartbeat thread.

    The lock is a small JSON file ``.byteify.lock`` in the folder, created only if absent
    (``O_EXCL`` locally, ``If-None-Match`` on S3). A holder that dies leaves it behind, so it is
    taken over when its holder is gone: at once when the holder ran on this host and its PID no
    longer exists, else when its heartbeat is older than `lease_s`. `lost` turns True if
    another process took the lease over (e.g. this one was frozen for longer than the lease).
    """

    def __init__(self, folder: str, what: str, lease_s: float = 120.0):
        self.uri, self.what, self.lease_s = join(folder, LOCK_NAME), what, lease_s
        self.token = uuid.uuid4().hex
        self.lost = False
        self._etag: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> bytes:
        info = {"what": self.what, "host": socket.gethostname(), "pid": os.getpid(), "token": self.token}
        return json.dumps({**info, "heartbeat": time.time()}).encode()

    def acquire(self) -> FolderLock:
        for _ in range(3):  # a takeover can race another taker: look again
            if self._create():
                break
            held = self._read()
            if held is None:
                continue
            if held.get("token") == self.token:  # our takeover landed
                break
            if not self._stale(held):
                age = time.time() - held.get("heartbeat", 0)
                raise LockHeld(
                    f"{dirname(self.uri)}: in use by {held.get('what', '?')} (pid {held.get('pid')} on "
                    f"{held.get('host')}, heartbeat {age:.0f} s ago); wait for it to end or stop it "
                    f"(a dead holder's lock is taken over after {self.lease_s:.0f} s)"
                )
            self._take_over(held)
        else:
            raise LockHeld(f"{dirname(self.uri)}: lock contended, try again")
        self._thread = threading.Thread(target=self._beat, daemon=True, name="byteify-lock")
        self._thread.start()
        return self

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        held = self._read()
        if held is not None and held.get("token") == self.token:
            remove(self.uri)

    def __enter__(self) -> FolderLock:
        return self if self._thread is not None else self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def _stale(self, held: dict) -> bool:
        if time.time() - held.get("heartbeat", 0) > self.lease_s:
            return True
        if held.get("host") == socket.gethostname():
            try:
                os.kill(int(held.get("pid", -1)), 0)
            except ProcessLookupError:
                return True
            except (PermissionError, ValueError, OverflowError):
                return False
        return False

    # Local files and S3 objects differ only in how "create if absent" and "replace if still X" work.

    def _create(self) -> bool:
        if is_local(self.uri):
            path = local_path(self.uri)
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(self._record())
            return True
        return self._s3_put(IfNoneMatch="*")

    def _take_over(self, held: dict) -> None:
        if is_local(self.uri):
            path = local_path(self.uri)
            try:  # only one taker can move the stale file aside; the others see it gone
                os.rename(path, f"{path}.stale-{self.token}")
                os.remove(f"{path}.stale-{self.token}")
            except FileNotFoundError:
                pass
        elif held.get("_etag"):
            self._s3_put(IfMatch=held["_etag"])

    def _read(self) -> dict | None:
        try:
            if is_local(self.uri):
                with open(local_path(self.uri), "rb") as f:
                    return json.loads(f.read() or b"{}")
            fs, path = get_fs(self.uri)
            info = fs.info(path, refresh=True)
            return {**json.loads(fs.cat_file(path) or b"{}"), "_etag": info.get("ETag")}
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def _s3_put(self, **cond) -> bool:
        import botocore.exceptions

        fs, path = get_fs(self.uri)
        bucket, key, _ = fs.split_path(path)
        try:
            out = fs.call_s3("put_object", Bucket=bucket, Key=key, Body=self._record(), **cond)
        except (botocore.exceptions.ClientError, OSError) as e:
            cause = e if isinstance(e, botocore.exceptions.ClientError) else e.__cause__
            if getattr(cause, "response", {}).get("Error", {}).get("Code") == "PreconditionFailed":
                return False  # someone else's lock now: created or replaced in between
            raise StorageError(_describe(self.uri, e)) from None
        fs.invalidate_cache(path)
        self._etag = out.get("ETag")
        return True

    def _beat(self) -> None:
        while not self._stop.wait(self.lease_s / 4):
            held = self._read()
            if held is None or held.get("token") != self.token:
                self.lost = True
                return
            if is_local(self.uri):
                write_bytes_atomic(self.uri, self._record())
            elif not self._s3_put(IfMatch=held["_etag"]):
                self.lost = True
                return


def dirname(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[0]


def lock_folder(folder: str, what: str, lease_s: float = 120.0) -> FolderLock:
    """Take the folder's lock (a context manager); LockHeld with one line when a live process has it."""
    return FolderLock(folder, what, lease_s).acquire()
