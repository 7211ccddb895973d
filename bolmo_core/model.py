"""BolmoModel (docs/architecture.md §2-§9, Appendix B): encoder -> boundaries -> pooling -> global -> depooling -> decoder -> head.

Stage 1 (`stage1_loss`, docs/architecture.md §8): teacher-forced subword boundaries; frozen global blocks shared
with the frozen teacher (one copy); the decoder reads the teacher's final hidden states at each
patch (oracle); losses 4 x L2 at global layer `encoder_loss_layer` + CE + binarised-KL patch
distillation + 4 x boundary BCE. Stage 2 (`stage2_loss`, docs/architecture.md §9): predicted boundaries, the
global model runs on the student's patches, CE + 4 x BCE.

Stage-1 options beyond the paper (issue 13; defaults off): `LossConfig.byte_kl` adds the KL from
the teacher's exact byte-level targets to the student's fused distribution at every byte
(`byte_targets.py`; computed in the teacher's one chunked pass over its logits), and
`LossConfig.boundary_soft` mixes the teacher's "the token ends with this byte" mass into the
boundary BCE target (docs/training.md, "Byte-level targets").

Normalisation (docs/architecture.md §8.5): every term here is a mean over its valid elements in the batch it
is given (CE: valid label bytes; distillation and encoder L2: valid patches; BCE: valid label
bytes). The reference multiplies CE by (padded byte slots / valid bytes) and the distillation
term by L / ((P-1) * valid bytes) -- both ~1.36x at 4.4 bytes per patch and dependent on how much
padding a batch has. We do not: with the same `LossConfig` weights our CE and distillation
terms are ~1/1.36 of the reference's on typical windows; scale `ce`/`distill` up to match its
loss scale exactly. With gradient accumulation the trainer should weight micro-batch losses
by their valid-element counts if it wants exact per-element means over the whole batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import byte_targets, losses
from .boundary_predictor import BoundaryPredictor
from .byte_tokenizer import BOS, FUSED_OFFSET, FUSED_VOCAB, OFFSET
from .config import LossConfig, ModelConfig, StageConfig
from .global_model import GlobalModel, GlobalModelError
from .lm_head import LMHead
from .local_decoder import LocalDecoder
from .local_encoder import LocalEncoder
from .pooling import boundaries_from_patch_lens, depool, patch_ids, pool

WHITESPACE_BYTES = (
    ord(" "),
    ord("\t"),
    ord("\n"),
)  # student side of the debiasing (docs/architecture.md §8.4)
BATCH_KEYS = ("input_ids", "expanded_ids", "patch_lens", "teacher_ids", "byte_mask", "patch_mask")


class BatchError(ValueError):
    """A training batch that does not follow the contract in docs/internals.md."""


@dataclass
class BolmoOutput:
    logits: torch.Tensor  # (B, L, 520) fused next-byte + boundary-flag logits
    boundary_logp: torch.Tensor  # (B, L) predictor log p_t
    boundary_mask: torch.Tensor  # (B, L) bool, the boundaries used for pooling
    patch_reps: torch.Tensor  # (B, P, d_g) global-model inputs
    patch_mask: torch.Tensor  # (B, P) bool, real (non-filler) patch slots
    overflow: torch.Tensor  # (B,) bool, rows with more boundaries than patch slots
    global_hidden: torch.Tensor  # (B, P, d_g) global output (before the decoder's norm)


class BolmoModel(nn.Module):
    def __init__(self, cfg: ModelConfig, source_lm, vocab=None):
        super().__init__()
        self.cfg = cfg
        self.global_model, self.teacher = GlobalModel.split_source(source_lm)
        self.teacher.requires_grad_(False)
        d_g = self.global_model.d_model
        d_l = cfg.local.d_local or d_g
        if d_l > d_g:
            raise GlobalModelError(f"local width {d_l} is larger than the global width {d_g}")
        if not 1 <= cfg.encoder_loss_layer <= self.global_model.n_layers:
            raise GlobalModelError(
                f"encoder_loss_layer={cfg.encoder_loss_layer}: the global model has {self.global_model.n_layers} blocks"
            )
        self.d_local, self.d_global = d_l, d_g
        n_src = self.teacher.embed_tokens.weight.shape[0]
        if vocab is not None and vocab.vocab_size > n_src:
            raise GlobalModelError(
                f"source tokenizer has {vocab.vocab_size} ids but the embedding only {n_src} rows"
            )
        retained = (vocab.vocab_size if vocab is not None else n_src) if cfg.retained_embeddings else None
        self.local_encoder = LocalEncoder(d_l, cfg.local, retained)
        self.boundary_predictor = BoundaryPredictor(
            d_l, cfg.boundary_lookahead, cfg.boundary_threshold, cfg.boundary_context
        )
        self.out_projection = nn.Linear(
            d_l, d_g, bias=True
        )  # patch reps -> global inputs (docs/architecture.md §3.1)
        self.local_decoder = LocalDecoder(d_l, d_g, cfg.local)
        self.lm_head = LMHead(d_l, cfg.local.block_norm_eps)
        ws = torch.zeros(n_src, dtype=torch.bool)
        if vocab is not None:
            m = torch.as_tensor(vocab.whitespace_start_mask, dtype=torch.bool)
            ws[: min(len(m), n_src)] = m[:n_src]
        # non-persistent: derived from the source tokenizer, not a trained weight
        self.register_buffer("whitespace_mask", ws, persistent=False)
        self.has_vocab = vocab is not None
        self.vocab = vocab  # the source vocabulary (byte-level targets), not a module
        self.register_buffer(
            "whitespace_byte_ids", torch.tensor([b + OFFSET for b in WHITESPACE_BYTES]), persistent=False
        )

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_source(
        cls, model_cfg: ModelConfig, source_model=None, init: bool = True, vocab=None
    ) -> BolmoModel:
        """Build around a source LM (loaded from `model_cfg.source` when not given); `init` runs docs/architecture.md §2.3."""
        from .source import load_source_model, load_tokenizer

        if vocab is None and (source_model is None or init):
            from .subword import SubwordVocab

            vocab = SubwordVocab.from_tokenizer(load_tokenizer(model_cfg.source))
        if source_model is None:
            source_model = load_source_model(model_cfg.source)
        model = cls(model_cfg, source_model, vocab)
        if init:
            from .init import init_from_source

            init_from_source(model, vocab)
        return model

    def num_params(self, include_teacher: bool = False) -> int:
        """Parameter count; the teacher's embedding/norm/head are excluded by default (docs/architecture.md §6 totals)."""
        skip = set() if include_teacher else {id(p) for p in self.teacher.parameters()}
        return sum(p.numel() for p in self.parameters() if id(p) not in skip)

    # ------------------------------------------------------------------ components

    def encode(self, input_ids, expanded_ids=None, state=None, reset=None, hold=None):
        """Bytes -> (h_byte (B, L, d_l), boundary log p (B, L), encoder state)."""
        h, state = self.local_encoder(input_ids, expanded_ids, state, reset, hold)
        return h, self.boundary_predictor(h), state

    def patches(self, h_byte, boundary, n_patches: int):
        """Pool at boundaries and project: (reps (B, P, d_g), patch_mask, overflow, slot byte positions)."""
        reps, patch_mask, overflow, idx = pool(h_byte, boundary, n_patches)
        return self.out_projection(reps), patch_mask, overflow, idx

    def decode(self, h_byte, global_hidden, boundary, state=None, reset=None, hold=None):
        """h_byte + depooled normalised global output -> (fused logits (B, L, 520), decoder state)."""
        g = depool(self.local_decoder.project_global(global_hidden), boundary)
        y, state = self.local_decoder(h_byte, g, state, reset, hold)
        return self.lm_head(y), state

    def forward(
        self, input_ids, expanded_ids=None, boundary_mask=None, byte_mask=None, n_patches: int | None = None
    ) -> BolmoOutput:
        """Full forward; boundaries predicted unless given; P = max boundary count unless given."""
        h, logp, _ = self.encode(input_ids, expanded_ids)
        b = self.boundary_predictor.decide(logp) if boundary_mask is None else boundary_mask.bool()
        if byte_mask is not None:
            b = b & byte_mask.bool()
        P = int(n_patches) if n_patches is not None else max(1, int(b.sum(1).max()))
        reps, patch_mask, overflow, _ = self.patches(h, b, P)
        G = self.global_model(reps).hidden
        logits, _ = self.decode(h, G, b)
        return BolmoOutput(logits, logp, b, reps, patch_mask, overflow, G)

    # ------------------------------------------------------------------ targets

    @staticmethod
    def fused_labels(input_ids, boundary, byte_mask):
        """label_t = x_{t+1} + 260 * b_{t+1} where t and t+1 are valid bytes (docs/architecture.md §7.2)."""
        nxt = input_ids[:, 1:] + FUSED_OFFSET * boundary[:, 1:].long()
        valid = byte_mask[:, :-1] & byte_mask[:, 1:]
        labels = F.pad(nxt.masked_fill(~valid, 0), (0, 1))
        return labels, F.pad(valid, (0, 1), value=False)

    def boundary_targets(self, input_ids, boundary, byte_mask):
        """BCE labels and mask (docs/architecture.md §4.3): EOS joins the patch before it; no label without a future byte."""
        next_is_eos = F.pad((input_ids[:, 1:] == BOS) & byte_mask[:, 1:], (0, 1), value=False)
        labels = boundary & ~next_is_eos
        labels[:, 0] = True
        mask = byte_mask.clone()
        if self.cfg.boundary_lookahead == 1:
            mask = mask & F.pad(byte_mask[:, 1:], (0, 1), value=False)
        return labels, mask

    # ------------------------------------------------------------------ losses

    def _check_batch(self, batch: dict) -> None:
        for key in BATCH_KEYS:
            if key not in batch:
                raise BatchError(f"batch: missing '{key}' (see docs/internals.md)")
        B, L = batch["input_ids"].shape
        for key in ("expanded_ids", "byte_mask"):
            if tuple(batch[key].shape) != (B, L):
                raise BatchError(f"batch['{key}']: shape {tuple(batch[key].shape)}, expected {(B, L)}")
        P = batch["patch_lens"].shape[1]
        for key in ("teacher_ids", "patch_mask"):
            if tuple(batch[key].shape) != (B, P):
                raise BatchError(f"batch['{key}']: shape {tuple(batch[key].shape)}, expected {(B, P)}")

    def _boundary_metrics(self, logp, labels, mask, used, byte_mask, overflow) -> dict:
        with torch.no_grad():
            pred = self.boundary_predictor.decide(logp) & mask
            lab = labels & mask
            tp = (pred & lab).sum().float()
            n = mask.sum().clamp(min=1).float()
            return {
                "boundary_acc": float(((pred == lab) & mask).sum() / n),
                "boundary_precision": float(tp / pred.sum().clamp(min=1)),
                "boundary_recall": float(tp / lab.sum().clamp(min=1)),
                "boundary_rate_pred": float(pred.sum() / n),
                "boundary_rate_label": float(lab.sum() / n),
                "overflow_frac": float(overflow.float().mean()),
                "bytes_per_patch": float(byte_mask.sum() / (used & byte_mask).sum().clamp(min=1)),
            }

    # Long on purpose: one loss formula, its terms in docs/architecture.md §8's order (encoder L2,
    # fused CE, distillation, byte KL, boundary BCE), each sharing the teacher pass and the patches;
    # split up, the intermediates would travel between helpers as a dozen arguments.
    def stage1_loss(self, batch: dict, loss_cfg: LossConfig | None = None):
        """Stage 1 (docs/architecture.md §8): (loss, metrics) with teacher-forced boundaries and oracle
        global states. Every term and its weight stand here, in the order of §8.4."""
        w = loss_cfg or LossConfig()
        self._check_batch(batch)
        ids, exp, patch_lens, teacher_ids = (
            batch[k] for k in ("input_ids", "expanded_ids", "patch_lens", "teacher_ids")
        )
        byte_mask, patch_mask = batch["byte_mask"].bool(), batch["patch_mask"].bool()
        b = boundaries_from_patch_lens(patch_lens, ids.shape[1]) & byte_mask

        # The teacher: frozen blocks on [sep, tok_0, ..., tok_{P-2}] (docs/architecture.md §8.3).
        with torch.no_grad():
            t_out = self.global_model(self.teacher.embed(teacher_ids), output_hidden_states=w.encoder > 0)
        h, logp, _ = self.encode(ids, exp)
        reps, _, overflow, ends = self.patches(h, b, patch_lens.shape[1])
        total, metrics = logp.new_zeros(()), {}

        def add(name: str, weight: float, term: torch.Tensor) -> None:
            nonlocal total
            total = total + weight * term
            metrics[name] = float(term.detach())

        if w.encoder > 0:  # student patches through the first k frozen blocks; grads reach the encoder
            k = self.cfg.encoder_loss_layer
            s_k = self.global_model(reps, n_layers=k).hidden
            add("loss_encoder", w.encoder, losses.encoder_l2(s_k, t_out.hidden_states[k], patch_mask))
        logits, _ = self.decode(h, t_out.hidden, b)  # oracle: teacher position k <-> patch k
        labels, ce_mask = self.fused_labels(ids, b, byte_mask)
        add("loss_ce", w.ce, losses.fused_ce(logits, labels, ce_mask))

        y_t, ws_t, q, q_mask = self._teacher_targets(batch, w, t_out.hidden, ends, ce_mask)
        if q_mask is not None:
            metrics["byte_target_frac"] = float(q_mask.sum() / ce_mask.sum().clamp(min=1))
        logp_s = logits.float().log_softmax(-1) if w.distill > 0 or w.byte_kl > 0 else None
        if w.distill > 0:
            dist = self._distill(logp_s, labels, ce_mask, b, ends, y_t, ws_t, patch_lens, patch_mask, w)
            add("loss_distill", w.distill, dist)
        if w.byte_kl > 0:
            add("loss_byte_kl", w.byte_kl, losses.byte_kl(q, logp_s, q_mask))

        b_lab, b_mask = self.boundary_targets(ids, b, byte_mask)
        target = b_lab if w.boundary_soft <= 0 else self._soft_boundary_labels(ids, b_lab, q, q_mask, w)
        add("loss_boundary", w.boundary, losses.boundary_bce(logp, target, b_mask))
        metrics.update(self._boundary_metrics(logp, b_lab, b_mask, b, byte_mask, overflow))
        metrics["loss"] = float(total.detach())
        return total, metrics

    def _teacher_targets(self, batch: dict, w: LossConfig, t_final, ends, ce_mask):
        """What the teacher's softmax gives the byte-level terms: (y_t, ws_t) for the binarised
        distillation and (q, q_mask) the dense byte targets; None where no term asks for them."""
        dense = w.byte_kl > 0 or w.boundary_soft > 0
        if (dense or (w.distill > 0 and w.whitespace_debias)) and not self.has_vocab:
            raise GlobalModelError(
                "whitespace debiasing and byte-level targets need the source vocabulary (build with from_source)"
            )
        if not (w.distill > 0 or dense):
            return None, None, None, None
        tokens = byte_targets.patch_tokens(self.target_table, batch) if dense else None
        debias = w.whitespace_debias and w.distill > 0
        y_t, ws_t, tp = self._teacher_token_logp(t_final, batch["teacher_ids"], debias, tokens)
        q, q_mask = self._dense_targets(tp, ends, ce_mask) if dense else (None, None)
        return y_t, ws_t, q, q_mask

    @property
    def target_table(self) -> byte_targets.TargetTable:
        """The sorted-vocabulary table of the byte-level targets (built once per vocabulary)."""
        return byte_targets.table_for(self.vocab)

    def _dense_targets(self, tp: byte_targets.TeacherPass, ends, ce_mask):
        """Targets at their byte positions: (B, L, 520) float32 and (B, L) bool (byte_targets.py rules).

        Teacher row (b, k) holds patch k+1's targets; byte j of that patch sits at end(patch k) + j.
        """
        B, L = ce_mask.shape
        P = ends.shape[1]
        b_idx = torch.div(tp.row, P, rounding_mode="floor")
        t = ends.flatten()[tp.row] + tp.j
        q = torch.zeros(B, L, FUSED_VOCAB, device=ce_mask.device)
        q[b_idx, t] = tp.probs
        mask = torch.zeros_like(ce_mask)
        mask[b_idx, t] = tp.mass >= byte_targets.MIN_PREFIX_MASS
        return q, mask & ce_mask

    def _soft_boundary_labels(self, ids, hard, q, q_mask, w: LossConfig):
        """(1-a) x subword ends + a x the teacher's mass on "the token ends with this byte" (byte_targets.py).

        Byte t's soft label comes from the target at t-1, restricted to the byte that came:
        q(x_t + 260) / (q(x_t) + q(x_t + 260)). Bytes without a target, BOS and the byte before a
        separator (which joins the patch before it, `boundary_targets`) keep the hard label.
        """
        x = ids[:, 1:].clamp(min=0)
        qn = q[:, :-1]
        ends = qn.gather(-1, (x + FUSED_OFFSET).unsqueeze(-1)).squeeze(-1)
        goes_on = qn.gather(-1, x.unsqueeze(-1)).squeeze(-1)
        has = q_mask[:, :-1] & (ends + goes_on > 0) & ~F.pad(ids[:, 2:] == BOS, (0, 1), value=False)
        soft = ends / (ends + goes_on).clamp(min=1e-30)
        mixed = hard.float().clone()
        mixed[:, 1:] = torch.where(
            has, (1 - w.boundary_soft) * mixed[:, 1:] + w.boundary_soft * soft, mixed[:, 1:]
        )
        return mixed

    def _distill(self, logp_s, labels, ce_mask, b, ends, y_t, ws_t, patch_lens, patch_mask, w):
        """Binarised KL between teacher token and student patch log-likelihoods (docs/architecture.md §8.4), patches 1..P-1."""
        B, L = labels.shape
        P = patch_lens.shape[1]
        tok = logp_s.gather(-1, labels.unsqueeze(-1)).squeeze(-1).masked_fill(~ce_mask, 0.0)
        # label_t belongs to the patch of byte t+1; bytes past the last patch go to a spare column
        target = F.pad(patch_ids(b)[:, 1:], (0, 1), value=P).clamp(max=P)
        y_s = logp_s.new_zeros(B, P + 1).scatter_add_(1, target, tok)[:, 1:P]
        if w.whitespace_debias:  # both sides: log p(the next unit after patch k starts with whitespace)
            y_t = y_t + ws_t[:, 1:]
            ws_s = logp_s[..., self.whitespace_byte_ids].logsumexp(-1)  # (B, L)
            y_s = y_s + ws_s.gather(1, ends[:, 1:])
        mask = patch_mask[:, 1:] & (patch_lens[:, 1:] > 0)
        return losses.binarised_kl(y_t, y_s, mask, w.distill_tau)

    @torch.no_grad()
    def _teacher_token_logp(self, t_final, teacher_ids, debias: bool, byte_tokens=None, chunk: int = 512):
        """Teacher log p(token k | < k) for k = 1..P-1, log p(next starts with whitespace) per position,
        and (byte_tokens given, (B, P)) the byte-level targets, from one chunked pass over the logits.

        Computed a chunk of positions at a time so the (B, P, V) logits never exist whole. With
        byte targets, log Z and the whitespace mass come from the targets' cumulative sum (the
        same numbers, no extra pass over the logits) and the chunk shrinks so the sorted float64
        sums stay near 2^25 entries.
        """
        B, P, _ = t_final.shape
        nxt = F.pad(teacher_ids[:, 1:], (0, 1))  # the token each position predicts (last: unused)
        tok_lp, ws_lp, passes = [], [], []
        if byte_tokens is not None:
            V = self.teacher.embed_tokens.weight.shape[0]
            chunk = max(1, min(chunk, (1 << 25) // max(1, B * V)))
        for s in range(0, P, chunk):
            logits = self.teacher.logits(t_final[:, s : s + chunk]).float()
            c = logits.shape[1]
            if byte_tokens is not None:
                tp = byte_targets.teacher_pass(
                    self.target_table, logits.flatten(0, 1), byte_tokens[:, s : s + c].flatten()
                )
                logz, ws = tp.logz.view(B, c), tp.ws_logp.view(B, c)
                # rows of this chunk -> rows of the whole (B, P) grid
                tp.row = torch.div(tp.row, c, rounding_mode="floor") * P + s + tp.row % c
                passes.append(tp)
            else:
                logz = logits.logsumexp(-1)
            tok_lp.append(logits.gather(-1, nxt[:, s : s + c, None]).squeeze(-1) - logz)
            if debias and byte_tokens is not None:
                ws_lp.append(ws)
            elif debias:
                ws = self.whitespace_mask
                V = logits.shape[-1]
                ws = F.pad(ws, (0, V - ws.shape[0]), value=False) if ws.shape[0] < V else ws[:V]
                ws_lp.append(logits.masked_fill(~ws, float("-inf")).logsumexp(-1) - logz)
        targets = byte_targets.concat(passes) if passes else None
        return torch.cat(tok_lp, 1)[:, :-1], torch.cat(ws_lp, 1) if debias else None, targets

    def stage2_loss(self, batch: dict, loss_cfg: LossConfig | None = None):
        """Stage 2 (docs/architecture.md §9): predicted boundaries, global model on student patches, CE + 4 x BCE."""
        w = loss_cfg or LossConfig(encoder=0.0, distill=0.0)
        self._check_batch(batch)
        ids, exp, byte_mask = batch["input_ids"], batch["expanded_ids"], batch["byte_mask"].bool()
        patch_lens = batch["patch_lens"]
        B, L = ids.shape
        P = patch_lens.shape[1]
        h, logp, _ = self.encode(ids, exp)
        b = self.boundary_predictor.decide(logp) & byte_mask
        reps, _, overflow, _ = self.patches(h, b, P)
        G = self.global_model(reps).hidden
        logits, _ = self.decode(h, G, b)
        labels, ce_mask = self.fused_labels(ids, b, byte_mask)
        # bytes past slot P-1 got a clipped (wrong) global state: keep them out of the loss
        ce_mask = ce_mask & (b.long().cumsum(1) <= P)
        ce = losses.fused_ce(logits, labels, ce_mask)
        b_true = boundaries_from_patch_lens(patch_lens, L) & byte_mask
        b_lab, b_mask = self.boundary_targets(ids, b_true, byte_mask)
        bce = losses.boundary_bce(logp, b_lab, b_mask)
        total = w.ce * ce + w.boundary * bce
        metrics = {
            "loss_ce": float(ce.detach()),
            "loss_boundary": float(bce.detach()),
            "loss": float(total.detach()),
        }
        metrics.update(self._boundary_metrics(logp, b_lab, b_mask, b, byte_mask, overflow))
        metrics["clipped_byte_frac"] = float(
            ((b.long().cumsum(1) > P) & byte_mask).sum() / byte_mask.sum().clamp(min=1)
        )
        return total, metrics

    def loss(self, batch: dict, stage_cfg: StageConfig):
        """Dispatch on the stage: (loss, metrics)."""
        fn = self.stage1_loss if stage_cfg.teacher_forced_boundaries else self.stage2_loss
        return fn(batch, stage_cfg.losses)

    # ------------------------------------------------------------------ optimisation

    def configure_stage(self, stage_cfg: StageConfig) -> None:
        """Set requires_grad per stage: teacher always frozen; global blocks only when trained (docs/architecture.md §8.1, §9.1)."""
        self.requires_grad_(True)
        self.teacher.requires_grad_(False)
        lora = stage_cfg.lora is not None and stage_cfg.train_global
        self.global_model.requires_grad_(bool(stage_cfg.train_global) and not lora)
        if lora:  # only the adapters of the global blocks train (bolmo_core/lora.py)
            from .lora import is_adapter_param

            for n, p in self.global_model.named_parameters():
                p.requires_grad_(is_adapter_param(n))
        if stage_cfg.freeze_boundary_predictor:
            self.boundary_predictor.requires_grad_(False)

    def param_groups(self, stage_cfg: StageConfig) -> list[dict]:
        """AdamW groups: local (decay), local no-decay (embeddings, norms, biases), global (lr x ratio);
        with LoRA, the adapters (lr x lora.lr_ratio) instead of the global weights."""
        from .lora import is_adapter_param

        self.configure_stage(stage_cfg)
        opt = stage_cfg.optim
        emb = {id(m.weight) for m in self.modules() if isinstance(m, nn.Embedding)}
        teacher = {id(p) for p in self.teacher.parameters()}
        glob = {id(p) for p in self.global_model.parameters()}
        groups = {k: [] for k in ("local", "local_no_decay", "global", "global_no_decay", "lora")}
        for name, p in self.named_parameters():
            if not p.requires_grad or id(p) in teacher:
                continue
            no_decay = p.ndim < 2 or id(p) in emb
            key = ("global" if id(p) in glob else "local") + ("_no_decay" if no_decay else "")
            groups["lora" if is_adapter_param(name) else key].append(p)
        lr = {"local": opt.lr, "global": opt.lr * opt.global_lr_ratio}
        if stage_cfg.lora is not None:
            lr["lora"] = opt.lr * stage_cfg.lora.lr_ratio
        return [
            {
                "name": k,
                "params": v,
                "lr": lr[k.split("_")[0]],
                "weight_decay": 0.0 if k.endswith("no_decay") else opt.weight_decay,
            }
            for k, v in groups.items()
            if v
        ]
