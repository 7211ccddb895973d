"""Evaluation: a byteified model side by side with its source model on held-out text.

Metrics (both models on exactly the same bytes, in the same windows):

* **bits per byte** (headline, causal). Byte model: Σ −log₂ p(byte) / #bytes with p(byte)
  the folded fused probability p(v) + p(v + 260) (docs/architecture.md §1.1, §13.1), scored
  the way the model generates: the end-of-patch flag of byte t+1 is decided by the decoder's
  output at byte t given the true byte (flagged vs unflagged logit of that byte, greedy, as
  `generate.py`'s forced first choice does), so no boundary is placed knowing a later byte
  (`score_bytes`). ``bits_per_byte_lookahead`` is the published recipe's figure: boundaries
  from the encoder's predictor, which looks one byte ahead (the patch that ends before byte
  t+1 was closed knowing byte t+1, docs/architecture.md §5.2), so it is optimistic. Source:
  Σ −log₂ p(token) over every token / #bytes, each window starting from the document
  separator as context.
* **boundary accuracy / precision / recall** of the predictor's boundaries (``boundary``) and
  of the causal ones (``boundary_causal``) against the source tokenizer's token ends (BOS and
  each window's last byte, which the predictor cannot decide, are excluded), and the
  predicted/label boundary rates.
* **bytes per patch** (byte model) next to bytes per token (source).
* **CUTE-style char tasks** (`cute.py`), greedy generation for both models.

Windows: a document is cut into windows of at most ``window_bytes`` bytes (default: the
byte model's byte length minus the BOS slot), only at source-token ends, so both models
predict the same bytes. Windows do not overlap: each window starts with no context
besides BOS / the separator, which makes bpb slightly worse than a sliding window would.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from . import cute
from .byte_tokenizer import BOS, FUSED_OFFSET, OFFSET, PAD, fold_logprobs
from .coarsen import coarsen_batch
from .subword import RetainedIndex, SubwordVocab, get_vocab, label_documents

LN2 = math.log(2.0)


class EvalError(ValueError):
    """Evaluation input that cannot be used, with a one-line reason."""


@dataclass
class EvalConfig:
    window_bytes: int | None = None  # None: the byte model's byte length - 1 (BOS), else 2048
    batch_size: int = 4
    precision: str = "fp32"  # fp32 | bf16 (autocast on the forward passes)
    boundaries: str = "predicted"  # byte model: "predicted" (its own) | "source" (tokenizer's, a diagnostic)
    max_bytes: int | None = None  # evaluate only the first max_bytes of the held-out text
    cute_tasks: tuple[str, ...] = cute.CHAR_TASKS  # () skips the char tasks
    cute_items: int = 50  # items per task
    cute_seed: int = 0
    cute_data_dir: str | None = None  # folder with CUTE TSVs to use instead of regenerating
    cute_batch_size: int = 8
    word_source: str = "auto"


@dataclass
class Window:
    """A run of whole source tokens of one document: what both models score."""

    doc: int
    start: int  # byte offset in the document
    data: bytes
    token_ids: np.ndarray  # source tokens spelling `data`
    token_ends: np.ndarray  # their byte ends, relative to `start`


# ---------------------------------------------------------------- windows


def make_windows(
    tok, docs: Sequence[bytes], window_bytes: int, vocab: SubwordVocab | None = None
) -> list[Window]:
    """Cut documents into windows of <= window_bytes at source-token ends (greedy, no overlap)."""
    if window_bytes < 1:
        raise EvalError(f"window_bytes must be >= 1, got {window_bytes}")
    docs = [bytes(d) for d in docs if d]
    if not docs:
        raise EvalError("held-out text is empty")
    windows = []
    for n, (doc, (ids, ends)) in enumerate(zip(docs, label_documents(tok, docs, vocab))):
        ends = ends.astype(np.int64)
        starts = np.concatenate([[0], ends[:-1]])
        too_long = np.flatnonzero(ends - starts > window_bytes)
        if len(too_long):
            k = int(too_long[0])
            raise EvalError(
                f"document {n}: token {k} is {int(ends[k] - starts[k])} bytes, longer than "
                f"window_bytes={window_bytes}"
            )
        i = 0
        while i < len(ids):
            # Last token whose end is within window_bytes of this window's start.
            j = int(np.searchsorted(ends, starts[i] + window_bytes, side="right"))
            s = int(starts[i])
            windows.append(Window(n, s, doc[s : int(ends[j - 1])], ids[i:j].astype(np.int64), ends[i:j] - s))
            i = j
    return windows


# ---------------------------------------------------------------- source model


def _autocast(precision: str, device: torch.device):
    if precision not in ("fp32", "bf16"):
        raise EvalError(f"precision '{precision}': expected fp32 or bf16")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


@torch.no_grad()
def source_bits(
    model, vocab: SubwordVocab, windows: Sequence[Window], batch_size: int = 4, precision: str = "fp32"
) -> dict:
    """Σ −log₂ p(token) of the source model over all windows (separator first in each)."""
    device = next(model.parameters()).device
    total_bits, n_tokens = 0.0, 0
    for b in range(0, len(windows), batch_size):
        chunk = windows[b : b + batch_size]
        width = 1 + max(len(w.token_ids) for w in chunk)
        ids = torch.full((len(chunk), width), vocab.pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, w in enumerate(chunk):
            n = len(w.token_ids)
            ids[r, 0] = vocab.doc_separator_id
            ids[r, 1 : n + 1] = torch.from_numpy(w.token_ids)
            mask[r, : n + 1] = 1
        ids, mask = ids.to(device), mask.to(device)
        with _autocast(precision, device):
            logits = model(input_ids=ids, attention_mask=mask).logits
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        tgt = ids[:, 1:]
        nll = -logp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
        valid = mask[:, 1:].bool()
        total_bits += float(nll[valid].double().sum()) / LN2
        n_tokens += int(valid.sum())
    n_bytes = sum(len(w.data) for w in windows)
    return {
        "bits": total_bits,
        "bytes": n_bytes,
        "tokens": n_tokens,
        "bits_per_byte": total_bits / n_bytes,
        "bytes_per_token": n_bytes / n_tokens,
    }


def source_generate_fn(model, tok, vocab: SubwordVocab | None = None):
    """cute.GenerateFn for the source: HF greedy `generate` with KV cache, separator first, left padding."""
    vocab = vocab or get_vocab(tok)
    device = next(model.parameters()).device
    stop_ids = sorted({vocab.doc_separator_id, *([tok.eos_token_id] if tok.eos_token_id is not None else [])})

    @torch.no_grad()
    def generate(prompts: list[str], max_new_bytes: int) -> list[str]:
        rows = [[vocab.doc_separator_id, *tok(p, add_special_tokens=False)["input_ids"]] for p in prompts]
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), vocab.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, row in enumerate(rows):
            ids[r, width - len(row) :] = torch.tensor(row)
            mask[r, width - len(row) :] = 1
        # Every token is >= 1 byte, so a budget of max_new_bytes tokens covers max_new_bytes bytes.
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_bytes,
            do_sample=False,
            eos_token_id=stop_ids,
            pad_token_id=vocab.pad_id,
            stop_strings=['"'],
            tokenizer=tok,
        )
        texts = []
        for row in out[:, width:].tolist():
            new = b"".join(vocab.token_bytes[i] for i in row if i not in vocab.special_ids)
            texts.append(new.decode("utf-8", errors="replace"))
        return texts

    return generate


# ---------------------------------------------------------------- byte model


def byte_batch(
    windows: Sequence[Window], retained: RetainedIndex, vocab: SubwordVocab, width: int | None = None
):
    """input_ids / expanded_ids (B, width) for windows: BOS + bytes, right-padded (docs/internals.md)."""
    width = width or 1 + max(len(w.data) for w in windows)
    input_ids = np.full((len(windows), width), PAD, dtype=np.int64)
    for r, w in enumerate(windows):
        input_ids[r, 0] = BOS
        input_ids[r, 1 : len(w.data) + 1] = np.frombuffer(w.data, dtype=np.uint8).astype(np.int64) + OFFSET
    expanded = np.asarray(retained.expand(input_ids), dtype=np.int64)
    expanded[input_ids == BOS] = vocab.doc_separator_id
    expanded[input_ids == PAD] = vocab.pad_id
    return torch.from_numpy(input_ids), torch.from_numpy(expanded)


def source_boundaries(windows: Sequence[Window], width: int) -> torch.Tensor:
    """(B, width) bool: BOS and every source token's last byte (position = its end offset, BOS at 0)."""
    mask = torch.zeros((len(windows), width), dtype=torch.bool)
    mask[:, 0] = True
    for r, w in enumerate(windows):
        mask[r, torch.from_numpy(w.token_ends.astype(np.int64))] = True
    return mask


