"""Byte ids (docs/architecture.md §1.1): 4 specials, then the 256 bytes at offset 4; the fused output adds 260.

| id | meaning |
|---|---|
| 0 | pad |
| 1 | bos, also used as eos ("divergence from BLT") |
| 2 | eos name only: never emitted |
| 3 | end-of-patch; in the fused decoder only an internal idle marker |
| 4..259 | bytes 0..255 |
| 260..519 | the same 260 ids with the "last byte of its patch" flag (fused output) |
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

PAD = 0
BOS = 1
EOS = 1  # bos = eos (docs/architecture.md §1.1)
EOS_STRING_ID = 2  # exists as a name, never emitted
EOP = 3
OFFSET = 4
VOCAB = 260
FUSED_OFFSET = 260
FUSED_VOCAB = 520
SPECIAL_NAMES = {PAD: "<pad>", BOS: "<bos>", EOS_STRING_ID: "<eos>", EOP: "<bpe_token_end>"}


class ByteTokenizerError(ValueError):
    """Input that is not byte ids / bytes, with a one-line reason."""


def strip_flag(ids):
    """Fused ids (>= 260) back to plain ids; works on an int, a list of ints or a tensor."""
    if isinstance(ids, torch.Tensor):
        return torch.where(ids >= FUSED_OFFSET, ids - FUSED_OFFSET, ids)
    if isinstance(ids, int):
        return ids - FUSED_OFFSET if ids >= FUSED_OFFSET else ids
    return [i - FUSED_OFFSET if i >= FUSED_OFFSET else i for i in ids]


def is_boundary(ids):
    """Whether a fused id carries the end-of-patch flag; int, list of ints or bool tensor."""
    if isinstance(ids, torch.Tensor):
        return ids >= FUSED_OFFSET
    if isinstance(ids, int):
        return ids >= FUSED_OFFSET
    return [i >= FUSED_OFFSET for i in ids]


def fold_logprobs(logp: torch.Tensor) -> torch.Tensor:
    """(..., 520) fused log-probs -> (..., 260) log-probs with p(v) = p(v) + p(v + 260) (docs/architecture.md §1.1)."""
    if logp.shape[-1] != FUSED_VOCAB:
        raise ByteTokenizerError(f"fold_logprobs: last dimension must be {FUSED_VOCAB}, got {logp.shape[-1]}")
    return torch.logaddexp(logp[..., :FUSED_OFFSET], logp[..., FUSED_OFFSET:])


class ByteTokenizer:
    """UTF-8 bytes <-> byte ids. Lossless for any byte string, valid UTF-8 or not."""

    pad_id = PAD
    bos_id = BOS
    eos_id = EOS
    eop_id = EOP
    offset = OFFSET
    vocab_size = VOCAB
    fused_vocab_size = FUSED_VOCAB

    def encode(self, data: bytes | str, add_bos: bool = True) -> list[int]:
        """Byte ids of `data` (a str is UTF-8 encoded), with BOS first unless add_bos=False."""
        if isinstance(data, str):
            data = data.encode("utf-8")
        elif not isinstance(data, bytes | bytearray | memoryview):
            raise ByteTokenizerError(
                f"ByteTokenizer.encode: expected bytes or str, got {type(data).__name__}"
            )
        ids = [b + OFFSET for b in bytes(data)]
        return [BOS, *ids] if add_bos else ids

    def decode(self, ids: Iterable[int] | torch.Tensor, skip_special: bool = True) -> bytes:
        """Bytes of `ids` (fused ids are unflagged first); specials dropped, or rendered as their names."""
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        out = bytearray()
        for i in ids:
            i = int(i)
            if i >= FUSED_OFFSET:
                i -= FUSED_OFFSET
            if not 0 <= i < VOCAB:
                raise ByteTokenizerError(f"ByteTokenizer.decode: id {i} is outside 0..{FUSED_VOCAB - 1}")
            if i >= OFFSET:
                out.append(i - OFFSET)
            elif not skip_special:
                out += SPECIAL_NAMES[i].encode()
        return bytes(out)

    def decode_str(self, ids: Iterable[int] | torch.Tensor, skip_special: bool = True) -> str:
        """decode(), then UTF-8 with invalid bytes replaced (for display only; bytes are the truth)."""
        return self.decode(ids, skip_special).decode("utf-8", errors="replace")
