"""Self-contained Bolmo byte LM for transformers (exported by byteify; needs only torch + transformers).

Forward: bytes (+ retained subword ids, looked up here from the table stored in the weights) ->
1-layer mLSTM encoder -> boundary predictor (p_t = (1 - cos(Wq h_t, Wk h_t+1)) / 2 > threshold)
-> the encoder state at each patch's last byte, projected -> the source's own transformer blocks
(rebuilt offline from `config.global_config` with transformers' class for that architecture) ->
RMSNorm'd patch outputs depooled onto bytes -> 4-layer mLSTM decoder -> 520-way fused logits
(byte id + 260 * "this byte closes its patch").

Generation (`generate`): greedy or sampled (temperature, top_k, top_p), batched with per-row patch
bookkeeping: the prompt's boundaries come from the predictor, the last prompt byte's boundary is
decided by the model (forced decoding), later ones from the fused output; the KV cache and the
mLSTM states are carried; rows get masked cache slots when they did not close a patch, so a row's
output does not depend on its batch. For sliding-window sources (Olmo 3) a batch keeps every
cache slot and counts each row's window in its own patch positions (transformers' mask
functions). Not supported: beam search, logits processors, stopping strings.
"""

import functools
import inspect
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from .configuration_bolmo import BolmoConfig

BOS, EOS, OFFSET, FLAG = 1, 1, 4, 260
HOLD_I, HOLD_F, NEG = -1e30, 1e5, -1e5


# ---------------------------------------------------------------------------- mLSTM (fp32 math)


def _segsum(x):
    """(..., T) -> (..., T, T): [t, s] = sum_{s<r<=t} x_r for s <= t, -inf above the diagonal."""
    T = x.shape[-1]
    strict = torch.ones(T, T, dtype=torch.bool, device=x.device).tril(-1)
    out = x.unsqueeze(-1).expand(*x.shape, T).masked_fill(~strict, 0.0).cumsum(-2)
    return out.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=x.device).tril(), -math.inf)


def mlstm_parallel(q, k, v, i, f, eps=1e-6):
    """Stabilised quadratic form from the zero state: (h, final state (C, n, m))."""
    logf = F.logsigmoid(f)
    logD = _segsum(logf) + i.unsqueeze(-2)
    m = torch.maximum(logD.amax(-1), logf.cumsum(-1))
    S = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5) * torch.exp(logD - m.unsqueeze(-1))
    h = (S @ v) / (torch.maximum(S.sum(-1).abs(), torch.exp(-m)) + eps).unsqueeze(-1)
    w = torch.exp(logD[..., -1, :] - m[..., -1:])  # weight of k_s v_s in the final state
    C = (k * w.unsqueeze(-1)).transpose(-2, -1) @ v
    return h, (C, (k * w.unsqueeze(-1)).sum(-2), m[..., -1])


def mlstm_step(q, k, v, i, f, state, eps=1e-6):
    C, n, m = state
    logf = F.logsigmoid(f)
    m_new = torch.maximum(logf + m, i)
    fa, ia = torch.exp(logf + m - m_new), torch.exp(i - m_new)
    C = fa[..., None, None] * C + (ia[..., None] * k).unsqueeze(-1) * v.unsqueeze(-2)
    n = fa[..., None] * n + ia[..., None] * k
    qs = q * (q.shape[-1] ** -0.5)
    h = (qs.unsqueeze(-2) @ C).squeeze(-2) / (torch.maximum((qs * n).sum(-1).abs(), torch.exp(-m_new)) + eps)[
        ..., None
    ]
    return h, (C, n, m_new)


