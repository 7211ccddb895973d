"""Data preparation: read documents, label them with the source tokenizer, write byte shards.

Pure functions (no Prefect). The pipeline is plan -> label each unit -> manifest:

* ``plan_dataset`` resolves the sources into *units* (``corpus.py``: byte ranges of JSONL
  files, runs of Parquet row groups, groups of small files, ``hf:`` streaming shards,
  built-in corpus parts) from listings and footers alone: no document is counted first.
* ``label_unit`` streams one unit's documents, skips empty ones, cuts long ones at token
  boundaries (``split_stream``, never holding a long document whole), assigns each to
  train/validation by hashing its id, labels them in batches of ``LABEL_BATCH_BYTES``
  (``subword.label_flat``) and writes shards of at most ``shard_docs`` rows or
  ``shard_bytes`` text bytes, one Parquet file per split, row group by row group, each
  stored atomically. Then the unit's done-marker. Its output depends only on the plan, so
  any parallelism (threads, processes, a Dask cluster) gives byte-identical shards.
* ``run_units`` submits units in order (``in_flight`` at a time) and stops once the results
  so far hold the token budget; ``write_manifest`` writes the manifest last, keeping the
  shards up to the first one where the budget is met (``TokenBudget``).

Memory: a labelling worker holds one label batch and the current shard's compressed
bytes, plus the longest single line (JSONL) or row group (Parquet) of its input; a text
file or a long document is streamed (docs/scale.md, "Memory").

Sources (strings): a local path, directory or glob, ``file://`` or ``s3://`` URI of text
files (one document per file), JSONL (one per line) or Parquet (one per row), optionally
``.gz``/``.zst``/``.bz2``/``.xz`` compressed; append ``?column=NAME`` to read another text
column than ``text``. ``hf:PATH?name=CFG&split=S`` streams a Hugging Face dataset
(``hf:json?data_files=/x/*.jsonl`` or ``hf:/a/folder`` for local files); ``builtin:wiki`` is
the offline Wikipedia extracts (en/fr/es) and ``builtin:wiki+code`` adds the CPython
standard library's ``.py`` files. Document ids: ``corpus.py``; a long document's pieces add
``#part<k>``. Empty documents are skipped and counted; NUL bytes and invalid UTF-8 are
data (policy in docs/internals.md; invalid-UTF-8 documents are counted).

Output under ``out_uri``: ``data-<key>/{train,validation}-<unit>-<k>.parquet`` (columns
``doc_id, text_bytes, token_ids, token_ends``), ``data-<key>/done-<unit>.json`` (a unit's
done-marker) and ``manifest.json``: format, ``inputs_key`` (hash of the inputs with their
fingerprints, tokenizer, config and budget: the idempotency key), ``job_key`` (the same
without fingerprints and budget: which output folder a job may replace), inputs (sources,
the units used with their fingerprints), budget and what was used from each source,
tokenizer (source, fingerprint, separator and pad ids), config, counts (skipped empty,
invalid UTF-8, split long docs), per-split totals, per-shard ``uri`` (relative to the
manifest), unit, split, rows, bytes, tokens, sha256, file bytes, the code version and
``manifest_hash`` (sha256 of the canonical JSON without that field). No timestamps: the
same job gives the same manifest, byte for byte.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import uuid
from collections import deque
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import storage
from .config import DataConfig
from .corpus import (
    UNIT_BYTES,
    DataError,
    code_files,
    first_line,
    iter_documents,
    iter_unit,
    resolve_source,
    wiki_docs,
)
from .source import SourceConfig, load_tokenizer

# Re-exported: callers know them as data.*
__all__ = ["UNIT_BYTES", "DataError", "code_files", "iter_documents", "wiki_docs"]

MAX_DOC_BYTES = 1 << 20  # documents above this are split at token boundaries before labeling
SPLIT_CONTEXT = 4096  # bytes of context tokenized on each side of a candidate cut
SPLIT_MARGIN = 512  # cuts closer than this to the context's left edge are not trusted
SHARD_BYTES = 32 << 20  # text bytes per shard at most (and shard_docs rows); its file: ~1.2-2x
LABEL_BATCH_BYTES = 512 << 10  # text per tokenizer call: the encoder holds ~30x this while it runs
VERIFY_HASH_MAX_BYTES = 256 << 20  # a re-run re-hashes local shards up to this total
MANIFEST_NAME = "manifest.json"
FORMAT = "byteify-shards/2"
READABLE_FORMATS = ("byteify-shards/1", FORMAT)  # same shard schema and shard entries
SPLITS = ("train", "validation")
COUNTS = ("skipped_empty_docs", "invalid_utf8_docs", "split_long_docs")
SHARD_SCHEMA = pa.schema(
    [
        ("doc_id", pa.string()),
        ("text_bytes", pa.binary()),
        ("token_ids", pa.list_(pa.uint32())),
        ("token_ends", pa.list_(pa.uint32())),
    ]
)


# ---------------------------------------------------------------- split, long docs, labels


def split_of(doc_id: str, validation_fraction: float, seed: int) -> str:
    """Train or validation, from a hash of the id alone (stable when the corpus grows)."""
    h = int.from_bytes(
        hashlib.sha256(f"{seed}:{doc_id}".encode("utf-8", "surrogateescape")).digest()[:8], "big"
    )
    return "validation" if h < validation_fraction * 2.0**64 else "train"


def _chunks_of(data) -> object:
    if isinstance(data, bytes | bytearray | memoryview):
        mv = memoryview(data)
        return (mv[i : i + MAX_DOC_BYTES] for i in range(0, len(mv), MAX_DOC_BYTES))
    return iter(data)


def _cut(tok, data: bytearray, max_bytes: int) -> int:
    """Where to end the first piece of `data` (longer than max_bytes): a token end near max_bytes.

    The cut is a token end of the tokenization of the bytes around it (pre-tokenization is
    local, so that end is also a token end of the whole document), preferring whitespace
    and never inside a UTF-8 character.
    """
    from .subword import label_documents

    target = max_bytes
    lo, hi = max(0, target - SPLIT_CONTEXT), min(len(data), target + SPLIT_CONTEXT)
    _, ends = label_documents(tok, [bytes(data[lo:hi])])[0]
    ends = ends.astype(np.int64) + lo
    ok = ends[(ends <= target) & (ends > min(lo + SPLIT_MARGIN, target - 1))]
    ok = ok[[(data[e] & 0xC0) != 0x80 for e in ok]] if len(ok) else ok
    ws = ok[[data[e - 1] in b" \n\t\r" or data[e] in b" \n\t\r" for e in ok]] if len(ok) else ok
    if len(ws):
        return int(ws[-1])
    if len(ok):
        return int(ok[-1])
    cut = target  # one token longer than the context: cut on a character boundary
    while cut > 1 and (data[cut] & 0xC0) == 0x80:
        cut -= 1
    return cut


def split_stream(tok, data, max_bytes: int = MAX_DOC_BYTES):
    """Pieces of at most `max_bytes` of a document (bytes, or an iterator of chunks), cut where a token ends.

    Streams: holds at most max_bytes + SPLIT_CONTEXT bytes plus one chunk, whatever the
    document's length.
    """
    chunks, buf, eof = _chunks_of(data), bytearray(), False
    while True:
        while not eof and len(buf) <= max_bytes + SPLIT_CONTEXT:
            chunk = next(chunks, None)
            if chunk is None:
                eof = True
            else:
                buf += chunk
        if len(buf) <= max_bytes:
            if buf:
                yield bytes(buf)
            return
        cut = _cut(tok, buf, max_bytes)
        yield bytes(buf[:cut])
        del buf[:cut]


def split_long_document(tok, data: bytes, max_bytes: int = MAX_DOC_BYTES) -> list[bytes]:
    """`split_stream` of a document held in memory, as a list."""
    return list(split_stream(tok, data, max_bytes))


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def _pieces(tok, doc_id: str, data, max_doc_bytes: int) -> tuple[list | object, bool]:
    """(pieces as (id, bytes), whether the document is long): one piece unless it is long."""
    if isinstance(data, bytes) and len(data) <= max_doc_bytes:
        return [(doc_id, data)], False
    parts = split_stream(tok, data, max_doc_bytes)
    return ((f"{doc_id}#part{k}", p) for k, p in enumerate(parts)), True


def label_batch(tok, docs: list[tuple[str, bytes]], max_doc_bytes: int = MAX_DOC_BYTES):
    """Skip empty docs, split long ones, label the rest: (rows, counts).

    rows: list of (doc_id, bytes, token_ids, token_ends); pieces of a split document get
    ids ``<id>#part<k>``.
    """
    from .subword import label_documents

    counts = dict.fromkeys(COUNTS, 0)
    ids, datas = [], []
    for doc_id, data in docs:
        if not data:
            counts["skipped_empty_docs"] += 1
            continue
        if not data.isascii() and not _is_utf8(data):  # isascii: no decode for most documents
            counts["invalid_utf8_docs"] += 1
        pieces, long = _pieces(tok, doc_id, data, max_doc_bytes)
        counts["split_long_docs"] += long
        for pid, p in pieces:
            ids.append(pid)
            datas.append(p)
    labels = label_documents(tok, datas) if datas else []
    rows = [(i, d, t, e) for i, d, (t, e) in zip(ids, datas, labels)]
    return rows, counts


def shard_table(rows) -> pa.Table:
    """A Parquet-ready table from (doc_id, bytes, token_ids, token_ends) rows."""
    lens = np.array([len(r[2]) for r in rows], dtype=np.int64)
    cat = lambda k: (
        np.concatenate([np.asarray(r[k], dtype=np.uint32) for r in rows]) if rows else np.zeros(0, np.uint32)
    )
    offsets = np.concatenate([[0], np.cumsum(lens)])
    return _table([r[0] for r in rows], [r[1] for r in rows], cat(2), cat(3), offsets)


def _table(ids, datas, token_ids, token_ends, doc_offsets) -> pa.Table:
    offsets = pa.array(np.asarray(doc_offsets).astype(np.int32))
    return pa.table(
        {
            "doc_id": pa.array(ids, pa.string()),
            "text_bytes": pa.array(datas, pa.binary()),
            "token_ids": pa.ListArray.from_arrays(offsets, pa.array(token_ids, pa.uint32())),
            "token_ends": pa.ListArray.from_arrays(offsets, pa.array(token_ends, pa.uint32())),
        },
        schema=SHARD_SCHEMA,
    )


class ShardWriter:
    """One shard file: row groups appended to a compressed in-memory file, stored atomically on close.

    Nothing reaches storage before `close`, so a failure mid-shard leaves no partial file.
    """

    def __init__(self, uri: str, rel: str = "", split: str = "train"):
        self.uri, self.rel, self.split = uri, rel, split
        self.buf = io.BytesIO()
        self.writer = pq.ParquetWriter(self.buf, SHARD_SCHEMA, compression="zstd")
        self.rows = self.bytes = self.tokens = 0

    def write(self, table: pa.Table) -> None:
        self.writer.write_table(table)
        self.rows += table.num_rows
        self.bytes += pc.sum(pc.binary_length(table["text_bytes"])).as_py() or 0
        self.tokens += pc.sum(pc.list_value_length(table["token_ids"])).as_py() or 0

    def close(self) -> dict:
        """Store the file; its manifest entry."""
        self.writer.close()
        data = self.buf.getvalue()
        self.buf = None
        try:
            storage.write_bytes_atomic(self.uri, data)
        except storage.StorageError as e:
            raise DataError(f"cannot write shard: {e}") from None
        return {
            "uri": self.rel,
            "split": self.split,
            "rows": self.rows,
            "bytes": self.bytes,
            "tokens": self.tokens,
            "sha256": storage.sha256_bytes(data),
            "file_bytes": len(data),
        }


def write_shard(uri: str, rows) -> dict:
    """Write one shard of (doc_id, bytes, token_ids, token_ends) rows atomically; sha256 and size."""
    w = ShardWriter(uri)
    w.write(shard_table(rows))
    e = w.close()
    return {"sha256": e["sha256"], "file_bytes": e["file_bytes"]}


def read_shard(uri: str) -> pa.Table:
    try:
        return pq.read_table(io.BytesIO(storage.read_bytes(uri)), schema=SHARD_SCHEMA)
    except storage.StorageError as e:
        raise DataError(str(e)) from None
    except Exception as e:
        raise DataError(f"{uri}: not a byteify shard ({first_line(e)})") from None


# ---------------------------------------------------------------- token budget


@dataclass(frozen=True)
class TokenBudget:
    """Stop preparing once the train split holds `train_tokens` tokens and the validation split
    `validation_tokens` tokens and `validation_bytes` bytes (shard granularity)."""

    train_tokens: int
    validation_tokens: int = 0
    validation_bytes: int = 0

    def __post_init__(self):
        for k, v in asdict(self).items():
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise DataError(f"token budget: {k}={v!r} must be a whole number >= 0")

    @classmethod
    def for_preset(cls, preset, max_tokens: int | None = None, validation_bytes: int = 0) -> TokenBudget:
        """What both stages consume (steps x global batch x window tokens each), or `max_tokens`;
        the validation split needs the in-training evaluation's windows (+1 token each for a
        skipped separator) and `validation_bytes` for the final evaluation."""
        P = preset.data.window_tokens
        stages = (preset.stage1, preset.stage2)
        train = max_tokens if max_tokens is not None else sum(s.steps * s.global_batch * P for s in stages)
        val_windows = max(max(1, s.eval_batches) * s.micro_batch for s in stages)
        return cls(int(train), val_windows * (P + 1), int(validation_bytes))

    def met(self, totals: dict) -> bool:
        return (
            totals["train_tokens"] >= self.train_tokens
            and totals["validation_tokens"] >= self.validation_tokens
            and totals["validation_bytes"] >= self.validation_bytes
        )


def _budget(plan_or_job: dict) -> TokenBudget | None:
    b = plan_or_job.get("budget")
    return TokenBudget(**b) if b else None


def _add_pair(totals: dict, pair: dict) -> None:
    for e in pair["entries"]:
        totals[f"{e['split']}_tokens"] += e["tokens"]
        totals[f"{e['split']}_bytes"] += e["bytes"]


def _zero_totals() -> dict:
    return {f"{s}_{k}": 0 for s in SPLITS for k in ("tokens", "bytes")}


# ---------------------------------------------------------------- labelling one unit


def _unit_marker(job: dict, index: int) -> str:
    return storage.join(job["out_uri"], job["folder"], f"done-{index:05d}.json")


class _UnitLabeler:
    """Streams one unit's documents into bounded shards (both splits side by side); see label_unit."""

    def __init__(self, job: dict, index: int, tok):
        from .subword import get_vocab

        self.job, self.index, self.tok, self.vocab = job, index, tok, get_vocab(tok)
        self.cfg, self.budget = job["config"], _budget(job)
        self.pairs: list[dict] = []
        self.totals = _zero_totals()
        self._open_pair()

    def _open_pair(self) -> None:
        k = len(self.pairs)
        rel = {s: f"{self.job['folder']}/{s}-{self.index:05d}-{k:04d}.parquet" for s in SPLITS}
        self.writers = {s: ShardWriter(storage.join(self.job["out_uri"], rel[s]), rel[s], s) for s in SPLITS}
        self.pending = {s: ([], []) for s in SPLITS}
        self.pending_bytes = self.rows = self.bytes = 0
        self.counts = dict.fromkeys(COUNTS, 0)

    def add(self, doc_id: str, data) -> bool:
        """Take one document; False once this unit alone holds the budget (stop reading)."""
        if isinstance(data, bytes) and not data:
            self.counts["skipped_empty_docs"] += 1
            return True
        split = split_of(doc_id, self.cfg["validation_fraction"], self.cfg["split_seed"])
        pieces, long = _pieces(self.tok, doc_id, data, self.cfg["max_doc_bytes"])
        self.counts["split_long_docs"] += long
        invalid = False
        for pid, piece in pieces:
            invalid = invalid or (not piece.isascii() and not _is_utf8(piece))
            ids, datas = self.pending[split]
            ids.append(pid)
            datas.append(piece)
            self.pending_bytes += len(piece)
            self.rows += 1
            self.bytes += len(piece)
            if self.pending_bytes >= LABEL_BATCH_BYTES:
                self._label_pending()
            # A shard may end inside a long document: its pieces are independent rows.
            if self.rows >= self.cfg["shard_docs"] or self.bytes >= self.cfg["shard_bytes"]:
                if not self._close_pair():
                    return False
        self.counts["invalid_utf8_docs"] += invalid
        return True

    def _label_pending(self) -> None:
        from .subword import label_flat

        for s in SPLITS:
            ids, datas = self.pending[s]
            if ids:
                tid, tend, off = label_flat(self.tok, datas, self.vocab)
                self.writers[s].write(_table(ids, datas, tid, tend, off))
            self.pending[s] = ([], [])
        self.pending_bytes = 0

    def _close_pair(self) -> bool:
        """Store the current shard pair; False when the budget is now met."""
        self._label_pending()
        pair = {
            "k": len(self.pairs),
            "counts": self.counts,
            "entries": [self.writers[s].close() for s in SPLITS],
        }
        self.pairs.append(pair)
        _add_pair(self.totals, pair)
        self._open_pair()
        return not (self.budget and self.budget.met(self.totals))

    def finish(self, complete: bool) -> dict:
        if complete and (self.rows or any(self.counts.values())):
            self._close_pair()
        return {
            "index": self.index,
            "source": self.job["units_source"][self.index],
            "complete": complete,
            "pairs": self.pairs,
        }