@dataclass
class ByteScores:
    """Per byte position t: log p(byte t+1) folded over the flag (nats; 0 where t+1 is no byte)."""

    logp: torch.Tensor  # (B, L) with causal boundaries (or the forced ones)
    boundary: torch.Tensor  # (B, L) bool: the boundaries `logp` conditions on
    logp_lookahead: torch.Tensor | None  # (B, L) with the predictor's boundaries (one byte ahead)
    boundary_lookahead: torch.Tensor | None  # (B, L) bool
    passes: int  # full forwards the causal fixed point took (the slowest row)
    folded: torch.Tensor | None = None  # (B, L, 260) folded log p of every next byte (`full=True`)


def next_byte_logp(model, h, input_ids, boundary, byte_mask) -> tuple[torch.Tensor, torch.Tensor]:
    """Global model + decoder over given boundaries -> (fused logits (B, L, 520) fp32, folded log p (B, L))."""
    P = max(1, int(boundary.sum(1).max()))
    reps, _, _, _ = model.patches(h, boundary, P)
    logits, _ = model.decode(h, model.global_model(reps).hidden, boundary)
    logits = logits.float()
    folded = _folded(logits)
    nxt = torch.nn.functional.pad(input_ids[:, 1:], (0, 1))
    valid = torch.nn.functional.pad(byte_mask[:, :-1] & byte_mask[:, 1:], (0, 1), value=False)
    return logits, folded.gather(-1, nxt.unsqueeze(-1)).squeeze(-1).masked_fill(~valid, 0.0)


