"""Exact byte-level targets from the teacher's next-token distribution (issue 13; docs/training.md).

The teacher at position k (input ``[sep, tok_0, ...][k]``) predicts token k, which the byte
model sees as patch k+1. For byte j of that patch (j = 0 .. n-1, n = the token's byte length),
given the patch's first j bytes u, the teacher's softmax over the whole vocabulary implies a
distribution over the byte model's fused ids: byte c (+4) "the token goes on after c" and c + 260
"the token ends with c":

    q_j(c, ends)    = Σ p_T(w) over entries w = u + c
    q_j(c, goes on) = Σ p_T(w) over entries w that start with u + c and are longer
    normalised by Z_j = Σ p_T(w) over entries that start with u and are longer than u.

Rules (each one a decision; docs/training.md repeats them):

* **Placement.** q_j sits at byte position ``end(patch k) + j``: the decoder there predicts byte j
  of patch k+1 and whether it ends the patch (the fused label). So the target for byte 0 of patch
  k+1 sits at the last byte of patch k (whose decoder holds patch k's state = teacher position k),
  patch 0 is BOS (teacher position 0, the separator, gives the first token's targets), and every
  byte position holds at most one target.
* **The patch's last byte.** Byte n-1 of a patch is target j = n-1 (its flagged half is the mass of
  the entry that is exactly the token); the position of that byte itself holds byte 0 of the next
  patch (the next teacher position), not a second target of this one.
* **Entries that are prefixes of others** (``the`` / ``there``): an entry equal to u ended before
  byte j, which the data says did not happen, so it is not in Z_j; an entry equal to u + c is the
  "ends" half of byte c; longer ones the "goes on" half. Entries with the same bytes (none in
  SmolLM2) add up.
* **Special tokens.** Their mass is dropped and the rest renormalised, except the document
  separator, which the byte row spells as one BOS byte that closes its own patch: its mass goes to
  fused id BOS + 260 at j = 0 (and nowhere at j > 0). A patch holding a special token (a separator,
  or a literal special text) gets no targets.
* **Byte-fallback / unspellable entries.** Only entries with a non-empty byte spelling below the
  tokenizer's size take part (ids past ``vocab_size``, e.g. padding rows of the embedding, and
  empty spellings are dropped like specials). A patch whose bytes are not its token's spelling
  (a byte without a single-byte token, labeled ``byte_fallback_id``) gets no targets.
* **Precision floor.** Masses are differences of one float64 cumulative sum (absolute error
  ~1e-14), so a position whose Z_j is below ``MIN_PREFIX_MASS`` gets no target (its ratios would
  be rounding noise); on the validation split of the wiki data that is < 0.1 % of positions.

How (no per-token Python): the spelled entries sorted by their bytes make every prefix u a
contiguous range of the sorted vocabulary, with the entries equal to u first; each child u + c is
a sub-range [lo, hi) whose first part [lo, mid) holds the entries equal to u + c. One cumulative
sum of the sorted probabilities per teacher position turns every group mass into a difference of
two of its entries. `TargetTable` (built once per vocabulary, ~0.5 s for SmolLM2, cached by the
tokenizer's fingerprint) holds the sorted order, every distinct prefix's children as CSR edge
lists and each token's path of prefixes; `patch_targets` does the per-step work with gathers.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np
import torch

from .byte_tokenizer import BOS, FUSED_OFFSET, FUSED_VOCAB, OFFSET
from .subword import WHITESPACE_STARTS

MIN_PREFIX_MASS = 1e-10  # below it a target's ratios are float64 cumulative-sum rounding, not signal


@dataclass
class TargetTable:
    """The sorted vocabulary as a prefix tree of ranges (CPU tensors; `to(device)` caches copies)."""

    order: torch.Tensor  # (N,) vocab ids in byte order (spelled, non-special entries)
    edge_ptr: torch.Tensor  # (n_nodes + 1,) children of prefix node u: edges edge_ptr[u]:edge_ptr[u+1]
    edge_byte: torch.Tensor  # (E,) the byte c that extends the parent to the child
    edge_lo: torch.Tensor  # (E,) the child's range [lo, hi) in the sorted order;
    edge_mid: torch.Tensor  # (E,) [lo, mid) = entries equal to the child (the token ends with c)
    edge_hi: torch.Tensor  # (E,)
    path_ptr: torch.Tensor  # (V + 1,) token id -> its CSR row in path_node / spelled
    path_node: torch.Tensor  # (Σ len,) prefix node of the token's first j bytes, j = 0 .. len-1
    spelled: torch.Tensor  # (Σ len,) the token's byte j (the same CSR)
    spell_len: torch.Tensor  # (V,) byte length of ids that get targets; 0 for the rest
    ws_lo: torch.Tensor  # (k,) sorted ranges of the entries starting with space / tab / newline
    ws_hi: torch.Tensor  # (k,)   (the whitespace-debiasing mass, docs/architecture.md §8.4)
    sep_id: int
    _copies: dict = field(default_factory=dict, repr=False)
    _excluded: dict = field(default_factory=dict, repr=False)

    @property
    def n_sorted(self) -> int:
        return int(self.order.numel())

    def excluded(self, n_logits: int) -> torch.Tensor:
        """Ids below n_logits that are not in the sorted table (specials, padding rows)."""
        if n_logits not in self._excluded:
            keep = torch.zeros(n_logits, dtype=torch.bool)
            keep[self.order[self.order < n_logits].cpu()] = True
            self._excluded[n_logits] = (~keep).nonzero().squeeze(-1).to(self.order.device)
        return self._excluded[n_logits]

    def to(self, device) -> TargetTable:
        device = torch.device(device)
        if device.type == "cpu":
            return self
        if device not in self._copies:
            moved = {
                k: getattr(self, k).to(device)
                for k in self.__dataclass_fields__
                if isinstance(getattr(self, k), torch.Tensor)
            }
            self._copies[device] = TargetTable(**moved, sep_id=self.sep_id)
        return self._copies[device]


_TABLES: dict[str, TargetTable] = {}
_LOCK = threading.Lock()


def table_for(vocab) -> TargetTable:
    """The TargetTable of a SubwordVocab, built once per tokenizer fingerprint."""
    with _LOCK:
        if vocab.fingerprint not in _TABLES:
            _TABLES[vocab.fingerprint] = build_table(vocab)
        return _TABLES[vocab.fingerprint]


def build_table(vocab) -> TargetTable:
    """Sort the spelled entries by bytes and find every distinct prefix's range and children.

    Vectorised over the entries, one loop over prefix depth (<= the longest entry, 81 in SmolLM2).
    """
    V = len(vocab.token_bytes)
    ids, lens, M, lcp = _sorted_entries(vocab)
    N = len(ids)
    nodes, path, depth_base = _prefix_nodes(M, lens, lcp)
    node_lo, node_mid, node_hi, node_parent, node_byte = nodes
    first = np.asarray(node_byte[1 : depth_base[2] if M.shape[1] > 1 else None])  # depth-1 nodes' bytes
    ws = [1 + int(k) for k in np.flatnonzero(np.isin(first, WHITESPACE_STARTS))]
    parent = np.asarray(node_parent[1:], dtype=np.int64)  # edges = non-root nodes, parents non-decreasing
    n_nodes = len(node_lo)
    edge_ptr = np.searchsorted(parent, np.arange(n_nodes + 1), side="left")

    # Per vocab id: its path of prefix nodes and its bytes, as CSR rows (length 0: no targets).
    spell_len = np.zeros(V, dtype=np.int64)
    spell_len[ids] = lens
    path_ptr = np.concatenate([[0], np.cumsum(spell_len)])
    inv = np.full(V, -1, dtype=np.int64)
    inv[ids] = np.arange(N)
    tok = np.repeat(np.arange(V), spell_len)
    j = np.arange(int(spell_len.sum())) - np.repeat(path_ptr[:-1], spell_len)
    t = torch.from_numpy
    return TargetTable(
        order=t(ids),
        edge_ptr=t(edge_ptr.astype(np.int64)),
        edge_byte=t(np.asarray(node_byte[1:], dtype=np.int64)),
        edge_lo=t(np.asarray(node_lo[1:], dtype=np.int64)),
        edge_mid=t(np.asarray(node_mid[1:], dtype=np.int64)),
        edge_hi=t(np.asarray(node_hi[1:], dtype=np.int64)),
        path_ptr=t(path_ptr.astype(np.int64)),
        path_node=t(path[inv[tok], j]),
        spelled=t((M[inv[tok], j] - 1).astype(np.int64)),
        spell_len=t(spell_len),
        ws_lo=torch.tensor([node_lo[k] for k in ws], dtype=torch.long),
        ws_hi=torch.tensor([node_hi[k] for k in ws], dtype=torch.long),
        sep_id=int(vocab.doc_separator_id),
    )


def _sorted_entries(vocab) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The spelled, non-special entries in bytes order: (vocab ids, byte lengths, byte matrix, lcp).

    Row i of the byte matrix holds sorted entry i's bytes plus 1 (0 past the end), so rows
    compare like the bytes; lcp[i] is its common prefix length with entry i - 1.
    """
    keep = [
        i
        for i in range(min(len(vocab.token_bytes), vocab.vocab_size))
        if i not in vocab.special_ids and len(vocab.token_bytes[i]) > 0
    ]
    keep.sort(key=lambda i: vocab.token_bytes[i])  # bytes order: a prefix sorts before its extensions
    ids = np.asarray(keep, dtype=np.int64)
    N = len(ids)
    lens = np.asarray([len(vocab.token_bytes[i]) for i in keep], dtype=np.int64)
    maxlen = int(lens.max())
    M = np.zeros((N, maxlen), dtype=np.int16)
    starts = np.cumsum(lens) - lens
    row = np.repeat(np.arange(N), lens)
    col = np.arange(int(lens.sum())) - np.repeat(starts, lens)
    M[row, col] = (
        np.frombuffer(b"".join(vocab.token_bytes[i] for i in keep), dtype=np.uint8).astype(np.int16) + 1
    )
    neq = M[1:] != M[:-1]
    lcp = np.concatenate([[0], np.where(neq.any(1), neq.argmax(1), maxlen)])  # with the previous entry
    return ids, lens, M, lcp


