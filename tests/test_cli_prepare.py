"""`byteify prepare`: byte shards + manifest from the command line; bad input is one line and exit 2."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bolmo_core import data as D
from bolmo_core.cli import main
from bolmo_core.source import tiny_corpus


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    p = tmp_path_factory.mktemp("cli") / "docs.jsonl"
    p.write_text("".join(json.dumps({"text": t}) + "\n" for t in tiny_corpus(400_000)))
    return p


def test_prepare_command_writes_a_manifest_to_the_budget(docs, tmp_path):
    exe = Path(sys.executable).with_name("byteify")
    out = tmp_path / "o"
    cmd = [str(exe), "prepare", str(docs), "--out", str(out), "--preset", "tiny", "--max-tokens", "3000"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout)
    m = D.read_manifest(summary["manifest"])
    assert (
        summary["manifest"] == str(out / "manifest.json") and summary["manifest_hash"] == m["manifest_hash"]
    )
    assert m["budget"]["train_tokens"] == 3000 and m["budget_met"]
    assert 3000 <= m["splits"]["train"]["tokens"] and not m["used"][0]["all_read"]
    assert m["tokenizer"]["source"] == "tiny-olmo2"


def test_prepare_all_then_again_is_a_no_op(docs, tmp_path, capsys):
    args = ["prepare", str(docs), "--out", str(tmp_path / "o"), "--preset", "tiny", "--all", "--workers", "2"]
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["budget"] is None and first["used"][0]["all_read"]
    stamp = Path(first["manifest"]).stat().st_mtime_ns
    assert main(args) == 0
    assert (
        json.loads(capsys.readouterr().out) == first and Path(first["manifest"]).stat().st_mtime_ns == stamp
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["{tmp}/missing.jsonl"], r"{tmp}/missing.jsonl: does not exist"),
        (
            ["hf:?split=train"],
            r"hf:\?split=train: malformed hf: source \(no dataset path\); expected hf:PATH",
        ),
        (["{docs}", "--preset", "nope"], r'preset="nope": unknown \(choose from tiny, '),
        (["{docs}", "--max-tokens", "0"], r"--max-tokens 0: must be at least 1"),
        (["{bad}"], r"{bad}: line 2: not valid JSON"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(docs, tmp_path, capsys, args, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": \n')
    fill = lambda x: x.replace("{tmp}", str(tmp_path)).replace("{docs}", str(docs)).replace("{bad}", str(bad))
    code = main(["prepare", "--out", str(tmp_path / "o"), "--preset", "tiny", *map(fill, args)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("byteify prepare: error: ")
    assert re.search(fill(message), err), err
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_missing_output_bucket_is_one_line(docs, s3_server, capsys):
    code = main(["prepare", str(docs), "--out", "s3://no-such-bucket-cli/x", "--preset", "tiny"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "s3://no-such-bucket-cli/x: output location is not writable" in err
