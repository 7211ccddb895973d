"""A tiny random base/instruct source pair with a known delta (for the transfer tests).

Built from source.py's tiny-olmo2 with every weight rounded to a 2^-12 grid and a delta of
small multiples of 2^-12, so (instruct - base) is exactly the delta in float32.
"""

from pathlib import Path

import torch

from bolmo_core.source import SourceConfig, load_source_model, load_tokenizer

GRID = 2.0**-12


def save_source(model, tok, folder: Path) -> str:
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def make_pair(root: Path) -> tuple[str, str, dict[str, torch.Tensor]]:
    """(base folder, instruct folder, the known delta by source key)."""
    tok = load_tokenizer(SourceConfig("tiny-olmo2"))
    model = load_source_model(SourceConfig("tiny-olmo2"))
    gen = torch.Generator().manual_seed(7)
    delta = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.round(p / GRID) * GRID)
            delta[name] = torch.randint(-8, 9, p.shape, generator=gen).float() * GRID
    base = save_source(model, tok, root / "base")
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(delta[name])
    return base, save_source(model, tok, root / "instruct"), delta