def causal_flags(logits: torch.Tensor, input_ids: torch.Tensor, byte_mask: torch.Tensor) -> torch.Tensor:
    """Boundaries the decoder's own outputs place: b_0 (BOS) and, for t+1, flagged > unflagged logit
    of the true byte x_{t+1} at byte t (a tie is unflagged, as greedy argmax picks the lower id)."""
    x = input_ids[:, 1:].unsqueeze(-1)
    lg = logits[:, :-1]
    flag = lg.gather(-1, x + FUSED_OFFSET).squeeze(-1) > lg.gather(-1, x).squeeze(-1)
    b = torch.cat([torch.ones_like(flag[:, :1]), flag], 1)
    return b & byte_mask


@torch.no_grad()
def score_bytes(
    model,
    input_ids,
    expanded_ids,
    byte_mask,
    forced=None,
    autocast=contextlib.nullcontext,
    all_done=None,
    full: bool = False,
) -> ByteScores:
    """The one byte-model scorer (evaluation report and the trainer's validation).

    forced: (B, L) boundaries to condition on (one forward). Otherwise both figures: the
    predictor's boundaries (look-ahead) and the causal ones. The decoder at byte t depends only
    on boundaries <= t, so the causal sequence is the unique fixed point of "forward with b,
    re-decide b from the fused outputs": starting from the predictor's boundaries, each pass
    makes at least the first wrong position right, a row whose decisions reproduce its
    boundaries is done (its outputs are exactly those of byte-by-byte decoding), and only
    unfinished rows run again. The encoder does not depend on boundaries: it runs once.

    all_done(done_here) -> bool: whether every rank has converged (the trainer's validation on
    sharded weights, where every rank must run the same passes: a rank that has converged
    repeats its last pass, results unchanged, until all have). full: also `folded`, every next
    byte's whole folded distribution on the final boundaries (lm-eval's greedy check).
    """
    byte_mask = byte_mask.bool()
    with autocast():
        h, pred_logp, _ = model.encode(input_ids, expanded_ids)
    if forced is not None:
        b = forced.bool() & byte_mask
        with autocast():
            logits, lp = next_byte_logp(model, h, input_ids, b, byte_mask)
        return ByteScores(lp, b, None, None, 1, _folded(logits) if full else None)
    b = model.boundary_predictor.decide(pred_logp) & byte_mask
    with autocast():
        logits, lp = next_byte_logp(model, h, input_ids, b, byte_mask)
    look_lp, look_b = lp, b
    out_lp, out_b = lp.clone(), b.clone()
    out_folded = logits.new_zeros(*logits.shape[:2], FUSED_OFFSET) if full else None
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    cur_b, passes = b, 1
    while True:
        new = causal_flags(logits, input_ids[rows], byte_mask[rows])
        done = (new == cur_b).all(1)
        out_lp[rows[done]], out_b[rows[done]] = lp[done], new[done]
        if full:
            out_folded[rows[done]] = _folded(logits[done])
        finished = bool(done.all())
        if all_done(finished) if all_done else finished:
            break
        if passes > input_ids.shape[1]:  # cannot happen (each pass fixes a position): never loop forever
            raise EvalError(f"causal boundaries did not converge in {passes} passes")
        if not finished:
            rows, cur_b = rows[~done], new[~done]
        with autocast():
            logits, lp = next_byte_logp(model, h[rows], input_ids[rows], cur_b, byte_mask[rows])
        passes += 1
    return ByteScores(out_lp, out_b, look_lp, look_b, passes, out_folded)


def _folded(logits: torch.Tensor) -> torch.Tensor:
    return fold_logprobs(torch.log_softmax(logits.float(), dim=-1))


class _BoundaryCounts:
    """Agreement of boundary decisions with labels, summed over batches."""

    def __init__(self):
        self.tp = self.fp = self.fn = self.tn = 0

    def add(self, pred: torch.Tensor, label: torch.Tensor) -> None:
        pred, label = pred.bool(), label.bool()
        self.tp += int((pred & label).sum())
        self.fp += int((pred & ~label).sum())
        self.fn += int((~pred & label).sum())
        self.tn += int((~pred & ~label).sum())

    def report(self) -> dict:
        tp, fp, fn, tn = self.tp, self.fp, self.fn, self.tn
        n = tp + fp + fn + tn
        nan = float("nan")
        return {
            "accuracy": (tp + tn) / n if n else nan,
            "precision": tp / (tp + fp) if tp + fp else nan,
            "recall": tp / (tp + fn) if tp + fn else nan,
            "predicted_rate": (tp + fp) / n if n else nan,
            "label_rate": (tp + fn) / n if n else nan,
            "positions": n,
        }


