"""Source (subword) tokenizer <-> bytes: exact token bytes, boundary labels, retained ids (docs/architecture.md §1.2, §2.2).

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
Instead of docs/architecture.md's backward reverse-trie walk from every byte (O(L * longest entry)), one
forward Aho-Corasick pass per row gives the same answer in amortised O(L): the automaton
state is the longest suffix of the bytes so far that is a prefix of an entry, so every entry
that is a suffix of the bytes is a suffix of the state, and the answer is precomputed per
state. Specials reset the state (no entry crosses them) and EOPs leave it unchanged (skipped).
States keep CSR child lists sorted by byte; the shortest states also get complete dense
transitions. The scan is one numba-compiled loop (`cache=True`: compiled once per machine).
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import weakref
from dataclasses import dataclass, field
from itertools import chain

import numpy as np
import torch
from numba import njit

from bolmo_core.byte_tokenizer import BOS, EOP, FUSED_OFFSET, OFFSET

DOC_SEPARATOR = "<|endoftext|>"
WHITESPACE_STARTS = (
    0x20,
    0x09,
    0x0A,
)  # space, tab, newline: Ġ, ĉ, Ċ in the GPT-2 alphabet (docs/architecture.md §8.4)


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
    """Exact bytes of every source token id, plus the ids byteify needs (docs/architecture.md §1.2)."""

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


def _split_valid_utf8(doc: bytes, unspellable: re.Pattern | None, missing: bytes = b"") -> list[str | bytes]:
    """Maximal tokenizable runs (as str) and runs of invalid or unspellable bytes (as bytes), in order.

    `missing` are the bytes with no single-byte token: a character is unspellable only if its
    UTF-8 form contains one of them, so a document without any skips the regex (C-speed check).
    """
    try:
        parts: list[str | bytes] = [doc.decode("utf-8")]
    except UnicodeDecodeError:
        parts = []
        for i, piece in enumerate(_ESCAPED.split(doc.decode("utf-8", errors="surrogateescape"))):
            if piece:
                parts.append(piece.encode("utf-8", errors="surrogateescape") if i % 2 else piece)
    if unspellable is None or (missing and len(doc.translate(None, missing)) == len(doc)):
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
    """Per document (token_ids uint32, token_ends uint32): the source tokenization and each token's byte end.

    Each document's pair are views into two arrays shared by the batch (`label_flat`).
    """
    ids, ends, doc_off = label_flat(tok, docs, vocab)
    bounds = doc_off.tolist()
    return [(ids[a:b], ends[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


def label_flat(
    tok, docs: list[bytes], vocab: SubwordVocab | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`label_documents` as whole-batch arrays: (token_ids uint32, token_ends uint32, doc_offsets int64).

    Document n owns tokens ``doc_offsets[n]:doc_offsets[n + 1]``; its ends count from its own
    first byte. Everything after the one encoder call is whole-batch numpy, so what is paid
    per document is one UTF-8 decode and a few list appends.
    """
    vocab = vocab or get_vocab(tok)
    texts, first_part, plans = _text_parts(docs, vocab)
    encs = tok.backend_tokenizer.encode_batch_fast(texts, add_special_tokens=False) if texts else []
    # All text parts' ids in one array (each .ids access builds a Python list: once per part).
    part_off = np.zeros(len(encs) + 1, np.int64)
    np.cumsum(np.fromiter(map(len, encs), np.int64, count=len(encs)), out=part_off[1:])
    text_ids = np.fromiter(chain.from_iterable(e.ids for e in encs), np.int64, count=int(part_off[-1]))
    ids, lens = text_ids, vocab.token_lens[text_ids]
    doc_ntok = np.diff(part_off[np.asarray(first_part, np.int64)])
    at, runs = [], []
    for n, plan in plans.items():
        k = first_part[n]  # text parts before the current position
        for p in plan:
            if isinstance(p, int):
                k = p + 1
            else:  # a raw run goes before the first token of the next text part
                at.append(np.full(len(p), part_off[k], np.int64))
                runs.append(np.frombuffer(p, np.uint8))
                doc_ntok[n] += len(p)
    if runs:
        # Invalid or unspellable bytes are one token each, inserted into the text tokens in
        # document order (np.insert keeps the given order of equal positions).
        at_all, run_bytes = np.concatenate(at), np.concatenate(runs)
        raw_ids = np.where(vocab.single_byte_ids >= 0, vocab.single_byte_ids, vocab.byte_fallback_id)
        ids = np.insert(ids, at_all, raw_ids[run_bytes])
        lens = np.insert(lens, at_all, 1)  # one byte each, whatever the fallback token spells
    doc_off = np.zeros(len(docs) + 1, np.int64)
    np.cumsum(doc_ntok, out=doc_off[1:])
    cum = np.zeros(len(lens) + 1, np.int64)
    np.cumsum(lens, out=cum[1:])
    base = cum[doc_off[:-1]]  # bytes of all earlier documents
    ends = cum[1:] - np.repeat(base, doc_ntok)
    spelled_len = cum[doc_off[1:]] - base
    _check_spelling(vocab, docs, spelled_len, first_part, plans, text_ids, part_off, tok)
    return ids.astype(np.uint32), ends.astype(np.uint32), doc_off


