"""Boundary predictor (docs/architecture.md §4): p_t = (1 - cos(W_q h_t, W_k h_{t+1})) / 2, in log space.

lookahead=1 is the released non-causal predictor (byte t's boundary depends on byte t+1).
lookahead=0 is the causal ablation: compare h_{t-1} with h_t, so p_t never sees byte t+1.

context=c > 0 widens what the predictor reads (an option for the boundary plateau, docs/results.md):
both sides see h~_t = h_t + U [h_{t-1}; ...; h_{t-c}] (zeros before the row's start), a causal
convolution over the encoder states with U initialised to 0, so a fresh or converted predictor
starts as exactly docs/architecture.md's and learns how much the previous bytes matter. It adds no lookahead:
p_t still reads positions <= t+1 (lookahead 1) or <= t (lookahead 0).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

NEG = -1e5  # log p for positions with no future byte (docs/architecture.md §4.1)
COS_MAX = 1.0 - 1e-3  # clip so log(1 - cos) stays finite


class BoundaryPredictor(nn.Module):
    def __init__(self, d: int, lookahead: int = 1, threshold: float = 0.5, context: int = 0):
        super().__init__()
        if lookahead not in (0, 1):
            raise ValueError(f"boundary_lookahead must be 0 or 1, got {lookahead}")
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"boundary_threshold must be in (0, 1), got {threshold}")
        if context < 0:
            raise ValueError(f"boundary_context must be >= 0, got {context}")
        self.lookahead, self.log_threshold, self.context = lookahead, math.log(threshold), context
        self.q = nn.Linear(d, d, bias=False)
        self.k = nn.Linear(d, d, bias=False)
        self.widen = nn.Linear(context * d, d, bias=False) if context else None
        self.reset_identity()

    def reset_identity(self) -> None:
        with torch.no_grad():
            self.q.weight.copy_(torch.eye(self.q.weight.shape[0]))
            self.k.weight.copy_(torch.eye(self.k.weight.shape[0]))
            if self.widen is not None:
                self.widen.weight.zero_()

    def _widened(self, h: torch.Tensor) -> torch.Tensor:
        """h_t + U [h_{t-1}; ...; h_{t-c}]: the previous c states, zero-padded at the row's start."""
        if self.widen is None:
            return h
        L = h.shape[1]
        past = F.pad(h, (0, 0, self.context, 0))
        lags = torch.cat(
            [past[:, self.context - i : self.context - i + L] for i in range(1, self.context + 1)], -1
        )
        return h + self.widen(lags)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h_byte (B, L, d) -> log p (B, L); log p_0 = 0 (BOS is a boundary)."""
        h = self._widened(h)
        q = F.normalize(self.q(h[:, :-1]).float(), dim=-1)
        k = F.normalize(self.k(h[:, 1:]).float(), dim=-1)
        cos = (q * k).sum(-1).clamp(max=COS_MAX)
        logp = torch.log1p(-cos) - math.log(2.0)  # (B, L-1): pair (t, t+1)
        B = h.shape[0]
        if self.lookahead == 1:  # p_t from (t, t+1); the last byte has no future
            logp = torch.cat([logp, logp.new_full((B, 1), NEG)], 1)
        else:  # p_t from (t-1, t); nothing after t is used
            logp = torch.cat([logp.new_zeros(B, 1), logp], 1)
        return torch.cat([logp.new_zeros(B, 1), logp[:, 1:]], 1)

    def step_logp(self, h_prev: torch.Tensor, h_cur: torch.Tensor) -> torch.Tensor:
        """log p for one pair of consecutive positions (B, d), (B, d) -> (B,) (context=0 only)."""
        if self.widen is not None:
            raise ValueError(
                "step_logp reads two states; a predictor with boundary_context > 0 needs forward()"
            )
        q = F.normalize(self.q(h_prev).float(), dim=-1)
        k = F.normalize(self.k(h_cur).float(), dim=-1)
        return torch.log1p(-(q * k).sum(-1).clamp(max=COS_MAX)) - math.log(2.0)

    def decide(self, logp: torch.Tensor) -> torch.Tensor:
        """Boundary where p_t > threshold (docs/architecture.md §4.2)."""
        return logp > self.log_threshold
