"""Bolmo loss functions (docs/architecture.md §4.3, §7.2, §8.4): pure tensor functions, each a mean per valid element.

Every function takes a boolean `mask` of valid elements and returns sum / max(count, 1), so the
value does not depend on how much padding a batch carries (the reference scales CE and the
distillation term by padded-slots / valid-bytes, docs/architecture.md §8.5; see `model.py`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOGP_CLIP = -1e-3  # BCE clips log p below 0 so log(1 - p) stays finite (docs/architecture.md §4.3)
KL_EPS = 1e-6  # binarised KL shifts both log-probs by -eps (docs/architecture.md §8.4)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over mask (0 when the mask is empty)."""
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, stable on both sides of -log 2 (Mächler 2012)."""
    x = x.clamp(max=-1e-12)
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def boundary_bce(logp: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """BCE on boundary log-probabilities: -[y log p + (1-y) log(1-p)], log p clipped at -1e-3."""
    lp = logp.float().clamp(max=LOGP_CLIP)
    y = labels.float()
    loss = -(y * lp + (1.0 - y) * log1mexp(lp))
    return masked_mean(loss, mask)


def binarised_kl(
    teacher_logp: torch.Tensor, student_logp: torch.Tensor, mask: torch.Tensor, tau: float = 5.0
) -> torch.Tensor:
    """KL(Bern(p_T^(1/tau)) || Bern(p_S^(1/tau))) per patch from log-likelihoods (docs/architecture.md §8.4)."""
    a = teacher_logp.float() / tau - KL_EPS
    b = student_logp.float() / tau - KL_EPS
    pa = a.exp()
    loss = pa * (a - b) + (1.0 - pa) * (log1mexp(a) - log1mexp(b))
    return masked_mean(loss, mask)


def encoder_l2(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Representation distance ||a - b|| / sqrt(d) per position (docs/architecture.md §8.4 `rep_compare_fn="l2"`)."""
    d = student.shape[-1]
    dist = (student.float() - teacher.float()).norm(dim=-1) / math.sqrt(d)
    return masked_mean(dist, mask)


def fused_ce(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on fused byte+boundary targets (docs/architecture.md §7.2), mean over valid bytes."""
    safe = labels.masked_fill(~mask, 0)
    ce = F.cross_entropy(logits.float().flatten(0, -2), safe.flatten(), reduction="none").view_as(labels)
    return masked_mean(ce, mask)


def byte_kl(target: torch.Tensor, student_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(target || student) per byte position over the fused ids, mean over masked positions.

    target (..., 520) probabilities (rows of masked-out positions may be anything finite),
    student_logp (..., 520) log-probabilities; zero-probability target entries contribute 0.
    """
    q = target.float()
    kl = (torch.xlogy(q, q) - q * student_logp.float()).sum(-1)
    return masked_mean(kl, mask)
