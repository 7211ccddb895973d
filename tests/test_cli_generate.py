"""`byteify generate` takes and gives bytes exactly (issue 15): invalid UTF-8 prompts from a file or
from argv, exact output to a pipe or --output-file, text on a terminal, one-line errors."""

import io
import os
import subprocess
import sys

import pytest
import torch

from bolmo_core import checkpoint
from bolmo_core.cli import main
from bolmo_core.config import get_preset
from bolmo_core.generate import generate
from bolmo_core.model import BolmoModel

# not UTF-8: a stray byte, a surrogate code point encoded as UTF-8, a truncated sequence at the end
BAD = b"\xff Caf\xc3\xa9 \xed\xa0\x80 und weiter\xc3"
N = 24


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    preset = get_preset("tiny")
    torch.manual_seed(0)
    model = BolmoModel.from_source(preset.model).eval()
    uri = checkpoint.save_checkpoint(
        str(tmp_path_factory.mktemp("stage1")),
        checkpoint.step_name(1),
        rank=0,
        world_size=1,
        barrier=lambda: None,
        rank_state={},
        model_state=model.state_dict(),
        optimizer_state={},
        scheduler_state={},
        trainer_state={"step": 1},
        config={"preset": preset.to_dict(), "stage": 1},
    )
    yield uri, model
    torch.set_num_threads(threads)


def _byteify(*args: bytes | str, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "bolmo_core.cli", "generate", *args]
    return subprocess.run(cmd, capture_output=True, env=env, timeout=300, cwd=cwd)


def test_invalid_utf8_argv_prompt_in_a_real_process(ckpt, tmp_path):
    """argv carries raw bytes; the interpreter surrogate-escapes them, --prompt gets them back."""
    uri, model = ckpt
    want = generate(model, [BAD], max_new_bytes=N)[0]
    # the exact bytes matter: the U+FFFD-replaced prompt continues differently
    assert want != generate(model, [BAD.decode("utf-8", "replace")], max_new_bytes=N)[0]
    res = _byteify(uri.encode(), b"--prompt", BAD, b"--max-new-bytes", str(N).encode(), cwd=tmp_path)
    assert res.returncode == 0, res.stderr.decode(errors="replace")[-2000:]
    assert res.stdout == want  # a pipe gets the bytes exactly, no newline added


def test_prompt_file_and_output_file_are_exact_bytes(ckpt, tmp_path, capsysbinary):
    uri, model = ckpt
    want = generate(model, [BAD], max_new_bytes=N)[0]
    prompt_file, out = tmp_path / "prompt.bin", tmp_path / "out.bin"
    prompt_file.write_bytes(BAD)
    assert main(["generate", uri, "--prompt-file", str(prompt_file), "--max-new-bytes", str(N)]) == 0
    assert capsysbinary.readouterr().out == want
    assert main(["generate", uri, "--prompt-file", str(prompt_file), "--output-file", str(out), "--max-new-bytes", str(N)]) == 0  # fmt: skip
    assert out.read_bytes() == want and capsysbinary.readouterr().out == b""


def test_terminal_gets_text(ckpt, monkeypatch, capsys):
    uri, model = ckpt

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
    uri, _ = ckpt
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
