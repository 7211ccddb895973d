"""Training windows from byte shards, in the batch format of docs/internals.md.

The documents of one split (manifest order) are packed into one token stream
``doc0 tokens, SEP, doc1 tokens, SEP, ...`` with its byte stream alongside (SEP is the
single byte id 1). Window w covers P = window_tokens tokens starting at w*P; a window that
would start on SEP starts after it (docs/architecture.md §1.3 strips leading separators; starting later
instead of padding keeps every window full, at the cost of overlapping the next window by
that token). ``state_dict()`` is (epoch, batch) so a restart resumes at the exact next batch.

Two loaders, one batch format (``fill_windows`` + ``finish_batch``):

* ``WindowLoader`` holds the split in memory (numpy, about 3 bytes per text byte), shuffles
  all its windows per (seed, epoch) and deals global micro-batch k to rank k % world.
* ``StreamingWindowLoader`` reads only this rank's shards, lazily, with ``PREFETCH_SHARDS``
  read ahead in a thread: per (seed, epoch) the split's shards are permuted and dealt to
  ranks (rank r takes every world-th), the rank's shards form its stream, and its windows
  are shuffled within blocks of ``SHUFFLE_WINDOWS`` consecutive windows (a shuffle buffer
  whose content is a pure function of the position, so a resume rebuilds it exactly from
  (epoch, batch): it reads from the block's first shard on, nothing before it).

``WindowLoader.from_config`` picks one: ``DataConfig.loader`` = memory | streaming, or auto:
in memory up to ``IN_MEMORY_MAX_BYTES`` of split text (faster there, and a global shuffle:
benchmarks/bench_loader.py), streaming above it.
"""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from . import storage
from .byte_tokenizer import BOS, OFFSET, PAD
from .data import SHARD_SCHEMA, DataError, read_manifest
from .subword import RetainedIndex, SubwordVocab

IN_MEMORY_MAX_BYTES = 256 << 20  # auto: a split with up to this much text is held in memory
SHUFFLE_WINDOWS = 1024  # streaming: windows shuffled together (one block)
PREFETCH_SHARDS = 2  # streaming: shards read ahead of the one in use
LOADERS = ("auto", "memory", "streaming")
_COLUMNS = ["text_bytes", "token_ids", "token_ends"]


def _resolve(manifest_uri: str, rel: str) -> str:
    folder = manifest_uri.rsplit("/", 1)[0] if "/" in manifest_uri else "."
    return rel if "://" in rel or rel.startswith("/") else storage.join(folder, rel)


def _manifest_json(manifest_uri: str) -> str:
    return manifest_uri if manifest_uri.endswith(".json") else storage.join(manifest_uri, "manifest.json")


def _checked_split(manifest_uri: str, split: str, m: dict | None = None) -> dict:
    m = m or read_manifest(manifest_uri)
    if split not in ("train", "validation"):
        raise DataError(f"{manifest_uri}: unknown split '{split}' (train or validation)")
    return m


def read_shard_checked(uri: str, sha256: str) -> pa.Table:
    """A shard's loader columns, after checking its sha256 against the manifest."""
    try:
        data = storage.read_bytes(uri)
    except storage.StorageError as err:
        raise DataError(str(err)) from None
    if storage.sha256_bytes(data) != sha256:
        raise DataError(f"{uri}: sha256 differs from the manifest (shard changed or damaged)")
    return pq.read_table(io.BytesIO(data), schema=SHARD_SCHEMA, columns=_COLUMNS)


def split_texts(manifest_uri: str, split: str, max_bytes: int) -> list[bytes]:
    """The first documents of a split, as raw text, until `max_bytes` are reached (shard order).

    Reads only the shards it needs, each checked against the manifest's sha256: evaluation and
    speed prompts use held-out text exactly as training would have seen it."""
    manifest_uri = _manifest_json(manifest_uri)
    m = _checked_split(manifest_uri, split)
    docs, total = [], 0
    for e in m["shards"]:
        if e["split"] != split or not e.get("rows"):
            continue
        for data in read_shard_checked(_resolve(manifest_uri, e["uri"]), e["sha256"])[
            "text_bytes"
        ].to_pylist():
            docs.append(bytes(data))
            total += len(data)
            if total >= max_bytes:
                return docs
    return docs


