"""mLSTM cell math (docs/architecture.md §3.3) in the xLSTM kernel convention: parallel, chunkwise, recurrent, step.

Convention (same as `mlstm_kernels`): q·k is scaled by 1/sqrt(Dqk); log f = logsigmoid(f̃);
the state is (C: (B,H,Dqk,Dv), n: (B,H,Dqk), m: (B,H)) in fp32, C and n stored divided by exp(m);
the zero state is C=0, n=0, m=0; h = (C^T q) / (max(|n·q|, exp(-m)) + eps).
All forms compute in fp32 (fp64 inputs stay fp64) with autocast disabled and return h in the
input dtype. The parallel form includes the zero initial state (m=0) in its stabiliser, so all
forms agree exactly (mlstm_kernels' own parallel kernel omits it and differs at the eps level).

Left padding / per-row reset: a forget-gate pre-activation of RESET_F (-1e5) makes f ≈ 0, so the
state before that position is dropped exactly (docs/architecture.md §3.3); `reset_forget_gate` applies it.
In the chunkwise form any log f < -1e3 is treated as such an exact reset: it is kept out of the
within-chunk cumsum (where -1e5 would cost fp32 precision in every later difference) and cuts
the chunk into segments instead.
"""

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

RESET_F = -1e5  # forget-gate pre-activation that zeroes the earlier state
_RESET_LOGF = -1e3  # log f below this is an exact reset (exp underflows to 0 even in fp64)
_PAD_I = -1e30  # input-gate value of internal padding: exp(_PAD_I - m) == 0, and stays finite

State = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class MLSTMError(ValueError):
    """Bad input to an mLSTM kernel (shape, dtype, or backend)."""


# ---------------------------------------------------------------------------- helpers


def _check(q, k, v, i, f, state=None, step=False):
    """Validate shapes; raise MLSTMError with a one-line message naming the input."""
    nd = 3 if step else 4
    if q.dim() != nd:
        raise MLSTMError(
            f"q must have {nd} dims ({'B,H,Dqk' if step else 'B,H,L,Dqk'}), got shape {tuple(q.shape)}"
        )
    if k.shape != q.shape:
        raise MLSTMError(f"k must have the shape of q {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.dim() != nd or v.shape[:-1] != q.shape[:-1]:
        raise MLSTMError(f"v must have shape {tuple(q.shape[:-1])} + (Dv,), got {tuple(v.shape)}")
    for name, g in (("i", i), ("f", f)):
        if g.shape != q.shape[:-1]:
            raise MLSTMError(f"gate {name} must have shape {tuple(q.shape[:-1])}, got {tuple(g.shape)}")
    if state is not None:
        B, H, Dqk, Dv = q.shape[0], q.shape[1], q.shape[-1], v.shape[-1]
        if len(state) != 3:
            raise MLSTMError(f"state must be a tuple (C, n, m), got {len(state)} items")
        want = ((B, H, Dqk, Dv), (B, H, Dqk), (B, H))
        for name, t, s in zip(("C", "n", "m"), state, want):
            if tuple(t.shape) != s:
                raise MLSTMError(f"state {name} must have shape {s}, got {tuple(t.shape)}")


def _fp32(*ts):
    """Cast to fp32 (fp64 inputs stay fp64, which lets tests check the math tightly)."""
    return tuple(t.to(_compute_dtype(t.dtype)) for t in ts)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _segsum(x: torch.Tensor) -> torch.Tensor:
    """(..., T) -> (..., T, T) with [t, s] = sum_{s<r<=t} x_r for s <= t, -inf above the diagonal.

    Summed directly (masked cumsum) rather than as cumsum[t] - cumsum[s], which would lose the
    small decays after a -1e5 reset to fp32 cancellation.
    """
    T = x.shape[-1]
    strict = torch.ones(T, T, dtype=torch.bool, device=x.device).tril(-1)
    xx = x.unsqueeze(-1).expand(*x.shape, T).masked_fill(~strict, 0.0)
    out = xx.cumsum(-2)
    return out.masked_fill(~strict.logical_or(torch.eye(T, dtype=torch.bool, device=x.device)), -math.inf)


def reset_forget_gate(f: torch.Tensor, reset: torch.Tensor) -> torch.Tensor:
    """Set f to RESET_F where `reset` (bool, (B,L) or (B,H,L)) is True: the row's state restarts there."""
    if reset.dim() == 2:
        reset = reset[:, None, :]
    return f.masked_fill(reset.to(torch.bool), RESET_F)


# ---------------------------------------------------------------------------- parallel


def mlstm_parallel(q, k, v, i, f, eps=1e-6):
    """Stabilised quadratic (masked, log-space) form; zero initial state. Memory O(L^2)."""
    _check(q, k, v, i, f)
    dtype = q.dtype
    with torch.autocast(q.device.type, enabled=False):
        q, k, v, i, f = _fp32(q, k, v, i, f)
        logf = F.logsigmoid(f)
        logD = _segsum(logf) + i.unsqueeze(-2)  # (B,H,L,L): log weight of k_s v_s at t
        # the zero initial state (m=0) decays as cumsum(logf): it is part of m, as in the recurrence
        m = torch.maximum(logD.amax(-1), logf.cumsum(-1))  # (B,H,L)
        S = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5) * torch.exp(logD - m.unsqueeze(-1))
        num = S @ v
        den = torch.maximum(S.sum(-1).abs(), torch.exp(-m)) + eps
        h = num / den.unsqueeze(-1)
    return h.to(dtype)


