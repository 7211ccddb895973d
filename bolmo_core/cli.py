"""The ``byteify`` console script: one argparse subparser per command.

    byteify eval MODEL_DIR --text FILE [--source SOURCE]    prints the JSON evaluation report
    byteify generate MODEL_DIR --prompt TEXT | --prompt-file PATH     streams the continuation (exact bytes)
    byteify export CKPT_DIR OUT_DIR                        HF folder, then the parity check (JSON report)
    byteify transfer BYTE_MODEL --base B --instruct I --out DIR   adds (instruct - base) to the global
                                                           blocks, exports, checks parity [, evaluates]
    byteify plan --preset P --gpus N --gpu-memory 80GB     memory per GPU and hours per stage, before the spend
    byteify prepare SOURCES... --out URI [--preset P]      byte shards + manifest (JSON summary)

A new command is a ``_add_<name>(subparsers)`` that sets ``func`` and one line in ``build_parser``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from . import cute


class CLIError(ValueError):
    """A bad command-line input, with a one-line reason."""


def _json_default(x):
    if isinstance(x, float) and math.isnan(x):
        return None
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def _nan_to_none(x):
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_nan_to_none(v) for v in x]
    return None if isinstance(x, float) and math.isnan(x) else x


def _read_text(path: str) -> bytes:
    from . import storage

    try:
        data = storage.read_bytes(path)
    except (storage.StorageError, OSError) as e:
        raise CLIError(f"--text '{path}': cannot be read ({e})") from None
    if not data:
        raise CLIError(f"--text '{path}': file is empty")
    return data


def cmd_eval(args) -> int:
    import torch

    from .evaluate import EvalConfig, evaluate, markdown_table
    from .load import load_byte_model
    from .source import SourceConfig, load_source_model, load_tokenizer

    text = _read_text(args.text)
    tasks = cute.check_tasks([t for t in args.cute_tasks.split(",") if t] if args.cute_tasks else [])
    cfg = EvalConfig(
        window_bytes=args.window_bytes,
        batch_size=args.batch_size,
        precision=args.precision,
        max_bytes=args.max_bytes,
        cute_tasks=tasks,
        cute_items=args.cute_items,
        cute_seed=args.seed,
        cute_data_dir=args.cute_data,
        boundaries=args.boundaries,
    )
    torch.manual_seed(args.seed)
    byte_model, preset = load_byte_model(args.model_dir)
    src_cfg = SourceConfig(args.source) if args.source else preset.model.source
    tok = load_tokenizer(preset.model.source)  # the tokenizer the byte model was made with
    source_model = None if args.no_source else load_source_model(src_cfg)
    if source_model is not None and args.source:
        # A different source must share the tokenizer, or the side-by-side bytes would differ.
        from .subword import get_vocab

        if get_vocab(load_tokenizer(src_cfg)).fingerprint != get_vocab(tok).fingerprint:
            raise CLIError(f"--source '{args.source}': its tokenizer differs from the byte model's source")
    report = evaluate(
        [text],
        tok,
        source_model=source_model,
        byte_model=byte_model,
        cfg=cfg,
        byte_length=preset.data.byte_slots,
    )
    report["model_dir"] = args.model_dir
    report["source_name"] = src_cfg.name_or_path
    report = _nan_to_none(report)
    if args.markdown:
        Path(args.markdown).write_text(markdown_table(report) + "\n", encoding="utf-8")
    print(json.dumps(report, indent=1, default=_json_default))
    return 0


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a byte model against its source on held-out text (JSON report)")
    p.add_argument(
        "model_dir", metavar="MODEL_DIR", help="checkpoint folder (or stage output folder) or exported model"
    )
    p.add_argument("--text", required=True, help="held-out text file (local path or fsspec URI)")
    p.add_argument("--source", help="source model to compare with (default: the byte model's own source)")
    p.add_argument("--no-source", action="store_true", help="evaluate the byte model only")
    p.add_argument("--window-bytes", type=int, help="bytes per window (default: the model's byte length - 1)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--max-bytes", type=int, help="evaluate only the first N bytes of the text")
    p.add_argument(
        "--boundaries",
        choices=("predicted", "source"),
        default="predicted",
        help="byte-model boundaries: its own predictor (default) or the source tokenizer's",
    )
    p.add_argument("--cute-tasks", default=",".join(cute.CHAR_TASKS), help="comma-separated; empty to skip")
    p.add_argument("--cute-items", type=int, default=50, help="items per CUTE-style task")
    p.add_argument("--cute-data", help="folder with CUTE TSV files to use instead of regenerating")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--markdown", help="also write the side-by-side markdown table to this file")
    p.set_defaults(func=cmd_eval)


def _prompt_bytes(args) -> bytes:
    """The prompt exactly as given: a file's raw bytes, or the argument's bytes (surrogate-escaped)."""
    from . import storage

    if args.prompt_file is not None:
        try:
            return storage.read_bytes(args.prompt_file)
        except (storage.StorageError, OSError) as e:
            why = str(e).removeprefix(f"{args.prompt_file}: ")
            raise CLIError(f"--prompt-file '{args.prompt_file}': cannot be read ({why})") from None
    try:
        # POSIX argv is bytes; Python decodes it with surrogateescape, os.fsencode gives them back
        return os.fsencode(args.prompt)
    except UnicodeEncodeError as e:
        raise CLIError(f"--prompt: character {e.start} cannot be encoded as bytes ({e.reason})") from None


def cmd_generate(args) -> int:
    """Bytes go out exactly: to --output-file, or to stdout; a terminal gets text (U+FFFD for
    invalid sequences) and a final newline."""
    from . import storage
    from .generate import GenerationConfig, stream_bytes, utf8_chunks
    from .load import load_byte_model

    prompt = _prompt_bytes(args)
    kw = {
        k: getattr(args, k) for k in ("max_new_bytes", "temperature", "top_k", "top_p", "seed", "precision")
    }
    GenerationConfig(**kw).check()  # before the model loads
    if args.output_file is not None and os.path.isdir(args.output_file):
        raise CLIError(f"--output-file '{args.output_file}': is a folder")
    model, _ = load_byte_model(args.model_dir)
    chunks = stream_bytes(model, prompt, **kw)
    if args.output_file is not None:
        data = b"".join(chunks)  # generated first: a failed run leaves the file as it was
        try:
            storage.write_bytes_atomic(args.output_file, data)
        except storage.StorageError as e:
            raise CLIError(f"--output-file '{args.output_file}': cannot be written ({e})") from None
    elif sys.stdout.isatty():
        for text in utf8_chunks(chunks):
            sys.stdout.write(text)
            sys.stdout.flush()
        sys.stdout.write("\n")
    else:
        for c in chunks:
            sys.stdout.buffer.write(c)
            sys.stdout.buffer.flush()
    return 0


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="stream a byte model's continuation of a prompt")
    p.add_argument("model_dir", metavar="MODEL_DIR", help="checkpoint folder or exported model")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (its bytes exactly, even if not valid UTF-8)")
    src.add_argument("--prompt-file", metavar="PATH", help="file whose raw bytes are the prompt")
    p.add_argument(
        "--output-file",
        metavar="PATH",
        help="write the generated bytes here, exactly (default: stdout; a terminal shows them as text)",
    )
    p.add_argument("--max-new-bytes", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.set_defaults(func=cmd_generate)


def cmd_export(args) -> int:
    import shutil

    from .export import ParityError, check_parity, export_model
    from .load import load_checkpoint_model

    model, preset = load_checkpoint_model(args.ckpt_dir)
    out = export_model(model, args.out_dir, preset=preset, overwrite=args.overwrite)
    try:
        report = check_parity(out, model)
    except ParityError:
        shutil.rmtree(out, ignore_errors=True)  # never leave an export that failed validation
        raise
    print(json.dumps(report, indent=1))
    return 0


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="export a checkpoint as a Hugging Face folder and check its parity")
    p.add_argument("ckpt_dir", metavar="CKPT_DIR", help="checkpoint folder (or stage output folder)")
    p.add_argument("out_dir", metavar="OUT_DIR", help="local folder to write (must not exist or be empty)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_export)


def cmd_transfer(args) -> int:
    """Task arithmetic (bolmo_core/transfer.py); with --text, the result is scored next to the instruct model."""
    from .transfer import transfer_export

    text = _read_text(args.text) if args.text else None  # a bad --text fails before any work
    model, preset, report = transfer_export(
        args.byte_model,
        _source_arg(args.base, args.base_revision),
        _source_arg(args.instruct, args.instruct_revision),
        args.out,
        alpha=args.alpha,
        retained_embeddings=args.retained_embeddings,
        overwrite=args.overwrite,
    )
    if text is not None:
        from .evaluate import EvalConfig, evaluate
        from .source import load_source_model, load_tokenizer

        report["evaluation"] = _nan_to_none(
            evaluate(
                [text],
                load_tokenizer(preset.model.source),
                source_model=load_source_model(_source_arg(args.instruct, args.instruct_revision)),
                byte_model=model,
                cfg=EvalConfig(max_bytes=args.max_bytes, cute_tasks=()),
                byte_length=preset.data.byte_slots,
            )
        )
    print(json.dumps(report, indent=1, default=_json_default))
    return 0


def _source_arg(name: str, revision: str | None):
    from .source import SourceConfig

    return SourceConfig(name, revision=revision)


def _add_transfer(sub) -> None:
    p = sub.add_parser(
        "transfer",
        help="add a source's (instruct - base) weight delta to a byte model's global blocks, export it",
    )
    p.add_argument("byte_model", metavar="BYTE_MODEL", help="checkpoint folder or exported byte model")
    p.add_argument("--base", required=True, help="the base source: hub id, HF folder, .gguf or built-in")
    p.add_argument("--instruct", required=True, help="the post-trained source (same architecture)")
    p.add_argument("--out", required=True, help="local folder for the exported result")
    p.add_argument("--alpha", type=float, default=1.0, help="scale of the delta (default 1)")
    p.add_argument("--base-revision")
    p.add_argument("--instruct-revision")
    p.add_argument(
        "--retained-embeddings",
        action="store_true",
        help="also add the input-embedding delta to the retained-subword table",
    )
    p.add_argument("--text", help="held-out text: score the result next to the instruct model")
    p.add_argument("--max-bytes", type=int, default=20_000, help="bytes of --text to score")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier byteify export at --out")
    p.set_defaults(func=cmd_transfer)


def cmd_plan(args) -> int:
    from .config import ConfigError
    from .plan import PlanError

    try:
        return _plan(args)
    except (ConfigError, PlanError) as e:  # one line saying what to change (the table is printed first)
        raise CLIError(str(e)) from None


def _plan(args) -> int:
    from .config import get_preset
    from .plan import Hardware, check, markdown, parse_bytes, plan

    preset = get_preset(args.preset, args.set or None)
    hw = Hardware(
        gpus=args.gpus,
        gpu_memory=parse_bytes(args.gpu_memory),
        peak_flops=args.peak_tflops * 1e12,
        utilisation=args.utilisation,
        device=args.device,
    )
    ac = None if args.activation_checkpointing == "preset" else args.activation_checkpointing == "on"
    p = plan(preset, hw, sharding=args.sharding, checkpointing=ac, bytes_per_token=args.bytes_per_token)
    print(json.dumps(p.to_dict(), indent=1) if args.json else markdown(p), flush=True)
    check(p)
    return 0


def _add_plan(sub) -> None:
    p = sub.add_parser("plan", help="memory per GPU and hours per stage of a preset, before renting GPUs")
    p.add_argument("--preset", required=True, help="tiny, smollm2-135m, olmo2-1b, olmo3-7b")
    p.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="preset override, e.g. stage2.micro_batch=1"
    )
    p.add_argument("--gpus", type=int, default=8, help="GPUs in the run (all nodes together)")
    p.add_argument("--gpu-memory", default="80GB", help="memory per GPU, e.g. 80GB, 141GB, 24GiB")
    p.add_argument("--sharding", choices=("auto", "ddp", "fsdp"), default="auto", help="auto: DDP if it fits")
    p.add_argument(
        "--activation-checkpointing",
        choices=("preset", "on", "off"),
        default="preset",
        help="default: the preset's",
    )
    p.add_argument(
        "--peak-tflops", type=float, default=989.4, help="per GPU, compute dtype (H100/H200 bf16: 989)"
    )
    p.add_argument(
        "--utilisation", type=float, default=0.40, help="achieved fraction of the peak, for the hours"
    )
    p.add_argument(
        "--bytes-per-token", type=float, default=4.4, help="text bytes per subword token of the data"
    )
    p.add_argument(
        "--device", choices=("cuda", "cpu"), default="cuda", help="cpu: the CPU rehearsal's kernels"
    )
    p.add_argument("--json", action="store_true", help="print the plan as JSON instead of markdown")
    p.set_defaults(func=cmd_plan)


def cmd_prepare(args) -> int:
    from .config import get_preset
    from .data import TokenBudget, prepare_dataset, read_manifest

    try:
        preset = get_preset(args.preset)
    except ValueError as e:  # config.ConfigError: one line naming the preset
        raise CLIError(str(e)) from None
    if args.max_tokens is not None and args.max_tokens < 1:
        raise CLIError(f"--max-tokens {args.max_tokens}: must be at least 1")
    if args.workers < 1:
        raise CLIError(f"--workers {args.workers}: must be at least 1")
    budget = None if args.all else TokenBudget.for_preset(preset, args.max_tokens, args.validation_bytes)
    uri = prepare_dataset(
        args.sources,
        preset.model.source,
        args.out,
        preset.data,
        workers=args.workers,
        text_column=args.column,
        budget=budget,
    )
    m = read_manifest(uri)
    keys = ("manifest_hash", "splits", "budget", "budget_met", "used", "counts")
    print(json.dumps({"manifest": uri, **{k: m.get(k) for k in keys}}, indent=1))
    return 0


def _add_prepare(sub) -> None:
    p = sub.add_parser(
        "prepare", help="label documents with the preset's tokenizer into byte shards + manifest"
    )
    p.add_argument(
        "sources",
        metavar="SOURCES",
        nargs="+",
        help="files, folders, globs, s3:// URIs (JSONL, Parquet, text), hf:PATH, builtin:wiki (docs/scale.md)",
    )
    p.add_argument("--out", required=True, help="output folder (local path or s3:// URI)")
    p.add_argument("--preset", default="smollm2-135m", help="tokenizer, shard shape and default token budget")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument(
        "--max-tokens",
        type=int,
        help="training tokens to prepare (default: what the preset's stages consume)",
    )
    budget.add_argument("--all", action="store_true", help="prepare every document (no token budget)")
    p.add_argument(
        "--validation-bytes",
        type=int,
        default=0,
        help="also stop only once the validation split has these bytes",
    )
    p.add_argument("--workers", type=int, default=1, help="labelling threads on this machine")
    p.add_argument("--column", default="text", help="text column of JSONL/Parquet/hf inputs")
    p.set_defaults(func=cmd_prepare)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="byteify", description="Byteify a subword LM (Bolmo recipe).")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_eval(sub)
    _add_generate(sub)
    _add_export(sub)
    _add_transfer(sub)
    _add_plan(sub)
    _add_prepare(sub)
    return parser


def _known_errors() -> tuple[type[Exception], ...]:
    """byteify's one-line input errors (a library traceback stays a traceback: it is a bug)."""
    from .checkpoint import CheckpointError
    from .data import DataError
    from .evaluate import EvalError
    from .export import ExportError
    from .generate import GenerationError
    from .global_model import GlobalModelError
    from .load import LoadError
    from .source import SourceError
    from .storage import StorageError
    from .subword import TokenizerError
    from .transfer import TransferError

    return (
        CLIError,
        cute.CuteError,
        CheckpointError,
        DataError,
        EvalError,
        GlobalModelError,
        LoadError,
        SourceError,
        StorageError,
        TokenizerError,
        ExportError,
        GenerationError,
        TransferError,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .source import quiet_progress_bars

    quiet_progress_bars()
    try:
        return args.func(args)
    except _known_errors() as e:
        print(f"byteify {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