def load_split(manifest_uri: str, split: str) -> tuple[dict, pa.Table]:
    """(manifest, all rows of one split) with every shard's sha256 checked."""
    manifest_uri = _manifest_json(manifest_uri)
    m = _checked_split(manifest_uri, split)
    tables = [
        read_shard_checked(_resolve(manifest_uri, e["uri"]), e["sha256"])
        for e in m["shards"]
        if e["split"] == split
    ]
    if not tables:
        return m, SHARD_SCHEMA.empty_table().select(_COLUMNS)
    return m, pa.concat_tables(tables).combine_chunks()


def pack_stream(table: pa.Table, sep_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(token ids, token byte starts incl. a final end, byte ids) of the packed split."""
    n_docs = table.num_rows
    if n_docs == 0:
        return np.zeros(0, np.int64), np.zeros(1, np.int64), np.zeros(0, np.int16)
    ids_col, ends_col = table.column("token_ids").chunk(0), table.column("token_ends").chunk(0)
    ids = ids_col.flatten().to_numpy().astype(np.int64)
    ends = ends_col.flatten().to_numpy().astype(np.int64)
    doc_tok_end = ids_col.offsets.to_numpy()[1:].astype(np.int64)  # token index where each doc ends
    # Token byte lengths: ends differenced within each document (first token: its end).
    lens = np.diff(ends, prepend=0)
    first = np.concatenate([[0], doc_tok_end[:-1]])
    first = first[first < len(ends)]
    lens[first] = ends[first]
    tok = np.insert(ids, doc_tok_end, sep_id)
    tlen = np.insert(lens, doc_tok_end, 1)
    starts = np.concatenate([[0], np.cumsum(tlen)])
    text = table.column("text_bytes").chunk(0)
    boffs = np.frombuffer(
        text.buffers()[1], dtype=np.int32, count=len(text) + 1, offset=4 * text.offset
    ).astype(np.int64)
    raw = np.frombuffer(
        text.buffers()[2], dtype=np.uint8, count=int(boffs[-1] - boffs[0]), offset=int(boffs[0])
    )
    byte_ids = np.insert(raw.astype(np.int16) + OFFSET, boffs[1:] - boffs[0], BOS)
    if len(byte_ids) != starts[-1]:
        raise DataError(f"token ends do not cover the document bytes ({starts[-1]} vs {len(byte_ids)} bytes)")
    return tok, starts, byte_ids


def finish_batch(
    input_ids: np.ndarray,
    patch_lens: np.ndarray,
    teacher: np.ndarray,
    nxt: np.ndarray,
    retained: RetainedIndex,
    sep: int,
    pad: int,
) -> dict[str, torch.Tensor]:
    """Masks, truncated patches and retained ids for filled byte/patch arrays; the batch as tensors."""
    B, L = input_ids.shape
    patch_mask = np.cumsum(patch_lens, axis=1) <= L  # patches cut by truncation are dropped
    patch_lens[~patch_mask] = 0
    byte_mask = input_ids != PAD
    expanded = np.asarray(retained.expand(input_ids), dtype=np.int64).reshape(B, L)
    expanded[input_ids == BOS] = sep
    expanded[~byte_mask] = pad
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))
    return {
        "input_ids": t(input_ids),
        "expanded_ids": t(expanded),
        "patch_lens": t(patch_lens),
        "teacher_ids": t(teacher),
        "teacher_next": t(nxt),
        "byte_mask": t(byte_mask),
        "patch_mask": t(patch_mask),
    }


def empty_arrays(B: int, P: int, L: int, sep: int) -> tuple[np.ndarray, ...]:
    """(input_ids, patch_lens, teacher, nxt) of B windows before they are filled: every byte slot
    PAD, no patches, every teacher position the separator."""
    return (
        np.full((B, L), PAD, np.int64),
        np.zeros((B, P), np.int64),
        np.full((B, P), sep, np.int64),
        np.zeros(B, np.int64),
    )


def fill_windows(tok, starts, byte_ids, window_starts, P: int, L: int, sep: int):
    """Byte/patch/teacher arrays of the windows starting at the given token positions of a packed stream."""
    input_ids, patch_lens, teacher, nxt = empty_arrays(len(window_starts), P, L, sep)
    for r, s in enumerate(window_starts):
        s = int(s)
        toks = tok[s : s + P]
        b0, b1 = starts[s], starts[s + P - 1]
        n = min(int(b1 - b0) + 1, L)
        input_ids[r, 0] = BOS
        input_ids[r, 1:n] = byte_ids[b0 : b0 + n - 1]
        patch_lens[r, 0] = 1
        patch_lens[r, 1:] = starts[s + 1 : s + P] - starts[s : s + P - 1]
        teacher[r, 1:] = toks[: P - 1]
        nxt[r] = toks[P - 1]
    return input_ids, patch_lens, teacher, nxt


def _check_common(rank: int, world_size: int, window_tokens: int) -> None:
    if not 0 <= rank < world_size:
        raise DataError(f"rank {rank} outside world_size {world_size}")
    if window_tokens < 2:
        raise DataError(f"window_tokens {window_tokens}: must be at least 2")


def _check_tokenizer(manifest_uri: str, m: dict, vocab: SubwordVocab) -> None:
    fp = m["tokenizer"]["fingerprint"]
    if fp != vocab.fingerprint:
        raise DataError(
            f"{manifest_uri}: prepared with tokenizer {fp[:12]}, loader given {vocab.fingerprint[:12]}"
        )


def _check_state(state: dict, manifest: dict, seed: int, world_size: int, kind: str) -> None:
    if state.get("manifest_hash") != manifest["manifest_hash"]:
        raise DataError("loader state belongs to another dataset (manifest_hash differs)")
    if (state.get("seed"), state.get("world_size")) != (seed, world_size):
        raise DataError(
            f"loader state has seed/world_size {state.get('seed')}/{state.get('world_size')}, "
            f"this loader {seed}/{world_size}"
        )
    if state.get("loader", "memory") != kind:
        raise DataError(
            f"loader state is from the {state.get('loader', 'memory')} loader, this one is {kind} "
            "(DataConfig.loader changed since the checkpoint)"
        )


def loader_kind(choice: str, m: dict, split: str, world_size: int) -> str:
    """memory or streaming: `choice` unless auto, then by the split's size (and shards per rank)."""
    if choice not in LOADERS:
        raise DataError(f"data.loader '{choice}': choose one of {', '.join(LOADERS)}")
    if choice != "auto":
        return choice
    shards = sum(1 for e in m["shards"] if e["split"] == split and e["rows"])
    big = m["splits"][split]["bytes"] > IN_MEMORY_MAX_BYTES
    return "streaming" if big and shards >= world_size else "memory"


class _Loader:
    """What both loaders share: the window shape, the rank, and the position a checkpoint keeps."""

    kind = ""

    def __init__(
        self,
        manifest_uri: str,
        vocab: SubwordVocab,
        window_tokens: int,
        batch_size: int,
        split: str = "train",
        byte_expansion: int = 6,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        _check_common(rank, world_size, window_tokens)
        self.manifest = self._open_split(manifest_uri, split)
        _check_tokenizer(manifest_uri, self.manifest, vocab)
        self.vocab, self.retained = vocab, RetainedIndex(vocab)
        self.sep, self.pad = int(vocab.doc_separator_id), int(vocab.pad_id)
        self.P, self.L, self.B = window_tokens, byte_expansion * window_tokens, batch_size
        self.split, self.seed, self.rank, self.world_size = split, seed, rank, world_size
        self.epoch, self.batch = 0, 0

    def _open_split(self, manifest_uri: str, split: str) -> dict:
        """The checked manifest; what the loader reads of the split is kept on self."""
        raise NotImplementedError

    def _extra_state(self) -> dict:
        """Loader-specific settings a resumed loader must share (checked on load)."""
        return {}

    def state_dict(self) -> dict:
        return {
            "loader": self.kind,
            "epoch": self.epoch,
            "batch": self.batch,
            "seed": self.seed,
            "split": self.split,
            "rank": self.rank,
            "world_size": self.world_size,
            **self._extra_state(),
            "manifest_hash": self.manifest["manifest_hash"],
        }

    def load_state_dict(self, state: dict) -> None:
        _check_state(state, self.manifest, self.seed, self.world_size, self.kind)
        for key, mine in self._extra_state().items():
            if state.get(key, mine) != mine:
                raise DataError(f"loader state has {key} {state[key]}, this loader {mine}")
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])


