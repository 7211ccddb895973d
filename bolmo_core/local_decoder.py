"""Local decoder (docs/architecture.md §5.2, §7.1): normalised global output depooled onto bytes, plus InProj(h_byte), 4 blocks."""

from __future__ import annotations

import torch
from torch import nn

from .config import LocalConfig
from .local_blocks import LocalBlock, RMSNorm, run_blocks


class LocalDecoder(nn.Module):
    def __init__(self, d_local: int, d_global: int, cfg: LocalConfig):
        super().__init__()
        self.initial_norm = RMSNorm(d_global, eps=cfg.norm_eps)  # takes over the source's final norm
        # d_l < d_g: a learned projection down (the reference instead keeps the first d_l channels)
        self.global_projection = nn.Linear(d_global, d_local, bias=False) if d_local != d_global else None
        self.in_projection = nn.Linear(d_local, d_local, bias=True)
        self.blocks = nn.ModuleList(LocalBlock(d_local, cfg) for _ in range(cfg.n_decoder_layers))

    def project_global(self, g: torch.Tensor) -> torch.Tensor:
        """Global outputs (B, P, d_g) -> normalised patch vectors (B, P, d_l)."""
        g = self.initial_norm(g)
        return self.global_projection(g) if self.global_projection is not None else g

    def forward(self, h_byte: torch.Tensor, g_bytes: torch.Tensor, state=None, reset=None, hold=None):
        """h_byte (B, L, d_l) + depooled patch vectors (B, L, d_l) -> (y (B, L, d_l), states)."""
        return run_blocks(self.blocks, self.in_projection(h_byte) + g_bytes, state, reset, hold)