def label_docs(job: dict, index: int, docs, tok) -> dict:
    """Label (doc_id, data) pairs into unit `index`'s shards; the unit's result (no marker).

    What `label_unit` does once the unit is read; stops at the budget (``complete`` False).
    """
    lab = _UnitLabeler(job, index, tok)
    for doc_id, data in docs:
        if not lab.add(doc_id, data):
            return lab.finish(complete=False)
    return lab.finish(complete=True)


def label_unit(job: dict, index: int, unit: dict, tok) -> dict:
    """Read, label and write unit `index` (shards of both splits), then its done-marker; idempotent.

    `job` is the plan without its unit list. The marker (the unit's result) is written after
    every shard file, so a restarted run skips finished units and redoes the rest.
    """
    marker = _unit_marker(job, index)
    if storage.exists(marker):
        try:
            return storage.read_json(marker)
        except storage.StorageError:
            pass  # unreadable marker: redo the unit
    docs = iter_unit(unit, job["config"]["max_doc_bytes"])
    try:
        out = label_docs(job, index, docs, tok)
    finally:
        docs.close()  # a unit stopped at the budget closes its input now
    try:
        storage.write_json_atomic(marker, out)
    except storage.StorageError as e:
        raise DataError(f"cannot write the unit's marker: {e}") from None
    return out