class MLSTMLayer(nn.Module):
    def __init__(self, d, cfg):
        super().__init__()
        self.h, dqk = cfg.n_heads, int(d * cfg.qk_dim_factor)
        self.cap = cfg.gate_soft_cap
        self.q, self.k = nn.Linear(d, dqk, bias=False), nn.Linear(d, dqk, bias=False)
        self.v, self.o_gate = nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False)
        self.i_gate, self.f_gate = nn.Linear(d, self.h), nn.Linear(d, self.h)
        self.head_norm_weight = nn.Parameter(torch.ones(d))
        self.out = nn.Linear(d, d, bias=False)

    def forward(self, x, state=None, hold=None):
        B, L, _ = x.shape
        heads = [t(x).float().view(B, L, self.h, -1).transpose(1, 2) for t in (self.q, self.k, self.v)]
        i, f = (
            (self.cap * torch.tanh(g(x).float() / self.cap)).transpose(1, 2)
            for g in (self.i_gate, self.f_gate)
        )
        if hold is not None:  # the state passes through held positions unchanged
            i = i.masked_fill(hold[:, None, :], HOLD_I)
            f = f.masked_fill(hold[:, None, :], HOLD_F)
        with torch.autocast(x.device.type, enabled=False):
            if state is not None and L == 1:
                h, state = mlstm_step(*(t[:, :, 0] for t in heads), i[:, :, 0], f[:, :, 0], state)
                h = h.unsqueeze(2)
            else:
                h, state = mlstm_parallel(*heads, i, f)
            h = (h - h.mean(-1, keepdim=True)) * torch.rsqrt(h.var(-1, unbiased=False, keepdim=True) + 1e-6)
            h = h.transpose(1, 2).reshape(B, L, -1) * self.head_norm_weight.float()
        return self.out(h.to(x.dtype) * torch.sigmoid(self.o_gate(x))), state


class SwiGLU(nn.Module):
    def __init__(self, d, hidden):
        super().__init__()
        self.gate, self.up = nn.Linear(d, hidden, bias=False), nn.Linear(d, hidden, bias=False)
        self.down = nn.Linear(hidden, d, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class LocalBlock(nn.Module):
    def __init__(self, d, cfg):
        super().__init__()
        self.mlstm_norm, self.mlstm = nn.RMSNorm(d, eps=cfg.block_norm_eps), MLSTMLayer(d, cfg)
        self.ffn_norm, self.ffn = nn.RMSNorm(d, eps=cfg.block_norm_eps), SwiGLU(d, cfg.ffn_hidden)

    def forward(self, x, state=None, hold=None):
        a, state = self.mlstm(self.mlstm_norm(x), state, hold)
        x = x + a
        return x + self.ffn(self.ffn_norm(x)), state


def run_blocks(blocks, x, states=None, hold=None):
    states = states or [None] * len(blocks)
    new = []
    for blk, st in zip(blocks, states):
        x, st = blk(x, st, hold)
        new.append(st)
    return x, new


# ---------------------------------------------------------------------------- components


class LocalEncoder(nn.Module):
    def __init__(self, d, cfg):
        super().__init__()
        self.byte_embedding = nn.Embedding(cfg.byte_vocab_size, d)
        self.retained_embedding = (
            nn.Embedding(cfg.retained_vocab_size, d) if cfg.retained_vocab_size else None
        )
        self.blocks = nn.ModuleList(LocalBlock(d, cfg) for _ in range(cfg.n_encoder_layers))
        self.norm = nn.RMSNorm(d, eps=cfg.norm_eps)

    def forward(self, ids, expanded, state=None, hold=None):
        e = self.byte_embedding(ids)
        if self.retained_embedding is not None:
            e = e + self.retained_embedding(expanded)
        x, state = run_blocks(self.blocks, e, state, hold)
        return self.norm(x), state


class BoundaryPredictor(nn.Module):
    def __init__(self, d, cfg):
        super().__init__()
        self.lookahead, self.log_threshold = cfg.boundary_lookahead, math.log(cfg.boundary_threshold)
        self.q, self.k = nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False)
        self.context = getattr(cfg, "boundary_context", 0)
        # Wider input: h_t + U [h_{t-1}; ...; h_{t-c}] (zeros before the row's start).
        self.widen = nn.Linear(self.context * d, d, bias=False) if self.context else None

    def forward(self, h):
        if self.widen is not None:
            c, L = self.context, h.shape[1]
            past = F.pad(h, (0, 0, c, 0))
            h = h + self.widen(torch.cat([past[:, c - i : c - i + L] for i in range(1, c + 1)], -1))
        q = F.normalize(self.q(h[:, :-1]).float(), dim=-1)
        k = F.normalize(self.k(h[:, 1:]).float(), dim=-1)
        logp = torch.log1p(-(q * k).sum(-1).clamp(max=1 - 1e-3)) - math.log(2.0)
        pad = logp.new_full((h.shape[0], 1), NEG if self.lookahead == 1 else 0.0)
        logp = torch.cat([logp, pad] if self.lookahead == 1 else [pad, logp], 1)
        return torch.cat([logp.new_zeros(h.shape[0], 1), logp[:, 1:]], 1)