# ---------------------------------------------------------------------------- step / recurrent


def zero_state(B: int, H: int, Dqk: int, Dv: int, device=None, dtype=torch.float32) -> State:
    """The zero state (C=0, n=0, m=0), fp32 by default."""
    z = dict(dtype=dtype, device=device)
    return torch.zeros(B, H, Dqk, Dv, **z), torch.zeros(B, H, Dqk, **z), torch.zeros(B, H, **z)


def mlstm_step(q, k, v, i, f, state, eps=1e-6):
    """One position: q,k (B,H,Dqk), v (B,H,Dv), i,f (B,H); state (C,n,m) fp32 or None -> (h, new_state)."""
    _check(q, k, v, i, f, state, step=True)
    dtype = q.dtype
    with torch.autocast(q.device.type, enabled=False):
        q, k, v, i, f = _fp32(q, k, v, i, f)
        if state is None:
            state = zero_state(q.shape[0], q.shape[1], q.shape[2], v.shape[2], q.device, q.dtype)
        C, n, m = (t.to(q.dtype) for t in state)
        logf = F.logsigmoid(f)
        m_new = torch.maximum(logf + m, i)
        fa = torch.exp(logf + m - m_new)
        ia = torch.exp(i - m_new)
        C = fa[..., None, None] * C + (ia[..., None] * k).unsqueeze(-1) * v.unsqueeze(-2)
        n = fa[..., None] * n + ia[..., None] * k
        qs = q * (q.shape[-1] ** -0.5)
        num = (qs.unsqueeze(-2) @ C).squeeze(-2)
        den = torch.maximum((qs * n).sum(-1).abs(), torch.exp(-m_new)) + eps
        h = num / den.unsqueeze(-1)
    return h.to(dtype), (C, n, m_new)


def mlstm_recurrent(q, k, v, i, f, eps=1e-6, initial_state=None, return_last_state=False):
    """Step-by-step loop over L with `mlstm_step` (reference form; slow)."""
    _check(q, k, v, i, f, initial_state)
    state = initial_state
    hs = []
    for t in range(q.shape[2]):
        h, state = mlstm_step(q[:, :, t], k[:, :, t], v[:, :, t], i[:, :, t], f[:, :, t], state, eps)
        hs.append(h)
    B, H, L, Dqk = q.shape
    h = torch.stack(hs, 2) if hs else v.new_zeros(B, H, 0, v.shape[-1])
    if state is None:
        state = zero_state(B, H, Dqk, v.shape[-1], q.device, _compute_dtype(q.dtype))
    return (h, state) if return_last_state else h


# ---------------------------------------------------------------------------- chunkwise


def _intra_gates(lf, ic):
    """Per-chunk gate bookkeeping from lf = log f and ic = input gates (B,H,N,c).

    Returns cum (within-chunk cumsum of log f), x = ic - cum, keep (c,c) or (B,H,N,c,c) mask of
    pairs s <= t that no reset separates, seg (reset segment ids or None), and a = log weight of
    k_s v_s in the chunk-end state. A log f below _RESET_LOGF (a reset) is kept out of the cumsum
    and cuts the chunk into segments, -inf across a cut: exp gives exactly 0 there anyway, and a
    -1e5 inside the cumsum would cost fp32 precision in every later difference.
    """
    c = lf.shape[-1]
    keep = torch.ones(c, c, dtype=torch.bool, device=lf.device).tril()
    is_reset = lf < _RESET_LOGF
    if not bool(is_reset.any()):
        cum = lf.cumsum(-1)
        x = ic - cum
        return cum, x, keep, None, x + cum[..., -1:]
    seg = is_reset.cumsum(-1)
    cum = lf.masked_fill(is_reset, 0.0).cumsum(-1)
    x = ic - cum
    keep = keep & (seg.unsqueeze(-1) == seg.unsqueeze(-2))
    a = (x + cum[..., -1:]).masked_fill(seg != seg[..., -1:], -math.inf)
    return cum, x, keep, seg, a