class WindowLoader(_Loader):
    """Batches of training windows from a manifest's split, held in memory; resumable and rank-aware."""

    kind = "memory"

    @classmethod
    def from_config(cls, data_cfg, manifest_uri: str, vocab: SubwordVocab, batch_size: int, **kw):
        """The loader that fits the split (`loader_kind`), with the preset's window shape (`DataConfig`)."""
        uri = _manifest_json(manifest_uri)
        m = _checked_split(uri, kw.get("split", "train"))
        kind = loader_kind(
            getattr(data_cfg, "loader", "auto"), m, kw.get("split", "train"), kw.get("world_size", 1)
        )
        loader = StreamingWindowLoader if kind == "streaming" else WindowLoader
        return loader(
            manifest_uri,
            vocab,
            data_cfg.window_tokens,
            batch_size,
            byte_expansion=data_cfg.byte_expansion,
            **kw,
        )

    def __init__(self, *args, **kw):
        """`_Loader`'s arguments; the split's token stream is packed in memory."""
        super().__init__(*args, **kw)
        self.tok, self.starts, self.byte_ids = pack_stream(self._table, self.sep)
        del self._table
        self.window_starts = self._window_starts()

    def _open_split(self, manifest_uri: str, split: str) -> dict:
        manifest, self._table = load_split(manifest_uri, split)
        return manifest

    def _window_starts(self) -> np.ndarray:
        nominal = np.arange(0, len(self.tok), self.P)
        real = np.flatnonzero(self.tok != self.sep)
        k = np.searchsorted(real, nominal)
        s = real[k[k < len(real)]]
        return s[s + self.P <= len(self.tok)]

    @property
    def n_windows(self) -> int:
        return len(self.window_starts)

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        return (self.n_windows // self.world_size) // self.B

    def _rank_windows(self, epoch: int) -> np.ndarray:
        """This rank's windows of one epoch, in order: global micro-batch k goes to rank k % world.

        Dealt round-robin (not contiguous slices), step s covers the same windows at any world
        size with the same global and micro batch, so runs at different scales compare.
        """
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)
        n = len(self) * self.world_size * self.B
        return perm[:n].reshape(len(self), self.world_size, self.B)[:, self.rank].reshape(-1)

    def make_batch(self, windows: np.ndarray) -> dict[str, torch.Tensor]:
        """The batch for the given window indices (docs/internals.md, "The training batch")."""
        arrays = fill_windows(
            self.tok, self.starts, self.byte_ids, self.window_starts[windows], self.P, self.L, self.sep
        )
        return finish_batch(*arrays, self.retained, self.sep, self.pad)

    def __iter__(self):
        """Batches forever (epoch after epoch), from the current position."""
        if len(self) == 0:
            raise DataError(
                f"split '{self.split}' has {self.n_windows} windows of {self.P} tokens: "
                f"fewer than world_size x batch_size = {self.world_size * self.B}"
            )
        while True:
            mine = self._rank_windows(self.epoch)
            while self.batch < len(self):
                idx = mine[self.batch * self.B : (self.batch + 1) * self.B]
                self.batch += 1  # advance first: state_dict() after k batches points at batch k
                yield self.make_batch(idx)
            self.epoch, self.batch = self.epoch + 1, 0

    def iter_eval(self, batch_size: int | None = None, max_batches: int | None = None):
        """This rank's share of the split's windows, once, in order (the last batch may be short)."""
        bs = batch_size or self.B
        mine = np.arange(self.n_windows)[self.rank :: self.world_size]
        for k, i in enumerate(range(0, len(mine), bs)):
            if max_batches is not None and k >= max_batches:
                return
            yield self.make_batch(mine[i : i + bs])


