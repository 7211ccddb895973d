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
import tempfile
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
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
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


def write_json_atomic(uri: str, obj: Any) -> None:
    write_bytes_atomic(uri, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


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
