"""lm-evaluation-harness adapter for byte models, registered as model ``byteify``.

    import bolmo_core.lm_eval_adapter  # registers the model name
    lm_eval.simple_evaluate(model="byteify", model_args="pretrained=CHECKPOINT_DIR", tasks=[...])

(lm-eval has no plugin discovery for models, so its own CLI does not see ``byteify``
unless this module is imported first.)

Scores are byte log-likelihoods with folding, p(byte v) = p(v) + p(v + 260) (docs/architecture.md §1.1,
§13.1), over BOS + context + continuation, with the boundaries the model would place while
generating (causal, `evaluate.score_bytes`, the same figure as the headline bits per byte);
`boundaries="lookahead"` scores with the predictor's one-byte-ahead boundaries instead. Inputs longer than the model's byte length keep BOS and the last bytes
(the context is cut from the left); `loglikelihood_rolling` scores disjoint windows of the
byte length, each after BOS, like `evaluate.py` (no context carried across windows). `generate_until` goes through `bolmo_core.generate`.
Optional dependency: ``pip install byteify[eval]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from .byte_tokenizer import BOS, OFFSET, PAD, fold_logprobs
from .evaluate import EvalError, next_byte_logp, score_bytes
from .subword import RetainedIndex, get_vocab


def _byte_ids(text: str) -> list[int]:
    return [b + OFFSET for b in text.encode("utf-8")]


@register_model("byteify")
class ByteifyLM(LM):
    """A BolmoModel behind lm-eval's LM interface (bytes in, folded byte log-probs out)."""

    def __init__(
        self,
        pretrained: str | None = None,
        model=None,
        tokenizer=None,
        max_length: int | None = None,
        batch_size: int | str = 4,
        device: str = "cpu",
        max_gen_bytes: int = 256,
        boundaries: str = "causal",
        **_ignored,
    ):
        super().__init__()
        if model is None:
            if pretrained is None:
                raise EvalError("byteify lm-eval model: give model_args pretrained=<checkpoint folder>")
            from .load import load_byte_model
            from .source import load_tokenizer

            model, preset = load_byte_model(pretrained, device=device)
            tokenizer = tokenizer or load_tokenizer(preset.model.source)
            max_length = max_length or preset.data.byte_slots
        if tokenizer is None:
            raise EvalError("byteify lm-eval model: an in-memory model needs its source tokenizer")
        self.model = model.eval()
        self.vocab = get_vocab(tokenizer)
        self.retained = RetainedIndex(self.vocab)
        self.max_length = int(max_length or 4096)
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 4
        self.max_gen_bytes = int(max_gen_bytes)
        if boundaries not in ("causal", "lookahead"):
            raise EvalError(f"byteify lm-eval model: boundaries={boundaries!r}, expected causal or lookahead")
        self.boundaries = boundaries
        self._device = next(model.parameters()).device

    # ------------------------------------------------------------ scoring

    def _fit(self, ids: list[int], n_score: int) -> tuple[list[int], int]:
        """BOS + the last bytes that fit in max_length; the scored tail is kept whole if possible."""
        room = self.max_length - 1
        n_score = min(n_score, room)
        return [BOS, *ids[-room:]], n_score

    @torch.no_grad()
    def _score(self, rows: Sequence[tuple[list[int], int]]) -> list[tuple[float, bool]]:
        """(Σ folded log p of the last n ids, all of them greedy) for rows of (ids with BOS first, n)."""
        out: list[tuple[float, bool]] = []
        for b in range(0, len(rows), self.batch_size):
            chunk = rows[b : b + self.batch_size]
            width = max(len(ids) for ids, _ in chunk)
            input_ids = torch.full((len(chunk), width), PAD, dtype=torch.long)
            for r, (ids, _) in enumerate(chunk):
                input_ids[r, : len(ids)] = torch.tensor(ids)
            expanded = torch.as_tensor(self.retained.expand(input_ids.numpy()), dtype=torch.long)
            expanded[input_ids == BOS] = self.vocab.doc_separator_id
            expanded[input_ids == PAD] = self.vocab.pad_id
            input_ids, expanded = input_ids.to(self._device), expanded.to(self._device)
            logp = self._folded_logp(input_ids, expanded)
            for r, (ids, n) in enumerate(chunk):
                tgt = input_ids[r, len(ids) - n : len(ids)]
                lp = logp[r, len(ids) - n - 1 : len(ids) - 1]
                score = float(lp.gather(-1, tgt[:, None]).double().sum())
                greedy = bool((lp.argmax(-1) == tgt).all())
                out.append((score, greedy))
        return out

    def _folded_logp(self, input_ids: torch.Tensor, expanded: torch.Tensor) -> torch.Tensor:
        """(B, L, 260) folded log p of the next byte at every position, on the chosen boundaries."""
        mask = input_ids != PAD
        if self.boundaries == "causal":  # the fixed point, keeping whole rows for the greedy check
            return score_bytes(self.model, input_ids, expanded, mask, full=True).folded
        h, pred_logp, _ = self.model.encode(input_ids, expanded)  # look-ahead: one forward
        b = self.model.boundary_predictor.decide(pred_logp) & mask
        logits, _ = next_byte_logp(self.model, h, input_ids, b, mask)
        return fold_logprobs(torch.log_softmax(logits, dim=-1))

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        rows = []
        for req in requests:
            context, continuation = req.args
            cont = _byte_ids(continuation)
            rows.append(self._fit(_byte_ids(context) + cont, len(cont)))
        return self._score(rows)

    def loglikelihood_rolling(self, requests) -> list[float]:
        """Every byte scored once, in disjoint windows of max_length - 1 bytes, each after BOS (as evaluate.py)."""
        room = self.max_length - 1
        results = []
        for req in requests:
            (text,) = req.args
            ids = _byte_ids(text)
            rows = [([BOS, *ids[s : s + room]], len(ids[s : s + room])) for s in range(0, len(ids), room)]
            results.append(sum(score for score, _ in self._score(rows)))
        return results

    # ------------------------------------------------------------ generation

    def generate_until(self, requests) -> list[str]:
        try:
            from .generate import generate
        except ImportError:
            raise EvalError(
                "byteify lm-eval model: generate_until needs bolmo_core.generate, which is not available"
            ) from None
        outs = []
        for req in requests:
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            budget = int(kwargs.pop("max_gen_toks", self.max_gen_bytes))
            if kwargs.pop("do_sample", False) or kwargs.get("temperature", 0.0) not in (0, 0.0, None):
                raise EvalError("byteify lm-eval model: only greedy generation is supported here")
            text = generate(self.model, [context.encode("utf-8")], max_new_bytes=budget)[0]
            text = text.decode("utf-8", errors="replace")
            cut = min((text.find(u) for u in until if u and u in text), default=len(text))
            outs.append(text[:cut])
        return outs
