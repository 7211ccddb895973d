"""Local (byte-level) blocks (docs/architecture.md §3.1, §3.3): the mLSTM layer, SwiGLU, and the pre-norm block.

`forward(x, state=None, reset=None) -> (y, state)` runs a whole sequence (chunkwise kernel,
continuing from `state` when given) or, for L == 1 with a state, one recurrent step; the
recurrent state is the mLSTM's (C, n, m) in fp32 and is what generation carries between bytes.
`hold` (B, L) bool marks positions that leave the state exactly unchanged (input gate -> 0, forget
gate -> 1): right-padded prompts end in their own last real state, and idle rows of a batched
generation step keep theirs. Outputs at held positions are meaningless.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import LocalConfig
from .mlstm import check_kernel, get_mlstm_backend, mlstm_step, reset_forget_gate

State = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
HOLD_I = -1e30  # input-gate value with exp(HOLD_I - m) == 0: nothing is written
HOLD_F = 1e5  # forget-gate pre-activation with logsigmoid == 0 exactly in fp32: the state is kept


class RMSNorm(nn.Module):
    """RMSNorm with the reduction in fp32 and the output in the input dtype (bf16 autocast safe)."""

    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()
        return y.to(x.dtype)


class MLSTMLayer(nn.Module):
    """xLSTM-7B style mLSTM: q,k (d*qk_factor), v (d), sigmoid output gate, scalar gates per head."""

    def __init__(self, d: int, cfg: LocalConfig):
        super().__init__()
        if d % cfg.n_heads:
            raise ValueError(f"local width {d} is not divisible by n_heads={cfg.n_heads}")
        dqk = int(d * cfg.qk_dim_factor)
        if dqk % cfg.n_heads:
            raise ValueError(f"q/k width {dqk} is not divisible by n_heads={cfg.n_heads}")
        self.d, self.h, self.dqk = d, cfg.n_heads, dqk
        self.soft_cap, self.chunk_size, self.kernel = (
            cfg.gate_soft_cap,
            cfg.chunk_size,
            check_kernel(cfg.kernel),
        )
        self.q = nn.Linear(d, dqk, bias=False)
        self.k = nn.Linear(d, dqk, bias=False)
        self.v = nn.Linear(d, d, bias=False)
        self.o_gate = nn.Linear(d, d, bias=False)
        self.i_gate = nn.Linear(d, cfg.n_heads, bias=True)
        self.f_gate = nn.Linear(d, cfg.n_heads, bias=True)
        self.head_norm_weight = nn.Parameter(torch.ones(d))
        self.out = nn.Linear(d, d, bias=False)
        self.head_norm_eps = 1e-6
        with torch.no_grad():
            self.i_gate.bias.fill_(
                cfg.igate_bias_init
            )  # "disable the input gate" at start (docs/architecture.md §2.3)

    def _cap(self, x: torch.Tensor) -> torch.Tensor:
        return self.soft_cap * torch.tanh(x / self.soft_cap)

    def _head_norm(self, h: torch.Tensor) -> torch.Tensor:
        """Per-head LayerNorm (group norm, one group per head, weight only), reductions in fp32."""
        hf = h.float()
        hf = (hf - hf.mean(-1, keepdim=True)) * torch.rsqrt(
            hf.var(-1, unbiased=False, keepdim=True) + self.head_norm_eps
        )
        B, H, L, Dv = h.shape
        hf = hf.permute(0, 2, 1, 3).reshape(B, L, H * Dv)
        return (hf * self.head_norm_weight.float()).to(h.dtype)

    def forward(
        self,
        x: torch.Tensor,
        state: State | None = None,
        reset: torch.Tensor | None = None,
        hold: torch.Tensor | None = None,
    ):
        B, L, _ = x.shape
        H = self.h
        q = self.q(x).view(B, L, H, -1).transpose(1, 2)
        k = self.k(x).view(B, L, H, -1).transpose(1, 2)
        v = self.v(x).view(B, L, H, -1).transpose(1, 2)
        i = self._cap(self.i_gate(x)).transpose(1, 2)  # (B,H,L)
        f = self._cap(self.f_gate(x)).transpose(1, 2)
        if reset is not None:  # after the cap: f -> -1e5 makes the forget gate exactly ~0
            f = reset_forget_gate(f, reset)
        if hold is not None:  # i -> exp(-1e30) = 0 and log f = 0: C, n and m pass through unchanged
            hold = hold.to(torch.bool)[:, None, :]
            i = i.masked_fill(hold, HOLD_I)
            f = f.masked_fill(hold, HOLD_F)
        if L == 1 and state is not None:
            h, state = mlstm_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], i[:, :, 0], f[:, :, 0], state)
            h = h.unsqueeze(2)
        else:
            kernel = get_mlstm_backend(self.kernel, x.device)
            h, state = kernel(
                q, k, v, i, f, chunk_size=self.chunk_size, initial_state=state, return_last_state=True
            )
        y = self._head_norm(h) * torch.sigmoid(self.o_gate(x))
        return self.out(y), state


class SwiGLU(nn.Module):
    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.gate = nn.Linear(d, hidden, bias=False)
        self.up = nn.Linear(d, hidden, bias=False)
        self.down = nn.Linear(hidden, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class LocalBlock(nn.Module):
    """x + mLSTM(RMSNorm(x)), then + SwiGLU(RMSNorm(.)) (pre-norm, eps 1e-6, no dropout)."""

    def __init__(self, d: int, cfg: LocalConfig):
        super().__init__()
        self.mlstm_norm = RMSNorm(d, eps=cfg.block_norm_eps)
        self.mlstm = MLSTMLayer(d, cfg)
        self.ffn_norm = RMSNorm(d, eps=cfg.block_norm_eps)
        self.ffn = SwiGLU(d, cfg.ffn_hidden)

    def forward(
        self,
        x: torch.Tensor,
        state: State | None = None,
        reset: torch.Tensor | None = None,
        hold: torch.Tensor | None = None,
    ):
        a, state = self.mlstm(self.mlstm_norm(x), state, reset, hold)
        x = x + a
        return x + self.ffn(self.ffn_norm(x)), state


def run_blocks(
    blocks: nn.ModuleList,
    x: torch.Tensor,
    states: list | None = None,
    reset: torch.Tensor | None = None,
    hold: torch.Tensor | None = None,
):
    """Run a stack of LocalBlocks, threading one state per block (`hold`: see the module docstring)."""
    states = states if states is not None else [None] * len(blocks)
    new = []
    for blk, st in zip(blocks, states, strict=True):
        x, st = blk(x, st, reset, hold)
        new.append(st)
    return x, new
