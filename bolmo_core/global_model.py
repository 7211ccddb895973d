"""Global model adapter (docs/architecture.md §6): the source decoder's transformer blocks, run on patch embeddings.

Works for any HF decoder laid out as `model.model.{embed_tokens, layers, rotary_emb, norm}` +
`model.lm_head` (Llama/SmolLM2, OLMo 2, Olmo 3). The source's own `model.model(...)` forward is
called with `inputs_embeds`, so RoPE, QK-norm, sliding windows, masks and the KV cache are the
source's code, not a re-implementation. The input embedding and the final norm are taken out
of the base model (they belong to the frozen teacher, `TeacherHead`); the global output is the
last block's residual stream, which the decoder's `initial_norm` normalises.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .source import SourceConfig, SourceError, load_source_config

# Architectures of the released sources (docs/architecture.md §6), used when their config cannot be fetched
# (offline): class name in transformers + constructor arguments.
_OLMO_FAMILY = dict(  # what OLMo 2 1B and Olmo 3 7B share: tokenizer, norm, RoPE, untied head
    vocab_size=100278,
    rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
    tie_word_embeddings=False,
    eos_token_id=100257,
    pad_token_id=100277,
)
KNOWN_ARCHITECTURES: dict[str, tuple[str, dict]] = {
    "allenai/OLMo-2-0425-1B": (
        "Olmo2Config",
        dict(_OLMO_FAMILY, hidden_size=2048, num_hidden_layers=16, num_attention_heads=16,
             num_key_value_heads=16, intermediate_size=8192, max_position_embeddings=4096),
    ),
    "allenai/Olmo-3-1025-7B": (
        "Olmo3Config",
        dict(_OLMO_FAMILY, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
             num_key_value_heads=32, intermediate_size=11008, max_position_embeddings=65536,
             sliding_window=4096),
    ),
}  # fmt: skip


class GlobalModelError(ValueError):
    """A source model whose layout the adapter cannot use."""


def source_config(src: SourceConfig):
    """The source's transformers config; falls back to KNOWN_ARCHITECTURES when it can't be fetched.

    A released model in KNOWN_ARCHITECTURES is read from the local cache only: its shapes are
    known, and a plan made offline should not wait ~30 s on the hub client's retries first.
    """
    try:
        return load_source_config(src, local_only=src.name_or_path in KNOWN_ARCHITECTURES)
    except (SourceError, OSError, ValueError) as e:
        if src.name_or_path not in KNOWN_ARCHITECTURES:
            if isinstance(e, SourceError):
                raise
            msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise SourceError(f"source model '{src.name_or_path}': config cannot be loaded ({msg})") from None
    import transformers

    cls_name, kwargs = KNOWN_ARCHITECTURES[src.name_or_path]
    return getattr(transformers, cls_name)(**copy.deepcopy(kwargs))  # the table's dicts stay as written


def build_source_skeleton(src: SourceConfig, device: str | torch.device = "meta"):
    """The source causal LM with uninitialised weights (meta device by default): for shapes and counts."""
    from transformers import AutoModelForCausalLM

    from .source import ATTN_IMPLEMENTATION

    cfg = source_config(src)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(cfg, attn_implementation=ATTN_IMPLEMENTATION)


def _base_of(causal_lm) -> nn.Module:
    base = getattr(causal_lm, "model", None)
    for attr in ("layers", "rotary_emb", "norm", "embed_tokens"):
        if base is None or not hasattr(base, attr):
            raise GlobalModelError(
                f"source model {type(causal_lm).__name__}: expected model.model.{attr} (a Llama/OLMo-style decoder)"
            )
    return base


class TeacherHead(nn.Module):
    """The source's frozen input embedding, final norm and LM head (docs/architecture.md §8.1); blocks are shared."""

    def __init__(self, embed: nn.Embedding, norm: nn.Module, lm_head: nn.Linear | None):
        super().__init__()
        self.embed_tokens, self.norm = embed, norm
        self.lm_head = lm_head  # None: tied to the input embedding (SmolLM2), one tensor in memory

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(ids)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        h = self.norm(hidden)
        return self.lm_head(h) if self.lm_head is not None else F.linear(h, self.embed_tokens.weight)


@contextlib.contextmanager
def _limit_layers(config, n: int | None):
    """Run only the first n blocks: the HF forward loops over layers[: config.num_hidden_layers]."""
    if n is None or n == config.num_hidden_layers:
        yield
        return
    full = config.num_hidden_layers
    config.num_hidden_layers = n
    try:
        yield
    finally:
        config.num_hidden_layers = full


@dataclass
class GlobalOutput:
    hidden: torch.Tensor  # (B, P, d_g): residual stream after the last block run (no final norm)
    hidden_states: tuple | None  # [0] = inputs, [i] = after block i (when requested)
    cache: object | None


class GlobalModel(nn.Module):
    """The source's transformer blocks on patch embeddings (positions = patch indices)."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.model = base

    @classmethod
    def split_source(cls, causal_lm) -> tuple[GlobalModel, TeacherHead]:
        """Take a source causal LM apart: (headless global model, teacher head). Mutates `causal_lm`."""
        base = _base_of(causal_lm)
        embed, norm = base.embed_tokens, base.norm
        lm_head = getattr(causal_lm, "lm_head", None)
        if lm_head is None:
            raise GlobalModelError(f"source model {type(causal_lm).__name__}: no lm_head")
        tied = lm_head.weight is embed.weight
        base.embed_tokens = None  # the forward only touches it when given input_ids
        base.norm = nn.Identity()  # global output = raw residual stream (docs/architecture.md §6)
        return cls(base), TeacherHead(embed, norm, None if tied else lm_head)

    @property
    def config(self):
        return self.model.config

    @property
    def n_layers(self) -> int:
        return self.model.config.num_hidden_layers

    @property
    def d_model(self) -> int:
        return self.model.config.hidden_size

    def new_cache(self):
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        n_layers: int | None = None,
        cache=None,
        use_cache: bool = False,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> GlobalOutput:
        if n_layers is not None and not 1 <= n_layers <= self.n_layers:
            raise GlobalModelError(f"n_layers={n_layers}: the global model has {self.n_layers} blocks")
        if n_layers is not None and n_layers != self.n_layers and (cache is not None or use_cache):
            raise GlobalModelError("n_layers: a partial run cannot use the KV cache")
        dtype = next(self.model.layers.parameters()).dtype
        if not torch.is_autocast_enabled(inputs_embeds.device.type):
            inputs_embeds = inputs_embeds.to(dtype)
        with _limit_layers(self.model.config, n_layers):
            out = self.model(
                inputs_embeds=inputs_embeds,
                cache=cache,
                use_cache=use_cache,
                position_ids=position_ids,
                attention_mask=attention_mask,
                output_hidden_states=output_hidden_states,
            )
        return GlobalOutput(
            out.last_hidden_state,
            out.hidden_states if output_hidden_states else None,
            getattr(out, "cache", None) if use_cache or cache is not None else None,
        )
