"""What every rank-based head's loss shares, for torchvision's detectors (``detection``) and
transformers' DETRs (``detection_detr``): the ranking loss of a head (``RankingLoss``), the
score-weighted GIoU box loss balanced against it, and the paired IoU of boxes."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torchvision.ops import boxes as box_ops
from torchvision.ops import generalized_box_iou_loss

from . import functional, registry
from .balancing import SelfBalancingWeight

# the registry's losses by short name; aLRP's regression losses are the heads' per-positive GIoU losses
LOSSES_BY_SHORT = {spec.short: spec for spec in registry.LOSSES if registry.public(spec)}
ALRP_BALANCE_PERIOD = 500  # training steps per update of aLRP's self-balancing weight (the paper: an epoch)
MIN_QUALITY = 1e-6  # a positive whose box misses its ground truth still counts as positive

BOX_BALANCES = ("classification", "unit")  # RankingLoss.box_balance
BOX_WEIGHTINGS = ("score", "uniform")  # RankingLoss.box_weighting


@dataclass(frozen=True)
class RankingLoss:
    """Which ranking loss a rank-based head uses: ``loss``, a short name of ``registry.LOSSES``
    (brs, rs, bap, ap, alrp, balrp), its delta (None: the loss's default) and backend."""

    loss: str = "brs"
    delta: float | None = None
    backend: str = "auto"
    # the box loss's value: 1, or the classification loss's (RS-R-CNN's lambda = cls / box), which
    # localised worse on the example (docs/localisation.md)
    box_balance: str = "unit"
    # the positives' weights in the box loss: all equal, or their detached scores (RS-R-CNN)
    box_weighting: str = "uniform"
    # aLRP: the weight of the localisation part, per head (``dataclasses.replace`` makes a fresh one)
    balance: SelfBalancingWeight = field(init=False, repr=False, compare=False,
                                         default_factory=lambda: SelfBalancingWeight(ALRP_BALANCE_PERIOD))

    def __post_init__(self):
        if self.loss not in LOSSES_BY_SHORT:
            raise ValueError(f"loss must be one of {', '.join(LOSSES_BY_SHORT)}, got {self.loss!r}")
        if self.box_balance not in BOX_BALANCES:
            raise ValueError(f"box_balance must be one of {', '.join(BOX_BALANCES)}, got {self.box_balance!r}")
        if self.box_weighting not in BOX_WEIGHTINGS:
            raise ValueError(f"box_weighting must be one of {', '.join(BOX_WEIGHTINGS)}, got {self.box_weighting!r}")

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor, pred_boxes: torch.Tensor,
                 target_boxes: torch.Tensor, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The head's (classification, box) losses. ``targets``: IoU targets (> 0 positive, 0
        negative, < 0 ignored); ``pred_boxes``, ``target_boxes`` (P, 4) and ``scores`` (P,): the
        positives, in the flat order of ``targets > 0``.

        Ranking + sorting for (B)RS, the AP loss for (B)AP, each with the balanced GIoU box loss;
        for aLRP its classification part, and its localisation part with ``(1 - GIoU) / 2`` as the
        regression losses, times the self-balancing weight."""
        spec = LOSSES_BY_SHORT[self.loss]
        fn = getattr(functional, spec.function_name)
        delta = spec.delta if self.delta is None else self.delta
        if spec.regression:
            regression = generalized_box_iou_loss(pred_boxes, target_boxes, reduction="none") / 2
            classification, localisation = fn(logits, targets, regression.float(), delta, backend=self.backend)
            weight = self.balance.weight
            self.balance.record(classification, localisation)
            return classification, weight * localisation
        out = fn(logits, targets, delta, backend=self.backend)
        classification = out[0] + out[1] if isinstance(out, tuple) else out
        value = classification if self.box_balance == "classification" else torch.ones_like(classification)
        weights = scores if self.box_weighting == "score" else torch.ones_like(scores)
        return classification, balanced_giou_loss(pred_boxes, target_boxes, weights, value)


def paired_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """IoU of ``boxes1[i]`` with ``boxes2[i]`` ((N, 4) x1y1x2y2 each), without the N x N matrix
    that ``torchvision.ops.box_iou`` would build."""
    top_left = torch.maximum(boxes1[:, :2], boxes2[:, :2])
    bottom_right = torch.minimum(boxes1[:, 2:], boxes2[:, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(dim=1)
    union = box_ops.box_area(boxes1) + box_ops.box_area(boxes2) - inter
    return inter / union.clamp(min=torch.finfo(union.dtype).tiny)


def balanced_giou_loss(pred_boxes, target_boxes, scores, value) -> torch.Tensor:
    """GIoU loss of the positives, weighted by ``scores`` (detached; all ones for uniform weights),
    scaled to ``value`` (1, or the classification loss's as RS-R-CNN balances them) by a detached
    factor."""
    if pred_boxes.numel() == 0:
        return pred_boxes.sum() * 0.0
    weight = scores.detach()
    giou = generalized_box_iou_loss(pred_boxes, target_boxes, reduction="none")
    box_loss = (weight * giou).sum() / weight.sum().clamp(min=torch.finfo(weight.dtype).tiny)
    scale = value.detach() / box_loss.detach().clamp(min=1e-12)
    return scale * box_loss
