"""The training losses: the distillation losses, one small module per kind of task (each task module
in `tasks/` picks its own), and the teacher's own (`MemberLoss` for its sequence models,
`ClassifierLoss` for its text classifiers).

Each mixes a hard-label loss with a soft one against the teacher at temperature T, weighted by
`alpha` (a): (1 - a) * hard + a * T^2 * soft. The T^2 keeps the soft term's gradient on the
scale of the hard one's as T grows (Hinton et al., 2015), so a and T can be searched independently.
alpha = 0 is the no-distillation baseline: the soft term is then not computed at all.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from .models.seqrec import NextItemLoss
    from .models.teacher import SeqMember


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


class ClassificationKD(_KD):
    """(1-a) CE(y, s) + a T^2 sum_i v_i KL_i / B, KL_i = KL(softmax(t_i/T) || softmax(s_i/T)).

    student, teacher: [B, C] logits; labels: [B] class ids, -1 for a transfer text (no gold label,
    only the teacher's). CE is the mean over the labelled rows (0 when there are none), the KL term
    the mean over all rows. v_i = class_weight[argmax t_i] (class_weight: [C], see
    `class_balance_weights`), or 1 when class_weight is None. Weighting a row by the class its
    teacher picks gives the rare classes, which decide macro-F1 and which a small student's text
    bag otherwise gives up first, a share of the soft term closer to their share of the classes.
    """

    def __init__(self, temperature: float = 1.0, alpha: float = 0.5, class_weight: torch.Tensor | None = None):
        super().__init__(temperature, alpha)
        if class_weight is not None and (class_weight.ndim != 1 or bool((class_weight < 0).any())):
            raise ValueError("class_weight must be a 1-d tensor of non-negative weights, one per class")
        self.register_buffer("class_weight", None if class_weight is None else class_weight.float())

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        gold = labels >= 0
        hard = F.cross_entropy(student[gold], labels[gold]) if bool(gold.any()) else student.sum() * 0.0
        return self.mix(hard, lambda: self._soft(student, teacher))

    def _soft(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        t = self.temperature
        log_p = F.log_softmax(teacher / t, -1)
        kl = (log_p.exp() * (log_p - F.log_softmax(student / t, -1))).sum(-1)  # [B]
        if self.class_weight is not None:
            kl = kl * self.class_weight.to(kl.dtype)[teacher.argmax(-1)]
        return kl.mean()


def class_balance_weights(counts: torch.Tensor, power: float) -> torch.Tensor | None:
    """Per-class weights w_c proportional to (n_c + 1)^-power, scaled so that the mean weight over the
    rows that were counted is 1 (sum_c n_c w_c = sum_c n_c): the soft term keeps its overall scale,
    and power (0 = off, None returned; 1 = every class weighs the same in total) is searched
    independently of alpha. counts: [C] rows per class, e.g. the teacher's argmax over the train
    and transfer texts. Returns [C], or None for power 0."""
    if power < 0:
        raise ValueError(f"power must be >= 0, got {power}")
    if power == 0:
        return None
    n = counts.to(torch.float64)
    w = (n + 1) ** -power
    total = n.sum()
    return (w * total / (n * w).sum()).float() if total > 0 else torch.ones_like(w).float()


class CtrKD(_KD):
    """(1-a) BCE(y, sigmoid(s)) + a T^2 BCE(sigmoid(t/T), sigmoid(s/T)), batch mean.

    student, teacher: [B] logits; labels: [B] in {0, 1}.
    """

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        t = self.temperature
        return self.mix(F.binary_cross_entropy_with_logits(student, labels.to(student.dtype)),
                        lambda: F.binary_cross_entropy_with_logits(student / t, torch.sigmoid(teacher / t)))


class RecommendationKD(_KD):
    """(1-a) CE(next item, softmax over the catalogue) + a T^2 KL over the teacher's top-K list
    + b RD, where KL = KL(softmax(teacher_scores/T) || softmax(student scores of the same K items / T))
    and RD is ranking distillation (Tang & Wang, 2018): the teacher's first `rank_k` items are
    pseudo-positives weighted by their rank, w_r = exp(-r / rank_lambda) / sum_r' w_r' (r = 0, 1, ...),
    against items drawn uniformly from the catalogue as negatives:
        RD = mean_rows [ sum_r w_r * -log sigmoid(s[top_r]) + mean_j -log sigmoid(-s[neg_j]) ].
    The listwise KL matches the teacher's distribution over its list; RD adds where the list's head
    stands against the rest of the catalogue, which a small student's softmax otherwise spreads thin.

    scores: [B, N] student scores over the catalogue; target: [B] item ids;
    top_ids, top_scores: [B, K] the teacher's list (ids index N); negatives: [B, M] item ids
    (drawn uniformly from ids >= 2 when not given and b > 0; as in the paper a draw may hit the
    target or a list item, rare once the catalogue is much longer than K). The RD term is part of
    the distillation side: with a = 0 (no teacher) it is off whatever b is.
    """

    def __init__(self, temperature: float = 1.0, alpha: float = 0.5, rank_weight: float = 0.0, rank_k: int = 10,
                 rank_lambda: float = 5.0, rank_negatives: int = 16):
        super().__init__(temperature, alpha)
        if rank_weight < 0 or rank_k < 1 or rank_lambda <= 0 or rank_negatives < 1:
            raise ValueError("need rank_weight >= 0, rank_k >= 1, rank_lambda > 0 and rank_negatives >= 1")
        self.rank_weight, self.rank_k, self.rank_lambda, self.rank_negatives = \
            float(rank_weight), int(rank_k), float(rank_lambda), int(rank_negatives)

    def forward(self, scores: torch.Tensor, target: torch.Tensor, top_ids: torch.Tensor,
                top_scores: torch.Tensor, negatives: torch.Tensor | None = None) -> torch.Tensor:
        t = self.temperature
        loss = self.mix(F.cross_entropy(scores, target),
                        lambda: F.kl_div(F.log_softmax(scores.gather(1, top_ids) / t, -1),
                                         F.log_softmax(top_scores / t, -1), log_target=True,
                                         reduction="batchmean"))
        if self.alpha == 0 or self.rank_weight == 0:
            return loss
        k = min(self.rank_k, top_ids.shape[1])
        w = torch.exp(-torch.arange(k, dtype=scores.dtype, device=scores.device) / self.rank_lambda)
        w = w / w.sum()
        if negatives is None:
            negatives = torch.randint(2, scores.shape[1], (scores.shape[0], self.rank_negatives), device=scores.device)
        pos = -(F.logsigmoid(scores.gather(1, top_ids[:, :k])) * w).sum(1)
        neg = -F.logsigmoid(-scores.gather(1, negatives)).mean(1)
        return loss + self.rank_weight * (pos + neg).mean()

    def extra_repr(self) -> str:
        return super().extra_repr() + f", rank_weight={self.rank_weight}, rank_k={self.rank_k}"



# ------------------------------------------------------------------------------ the teacher's losses
class MemberLoss(nn.Module):
    """One step's losses of a teacher sequence model (what DDP synchronizes): forward(batch) ->
    {"next_item": [], "click": [], "total": []}, each term present when the batch has its rows.

    next_item: `next_item` (cross entropy, full or sampled softmax) at every position of
      batch["sequences"] [B, L] (left-padded item ids; position i predicts i + 1), times
      batch["sequence_weight"] (a float, the batch's targets over the epoch's mean; 1 without it);
    click: BCE of the click head on batch["ctr_history"] [C, H], batch["ctr_item"] [C],
      batch["ctr_slot"] [C] (-1: unknown) against batch["ctr_label"] [C] in {0, 1};
    total = sum_k weights[k] * term_k. With `ctr_trains_encoder` False the click loss stops at the
    head's inputs (user state, candidate vector): on Office, letting it into the sequence model cost
    validation NDCG@10.
    """

    TERMS = ("next_item", "click")

    def __init__(self, member: "SeqMember", next_item: "NextItemLoss", weights: dict[str, float],
                 ctr_trains_encoder: bool = False):
        super().__init__()
        unknown = set(weights) - set(self.TERMS)
        if unknown:
            raise ValueError(f"weights of unknown terms {sorted(unknown)}; the terms are {self.TERMS}")
        self.member, self.next_item, self.weights = member, next_item, weights
        self.ctr_trains_encoder = ctr_trains_encoder

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        items = self.member.item_vectors()
        out = {}
        if "sequences" in batch:
            seqs = batch["sequences"]
            states = self.member.seq.states(seqs[:, :-1], items)
            out["next_item"] = self.next_item(states, seqs[:, 1:], items, batch.get("generator")) \
                * batch.get("sequence_weight", 1.0)
        if "ctr_history" in batch:
            if self.member.ctr is not None and not self.ctr_trains_encoder:
                user = self.member.seq.user_vectors(batch["ctr_history"], items).detach()
                logits = self.member.ctr(user, items[batch["ctr_item"]].detach(), batch["ctr_item"], batch["ctr_slot"])
            else:
                logits = self.member.ctr_logits(batch["ctr_history"], batch["ctr_item"], batch["ctr_slot"], items)
            out["click"] = F.binary_cross_entropy_with_logits(logits, batch["ctr_label"])
        # started from a zero tied to the weights: a batch with no rows (a shard smaller than the
        # epoch's steps) still has a loss to backpropagate and to synchronize
        out["total"] = sum((self.weights[k] * v for k, v in out.items()), items.sum() * 0.0)
        return out


class ClassifierLoss(nn.Module):
    """Cross entropy of a text classifier: forward(batch) -> {"cross_entropy": [], "total": []}.

    batch: the classifier's text inputs (input_ids, attention_mask [B, T]; bag_ids, bag_offsets for
    its lexical bag) and "label" [B] class ids."""

    INPUTS = ("input_ids", "attention_mask", "bag_ids", "bag_offsets")

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        loss = F.cross_entropy(self.model(**{k: batch[k] for k in self.INPUTS if k in batch}), batch["label"])
        return {"cross_entropy": loss, "total": loss}
