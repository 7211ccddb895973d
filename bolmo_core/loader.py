"""Training windows from byte shards, in the batch format of docs/internals.md.

The documents of one split (manifest order) are packed into one token stream
``doc0 tokens, SEP, doc1 tokens, SEP, ...`` with its byte stream alongside (SEP is the
single byte id 1). Window w covers P = window_tokens tokens starting at w*P; a window that
would start on SEP starts after it (spec §1.3 strips leading separators; starting later
instead of padding keeps every window full, at the cost of overlapping the next window by
that token). Windows are shuffled per epoch by (seed, epoch) and dealt to ranks without
overlap; ``state_dict()`` is (epoch, batch) so a restart resumes at the exact next batch.

The split is held in memory (numpy, about 3 bytes per text byte): fine for the demo and
for single-node corpora of a few GB, not for a multi-TB mix.
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from . import storage
from .byte_tokenizer import BOS, OFFSET, PAD
from .data import SHARD_SCHEMA, DataError, read_manifest
from .subword import RetainedIndex, SubwordVocab


def _resolve(manifest_uri: str, rel: str) -> str:
    folder = manifest_uri.rsplit("/", 1)[0] if "/" in manifest_uri else "."
    return rel if "://" in rel or rel.startswith("/") else storage.join(folder, rel)


def load_split(manifest_uri: str, split: str) -> tuple[dict, pa.Table]:
    """(manifest, all rows of one split) with every shard's sha256 checked."""
    if not manifest_uri.endswith(".json"):
        manifest_uri = storage.join(manifest_uri, "manifest.json")
    m = read_manifest(manifest_uri)
    if split not in ("train", "validation"):
        raise DataError(f"{manifest_uri}: unknown split '{split}' (train or validation)")
    tables = []
    for e in m["shards"]:
        if e["split"] != split:
            continue
        uri = _resolve(manifest_uri, e["uri"])
        try:
            data = storage.read_bytes(uri)
        except storage.StorageError as err:
            raise DataError(str(err)) from None
        if storage.sha256_bytes(data) != e["sha256"]:
            raise DataError(f"{uri}: sha256 differs from the manifest (shard changed or damaged)")
        tables.append(
            pq.read_table(
                io.BytesIO(data), schema=SHARD_SCHEMA, columns=["text_bytes", "token_ids", "token_ends"]
            )
        )
    if not tables:
        return m, SHARD_SCHEMA.empty_table().select(["text_bytes", "token_ids", "token_ends"])
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


class WindowLoader:
    """Batches of training windows from a manifest's split; resumable and rank-aware."""

    @classmethod
    def from_config(cls, data_cfg, manifest_uri: str, vocab: SubwordVocab, batch_size: int, **kw):
        """A loader with the preset's window shape (`DataConfig`)."""
        return cls(
            manifest_uri,
            vocab,
            data_cfg.window_tokens,
            batch_size,
            byte_expansion=data_cfg.byte_expansion,
            **kw,
        )

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
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} outside world_size {world_size}")
        if window_tokens < 2:
            raise DataError(f"window_tokens {window_tokens}: must be at least 2")
        self.manifest, table = load_split(manifest_uri, split)
        fp = self.manifest["tokenizer"]["fingerprint"]
        if fp != vocab.fingerprint:
            raise DataError(
                f"{manifest_uri}: prepared with tokenizer {fp[:12]}, loader given {vocab.fingerprint[:12]}"
            )
        self.vocab, self.retained = vocab, RetainedIndex(vocab)
        self.sep, self.pad = int(vocab.doc_separator_id), int(vocab.pad_id)
        self.P, self.L, self.B = window_tokens, byte_expansion * window_tokens, batch_size
        self.split, self.seed, self.rank, self.world_size = split, seed, rank, world_size
        self.tok, self.starts, self.byte_ids = pack_stream(table, self.sep)
        self.window_starts = self._window_starts()
        self.epoch, self.batch = 0, 0

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
        B, P, L = len(windows), self.P, self.L
        input_ids = np.full((B, L), PAD, np.int64)
        patch_lens = np.zeros((B, P), np.int64)
        teacher = np.full((B, P), self.sep, np.int64)
        nxt = np.zeros(B, np.int64)
        for r, w in enumerate(windows):
            s = int(self.window_starts[w])
            toks = self.tok[s : s + P]
            b0, b1 = self.starts[s], self.starts[s + P - 1]
            n = min(int(b1 - b0) + 1, L)
            input_ids[r, 0] = BOS
            input_ids[r, 1:n] = self.byte_ids[b0 : b0 + n - 1]
            patch_lens[r, 0] = 1
            patch_lens[r, 1:] = self.starts[s + 1 : s + P] - self.starts[s : s + P - 1]
            teacher[r, 1:] = toks[: P - 1]
            nxt[r] = toks[P - 1]
        return finish_batch(input_ids, patch_lens, teacher, nxt, self.retained, self.sep, self.pad)

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

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "batch": self.batch,
            "seed": self.seed,
            "split": self.split,
            "rank": self.rank,
            "world_size": self.world_size,
            "manifest_hash": self.manifest["manifest_hash"],
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("manifest_hash") != self.manifest["manifest_hash"]:
            raise DataError("loader state belongs to another dataset (manifest_hash differs)")
        if (state.get("seed"), state.get("world_size")) != (self.seed, self.world_size):
            raise DataError(
                f"loader state has seed/world_size {state.get('seed')}/{state.get('world_size')}, "
                f"this loader {self.seed}/{self.world_size}"
            )
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])

    def iter_eval(self, batch_size: int | None = None, max_batches: int | None = None):
        """This rank's share of the split's windows, once, in order (the last batch may be short)."""
        bs = batch_size or self.B
        mine = np.arange(self.n_windows)[self.rank :: self.world_size]
        for k, i in enumerate(range(0, len(mine), bs)):
            if max_batches is not None and k >= max_batches:
                return
            yield self.make_batch(mine[i : i + bs])
