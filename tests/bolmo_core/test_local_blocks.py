"""Local blocks (docs/architecture.md §3.3): full-sequence vs incremental (step) mode, state continuation, reset, gates."""

import pytest
import torch

from bolmo_core.config import LocalConfig
from bolmo_core.local_blocks import LocalBlock, MLSTMLayer, SwiGLU

CFG = LocalConfig(n_heads=4, ffn_hidden=40, chunk_size=4, kernel="torch")


def _block(seed=0):
    torch.manual_seed(seed)
    blk = LocalBlock(32, CFG)
    with torch.no_grad():  # open the input gate so the state matters (init is -10)
        blk.mlstm.i_gate.bias.zero_()
    return blk


def test_shapes_and_gate_init():
    layer = MLSTMLayer(32, LocalConfig(n_heads=4))
    assert layer.q.weight.shape == (16, 32) and layer.v.weight.shape == (32, 32)
    assert layer.i_gate.weight.shape == (4, 32) and torch.all(layer.i_gate.bias == -10.0)
    assert layer.q.bias is None and layer.o_gate.bias is None and layer.f_gate.bias is not None
    capped = layer._cap(torch.tensor([1e4, -1e4, 0.0]))
    assert torch.allclose(capped, torch.tensor([15.0, -15.0, 0.0]))
    assert SwiGLU(32, 40)(torch.randn(2, 3, 32)).shape == (2, 3, 32)


def test_step_mode_equals_full_sequence():
    blk = _block()
    x = torch.randn(2, 11, 32)
    with torch.no_grad():
        full, last = blk(x)
        state, outs = None, []
        y0, state = blk(x[:, :3])  # prefill, then one byte at a time
        outs.append(y0)
        for t in range(3, 11):
            y, state = blk(x[:, t : t + 1], state)
            outs.append(y)
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-4, atol=1e-5)
    for a, b in zip(state, last, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_chunk_continuation_from_state():
    blk = _block(1)
    x = torch.randn(1, 13, 32)
    with torch.no_grad():
        full, _ = blk(x)
        a, st = blk(x[:, :6])
        b, _ = blk(x[:, 6:], st)
    torch.testing.assert_close(torch.cat([a, b], 1), full, rtol=1e-4, atol=1e-5)


def test_reset_drops_earlier_state():
    blk = _block(2)
    x = torch.randn(1, 10, 32)
    reset = torch.zeros(1, 10, dtype=torch.bool)
    reset[0, 4] = True
    with torch.no_grad():
        y, _ = blk(x, reset=reset)
        alone, _ = blk(x[:, 4:])
    torch.testing.assert_close(y[:, 4:], alone, rtol=1e-4, atol=1e-5)


def test_bad_width():
    with pytest.raises(ValueError, match="n_heads"):
        MLSTMLayer(30, LocalConfig(n_heads=4))
