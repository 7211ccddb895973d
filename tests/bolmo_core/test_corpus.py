"""Reading corpora as units: byte ranges cut at line ends, compressed files, text files streamed, I/O."""

import gzip
import io
import json
import random

import pytest
import zstandard

from bolmo_core import corpus as C


def lines_of(data: bytes, cuts: list[int]) -> list[bytes]:
    """Every line of `data`, reassembled from the ranges [cuts[k], cuts[k+1])."""
    out = []
    for a, b in zip(cuts[:-1], cuts[1:]):
        out += list(C.range_lines(io.BytesIO(data), a, b))
    return out


@pytest.mark.parametrize("trailing_newline", [True, False])
def test_byte_ranges_give_every_line_once(trailing_newline, monkeypatch):
    rng = random.Random(0)
    lines = [
        bytes(rng.choice(b"abc xyz\r\t") for _ in range(rng.choice([0, 1, 5, 40, 300]))) for _ in range(400)
    ]
    lines[-1] = b"last"  # (an empty last line would be no line at all)
    data = b"\n".join(lines) + (b"\n" if trailing_newline else b"")
    want = data.split(b"\n")[:-1] if trailing_newline else data.split(b"\n")
    monkeypatch.setattr(C, "READ_BLOCK", 64)  # many blocks per range
    monkeypatch.setattr(C, "TAIL_BLOCK", 8)
    for _ in range(20):
        cuts = sorted({0, len(data), *(rng.randrange(len(data)) for _ in range(rng.randrange(1, 12)))})
        assert lines_of(data, cuts) == want
    assert lines_of(data, [0, len(data)]) == want
    assert list(C.range_lines(io.BytesIO(data), 0, None)) == want


def test_a_range_inside_one_long_line_owns_nothing():
    data = b"short\n" + b"x" * 10_000 + b"\nend\n"
    assert lines_of(data, [0, 100, 200, 9_000, len(data)]) == [b"short", b"x" * 10_000, b"end"]
    assert list(C.range_lines(io.BytesIO(data), 100, 200)) == []


def test_bytes_read_are_the_range_plus_the_edge_line(tmp_path):
    line = json.dumps({"text": "y" * 1000}).encode() + b"\n"
    (tmp_path / "a.jsonl").write_bytes(line * 5000)  # 5 MB
    units = C.resolve_source(str(tmp_path / "a.jsonl"), unit_bytes=1 << 20)
    assert len(units) == 5 and [u["parts"][0]["start"] for u in units] == [k << 20 for k in range(5)]
    before = C.bytes_read()
    n = sum(1 for u in units for _ in C.iter_unit(u, 1 << 20))
    read = C.bytes_read() - before
    assert n == 5000
    assert len(line) * 5000 <= read <= len(line) * 5000 + 5 * (len(line) + 2 * C.TAIL_BLOCK)


def test_compressed_jsonl_and_text_are_streamed(tmp_path):
    docs = [{"text": f"doc {i} " + "z" * i} for i in range(50)]
    raw = "".join(json.dumps(d) + "\n" for d in docs).encode()
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(raw))
    (tmp_path / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    (tmp_path / "c.txt.gz").write_bytes(gzip.compress(b"plain text\n" * 10))
    got = list(C.iter_documents([str(tmp_path)]))
    want = [d["text"].encode() for d in docs]
    assert [d for i, d in got if "a.jsonl.gz#" in i] == want
    assert [d for i, d in got if "b.jsonl.zst#" in i] == want
    assert dict(got)[str(tmp_path / "c.txt.gz")] == b"plain text\n" * 10
    assert [u["kind"] for u in C.resolve_source(str(tmp_path))] == ["jsonl", "text"]


def test_a_long_text_file_comes_as_chunks(tmp_path):
    (tmp_path / "long.txt").write_bytes(b"w" * 3000 + b" end")
    [unit] = C.resolve_source(str(tmp_path / "long.txt"))
    [(doc_id, data)] = list(C.iter_unit(unit, max_doc_bytes=1000))
    assert doc_id == str(tmp_path / "long.txt") and not isinstance(data, bytes)
    assert b"".join(data) == b"w" * 3000 + b" end"
    [(_, short)] = list(C.iter_unit(unit, max_doc_bytes=10_000))
    assert short == b"w" * 3000 + b" end"


def test_small_files_share_units_and_fingerprints_follow_content(tmp_path):
    for k in range(10):
        (tmp_path / f"{k}.txt").write_text(f"file {k}")
    units = C.resolve_source(str(tmp_path), unit_bytes=30)
    assert [len(u["parts"]) for u in units] == [5, 5]  # 6 bytes each, up to 30 bytes a unit
    fp = units[0]["parts"][0]["fp"]
    (tmp_path / "0.txt").write_text("file 9")  # same size, new content and time
    assert C.resolve_source(str(tmp_path), unit_bytes=30)[0]["parts"][0]["fp"] != fp