def _text_parts(docs: list[bytes], vocab: SubwordVocab) -> tuple[list[str], list[int], dict[int, list]]:
    """Split documents into the text parts the encoder sees and the raw runs it must not see.

    Returns (texts, first_part, plans): first_part[n] is the index in `texts` of document n's
    first text part (plus one entry past the end); plans[n], only for documents that are not
    exactly one text part, lists its parts in order: text part indices (int) and raw runs (bytes).
    """
    unspellable = vocab.unspellable
    missing = bytes(np.nonzero(vocab.single_byte_ids < 0)[0].tolist())
    texts: list[str] = []
    first_part = []
    plans: dict[int, list] = {}
    for n, doc in enumerate(docs):
        if not isinstance(doc, bytes | bytearray):
            raise TokenizerError(f"label_documents: documents must be bytes, got {type(doc).__name__}")
        first_part.append(len(texts))
        parts = _split_valid_utf8(bytes(doc), unspellable, missing)
        if len(parts) == 1 and isinstance(parts[0], str):  # the common case: one valid, spellable run
            texts.append(parts[0])
            continue
        plan = plans[n] = []
        for part in parts:
            if isinstance(part, str):
                plan.append(len(texts))
                texts.append(part)
            else:
                plan.append(part)
    first_part.append(len(texts))
    return texts, first_part, plans


def _spelled(vocab: SubwordVocab, plan: list, part_ids: list[list[int]]) -> list:
    """Iterables of the bytes of a document's tokens, part by part (raw parts spell themselves)."""
    return [map(vocab.token_bytes.__getitem__, part_ids[p]) if isinstance(p, int) else (p,) for p in plan]


def _check_spelling(
    vocab: SubwordVocab,
    docs: list[bytes],
    spelled_len: np.ndarray,
    first_part: list[int],
    plans: dict[int, list],
    text_ids: np.ndarray,
    part_off: np.ndarray,
    tok,
) -> None:
    """Raise TokenizerError naming the first document whose tokens' bytes are not its bytes."""
    lengths_ok = np.array_equal(spelled_len, np.fromiter(map(len, docs), np.int64, count=len(docs)))
    # Without a normalizer a byte-level BPE is lossless by construction (bytes -> alphabet
    # chars -> merges of them), so equal lengths suffice; only a normalizer can rewrite text
    # and then every byte is compared. One join over the whole batch: equal totals and equal
    # per-document lengths imply every document is spelled exactly.
    if lengths_ok and tok.backend_tokenizer.normalizer is None:
        return
    bounds = part_off.tolist()
    part_ids = [text_ids[a:b].tolist() for a, b in zip(bounds[:-1], bounds[1:])]
    all_plans = [plans.get(n, [first_part[n]]) for n in range(len(docs))]
    spelled = b"".join(
        chain.from_iterable(it for plan in all_plans for it in _spelled(vocab, plan, part_ids))
    )
    if lengths_ok and spelled == b"".join(docs):
        return
    for n, (doc, plan) in enumerate(zip(docs, all_plans)):
        if b"".join(chain.from_iterable(_spelled(vocab, plan, part_ids))) != doc:
            raise TokenizerError(
                f"label_documents: document {n}: the bytes of its tokens do not spell the document "
                f"(tokenizer '{vocab.name}' rewrites text, e.g. with a normalizer)"
            )


# ---------------------------------------------------------------------------------------------
# Retained subword ids (docs/architecture.md §2.2)


