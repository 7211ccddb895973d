import functools
import random

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from bolmo_core.byte_tokenizer import BOS, EOP, FUSED_OFFSET, OFFSET, PAD, ByteTokenizer
from bolmo_core.source import SourceConfig, load_tokenizer, tiny_corpus
from bolmo_core.subword import (
    RetainedIndex,
    SubwordVocab,
    TokenizerError,
    check_byte_level_bpe,
    label_documents,
)


@functools.cache
def _load(name: str):
    tok = load_tokenizer(SourceConfig(name))
    vocab = SubwordVocab.from_tokenizer(tok)
    return tok, vocab, RetainedIndex(vocab)


@pytest.fixture(scope="module", params=["smollm2-135m", "tiny-olmo2"])
def source(request):
    return _load(request.param)


@pytest.fixture(scope="module")
def smol():
    return _load("smollm2-135m")


def brute_force(vocab: SubwordVocab, ids: list[int]) -> list[int]:
    """For each position, try every vocab byte string (longest first) against the bytes ending there."""
    entries: dict[bytes, int] = {}
    for i, b in enumerate(vocab.token_bytes):
        if b and i not in vocab.special_ids:
            entries.setdefault(b, i)
    longest = max(map(len, entries))
    plain = [i - FUSED_OFFSET if i >= FUSED_OFFSET else i for i in ids]
    out = []
    for t, x in enumerate(plain):
        if x == EOP:  # skipped: same as the last real id before it in the row
            prev = [y for y in plain[:t] if y != EOP]
            x, t = (prev[-1], max(j for j in range(t) if plain[j] != EOP)) if prev else (PAD, None)
            if t is None:
                out.append(vocab.pad_id)
                continue
        if x < OFFSET:
            out.append(vocab.doc_separator_id if x == BOS else vocab.pad_id)
            continue
        window = bytearray()
        for y in reversed(plain[: t + 1]):
            if y == EOP:
                continue
            if y < OFFSET or len(window) == longest:
                break
            window.insert(0, y - OFFSET)
        best = vocab.byte_fallback_id
        for k in range(len(window), 0, -1):
            if bytes(window[-k:]) in entries:
                best = entries[bytes(window[-k:])]
                break
        out.append(best)
    return out


def multilingual_samples(seed: int) -> list[bytes]:
    rng = random.Random(seed)
    pieces = [
        "The quick brown fox jumps over the lazy dog. ",
        "Le cœur a ses raisons que la raison ne connaît point. ",
        "¿Dónde está la biblioteca? Mañana será otro día. ",
        "東京は日本の首都です。中文也可以。",
        "한국어 텍스트 ",
        "😀🎉👋🏽 emoji ",
        "    indented code():\n\treturn x\n",
        "<|endoftext|>",
    ]
    docs = []
    for _ in range(6):
        parts = [rng.choice(pieces).encode() for _ in range(rng.randint(2, 6))]
        parts.insert(rng.randint(0, len(parts)), bytes(rng.randrange(256) for _ in range(rng.randint(1, 12))))
        docs.append(b"".join(parts))
    return docs


def test_retained_matches_brute_force(source):
    _, vocab, index = source
    bt = ByteTokenizer()
    for doc in multilingual_samples(0):
        ids = bt.encode(doc)
        assert index.expand(np.array(ids)).tolist() == brute_force(vocab, ids)


def test_retained_specials_fused_eop_and_rows(source):
    _, vocab, index = source
    bt = ByteTokenizer()
    rng = random.Random(1)
    rows = []
    for doc in multilingual_samples(2)[:4]:
        ids = (bt.encode(doc) + [BOS] + bt.encode("tail text", add_bos=False))[:120]
        ids = [i + FUSED_OFFSET if rng.random() < 0.3 else i for i in ids]
        for _ in range(6):
            ids.insert(rng.randrange(len(ids)), EOP)
        rows.append((ids + [PAD] * 130)[:130])
    rows[1][0] = EOP  # an EOP with nothing before it in its row
    batch = torch.tensor(rows)
    got = index.expand(batch)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.long and got.shape == batch.shape
    for r, row in enumerate(rows):  # rows never see each other
        assert got[r].tolist() == brute_force(vocab, row)
    torch.testing.assert_close(index.expand_last(batch, 5), got[:, -5:])
    torch.testing.assert_close(index.expand_last(batch, 130), got)