def _prefix_nodes(M: np.ndarray, lens: np.ndarray, lcp: np.ndarray):
    """Every distinct prefix of the sorted entries as a node: root (depth 0, the whole range), then
    depth 1, 2, ... each sorted by range start.

    Returns ((lo, mid, hi, parent, byte) lists per node, path, depth_base): path[i, d] is the
    node of entry i's first d bytes, depth_base[d] the first node of depth d.
    """
    N, maxlen = M.shape
    node_lo, node_mid, node_hi, node_parent, node_byte = [0], [0], [N], [-1], [0]
    depth_starts = [np.zeros(1, dtype=np.int64)]  # per depth: range starts, for the parent lookup
    depth_base = [0]
    path = np.zeros((N, maxlen), dtype=np.int64)
    for d in range(1, maxlen + 1):
        new = np.flatnonzero((lens >= d) & (lcp < d))  # entries that start a depth-d prefix
        breaks = np.flatnonzero(lcp < d)  # an entry not sharing the previous one's first d bytes
        hi = np.append(breaks, N)[np.searchsorted(breaks, new, side="right")]
        exact = np.concatenate([[0], np.cumsum(lens == d)])  # entries equal to the prefix come first
        mid = new + (exact[hi] - exact[new])
        parent = depth_base[d - 1] + np.searchsorted(depth_starts[d - 1], new, side="right") - 1
        base = len(node_lo)
        node_lo += new.tolist()
        node_mid += mid.tolist()
        node_hi += hi.tolist()
        node_parent += parent.tolist()
        node_byte += (M[new, d - 1] - 1).tolist()
        depth_starts.append(new)
        depth_base.append(base)
        if d < maxlen:
            longer = np.flatnonzero(lens > d)
            path[longer, d] = base + np.searchsorted(new, longer, side="right") - 1
    return (node_lo, node_mid, node_hi, node_parent, node_byte), path, depth_base


