"""mLSTM kernels: the forms agree with each other and with mlstm_kernels' native torch chunkwise kernel."""

import pytest
import torch
from mlstm_kernels.torch import get_mlstm_kernel, get_mlstm_step_kernel

from bolmo_core.mlstm import (
    RESET_F,
    MLSTMError,
    get_mlstm_backend,
    mlstm_chunkwise,
    mlstm_parallel,
    mlstm_recurrent,
    mlstm_step,
    reset_forget_gate,
)


def _inputs(B=2, H=3, L=37, Dqk=8, Dv=6, dtype=torch.float64, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, L, Dqk, generator=g, dtype=dtype)
    k = torch.randn(B, H, L, Dqk, generator=g, dtype=dtype)
    v = torch.randn(B, H, L, Dv, generator=g, dtype=dtype)
    # gates in the layer's range (soft cap 15); f biased towards remembering, as in xLSTM init
    i = 3 * torch.randn(B, H, L, generator=g, dtype=dtype)
    f = 2 * torch.randn(B, H, L, generator=g, dtype=dtype) + 3
    ts = (q, k, v, i, f)
    return tuple(t.requires_grad_(requires_grad) for t in ts)


def _close(a, b, tol):
    assert a.shape == b.shape
    err = (a - b).abs().max().item()
    assert err <= tol * (1 + b.abs().max().item()), f"max abs err {err}"


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("chunk", [1, 5, 16, 64])
def test_three_forms_agree(dtype, tol, chunk):
    q, k, v, i, f = _inputs(L=37, dtype=dtype)  # 37 is not a multiple of any chunk > 1
    hp = mlstm_parallel(q, k, v, i, f)
    hr, sr = mlstm_recurrent(q, k, v, i, f, return_last_state=True)
    hc, sc = mlstm_chunkwise(q, k, v, i, f, chunk_size=chunk, return_last_state=True)
    assert hc.dtype == dtype and hc.shape == (2, 3, 37, 6)
    _close(hp, hr, tol)
    _close(hc, hr, tol)
    for a, b in zip(sc, sr):
        _close(a, b, tol)


def test_fp32_internal_for_low_precision_inputs():
    ref = mlstm_chunkwise(*_inputs(dtype=torch.float32), chunk_size=8)
    lo = [t.to(torch.bfloat16) for t in _inputs(dtype=torch.float32)]
    out = mlstm_chunkwise(*lo, chunk_size=8)
    hr, (C, n, m) = mlstm_recurrent(*lo, return_last_state=True)
    assert out.dtype == torch.bfloat16 and C.dtype == n.dtype == m.dtype == torch.float32
    # computed in fp32 from the rounded inputs, only the output is rounded to bf16
    up = mlstm_chunkwise(*[t.float() for t in lo], chunk_size=8)
    assert torch.equal(out, up.to(torch.bfloat16))
    _close(hr.float(), up, 1e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = mlstm_chunkwise(*_inputs(dtype=torch.float32), chunk_size=8)
    assert auto.dtype == torch.float32
    _close(auto, ref, 1e-6)


@pytest.mark.parametrize("prefix", [1, 16, 23, 37])
def test_prefix_chunkwise_then_steps_equals_full(prefix):
    q, k, v, i, f = _inputs(L=40)
    full = mlstm_chunkwise(q, k, v, i, f, chunk_size=8)
    head = [x[:, :, :prefix] for x in (q, k, v, i, f)]
    h0, state = mlstm_chunkwise(*head, chunk_size=8, return_last_state=True)
    hs = [h0]
    for t in range(prefix, 40):
        h, state = mlstm_step(q[:, :, t], k[:, :, t], v[:, :, t], i[:, :, t], f[:, :, t], state)
        hs.append(h.unsqueeze(2))
    _close(torch.cat(hs, 2), full, 1e-10)
    # and a chunkwise continuation from the state also matches
    h1, state1 = mlstm_chunkwise(*head, chunk_size=8, return_last_state=True)
    h2 = mlstm_chunkwise(*(x[:, :, prefix:] for x in (q, k, v, i, f)), chunk_size=8, initial_state=state1)
    _close(torch.cat([h1, h2], 2), full, 1e-10)


def test_step_none_state_is_zero_state():
    q, k, v, i, f = _inputs(L=1)
    h, (C, n, m) = mlstm_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], i[:, :, 0], f[:, :, 0], None)
    _close(h, mlstm_parallel(q, k, v, i, f)[:, :, 0], 1e-12)
    assert C.shape == (2, 3, 8, 6) and n.shape == (2, 3, 8) and m.shape == (2, 3)