def _intra_weights(cum, x, keep, seg, m_in):
    """Stabilised intra-chunk weights: logW[t,s] (c x c) and b[t] for the incoming state, both minus M_t."""
    if seg is None:
        m_intra = cum + x.cummax(-1).values  # max_{s<=t} (cum_t - cum_s + i_s) as a prefix max
        b = cum + m_in.unsqueeze(-1)
    else:
        m_intra = (cum.unsqueeze(-1) + x.unsqueeze(-2)).masked_fill(~keep, -math.inf).amax(-1)
        b = (cum + m_in.unsqueeze(-1)).masked_fill(seg > 0, -math.inf)
    M = torch.maximum(m_intra, b)
    logW = ((cum - M).unsqueeze(-1) + x.unsqueeze(-2)).masked_fill(~keep, -math.inf)
    return logW, b - M, M


def _chunk_states(kc, vc, a, g, C0, m0):
    """All chunk-boundary states at once (no loop over chunks).

    kc (B,H,N,c,Dqk), vc (B,H,N,c,Dv1) with the ones column for n, a (B,H,N,c) the log weight of
    each k_s v_s in its chunk-end state, g (B,H,N) the log decay across each chunk,
    C0 (B,H,Dqk,Dv1), m0 (B,H).
    Returns states (B,H,N+1,Dqk,Dv1) entering each chunk (the last is the final state) and
    their stabilisers m (B,H,N+1).
    """
    B, H, N, c = a.shape
    amax = a.amax(-1)  # (B,H,N)
    # per-chunk contribution, stabilised by its own max
    dC = (kc * torch.exp(a - amax.unsqueeze(-1)).unsqueeze(-1)).transpose(-2, -1) @ vc  # (B,H,N,Dqk,Dv1)
    # sources: the initial state (scale m0) then each chunk (scale amax); target k sees sources p <= k
    src = torch.cat([C0.unsqueeze(2), dC], 2).flatten(-2)  # (B,H,N+1,Dqk*Dv1)
    scale = torch.cat([m0.unsqueeze(-1), amax], -1)
    logW = _segsum(torch.cat([g.new_zeros(B, H, 1), g], -1)) + scale.unsqueeze(-2)
    m = logW.amax(-1)  # (B,H,N+1)
    states = torch.exp(logW - m.unsqueeze(-1)) @ src
    return states.view(B, H, N + 1, *C0.shape[-2:]), m


