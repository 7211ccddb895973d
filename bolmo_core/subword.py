"""Source (subword) tokenizer <-> bytes: exact token bytes, boundary labels, retained ids (spec §1.2, §2.2).

Works for any Hugging Face fast tokenizer that is a byte-level BPE (GPT-2 alphabet:
SmolLM2, GPT-2, dolma2); anything else is refused by `check_byte_level_bpe`.

Boundary labels (`label_documents`): a document's token ends are byte offsets computed from
each token's own byte string (cumulative lengths), never from the tokenizer's character
offsets, which are wrong for tokens that split a multi-byte character. The bytes of all
tokens always concatenate to the document's bytes; a mismatch (e.g. a normalizer that
rewrites text) raises `TokenizerError`.

Invalid UTF-8 policy (docs/internals.md): bytes are data. A document is split into maximal
valid-UTF-8 runs and invalid bytes. Valid runs are tokenized normally (in one batch call);
each invalid byte becomes one token, the byte-level BPE's single-byte token for that byte.
Like the tokenizer itself, a literal special-token string in the text (e.g. "<|endoftext|>")
is tokenized as that special token; its bytes are its literal text.

Retained ids (`RetainedIndex`): for each byte position, the id of the longest vocabulary
entry whose bytes are a suffix of the bytes ending there (may cross token boundaries).
Implemented as a vectorised reverse-trie walk: trie nodes (all suffixes of vocabulary
entries) live in one open-addressing hash table of exact 64-bit keys; a node of depth
k <= 7 is keyed by its packed bytes, a deeper node by (parent node, next byte). Node depth
is monotone (a suffix of a node is a node), so depths 1..7 are found by a 3-step
bisection over all positions at once, and only the rare deeper positions walk on.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import weakref
from dataclasses import dataclass, field

import numpy as np
import torch

from bolmo_core.byte_tokenizer import BOS, EOP, FUSED_OFFSET, OFFSET

DOC_SEPARATOR = "<|endoftext|>"
WHITESPACE_STARTS = (0x20, 0x09, 0x0A)  # space, tab, newline: Ġ, ĉ, Ċ in the GPT-2 alphabet (spec §8.4)


class TokenizerError(ValueError):
    """A source tokenizer or document that cannot be aligned with bytes, with a one-line reason."""


def bytes_to_unicode() -> dict[int, str]:
    """The GPT-2 byte-level alphabet: printable bytes map to themselves, the rest to U+0100 onwards."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


UNICODE_TO_BYTE = {c: b for b, c in bytes_to_unicode().items()}


def _name(tok) -> str:
    return getattr(tok, "name_or_path", "") or type(tok).__name__


def _find_pre_tokenizers(node, kind: str) -> list[dict]:
    """All pre-tokenizer/decoder dicts of type `kind`, looking inside Sequences."""
    if not isinstance(node, dict):
        return []
    if node.get("type") == kind:
        return [node]
    found = []
    for child in node.get("pretokenizers", []) + node.get("decoders", []):
        found += _find_pre_tokenizers(child, kind)
    return found


def _backend_json(tok) -> dict:
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise TokenizerError(
            f"tokenizer '{_name(tok)}': not a fast (Rust) tokenizer; byte alignment needs one"
        )
    return json.loads(backend.to_str())


