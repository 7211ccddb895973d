"""BolmoConfig: a byte-level Bolmo model around the transformer blocks of a source LM (byteify export)."""

from transformers import PretrainedConfig

# Source-config fields mirrored at the top level so they can be read (and checked) without parsing
# `global_config`; the blocks themselves are always rebuilt from `global_config`, the full source config.
MIRRORED = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "rms_norm_eps",
    "rope_parameters",
    "rope_scaling",
    "rope_theta",
    "sliding_window",
    "layer_types",
    "max_position_embeddings",
    "attention_bias",
    "hidden_act",
)


# Bolmo's own fields, named as in the preset (bolmo_core.config), with their defaults.
DEFAULTS = {
    "d_local": None,
    "n_heads": 4,
    "ffn_hidden": 352,
    "n_encoder_layers": 1,
    "n_decoder_layers": 4,
    "qk_dim_factor": 0.5,
    "gate_soft_cap": 15.0,
    "block_norm_eps": 1e-6,
    "norm_eps": 1e-5,
    "boundary_lookahead": 1,
    "boundary_threshold": 0.5,
    "boundary_context": 0,
    "retained_vocab_size": 0,
    "retained_entries": 0,
    "retained_bytes": 0,
    "retained_sep_id": 0,
    "retained_pad_id": 0,
    "retained_fallback_id": 0,
    "vocab_size": 520,
    "byte_vocab_size": 260,
}


class BolmoConfig(PretrainedConfig):
    model_type = "bolmo"

    def __init__(self, global_config=None, **kwargs):
        self.global_config = dict(global_config or {})
        for key, default in DEFAULTS.items():
            setattr(self, key, kwargs.pop(key, default))
        for key in MIRRORED:
            if key in self.global_config and key not in kwargs:
                kwargs[key] = self.global_config[key]
        rope = self.global_config.get("rope_parameters") or {}
        if "rope_theta" not in kwargs and isinstance(rope, dict) and "rope_theta" in rope:
            kwargs["rope_theta"] = rope["rope_theta"]
        kwargs.setdefault("pad_token_id", 0)
        kwargs.setdefault("bos_token_id", 1)
        kwargs.setdefault("eos_token_id", 1)
        kwargs["tie_word_embeddings"] = False
        super().__init__(**kwargs)