@njit(cache=True, nogil=True)
def _scan_rows(rows, dense, child_start, child_byte, child_node, fail, node_out, sep_id, pad_id, res):
    """One left-to-right automaton pass per row; returns how many ids were out of range."""
    n_rows, width = rows.shape
    n_dense = dense.shape[0]
    bad = 0
    for r in range(n_rows):
        state = 0  # the root: a row start sees no bytes before it
        last = pad_id  # an EOP repeats the value of the last real id before it in its row
        for t in range(width):
            x = rows[r, t]
            if x < 0 or x >= 2 * FUSED_OFFSET:
                bad += 1
                continue
            if x >= FUSED_OFFSET:
                x -= FUSED_OFFSET
            if x == EOP:  # skipped: the state carries over it
                res[r, t] = last
                continue
            if x < OFFSET:  # bos/eos -> separator; pad and id 2 -> pad; no entry crosses a special
                state = 0
                last = sep_id if x == BOS else pad_id
                res[r, t] = last
                continue
            b = x - OFFSET
            while True:
                if state < n_dense:
                    state = dense[state, b]  # complete transition, failures already folded in
                    break
                # children are sorted by byte: binary search
                lo, hi = child_start[state], child_start[state + 1]
                end = hi
                while lo < hi:
                    mid = (lo + hi) >> 1
                    if child_byte[mid] < b:
                        lo = mid + 1
                    else:
                        hi = mid
                if lo < end and child_byte[lo] == b:
                    state = child_node[lo]
                    break
                state = fail[state]  # amortised: each failure undoes one earlier step down
            last = node_out[state]
            res[r, t] = last
    return bad


_DENSE_STATES = 256  # 256 KB of int32 transitions (cache-resident); more measured no faster


class RetainedIndex:
    """Longest vocabulary entry that is a suffix of the bytes ending at each position (docs/architecture.md §2.2)."""

    def __init__(self, vocab: SubwordVocab):
        self.vocab = vocab
        self.sep_id, self.pad_id = vocab.doc_separator_id, vocab.pad_id
        entries: dict[bytes, int] = {}
        for i, b in enumerate(vocab.token_bytes):
            if b and i not in vocab.special_ids and b not in entries:
                entries[b] = i  # identical byte strings: the lowest id wins
        self.max_len = max(map(len, entries))
        # States = all prefixes of entries (state 0 = the empty string), shortest first.
        states: dict[bytes, int] = {b"": 0}
        for b in entries:
            for k in range(1, len(b) + 1):
                states.setdefault(b[:k], 0)
        order = sorted(states, key=len)
        for n, s in enumerate(order):
            states[s] = n
        n_states = len(order)
        parent = np.zeros(n_states, dtype=np.int64)
        last_byte = np.zeros(n_states, dtype=np.int64)
        fail = np.zeros(n_states, dtype=np.int64)  # longest proper suffix that is a state
        out = np.full(n_states, vocab.byte_fallback_id, dtype=np.int64)  # longest entry that is a suffix
        for n, s in enumerate(order[1:], start=1):
            parent[n], last_byte[n] = states[s[:-1]], s[-1]
            for k in range(1, len(s)):
                if (f := states.get(s[k:])) is not None:
                    fail[n] = f
                    break
            out[n] = entries[s] if s in entries else out[fail[n]]  # shorter states are done first
        # int32/uint8 tables: half the cache footprint of int64 for the random accesses of the scan
        self.node_out, self.fail = out.astype(np.int32), fail.astype(np.int32)
        # CSR child lists sorted by (parent, byte) for every state; the shortest (hottest) states
        # also get a dense table of complete transitions (a DFA row: failures folded in).
        deep = np.nonzero(parent > 0)[0]
        deep = deep[np.lexsort((last_byte[deep], parent[deep]))]
        self.child_start = np.zeros(n_states + 1, dtype=np.int32)
        np.cumsum(np.bincount(parent[deep], minlength=n_states), out=self.child_start[1:])
        self.child_byte = last_byte[deep].astype(np.uint8)
        self.child_node = deep.astype(np.int32)
        self.dense = np.zeros((min(n_states, _DENSE_STATES), 256), dtype=np.int32)
        self.dense[0] = [states.get(bytes([b]), 0) for b in range(256)]  # no entry starts with b: root
        for n in range(1, len(self.dense)):
            lo, hi = self.child_start[n], self.child_start[n + 1]
            self.dense[n] = self.dense[fail[n]]  # fail[n] < n: shorter states come first
            self.dense[n, self.child_byte[lo:hi]] = self.child_node[lo:hi]

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
        # int64 in one layout, so the compiled walk has a single signature (no copy when already int64)
        rows = np.ascontiguousarray(rows, dtype=np.int64)
        res = np.empty(rows.shape, dtype=np.int64)
        bad = _scan_rows(
            rows,
            self.dense,
            self.child_start,
            self.child_byte,
            self.child_node,
            self.fail,
            self.node_out,
            self.sep_id,
            self.pad_id,
            res,
        )
        if bad:
            raise TokenizerError(f"RetainedIndex.expand: byte ids must lie in 0..{2 * FUSED_OFFSET - 1}")
        return res