class _WindowTally:
    """Bits, patches and boundary agreement of windows under one kind of boundaries, summed over batches."""

    def __init__(self):
        self.bits, self.patches, self.counts = 0.0, 0, _BoundaryCounts()

    def add(self, chunk: Sequence[Window], lp: torch.Tensor, mask: torch.Tensor) -> None:
        lp, mask = lp.double().cpu(), mask.cpu()
        for r, w in enumerate(chunk):
            n = len(w.data)
            self.bits -= float(lp[r, :n].sum()) / LN2
            # Position p (1-based byte index) ends a token when p is one of the token ends.
            label = torch.zeros(n + 1, dtype=torch.bool)
            label[torch.from_numpy(w.token_ends.astype(np.int64))] = True
            pred = mask[r, : n + 1]
            # A window's bytes form this many patches: boundaries before its last byte, plus the last.
            self.patches += int(pred[1:n].sum()) + 1
            self.counts.add(pred[1:n], label[1:n])  # BOS is forced, the last byte is undecidable


@torch.no_grad()
def byte_model_stats(
    model,
    vocab: SubwordVocab,
    windows: Sequence[Window],
    batch_size: int = 4,
    precision: str = "fp32",
    retained: RetainedIndex | None = None,
    boundaries: str = "predicted",
) -> dict:
    """Folded bits per byte, boundary agreement with the source tokenizer, bytes per patch.

    boundaries="predicted": the model's own boundaries, causal (headline ``bits_per_byte``,
    ``boundary_causal``) and the predictor's look-ahead ones (``bits_per_byte_lookahead``,
    ``boundary``). boundaries="source" pools at the source tokenizer's token ends instead
    (Stage-1 conditions; a diagnostic, not the model's own bpb): one figure, ``bits_per_byte``.
    """
    if boundaries not in ("predicted", "source"):
        raise EvalError(f"boundaries '{boundaries}': expected predicted or source")
    retained = retained or RetainedIndex(vocab)
    device = next(model.parameters()).device
    kinds = ("", "_lookahead") if boundaries == "predicted" else ("",)
    tally = {k: _WindowTally() for k in kinds}
    n_bytes, passes = 0, 0
    for b in range(0, len(windows), batch_size):
        chunk = windows[b : b + batch_size]
        input_ids, expanded = byte_batch(chunk, retained, vocab)
        forced = source_boundaries(chunk, input_ids.shape[1]).to(device) if boundaries == "source" else None
        input_ids, expanded = input_ids.to(device), expanded.to(device)
        sc = score_bytes(
            model, input_ids, expanded, input_ids != PAD, forced, lambda: _autocast(precision, device)
        )
        passes = max(passes, sc.passes)
        got = {"": (sc.logp, sc.boundary)}
        if forced is None:
            got["_lookahead"] = (sc.logp_lookahead, sc.boundary_lookahead)
        for kind, (lp, mask) in got.items():
            tally[kind].add(chunk, lp, mask)
        n_bytes += sum(len(w.data) for w in chunk)
    out = {"bytes": n_bytes}
    # bits: the headline is causal (or forced); patches and boundary agreement keep their old
    # names for the predictor's boundaries and get "_causal" for the causal ones.
    for kind, t in tally.items():
        pk = "_causal" if kind == "" and boundaries == "predicted" else ""
        out[f"bits{kind}"] = t.bits
        out[f"bits_per_byte{kind}"] = t.bits / n_bytes
        out[f"patches{pk}"] = t.patches
        out[f"bytes_per_patch{pk}"] = n_bytes / t.patches
        out[f"boundary{pk}"] = t.counts.report()
    if boundaries == "predicted":
        out["causal_passes"] = passes
    return out


def byte_generate_fn(model, **gen_kwargs):
    """cute.GenerateFn for the byte model through `bolmo_core.generate.generate` (greedy)."""
    from .generate import generate as byte_generate

    def generate(prompts: list[str], max_new_bytes: int) -> list[str]:
        outs = byte_generate(
            model, [p.encode("utf-8") for p in prompts], max_new_bytes=max_new_bytes, **gen_kwargs
        )
        return [o.decode("utf-8", errors="replace") for o in outs]

    return generate


def byte_generation_available() -> bool:
    try:
        from .generate import generate  # noqa: F401
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------- in-loop validation (the trainer)


