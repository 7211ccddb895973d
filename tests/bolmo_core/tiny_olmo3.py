"""A tiny Olmo 3 source with sliding-window layers (random weights) wrapped as a BolmoModel.

Built like `bolmo_core.source._build_tiny_olmo2`, but with `Olmo3Config(layer_types=...,
sliding_window=WINDOW)`: a window of a few patches, so generation crosses it within a few dozen
bytes. The tokenizer (retained embeddings) is the tiny preset's built-in BPE.
"""

import torch

from bolmo_core.config import get_preset
from bolmo_core.model import BolmoModel
from bolmo_core.source import ATTN_IMPLEMENTATION, load_tokenizer

WINDOW = 4
LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"]


def tiny_olmo3_bolmo(seed: int = 0) -> BolmoModel:
    from transformers import AutoModelForCausalLM, Olmo3Config

    preset = get_preset("tiny")
    tok = load_tokenizer(preset.model.source)
    cfg = Olmo3Config(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=len(LAYER_TYPES),
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        sliding_window=WINDOW,
        layer_types=LAYER_TYPES,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )
    torch.manual_seed(seed)
    src = AutoModelForCausalLM.from_config(cfg, attn_implementation=ATTN_IMPLEMENTATION).eval()
    m = BolmoModel.from_source(preset.model, source_model=src).eval()
    with torch.no_grad():  # open the input gates so the mLSTM states actually matter
        for blk in [*m.local_encoder.blocks, *m.local_decoder.blocks]:
            blk.mlstm.i_gate.bias.fill_(0.0)
    return m
