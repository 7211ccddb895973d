import pytest
import torch

from bolmo_core.byte_tokenizer import (
    BOS,
    EOP,
    FUSED_OFFSET,
    FUSED_VOCAB,
    OFFSET,
    PAD,
    VOCAB,
    ByteTokenizer,
    ByteTokenizerError,
    fold_logprobs,
    is_boundary,
    strip_flag,
)

SAMPLES = [
    b"",
    b"hello world",
    "Héllo wörld 👋 — 東京で日本語のテキスト".encode(),
    b"nul\x00inside\x00",
    b"\xff\xfe invalid \xc3\x28 utf8 \xed\xa0\x80 \xf0\x9f",
    bytes(range(256)),
]


@pytest.mark.parametrize("data", SAMPLES)
def test_round_trip_any_bytes(data):
    bt = ByteTokenizer()
    ids = bt.encode(data)
    assert ids[0] == BOS and len(ids) == len(data) + 1
    assert all(OFFSET <= i < VOCAB for i in ids[1:])
    assert bt.decode(ids) == data
    assert bt.decode(bt.encode(data, add_bos=False)) == data


def test_str_is_utf8_and_specials():
    bt = ByteTokenizer()
    assert bt.encode("é", add_bos=False) == [0xC3 + OFFSET, 0xA9 + OFFSET]
    assert bt.decode([BOS, 104 + OFFSET, EOP, PAD]) == b"h"
    assert bt.decode([BOS, 104 + OFFSET], skip_special=False) == b"<bos>h"
    with pytest.raises(ByteTokenizerError, match="outside"):
        bt.decode([FUSED_VOCAB])
    with pytest.raises(ByteTokenizerError, match="bytes or str"):
        bt.encode(123)


@pytest.mark.parametrize("data", SAMPLES)
def test_fused_decode_equals_unfused(data):
    bt = ByteTokenizer()
    ids = bt.encode(data)
    g = torch.Generator().manual_seed(len(data))
    flags = torch.rand(len(ids), generator=g) < 0.3
    fused = torch.tensor(ids) + FUSED_OFFSET * flags.long()
    assert bt.decode(fused) == bt.decode(ids) == data
    assert strip_flag(fused).tolist() == ids
    assert strip_flag(fused.tolist()) == ids
    assert is_boundary(fused).tolist() == flags.tolist()
    assert strip_flag(FUSED_OFFSET + 5) == 5 and is_boundary(FUSED_OFFSET + 5) and not is_boundary(5)


def test_fold_logprobs_sums_to_one():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, FUSED_VOCAB, generator=g, dtype=torch.float64) * 4
    logp = torch.log_softmax(logits, dim=-1)
    folded = fold_logprobs(logp)
    assert folded.shape == (3, 7, VOCAB)
    torch.testing.assert_close(folded.exp().sum(-1), torch.ones(3, 7, dtype=torch.float64))
    p = logp.exp()
    torch.testing.assert_close(folded[..., 104].exp(), p[..., 104] + p[..., 104 + FUSED_OFFSET])
    with pytest.raises(ByteTokenizerError, match="520"):
        fold_logprobs(torch.zeros(2, VOCAB))