class _ShardStream:
    """The packed stream of a list of shards, decoded lazily in order, `prefetch` shards read ahead.

    Memory: the shards that overlap the segment in use plus the ones being read ahead.
    """

    def __init__(self, shards: list[tuple[str, str, int]], sep: int, prefetch: int = PREFETCH_SHARDS):
        self.shards, self.sep, self.prefetch = shards, sep, prefetch
        self.cum = np.concatenate([[0], np.cumsum([n for _, _, n in shards])]).astype(np.int64)
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="byteify-shard-read")
        self.pending: dict = {}  # shard index -> future of its packed arrays
        self.max_held = 0  # most shards held or being read at once (the memory bound, observable)

    def _load(self, i: int):
        uri, sha, n = self.shards[i]
        tok, starts, byte_ids = pack_stream(read_shard_checked(uri, sha), self.sep)
        if len(tok) != n:
            raise DataError(f"{uri}: {len(tok)} tokens + separators, the manifest says {n}")
        return tok, starts, byte_ids

    def _get(self, i: int):
        for j in range(i, min(len(self.shards), i + 1 + self.prefetch)):
            if j not in self.pending:
                self.pending[j] = self.pool.submit(self._load, j)
        self.max_held = max(self.max_held, len(self.pending))
        return self.pending[i].result()

    def segment(self, a: int, e: int):
        """(tokens, byte starts from 0 incl. the end, byte ids) of stream positions [a, e)."""
        e = min(e, int(self.cum[-1]))
        i0 = int(np.searchsorted(self.cum, a, side="right")) - 1
        for j in [j for j in self.pending if j < i0]:  # shards before the segment are done with
            self.pending.pop(j).cancel()
        toks, starts, bytes_, offset = [], [np.zeros(1, np.int64)], [], 0
        i = i0
        while i < len(self.shards) and self.cum[i] < e:
            tok, st, by = self._get(i)
            lo, hi = max(a, self.cum[i]) - self.cum[i], min(e, self.cum[i + 1]) - self.cum[i]
            toks.append(tok[lo:hi])
            bytes_.append(by[st[lo] : st[hi]])
            starts.append(st[lo + 1 : hi + 1] - st[lo] + offset)
            offset += int(st[hi] - st[lo])
            i += 1
        return np.concatenate(toks), np.concatenate(starts), np.concatenate(bytes_)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.pending.clear()