def test_retained_crosses_token_boundary(smol):
    tok, vocab, index = smol
    # SmolLM2 tokenizes "xthe" as "xt" + "he"; the longest suffix ending at the last byte is "the".
    assert [vocab.token_bytes[i] for i in tok("xthe", add_special_tokens=False).input_ids] == [b"xt", b"he"]
    got = index.expand(np.array(ByteTokenizer().encode("xthe")))
    the = tok.convert_tokens_to_ids("the")
    assert got.tolist() == [
        vocab.doc_separator_id,
        tok.convert_tokens_to_ids("x"),
        tok.convert_tokens_to_ids("xt"),
        tok.convert_tokens_to_ids("th"),
        the,
    ]


def test_vocab_tables(smol):
    tok, vocab, _ = smol
    assert vocab.vocab_size == len(tok) == 49152
    assert tok.convert_ids_to_tokens(vocab.doc_separator_id) == "<|endoftext|>"  # not the chat-turn eos
    assert vocab.pad_id == tok.pad_token_id
    assert vocab.token_bytes[tok.convert_tokens_to_ids("Ġworld")] == b" world"
    assert vocab.token_bytes[tok.convert_tokens_to_ids("<|im_end|>")] == b"<|im_end|>"
    for b, i in enumerate(vocab.single_byte_ids.tolist()):
        assert i == -1 or vocab.token_bytes[i] == bytes([b])
    assert (vocab.single_byte_ids >= 0).sum() >= 200
    strings = tok.convert_ids_to_tokens(list(range(len(tok))))
    expected = [s[:1] in ("Ġ", "Ċ", "ĉ") and i not in vocab.special_ids for i, s in enumerate(strings)]
    assert vocab.whitespace_start_mask.tolist() == expected
    assert vocab.fingerprint == SubwordVocab.from_tokenizer(tok).fingerprint
    tiny = _load("tiny-olmo2")[1]
    assert tiny.fingerprint != vocab.fingerprint and tiny.doc_separator_id == 0


def test_labels_hand_worked_multibyte(smol):
    tok, vocab, _ = smol
    doc = "Héllo wörld 👋".encode()
    ((ids, ends),) = label_documents(tok, [doc], vocab)
    assert ids.dtype == np.uint32 and ends.dtype == np.uint32
    assert ids.tolist() == tok(doc.decode(), add_special_tokens=False).input_ids
    # H | é | llo | " w" | ör | ld | " " + 2 bytes of 👋 | 1 byte | 1 byte (SmolLM2's byte-level BPE)
    assert ends.tolist() == [1, 3, 6, 8, 11, 13, 16, 17, 18]


def test_labels_equal_tokenizer_on_real_text(smol):
    tok, vocab, _ = smol
    texts = [t for t in tiny_corpus(60_000)][:40]
    texts = [t + " 👋🏽 ça va? ¡sí! 東京" if i % 3 == 0 else t for i, t in enumerate(texts)]
    docs = [t.encode() for t in texts]
    labels = label_documents(tok, docs, vocab)
    assert len(labels) == len(docs)
    multibyte_splits = 0
    for text, doc, (ids, ends) in zip(texts, docs, labels):
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        assert ids.tolist() == enc.input_ids
        assert ends[-1] == len(doc) and (np.diff(ends.astype(np.int64)) > 0).all()
        starts = np.concatenate([[0], ends[:-1]])
        for i, (s, e) in zip(enc.input_ids, zip(starts.tolist(), ends.tolist())):
            piece = doc[s:e]
            try:
                assert piece.decode() == tok.decode([i])  # whole characters: the tokenizer's own text
            except UnicodeDecodeError:
                multibyte_splits += 1  # a token splitting a character: its bytes still concatenate
        assert b"".join(doc[s:e] for s, e in zip(starts.tolist(), ends.tolist())) == doc
    assert multibyte_splits > 0  # the emoji and CJK really did split characters


def test_labels_invalid_utf8_policy(smol):
    tok, vocab, _ = smol
    doc = b"abc\x80\xffdef\x04g\xc3"
    ((ids, ends),) = label_documents(tok, [doc], vocab)
    single = vocab.single_byte_ids
    abc = tok("abc", add_special_tokens=False).input_ids
    de = tok("def", add_special_tokens=False).input_ids
    # \x80 has a single-byte token; \xff and \x04 have none in SmolLM2 (-> fallback); \xc3 does.
    assert single[0xFF] == -1 and single[0x04] == -1
    assert ids.tolist() == abc + [single[0x80], vocab.byte_fallback_id] + de + [vocab.byte_fallback_id] + tok(
        "g", add_special_tokens=False
    ).input_ids + [single[0xC3]]
    assert ends[-1] == len(doc)
    assert ends.tolist()[len(abc) : len(abc) + 2] == [4, 5]
    (empty,) = label_documents(tok, [b""], vocab)
    assert empty[0].size == 0 and empty[1].size == 0


