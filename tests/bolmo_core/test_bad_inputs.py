"""The bad-input catalogue (issue 15): what a new user gets wrong, and what breaks under them.

Every case runs a real command (``byteify ...`` or ``python -m bolmo_core.train``) on real files,
mostly in this process through the commands' ``main(argv)``, and checks three things: the exit
status; that the message is ONE line naming the input (the key, file, folder or source) and what
is wrong; and that nothing written before is lost or changed (the shared dataset, the shared
Stage-1 output and the folder a case points at are hashed before and after). Cases that are not
errors (an edited input, a deleted shard, a damaged newest checkpoint, an invalid-UTF-8 prompt, an
old checkpoint) check the right result instead. A few run as real processes where the process is
the point (a full disk, prompt bytes and a clean stderr); the flow cases use the real Prefect API
and MLflow (SQLite) and real S3 (moto).

The dataset and the Stage-1 output are made once for the module.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from procs import REPO
from train_helpers import OVERRIDES, make_manifest, run_config

from bolmo_core import checkpoint as ckpt
from bolmo_core import cli, storage
from bolmo_core import train as train_cmd
from bolmo_core.config import get_preset
from bolmo_core.source import tiny_corpus

TRAIN = "bolmo_core.train: error: "
S1 = {"stage1.steps": 3, "stage1.checkpoint_every": 1, "stage1.keep_last": 5}


# ---------------------------------------------------------------- shared world


def tree_hash(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` (a lock file is the only thing allowed to come and go)."""
    if not folder.exists():
        return {}
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != storage.LOCK_NAME
    }