class StreamingWindowLoader(_Loader):
    """Batches of training windows read lazily from this rank's shards; resumable and rank-aware.

    Same batches format and state contract as `WindowLoader`; the order differs (module
    docstring). Epoch lengths may differ between ranks (they hold different shards): every
    rank iterates forever, so each step still gets one batch per rank.
    """

    kind = "streaming"

    def __init__(self, *args, shuffle_windows: int = SHUFFLE_WINDOWS, prefetch: int = PREFETCH_SHARDS, **kw):
        """`_Loader`'s arguments, the windows shuffled in blocks of `shuffle_windows`, `prefetch` shards read ahead."""
        super().__init__(*args, **kw)
        self.K, self.prefetch = max(1, shuffle_windows), prefetch
        self.stream: _ShardStream | None = None  # the current epoch's reader

    def _open_split(self, manifest_uri: str, split: str) -> dict:
        uri = _manifest_json(manifest_uri)
        manifest = _checked_split(uri, split)
        # Stream length of a shard: its tokens plus one separator per document.
        self.shards = [
            (_resolve(uri, e["uri"]), e["sha256"], e["tokens"] + e["rows"])
            for e in manifest["shards"]
            if e["split"] == split and e["rows"]
        ]
        return manifest

    def _rank_shards(self, epoch: int) -> list[int]:
        """This rank's shards of one epoch: the split's shards permuted by (seed, epoch), every world-th."""
        perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))
        return perm[self.rank :: self.world_size].tolist()

    def _n_windows(self, shard_ids: list[int]) -> int:
        # Window w reads stream positions up to w*P + P (+1 when it starts on a separator).
        n = sum(self.shards[i][2] for i in shard_ids)
        return max(0, (n - 1) // self.P)

    def __len__(self) -> int:
        """Batches in the current epoch on this rank."""
        return self._n_windows(self._rank_shards(self.epoch)) // self.B

    def _block_order(self, epoch: int, block: int, n_windows: int) -> np.ndarray:
        n = min(self.K, n_windows - block * self.K)
        rng = np.random.default_rng([self.seed, epoch, self.rank, block])
        return rng.permutation(n) + block * self.K

    def _windows(self, epoch: int, batch: int, n_windows: int, orders: dict) -> np.ndarray:
        """Window indices of one batch: positions batch*B.. of the block-shuffled order."""
        pos = np.arange(batch * self.B, (batch + 1) * self.B)
        for b in set((pos // self.K).tolist()) - set(orders):
            orders[b] = self._block_order(epoch, b, n_windows)
        for b in [b for b in orders if b < pos[0] // self.K]:
            del orders[b]
        return np.array([orders[p // self.K][p % self.K] for p in pos])

    def _batch_from(self, segment: tuple, windows: np.ndarray):
        """The batch of `windows` cut from `segment` = (start position, packed arrays from there)."""
        a, (tok, starts, byte_ids) = segment
        nominal = windows * self.P - a
        s = nominal + (tok[nominal] == self.sep)  # a window starting on a separator starts after it
        arrays = fill_windows(tok, starts, byte_ids, s, self.P, self.L, self.sep)
        return finish_batch(*arrays, self.retained, self.sep, self.pad)

    def __iter__(self):
        """Batches forever (epoch after epoch), from the current position."""
        while True:
            ids = self._rank_shards(self.epoch)
            nw = self._n_windows(ids)
            if nw // self.B == 0:
                raise DataError(
                    f"split '{self.split}': rank {self.rank} has {nw} windows of {self.P} tokens in "
                    f"epoch {self.epoch}, fewer than batch_size {self.B}"
                )
            stream, orders = _ShardStream([self.shards[i] for i in ids], self.sep, self.prefetch), {}
            self.stream = stream
            span, segment = None, None
            try:
                while self.batch < nw // self.B:
                    windows = self._windows(self.epoch, self.batch, nw, orders)
                    lo, hi = int(windows.min()) // self.K, int(windows.max()) // self.K
                    if span != (lo, hi):  # the blocks this batch draws from, packed once
                        span = (lo, hi)
                        a = lo * self.K * self.P
                        segment = (a, stream.segment(a, (hi + 1) * self.K * self.P + 1))
                    self.batch += 1  # advance first: state_dict() after k batches points at batch k
                    yield self._batch_from(segment, windows)
            finally:
                stream.close()
            self.epoch, self.batch = self.epoch + 1, 0

    def _extra_state(self) -> dict:
        return {"shuffle_windows": self.K}

    def iter_eval(self, batch_size: int | None = None, max_batches: int | None = None):
        """This rank's share of the split's windows, once, in order (the last batch may be short).

        Reads the shards in manifest order and stops after `max_batches`: nothing beyond is read.
        """
        bs = batch_size or self.B
        stream = _ShardStream(self.shards, self.sep, self.prefetch)
        mine = np.arange(self.rank, self._n_windows(list(range(len(self.shards)))), self.world_size)
        try:
            for k, i in enumerate(range(0, len(mine), bs)):
                if max_batches is not None and k >= max_batches:
                    return
                ws = mine[i : i + bs]
                a = int(ws[0]) * self.P
                yield self._batch_from((a, stream.segment(a, int(ws[-1]) * self.P + self.P + 1)), ws)
        finally:
            stream.close()