def _grads(fn, dtype):
    ins = [t.to(dtype).requires_grad_(True) for t in _inputs(L=29)]
    w = torch.randn(2, 3, 29, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (fn(*ins) * w.to(dtype)).sum().backward()
    return [t.grad.double() for t in ins]


@pytest.mark.parametrize("chunk", [4, 16])
def test_gradients_parallel_vs_chunkwise(chunk):
    chunkwise = lambda *a: mlstm_chunkwise(*a, chunk_size=chunk)
    exact = _grads(mlstm_parallel, torch.float64)
    for gc, gp in zip(_grads(chunkwise, torch.float64), exact):
        _close(gc, gp, 1e-9)
    # fp32: a few near-zero denominators make the problem ill-conditioned (fp32 parallel and
    # mlstm_kernels' chunkwise are ~5e-5 off the fp64 gradient here), so compare by norm
    for g32 in (_grads(chunkwise, torch.float32), _grads(mlstm_parallel, torch.float32)):
        for gc, gp in zip(g32, exact):
            assert torch.isfinite(gc).all()
            assert (gc - gp).norm() <= 1e-4 * gp.norm()


def test_gradients_with_initial_state_are_finite():
    q, k, v, i, f = _inputs(L=20, requires_grad=True)
    _, st = mlstm_chunkwise(q, k, v, i, f, chunk_size=8, return_last_state=True)
    st = tuple(t.detach().requires_grad_(True) for t in st)
    mlstm_chunkwise(q, k, v, i, f, chunk_size=8, initial_state=st).sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v, i, f, *st))


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-3)])
@pytest.mark.parametrize("chunk,L", [(16, 64), (64, 128)])
def test_matches_mlstm_kernels_native_chunkwise(chunk, L, dtype, tol):
    """Reference: mlstm_kernels 2.0.6 `chunkwise--native_autograd` (pure torch; needs L % chunk == 0).

    fp64 shows the math is the same; fp32 random inputs have near-zero denominators, where both
    kernels are ~1e-4 (relative norm) off the fp64 result, so fp32 is compared by norm.
    """
    ref_fn = get_mlstm_kernel("chunkwise--native_autograd")
    q, k, v, i, f = _inputs(L=L, dtype=dtype, seed=3)
    _, s0 = mlstm_chunkwise(q, k, v, i, f, chunk_size=chunk, return_last_state=True)  # a non-trivial state
    C0, n0, m0 = s0
    h_ref, (C, n, m) = ref_fn(
        q, k, v, i, f, c_initial=C0, n_initial=n0, m_initial=m0[..., None],
        chunk_size=chunk, return_last_states=True,
    )  # fmt: skip
    h, (C1, n1, m1) = mlstm_chunkwise(
        q, k, v, i, f, chunk_size=chunk, initial_state=s0, return_last_state=True
    )
    for ours, ref in ((h, h_ref), (C1, C), (n1, n), (m1, m.squeeze(-1))):
        assert (ours - ref).norm() <= tol * ref.norm()


