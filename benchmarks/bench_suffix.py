"""Subword alignment speed: retained ids (numba Aho-Corasick scan) vs a per-byte Python reverse-trie walk, and
boundary labeling vs the raw fast tokenizer, side by side on the same ~200 KB of real text.

    .venv/bin/python benchmarks/bench_suffix.py [--kb 200] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from bolmo_core.byte_tokenizer import BOS, EOP, FUSED_OFFSET, OFFSET, ByteTokenizer
from bolmo_core.source import SourceConfig, load_tokenizer, tiny_corpus
from bolmo_core.subword import RetainedIndex, SubwordVocab, label_documents


class TrieWalkBaseline:
    """The reference algorithm (docs/architecture.md §2.2): a reverse trie of nested dicts, walked back from every byte."""

    def __init__(self, vocab: SubwordVocab):
        self.root: dict = {}
        self.sep_id, self.pad_id, self.fallback = vocab.doc_separator_id, vocab.pad_id, vocab.byte_fallback_id
        for i, b in enumerate(vocab.token_bytes):
            if not b or i in vocab.special_ids:
                continue
            node = self.root
            for byte in reversed(b):
                node = node.setdefault(byte + OFFSET, {})
            node.setdefault(-1, i)  # lowest id wins for identical byte strings

    def expand(self, ids: list[int]) -> list[int]:
        out = []
        for t in range(len(ids)):
            x = ids[t] - FUSED_OFFSET if ids[t] >= FUSED_OFFSET else ids[t]
            if x < OFFSET and x != EOP:
                out.append(self.sep_id if x == BOS else self.pad_id)
                continue
            node, best = self.root, self.fallback
            for j in range(t, -1, -1):
                y = ids[j] - FUSED_OFFSET if ids[j] >= FUSED_OFFSET else ids[j]
                if y == EOP:
                    continue
                node = node.get(y)
                if node is None:
                    break
                best = node.get(-1, best)
            out.append(best)
        return out


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kb", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    tok = load_tokenizer(SourceConfig("smollm2-135m"))
    vocab = SubwordVocab.from_tokenizer(tok)
    t0 = time.perf_counter()
    index = RetainedIndex(vocab)
    build_s = time.perf_counter() - t0
    baseline = TrieWalkBaseline(vocab)

    docs = [d.encode("utf-8") for d in tiny_corpus(args.kb * 1000)]
    n_bytes = sum(map(len, docs))
    ids = ByteTokenizer().encode(b"".join(docs))
    ids_np = np.array(ids, dtype=np.int64)
    t0 = time.perf_counter()
    index.expand(ids_np[:64])  # first call: numba JIT compile, or load from its on-disk cache
    first_s = time.perf_counter() - t0
    assert index.expand(ids_np).tolist() == baseline.expand(ids), (
        "RetainedIndex and the Python trie walk disagree"
    )

    t_base = best_of(lambda: baseline.expand(ids), max(1, args.repeats - 1))
    t_vec = best_of(lambda: index.expand(ids_np), args.repeats)
    rows = ids_np[: (len(ids_np) // 4096) * 4096].reshape(-1, 4096)
    t_rows = best_of(lambda: index.expand(rows), args.repeats)
    print(
        f"text: {n_bytes / 1e3:.0f} KB, {len(docs)} Wikipedia extracts (en/fr/es); SmolLM2 vocab {vocab.vocab_size}"
    )
    print(
        f"RetainedIndex build: {build_s:.2f} s ({len(index.node_out)} automaton states, longest entry {index.max_len} B)"
    )
    print(f"RetainedIndex first expand call (JIT compile or cache load): {first_s:.2f} s")
    print(f"retained ids, Python reverse-trie walk: {len(ids) / t_base / 1e6:8.3f} MB/s")
    print(
        f"retained ids, RetainedIndex.expand:     {len(ids) / t_vec / 1e6:8.3f} MB/s  ({t_base / t_vec:.1f}x)"
    )
    print(f"retained ids, expand on {rows.shape} rows: {rows.size / t_rows / 1e6:8.3f} MB/s")

    texts = [d.decode("utf-8") for d in docs]
    backend = tok.backend_tokenizer
    t_raw = best_of(lambda: backend.encode_batch(texts, add_special_tokens=False), args.repeats)
    t_lab = best_of(lambda: label_documents(tok, docs, vocab), args.repeats)
    print(f"labels, raw encode_batch with offsets:  {n_bytes / t_raw / 1e6:8.3f} MB/s")
    print(
        f"labels, label_documents:                {n_bytes / t_lab / 1e6:8.3f} MB/s  ({t_raw / t_lab:.2f}x of raw)"
    )


if __name__ == "__main__":
    main()
