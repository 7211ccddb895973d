"""Data preparation: readers, labels, shards, manifest, idempotency, resume, bad input."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bolmo_core import data as D
from bolmo_core import storage
from bolmo_core.config import DataConfig
from bolmo_core.source import SourceConfig, load_tokenizer, tiny_corpus
from bolmo_core.subword import TokenizerError, get_vocab, label_documents

TINY = SourceConfig("tiny-olmo2")
CFG = DataConfig(shard_docs=40, validation_fraction=0.1, split_seed=0)
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(TINY)


@pytest.fixture(scope="module")
def texts():
    return tiny_corpus(60_000)


def write_jsonl(path: Path, texts, column="text"):
    path.write_text("".join(json.dumps({column: t}) + "\n" for t in texts))
    return str(path)


def all_rows(manifest_uri: str) -> dict[str, list[dict]]:
    m = D.read_manifest(manifest_uri)
    folder = manifest_uri.rsplit("/", 1)[0]
    out = {"train": [], "validation": []}
    for e in m["shards"]:
        data = storage.read_bytes(storage.join(folder, e["uri"]))
        assert storage.sha256_bytes(data) == e["sha256"]
        t = D.read_shard(storage.join(folder, e["uri"]))
        assert t.schema.equals(D.SHARD_SCHEMA)
        assert t.num_rows == e["rows"]
        out[e["split"]] += t.to_pylist()
    return out


def check_labels(rows, vocab):
    """Token bytes concatenate to the document; ends are the cumulative token lengths."""
    for r in rows:
        ids = r["token_ids"]
        assert b"".join(vocab.token_bytes[i] for i in ids) == r["text_bytes"]
        assert r["token_ends"] == np.cumsum([len(vocab.token_bytes[i]) for i in ids]).tolist()


def test_local_files_of_every_kind_roundtrip(tmp_path, tok, texts):
    jl = write_jsonl(tmp_path / "a.jsonl", texts[:50])
    pq.write_table(pa.table({"body": texts[50:90]}), tmp_path / "b.parquet")
    (tmp_path / "c.txt").write_text(texts[90])
    out = tmp_path / "out"
    uri = D.prepare_dataset(
        [jl, str(tmp_path / "b.parquet?column=body"), str(tmp_path / "*.txt")], TINY, str(out), CFG
    )
    assert uri == str(out / "manifest.json")
    m = D.read_manifest(uri)
    rows = all_rows(uri)
    got = {r["doc_id"]: r["text_bytes"] for s in rows.values() for r in s}
    want = {f"{jl}#{i + 1}": t.encode() for i, t in enumerate(texts[:50])}
    want |= {f"{tmp_path / 'b.parquet'}#{i}": t.encode() for i, t in enumerate(texts[50:90])}
    want[str(tmp_path / "c.txt")] = texts[90].encode()
    assert got == want
    for split, rs in rows.items():
        assert {D.split_of(r["doc_id"], 0.1, 0) for r in rs} <= {split}
    assert len(rows["validation"]) > 0 and len(rows["train"]) > 0
    check_labels(rows["train"] + rows["validation"], get_vocab(tok))
    assert m["splits"]["train"]["rows"] == len(rows["train"])
    assert m["splits"]["train"]["tokens"] == sum(len(r["token_ids"]) for r in rows["train"])
    assert m["tokenizer"]["fingerprint"] == get_vocab(tok).fingerprint
    assert m["code_version"]["byteify"] and "git_commit" in m["code_version"]
    assert m["manifest_hash"] == D.manifest_hash(m)


def test_s3_write_and_read(s3_server, tmp_path, tok, texts):
    src = f"s3://byteify-test/in-{tmp_path.name}/docs.jsonl"
    storage.write_bytes_atomic(src, "".join(json.dumps({"text": t}) + "\n" for t in texts[:30]).encode())
    out = f"s3://byteify-test/out-{tmp_path.name}"
    uri = D.prepare_dataset([src], TINY, out, CFG, world_size=2)
    assert uri == out + "/manifest.json"
    m = D.read_manifest(uri)
    assert len([e for e in m["shards"] if e["split"] == "train"]) % 2 == 0
    rows = all_rows(uri)
    assert sorted(r["text_bytes"] for s in rows.values() for r in s) == sorted(t.encode() for t in texts[:30])
    check_labels(rows["train"], get_vocab(tok))
    # The same inputs read from local disk label identically (only doc ids differ).
    local = write_jsonl(tmp_path / "docs.jsonl", texts[:30])
    rows_local = all_rows(D.prepare_dataset([local], TINY, str(tmp_path / "o"), CFG, world_size=2))
    key = lambda r: r["text_bytes"]
    a = sorted((r["text_bytes"], r["token_ids"]) for s in rows.values() for r in s)
    b = sorted((r["text_bytes"], r["token_ids"]) for s in rows_local.values() for r in s)
    assert a == b and key


def test_identical_output_with_one_or_more_workers(tmp_path, texts):
    src = write_jsonl(tmp_path / "docs.jsonl", texts[:120])
    uris = [
        D.prepare_dataset([src], TINY, str(tmp_path / f"w{w}{ex}"), CFG, workers=w, executor=ex)
        for w, ex in ((1, "thread"), (2, "thread"), (2, "process"))
    ]
    blobs = [Path(u).read_bytes() for u in uris]
    assert blobs[0] == blobs[1] == blobs[2]
    m = D.read_manifest(uris[0])
    assert len(m["shards"]) == 2 * 3
    for e in m["shards"]:
        assert len({(Path(u).parent / e["uri"]).read_bytes() for u in uris}) == 1


def test_rerun_does_nothing(tmp_path, texts):
    src = write_jsonl(tmp_path / "docs.jsonl", texts[:60])
    out = tmp_path / "out"
    uri = D.prepare_dataset([src], TINY, str(out), CFG)
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert D.prepare_dataset([src], TINY, str(out), CFG) == uri
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == stamps


def test_killed_run_restarts_to_the_same_manifest(tmp_path, texts):
    src = write_jsonl(tmp_path / "docs.jsonl", tiny_corpus(400_000)[:600])
    cfg = DataConfig(shard_docs=20, validation_fraction=0.1)
    out = tmp_path / "killed"
    code = (
        "import sys; from bolmo_core import data as D; from bolmo_core.config import DataConfig; "
        "from bolmo_core.source import SourceConfig; "
        f"D.prepare_dataset([{src!r}], SourceConfig('tiny-olmo2'), {str(out)!r}, DataConfig(shard_docs=20, "
        "validation_fraction=0.1))"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT)
    deadline = time.time() + 60
    while len(list(out.rglob("done-*.json"))) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = list(out.rglob("done-*.json"))
    assert 3 <= len(done) < 30, "the run should have been killed mid-way"
    assert not (out / "manifest.json").exists()
    for p in out.rglob("*.parquet"):  # whatever is there under a shard name is complete
        assert pq.read_table(p).schema.equals(D.SHARD_SCHEMA)
    restarted = D.prepare_dataset([src], TINY, str(out), cfg)
    clean = D.prepare_dataset([src], TINY, str(tmp_path / "clean"), cfg)
    assert Path(restarted).read_bytes() == Path(clean).read_bytes()
    all_rows(restarted)


def test_hf_dataset_through_local_loader(tmp_path, texts):
    src = write_jsonl(tmp_path / "docs.jsonl", texts[:20], column="content")
    uri = D.prepare_dataset(
        [f"hf:json?data_files={src}&split=train&column=content"], TINY, str(tmp_path / "o"), CFG
    )
    rows = all_rows(uri)
    assert sorted(r["text_bytes"] for s in rows.values() for r in s) == sorted(t.encode() for t in texts[:20])
    with pytest.raises(D.DataError, match=r"no column 'text' \(columns: content\)"):
        D.resolve_source(f"hf:json?data_files={src}&split=train")


def test_builtin_corpus_resolves():
    units = D.resolve_source("builtin:wiki+code")
    assert [u.kind for u in units] == ["wiki", "wiki", "wiki", "code"]
    assert units[0].n_docs > 10_000 and units[3].n_docs > 100
    docs = D.read_unit(units[3], 0, 2)
    assert docs[0][0].startswith("code/") and docs[0][0].endswith(".py")
    with pytest.raises(D.DataError, match="builtin:nope: unknown built-in corpus"):
        D.resolve_source("builtin:nope")


def test_split_is_seeded_and_stable_when_the_corpus_grows():
    ids = [f"doc-{i}" for i in range(20_000)]
    a = [D.split_of(i, 0.05, 0) for i in ids]
    assert a[:1000] == [D.split_of(i, 0.05, 0) for i in ids[:1000]]
    assert abs(a.count("validation") / len(a) - 0.05) < 0.01
    assert a != [D.split_of(i, 0.05, 1) for i in ids]


# ---------------------------------------------------------------- bad input


def test_invalid_utf8_empty_and_nul_documents(tmp_path, tok):
    (tmp_path / "bad.txt").write_bytes(b"caf\xc3 au lait \xff\xfe end")
    (tmp_path / "nul.txt").write_bytes(b"a\x00b\x00\x00 c")
    (tmp_path / "empty.txt").write_bytes(b"")
    jl = tmp_path / "e.jsonl"
    jl.write_text('{"text": ""}\n\n{"text": "hello"}\n{"text": null}\n')
    uri = D.prepare_dataset(
        [str(tmp_path / "*.txt"), str(jl)], TINY, str(tmp_path / "o"), DataConfig(validation_fraction=0.0)
    )
    m = D.read_manifest(uri)
    assert m["counts"] == {"invalid_utf8_docs": 1, "skipped_empty_docs": 3, "split_long_docs": 0}
    rows = {r["doc_id"]: r for r in all_rows(uri)["train"]}
    assert rows[str(tmp_path / "bad.txt")]["text_bytes"] == b"caf\xc3 au lait \xff\xfe end"
    assert rows[str(tmp_path / "nul.txt")]["text_bytes"] == b"a\x00b\x00\x00 c"
    assert f"{jl}#3" in rows and len(rows) == 3
    vocab = get_vocab(tok)
    check_labels(rows.values(), vocab)
    # Policy: each invalid byte is its own single-byte token.
    bad = rows[str(tmp_path / "bad.txt")]["token_ids"]
    assert int(vocab.single_byte_ids[0xFF]) in bad and int(vocab.single_byte_ids[0xC3]) in bad


def test_50mb_document_is_split_at_token_boundaries(tok):
    unit = "\n".join(tiny_corpus(200_000)).encode() + " naïve 👋 façade\n".encode() * 50
    doc = (unit * (50_000_000 // len(unit) + 1))[:50_000_000]
    pieces = D.split_long_document(tok, doc, D.MAX_DOC_BYTES)
    assert b"".join(pieces) == doc
    assert len(pieces) >= 48 and max(map(len, pieces)) <= D.MAX_DOC_BYTES
    cut = 0
    for p in pieces[:-1]:
        cut += len(p)
        lo = cut - 3000
        _, ends = label_documents(tok, [doc[lo : cut + 3000]])[0]
        assert (cut - lo) in set(ends.tolist()), f"cut at {cut} is inside a token"
        assert doc[cut] & 0xC0 != 0x80  # never inside a UTF-8 character


def test_long_document_is_counted_and_labeled(tmp_path, tok):
    doc = ("word " * 300_000).encode()  # 1.5 MB
    rows, counts = D.label_batch(tok, [("big", doc)], max_doc_bytes=D.MAX_DOC_BYTES)
    assert counts["split_long_docs"] == 1
    assert [r[0] for r in rows] == ["big#part0", "big#part1"]
    assert b"".join(r[1] for r in rows) == doc
    check_labels(
        [{"text_bytes": r[1], "token_ids": r[2].tolist(), "token_ends": r[3].tolist()} for r in rows],
        get_vocab(tok),
    )


@pytest.mark.slow
def test_50mb_document_through_prepare(tmp_path):
    unit = "\n".join(tiny_corpus(200_000)).encode()
    (tmp_path / "huge.txt").write_bytes((unit * (50_000_000 // len(unit) + 1))[:50_000_000])
    m = D.read_manifest(
        D.prepare_dataset(
            [str(tmp_path / "huge.txt")], TINY, str(tmp_path / "o"), DataConfig(validation_fraction=0.0)
        )
    )
    assert m["counts"]["split_long_docs"] == 1 and m["splits"]["train"]["bytes"] == 50_000_000


def test_missing_column_and_wrong_schema(tmp_path):
    jl = write_jsonl(tmp_path / "a.jsonl", ["x", "y"], column="body")
    with pytest.raises(D.DataError, match=rf"^{jl}: line 1: no 'text' field \(found: body\)$"):
        D.read_unit(D.resolve_source(jl)[0], 0, 2)
    (tmp_path / "b.jsonl").write_text('{"text": 3}\n')
    with pytest.raises(D.DataError, match=r"b.jsonl: line 1: 'text' is int, expected a string"):
        D.read_unit(D.resolve_source(str(tmp_path / "b.jsonl"))[0], 0, 1)
    (tmp_path / "c.jsonl").write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(D.DataError, match=r"c.jsonl: line 2: not valid JSON"):
        D.read_unit(D.resolve_source(str(tmp_path / "c.jsonl"))[0], 0, 2)
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "d.parquet")
    with pytest.raises(D.DataError, match=r"d.parquet: no column 'text' \(columns: body\)$"):
        D.resolve_source(str(tmp_path / "d.parquet"))
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "e.parquet")
    with pytest.raises(
        D.DataError, match=r"e.parquet: column 'text' has type int64, expected string or binary"
    ):
        D.resolve_source(str(tmp_path / "e.parquet"))
    (tmp_path / "f.parquet").write_bytes(b"not parquet")
    with pytest.raises(D.DataError, match=r"f.parquet: not a Parquet file"):
        D.resolve_source(str(tmp_path / "f.parquet"))


def test_missing_paths_and_buckets(tmp_path, s3_server):
    with pytest.raises(D.DataError, match=rf"^{tmp_path}/nope.jsonl: does not exist$"):
        D.resolve_source(str(tmp_path / "nope.jsonl"))
    with pytest.raises(D.DataError, match=r"/\*.parquet: no files match$"):
        D.resolve_source(str(tmp_path / "*.parquet"))
    with pytest.raises(D.DataError, match=r"^s3://no-such-bucket-x/a.jsonl: does not exist$"):
        D.resolve_source("s3://no-such-bucket-x/a.jsonl")
    with pytest.raises(D.DataError, match=r"^s3://byteify-test/missing/\*.jsonl: no files match$"):
        D.resolve_source("s3://byteify-test/missing/*.jsonl")


@pytest.fixture
def fresh_s3(monkeypatch):
    """Helper: forget cached s3fs clients so changed AWS_* variables take effect."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    yield monkeypatch
    s3fs.S3FileSystem.clear_instance_cache()