def mlstm_chunkwise(q, k, v, i, f, chunk_size=64, eps=1e-6, initial_state=None, return_last_state=False):
    """Chunkwise form: intra-chunk quadratic, inter-chunk states in fp32; memory linear in L; any L."""
    _check(q, k, v, i, f, initial_state)
    if chunk_size < 1:
        raise MLSTMError(f"chunk_size must be >= 1, got {chunk_size}")
    dtype = q.dtype
    B, H, L, Dqk = q.shape
    Dv = v.shape[-1]
    with torch.autocast(q.device.type, enabled=False):
        q, k, v, i, f = _fp32(q, k, v, i, f)
        if initial_state is None:
            initial_state = zero_state(B, H, Dqk, Dv, q.device, q.dtype)
        C0, n0, m0 = (t.to(q.dtype) for t in initial_state)
        logf = F.logsigmoid(f)
        c = min(chunk_size, max(L, 1))
        N = max(1, -(-L // c))
        pad = N * c - L
        if pad:  # padded tail: no input (i -> -1e30, k = 0) and no decay (log f = 0): final state unchanged
            q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
            i = F.pad(i, (0, pad), value=_PAD_I)
            logf = F.pad(logf, (0, pad), value=0.0)
        q = q * (Dqk**-0.5)
        v1 = torch.cat([v, v.new_ones(B, H, N * c, 1)], -1)  # ones column: n rides along with C
        qc, kc, vc = (t.view(B, H, N, c, t.shape[-1]) for t in (q, k, v1))
        lf, ic = logf.view(B, H, N, c), i.view(B, H, N, c)

        C0n = torch.cat([C0, n0.unsqueeze(-1)], -1)
        # the chunk-end weights do not depend on the incoming stabilisers: states first, then outputs
        cum, x, keep, seg, a = _intra_gates(lf, ic)
        states, ms = _chunk_states(kc, vc, a, lf.sum(-1), C0n, m0)
        logW, b, M = _intra_weights(cum, x, keep, seg, ms[..., :-1])
        S = (qc @ kc.transpose(-2, -1)) * torch.exp(logW)
        out = S @ vc + (qc * torch.exp(b).unsqueeze(-1)) @ states[:, :, :-1]  # (B,H,N,c,Dv+1)
        den = torch.maximum(out[..., -1].abs(), torch.exp(-M)) + eps
        h = (out[..., :-1] / den.unsqueeze(-1)).reshape(B, H, N * c, Dv)[:, :, :L]
    h = h.to(dtype)
    if not return_last_state:
        return h
    last = states[:, :, -1]
    # Standalone tensors, not views into the packed chunk states: FSDP2 warns about a view
    # returned from a wrapped block (an in-place op on it would skip the block's hook).
    return h, (last[..., :-1].clone(), last[..., -1].clone(), ms[:, :, -1].clone())


# ---------------------------------------------------------------------------- backend selector

KERNELS = ("auto", "torch", "triton")


def _is_pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def _triton_chunkwise() -> Callable:
    """mlstm_kernels' Triton "xl_chunk" kernel (the one xLSTM 7B trains with at chunk 128), in our convention."""
    try:
        from mlstm_kernels.torch.chunkwise.triton_xl_chunk import mlstm_chunkwise__xl_chunk
    except ImportError as e:
        raise MLSTMError(
            f"kernel 'triton' unavailable: cannot import mlstm_kernels triton chunkwise ({e}); pip install byteify[gpu]"
        ) from None

    def mlstm_triton_chunkwise(
        q, k, v, i, f, chunk_size=64, eps=1e-6, initial_state=None, return_last_state=False
    ):
        _check(q, k, v, i, f, initial_state)
        if not _is_pow2(chunk_size) or chunk_size < 16:
            raise MLSTMError(f"kernel 'triton': chunk_size must be a power of 2 >= 16, got {chunk_size}")
        # Exact resets (log f < -1e3) would sit inside the kernel's fp32 within-chunk cumsum and
        # cost ~1e-2 of precision in every later decay; our kernel cuts chunks there instead.
        if bool((f < _RESET_LOGF).any()):
            return mlstm_chunkwise(q, k, v, i, f, chunk_size, eps, initial_state, return_last_state)
        dtype, L = q.dtype, q.shape[2]
        # fp32 in, whatever autocast says: the same "all forms compute in fp32" contract as ours
        q, k, v, i, f = (t.float() for t in (q, k, v, i, f))
        pad = -L % chunk_size
        if pad:  # the kernel needs L % chunk_size == 0; pad as in mlstm_chunkwise (no input, no decay)
            q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
            i = F.pad(i, (0, pad), value=_PAD_I)
            f = F.pad(f, (0, pad), value=1e4)  # logsigmoid(1e4) == 0: no decay
        C0 = n0 = m0 = None
        if initial_state is not None:
            C0, n0, m0 = (t.float() for t in initial_state)
            m0 = m0.unsqueeze(-1)  # the kernel keeps m as (B, H, 1)
        with torch.autocast("cuda", enabled=False):
            out = mlstm_chunkwise__xl_chunk(
                q,
                k,
                v,
                i,
                f,
                c_initial=C0,
                n_initial=n0,
                m_initial=m0,
                return_last_states=return_last_state,
                eps=eps,
                chunk_size=chunk_size,
                autocast_kernel_dtype=torch.float32,
            )
        if not return_last_state:
            return out[:, :, :L].to(dtype)
        h, (C, n, m) = out
        return h[:, :, :L].to(dtype), (C.float(), n.float(), m.float().reshape(C.shape[:2]).clone())

    return mlstm_triton_chunkwise


@functools.cache
def _resolve(kernel: str, device_type: str) -> Callable:
    if kernel == "torch":
        return mlstm_chunkwise
    if kernel == "triton":
        if device_type != "cuda":
            raise MLSTMError(f"kernel 'triton' needs a CUDA device, got {device_type}")
        return _triton_chunkwise()
    if device_type == "cuda":  # auto: Triton where it runs, ours elsewhere (or when mlstm_kernels is missing)
        try:
            return _triton_chunkwise()
        except MLSTMError:
            pass
    return mlstm_chunkwise


def check_kernel(kernel: str) -> str:
    """Validate a `LocalConfig.kernel` value (one-line MLSTMError when unknown)."""
    if kernel not in KERNELS:
        raise MLSTMError(f"unknown mLSTM kernel {kernel!r}; expected 'torch', 'triton' or 'auto'")
    return kernel


def get_mlstm_backend(kernel: str, device) -> Callable:
    """Chunkwise kernel for `LocalConfig.kernel`: "torch" (ours), "triton" (CUDA only), "auto".

    "auto" is Triton on CUDA when mlstm_kernels imports, else ours. Resolved once per
    (kernel, device type); the callable's __name__ says which it is.
    """
    return _resolve(check_kernel(kernel), torch.device(device).type)
