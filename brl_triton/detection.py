"""Rank-based torchvision detectors: Faster R-CNN as in RS-R-CNN / BRS-R-CNN, and RetinaNet.

``convert_to_rank_based(model, loss="brs")`` swaps, in place, the parts of a torchvision
``FasterRCNN`` (any backbone) or ``RetinaNet`` that compute losses for subclasses that use a
ranking loss of this library:

- RPN: no sampling, every non-ignored anchor of the batch in one ranking; the positive target
  is the IoU of the (detached) decoded box with its ground truth; box loss: GIoU of positives,
  weighted by their detached scores and normalised by the sum of weights, scaled by
  ``lambda = classification loss / box loss`` (detached), so no loss weight is tuned; both
  multiplied by ``rpn_weight`` (0.2).
- RoI head: sigmoid classification over the foreground classes (the predictor's background
  column is left unused), all proposals (no 512-RoI subsampling), one ranking over all RoIs x
  classes of the batch with IoU targets; class-specific GIoU with the same weighting and
  balancing; inference scores are sigmoids.
- RetinaNet: the focal loss replaced by the ranking loss over all anchors x classes of the batch
  (IoU targets, ignored anchors ignored), GIoU box loss as above.

Needs torchvision (``pip install brl_triton[examples]``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

try:
    from torchvision.models.detection import FasterRCNN, RetinaNet
    from torchvision.models.detection.retinanet import RetinaNetHead
    from torchvision.models.detection.roi_heads import RoIHeads
    from torchvision.models.detection.rpn import RegionProposalNetwork
    from torchvision.ops import boxes as box_ops
    from torchvision.ops import generalized_box_iou_loss
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "brl_triton.detection needs torchvision: pip install 'brl_triton[examples]'"
    ) from error

from . import functional

__all__ = [
    "RankingLoss",
    "RankBasedRPN",
    "RankBasedRoIHeads",
    "RankBasedRetinaNetHead",
    "convert_to_rank_based",
    "iou_from_deltas",
    "paired_box_iou",
]

_LOSSES = {
    "brs": (functional.bucketed_rank_sort_loss, 0.5),
    "rs": (functional.rank_sort_loss, 0.5),
    "bap": (functional.bucketed_ap_loss, 1.0),
    "ap": (functional.ap_loss, 1.0),
}
_MIN_QUALITY = 1e-6  # a positive whose box misses its ground truth still counts as positive


@dataclass(frozen=True)
class RankingLoss:
    """Which ranking loss a rank-based head uses: ``loss`` in brs/rs/bap/ap, its delta (None:
    the loss's default) and backend."""

    loss: str = "brs"
    delta: float | None = None
    backend: str = "auto"

    def __post_init__(self):
        if self.loss not in _LOSSES:
            raise ValueError(f"loss must be one of {', '.join(_LOSSES)}, got {self.loss!r}")

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The classification loss: ranking + sorting for (B)RS, the AP loss for (B)AP."""
        fn, default_delta = _LOSSES[self.loss]
        out = fn(logits, targets, default_delta if self.delta is None else self.delta, backend=self.backend)
        return out[0] + out[1] if isinstance(out, tuple) else out


def paired_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """IoU of ``boxes1[i]`` with ``boxes2[i]`` ((N, 4) x1y1x2y2 each), without the N x N matrix."""
    top_left = torch.maximum(boxes1[:, :2], boxes2[:, :2])
    bottom_right = torch.minimum(boxes1[:, 2:], boxes2[:, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(dim=1)
    union = box_ops.box_area(boxes1) + box_ops.box_area(boxes2) - inter
    return inter / union.clamp(min=torch.finfo(union.dtype).tiny)


def _decode_from_unit_box(box_coder, deltas: torch.Tensor) -> torch.Tensor:
    """Decode deltas against the box [0, 0, 1, 1]. Decoding against a real reference box is a
    per-axis affine map of this, which leaves IoU and GIoU of two boxes unchanged."""
    unit = deltas.new_tensor([0.0, 0.0, 1.0, 1.0]).expand(deltas.shape[0], 4)
    return box_coder.decode_single(deltas, unit)


def iou_from_deltas(box_coder, pred_deltas: torch.Tensor, target_deltas: torch.Tensor) -> torch.Tensor:
    """IoU of the boxes that ``pred_deltas`` and ``target_deltas`` decode to from the same
    reference box (anchor or proposal), whatever that box is."""
    return paired_box_iou(_decode_from_unit_box(box_coder, pred_deltas), _decode_from_unit_box(box_coder, target_deltas))


def balanced_giou_loss(pred_boxes, target_boxes, scores, classification_loss) -> torch.Tensor:
    """Score-weighted GIoU loss of the positives, scaled to the classification loss' value."""
    if pred_boxes.numel() == 0:
        return pred_boxes.sum() * 0.0
    weight = scores.detach()
    giou = generalized_box_iou_loss(pred_boxes, target_boxes, reduction="none")
    box_loss = (weight * giou).sum() / weight.sum().clamp(min=torch.finfo(weight.dtype).tiny)
    scale = classification_loss.detach() / box_loss.detach().clamp(min=1e-12)
    return scale * box_loss


def _positive_terms(box_coder, pred_deltas, target_deltas):
    """Decoded boxes of the positives and their (detached) IoU quality targets."""
    pred_boxes = _decode_from_unit_box(box_coder, pred_deltas)
    target_boxes = _decode_from_unit_box(box_coder, target_deltas)
    quality = paired_box_iou(pred_boxes.detach(), target_boxes).clamp(min=_MIN_QUALITY)
    return pred_boxes, target_boxes, quality


class RankBasedRPN(RegionProposalNetwork):
    """torchvision's RPN with the ranking loss of RS-R-CNN (see the module docstring)."""

    ranking: RankingLoss
    loss_weight: float

    def compute_loss(self, objectness, pred_bbox_deltas, labels, regression_targets):
        objectness = objectness.flatten()
        labels = torch.cat(labels, dim=0)  # 1: positive, 0: negative, -1: between thresholds
        regression_targets = torch.cat(regression_targets, dim=0)
        positive = torch.where(labels == 1)[0]
        pred_boxes, target_boxes, quality = _positive_terms(
            self.box_coder, pred_bbox_deltas[positive], regression_targets[positive]
        )
        targets = labels.to(objectness.dtype).index_put((positive,), quality.to(objectness.dtype))
        classification = self.ranking(objectness, targets)
        box = balanced_giou_loss(pred_boxes, target_boxes, objectness[positive].sigmoid(), classification)
        return self.loss_weight * classification, self.loss_weight * box


class RankBasedRoIHeads(RoIHeads):
    """torchvision's box RoI head with sigmoid classification trained by a ranking loss."""

    ranking: RankingLoss

    def subsample(self, labels):
        return [torch.where(labels_in_image >= 0)[0] for labels_in_image in labels]  # all but ignored

    def forward(self, features, proposals, image_shapes, targets=None):
        if not self.training:
            return super().forward(features, proposals, image_shapes, targets)
        proposals, _, labels, regression_targets = self.select_training_samples(proposals, targets)
        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(box_features)
        return [], self.ranking_losses(class_logits, box_regression, labels, regression_targets)

    def ranking_losses(self, class_logits, box_regression, labels, regression_targets):
        labels = torch.cat(labels, dim=0)
        regression_targets = torch.cat(regression_targets, dim=0)
        logits = class_logits[:, 1:]  # foreground classes; column 0 (background) is not used
        positive = torch.where(labels > 0)[0]
        classes = labels[positive]
        pred_deltas = box_regression.reshape(class_logits.shape[0], -1, 4)[positive, classes]
        pred_boxes, target_boxes, quality = _positive_terms(self.box_coder, pred_deltas, regression_targets[positive])
        targets = torch.zeros_like(logits)
        targets[positive, classes - 1] = quality.to(logits.dtype)
        classification = self.ranking(logits, targets)
        scores = logits[positive, classes - 1].sigmoid()
        box = balanced_giou_loss(pred_boxes, target_boxes, scores, classification)
        return {"loss_classifier": classification, "loss_box_reg": box}

    def postprocess_detections(self, class_logits, box_regression, proposals, image_shapes):
        """As torchvision's, with independent sigmoid scores per foreground class."""
        num_classes = class_logits.shape[-1]
        boxes_per_image = [boxes_in_image.shape[0] for boxes_in_image in proposals]
        pred_boxes = self.box_coder.decode(box_regression, proposals).split(boxes_per_image, 0)
        pred_scores = torch.sigmoid(class_logits).split(boxes_per_image, 0)
        all_boxes, all_scores, all_labels = [], [], []
        for boxes, scores, image_shape in zip(pred_boxes, pred_scores, image_shapes):
            boxes = box_ops.clip_boxes_to_image(boxes, image_shape)[:, 1:].reshape(-1, 4)
            labels = torch.arange(num_classes, device=scores.device).expand_as(scores)[:, 1:].reshape(-1)
            scores = scores[:, 1:].reshape(-1)
            keep = torch.where(scores > self.score_thresh)[0]
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            keep = box_ops.remove_small_boxes(boxes, min_size=1e-2)
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            keep = box_ops.batched_nms(boxes, scores, labels, self.nms_thresh)[: self.detections_per_img]
            all_boxes.append(boxes[keep])
            all_scores.append(scores[keep])
            all_labels.append(labels[keep])
        return all_boxes, all_scores, all_labels


class RankBasedRetinaNetHead(RetinaNetHead):
    """RetinaNet's head with the focal loss replaced by a ranking loss and GIoU box loss."""

    ranking: RankingLoss

    def compute_loss(self, targets, head_outputs, anchors, matched_idxs):
        cls_logits = head_outputs["cls_logits"]  # (B, anchors, classes)
        bbox_regression = head_outputs["bbox_regression"]
        box_coder = self.regression_head.box_coder
        quality_targets = torch.zeros_like(cls_logits)
        pred_boxes, target_boxes, scores = [], [], []
        for image, (target, matched) in enumerate(zip(targets, matched_idxs)):
            quality_targets[image, matched == self.classification_head.BETWEEN_THRESHOLDS] = -1
            foreground = torch.where(matched >= 0)[0]
            if foreground.numel() == 0:
                continue
            gt_boxes = target["boxes"][matched[foreground]]
            gt_labels = target["labels"][matched[foreground]]
            boxes = box_coder.decode_single(bbox_regression[image, foreground], anchors[image][foreground])
            quality = paired_box_iou(boxes.detach(), gt_boxes).clamp(min=_MIN_QUALITY)
            quality_targets[image, foreground, gt_labels] = quality.to(cls_logits.dtype)
            pred_boxes.append(boxes)
            target_boxes.append(gt_boxes)
            scores.append(cls_logits[image, foreground, gt_labels].sigmoid())
        classification = self.ranking(cls_logits, quality_targets)
        if pred_boxes:
            box = balanced_giou_loss(torch.cat(pred_boxes), torch.cat(target_boxes), torch.cat(scores), classification)
        else:
            box = bbox_regression.sum() * 0.0
        return {"classification": classification, "bbox_regression": box}


def _retype(module: torch.nn.Module, cls, **settings):
    """The same module (submodules, parameters, buffers, settings) as an instance of ``cls``."""
    converted = cls.__new__(cls)
    converted.__dict__.update(module.__dict__)
    for name, value in settings.items():
        setattr(converted, name, value)
    return converted


def convert_to_rank_based(model, loss: str = "brs", *, delta: float | None = None, backend: str = "auto",
                          rpn_weight: float = 0.2):
    """Turn a torchvision ``FasterRCNN`` or ``RetinaNet`` into its rank-based version, in place.

    Args:
        model: ``torchvision.models.detection.FasterRCNN`` (any backbone; box detection only, not
            Mask/Keypoint R-CNN) or ``RetinaNet``, pretrained or not. Its parameters are kept.
        loss: ``"brs"`` (bucketed Rank & Sort, default), ``"rs"``, ``"bap"`` or ``"ap"``.
        delta: smoothing width of the ranking loss; None for the loss's default.
        backend: the ranking loss's backend (``"auto"``, ``"torch"``, ``"triton"``).
        rpn_weight: factor on the whole RPN loss (Faster R-CNN).

    Returns:
        The same model object. Its training losses keep torchvision's names; classification
        targets are IoUs (> 0 positive), 0 negative, -1 ignored, as ``brl_triton`` expects.

    Example:
        >>> from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_fpn
        >>> model = convert_to_rank_based(fasterrcnn_mobilenet_v3_large_fpn(num_classes=11), "brs")
    """
    ranking = RankingLoss(loss, delta, backend)
    if isinstance(model, FasterRCNN):
        if model.roi_heads.has_mask() or model.roi_heads.has_keypoint():
            raise ValueError("convert_to_rank_based supports box detection only, not Mask/Keypoint R-CNN heads")
        model.rpn = _retype(model.rpn, RankBasedRPN, ranking=ranking, loss_weight=rpn_weight)
        model.roi_heads = _retype(model.roi_heads, RankBasedRoIHeads, ranking=ranking)
    elif isinstance(model, RetinaNet):
        model.head = _retype(model.head, RankBasedRetinaNetHead, ranking=ranking)
    else:
        raise TypeError(f"model must be a torchvision FasterRCNN or RetinaNet, got {type(model).__name__}")
    return model