def test_labels_tiny_olmo2_random_bytes():
    tok, vocab, _ = _load("tiny-olmo2")
    docs = multilingual_samples(3)
    for doc, (ids, ends) in zip(docs, label_documents(tok, docs, vocab)):
        assert ends[-1] == len(doc)
        assert b"".join(vocab.token_bytes[i] for i in ids.tolist()) == doc


def _wrap(model, pre, trainer, name):
    raw = Tokenizer(model)
    raw.pre_tokenizer = pre
    raw.train_from_iterator(tiny_corpus(20_000), trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]")
    tok.name_or_path = name
    return tok


@pytest.mark.parametrize("kind", ["wordpiece", "unigram"])
def test_refuses_non_byte_level_tokenizer(kind):
    if kind == "wordpiece":
        tok = _wrap(
            models.WordPiece(unk_token="[UNK]"),
            pre_tokenizers.Whitespace(),
            trainers.WordPieceTrainer(vocab_size=300, special_tokens=["[UNK]"], show_progress=False),
            "tiny-wordpiece",
        )
        what = "WordPiece"
    else:
        tok = _wrap(
            models.Unigram(),
            pre_tokenizers.Metaspace(),
            trainers.UnigramTrainer(
                vocab_size=300, special_tokens=["[UNK]"], unk_token="[UNK]", show_progress=False
            ),
            "tiny-unigram",
        )
        what = "Unigram"
    with pytest.raises(TokenizerError) as err:
        check_byte_level_bpe(tok)
    msg = str(err.value)
    assert "\n" not in msg and f"tiny-{kind}" in msg and what in msg and "byte-level BPE" in msg
    with pytest.raises(TokenizerError):
        SubwordVocab.from_tokenizer(tok)


def test_refuses_bpe_without_byte_level():
    tok = _wrap(
        models.BPE(unk_token="[UNK]"),
        pre_tokenizers.Metaspace(),
        trainers.BpeTrainer(vocab_size=300, special_tokens=["[UNK]"], show_progress=False),
        "tiny-meta",
    )
    with pytest.raises(TokenizerError, match="tiny-meta.*Metaspace, not ByteLevel"):
        check_byte_level_bpe(tok)


def test_retained_random_streams_match_brute_force(source):
    # Long real-text runs reach deep automaton states; random specials, EOPs and fused ids cut them.
    _, vocab, index = source
    rng = random.Random(4)
    text = "".join(tiny_corpus(6_000)).encode()
    rows = []
    for _ in range(3):
        start = rng.randrange(len(text) - 400)
        ids = [b + OFFSET for b in text[start : start + 400]]
        for _ in range(12):
            ids[rng.randrange(len(ids))] = rng.choice(
                [PAD, BOS, 2, EOP, EOP, rng.randrange(OFFSET, OFFSET + 256)]
            )
        rows.append([i + FUSED_OFFSET if rng.random() < 0.2 else i for i in ids])
    got = index.expand(np.array(rows))
    for r, row in enumerate(rows):
        assert got[r].tolist() == brute_force(vocab, row)
    assert index.expand_last(np.array(rows), 7).tolist() == got[:, -7:].tolist()


def test_retained_refuses_out_of_range_ids(smol):
    _, _, index = smol
    for bad in ([1, 2 * FUSED_OFFSET], [-1, OFFSET]):
        with pytest.raises(TokenizerError, match=r"byte ids must lie in 0\.\.519"):
            index.expand(np.array(bad))
    with pytest.raises(TokenizerError, match="1-D or 2-D"):
        index.expand(np.zeros((1, 2, 3), dtype=np.int64))


def test_labels_refuse_tokenizer_that_rewrites_text():
    raw = Tokenizer(models.BPE())
    raw.normalizer = normalizers.Lowercase()
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    raw.train_from_iterator(tiny_corpus(20_000), trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|endoftext|>")
    tok.name_or_path = "tiny-lowercase"
    vocab = SubwordVocab.from_tokenizer(tok)
    ((ids, ends),) = label_documents(tok, [b"already lower"], vocab)
    assert ends[-1] == len(b"already lower")
    with pytest.raises(TokenizerError, match="document 1: .*tiny-lowercase.*rewrites text") as err:
        label_documents(tok, [b"fine", b"Not Lower"], vocab)
    assert "\n" not in str(err.value)
