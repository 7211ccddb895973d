"""Test helper: training batches (docs/internals.md format) built directly from real text, and the
byte-level targets of docs/architecture.md §8 computed the slow, obvious way."""

import torch

from bolmo_core.byte_tokenizer import BOS, OFFSET
from bolmo_core.loader import empty_arrays, finish_batch
from bolmo_core.subword import RetainedIndex, SubwordVocab


def text_batch(tok, vocab, docs: list[list[str]], P: int, expansion: int = 6) -> dict:
    """One window per row: [sep] + tokens of the row's documents joined by the separator, skip_last."""
    sep = vocab.doc_separator_id
    L = expansion * P
    rows = []
    for row in docs:
        ids: list[int] = []
        for i, text in enumerate(row):
            if i:
                ids.append(sep)
            ids.extend(tok.encode(text, add_special_tokens=False))
        assert len(ids) >= P, "test text too short for the window"
        rows.append(ids[:P])
    input_ids, patch_lens, teacher, nxt = empty_arrays(len(rows), P, L, sep)
    for r, toks in enumerate(rows):
        pieces = [[BOS]] + [
            [BOS] if t == sep else [b + OFFSET for b in vocab.token_bytes[t]] for t in toks[:-1]
        ]
        lens = [len(p) for p in pieces]
        flat = [x for p in pieces for x in p][:L]
        input_ids[r, : len(flat)] = flat
        patch_lens[r] = lens
        teacher[r, 1:] = toks[:-1]
        nxt[r] = toks[-1]
    return finish_batch(input_ids, patch_lens, teacher, nxt, RetainedIndex(vocab), sep, vocab.pad_id)


def brute_targets(vocab: SubwordVocab, p: torch.Tensor, token: int, j: int) -> tuple[torch.Tensor, float]:
    """(target (520,) float64, Z_j) of byte j of `token` by enumerating the vocabulary (rules:
    byte_targets.py); p (V,) float64 probabilities of the next token."""
    u = vocab.token_bytes[token][:j]
    q = torch.zeros(520, dtype=torch.float64)
    for i, b in enumerate(vocab.token_bytes[: vocab.vocab_size]):
        if i in vocab.special_ids:
            if i == vocab.doc_separator_id and j == 0:
                q[1 + 260] += p[i]
            continue
        if len(b) > j and b.startswith(u):
            q[b[j] + OFFSET + (260 if len(b) == j + 1 else 0)] += p[i]
    z = float(q.sum())
    return q / z, z