def _segments(counts: torch.Tensor):
    """For segment lengths (n,): (segment id, offset inside the segment) of each of Σ counts items."""
    seg = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)
    first = torch.cumsum(counts, 0) - counts
    return seg, torch.arange(seg.numel(), device=counts.device) - first[seg]


@dataclass
class TeacherPass:
    """What one chunk of teacher logits gives: log Z, the whitespace-start log-mass, the byte targets."""

    logz: torch.Tensor  # (R,) logsumexp of the logits (every id, as the teacher's softmax)
    ws_logp: torch.Tensor  # (R,) log p(the next token starts with space / tab / newline)
    row: torch.Tensor  # (T,) which row of the logits a target comes from
    j: torch.Tensor  # (T,) byte index inside the patch
    probs: torch.Tensor  # (T, 520) float32 target distribution over fused ids
    mass: torch.Tensor  # (T,) float64 Z_j: the teacher's probability that the patch's first j bytes go on


def target_tokens(
    table: TargetTable, tokens: torch.Tensor, patch_bytes: torch.Tensor, patch_len: torch.Tensor
):
    """(R,) tokens -> (R,) tokens, -1 where the patch gets no targets (special, unspelled, other bytes).

    patch_bytes (Σ patch_len,) holds each patch's raw bytes (0..255) row after row.
    """
    t = table.to(tokens.device)
    safe = tokens.clamp(0, t.spell_len.numel() - 1)
    n = torch.where(tokens >= 0, t.spell_len[safe], 0)
    ok = (n == patch_len) & (n > 0)
    seg, j = _segments(torch.where(ok, patch_len, 0))  # compare byte by byte where the lengths agree
    first = torch.cumsum(patch_len, 0) - patch_len
    bad = t.spelled[t.path_ptr[safe[seg]] + j] != patch_bytes[first[seg] + j]
    mismatch = torch.zeros_like(ok)
    mismatch[seg[bad]] = True
    return torch.where(ok & ~mismatch, tokens, -1)