def test_wrong_credentials(fresh_s3):
    from conftest import start_moto

    proc, url = start_moto({"INITIAL_NO_AUTH_ACTION_COUNT": "0"})  # a server that checks credentials
    try:
        fresh_s3.setenv("AWS_ENDPOINT_URL", url)
        fresh_s3.setenv("AWS_ACCESS_KEY_ID", "wrong")
        fresh_s3.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
        with pytest.raises(
            D.DataError, match=r"^s3://data/a.jsonl: access denied \(.*\); check the AWS credentials$"
        ):
            D.resolve_source("s3://data/a.jsonl")
    finally:
        proc.terminate()
        proc.wait(10)


def test_unreachable_endpoint(fresh_s3):
    from conftest import free_port

    fresh_s3.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    t = time.time()
    with pytest.raises(D.DataError, match=r"^s3://data/a.jsonl: storage endpoint unreachable after retries"):
        D.resolve_source("s3://data/a.jsonl")
    assert time.time() - t < 30


def _save_non_bpe_tokenizer(path: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1}, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=t, unk_token="[UNK]", eos_token="[UNK]").save_pretrained(path)
    (path / "config.json").write_text('{"model_type": "gpt2"}')
    return path


def test_tokenizer_that_is_not_byte_level_bpe_is_refused(tmp_path, texts):
    src = write_jsonl(tmp_path / "docs.jsonl", texts[:5])
    folder = _save_non_bpe_tokenizer(tmp_path / "wordlevel")
    with pytest.raises(
        TokenizerError, match=r"is not usable: its model is WordLevel, not BPE; .*byte-level BPE"
    ):
        D.prepare_dataset([src], SourceConfig(str(folder)), str(tmp_path / "o"), CFG)
    assert not (tmp_path / "o").exists()


