"""Local encoder (docs/architecture.md §2, §3.1): byte + retained-subword embeddings, n_enc blocks, RMSNorm -> h_byte."""

from __future__ import annotations

import torch
from torch import nn

from .byte_tokenizer import VOCAB
from .config import LocalConfig
from .local_blocks import LocalBlock, RMSNorm, run_blocks


class LocalEncoder(nn.Module):
    """h_byte = RMSNorm_1e-5(Blocks(E_byte[x] + E_sub[s])); the sum is unscaled (docs/architecture.md §2.1)."""

    def __init__(self, d_local: int, cfg: LocalConfig, retained_vocab: int | None):
        super().__init__()
        self.byte_embedding = nn.Embedding(VOCAB, d_local)
        self.retained_embedding = nn.Embedding(retained_vocab, d_local) if retained_vocab else None
        self.blocks = nn.ModuleList(LocalBlock(d_local, cfg) for _ in range(cfg.n_encoder_layers))
        self.norm = RMSNorm(d_local, eps=cfg.norm_eps)

    def embed(self, input_ids: torch.Tensor, expanded_ids: torch.Tensor | None) -> torch.Tensor:
        e = self.byte_embedding(input_ids)
        if self.retained_embedding is not None:
            if expanded_ids is None:
                raise ValueError("expanded_ids: required when retained embeddings are enabled")
            e = e + self.retained_embedding(expanded_ids)
        return e

    def forward(self, input_ids, expanded_ids=None, state=None, reset=None, hold=None):
        """(B, L) ids -> (h_byte (B, L, d_l), per-block states); reset/hold: see local_blocks."""
        x, state = run_blocks(self.blocks, self.embed(input_ids, expanded_ids), state, reset, hold)
        return self.norm(x), state