class LocalDecoder(nn.Module):
    def __init__(self, d, d_global, cfg):
        super().__init__()
        self.initial_norm = nn.RMSNorm(d_global, eps=cfg.norm_eps)
        self.global_projection = nn.Linear(d_global, d, bias=False) if d != d_global else None
        self.in_projection = nn.Linear(d, d)
        self.blocks = nn.ModuleList(LocalBlock(d, cfg) for _ in range(cfg.n_decoder_layers))

    def project_global(self, g):
        g = self.initial_norm(g)
        return self.global_projection(g) if self.global_projection is not None else g


class LMHead(nn.Module):
    def __init__(self, d, cfg):
        super().__init__()
        self.norm, self.out = nn.RMSNorm(d, eps=cfg.block_norm_eps), nn.Linear(d, cfg.vocab_size, bias=False)

    def forward(self, y):
        return self.out(self.norm(y))


class GlobalModel(nn.Module):
    """The source's transformer blocks, built by transformers from the embedded source config."""

    def __init__(self, global_config: dict):
        super().__init__()
        gc = dict(global_config)
        src = AutoConfig.for_model(gc.pop("model_type"), **{**gc, "vocab_size": 1, "pad_token_id": 0})
        self.model = AutoModel.from_config(src)
        self.model.embed_tokens = None  # patches replace token embeddings
        self.model.norm = nn.Identity()  # the decoder's initial_norm takes over the final norm

    def forward(self, x, cache=None, **kw):
        """(last hidden state, cache); the cache keyword is `cache` in transformers >= 5.2x, else past_key_values."""
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(next(self.model.layers.parameters()).dtype)
        if cache is not None:
            kw[
                "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
            ] = cache
        out = self.model(inputs_embeds=x, **kw)
        return out.last_hidden_state, getattr(out, "cache", None) or getattr(out, "past_key_values", None)


def _pool(h, b, P):
    """Encoder state at each patch's last byte; slots past a row's patch count are masked fillers."""
    B, L, d = h.shape
    idx = (torch.arange(L, device=h.device) + L * (~b).long()).argsort(1)
    if P > L:
        idx = torch.cat([idx, idx[:, -1:].expand(B, P - L)], 1)
    idx = idx[:, :P]
    return h.gather(1, idx[..., None].expand(-1, -1, d)), torch.arange(P, device=h.device) < b.sum(
        1, keepdim=True
    )


def _depool(g, b):
    idx = (b.long().cumsum(1) - 1).clamp(0, g.shape[1] - 1)
    return g.gather(1, idx[..., None].expand(-1, -1, g.shape[-1]))


# ---------------------------------------------------------------------------- the model


