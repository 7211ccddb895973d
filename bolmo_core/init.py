"""Initialisation of the local parts from the source model (docs/architecture.md §2.3).

Retained table <- the teacher's input embeddings; byte embedding <- N(mean_T, std_T) per
dimension; out_projection rescaled so patch representations of random bytes (each its own
patch) get the teacher embeddings' per-dimension mean and std. The scale is applied on the
OUTPUT axis of the projection (the reference broadcasts it over the input axis, which is only
harmless when d_l = d_g; docs/architecture.md §14.9). W_q = W_k = I; input-gate biases -10; head N(0, 0.02).
"""

from __future__ import annotations

import torch
from torch import nn

from .byte_tokenizer import OFFSET
from .local_blocks import MLSTMLayer

N_RANDOM_BYTES = 8192


@torch.no_grad()
def init_from_source(model, vocab=None, n_random: int = N_RANDOM_BYTES, seed: int = 0) -> None:
    """Initialise `model` (a BolmoModel built around its source) in place."""
    gen = torch.Generator().manual_seed(seed)
    emb_t = model.teacher.embed_tokens.weight.detach().float()
    enc = model.local_encoder
    if enc.retained_embedding is not None:
        n = enc.retained_embedding.weight.shape[0]
        _fit_width(enc.retained_embedding.weight, emb_t[:n])
    mean_t, std_t = emb_t.mean(0), emb_t.std(0)
    d_l = enc.byte_embedding.weight.shape[1]
    noise = torch.randn(enc.byte_embedding.weight.shape, generator=gen)
    enc.byte_embedding.weight.copy_((noise * std_t[:d_l] + mean_t[:d_l]).to(enc.byte_embedding.weight))

    for m in model.modules():
        if isinstance(m, MLSTMLayer):
            m.i_gate.bias.fill_(model.cfg.local.igate_bias_init)
    model.boundary_predictor.reset_identity()
    nn.init.normal_(model.lm_head.out.weight, std=0.02, generator=gen)
    rescale_out_projection(model, vocab, mean_t, std_t, n_random, gen)


def _fit_width(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Copy src into dst; a narrower local width keeps the first d_l channels."""
    dst.copy_(src[:, : dst.shape[1]].to(dst))


@torch.no_grad()
def rescale_out_projection(model, vocab, mean_t, std_t, n_random: int, gen: torch.Generator) -> None:
    """Match per-dim mean/std of out_projection(h_byte) on random single-byte patches to the teacher's."""
    dev = model.out_projection.weight.device
    ids = torch.randint(OFFSET, OFFSET + 256, (1, n_random), generator=gen)
    expanded = None
    if model.local_encoder.retained_embedding is not None:
        if vocab is None:
            raise ValueError("init_from_source: retained embeddings need the source vocabulary (vocab=None)")
        from .subword import RetainedIndex

        expanded = RetainedIndex(vocab).expand(ids).to(dev)
    was_training = model.training
    model.eval()
    h, _ = model.local_encoder(ids.to(dev), expanded)
    model.train(was_training)
    p = model.out_projection(h[0].float())  # every byte its own patch
    mean_h, std_h = p.mean(0), p.std(0).clamp(min=1e-8)
    scale = std_t.to(dev) / std_h
    proj = model.out_projection
    proj.weight.mul_(scale.unsqueeze(1).to(proj.weight))  # rows = output channels
    proj.bias.copy_((mean_t.to(dev) - mean_h * scale).to(proj.bias) + scale.to(proj.bias) * proj.bias)
