"""Data preparation: labels, shards, units, token budget, manifest, idempotency, resume, bad input."""

import io
import json
import os
import re
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


def test_s3_jsonl_by_ranges_and_parquet_by_row_groups(s3_server, tmp_path, tok, texts):
    """From a moto S3 server: a JSONL file cut into byte ranges, a Parquet file read by row groups."""
    from bolmo_core import corpus

    docs = [f"{k}: {t}" for k in range(6) for t in texts[:100]]  # ~0.75 MB of each kind
    jl = "".join(json.dumps({"text": t}) + "\n" for t in docs).encode()
    storage.write_bytes_atomic(f"s3://byteify-test/in-{tmp_path.name}/docs.jsonl", jl)
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": docs}), buf, row_group_size=len(docs) // 5, compression="none")
    storage.write_bytes_atomic(f"s3://byteify-test/in-{tmp_path.name}/rows.parquet", buf.getvalue())
    src = f"s3://byteify-test/in-{tmp_path.name}/"
    units = D.resolve_source(src, unit_bytes=len(jl) // 4)
    kinds = [u["kind"] for u in units]
    assert kinds.count("jsonl") >= 4 and kinds.count("parquet") >= 2  # byte ranges; row-group runs
    runs = [p["row_groups"] for u in units if u["kind"] == "parquet" for p in u["parts"]]
    assert sum(runs, []) == [0, 1, 2, 3, 4]
    out = f"s3://byteify-test/out-{tmp_path.name}"
    before = corpus.bytes_read()
    uri = D.prepare_dataset([src], TINY, out, CFG, unit_bytes=len(jl) // 4)
    read = corpus.bytes_read() - before
    print(
        f"bytes read {read}, input {len(jl)} + {len(buf.getvalue())}, {kinds.count('parquet')} Parquet units"
    )
    assert uri == out + "/manifest.json"
    rows = all_rows(uri)
    got = [r for s in rows.values() for r in s]
    assert sorted(r["text_bytes"] for r in got) == sorted(t.encode() for t in docs + docs)
    ids = {r["doc_id"] for r in got}
    assert f"{src}docs.jsonl#1" in ids and f"{src}rows.parquet#{len(docs) - 1}" in ids
    assert any(re.fullmatch(rf"{src}docs.jsonl#\d+\+\d+", i) for i in ids)  # a range inside the file
    check_labels(got, get_vocab(tok))
    # Every input byte read about once: the ranges (+ the lines cut by range edges), the row groups,
    # and the Parquet footer once at planning and once per Parquet unit.
    assert read < 1.1 * (len(jl) + len(buf.getvalue())), (read, len(jl), len(buf.getvalue()))
    # The same inputs read from local disk label identically (only doc ids differ).
    local = tmp_path / "local"
    local.mkdir()
    (local / "docs.jsonl").write_bytes(jl)
    (local / "rows.parquet").write_bytes(buf.getvalue())
    rows_local = all_rows(D.prepare_dataset([str(local)], TINY, str(tmp_path / "o"), CFG))
    a = sorted((r["text_bytes"], r["token_ids"]) for r in got)
    b = sorted((r["text_bytes"], r["token_ids"]) for s in rows_local.values() for r in s)
    assert a == b


def test_identical_output_with_one_or_more_workers(tmp_path, texts):
    src = write_jsonl(tmp_path / "docs.jsonl", texts[:120])
    size = (tmp_path / "docs.jsonl").stat().st_size
    uris = [
        D.prepare_dataset(
            [src], TINY, str(tmp_path / f"w{w}{ex}"), CFG, workers=w, executor=ex, unit_bytes=size // 3
        )
        for w, ex in ((1, "thread"), (2, "thread"), (2, "process"))
    ]
    blobs = [Path(u).read_bytes() for u in uris]
    assert blobs[0] == blobs[1] == blobs[2]
    m = D.read_manifest(uris[0])
    assert m["inputs"]["units_planned"] == len(m["inputs"]["units"]) >= 3
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
    unit = (tmp_path / "docs.jsonl").stat().st_size // 30
    cfg = DataConfig(shard_docs=20, validation_fraction=0.1)
    out = tmp_path / "killed"
    code = (
        "import sys; from bolmo_core import data as D; from bolmo_core.config import DataConfig; "
        "from bolmo_core.source import SourceConfig; "
        f"D.prepare_dataset([{src!r}], SourceConfig('tiny-olmo2'), {str(out)!r}, DataConfig(shard_docs=20, "
        f"validation_fraction=0.1), unit_bytes={unit})"
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
    restarted = D.prepare_dataset([src], TINY, str(out), cfg, unit_bytes=unit)
    clean = D.prepare_dataset([src], TINY, str(tmp_path / "clean"), cfg, unit_bytes=unit)
    assert Path(restarted).read_bytes() == Path(clean).read_bytes()
    all_rows(restarted)


def test_hf_streaming_from_a_local_folder_and_json_builder(tmp_path, texts):
    folder = tmp_path / "ds"
    folder.mkdir()
    for k in range(3):
        write_jsonl(folder / f"part-{k}.jsonl", texts[10 * k : 10 * k + 10], column="content")
    units = D.resolve_source(f"hf:{folder}?column=content")
    assert [u["parts"][0]["shard"] for u in units] == [0, 1, 2]  # the dataset's files are the units
    uri = D.prepare_dataset([f"hf:{folder}?column=content"], TINY, str(tmp_path / "o"), CFG, workers=2)
    rows = all_rows(uri)
    got = {r["doc_id"]: r["text_bytes"] for s in rows.values() for r in s}
    assert got[f"hf:{folder}?column=content#2:9"] == texts[29].encode()
    assert sorted(got.values()) == sorted(t.encode() for t in texts[:30])
    src = str(folder / "part-1.jsonl")
    uri = D.prepare_dataset(
        [f"hf:json?data_files={src}&split=train&column=content"], TINY, str(tmp_path / "o2"), CFG
    )
    assert sorted(r["text_bytes"] for s in all_rows(uri).values() for r in s) == sorted(
        t.encode() for t in texts[10:20]
    )
    with pytest.raises(D.DataError, match=r"no column 'text' \(columns: content\)"):
        D.resolve_source(f"hf:json?data_files={src}&split=train")
    with pytest.raises(D.DataError, match=r"no split 'test' \(splits: train\)"):
        D.resolve_source(f"hf:json?data_files={src}&split=test&column=content")


@pytest.mark.parametrize(
    "spec, why",
    [
        ("hf:", "no dataset path"),
        ("hf:?split=train", "no dataset path"),
        ("hf:json?data_file=x.jsonl", "unknown option 'data_file'"),
    ],
)
def test_malformed_hf_spec_is_one_line(spec, why):
    with pytest.raises(
        D.DataError, match=rf"^{re.escape(spec)}: malformed hf: source \({why}\); expected hf:PATH"
    ):
        D.resolve_source(spec)


def test_unknown_hf_dataset_is_one_line():
    with pytest.raises(D.DataError) as e:
        D.resolve_source("hf:nobody-x/no-such-dataset")
    assert str(e.value).startswith("hf:nobody-x/no-such-dataset: cannot load dataset (")
    assert "\n" not in str(e.value)


def test_builtin_corpus_resolves():
    from bolmo_core.corpus import iter_unit

    units = D.resolve_source("builtin:wiki+code")
    assert [u["kind"] for u in units] == ["wiki", "wiki", "wiki", "code"]
    assert units[0]["parts"][0]["stop"] > 10_000 and units[3]["parts"][0]["stop"] > 100
    doc_id, _ = next(iter_unit(units[3], D.MAX_DOC_BYTES))
    assert doc_id.startswith("code/") and doc_id.endswith(".py")
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
        list(D.iter_documents([jl]))
    (tmp_path / "b.jsonl").write_text('{"text": 3}\n')
    with pytest.raises(D.DataError, match=r"b.jsonl: line 1: 'text' is int, expected a string"):
        list(D.iter_documents([str(tmp_path / "b.jsonl")]))
    (tmp_path / "c.jsonl").write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(D.DataError, match=r"c.jsonl: line 2: not valid JSON"):
        list(D.iter_documents([str(tmp_path / "c.jsonl")]))
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
    with pytest.raises(D.DataError, match=r"manifest.json: already holds data prepared from other sources"):
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


# ---------------------------------------------------------------- streaming, budget, fingerprints


def test_split_stream_matches_whole_document_cuts(tok):
    unit = "\n".join(tiny_corpus(200_000)).encode() + " naïve 👋 façade\n".encode() * 50
    doc = (unit * (3_000_000 // len(unit) + 1))[:3_000_000]
    whole = D.split_long_document(tok, doc, 256 << 10)
    chunked = list(D.split_stream(tok, (doc[i : i + 77_777] for i in range(0, len(doc), 77_777)), 256 << 10))
    assert chunked == whole and b"".join(whole) == doc and len(whole) >= 12


def test_token_budget_from_the_preset():
    from bolmo_core.config import get_preset

    p = get_preset("olmo2-1b")
    b = D.TokenBudget.for_preset(p)
    assert b.train_tokens == 75_000 * 32 * 4096 + 150_000 * 64 * 4096  # 9.8 B + 39.3 B
    assert b.validation_tokens == 8 * 4 * 4097 and b.validation_bytes == 0
    assert D.TokenBudget.for_preset(p, max_tokens=1000, validation_bytes=5).train_tokens == 1000
    with pytest.raises(D.DataError, match=r"token budget: train_tokens=-1 must be a whole number >= 0"):
        D.TokenBudget(-1)


def test_token_budget_stops_within_one_shard(tmp_path):
    texts = tiny_corpus(400_000)
    src = write_jsonl(tmp_path / "docs.jsonl", texts)
    size = (tmp_path / "docs.jsonl").stat().st_size
    cfg = DataConfig(shard_docs=40, validation_fraction=0.1)
    budget = D.TokenBudget(train_tokens=30_000, validation_tokens=1_000, validation_bytes=2_000)
    uris = [
        D.prepare_dataset(
            [src], TINY, str(tmp_path / f"w{w}"), cfg, workers=w, budget=budget, unit_bytes=size // 8
        )
        for w in (1, 3)
    ]
    assert Path(uris[0]).read_bytes() == Path(uris[1]).read_bytes()  # deterministic stop, any workers
    m = D.read_manifest(uris[0])
    train = m["splits"]["train"]["tokens"]
    biggest = max(e["tokens"] for e in m["shards"] if e["split"] == "train")
    assert budget.train_tokens <= train < budget.train_tokens + biggest  # within one shard
    assert m["splits"]["validation"]["tokens"] >= 1_000 and m["splits"]["validation"]["bytes"] >= 2_000
    assert m["budget"] == {"train_tokens": 30_000, "validation_tokens": 1_000, "validation_bytes": 2_000}
    assert m["budget_met"] is True
    [used] = m["used"]
    assert used["source"] == src and used["train_tokens"] == train and not used["all_read"]
    assert used["units_used"] < used["units_planned"] == m["inputs"]["units_planned"]
    # The same job without a budget reads everything, in the same order: the budgeted data is its prefix.
    full = D.read_manifest(D.prepare_dataset([src], TINY, str(tmp_path / "all"), cfg, unit_bytes=size // 8))
    assert full["used"][0]["all_read"] and full["budget"] is None
    n = len(m["shards"])
    assert [e["sha256"] for e in full["shards"][:n]] == [e["sha256"] for e in m["shards"]]


def test_edited_input_reprepares_and_keeps_the_old_manifest(tmp_path, texts):
    src = write_jsonl(tmp_path / "docs.jsonl", texts[:30])
    out = tmp_path / "o"
    first = Path(D.prepare_dataset([src], TINY, str(out), CFG)).read_bytes()
    edited = (tmp_path / "docs.jsonl").read_bytes().replace(b"a", b"b", 1)  # same size, new text
    (tmp_path / "docs.jsonl").write_bytes(edited)
    uri = D.prepare_dataset([src], TINY, str(out), CFG)
    m = D.read_manifest(uri)
    assert Path(uri).read_bytes() != first
    old_hash = json.loads(first)["manifest_hash"]
    assert (out / f"manifest-{old_hash[:12]}.json").read_bytes() == first  # nothing lost
    got = sorted(r["text_bytes"] for s in all_rows(uri).values() for r in s)
    want = sorted(json.loads(line)["text"].encode() for line in edited.decode().splitlines())
    assert got == want and m["inputs_key"] != json.loads(first)["inputs_key"]


def test_rerun_rebuilds_missing_and_damaged_shards(tmp_path, texts):
    src = write_jsonl(tmp_path / "docs.jsonl", texts[:80])
    out = tmp_path / "o"
    uri = D.prepare_dataset([src], TINY, str(out), CFG)
    before = Path(uri).read_bytes()
    m = D.read_manifest(uri)
    gone, damaged = out / m["shards"][0]["uri"], out / m["shards"][-1]["uri"]
    want_gone, want_damaged = gone.read_bytes(), damaged.read_bytes()
    gone.unlink()
    damaged.write_bytes(want_damaged[:-8] + b"\0" * 8)  # same size, other bytes: caught by the hash
    assert D.prepare_dataset([src], TINY, str(out), CFG) == uri
    assert Path(uri).read_bytes() == before
    assert gone.read_bytes() == want_gone and damaged.read_bytes() == want_damaged
    all_rows(uri)


def test_empty_corpus_is_an_error_naming_the_sources(tmp_path):
    (tmp_path / "e.jsonl").write_text('{"text": ""}\n\n{"text": null}\n')
    (tmp_path / "e.txt").write_bytes(b"")
    srcs = [str(tmp_path / "e.jsonl"), str(tmp_path / "e.txt")]
    with pytest.raises(
        D.DataError, match=rf"^{re.escape(', '.join(srcs))}: no documents to prepare \(3 empty"
    ):
        D.prepare_dataset(srcs, TINY, str(tmp_path / "o"), CFG)
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_missing_output_bucket_fails_before_labelling(s3_server, tmp_path, texts):
    from bolmo_core import corpus

    src = write_jsonl(tmp_path / "docs.jsonl", texts[:50])
    before = corpus.bytes_read()
    with pytest.raises(
        D.DataError, match=r"^s3://no-such-bucket-out/data: output location is not writable \(.*\)$"
    ):
        D.prepare_dataset([src], TINY, "s3://no-such-bucket-out/data", CFG)
    assert corpus.bytes_read() == before  # no document was read


FSIZE_RUN = """
import resource, signal, sys
from bolmo_core import data as D
from bolmo_core.config import DataConfig
from bolmo_core.source import SourceConfig
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a too-big write fails with EFBIG, like a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
try:
    D.prepare_dataset([sys.argv[1]], SourceConfig("tiny-olmo2"), sys.argv[2], DataConfig(shard_docs=400))
except D.DataError as e:
    print(e)
    sys.exit(2)
"""


def test_failed_shard_write_leaves_no_temp_file_and_no_manifest(tmp_path):
    src = write_jsonl(tmp_path / "docs.jsonl", tiny_corpus(400_000)[:300])
    out = tmp_path / "o"
    proc = subprocess.run(
        [sys.executable, "-c", FSIZE_RUN, src, str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    [line] = proc.stdout.splitlines()
    assert re.fullmatch(
        r"cannot write shard: .*/o/data-\w{12}/train-00000-0000\.parquet: .*File too large.*", line
    )
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]
    assert not (out / "manifest.json").exists() and not list(out.rglob("*.parquet"))


MEMORY_RUN = """
import json, sys
from bolmo_core import data as D
from bolmo_core.config import DataConfig
from bolmo_core.source import SourceConfig

def status(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))

src, out, warm, shard_bytes = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
cfg = DataConfig(shard_docs=1 << 30)
D.prepare_dataset([warm], SourceConfig("tiny-olmo2"), out + "-warm", cfg)  # imports, tokenizer, tables
base = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # restart the peak (VmHWM) from here
D.prepare_dataset([src], SourceConfig("tiny-olmo2"), out, cfg, shard_bytes=shard_bytes)
print(json.dumps({"base": base, "peak": status("VmHWM")}))
"""


def _peak_growth(tmp_path, src: str, shard_bytes: int) -> int:
    """Peak RSS above the warmed-up baseline of a process preparing `src` (one worker: itself)."""
    warm = write_jsonl(tmp_path / "warm.jsonl", tiny_corpus(20_000)[:20])
    proc = subprocess.run(
        [sys.executable, "-c", MEMORY_RUN, src, str(tmp_path / "o"), warm, str(shard_bytes)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1800,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.splitlines()[-1])
    print(
        f"{src}: peak RSS {(r['peak'] - r['base']) / 1e6:.0f} MB above the {r['base'] / 1e6:.0f} MB baseline"
    )
    return r["peak"] - r["base"]


def test_memory_is_bounded_by_the_shard_not_the_input(tmp_path):
    """Fast version: 300 MB of JSONL whose lines carry 10 KB of other fields each (all read and
    parsed, 6 MB of text labelled); the worker's peak stays far below the input."""
    texts = tiny_corpus(400_000)
    meta = "x" * 10_000
    with open(tmp_path / "big.jsonl", "w") as f:
        for i in range(30_000):
            f.write(json.dumps({"meta": meta, "text": texts[i % len(texts)][:200]}) + "\n")
    size = (tmp_path / "big.jsonl").stat().st_size
    growth = _peak_growth(tmp_path, str(tmp_path / "big.jsonl"), 1 << 20)
    assert growth < min(100e6, size / 3), f"peak grew {growth / 1e6:.0f} MB preparing {size / 1e6:.0f} MB"
    m = D.read_manifest(str(tmp_path / "o"))
    assert m["splits"]["train"]["rows"] + m["splits"]["validation"]["rows"] == 30_000


@pytest.mark.slow
def test_memory_is_bounded_while_labelling_300mb(tmp_path):
    texts = tiny_corpus(400_000)
    with open(tmp_path / "big.jsonl", "w") as f:
        n = 0
        while n < 300e6:
            for i, t in enumerate(texts):
                line = json.dumps({"text": f"{n}-{i} {t}"}) + "\n"
                f.write(line)
                n += len(line)
    growth = _peak_growth(tmp_path, str(tmp_path / "big.jsonl"), 4 << 20)
    assert growth < 150e6, f"peak grew {growth / 1e6:.0f} MB preparing {n / 1e6:.0f} MB"


@pytest.mark.slow
def test_a_50mb_jsonl_line_stays_within_its_memory_bound(tmp_path):
    unit = "\n".join(tiny_corpus(200_000))
    line = json.dumps({"text": (unit * (50_000_000 // len(unit) + 1))[:50_000_000]}) + "\n"
    (tmp_path / "huge.jsonl").write_text(line)
    growth = _peak_growth(tmp_path, str(tmp_path / "huge.jsonl"), D.SHARD_BYTES)
    # docs/scale.md, "Memory": a line is parsed whole (its bytes, the decoded JSON, the text as
    # a str of 2 bytes per character here, then as bytes), then streamed: under 10x the line.
    assert growth < 10 * 50e6, f"peak grew {growth / 1e6:.0f} MB for one 50 MB line"


def test_budget_without_a_validation_split_stops_on_training_tokens(tmp_path):
    src = write_jsonl(tmp_path / "docs.jsonl", tiny_corpus(400_000))
    cfg = DataConfig(shard_docs=40, validation_fraction=0.0)
    budget = D.TokenBudget(train_tokens=5_000, validation_tokens=1_000, validation_bytes=1_000)
    m = D.read_manifest(D.prepare_dataset([src], TINY, str(tmp_path / "o"), cfg, budget=budget))
    assert m["budget"] == {"train_tokens": 5_000, "validation_tokens": 0, "validation_bytes": 0}
    assert m["budget_met"] and m["splits"]["train"]["shards"] == 1