class BolmoForCausalLM(PreTrainedModel):
    config_class = BolmoConfig
    base_model_prefix = "bolmo"
    _supports_sdpa = True
    _no_split_modules = ["LocalBlock"]

    def __init__(self, config: BolmoConfig):
        super().__init__(config)
        d_g = config.global_config["hidden_size"]
        d = config.d_local or d_g
        self.local_encoder = LocalEncoder(d, config)
        self.boundary_predictor = BoundaryPredictor(d, config)
        self.out_projection = nn.Linear(d, d_g)
        self.global_model = GlobalModel(config.global_config)
        self.local_decoder = LocalDecoder(d, d_g, config)
        self.lm_head = LMHead(d, config)
        # the retained-subword table: entry ids and their byte strings (concatenated, with offsets)
        self.register_buffer("retained_ids", torch.zeros(config.retained_entries, dtype=torch.long))
        self.register_buffer("retained_offsets", torch.zeros(config.retained_entries + 1, dtype=torch.long))
        self.register_buffer("retained_bytes", torch.zeros(config.retained_bytes, dtype=torch.uint8))
        self._trie = None
        self.post_init()

    # ---- retained ids: longest table entry that is a suffix of the bytes so far (reverse trie)

    def _build_trie(self):
        ids, off = self.retained_ids.tolist(), self.retained_offsets.tolist()
        data = bytes(self.retained_bytes.cpu().numpy().tobytes())
        root = {}
        for j, tid in enumerate(ids):
            node = root
            for c in reversed(data[off[j] : off[j + 1]]):
                node = node.setdefault(c, {})
            node.setdefault(-1, tid)
        self._trie = root

    def _retained_at(self, seq, t):
        """Retained id of position t of a list of byte ids (specials stop the walk)."""
        x = seq[t]
        if x < OFFSET:
            return self.config.retained_sep_id if x == BOS else self.config.retained_pad_id
        node, best = self._trie, self.config.retained_fallback_id
        while t >= 0 and seq[t] >= OFFSET:
            node = node.get(seq[t] - OFFSET)
            if node is None:
                break
            best = node.get(-1, best)
            t -= 1
        return best

    def expand(self, input_ids):
        """(B, L) byte ids -> (B, L) retained ids, or None without a retained table."""
        if self.local_encoder.retained_embedding is None:
            return None
        if self._trie is None:
            self._build_trie()
        rows = [[v - FLAG if v >= FLAG else v for v in r] for r in input_ids.tolist()]
        return torch.tensor(
            [[self._retained_at(r, t) for t in range(len(r))] for r in rows], device=input_ids.device
        )

    # ---- forward

    def forward(self, input_ids, attention_mask=None, boundary_mask=None, labels=None, **kwargs):
        """Fused logits (B, L, 520) for right-padded byte ids ([BOS] first); boundaries predicted unless given."""
        valid = (
            torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        )
        h, _ = self.local_encoder(input_ids, self.expand(input_ids), hold=~valid)
        b = (
            (self.boundary_predictor(h) > self.boundary_predictor.log_threshold)
            if boundary_mask is None
            else boundary_mask.bool()
        )
        b = b & valid
        P = max(1, int(b.sum(1).max()))
        reps, pmask = _pool(h, b, P)
        G, _ = self.global_model(self.out_projection(reps), attention_mask=pmask.long())
        z = self.local_decoder.in_projection(h) + _depool(self.local_decoder.project_global(G), b)
        y, _ = run_blocks(self.local_decoder.blocks, z, None, ~valid)
        logits = self.lm_head(y)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
            )
        return CausalLMOutput(loss=loss, logits=logits)

    # ---- generation

    def _sample(self, logits, do_sample, temperature, top_k, top_p):
        if not do_sample:
            return logits.argmax(-1)
        x = logits / max(temperature, 1e-5)
        if top_k:
            x = x.masked_fill(x < x.topk(min(top_k, x.shape[-1]), -1).values[:, -1:], -math.inf)
        if top_p is not None and top_p < 1.0:
            s, o = x.sort(-1, descending=True)
            p = s.softmax(-1)
            drop = p.cumsum(-1) - p >= top_p
            x = x.masked_fill(drop.scatter(-1, o, drop), -math.inf)
        return torch.multinomial(x.softmax(-1), 1).squeeze(-1)

    @torch.no_grad()
    def generate(
        self,
        input_ids,
        attention_mask=None,
        max_new_tokens=64,
        do_sample=False,
        temperature=1.0,
        top_k=None,
        top_p=None,
        eos_token_id=EOS,
        pad_token_id=0,
        **kwargs,
    ):
        """input_ids (B, L) [BOS]+bytes (left or right padded) -> (B, L + n) with new bytes (pad after EOS).

        max_new_tokens counts generated bytes. Greedy unless do_sample.
        """
        dev = input_ids.device
        mask = (
            torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        )
        prompts = [[v for v, m in zip(r, mr) if m] for r, mr in zip(input_ids.tolist(), mask.tolist())]
        sample = functools.partial(
            self._sample, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p
        )
        outs = self._generate_rows(prompts, max_new_tokens, sample, eos_token_id)
        n = max([len(o) for o in outs] + [0])
        new = torch.full((len(outs), n), pad_token_id, dtype=input_ids.dtype, device=dev)
        for r, o in enumerate(outs):
            new[r, : len(o)] = torch.tensor(o, dtype=input_ids.dtype)
        return torch.cat([input_ids, new], 1)

    def _generate_rows(self, prompts, max_new, sample, eos_id):
        """Byte ids per prompt: forced choice of the last prompt byte's flag, then one byte per active
        row per step (encoder step -> global step for the rows that closed a patch -> decoder step)."""
        dev = self.lm_head.out.weight.device
        st, logits = self._prefill([p if p and p[0] == BOS else [BOS, *p] for p in prompts])
        allowed = torch.zeros(logits.shape[-1], dtype=torch.bool, device=dev)
        allowed[OFFSET:FLAG] = allowed[FLAG + OFFSET :] = True
        if eos_id is not None:
            allowed[eos_id] = allowed[eos_id + FLAG] = True
        lg = logits.masked_fill(~allowed, -math.inf)
        ar, fid = torch.arange(lg.shape[0], device=dev), st["last_byte"]
        pair = torch.full_like(lg, -math.inf)
        pair[ar, fid], pair[ar, fid + FLAG] = lg[ar, fid], lg[ar, fid + FLAG]
        chosen = sample(torch.where(st["forced"][:, None], pair, lg))
        outs, hist = [[] for _ in prompts], st["seqs"]
        active = torch.full((len(prompts),), max_new > 0, dtype=torch.bool, device=dev)
        emit, need_enc = ~st["forced"], ~st["forced"]
        while True:
            for r in emit.nonzero().flatten().tolist():  # record freshly sampled bytes
                v = int(chosen[r]) % FLAG
                outs[r].append(v)
                hist[r].append(v)
                if v == eos_id or len(outs[r]) >= max_new:
                    active[r] = False
            if not bool(active.any()):
                break
            self._encoder_step(st, chosen % FLAG, hist, active & need_enc)
            need_enc = torch.ones_like(need_enc)
            close = active & (chosen >= FLAG)
            if bool(close.any()):
                self._global_step(st, close)
            lg = self._decoder_step(st, active).masked_fill(~allowed, -math.inf)
            chosen = torch.where(active, sample(lg), chosen)
            emit = active.clone()
        return [[v for v in o if v != eos_id] for o in outs]

    def _prefill(self, seqs):
        """Encoder, predictor, global model and decoder over [BOS]+prompt, one byte short of each row's end
        (the last byte's boundary is the model's first choice) -> (generation state, logits (B, 520))."""
        dev = self.lm_head.out.weight.device
        enc, dec, bp = self.local_encoder, self.local_decoder, self.boundary_predictor
        B = len(seqs)
        lens = torch.tensor([len(s) for s in seqs], device=dev)
        ids = torch.zeros(B, int(lens.max()), dtype=torch.long, device=dev)
        for r, s in enumerate(seqs):
            ids[r, : len(s)] = torch.tensor(s, device=dev)
        pos, ar = torch.arange(ids.shape[1], device=dev), torch.arange(B, device=dev)
        h, enc_state = enc(ids, self.expand(ids), hold=pos >= lens[:, None])
        pre = (lens - 1).clamp(min=1)
        in_pre = pos < pre[:, None]
        b = (bp(h) > bp.log_threshold) & in_pre
        b[:, 0] = True
        count = b.sum(1)
        reps, pmask = _pool(h, b, int(count.max()))
        window = sliding_window(self.global_model.model.config) if B > 1 else None
        st = dict(window=window, cache=row_window_cache() if window else None, attn=pmask.long())
        G = self._global(st, self.out_projection(reps), torch.arange(reps.shape[1], device=dev).expand(B, -1))
        gp = dec.project_global(G)
        y, dec_state = run_blocks(dec.blocks, dec.in_projection(h) + _depool(gp, b), None, ~in_pre)
        st.update(
            seqs=[list(s) for s in seqs],
            forced=lens >= 2,
            last_byte=ids[ar, lens - 1],
            enc_state=enc_state,
            dec_state=dec_state,
            h_cur=h[ar, lens - 1],
            last=gp[ar, count - 1],
            n_patch=count.clone(),
        )
        return st, self.lm_head(y[ar, pre - 1]).float()

    def _encoder_step(self, st, x, hist, run):
        exp = None
        if self.local_encoder.retained_embedding is not None:
            exp = torch.tensor([self._retained_at(hh, len(hh) - 1) for hh in hist], device=x.device)[:, None]
        he, st["enc_state"] = self.local_encoder(x[:, None], exp, st["enc_state"], hold=~run[:, None])
        st["h_cur"] = torch.where(run[:, None], he[:, 0], st["h_cur"])

    def _global_step(self, st, close):
        """One global position for the rows that closed a patch; masked cache slots elsewhere."""
        st["attn"] = torch.cat([st["attn"], close.long()[:, None]], 1)
        g = self._global(st, self.out_projection(st["h_cur"])[:, None], st["n_patch"][:, None])
        st["last"] = torch.where(close[:, None], self.local_decoder.project_global(g)[:, 0], st["last"])
        st["n_patch"] = st["n_patch"] + close.long()

    def _decoder_step(self, st, active):
        dec = self.local_decoder
        z = (dec.in_projection(st["h_cur"]) + st["last"])[:, None]
        yd, st["dec_state"] = run_blocks(dec.blocks, z, st["dec_state"], ~active[:, None])
        return self.lm_head(yd[:, 0]).float()

    def _global(self, st, x, position_ids):
        mask = st["attn"]
        if st["window"]:
            mask = row_window_masks(
                self.global_model.model.config, x, mask, st["cache"], position_ids, st["window"]
            )
        g, st["cache"] = self.global_model(
            x, cache=st["cache"], attention_mask=mask, use_cache=True, position_ids=position_ids
        )
        return g


