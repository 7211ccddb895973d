"""The `byteify` command line (bolmo_core/cli.py) on real parts: `eval` on a checkpoint folder of the
tiny preset, `generate` with exact bytes in and out (invalid UTF-8 prompts from a file or argv, exact
output to a pipe or --output-file, text on a terminal), `export` then `generate` from the export,
`prepare` writing byte shards + a manifest; bad input is one line and exit 2."""

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from model_helpers import save_model

from bolmo_core import checkpoint
from bolmo_core import data as D
from bolmo_core.cli import main
from bolmo_core.config import get_preset
from bolmo_core.generate import generate
from bolmo_core.load import LoadError, load_byte_model
from bolmo_core.model import BolmoModel
from bolmo_core.source import tiny_corpus

# not UTF-8: a stray byte, a surrogate code point encoded as UTF-8, a truncated sequence at the end
BAD = b"\xff Caf\xc3\xa9 \xed\xa0\x80 und weiter\xc3"
N = 24


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A committed Stage-1-style checkpoint written by the trainer's own save function."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    preset = get_preset("tiny")
    torch.manual_seed(0)
    model = BolmoModel.from_source(preset.model).eval()
    with torch.no_grad():  # make the weights differ from a fresh init, so loading is observable
        model.lm_head.out.weight.mul_(3.0)
    out = str(tmp_path_factory.mktemp("stage1"))
    uri = save_model(out, checkpoint.step_name(10), model, preset, 1, trainer_state={"step": 10})
    yield out, uri, model, preset
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("text") / "heldout.txt"
    f.write_bytes(tiny_corpus(20_000)[5].encode("utf-8")[:400].decode("utf-8", "ignore").encode("utf-8"))
    return f


def test_eval_prints_json_report(ckpt, text_file, tmp_path, capsys):
    out, uri, _, preset = ckpt
    md = tmp_path / "table.md"
    rc = main(
        [
            "eval",
            uri,
            "--text",
            str(text_file),
            "--cute-tasks",
            "contains_char",
            "--cute-items",
            "2",
            "--markdown",
            str(md),
        ]
    )
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["source_name"] == "tiny-olmo2"
    assert report["text"]["bytes"] == len(text_file.read_bytes())
    assert report["text"]["window_bytes"] == preset.data.byte_slots - 1
    assert report["source"]["bits_per_byte"] > 0 and report["byte_model"]["bits_per_byte"] > 0
    assert report["source"]["cute"]["contains_char"]["n"] == 2
    assert "bytes_per_patch" in report["byte_model"]
    assert md.read_text().startswith("| metric | source | byte model |")


