"""Distillation losses: student image embeddings against cached teacher embeddings.

Notation: s = student embeddings (n, D), t = teacher embeddings (n, D), both L2-normalised
by the caller (`Criterion`); Z = class-prompt text embeddings (K, D), normalised; labels in 0..K-1.

- `l2` (the paper's, sec. 3.4): mean over the batch of ||s_i - t_i||_2.
- `mse` (CLIP-KD's feature mimicry): mean over the batch of ||s_i - t_i||_2^2.
- `cosine`: mean over the batch of 1 - <s_i, t_i>.
- `contrastive-image` (paper A.7, eq. 1): InfoNCE of s_i against all t_k of the batch, positive
  t_i, learnable temperature; the batch mean (eq. 1 sums; the mean only rescales the lr).
- `clip`: InfoNCE of s_i against the K class-prompt embeddings, positive Z_{l_i}: cross-entropy
  over the classes, learnable temperature. Images of one class share their caption, which is
  why the texts side is the K classes and not the batch (no symmetric text->image term).
- `mp` (StableRep's multi-positive loss with class prompts as anchors, paper A.15):
  q_i(k) = softmax_k(<s_i, Z_k>/tau), p_i(k) = 1[l_i = k] / sum_j 1[l_j = k],
  L = -(1/K) sum_k sum_i p_i(k) log q_i(k); K counts all classes (those absent from the batch add 0).

Learnable temperatures are `logit_scale = log(1/tau)` parameters initialised like CLIP's
(ln(1/0.07)) and clamped at 100 (CLIP's cap) when used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

CLIP_LOGIT_SCALE_INIT = math.log(1 / 0.07)
MAX_LOGIT_SCALE = 100.0


def l2_loss(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return (s - t).norm(dim=-1).mean()


def mse_loss(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return (s - t).pow(2).sum(-1).mean()


def cosine_loss(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return (1 - (s * t).sum(-1)).mean()


def contrastive_image_loss(s: torch.Tensor, t: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    logits = scale * s @ t.T
    return F.cross_entropy(logits, torch.arange(len(s), device=s.device))


def clip_loss(s: torch.Tensor, text: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    return F.cross_entropy(scale * s @ text.T, labels)


def mp_loss(s: torch.Tensor, text: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    log_q = F.log_softmax(scale * s @ text.T, dim=-1)  # (n, K)
    onehot = F.one_hot(labels, text.shape[0]).to(log_q.dtype)  # (n, K)
    p = onehot / onehot.sum(0).clamp(min=1)  # p_i(k): each present class's mass spread over its images
    return -(p * log_q).sum() / text.shape[0]


@dataclass(frozen=True)
class Loss:
    fn: Callable[..., torch.Tensor]  # (s, t) or, with needs_text, (s, text, labels); then the scale if scaled
    needs_text: bool = False  # compares with the class embeddings (and needs labels), not the teacher's
    scaled: bool = False  # takes a learnable temperature


# Every loss `--loss` accepts, in the order its help and errors list them.
LOSSES = {
    "l2": Loss(l2_loss),
    "mse": Loss(mse_loss),
    "cosine": Loss(cosine_loss),
    "contrastive-image": Loss(contrastive_image_loss, scaled=True),
    "clip": Loss(clip_loss, needs_text=True, scaled=True),
    "mp": Loss(mp_loss, needs_text=True, scaled=True),
}


def needs_text(weights) -> bool:
    """Whether any of these losses needs class embeddings."""
    return any(LOSSES[name].needs_text for name in weights)


class Criterion(nn.Module):
    """A weighted sum of losses; holds the learnable temperatures and the class-prompt embeddings."""

    def __init__(self, weights: dict[str, float], text: torch.Tensor | None = None):
        super().__init__()
        unknown = set(weights) - set(LOSSES)
        assert not unknown, f"unknown losses {unknown}"
        self.weights = dict(weights)
        self.logit_scales = nn.ParameterDict({
            name.replace("-", "_"): nn.Parameter(torch.tensor(CLIP_LOGIT_SCALE_INIT))
            for name in weights if LOSSES[name].scaled})
        self.register_buffer("text", text if text is not None else torch.zeros(0), persistent=False)

    def scale(self, name: str) -> torch.Tensor:
        return self.logit_scales[name.replace("-", "_")].exp().clamp(max=MAX_LOGIT_SCALE)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor):
        """(total loss, {term: value}) on unnormalised student and (normalised) teacher embeddings."""
        s = F.normalize(student.float(), dim=-1)
        t = F.normalize(teacher.float(), dim=-1)
        terms = {}
        for name in self.weights:
            loss = LOSSES[name]
            args = (s, self.text, labels) if loss.needs_text else (s, t)
            terms[name] = loss.fn(*args, self.scale(name)) if loss.scaled else loss.fn(*args)
        total = sum(self.weights[n] * v for n, v in terms.items())
        return total, terms