def test_step_matches_mlstm_kernels_native_step():
    ref_step = get_mlstm_step_kernel("native")
    q, k, v, i, f = _inputs(L=3, dtype=torch.float32)
    state = None
    C, n, m = torch.zeros(2, 3, 8, 6), torch.zeros(2, 3, 8), torch.zeros(2, 3, 1)
    for t in range(3):
        h, state = mlstm_step(q[:, :, t], k[:, :, t], v[:, :, t], i[:, :, t], f[:, :, t], state)
        h_ref, (C, n, m) = ref_step(
            q[:, :, t], k[:, :, t], v[:, :, t], i[:, :, t, None], f[:, :, t, None], C, n, m
        )
        _close(h, h_ref, 1e-5)
    _close(state[0], C, 1e-5)
    _close(state[2], m.squeeze(-1), 1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("form", ["parallel", "chunkwise", "recurrent"])
def test_left_padding_reset_equals_row_alone(form, dtype):
    """Reset (f = -1e5) at a row's first real position drops the pad state exactly (docs/architecture.md §3.3)."""
    run = {
        "parallel": mlstm_parallel,
        "chunkwise": lambda *a: mlstm_chunkwise(*a, chunk_size=8),
        "recurrent": mlstm_recurrent,
    }[form]
    q, k, v, i, f = _inputs(B=1, L=30, dtype=dtype, seed=5)
    if dtype == torch.float32:  # q.k > 0 keeps denominators away from 0, so fp32 is well conditioned
        q, k = q.abs(), k.abs()
    pad = 11
    garbage = _inputs(B=1, L=pad, dtype=dtype, seed=6)
    padded = [torch.cat([g, x], 2) for g, x in zip(garbage, (q, k, v, i, f))]
    reset = torch.zeros(1, pad + 30, dtype=torch.bool)
    reset[:, pad] = True
    padded[4] = reset_forget_gate(padded[4], reset)
    alone_f = reset_forget_gate(f, reset[:, pad:])  # unpadded rows also start with the reset (start index 0)
    h_pad = run(*padded)[:, :, pad:]
    h_alone = run(q, k, v, i, alone_f)
    _close(h_pad, h_alone, 1e-10 if dtype == torch.float64 else 1e-5)
    # the reset at position 0 differs from the zero state only through the stabiliser (eps-level)
    _close(h_alone, run(q, k, v, i, f), 1e-3)
    assert padded[4][0, 0, pad].item() == RESET_F


def _largest_saved_numel(fn, L, **kw):
    sizes = []
    ins = _inputs(B=1, H=1, L=L, Dqk=16, Dv=16, dtype=torch.float32, requires_grad=True)

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*ins, **kw).sum()
    return max(sizes)


def test_chunkwise_memory_linear_parallel_quadratic():
    cw = [_largest_saved_numel(mlstm_chunkwise, L, chunk_size=32) for L in (512, 1024, 2048)]
    par = [_largest_saved_numel(mlstm_parallel, L) for L in (512, 1024)]
    assert cw[1] / cw[0] <= 2.1 and cw[2] / cw[1] <= 2.1, cw  # ~linear in L
    assert par[1] / par[0] >= 3.9, par  # quadratic: the L x L weights
    assert cw[2] < par[0]  # chunkwise at 4x the length still saves less than parallel


def test_backend_selector_cpu():
    assert get_mlstm_backend("auto", "cpu") is mlstm_chunkwise
    assert get_mlstm_backend("torch", torch.device("cpu")) is mlstm_chunkwise
    with pytest.raises(MLSTMError, match="needs a CUDA device"):
        get_mlstm_backend("triton", "cpu")
    with pytest.raises(MLSTMError, match="unknown mLSTM kernel"):
        get_mlstm_backend("cuda-fast", "cpu")


def test_bad_shapes_raise_one_line_errors():
    q, k, v, i, f = _inputs(L=5)
    with pytest.raises(MLSTMError, match="gate f"):
        mlstm_chunkwise(q, k, v, i, f[..., :4])
    with pytest.raises(MLSTMError, match="k must have"):
        mlstm_parallel(q, k[..., :4], v, i, f)
    with pytest.raises(MLSTMError, match="state C"):
        mlstm_step(
            q[:, :, 0],
            k[:, :, 0],
            v[:, :, 0],
            i[:, :, 0],
            f[:, :, 0],
            (torch.zeros(1), torch.zeros(2, 3, 8), torch.zeros(2, 3)),
        )
    with pytest.raises(MLSTMError, match="chunk_size"):
        mlstm_chunkwise(q, k, v, i, f, chunk_size=0)