# ---------------------------------------------------------------- plan, units, manifest


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


def _unit_order(unit: dict, seed: int) -> str:
    """A unit's place in the plan: a hash of where it reads (not of its content) and the seed.

    Units of all sources are interleaved in this seeded order, so a token budget takes a
    sample of whole units across every source and file rather than the first files listed
    (a mix whose files are grouped by origin keeps its proportions), and a new input file
    only inserts its own units.
    """
    where = [{k: v for k, v in p.items() if k != "fp"} for p in unit["parts"]]
    return _hash([seed, unit["kind"], where])


def plan_dataset(
    sources: list[str],
    tok_info: dict,
    out_uri: str,
    data_cfg: DataConfig,
    text_column: str = "text",
    max_doc_bytes: int = MAX_DOC_BYTES,
    budget: TokenBudget | None = None,
    unit_bytes: int = UNIT_BYTES,
    shard_bytes: int = SHARD_BYTES,
) -> dict:
    """The whole job as a JSON-able dict: units (with input fingerprints), config, budget, output names."""
    if not sources:
        raise DataError("no data sources given")
    if not isinstance(sources, list | tuple) or not all(isinstance(s, str) and s for s in sources):
        raise DataError(f"data sources {sources!r}: expected a list of non-empty strings")
    units = [u for i, s in enumerate(sources) for u in resolve_source(s, text_column, i, unit_bytes)]
    if not units:
        raise DataError(f"{', '.join(sources)}: no input files")
    units.sort(key=lambda u: _unit_order(u, data_cfg.split_seed))
    cfg = {
        "shard_docs": data_cfg.shard_docs,
        "shard_bytes": shard_bytes,
        "unit_bytes": unit_bytes,
        "validation_fraction": data_cfg.validation_fraction,
        "split_seed": data_cfg.split_seed,
        "max_doc_bytes": max_doc_bytes,
        "text_column": text_column,
    }
    job_key = _hash({"format": FORMAT, "sources": list(sources), "tokenizer": tok_info, "config": cfg})
    if budget and not data_cfg.validation_fraction:  # no validation split: nothing to wait for there
        budget = TokenBudget(budget.train_tokens)
    b = asdict(budget) if budget else None
    key = _hash({"job_key": job_key, "units": units, "budget": b})
    return {
        "format": FORMAT,
        "key": key,
        "job_key": job_key,
        "out_uri": out_uri.rstrip("/"),
        "folder": f"data-{key[:12]}",
        "sources": list(sources),
        "tokenizer": tok_info,
        "config": cfg,
        "budget": b,
        "units_source": [u["source"] for u in units],
        "units": units,
    }