# ---------------------------------------------------------------------------- sliding windows in a batch


def sliding_window(config):
    """The attention window of a source with sliding-window layers (Olmo 3), else None."""
    types = getattr(config, "layer_types", None) or ()
    window = getattr(config, "sliding_window", None)
    if not window or getattr(config, "use_sliding_window", True) is False:
        return None
    if types and "sliding_attention" not in types:
        return None
    unknown = set(types) - {"sliding_attention", "full_attention"}
    if unknown:
        raise ValueError(f"global model: layer types {sorted(unknown)} are not supported in generation")
    return int(window)


def row_window_cache():
    """A KV cache that keeps every slot in every layer. transformers' sliding-window cache layers keep
    the last window-1 SLOTS; in a batch, the masked slots of the other rows' global steps would push
    a row's own patches out of it. The window is applied by `row_window_masks` instead (so past the
    window, the sliding layers' cache grows like a full layer's)."""
    from transformers import DynamicCache

    return DynamicCache()  # no config: every layer a plain DynamicLayer


def row_window_masks(config, x, attn, cache, position_ids, window):
    """Attention masks for a batch of rows at different patch positions, on a sliding-window source.

    transformers' sliding mask counts cache slots (kv_idx > q_idx - window); here the window is
    counted in each row's OWN patch positions (slot -> position = running count of the row's real
    slots) and applied to transformers' own causal + padding mask as a 4-D mask (which the model
    uses as given), so a row sees exactly the patches it would see alone. A masked slot repeats
    the row's previous position, so its query still sees the row's newest patch (never an empty
    row, whose softmax would be NaN). Full-attention layers get the causal + padding mask as is.
    (transformers' `and_mask_function` would express the same, but is vmapped: ~50x slower per step.)
    This file is self-contained (it ships with an export), so byteify's own generation engine
    imports these two functions from here rather than keeping a second copy.
    """
    from transformers.masking_utils import create_causal_mask

    full = create_causal_mask(
        config=config,
        inputs_embeds=x,
        attention_mask=attn,
        cache=cache,
        position_ids=position_ids,
        allow_is_causal_skip=False,
    )
    if not isinstance(full, torch.Tensor) or full.dim() != 4 or full.shape[-1] != attn.shape[1]:
        raise ValueError(
            f"attention '{config._attn_implementation}' has no 4-D mask for batched sliding windows"
        )
    pos = attn.cumsum(1) - 1  # (B, S): every cache slot's position in its own row
    q_pos = pos[:, -x.shape[1] :]  # the queries are the newest slots
    in_window = pos[:, None, None, :] > q_pos[:, None, :, None] - window  # (B, 1, q, S)
    if full.dtype == torch.bool:  # sdpa: True attends
        sliding = full & in_window
    else:  # eager: an additive float mask
        sliding = full.masked_fill(~in_window, torch.finfo(full.dtype).min)
    if not getattr(config, "layer_types", None):
        return sliding  # one window for every layer (a Mistral-style config)
    return {"full_attention": full, "sliding_attention": sliding}
