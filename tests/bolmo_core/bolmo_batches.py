"""Test helper: training batches (docs/internals.md format) built directly from real text."""

import numpy as np
import torch

from bolmo_core.byte_tokenizer import BOS, OFFSET, PAD
from bolmo_core.subword import RetainedIndex


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
    B = len(rows)
    input_ids = np.full((B, L), PAD, np.int64)
    patch_lens = np.zeros((B, P), np.int64)
    teacher = np.full((B, P), sep, np.int64)
    nxt = np.zeros(B, np.int64)
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
    patch_mask = np.cumsum(patch_lens, 1) <= L
    patch_lens[~patch_mask] = 0
    byte_mask = input_ids != PAD
    expanded = RetainedIndex(vocab).expand(input_ids)
    expanded[input_ids == BOS] = sep
    expanded[~byte_mask] = vocab.pad_id
    t = torch.from_numpy
    return {
        "input_ids": t(input_ids),
        "expanded_ids": t(np.asarray(expanded, np.int64)),
        "patch_lens": t(patch_lens),
        "teacher_ids": t(teacher),
        "teacher_next": t(nxt),
        "byte_mask": t(byte_mask),
        "patch_mask": t(patch_mask),
    }