def test_eval_errors_are_one_line(ckpt, text_file, tmp_path, capsys):
    out, _, _, _ = ckpt
    assert main(["eval", out, "--text", str(tmp_path / "nope.txt")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("byteify eval: error: --text") and "\n" not in err
    (tmp_path / "empty").mkdir()
    assert main(["eval", str(tmp_path / "empty"), "--text", str(text_file), "--cute-tasks", ""]) == 2
    err = capsys.readouterr().err.strip()
    assert "neither a committed checkpoint" in err and "\n" not in err
    with pytest.raises(LoadError):
        load_byte_model(str(tmp_path / "empty"))
    assert main(["eval", out, "--text", str(text_file), "--cute-tasks", "spelling"]) == 2
    assert "unknown" in capsys.readouterr().err


# ---------------------------------------------------------------- generate


def _byteify(*args: bytes | str, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "bolmo_core.cli", "generate", *args]
    return subprocess.run(cmd, capture_output=True, env=env, timeout=300, cwd=cwd)


def test_invalid_utf8_argv_prompt_in_a_real_process(ckpt, tmp_path):
    """argv carries raw bytes; the interpreter surrogate-escapes them, --prompt gets them back."""
    _, uri, model, _ = ckpt
    want = generate(model, [BAD], max_new_bytes=N)[0]
    # the exact bytes matter: the U+FFFD-replaced prompt continues differently
    assert want != generate(model, [BAD.decode("utf-8", "replace")], max_new_bytes=N)[0]
    res = _byteify(uri.encode(), b"--prompt", BAD, b"--max-new-bytes", str(N).encode(), cwd=tmp_path)
    assert res.returncode == 0, res.stderr.decode(errors="replace")[-2000:]
    assert res.stdout == want  # a pipe gets the bytes exactly, no newline added


def test_prompt_file_and_output_file_are_exact_bytes(ckpt, tmp_path, capsysbinary):
    _, uri, model, _ = ckpt
    want = generate(model, [BAD], max_new_bytes=N)[0]
    prompt_file, out = tmp_path / "prompt.bin", tmp_path / "out.bin"
    prompt_file.write_bytes(BAD)
    assert main(["generate", uri, "--prompt-file", str(prompt_file), "--max-new-bytes", str(N)]) == 0
    assert capsysbinary.readouterr().out == want
    assert main(["generate", uri, "--prompt-file", str(prompt_file), "--output-file", str(out), "--max-new-bytes", str(N)]) == 0  # fmt: skip
    assert out.read_bytes() == want and capsysbinary.readouterr().out == b""


def test_terminal_gets_text(ckpt, monkeypatch, capsys):
    _, uri, model, _ = ckpt

    class Terminal(io.TextIOWrapper):
        def isatty(self) -> bool:
            return True

    term = Terminal(io.BytesIO(), encoding="utf-8")
    monkeypatch.setattr(sys, "stdout", term)
    assert main(["generate", uri, "--prompt", os.fsdecode(BAD), "--max-new-bytes", str(N)]) == 0
    term.flush()
    want = generate(model, [BAD], max_new_bytes=N)[0]
    assert term.buffer.getvalue().decode("utf-8") == want.decode("utf-8", "replace") + "\n"


def test_bad_generate_inputs_are_one_line_errors(ckpt, tmp_path, capsys):
    _, uri, _, _ = ckpt
    kept = tmp_path / "kept.bin"
    kept.write_bytes(b"written before")
    cases = [
        (["--prompt-file", str(tmp_path / "missing.bin")], "missing.bin"),
        (["--prompt-file", str(tmp_path)], "--prompt-file"),  # a folder
        (["--prompt", "x", "--output-file", str(tmp_path)], "is a folder"),
        (["--prompt", "a\ud800b"], "--prompt"),  # a lone surrogate that no argv could carry
        (["--prompt", "x", "--temperature", "-1", "--output-file", str(kept)], "temperature"),
    ]
    for args, needle in cases:
        assert main(["generate", uri, *args]) == 2, args
        err = capsys.readouterr().err  # (loading a model may draw a progress bar before it)
        assert "Traceback" not in err and needle in err.splitlines()[-1], err
        assert err.splitlines()[-1].startswith("byteify generate: error:"), err
    assert kept.read_bytes() == b"written before"  # a failed run leaves the output file as it was
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.bin"]  # and no temp file
    with pytest.raises(SystemExit) as e:  # argparse: one prompt source, not two
        main(["generate", uri, "--prompt", "x", "--prompt-file", str(kept)])
    assert e.value.code == 2


# ---------------------------------------------------------------- export


def test_export_then_generate_from_the_export(ckpt, tmp_path, capsysbinary):
    _, uri, model, _ = ckpt
    out = tmp_path / "hf"
    assert main(["export", uri, str(out)]) == 0
    report = json.loads(capsysbinary.readouterr().out)
    assert report["passed"] and report["max_abs_diff"] < 1e-4
    assert main(["generate", str(out), "--prompt", "Hello", "--max-new-bytes", "12"]) == 0
    # not a terminal: the exact bytes, even where they are not valid UTF-8
    assert capsysbinary.readouterr().out == generate(model, ["Hello"], max_new_bytes=12)[0]
    assert main(["export", uri, str(out)]) == 2  # refuses to overwrite a finished export
    assert b"not empty" in capsysbinary.readouterr().err
    assert main(["generate", str(out), "--prompt", "x", "--temperature", "-1"]) == 2
    assert b"temperature" in capsysbinary.readouterr().err


# ---------------------------------------------------------------- prepare


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