class Validator:
    """Validation on the manifest's validation split (the stage's precision, fixed windows).

    On several ranks each scores its share (batch k of the first `eval_batches` goes to rank
    k mod world) and `reduce` sums the counts over ranks, so every rank returns the metrics of
    the same windows whatever the world size. Every rank runs the same number of forward passes
    (a short share repeats its last batch with weight 0): sharded (FSDP) weights are gathered
    collectively, pass by pass.

    * ``val_bpb``: byte bits per byte from folded fused probabilities (p(v) + p(v+260)),
      causal boundaries (`score_bytes`: decided by the model's own fused outputs, as it
      generates; no patch-slot limit); ``val_bpb_lookahead``: the same with the predictor's
      boundaries (one byte ahead: optimistic);
    * ``val_source_bpb``: the source model's token NLL sum / bytes on exactly the same bytes
      (computed once: the source does not change);
    * ``val_boundary_acc`` / precision / recall of the predictor against the (possibly
      coarsened) labels; ``val_boundary_acc_causal`` / ... of the causal boundaries;
    * ``val_patch_cos``: cosine similarity of the pooled patch representations (true
      boundaries) to the teacher's input embeddings of the same tokens (docs/architecture.md §8.4: a diagnostic).
    """

    def __init__(self, preset, stage: int, manifest_uri: str, vocab, device, rank=0, world=1, reduce=None):
        self.preset, self.stage, self.manifest_uri, self.vocab, self.device = (
            preset,
            stage,
            manifest_uri,
            vocab,
            device,
        )
        self.rank, self.world = rank, world
        self.reduce = reduce or (lambda xs: xs)  # sums a list of floats over the ranks
        self.stage_cfg = preset.stage1 if stage == 1 else preset.stage2
        stage_cfg = self.stage_cfg
        self.batches: list[dict] | None = None
        self.source_bpb: float | None = None
        # bf16 stages evaluate under bf16 autocast too (4-5x faster on CPUs); log-probs in fp32
        self.autocast = (
            (lambda: torch.autocast(device.type, dtype=torch.bfloat16))
            if stage_cfg.precision == "bf16"
            else contextlib.nullcontext
        )

    def _load_batches(self) -> list[dict]:
        from .loader import WindowLoader

        loader = WindowLoader.from_config(
            self.preset.data, self.manifest_uri, self.vocab, self.stage_cfg.micro_batch, split="validation"
        )
        n = max(1, self.stage_cfg.eval_batches)
        out = [
            coarsen_batch(b, self.stage_cfg.target_bytes_per_patch if self.stage == 2 else None)
            for b in loader.iter_eval(max_batches=n)
        ]
        if not out:
            raise EvalError(
                f"{self.manifest_uri}: the validation split has no window of "
                f"{self.preset.data.window_tokens} tokens"
            )
        mine = out[self.rank :: self.world]
        n_mine = -(-len(out) // self.world)
        self.weights = [1] * len(mine) + [0] * (n_mine - len(mine))
        return mine + [out[-1]] * (n_mine - len(mine))

    @staticmethod
    def _target_mask(batch: dict) -> torch.Tensor:
        """(B, L) bool: byte positions t whose next byte belongs to a complete (unclipped) patch."""
        ends = batch["patch_lens"].sum(1, keepdim=True)  # valid patches form a prefix
        t = torch.arange(batch["input_ids"].shape[1], device=ends.device)
        return (t + 1 >= 1) & (t + 1 < ends) & batch["byte_mask"].bool()

    @torch.no_grad()
    def _source_bpb(self) -> float:
        from .source import load_source_model

        src = load_source_model(self.preset.model.source).to(self.device)
        nll, n_bytes = 0.0, 0
        for b, w in zip(self.batches, self.weights):
            ids = b["teacher_ids"].to(self.device)
            with self.autocast():
                logits = src(input_ids=ids).logits
            logp = logits.float().log_softmax(-1)
            tok = logp[:, :-1].gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
            lens = b.get("token_patch_lens", b["patch_lens"])[:, 1:].to(self.device)  # one patch per token
            m = lens > 0  # the loader zeroes the lengths of patches cut by truncation
            nll -= w * float(tok[m].sum())
            n_bytes += w * int(lens[m].sum())
        del src
        nll, n_bytes = self.reduce([nll, float(n_bytes)])
        return nll / max(1, n_bytes) / math.log(2)

    @torch.no_grad()
    def __call__(self, model) -> dict[str, float]:
        if self.batches is None:
            self.batches = self._load_batches()
        if self.source_bpb is None:
            self.source_bpb = self._source_bpb()
        was_training = model.training
        model.eval()
        acc = {"nll": 0.0, "nll_lookahead": 0.0, "bytes": 0, "over": 0.0, "passes": 0, "cos": 0.0, "cos_n": 0}
        counts = {"": _BoundaryCounts(), "_causal": _BoundaryCounts()}
        for b, w in zip(self.batches, self.weights):
            self._add_batch(model, {k: v.to(self.device) for k, v in b.items()}, acc, counts, w)
        if was_training:
            model.train()
        self._sum_over_ranks(acc, counts)
        bpb = acc["nll"] / max(1, acc["bytes"]) / math.log(2)
        metrics = {
            "val_bpb": bpb,
            "val_bpb_lookahead": acc["nll_lookahead"] / max(1, acc["bytes"]) / math.log(2),
            "val_source_bpb": self.source_bpb,
            "val_bpb_ratio": bpb / self.source_bpb if self.source_bpb else float("nan"),
        }
        for kind, c in counts.items():
            r = c.report()
            metrics[f"val_boundary_acc{kind}"] = r["accuracy"]
            metrics[f"val_boundary_precision{kind}"] = r["precision"]
            metrics[f"val_boundary_recall{kind}"] = r["recall"]
        metrics["val_bytes_per_patch_pred"] = acc["bytes"] / max(1, counts[""].tp + counts[""].fp)
        metrics["val_bytes_per_patch_causal"] = acc["bytes"] / max(
            1, counts["_causal"].tp + counts["_causal"].fp
        )
        metrics["val_overflow_frac"] = acc["over"] / max(1, acc["batches"])
        metrics["val_causal_passes"] = float(acc["passes"])
        metrics["val_bytes"] = float(acc["bytes"])
        if acc["cos_n"]:
            metrics["val_patch_cos"] = acc["cos"] / acc["cos_n"]
        return metrics

    def _add_batch(self, model, d: dict, acc: dict, counts: dict, w: int = 1) -> None:
        """One validation batch into the running sums (bits, boundary agreement, patch cosine).

        w = 0: a padding batch of a short share; its forward passes run (ranks stay in step),
        nothing is counted.
        """
        from .pooling import boundaries_from_patch_lens

        ids, byte_mask = d["input_ids"], d["byte_mask"].bool()
        sc = score_bytes(
            model, ids, d["expanded_ids"], byte_mask, autocast=self.autocast, all_done=self._all_done
        )
        tgt = self._target_mask(d)
        acc["nll"] -= w * float(sc.logp[tgt].double().sum())
        acc["nll_lookahead"] -= w * float(sc.logp_lookahead[tgt].double().sum())
        acc["bytes"] += w * int(tgt.sum())
        acc["passes"] = max(acc["passes"], sc.passes)
        acc["batches"] = acc.get("batches", 0) + w
        P = d["patch_lens"].shape[1]  # the training patch slots: rows predicting more overflow there
        acc["over"] += w * float((sc.boundary_lookahead.sum(1) > P).float().mean())
        b_true = boundaries_from_patch_lens(d["patch_lens"], ids.shape[1]) & byte_mask
        lab, mask = model.boundary_targets(ids, b_true, byte_mask)
        if w:
            counts[""].add(sc.boundary_lookahead[mask], lab[mask])
            counts["_causal"].add(sc.boundary[mask], lab[mask])
        if self.stage == 1 or not self.stage_cfg.target_bytes_per_patch:
            with self.autocast():
                h, _, _ = model.encode(ids, d["expanded_ids"])
                reps, pmask, _, _ = model.patches(h, b_true, P)
            emb = model.teacher.embed(d["teacher_ids"]).float()
            cos = torch.nn.functional.cosine_similarity(reps.float(), emb, dim=-1)
            valid = pmask & d["patch_mask"].bool()
            acc["cos"] += w * float(cos[valid].sum())
            acc["cos_n"] += w * int(valid.sum())

    def _all_done(self, done_here: bool) -> bool:
        """Every rank's causal-boundary passes converged (a collective when world > 1)."""
        return done_here if self.world == 1 else self.reduce([0.0 if done_here else 1.0])[0] == 0

    def _sum_over_ranks(self, acc: dict, counts: dict) -> None:
        """Sum the additive counts over ranks in place (one collective); passes are equal on every rank."""
        keys = ["nll", "nll_lookahead", "bytes", "over", "cos", "cos_n", "batches"]
        cs = [(c, f) for c in counts.values() for f in ("tp", "fp", "fn", "tn")]
        total = self.reduce([float(acc.get(k, 0)) for k in keys] + [float(getattr(c, f)) for c, f in cs])
        acc.update(zip(keys, total[: len(keys)]))
        for (c, f), v in zip(cs, total[len(keys) :]):
            setattr(c, f, int(v))


# ---------------------------------------------------------------- the report


def evaluate(
    docs: Sequence[bytes],
    tok,
    source_model=None,
    byte_model=None,
    cfg: EvalConfig | None = None,
    byte_length: int | None = None,
    byte_gen_kwargs: dict | None = None,
    on_phase: Callable[[str], None] | None = None,
) -> dict:
    """The JSON-serialisable report for the source and/or byte model on held-out `docs`.

    `on_phase(description)` is called before each part (scoring, character tasks) of each
    model, e.g. to show progress; it must not touch the models.
    """
    cfg = cfg or EvalConfig()
    phase = on_phase or (lambda _: None)
    if source_model is None and byte_model is None:
        raise EvalError("evaluate: give a source model, a byte model, or both")
    docs = [bytes(d) for d in docs]
    if cfg.max_bytes is not None:
        docs = _truncate(docs, cfg.max_bytes)
    vocab = get_vocab(tok)
    window = cfg.window_bytes or ((byte_length - 1) if byte_length else 2048)
    windows = make_windows(tok, docs, window, vocab)
    report = _report_header(cfg, docs, windows, window)
    tasks = (
        cute.load_tasks(cfg.cute_tasks, cfg.cute_items, cfg.cute_seed, cfg.cute_data_dir, cfg.word_source)
        if cfg.cute_tasks
        else {}
    )
    if source_model is not None:
        report["source"] = _source_report(source_model, tok, vocab, windows, tasks, cfg, phase)
    if byte_model is not None:
        report["byte_model"] = _byte_report(
            byte_model, vocab, windows, tasks, cfg, phase, byte_gen_kwargs, report["notes"]
        )
    return report


@functools.cache
def scorer_digest() -> str:
    """The identity of the code that turns a checkpoint into a report's numbers: a digest of
    bolmo_core's source, as syntax trees (comments and formatting do not count).

    A report is reused for the same checkpoint, data and options; without this, a fix to the
    evaluator, the model or generation would leave old numbers standing as if current. Any
    change to the package's code counts: an evaluation re-runs in minutes, a stale figure lasts.
    """
    root = Path(__file__).parent
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        h.update(f"{f.relative_to(root).as_posix()}\0{ast.dump(ast.parse(f.read_bytes()))}\0".encode())
    return h.hexdigest()[:16]


def _report_header(cfg: EvalConfig, docs: list[bytes], windows: list[Window], window: int) -> dict:
    """The report's text, CUTE and config sections and its notes; the models' sections are None."""
    notes = [
        f"windows of at most {window} bytes cut at source-token ends, no overlap: each window is scored "
        "without the previous window's context (BOS / document separator only)",
        "byte-model bits per byte fold p(v)+p(v+260) and condition on "
        + (
            "causal boundaries: each byte's end-of-patch flag decided by the model's own fused output at "
            "the byte before, as it generates; bits_per_byte_lookahead conditions on the boundary "
            "predictor's (one byte of lookahead, docs/architecture.md §5.2: optimistic)"
            if cfg.boundaries == "predicted"
            else "the source tokenizer's boundaries (diagnostic: not the model's own bpb)"
        ),
        "CUTE-style prompts are plain text for both models (no chat template), answers greedy",
    ]
    return {
        "text": {
            "documents": len(docs),
            "bytes": sum(map(len, docs)),
            "windows": len(windows),
            "window_bytes": window,
        },
        "source": None,
        "byte_model": None,
        "cute": {
            "name": cute.REPORT_NAME,
            "tasks": list(cfg.cute_tasks),
            "items_per_task": cfg.cute_items,
            "seed": cfg.cute_seed,
            "data_dir": cfg.cute_data_dir,
            "word_source": cfg.word_source,
        },
        "config": asdict(cfg),
        "scorer": scorer_digest(),
        "notes": notes,
    }


def _source_report(model, tok, vocab, windows, tasks: dict, cfg: EvalConfig, phase) -> dict:
    """The source model's section: bits per byte, then the character tasks (when any)."""
    phase(f"source model: bits per byte on {len(windows)} windows")
    src = source_bits(model, vocab, windows, cfg.batch_size, cfg.precision)
    if tasks:
        phase(f"source model: {sum(len(v) for v in tasks.values())} character-task items")
        src["cute"] = cute.run_tasks(source_generate_fn(model, tok, vocab), tasks, cfg.cute_batch_size)
        src["cute_mean"] = cute.mean_accuracy(src["cute"])
    return src


def _byte_report(model, vocab, windows, tasks: dict, cfg: EvalConfig, phase, gen_kwargs, notes: list) -> dict:
    """The byte model's section: bits per byte and boundaries, then the character tasks (when any)."""
    phase(f"byte model: bits per byte and boundaries on {len(windows)} windows")
    byt = byte_model_stats(model, vocab, windows, cfg.batch_size, cfg.precision, boundaries=cfg.boundaries)
    byt["boundaries"] = cfg.boundaries
    if tasks:
        if byte_generation_available():
            phase(f"byte model: {sum(len(v) for v in tasks.values())} character-task items")
            fn = byte_generate_fn(model, **(gen_kwargs or {}))
            byt["cute"] = cute.run_tasks(fn, tasks, cfg.cute_batch_size)
            byt["cute_mean"] = cute.mean_accuracy(byt["cute"])
        else:
            byt["cute"] = None
            notes.append("byte-model CUTE-style tasks not run: bolmo_core.generate is not available yet")
    return byt


def _truncate(docs: list[bytes], max_bytes: int) -> list[bytes]:
    out, left = [], max_bytes
    for d in docs:
        if left <= 0:
            break
        cut = min(len(d), left)
        while 0 < cut < len(d) and (d[cut] & 0xC0) == 0x80:  # never inside a UTF-8 character
            cut -= 1
        out.append(d[:cut])
        left -= cut
    return [d for d in out if d]


def _fmt(x, digits=3) -> str:
    if x is None:
        return "—"
    if isinstance(x, float):
        return "nan" if math.isnan(x) else f"{x:.{digits}f}"
    return str(x)


def report_rows(report: dict) -> list[dict]:
    """The report's table, one row per quantity: {"metric": label, "source": value, "byte_model":
    value, "keys": {side: snake_case metric name}} (value None: not measured). The CLI, the flow's
    table artifact and the MLflow metrics are all made from these rows."""
    src, byt = report.get("source") or {}, report.get("byte_model") or {}
    bnd, causal = byt.get("boundary", {}), byt.get("boundary_causal", {})
    rows = [
        ("bits per byte", "bits_per_byte", src.get("bits_per_byte"), byt.get("bits_per_byte")),
        (
            "bits per byte, look-ahead boundaries",
            "bits_per_byte_lookahead",
            None,
            byt.get("bits_per_byte_lookahead"),
        ),
        (
            "bytes per token (source) / patch (byte model)",
            None,
            src.get("bytes_per_token"),
            byt.get("bytes_per_patch"),
        ),
        ("boundary accuracy (predictor)", "boundary_accuracy", None, bnd.get("accuracy")),
        ("boundary precision (predictor)", "boundary_precision", None, bnd.get("precision")),
        ("boundary recall (predictor)", "boundary_recall", None, bnd.get("recall")),
        ("boundary accuracy (causal)", "boundary_accuracy_causal", None, causal.get("accuracy")),
    ]
    cute = report.get("cute") or {}
    cute_tasks, name = cute.get("tasks", []), cute.get("name", "char task")
    sc, bc = src.get("cute") or {}, byt.get("cute") or {}
    for t in cute_tasks:
        rows.append(
            (
                f"{name}: {t}",
                f"char_{t}_accuracy",
                (sc.get(t) or {}).get("accuracy"),
                (bc.get(t) or {}).get("accuracy"),
            )
        )
    if cute_tasks:
        rows.append((f"{name}: mean", "char_mean_accuracy", src.get("cute_mean"), byt.get("cute_mean")))
    return [
        {
            "metric": label,
            "source": a,
            "byte_model": b,
            "keys": {"source": key or "bytes_per_token", "byte_model": key or "bytes_per_patch"},
        }
        for label, key, a, b in rows
    ]


def markdown_table(report: dict) -> str:
    """Source vs byte model, one metric per row (`report_rows`)."""
    lines = ["| metric | source | byte model |", "|---|---|---|"]
    lines += [
        f"| {r['metric']} | {_fmt(r['source'])} | {_fmt(r['byte_model'])} |" for r in report_rows(report)
    ]
    t = report["text"]
    lines.append("")
    lines.append(
        f"{t['bytes']} bytes in {t['documents']} document(s), {t['windows']} windows of <= "
        f"{t['window_bytes']} bytes (no overlap)."
    )
    return "\n".join(lines)


def boundary_samples(model, tok, docs: list[bytes], n: int = 3, max_bytes: int = 300) -> list[dict]:
    """Texts cut into the patches the model predicts, beside the source tokenizer's tokens."""
    vocab = get_vocab(tok)
    picked = [d for d in docs if d][:n]
    windows = [make_windows(tok, [d], max_bytes, vocab)[0] for d in picked]
    if not windows:
        return []
    input_ids, expanded = byte_batch(windows, RetainedIndex(vocab), vocab)
    with torch.no_grad():
        out = model(input_ids, expanded, byte_mask=input_ids != 0)
    mask = out.boundary_mask.bool().cpu().numpy()
    samples = []
    for r, w in enumerate(windows):
        ends = [p for p in range(1, len(w.data)) if mask[r, p]] + [len(w.data)]
        starts = [0] + ends[:-1]
        patches = [w.data[s:e].decode("utf-8", errors="replace") for s, e in zip(starts, ends)]
        tok_starts = [0] + [int(x) for x in w.token_ends[:-1]]
        tokens = [
            w.data[s : int(e)].decode("utf-8", errors="replace") for s, e in zip(tok_starts, w.token_ends)
        ]
        samples.append({"patches": patches, "tokens": tokens})
    return samples


# ---------------------------------------------------------------- a checkpoint on a whole split


def split_metrics(
    path: str, manifest_uri: str, max_batches: int | None = None, device: str = "cpu"
) -> dict[str, float]:
    """The Validator's val_* metrics of a checkpoint on the manifest's whole validation split
    (or its first max_batches micro-batches), windows as in training, source bpb on the same bytes."""
    from . import checkpoint
    from .load import load_checkpoint_model
    from .source import load_tokenizer
    from .subword import SubwordVocab

    model, preset = load_checkpoint_model(path, device)
    stage = int(checkpoint.read_config(checkpoint.resolve_checkpoint(path)).get("stage", 1))
    stage_cfg = preset.stage1 if stage == 1 else preset.stage2
    stage_cfg.eval_batches = max_batches or 1 << 30  # iter_eval stops at the split's end
    vocab = SubwordVocab.from_tokenizer(load_tokenizer(preset.model.source))
    return Validator(preset, stage, manifest_uri, vocab, torch.device(device))(model)


def main(argv: list[str] | None = None) -> None:
    """python -m bolmo_core.evaluate CHECKPOINT --manifest M [--batches N]: val_* metrics as JSON."""
    import argparse
    import json
    import sys

    ap = argparse.ArgumentParser(prog="python -m bolmo_core.evaluate", description=main.__doc__)
    ap.add_argument("checkpoint", help="a checkpoint folder (step-N/, final/) or a stage output folder")
    ap.add_argument("--manifest", required=True, help="data manifest whose validation split is scored")
    ap.add_argument("--batches", type=int, default=None, help="only the first N micro-batches")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    from .checkpoint import CheckpointError
    from .source import quiet_progress_bars

    quiet_progress_bars()
    from .data import DataError
    from .load import LoadError
    from .storage import StorageError

    try:
        metrics = split_metrics(args.checkpoint, args.manifest, args.batches, args.device)
    except (EvalError, LoadError, DataError, CheckpointError, StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(json.dumps(metrics, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