def teacher_pass(table: TargetTable, logits: torch.Tensor, tokens: torch.Tensor) -> TeacherPass:
    """Byte targets for every byte of the token each teacher row predicts, plus log Z and the
    whitespace-start mass from the same cumulative sum (so they cost no extra pass over the logits).

    logits (R, V) teacher logits; tokens (R,) the token that followed each row (-1: no targets,
    see `target_tokens`). Every mass below is relative to max(logits) (the ratios need no log Z).
    """
    t = table.to(logits.device)
    logits = logits.float()
    N = t.n_sorted
    top = logits.max(-1, keepdim=True).values
    e = logits.index_select(-1, t.order).sub_(top).exp_()
    C = e.cumsum(-1, dtype=torch.float64)  # C[:, i] = mass of sorted entries 0..i
    del e
    rest = t.excluded(logits.shape[-1])  # specials, padding rows: in log Z, never in a target
    total = C[:, -1] + (logits.index_select(-1, rest) - top).exp().double().sum(-1)
    logz = top.squeeze(-1) + total.log().float()
    Cf = C.view(-1)

    def at(rows: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        """Mass of sorted entries [0, i) of each row (i may be 0)."""
        v = Cf[rows * N + (i - 1).clamp(min=0)]
        return torch.where(i > 0, v, 0.0)

    R = logits.shape[0]
    rows = torch.arange(R, device=logits.device)
    ws = torch.zeros_like(total)
    for k in range(t.ws_lo.numel()):
        ws += at(rows, t.ws_hi[k].expand(R)) - at(rows, t.ws_lo[k].expand(R))
    ws_logp = (ws.clamp(min=1e-300) / total).log().float()

    safe = tokens.clamp(min=0)
    n = torch.where(tokens >= 0, t.spell_len[safe], 0)
    row, j = _segments(n)
    node = t.path_node[t.path_ptr[safe[row]] + j]
    lo_e, hi_e = t.edge_ptr[node], t.edge_ptr[node + 1]
    tix, k = _segments(hi_e - lo_e)  # every child of every target's prefix node
    e_ = lo_e[tix] + k
    r_ = row[tix]
    lo, mid, hi = at(r_, t.edge_lo[e_]), at(r_, t.edge_mid[e_]), at(r_, t.edge_hi[e_])
    q = torch.zeros(row.numel(), FUSED_VOCAB, dtype=torch.float64, device=logits.device)
    byte = t.edge_byte[e_] + OFFSET
    q.index_put_((tix, byte), (hi - mid).clamp(min=0))
    q.index_put_((tix, byte + FUSED_OFFSET), (mid - lo).clamp(min=0))
    if 0 <= t.sep_id < logits.shape[-1]:  # the separator: one BOS byte that closes its patch
        at0 = j == 0
        q[at0, BOS + FUSED_OFFSET] = (logits[row[at0], t.sep_id] - top[row[at0], 0]).exp().double()
    mass = q.sum(-1)
    probs = (q / mass.clamp(min=1e-300)[:, None]).float()
    return TeacherPass(logz, ws_logp, row, j, probs, mass / total[row])


def patch_tokens(table: TargetTable, batch: dict) -> torch.Tensor:
    """(B, P) per teacher position k: the token of patch k+1 when that patch gets targets, else -1.

    A training batch (docs/internals.md): patch k+1 is token k+1 of ``teacher_ids``; the last
    position predicts ``teacher_next``, whose bytes are not in the window (no targets).
    """
    ids, lens = batch["input_ids"], batch["patch_lens"].long()
    B, P = lens.shape
    if P < 2:
        return torch.full((B, P), -1, dtype=torch.long, device=ids.device)
    valid = batch["patch_mask"].bool() & (lens > 0)
    nxt_len = torch.where(valid[:, 1:], lens[:, 1:], 0)
    tokens = torch.where(valid[:, 1:], batch["teacher_ids"][:, 1:].long(), -1)
    start = (lens.cumsum(1) - lens)[:, 1:]  # first byte of patch k+1
    seg, j = _segments(nxt_len.flatten())
    rows = torch.div(seg, P - 1, rounding_mode="floor")
    raw = ids[rows, start.flatten()[seg] + j] - OFFSET  # specials (BOS) come out negative: never spelled
    out = target_tokens(table, tokens.flatten(), raw, nxt_len.flatten()).view(B, P - 1)
    return torch.nn.functional.pad(out, (0, 1), value=-1)


def concat(passes: list[TeacherPass]) -> TeacherPass:
    """Several chunks as one (their rows already index the whole grid; logz/ws chunk after chunk)."""
    if len(passes) == 1:
        return passes[0]
    cat = lambda name: torch.cat([getattr(p, name) for p in passes])
    return TeacherPass(cat("logz"), cat("ws_logp"), cat("row"), cat("j"), cat("probs"), cat("mass"))