def check_byte_level_bpe(tok) -> None:
    """Raise TokenizerError unless `tok` is a byte-level BPE (the only kind whose tokens are exact bytes)."""
    spec = _backend_json(tok)
    model = spec.get("model") or {}
    problem = None
    if model.get("type") != "BPE":
        problem = f"its model is {model.get('type')}, not BPE"
    elif model.get("byte_fallback"):
        problem = "it is a BPE with byte fallback (SentencePiece style), not a byte-level BPE"
    elif not (levels := _find_pre_tokenizers(spec.get("pre_tokenizer"), "ByteLevel")):
        pre = (spec.get("pre_tokenizer") or {}).get("type")
        problem = f"its pre-tokenizer is {pre}, not ByteLevel"
    elif any(p.get("add_prefix_space") for p in levels):
        problem = "its ByteLevel pre-tokenizer adds a prefix space, so tokens do not spell the text"
    else:
        vocab = model.get("vocab", {})
        missing = [b for c, b in UNICODE_TO_BYTE.items() if c not in vocab and 0x80 <= b < 0xC0]
        if missing:
            problem = f"its vocabulary lacks the single-byte tokens of UTF-8 continuation bytes {missing[:4]}"
    if problem:
        raise TokenizerError(
            f"tokenizer '{_name(tok)}' is not usable: {problem}; the byte <-> subword alignment needs a "
            "byte-level BPE (GPT-2 style ByteLevel pre-tokenizer)"
        )


@dataclass
class SubwordVocab:
    """Exact bytes of every source token id, plus the ids byteify needs (spec §1.2)."""

    name: str
    token_bytes: list[bytes]  # id -> exact bytes (special/added tokens: their literal UTF-8 text)
    special_ids: frozenset[int]  # added special tokens (never retained entries)
    doc_separator_id: int
    pad_id: int
    vocab_size: int  # rows of the source embedding to use: len(tok)
    fingerprint: str
    token_lens: np.ndarray = field(repr=False)  # int64 byte length per id
    single_byte_ids: np.ndarray = field(
        repr=False
    )  # (256,) int64: id of the token spelling byte b, -1 if none
    whitespace_start_mask: torch.Tensor = field(repr=False)  # (vocab_size,) bool
    byte_fallback_id: int = 0  # stands for a byte without a single-byte token: unk, else the separator

    @classmethod
    def from_tokenizer(cls, tok) -> SubwordVocab:
        check_byte_level_bpe(tok)
        spec = _backend_json(tok)
        backend = tok.backend_tokenizer
        added = backend.get_added_tokens_decoder()  # id -> AddedToken
        vocab = backend.get_vocab(with_added_tokens=True)
        size = max(len(tok), max(vocab.values()) + 1)
        token_bytes = [b""] * size
        for text, i in vocab.items():
            if i in added:
                token_bytes[i] = added[i].content.encode("utf-8")
            else:
                try:
                    token_bytes[i] = bytes(UNICODE_TO_BYTE[c] for c in text)
                except KeyError:
                    raise TokenizerError(
                        f"tokenizer '{_name(tok)}': token {i} {text!r} has characters outside the byte-level alphabet"
                    ) from None
        special_ids = frozenset(i for i, t in added.items() if t.special)
        sep = vocab.get(DOC_SEPARATOR, tok.eos_token_id)
        if sep is None:
            raise TokenizerError(f"tokenizer '{_name(tok)}': has neither {DOC_SEPARATOR} nor an eos token")
        pad = tok.pad_token_id if tok.pad_token_id is not None else sep
        model_vocab = spec["model"]["vocab"]
        single = np.array([model_vocab.get(bytes_to_unicode()[b], -1) for b in range(256)], dtype=np.int64)
        unk = tok.unk_token_id
        lens = np.array([len(b) for b in token_bytes], dtype=np.int64)
        ws = torch.tensor(
            [
                len(b) > 0 and b[0] in WHITESPACE_STARTS and i not in special_ids
                for i, b in enumerate(token_bytes)
            ]
        )
        return cls(
            name=_name(tok),
            token_bytes=token_bytes,
            special_ids=special_ids,
            doc_separator_id=int(sep),
            pad_id=int(pad),
            vocab_size=len(tok),
            fingerprint=_fingerprint(spec, sep, pad, tok),
            token_lens=lens,
            single_byte_ids=single,
            whitespace_start_mask=ws,
            byte_fallback_id=int(unk if unk is not None else sep),
        )

    @property
    def unspellable(self) -> re.Pattern | None:
        """Characters the tokenizer cannot spell (a byte of theirs has no single-byte token), or None."""
        return _unspellable_pattern(tuple(np.nonzero(self.single_byte_ids < 0)[0].tolist()))