def write_jsonl(path: Path, texts) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def _train_in_process(cfg: dict, path: Path) -> tuple[int, str, str]:
    """`python -m bolmo_core.train --config FILE` in this process: (exit status, stdout, stderr)."""
    path.write_text(json.dumps(cfg))
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = train_cmd.main(["--config", str(path)])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """One prepared dataset, one finished Stage-1 output (step-1, step-2, final), a docs file."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("bad")
    manifest = make_manifest(d / "data")
    s1 = d / "s1"
    code, out, err = _train_in_process(run_config(manifest, str(s1), 1, S1), d / "s1.json")
    assert code == 0, err
    docs = write_jsonl(d / "docs.jsonl", tiny_corpus(30_000))
    w = {"tmp": d, "manifest": manifest, "data": d / "data", "s1": s1, "docs": docs}
    yield w
    torch.set_num_threads(threads)


@pytest.fixture
def guarded(world):
    """Fails a case that changed the shared dataset or Stage-1 output."""
    before = {k: tree_hash(world[k]) for k in ("data", "s1")}
    yield
    assert {k: tree_hash(world[k]) for k in ("data", "s1")} == before


def one_line(err: str, prefix: str, pattern: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"not one line:\n{err}"
    assert lines[0].startswith(prefix), lines[0]
    assert re.search(pattern, lines[0]), f"{pattern!r} not in {lines[0]!r}"
    return lines[0]


def _fill(s: str, w: dict, regex: bool = False) -> str:
    for k in ("manifest", "s1", "docs", "tmp", "case"):
        if f"<{k}>" in s:
            s = s.replace(f"<{k}>", re.escape(str(w[k])) if regex else str(w[k]))
    return s


# ---------------------------------------------------------------- config values (python -m bolmo_core.train)

TRAIN_ARGS = ["--preset", "tiny", "--stage", "1", "--manifest", "<manifest>", "--out", "<case>/out"]

CONFIG_CASES = [
    # (id, extra argv, pattern): every one refused before anything is written
    ("global_batch=0", ["--set", "stage1.global_batch=0"], r"stage1\.global_batch=0: must be >= 1"),
    ("negative steps", ["--set", "stage1.steps=-5"], r"stage1\.steps=-5: must be >= 1"),
    ("steps=abc", ["--set", "stage1.steps=abc"], r'stage1\.steps="abc": expected an integer'),
    ("micro_batch=0", ["--set", "stage1.micro_batch=0"], r"stage1\.micro_batch=0: must be >= 1"),
    ("lr<0", ["--set", "stage1.optim.lr=-0.001"], r"stage1\.optim\.lr=-0\.001: must be > 0"),
    (
        "global not a multiple of micro",
        ["--set", "stage1.global_batch=6"],
        r"stage1\.global_batch=6: must be a multiple of micro_batch=4",
    ),
    (
        "frozen field, wrong type",
        ["--set", "model.source.trust_remote_code=maybe"],
        r'model\.source\.trust_remote_code="maybe": expected true or false',
    ),
    ("unknown field", ["--set", "stage1.nosuch=1"], r"override 'stage1\.nosuch': no field 'nosuch'"),
    ("unknown section", ["--set", "stage9.steps=1"], r"override 'stage9\.steps': no section 'stage9'"),
    ("override without =", ["--set", "stage1.steps"], r"override 'stage1\.steps': expected key=value"),
    (
        "validation_fraction=1.5",
        ["--set", "data.validation_fraction=1.5"],
        r"data\.validation_fraction=1\.5: must be < 1\.0",
    ),
    ("unknown precision", ["--set", "stage1.precision=fp8"], r'stage1\.precision="fp8": must be one of'),
    ("betas out of range", ["--set", "stage1.optim.betas=[0.9,1.5]"], r"stage1\.optim\.betas=\[0\.9, 1\.5\]"),
    ("negative time budget", ["--max-minutes", "-1"], r"max_minutes=-1(\.0)?: must be > 0"),
]


@pytest.mark.parametrize("case_id, extra, pattern", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_bad_config_value_is_one_line_and_nothing_is_written(
    world, guarded, tmp_path, capsys, case_id, extra, pattern
):
    w = {**world, "case": tmp_path}
    code = train_cmd.main([_fill(a, w) for a in TRAIN_ARGS + extra])
    assert code == 2
    one_line(capsys.readouterr().err, TRAIN, pattern)
    assert not (tmp_path / "out").exists()  # no folder, no `final` a later run would skip as done


def test_unknown_preset(world, guarded, tmp_path, capsys):
    args = [_fill(a, {**world, "case": tmp_path}) for a in TRAIN_ARGS]
    args[1] = "nope"
    assert train_cmd.main(args) == 2
    one_line(capsys.readouterr().err, TRAIN, r'preset="nope": unknown \(choose from tiny, ')
    assert not (tmp_path / "out").exists()


def test_missing_argument(world, tmp_path, capsys):
    assert train_cmd.main(["--preset", "tiny", "--stage", "1", "--manifest", world["manifest"]]) == 2
    one_line(capsys.readouterr().err, TRAIN, r"give --config FILE, or all of .*\(missing --out\)")


CONFIG_FILE_CASES = [
    ("missing", None, r"train config <case>/c\.json: does not exist"),
    ("not JSON", "{'preset': 1", r"train config <case>/c\.json: not valid JSON"),
    ("not an object", "[1, 2]", r"train config <case>/c\.json: expected a JSON object"),
    (
        "partial preset",
        {"preset": {"name": "tiny", "model": {}}, "stage": 1, "manifest_uri": "m", "out_uri": "o"},
        r"train config <case>/c\.json: preset\.data: missing",
    ),
    (
        "unknown top-level field",
        {"stages": 1},
        r"train config <case>/c\.json: TrainConfig: unknown field 'stages'",
    ),
]


@pytest.mark.parametrize(
    "case_id, content, pattern", CONFIG_FILE_CASES, ids=[c[0] for c in CONFIG_FILE_CASES]
)
def test_bad_config_file(world, guarded, tmp_path, capsys, case_id, content, pattern):
    w = {**world, "case": tmp_path}
    if isinstance(content, dict) and "preset" not in content:
        content = {**run_config(world["manifest"], str(tmp_path / "out")), **content}
    if content is not None:
        (tmp_path / "c.json").write_text(content if isinstance(content, str) else json.dumps(content))
    assert train_cmd.main(["--config", str(tmp_path / "c.json")]) == 2
    one_line(capsys.readouterr().err, TRAIN, _fill(pattern, w, regex=True))
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- training inputs and checkpoints


def _cfg(world, out: Path, stage: int = 1, overrides: dict | None = None, **kw) -> dict:
    return run_config(world["manifest"], str(out), stage, {**S1, **(overrides or {})}, **kw)


def test_missing_manifest(world, guarded, tmp_path):
    code, _, err = _train_in_process(
        run_config(str(tmp_path / "nope.json"), str(tmp_path / "out")), tmp_path / "c.json"
    )
    assert code == 2
    one_line(err, TRAIN, re.escape(str(tmp_path / "nope.json")))
    assert not (tmp_path / "out").exists()


def test_damaged_manifest(world, guarded, tmp_path):
    bad = tmp_path / "manifest.json"
    m = json.loads(Path(world["manifest"]).read_text())
    m["splits"]["train"]["rows"] += 1  # edited by hand: no longer matches its own hash
    bad.write_text(json.dumps(m))
    code, _, err = _train_in_process(
        _cfg(world, tmp_path / "out") | {"manifest_uri": str(bad)}, tmp_path / "c.json"
    )
    assert code == 2
    one_line(err, TRAIN, re.escape(str(bad)) + r": manifest_hash does not match its content")


def test_resume_with_another_config_is_refused(world, guarded, tmp_path):
    code, _, err = _train_in_process(
        _cfg(world, world["s1"], overrides={"stage1.optim.lr": 0.002}), tmp_path / "c.json"
    )
    assert code == 2
    one_line(
        err,
        TRAIN,
        re.escape(f"checkpoint {world['s1']}/final was made differently: config stage1.optim.lr: 0.001"),
    )


def test_second_trainer_on_a_locked_folder_is_refused(world, guarded, tmp_path):
    """A live holder (this process's lock, as another trainer's would be): refused naming both."""
    out = tmp_path / "out"
    shutil.copytree(world["s1"], out)
    before = tree_hash(out)
    with storage.lock_folder(str(out), "stage 1 training"):
        code, _, err = _train_in_process(_cfg(world, out), tmp_path / "c.json")
    assert code == 2
    one_line(err, TRAIN, re.escape(f"{out}: in use by stage 1 training (pid {os.getpid()} on "))
    assert tree_hash(out) == before


def test_lock_left_by_a_dead_trainer_is_taken_over(world, guarded, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(world["s1"], out)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    lock = {"what": "stage 1 training", "host": os.uname().nodename, "pid": int(dead.stdout), "token": "x"}
    (out / storage.LOCK_NAME).write_text(json.dumps({**lock, "heartbeat": 4e9}))  # fresh heartbeat, dead pid
    code, stdout, err = _train_in_process(_cfg(world, out), tmp_path / "c.json")
    assert code == 0, err
    assert json.loads(stdout.strip().splitlines()[-1])["summary"]["skipped"]
    assert not (out / storage.LOCK_NAME).exists()  # released at the end


def test_checkpoint_from_before_a_new_config_field_still_resumes(world, guarded, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(world["s1"], out)
    for name in ("final", "step-000002"):
        c = json.loads((out / name / "config.json").read_text())
        del c["preset"]["model"]["boundary_context"], c["preset"]["data"]["loader"]
        (out / name / "config.json").write_text(json.dumps(c))
        commit = json.loads((out / name / "COMMIT").read_text())  # as that older code committed it
        commit["sha256"]["config.json"] = storage.sha256_bytes((out / name / "config.json").read_bytes())
        (out / name / "COMMIT").write_text(json.dumps(commit))
    before = tree_hash(out)
    code, stdout, err = _train_in_process(_cfg(world, out), tmp_path / "c.json")
    assert code == 0 and err == "", err
    assert json.loads(stdout.strip().splitlines()[-1])["summary"]["skipped"]
    assert tree_hash(out) == before


DAMAGES = {
    "truncated weights": ("model.safetensors", lambda b: b[: len(b) // 2]),
    "zeroed weights header": ("model.safetensors", lambda b: b"\0" * 16 + b[16:]),
    "truncated optimizer": ("optimizer.pt", lambda b: b[:100]),
    "missing rank state": ("rank-00000.pt", None),
    "damaged trainer state": ("trainer_state.json", lambda b: b[:5]),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_resume_skips_a_damaged_newest_checkpoint(world, guarded, tmp_path, damage):
    """The newest step damaged: one warning naming it, the run resumes from the step before and
    ends with the same final weights as the run that was never interrupted."""
    out = tmp_path / "out"
    shutil.copytree(world["s1"], out, ignore=shutil.ignore_patterns("final"))  # as if killed saving final
    name, how = DAMAGES[damage]
    f = out / "step-000002" / name
    f.unlink() if how is None else f.write_bytes(how(f.read_bytes()))
    code, stdout, err = _train_in_process(_cfg(world, out), tmp_path / "c.json")
    assert code == 0, err
    one_line(err, "bolmo_core.train: warning: ", re.escape(f"skipping checkpoint {out}/step-000002: {f}: "))
    start = next(json.loads(ln.split(" ", 1)[1]) for ln in stdout.splitlines() if '"start"' in ln)
    assert start["step"] == 1 and start["info"]["resumed_from"] == str(out / "step-000001")
    a, b = ckpt.load_model_state(str(world["s1"] / "final")), ckpt.load_model_state(str(out / "final"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_every_checkpoint_damaged_is_one_line(world, guarded, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(world["s1"], out, ignore=shutil.ignore_patterns("final", "step-000001"))
    (out / "step-000002" / "model.safetensors").write_bytes(b"")
    before = tree_hash(out)
    code, _, err = _train_in_process(_cfg(world, out), tmp_path / "c.json")
    assert code == 2
    assert err.strip().splitlines()[-1].startswith(TRAIN + f"{out}: every committed checkpoint is damaged")
    assert tree_hash(out) == before  # nothing deleted: the user decides


def _other_shape_stage1(folder: Path) -> str:
    from bolmo_core.model import BolmoModel

    preset = get_preset("tiny", {**OVERRIDES, "model.local.ffn_hidden": 44})
    model = BolmoModel.from_source(preset.model)
    return ckpt.save_checkpoint(
        str(folder),
        ckpt.FINAL,
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


@pytest.mark.parametrize("init_from", ["other shape", "no checkpoint"])
def test_stage2_init_from_a_bad_stage1(world, guarded, tmp_path, init_from):
    src = _other_shape_stage1(tmp_path / "other") if init_from == "other shape" else str(tmp_path / "empty")
    before = tree_hash(tmp_path / "other")
    code, _, err = _train_in_process(
        _cfg(world, tmp_path / "s2", stage=2, init_from=src), tmp_path / "c.json"
    )
    assert code == 2
    want = (
        rf"init_from {re.escape(src)}: weights do not fit the model: \d+ tensors of another shape"
        if init_from == "other shape"
        else rf"{re.escape(src)}: no committed checkpoint there"
    )
    one_line(err, TRAIN, want)
    assert tree_hash(tmp_path / "other") == before


@pytest.mark.parametrize("where", ["model folder", "cached built-in"])
def test_damaged_source_weights(world, guarded, tmp_path, monkeypatch, where):
    from bolmo_core.source import SourceConfig, resolve_source

    monkeypatch.setenv("BYTEIFY_CACHE", str(tmp_path / "cache"))
    built = Path(resolve_source(SourceConfig("tiny-olmo2"))[0])  # built into this case's cache
    folder = built if where == "cached built-in" else Path(shutil.copytree(built, tmp_path / "src"))
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    name = "tiny-olmo2" if where == "cached built-in" else str(folder)
    cfg = _cfg(world, tmp_path / "out", overrides={"model.source.name_or_path": name})
    code, _, err = _train_in_process(cfg, tmp_path / "c.json")
    assert code == 2
    fix = "delete the cache entry" if where == "cached built-in" else "replace the folder's model.safetensors"
    one_line(err, TRAIN, rf"source model '{re.escape(name)}': .*weights file damaged .*{fix}")


# ---------------------------------------------------------------- byteify generate / eval / export


def _damaged_copy(world, tmp_path: Path, file: str, how) -> Path:
    out = tmp_path / "ck"
    shutil.copytree(world["s1"] / "final", out)
    f = out / file
    f.unlink() if how is None else f.write_bytes(how(f.read_bytes()))
    return out


CHECKPOINT_CASES = [
    # (id, file, damage, command, pattern)
    (
        "generate: truncated weights",
        "model.safetensors",
        lambda b: b[:999],
        "generate",
        r"model\.safetensors: sha256 differs from COMMIT \(changed or damaged\)",
    ),
    (
        "eval: truncated weights",
        "model.safetensors",
        lambda b: b[:999],
        "eval",
        r"model\.safetensors: sha256 differs from COMMIT \(changed or damaged\)",
    ),
    (
        "export: truncated weights",
        "model.safetensors",
        lambda b: b[:999],
        "export",
        r"model\.safetensors: sha256 differs from COMMIT \(changed or damaged\)",
    ),
    (
        "generate: damaged config",
        "config.json",
        lambda b: b[:7],
        "generate",
        r"config\.json: sha256 differs from COMMIT",
    ),
    (
        "generate: weights missing",
        "model.safetensors",
        None,
        "generate",
        r"model\.safetensors: missing from a committed",
    ),
    (
        "generate: final without commit marker",
        "COMMIT",
        None,
        "generate",
        r"no COMMIT marker, its save did not finish; use the stage folder",
    ),
]


def _command(cmd: str, model_dir: Path, tmp_path: Path, world) -> list[str]:
    if cmd == "generate":
        return ["generate", str(model_dir), "--prompt", "Hi", "--max-new-bytes", "4"]
    if cmd == "eval":
        return ["eval", str(model_dir), "--text", str(world["docs"]), "--no-source", "--cute-tasks", ""]
    return ["export", str(model_dir), str(tmp_path / "export")]


@pytest.mark.parametrize(
    "case_id, file, how, command, pattern", CHECKPOINT_CASES, ids=[c[0] for c in CHECKPOINT_CASES]
)
def test_damaged_checkpoint_on_the_command_line(
    world, guarded, tmp_path, capsys, case_id, file, how, command, pattern
):
    model_dir = _damaged_copy(world, tmp_path, file, how)
    before = tree_hash(model_dir)
    assert cli.main(_command(command, model_dir, tmp_path, world)) == 2
    one_line(
        capsys.readouterr().err, f"byteify {command}: error: ", re.escape(str(model_dir)) + ".*" + pattern
    )
    assert tree_hash(model_dir) == before and not (tmp_path / "export").exists()


CLI_CASES = [
    # (id, argv, pattern)
    (
        "generate: prompt file missing",
        ["generate", "<s1>", "--prompt-file", "<case>/nope"],
        r"--prompt-file '<case>/nope': cannot be read",
    ),
    (
        "generate: negative length",
        ["generate", "<s1>", "--prompt", "a", "--max-new-bytes", "-1"],
        r"max_new_bytes=-1: must be >= 0",
    ),
    (
        "generate: negative temperature",
        ["generate", "<s1>", "--prompt", "a", "--temperature", "-1"],
        r"temperature=-1\.0: must be",
    ),
    ("generate: top_p 0", ["generate", "<s1>", "--prompt", "a", "--top-p", "0"], r"top_p=0\.0: must be in"),
    (
        "generate: output file is a folder",
        ["generate", "<s1>", "--prompt", "a", "--output-file", "<case>"],
        r"--output-file '<case>': is a folder",
    ),
    (
        "generate: no such model",
        ["generate", "<case>/nope", "--prompt", "a"],
        r"model folder '<case>/nope': neither a committed",
    ),
    (
        "eval: text missing",
        ["eval", "<s1>", "--text", "<case>/nope.txt"],
        r"--text '<case>/nope\.txt': cannot be read",
    ),
    (
        "eval: text empty",
        ["eval", "<s1>", "--text", "<case>/empty.txt"],
        r"--text '<case>/empty\.txt': file is empty",
    ),
    ("eval: unknown CUTE task", ["eval", "<s1>", "--text", "<docs>", "--cute-tasks", "nope"], r"nope"),
    ("plan: bad memory size", ["plan", "--preset", "tiny", "--gpu-memory", "lots"], r"lots"),
    (
        "plan: bad override",
        ["plan", "--preset", "tiny", "--set", "stage2.micro_batch=0"],
        r"stage2\.micro_batch=0: must be >= 1",
    ),
]


@pytest.mark.parametrize("case_id, argv, pattern", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_bad_command_line_input(world, guarded, tmp_path, capsys, case_id, argv, pattern):
    (tmp_path / "empty.txt").write_bytes(b"")
    w = {**world, "case": tmp_path}
    assert cli.main([_fill(a, w) for a in argv]) == 2
    cap = capsys.readouterr()
    one_line(cap.err, f"byteify {argv[0]}: error: ", _fill(pattern, w, regex=True))


EXPORT_CASES = [
    "foreign files, --overwrite",
    "the checkpoint folder itself, --overwrite",
    "not empty, no --overwrite",
]


@pytest.mark.parametrize("case_id", EXPORT_CASES)
def test_export_never_deletes_what_byteify_did_not_write(world, guarded, tmp_path, capsys, case_id):
    if case_id.startswith("the checkpoint"):
        out = tmp_path / "ck"
        shutil.copytree(world["s1"], out)
        argv = ["export", str(out / "final"), str(out), "--overwrite"]
        pattern = rf"export folder '{re.escape(str(out))}': holds a checkpoint"
    else:
        out = tmp_path / "out"
        out.mkdir()
        (out / "notes.txt").write_text("mine")
        argv = ["export", str(world["s1"]), str(out)] + (["--overwrite"] if "--overwrite" in case_id else [])
        pattern = rf"export folder '{re.escape(str(out))}': " + ("'notes.txt' was not written by byteify")
    before = tree_hash(out)
    assert cli.main(argv) == 2
    one_line(capsys.readouterr().err, "byteify export: error: ", pattern)
    assert tree_hash(out) == before


def test_invalid_utf8_prompt_is_data_and_stderr_stays_clean(world, guarded, tmp_path):
    """A real process: raw prompt bytes in, exact bytes out, and nothing on stderr (no progress bars)."""
    prompt = tmp_path / "prompt.bin"
    prompt.write_bytes(b"\xff Caf\xc3\xa9 \xed\xa0\x80 weiter\xc3")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "bolmo_core.cli", "generate", str(world["s1"]), "--prompt-file", str(prompt)]
    res = subprocess.run(cmd + ["--max-new-bytes", "8"], capture_output=True, env=env, timeout=300, cwd=REPO)
    assert res.returncode == 0 and res.stderr == b"", res.stderr.decode(errors="replace")
    assert len(res.stdout) == 8


# ---------------------------------------------------------------- byteify prepare (data)

PREPARE_CASES = [
    # (id, sources and options, pattern)
    ("empty corpus", ["<case>/empty.jsonl"], r"<case>/empty\.jsonl: no documents to prepare"),
    ("missing file", ["<case>/missing.jsonl"], r"<case>/missing\.jsonl: does not exist"),
    ("malformed hf: spec", ["hf:"], r"hf:: malformed hf: source \(no dataset path\)"),
    ("hf: spec without a path", ["hf:?split=train"], r"hf:\?split=train: malformed hf: source"),
    ("invalid JSON line", ["<case>/bad.jsonl"], r"<case>/bad\.jsonl: line 2: not valid JSON"),
    ("missing text column", ["<docs>", "--column", "body"], r"<docs>.*'body'"),
    ("unknown preset", ["<docs>", "--preset", "nope"], r'preset="nope": unknown'),
    ("zero token budget", ["<docs>", "--max-tokens", "0"], r"--max-tokens 0: must be at least 1"),
    ("zero workers", ["<docs>", "--workers", "0"], r"--workers 0: must be at least 1"),
]


@pytest.mark.parametrize("case_id, args, pattern", PREPARE_CASES, ids=[c[0] for c in PREPARE_CASES])
def test_bad_prepare_input(world, guarded, tmp_path, capsys, case_id, args, pattern):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    w = {**world, "case": tmp_path}
    argv = ["prepare", "--out", str(tmp_path / "o"), "--preset", "tiny", *[_fill(a, w) for a in args]]
    assert cli.main(argv) == 2
    one_line(capsys.readouterr().err, "byteify prepare: error: ", _fill(pattern, w, regex=True))
    assert not (tmp_path / "o" / "manifest.json").exists()


def _prepare(src: Path, out: Path) -> int:
    return cli.main(["prepare", str(src), "--out", str(out), "--preset", "tiny", "--all"])


def test_prepare_on_a_locked_folder_is_refused(world, guarded, tmp_path, capsys):
    out = tmp_path / "o"
    assert _prepare(world["docs"], out) == 0
    capsys.readouterr()
    (out / "manifest.json").unlink()  # would be rebuilt: the lock has to stop that
    before = tree_hash(out)
    with storage.lock_folder(str(out), "data preparation"):
        assert _prepare(world["docs"], out) == 2
    one_line(
        capsys.readouterr().err, "byteify prepare: error: ", re.escape(f"{out}: in use by data preparation")
    )
    assert tree_hash(out) == before


def test_edited_input_is_prepared_again(world, guarded, tmp_path, capsys):
    src = write_jsonl(tmp_path / "docs.jsonl", tiny_corpus(20_000))
    out = tmp_path / "o"
    assert _prepare(src, out) == 0
    first = json.loads(capsys.readouterr().out)
    old = (out / "manifest.json").read_bytes()
    src.write_bytes(src.read_bytes().replace(b"a", b"b", 1))  # same size, new text
    assert _prepare(src, out) == 0
    second = json.loads(capsys.readouterr().out)
    assert second["manifest_hash"] != first["manifest_hash"]
    assert (out / f"manifest-{first['manifest_hash'][:12]}.json").read_bytes() == old  # nothing lost


def test_deleted_shard_is_rebuilt(world, guarded, tmp_path, capsys):
    src = write_jsonl(tmp_path / "docs.jsonl", tiny_corpus(20_000))
    out = tmp_path / "o"
    assert _prepare(src, out) == 0
    first = capsys.readouterr().out
    before = tree_hash(out)
    shard = sorted(out.rglob("*.parquet"))[0]
    shard.unlink()
    assert _prepare(src, out) == 0
    assert capsys.readouterr().out == first and tree_hash(out) == before


FULL_DISK = """
import resource, signal, sys
from bolmo_core.cli import main
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a too-big write fails with EFBIG, like a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
sys.exit(main(["prepare", sys.argv[1], "--out", sys.argv[2], "--preset", "tiny", "--all"]))
"""


def test_full_disk_during_prepare(world, guarded, tmp_path):
    """A real process whose writes fail past 20 kB: one line, no temp file, no manifest."""
    src = write_jsonl(tmp_path / "docs.jsonl", tiny_corpus(400_000)[:300])
    out = tmp_path / "o"
    res = subprocess.run(
        [sys.executable, "-c", FULL_DISK, str(src), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert res.returncode == 2, res.stderr[-2000:]
    one_line(
        res.stderr, "byteify prepare: error: ", rf"cannot write shard: {re.escape(str(out))}/.*File too large"
    )
    assert not [p for p in out.rglob("*") if ".tmp" in p.name] and not (out / "manifest.json").exists()


def test_missing_output_bucket(world, guarded, s3_server, capsys):
    assert (
        cli.main(["prepare", str(world["docs"]), "--out", "s3://no-such-bucket-bad/x", "--preset", "tiny"])
        == 2
    )
    one_line(
        capsys.readouterr().err,
        "byteify prepare: error: ",
        r"s3://no-such-bucket-bad/x: output location is not writable",
    )


MEMORY = """
import json, sys
from bolmo_core import data as D
from bolmo_core.config import DataConfig
from bolmo_core.source import SourceConfig
def status(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))
D.prepare_dataset([sys.argv[3]], SourceConfig("tiny-olmo2"), sys.argv[2] + "-warm", DataConfig())
base = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")
D.prepare_dataset([sys.argv[1]], SourceConfig("tiny-olmo2"), sys.argv[2], DataConfig())
print(status("VmHWM") - base)
"""


@pytest.mark.slow
def test_a_50mb_line_stays_within_its_memory_bound(world, tmp_path):
    """docs/scale.md "Memory": one line is parsed whole, then streamed: under 10x the line."""
    unit = "\n".join(tiny_corpus(200_000))
    (tmp_path / "huge.jsonl").write_text(
        json.dumps({"text": (unit * (50_000_000 // len(unit) + 1))[:50_000_000]}) + "\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", MEMORY, str(tmp_path / "huge.jsonl"), str(tmp_path / "o"), str(world["docs"])],
        capture_output=True,
        text=True,
        timeout=1200,
        cwd=REPO,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert int(res.stdout) < 10 * 50e6


# ---------------------------------------------------------------- the flow


def _flow(tmp_path, **kw):
    from flows.byteify import Evaluation, Tracking, byteify

    return byteify(
        preset="tiny",
        evaluation=Evaluation(max_bytes=3000, cute_items=0),
        tracking=Tracking(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="bad-inputs"),
        return_state=True,
        **kw,
    )


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"stage1.global_batch": 0}, "stage1.global_batch=0: must be >= 1"),
        ({"stage2.steps": "many"}, 'stage2.steps="many": expected an integer'),
    ],
)
def test_bad_flow_parameter_fails_at_once(prefect_api, world, guarded, tmp_path, overrides, message):
    state = _flow(
        tmp_path, overrides=overrides, data_sources=[str(world["docs"])], storage_root=str(tmp_path / "runs")
    )
    assert state.is_failed()
    with pytest.raises(ValueError) as e:
        state.result()
    assert str(e.value) == message
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()  # nothing started


def test_flow_with_a_missing_output_bucket_fails_before_labelling(
    prefect_api, s3_server, world, guarded, tmp_path
):
    """The data step checks its output first; the failed flow ends its MLflow run FAILED."""
    from mlflow import MlflowClient

    state = _flow(tmp_path, data_sources=[str(world["docs"])], storage_root="s3://no-such-bucket-flow/runs")
    assert state.is_failed()
    with pytest.raises(Exception) as e:
        state.result()
    assert "\n" not in str(e.value)
    assert re.search(r"s3://no-such-bucket-flow/runs/data/\w+: output location is not writable", str(e.value))
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("bad-inputs")
    [run] = client.search_runs([exp.experiment_id])
    assert run.info.status == "FAILED"
