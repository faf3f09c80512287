"""Distillation losses, one small module per task (DESIGN.md "Student").

Each mixes a hard-label loss with a soft one against the teacher at temperature T, weighted by
`alpha` (a): (1 - a) * hard + a * T^2 * soft. The T^2 keeps the soft term's gradient on the
scale of the hard one's as T grows (Hinton et al., 2015), so a and T can be searched independently.
alpha = 0 is the no-distillation baseline: the soft term is then not computed at all.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _KD(nn.Module):
    def __init__(self, temperature: float = 1.0, alpha: float = 0.5):
        super().__init__()
        if temperature <= 0 or not 0 <= alpha <= 1:
            raise ValueError(f"need temperature > 0 and 0 <= alpha <= 1, got {temperature} and {alpha}")
        self.temperature, self.alpha = float(temperature), float(alpha)

    def mix(self, hard: torch.Tensor, soft) -> torch.Tensor:
        if self.alpha == 0:
            return hard
        return (1 - self.alpha) * hard + self.alpha * self.temperature ** 2 * soft()

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, alpha={self.alpha}"


class IntentKD(_KD):
    """(1-a) CE(y, s) + a T^2 KL(softmax(t/T) || softmax(s/T)), batch mean.

    student, teacher: [B, C] logits; labels: [B] class ids.
    """

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        t = self.temperature
        return self.mix(F.cross_entropy(student, labels),
                        lambda: F.kl_div(F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1),
                                         log_target=True, reduction="batchmean"))


class CtrKD(_KD):
    """(1-a) BCE(y, sigmoid(s)) + a T^2 BCE(sigmoid(t/T), sigmoid(s/T)), batch mean.

    student, teacher: [B] logits; labels: [B] in {0, 1}.
    """

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        t = self.temperature
        return self.mix(F.binary_cross_entropy_with_logits(student, labels.to(student.dtype)),
                        lambda: F.binary_cross_entropy_with_logits(student / t, torch.sigmoid(teacher / t)))


class RecommendationKD(_KD):
    """(1-a) CE(next item, softmax over the catalogue) + a T^2 KL over the teacher's top-K list:
    KL(softmax(teacher_scores/T) || softmax(student scores of the same K items / T)).

    scores: [B, N] student scores over the catalogue; target: [B] item ids;
    top_ids, top_scores: [B, K] the teacher's list (ids index N).
    """

    def forward(self, scores: torch.Tensor, target: torch.Tensor, top_ids: torch.Tensor,
                top_scores: torch.Tensor) -> torch.Tensor:
        t = self.temperature
        return self.mix(F.cross_entropy(scores, target),
                        lambda: F.kl_div(F.log_softmax(scores.gather(1, top_ids) / t, -1),
                                         F.log_softmax(top_scores / t, -1), log_target=True,
                                         reduction="batchmean"))


LOSSES = {"recommendation": RecommendationKD, "ctr": CtrKD, "intent": IntentKD}