def _fingerprint(spec: dict, sep: int, pad: int, tok) -> str:
    """sha256 of the canonical tokenizer JSON and the special ids byteify uses."""
    spec = {
        k: v for k, v in spec.items() if k not in ("truncation", "padding")
    }  # call-time state, not identity
    ids = {"doc_separator_id": sep, "pad_id": pad, "eos_id": tok.eos_token_id, "bos_id": tok.bos_token_id}
    blob = json.dumps(spec, sort_keys=True, separators=(",", ":"), ensure_ascii=False) + json.dumps(
        ids, sort_keys=True
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


_VOCABS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def get_vocab(tok) -> SubwordVocab:
    """SubwordVocab.from_tokenizer, built once per tokenizer object."""
    try:
        return _VOCABS[tok]
    except (KeyError, TypeError):
        vocab = SubwordVocab.from_tokenizer(tok)
        try:
            _VOCABS[tok] = vocab
        except TypeError:
            pass
        return vocab


# Invalid bytes decode to lone surrogates U+DC80..U+DCFF under "surrogateescape".
_ESCAPED = re.compile("([\udc80-\udcff]+)")


_LEAD_RANGES = {2: (0x1F, 6), 3: (0x0F, 12), 4: (0x07, 18)}


@functools.lru_cache(maxsize=16)
def _unspellable_pattern(missing: tuple[int, ...]) -> re.Pattern | None:
    """A character class of every code point whose UTF-8 holds one of the `missing` bytes."""
    ranges = []
    for b in missing:
        if b < 0x80:
            ranges.append((b, b))
        elif 0xC2 <= b <= 0xF4:  # lead bytes; C0, C1, F5..FF never occur in valid UTF-8
            n = 2 if b < 0xE0 else 3 if b < 0xF0 else 4
            mask, shift = _LEAD_RANGES[n]
            lo = (b & mask) << shift
            ranges.append((max(lo, (0x80, 0x800, 0x10000)[n - 2]), min(lo + (1 << shift) - 1, 0x10FFFF)))
    if not ranges:
        return None
    cls = "".join(f"\\U{lo:08x}-\\U{hi:08x}" for lo, hi in ranges)
    return re.compile(f"([{cls}]+)")


def _split_valid_utf8(doc: bytes, unspellable: re.Pattern | None) -> list[str | bytes]:
    """Maximal tokenizable runs (as str) and runs of invalid or unspellable bytes (as bytes), in order."""
    try:
        parts: list[str | bytes] = [doc.decode("utf-8")]
    except UnicodeDecodeError:
        parts = []
        for i, piece in enumerate(_ESCAPED.split(doc.decode("utf-8", errors="surrogateescape"))):
            if piece:
                parts.append(piece.encode("utf-8", errors="surrogateescape") if i % 2 else piece)
    if unspellable is None:
        return parts
    out: list[str | bytes] = []
    for part in parts:
        if isinstance(part, bytes) or not unspellable.search(part):
            out.append(part)
            continue
        for i, piece in enumerate(unspellable.split(part)):
            if piece:
                out.append(piece.encode("utf-8") if i % 2 else piece)
    return out


def label_documents(
    tok, docs: list[bytes], vocab: SubwordVocab | None = None
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per document (token_ids uint32, token_ends uint32): the source tokenization and each token's byte end."""
    vocab = vocab or get_vocab(tok)
    unspellable = vocab.unspellable
    raw_ids = np.where(vocab.single_byte_ids >= 0, vocab.single_byte_ids, vocab.byte_fallback_id)
    plans, texts = [], []
    for doc in docs:
        if not isinstance(doc, bytes | bytearray):
            raise TokenizerError(f"label_documents: documents must be bytes, got {type(doc).__name__}")
        plan = []
        for part in _split_valid_utf8(bytes(doc), unspellable):
            if isinstance(part, str):
                plan.append(len(texts))
                texts.append(part)
            else:
                plan.append(part)
        plans.append(plan)
    encs = tok.backend_tokenizer.encode_batch_fast(texts, add_special_tokens=False) if texts else []
    out = []
    table = vocab.token_bytes
    for n, (doc, plan) in enumerate(zip(docs, plans)):
        ids_parts, len_parts, spelled = [], [], []
        for p in plan:
            if isinstance(p, int):
                ids = np.asarray(encs[p].ids, dtype=np.int64)
                ids_parts.append(ids)
                len_parts.append(vocab.token_lens[ids])
                spelled.append(b"".join(map(table.__getitem__, encs[p].ids)))
            else:  # raw bytes: one token per byte, one byte per token
                ids_parts.append(raw_ids[np.frombuffer(p, dtype=np.uint8)])
                len_parts.append(np.ones(len(p), dtype=np.int64))
                spelled.append(p)
        if b"".join(spelled) != doc:
            raise TokenizerError(
                f"label_documents: document {n}: the bytes of its tokens do not spell the document "
                f"(tokenizer '{vocab.name}' rewrites text, e.g. with a normalizer)"
            )
        ids = np.concatenate(ids_parts) if ids_parts else np.zeros(0, dtype=np.int64)
        ends = np.cumsum(np.concatenate(len_parts)) if len_parts else np.zeros(0, dtype=np.int64)
        out.append((ids.astype(np.uint32), ends.astype(np.uint32)))
    return out


# ---------------------------------------------------------------------------------------------
# Retained subword ids (spec §2.2)

_EMPTY = np.uint64(
    0xFFFF_FFFF_FFFF_FFFF
)  # no key has all bits set (packed keys: bit 63 clear; tail keys: bits 48-62 clear)
_TAIL = 1 << 63
_PACKED_MAX = 7  # depths 1..7 keyed by packed bytes + depth in bits 56..58
_MASKS = np.array([(1 << (8 * k)) - 1 for k in range(_PACKED_MAX + 1)], dtype=np.uint64)
_GOLDEN = np.uint64(0x9E37_79B9_7F4A_7C15)


class _HashTable:
    """Open addressing (linear probing) over exact uint64 keys, built and probed with numpy."""

    def __init__(self, keys: np.ndarray):
        bits = max(
            10, int(np.ceil(np.log2(max(len(keys), 1) * 4)))
        )  # load factor <= 1/4: ~1 probe per lookup
        self.mask = np.int64((1 << bits) - 1)
        self.shift = np.uint64(64 - bits)
        self.keys = np.full(1 << bits, _EMPTY, dtype=np.uint64)
        self.index = np.full(1 << bits, -1, dtype=np.int32)  # slot -> row of the build arrays
        pending = np.arange(len(keys))
        slot = self._slot(keys)
        while pending.size:
            free = self.index[slot] == -1
            cand, cslot = pending[free], slot[free]
            taken, first = np.unique(cslot, return_index=True)
            self.index[taken] = cand[first]
            self.keys[taken] = keys[cand[first]]
            placed = np.zeros(len(pending), dtype=bool)
            placed[np.nonzero(free)[0][first]] = True
            pending, slot = pending[~placed], (slot[~placed] + 1) & self.mask

    def _slot(self, keys: np.ndarray) -> np.ndarray:
        return ((keys * _GOLDEN) >> self.shift).astype(np.int64)

    def find(self, keys: np.ndarray) -> np.ndarray:
        """Row index of each key, -1 where absent."""
        slot = self._slot(keys)
        found = self.keys[slot]
        res = np.where(found == keys, self.index[slot], -1)
        todo = np.nonzero((found != keys) & (found != _EMPTY))[0]
        while todo.size:
            slot_t = (slot[todo] + 1) & self.mask
            slot[todo] = slot_t
            found = self.keys[slot_t]
            hit = found == keys[todo]
            res[todo[hit]] = self.index[slot_t[hit]]
            todo = todo[~hit & (found != _EMPTY)]
        return res


class RetainedIndex:
    """Longest vocabulary entry that is a suffix of the bytes ending at each position (spec §2.2)."""

    def __init__(self, vocab: SubwordVocab):
        self.vocab = vocab
        self.sep_id, self.pad_id = vocab.doc_separator_id, vocab.pad_id
        entries: dict[bytes, int] = {}
        for i, b in enumerate(vocab.token_bytes):
            if b and i not in vocab.special_ids and b not in entries:
                entries[b] = i  # identical byte strings: the lowest id wins
        self.max_len = max(map(len, entries))
        # Trie nodes = all suffixes of entries; out = longest entry that is a suffix of the node.
        nodes: dict[bytes, int] = {}
        for b in entries:
            for k in range(1, len(b) + 1):
                nodes.setdefault(b[-k:], 0)
        order = sorted(nodes, key=len)
        for n, s in enumerate(order):
            nodes[s] = n
        out = np.empty(len(order), dtype=np.int64)
        keys = np.empty(len(order), dtype=np.uint64)
        for n, s in enumerate(order):
            if s in entries:
                out[n] = entries[s]
            else:
                out[n] = out[nodes[s[1:]]] if len(s) > 1 else vocab.byte_fallback_id
            if len(s) <= _PACKED_MAX:
                keys[n] = int.from_bytes(s, "big") | (len(s) << 56)
            else:
                keys[n] = _TAIL | (nodes[s[1:]] << 8) | s[0]
        self.node_out = out
        self.table = _HashTable(keys)
        # A byte that ends no entry has no match at all (SmolLM2 lacks e.g. 0x04): the fallback id.
        self.single_node = np.array([nodes.get(bytes([b]), -1) for b in range(256)], dtype=np.int64)
        self.single_out = np.where(self.single_node >= 0, out[self.single_node], vocab.byte_fallback_id)

    def expand(self, byte_ids):
        """Retained id per position of byte ids shaped (L,) or (B, L); same type and shape, int64."""
        is_torch = isinstance(byte_ids, torch.Tensor)
        arr = byte_ids.detach().cpu().numpy() if is_torch else np.asarray(byte_ids)
        if arr.ndim not in (1, 2):
            raise TokenizerError(f"RetainedIndex.expand: byte ids must be 1-D or 2-D, got shape {arr.shape}")
        if arr.size == 0:
            res = np.zeros(arr.shape, dtype=np.int64)
        else:
            res = self._expand_rows(arr.reshape(-1, arr.shape[-1])).reshape(arr.shape)
        return torch.from_numpy(res).to(byte_ids.device) if is_torch else res

    def expand_last(self, byte_ids, n_last: int):
        """expand(byte_ids)[..., -n_last:], computed from only as much context as the walk can reach."""
        is_torch = isinstance(byte_ids, torch.Tensor)
        arr = byte_ids.detach().cpu().numpy() if is_torch else np.asarray(byte_ids)
        rows = arr.reshape(-1, arr.shape[-1])
        width = rows.shape[1]
        n_last = min(n_last, width)
        ctx = n_last + self.max_len
        while ctx < width:
            head = rows[:, width - ctx : width - n_last]
            # EOP ids are skipped by the walk, so the window needs max_len real symbols before the tail.
            if (np.count_nonzero(head != EOP, axis=1) >= self.max_len).all():
                break
            ctx *= 2
        res = (
            self._expand_rows(rows[:, max(0, width - ctx) :])[:, -n_last:]
            if n_last
            else rows[:, :0].astype(np.int64)
        )
        res = res.reshape(*arr.shape[:-1], n_last)
        return torch.from_numpy(np.ascontiguousarray(res)).to(byte_ids.device) if is_torch else res

    def _expand_rows(self, rows: np.ndarray) -> np.ndarray:
        n_rows, width = rows.shape
        flat = rows.reshape(-1).astype(np.int64)
        if flat.size and (flat.min() < 0 or flat.max() >= 2 * FUSED_OFFSET):
            raise TokenizerError(f"RetainedIndex.expand: byte ids must lie in 0..{2 * FUSED_OFFSET - 1}")
        flat = np.where(flat >= FUSED_OFFSET, flat - FUSED_OFFSET, flat)
        keep = flat != EOP
        if keep.all():
            pos = np.arange(flat.size)
            x = flat
        else:
            pos = np.nonzero(keep)[0]
            x = flat[pos]
        row = pos // max(width, 1)
        row_start = np.ones(len(x), dtype=bool)
        row_start[1:] = row[1:] != row[:-1]
        res = np.empty(flat.size, dtype=np.int64)
        res[pos] = self._expand_compact(x, row_start)
        if not keep.all():
            # An EOP takes the value of the last real id before it in its row (the walk skips it).
            idx = np.arange(flat.size)
            last = np.maximum.accumulate(np.where(keep, idx, -1))
            eop = np.nonzero(~keep)[0]
            src = last[eop]
            ok = (src >= 0) & (src // max(width, 1) == eop // max(width, 1))
            res[eop] = np.where(ok, res[np.maximum(src, 0)], self.pad_id)
        return res.reshape(n_rows, width)

    def _expand_compact(self, x: np.ndarray, row_start: np.ndarray) -> np.ndarray:
        """x: byte ids without EOP (0..259); row_start marks where a new row begins."""
        n = len(x)
        valid = x >= OFFSET
        res = np.where(x == BOS, self.sep_id, self.pad_id)  # bos/eos -> separator; pad and id 2 -> pad
        vpos = np.nonzero(valid)[0]
        if not vpos.size:
            return res
        sym = np.where(valid, x - OFFSET, 0).astype(np.uint64)
        idx = np.arange(n)
        # avail[t]: how many byte symbols end at t without crossing a special id or a row start.
        seg = np.maximum.accumulate(np.where(~valid, idx + 1, np.where(row_start, idx, 0)))
        avail = (idx - seg + 1)[vpos]
        packed = sym.copy()
        for i in range(1, _PACKED_MAX):
            packed[i:] |= sym[:-i] << np.uint64(8 * i)
        packed = packed[vpos]
        sv = sym[vpos].astype(np.int64)
        node = self.single_node[sv]
        lo = np.ones(len(vpos), dtype=np.int64)
        hi = np.minimum(avail, _PACKED_MAX)
        depth_key = np.arange(_PACKED_MAX + 1, dtype=np.uint64) << np.uint64(56)
        for _ in range(
            3
        ):  # bisection on the (monotone) node depth over all positions at once: 1..7 in 3 rounds
            mid = (lo + hi + 1) >> 1  # == lo once converged: that lookup just finds the known node again
            row = self.table.find((packed & _MASKS[mid]) | depth_key[mid])
            ok = row >= 0
            np.copyto(lo, mid, where=ok)
            np.copyto(hi, mid - 1, where=~ok)
            np.copyto(node, row, where=ok)
        out = np.where(node >= 0, self.node_out[node], self.vocab.byte_fallback_id)
        # Deeper than 7: walk on one byte at a time from the depth-7 node.
        act = np.nonzero((lo == _PACKED_MAX) & (avail > _PACKED_MAX))[0]
        k = _PACKED_MAX + 1
        while act.size:
            prev = sym[vpos[act] - (k - 1)]
            row = self.table.find(np.uint64(_TAIL) | (node[act].astype(np.uint64) << np.uint64(8)) | prev)
            ok = row >= 0
            act = act[ok]
            out[act] = self.node_out[row[ok]]
            node[act] = row[ok]
            k += 1
            act = act[avail[act] >= k]
        res[vpos] = out
        return res
