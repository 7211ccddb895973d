"""Training loaders on small data: the in-memory WindowLoader against the StreamingWindowLoader.

Same manifest (the demo's data: the built-in Wikipedia extracts, all of them, labelled with
the SmolLM2 tokenizer, 64-token windows), same process, same batches per run (4 windows, the
demo's micro-batch). For each loader: the time to its first batch (construction: the
in-memory one reads and packs the whole split; the streaming one reads its first block) and
the time for BATCHES batches after it. Best of REPEATS rounds,
the two loaders in turn within a round. This is what ``WindowLoader.from_config`` relies on
to keep the in-memory path for splits up to ``IN_MEMORY_MAX_BYTES`` (docs/internals.md).
Run: python benchmarks/bench_loader.py
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time

from bolmo_core import data as D
from bolmo_core.config import get_preset
from bolmo_core.loader import StreamingWindowLoader, WindowLoader
from bolmo_core.source import load_tokenizer
from bolmo_core.subword import get_vocab

BATCHES = 300
REPEATS = 3


def run(make) -> tuple[float, float]:
    """(seconds to the first batch, seconds for BATCHES more)."""
    t = time.perf_counter()
    it = iter(make())
    next(it)
    first = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(BATCHES):
        next(it)
    return first, time.perf_counter() - t


def main() -> None:
    preset = get_preset("smollm2-135m")
    out = tempfile.mkdtemp(prefix="bench_loader_")
    manifest = D.prepare_dataset(["builtin:wiki"], preset.model.source, out, preset.data)
    m = D.read_manifest(manifest)
    vocab = get_vocab(load_tokenizer(preset.model.source))
    P, B = preset.data.window_tokens, preset.stage1.micro_batch
    loaders = {
        "in memory": lambda: WindowLoader(manifest, vocab, P, B, seed=0),
        "streaming": lambda: StreamingWindowLoader(manifest, vocab, P, B, seed=0),
    }
    best = {k: [float("inf")] * 2 for k in loaders}
    for r in range(REPEATS):
        for name in loaders if r % 2 == 0 else reversed(list(loaders)):
            got = run(loaders[name])
            best[name] = [min(a, b) for a, b in zip(best[name], got)]
    tr = m["splits"]["train"]
    print(
        f"train split: {tr['bytes'] / 1e6:.1f} MB text, {tr['tokens']} tokens, {tr['shards']} shards; "
        f"windows of {P} tokens, batches of {B}; cores: {os.cpu_count()}; best of {REPEATS}"
    )
    for name, (first, rest) in best.items():
        print(f"  {name}: first batch {first:6.2f} s, then {BATCHES / rest:7.1f} batches/s")
    (f0, r0), (f1, r1) = best["in memory"], best["streaming"]
    print(
        f"  in memory / streaming: {r1 / r0:.2f}x the batches per second; "
        f"the streaming loader's first batch comes {f0 / f1:.2f}x sooner"
    )
    shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
