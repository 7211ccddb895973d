"""The byte LM head (docs/architecture.md §7.1): RMSNorm(d_l, eps 1e-6) then Linear(d_l -> 520, no bias)."""

from __future__ import annotations

import torch
from torch import nn

from .byte_tokenizer import FUSED_VOCAB
from .local_blocks import RMSNorm


class LMHead(nn.Module):
    def __init__(self, d_local: int, eps: float = 1e-6, vocab: int = FUSED_VOCAB):
        super().__init__()
        self.norm = RMSNorm(d_local, eps=eps)
        self.out = nn.Linear(d_local, vocab, bias=False)
        nn.init.normal_(self.out.weight, std=0.02)  # OLMo's head init (docs/architecture.md §2.3)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(y))