def test_existing_manifest_survives_failed_and_foreign_runs(tmp_path, texts):
    src = write_jsonl(tmp_path / "docs.jsonl", texts[:30])
    out = str(tmp_path / "o")
    uri = D.prepare_dataset([src], TINY, out, CFG)
    before = Path(uri).read_bytes()
    (tmp_path / "bad.jsonl").write_text('{"body": "x"}\n')
    # Any other job aimed at a folder holding a manifest is refused before it writes anything.
    with pytest.raises(D.DataError, match=r"manifest.json: already holds data prepared from other inputs"):
        D.prepare_dataset([src, str(tmp_path / "bad.jsonl")], TINY, out, CFG)
    assert Path(uri).read_bytes() == before
    all_rows(uri)
    # A job that fails mid-way leaves no manifest and no partial shard.
    fresh = tmp_path / "fresh"
    with pytest.raises(D.DataError, match=r"bad.jsonl: line 1: no 'text' field \(found: body\)"):
        D.prepare_dataset([src, str(tmp_path / "bad.jsonl")], TINY, str(fresh), DataConfig(shard_docs=10))
    assert not (fresh / "manifest.json").exists()
    for p in fresh.rglob("*.parquet"):
        assert pq.read_table(p).schema.equals(D.SHARD_SCHEMA)
    assert not [p for p in Path(out).rglob(".*tmp*")] + [p for p in fresh.rglob(".*tmp*")]


def test_damaged_manifest_is_refused(tmp_path, texts):
    uri = D.prepare_dataset([write_jsonl(tmp_path / "d.jsonl", texts[:10])], TINY, str(tmp_path / "o"), CFG)
    m = json.loads(Path(uri).read_text())
    m["splits"]["train"]["rows"] += 1
    Path(uri).write_text(json.dumps(m))
    with pytest.raises(D.DataError, match=r"manifest.json: manifest_hash does not match its content"):
        D.read_manifest(uri)
    assert os.path.exists(uri)