def job_of(plan: dict) -> dict:
    """The plan without its unit list: what every unit task needs besides its own unit."""
    return {k: v for k, v in plan.items() if k != "units"}


def _selected(plan: dict, results: list[dict]) -> tuple[list[tuple[dict, int]], bool]:
    """([(unit result, shard pairs used)], budget met): every pair up to the one that meets the budget."""
    budget, totals, used = _budget(plan), _zero_totals(), []
    for r in sorted(results, key=lambda r: r["index"]):
        n = 0
        for pair in r["pairs"]:
            n += 1
            _add_pair(totals, pair)
            if budget and budget.met(totals):
                used.append((r, n))
                return used, True
        used.append((r, n))
    return used, False


class _Now:
    """A future that runs its call when asked for the result (one worker: nothing is read ahead)."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def result(self):
        return self.fn(*self.args)


def run_units(plan: dict, submit, in_flight: int = 1, on_result=None) -> list[dict]:
    """Results of the plan's units in order: `submit(i)` returns a future (anything with `.result()`).

    At most `in_flight` units run at once; once the results so far hold the budget nothing
    more is submitted. Units still running then finish (their shards stay unreferenced)
    and their errors are ignored: what the manifest holds never depends on timing.
    `on_result(results)` is called after each unit's result (progress display).
    """
    budget, totals = _budget(plan), _zero_totals()
    n, results, pending, nxt = len(plan["units"]), [], deque(), 0
    try:
        while len(results) < n:
            while nxt < n and len(pending) < max(1, in_flight):
                pending.append(submit(nxt))
                nxt += 1
            results.append(pending.popleft().result())
            if on_result:
                on_result(results)
            if budget and _reaches(budget, totals, results[-1]):
                break
    finally:
        for f in pending:
            try:
                f.result()
            except Exception:  # noqa: S110 - a unit past the budget: its output is not used
                pass
    return results


def _reaches(budget: TokenBudget, totals: dict, result: dict) -> bool:
    for pair in result["pairs"]:
        _add_pair(totals, pair)
        if budget.met(totals):
            return True
    return False


def _source_usage(plan: dict, used: list[tuple[dict, int]]) -> list[dict]:
    out = []
    for i, src in enumerate(plan["sources"]):
        planned = sum(1 for s in plan["units_source"] if s == i)
        mine = [(r, n) for r, n in used if r["source"] == i]
        t = _zero_totals()
        for r, n in mine:
            for pair in r["pairs"][:n]:
                _add_pair(t, pair)
        whole = len(mine) == planned and all(r["complete"] and n == len(r["pairs"]) for r, n in mine)
        out.append({"source": src, "units_planned": planned, "units_used": len(mine), "all_read": whole, **t})
    return out


def build_manifest(plan: dict, results: list[dict]) -> dict:
    used, met = _selected(plan, results)
    counts = dict.fromkeys(COUNTS, 0)
    totals = {s: {"shards": 0, "rows": 0, "bytes": 0, "tokens": 0} for s in SPLITS}
    shards, units = [], []
    for r, n in used:
        units.append({**plan["units"][r["index"]], "index": r["index"], "shard_pairs": n})
        for pair in r["pairs"][:n]:
            for k, v in pair["counts"].items():
                counts[k] += v
            for e in pair["entries"]:
                shards.append({**e, "unit": r["index"]})
                t = totals[e["split"]]
                t["shards"] += 1
                for k in ("rows", "bytes", "tokens"):
                    t[k] += e[k]
    if totals["train"]["rows"] + totals["validation"]["rows"] == 0:
        raise DataError(
            f"{', '.join(plan['sources'])}: no documents to prepare "
            f"({counts['skipped_empty_docs']} empty ones skipped)"
        )
    m = {
        "format": FORMAT,
        "inputs_key": plan["key"],
        "job_key": plan["job_key"],
        "inputs": {"sources": plan["sources"], "units_planned": len(plan["units"]), "units": units},
        "budget": plan["budget"],
        "budget_met": met,
        "used": _source_usage(plan, used),
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
    if not isinstance(m, dict) or m.get("format") not in READABLE_FORMATS:
        raise DataError(
            f"{uri}: not a byteify manifest (format {m.get('format') if isinstance(m, dict) else '?'})"
        )
    if m.get("manifest_hash") != manifest_hash(m):
        raise DataError(f"{uri}: manifest_hash does not match its content (edited or damaged)")
    return m


def damaged_units(uri: str, m: dict) -> list[int]:
    """Units whose shards are missing or differ in size (or, for local shards up to
    VERIFY_HASH_MAX_BYTES in all, in sha256) from the manifest `m` at `uri`."""
    folder = uri.rsplit("/", 1)[0]
    fs, _ = storage.get_fs(folder)
    sizes = {}
    for sub in {e["uri"].split("/")[0] for e in m["shards"]}:
        _, path = storage.get_fs(storage.join(folder, sub))
        found = fs.find(path, detail=True) if fs.exists(path) else {}
        sizes |= {p.rstrip("/").rsplit("/", 1)[-1]: int(i.get("size") or 0) for p, i in found.items()}
    deep = storage.is_local(folder) and sum(e["file_bytes"] for e in m["shards"]) <= VERIFY_HASH_MAX_BYTES
    bad = set()
    for e in m["shards"]:
        name = e["uri"].rsplit("/", 1)[-1]
        ok = sizes.get(name) == e["file_bytes"]
        if ok and deep:
            ok = storage.sha256_uri(storage.join(folder, e["uri"])) == e["sha256"]
        if not ok:
            bad.add(e.get("unit", -1))
    return sorted(bad)


def _same_job(m: dict, plan: dict) -> bool:
    if m.get("job_key"):
        return m["job_key"] == plan["job_key"]
    # An older manifest format: the same sources and tokenizer make it the same job.
    return (
        m.get("inputs", {}).get("sources") == plan["sources"]
        and m.get("tokenizer", {}).get("fingerprint") == plan["tokenizer"]["fingerprint"]
    )


def existing_manifest(plan: dict) -> str | None:
    """The manifest URI when `out_uri` already holds this exact job with every shard intact.

    Same job but changed inputs (fingerprints), budget or format: None (prepare again; the
    old manifest is kept beside the new one). A damaged or missing shard: its unit's marker
    is removed and None returned, so the run rebuilds it. Another job: DataError.
    """
    uri = manifest_uri(plan["out_uri"])
    if not storage.exists(uri):
        return None
    m = read_manifest(uri)
    if m.get("inputs_key") == plan["key"]:
        bad = damaged_units(uri, m)
        if not bad:
            return uri
        for i in bad:
            if i >= 0:
                storage.remove(_unit_marker(plan, i))
        return None
    if _same_job(m, plan):
        return None
    raise DataError(
        f"{uri}: already holds data prepared from other sources, tokenizer or config "
        f"(job {str(m.get('job_key') or m.get('inputs_key', ''))[:12]} != {plan['job_key'][:12]}); "
        "choose another output"
    )


def check_output(out_uri: str) -> None:
    """Write and remove a probe object: a missing bucket or a read-only folder fails now, not after labelling."""
    probe = storage.join(out_uri, f".byteify-probe-{uuid.uuid4().hex[:8]}")
    try:
        storage.write_bytes_atomic(probe, b"")
        storage.remove(probe)
    except Exception as e:  # StorageError, botocore errors
        raise DataError(f"{out_uri}: output location is not writable ({first_line(e)})") from None


def write_manifest(plan: dict, results: list[dict]) -> tuple[str, str]:
    """Write the manifest (last, atomically): (uri, manifest_hash).

    A different manifest already there (same job, older inputs) is kept as
    ``manifest-<its hash>.json`` first: nothing written before is lost.
    """
    m = build_manifest(plan, results)
    uri = manifest_uri(plan["out_uri"])
    try:
        if storage.exists(uri):
            old = storage.read_bytes(uri)
            try:
                old_hash = json.loads(old).get("manifest_hash", "")
            except (json.JSONDecodeError, AttributeError):
                old_hash = storage.sha256_bytes(old)
            if old_hash == m["manifest_hash"]:
                return uri, m["manifest_hash"]
            storage.write_bytes_atomic(storage.join(plan["out_uri"], f"manifest-{old_hash[:12]}.json"), old)
        storage.write_json_atomic(uri, m)
    except storage.StorageError as e:
        raise DataError(str(e)) from None
    return uri, m["manifest_hash"]


# ---------------------------------------------------------------- one call

_WORKER_TOK = {}


def _label_in_worker(job: dict, index: int, unit: dict, src: SourceConfig) -> dict:
    # Process workers load the tokenizer once each (it cannot be shared across processes).
    key = (src.name_or_path, src.revision)
    if key not in _WORKER_TOK:
        _WORKER_TOK[key] = load_tokenizer(src)
    return label_unit(job, index, unit, _WORKER_TOK[key])


def run_local(plan: dict, tok, src: SourceConfig, workers: int = 1, executor: str = "thread") -> list[dict]:
    """Label the plan's units on this machine: in order, or on `workers` threads or processes."""
    job, units = job_of(plan), plan["units"]
    if workers <= 1:
        return run_units(plan, lambda i: _Now(label_unit, job, i, units[i], tok))
    if executor == "process":
        with ProcessPoolExecutor(workers) as ex:
            return run_units(plan, lambda i: ex.submit(_label_in_worker, job, i, units[i], src), workers)
    # The Rust tokenizer releases the GIL while encoding, so threads share one tokenizer.
    with ThreadPoolExecutor(workers) as ex:
        return run_units(plan, lambda i: ex.submit(label_unit, job, i, units[i], tok), workers)


def prepare_dataset(
    sources: list[str],
    tokenizer_source: SourceConfig,
    out_uri: str,
    data_cfg: DataConfig,
    workers: int = 1,
    text_column: str = "text",
    max_doc_bytes: int = MAX_DOC_BYTES,
    executor: str = "thread",
    budget: TokenBudget | None = None,
    unit_bytes: int = UNIT_BYTES,
    shard_bytes: int = SHARD_BYTES,
) -> str:
    """Prepare byte shards + manifest under `out_uri`; returns the manifest URI.

    Does nothing when `out_uri` already holds the manifest of the same inputs, tokenizer,
    config and budget with every shard intact.
    """
    tok = load_tokenizer(tokenizer_source)
    info = tokenizer_info(tok, tokenizer_source)
    plan = plan_dataset(
        sources, info, out_uri, data_cfg, text_column, max_doc_bytes, budget, unit_bytes, shard_bytes
    )
    done = existing_manifest(plan)
    if done:
        return done
    check_output(plan["out_uri"])
    with storage.lock_folder(plan["out_uri"], "data preparation"):  # a second preparer is refused
        results = run_local(plan, tok, tokenizer_source, workers, executor)
        return write_manifest(plan, results)[0]
