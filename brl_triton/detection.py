"""Rank-based torchvision detectors: Faster R-CNN and Mask R-CNN as in RS-R-CNN / RS-Mask R-CNN,
RetinaNet, and FCOS as the RS papers train ATSS.

``convert_to_rank_based(model, loss="brs")`` swaps, in place, the parts of a torchvision
``FasterRCNN``, ``MaskRCNN``, ``RetinaNet`` or ``FCOS`` (any backbone) that compute losses for
subclasses that use a ranking loss of this library, and sets the model's recipe settings (box
coder, proposal counts, inference thresholds) to those of the official RS configs:

- RPN: no sampling, every non-ignored anchor of the batch in one ranking; the positive target
  is the IoU of the (detached) decoded box with its ground truth; box loss: the mean GIoU loss
  of the positives, scaled to 1 by a detached factor, so no loss weight is tuned; both multiplied
  by ``rpn_weight`` (0.2). RS-R-CNN instead weights the positives by their detached scores and
  scales the box loss to the classification loss's value (``box_weighting="score"``,
  ``box_balance="classification"``), which localised worse on the example
  (docs/localisation.md).
- RoI head: sigmoid classification over the foreground classes (the predictor's background
  column is left unused), all proposals (no 512-RoI subsampling), one ranking over all RoIs x
  classes of the batch with IoU targets; class-specific GIoU with the same weighting and
  balancing; inference scores are sigmoids.
- Mask R-CNN: the RPN and RoI classification as above; the mask head and its loss are
  torchvision's, trained on the positive RoIs (at most 200 of the batch, as RS-Mask R-CNN).
- RetinaNet: the focal loss replaced by the ranking loss over all anchors x classes of the batch
  (IoU targets, ignored anchors ignored), GIoU box loss as above.
- FCOS: as RetinaNet over FCOS's locations (its centre sampling and scale ranges pick the
  positives); the centerness branch is dropped, see :func:`convert_to_rank_based`.
- ``loss="alrp"`` / ``"balrp"`` (aLRP, exact or bucketed): every head's classification and box
  losses become aLRP's two parts, with ``(1 - GIoU) / 2`` of each positive as its regression loss
  and aLRP's self-balancing weight on the localisation part (one ``SelfBalancingWeight`` per head,
  updated every ``ALRP_BALANCE_PERIOD`` training steps).

Needs torchvision (``pip install brl_triton[examples]``).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

try:
    from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
    from torchvision.models.detection import _utils as det_utils
    from torchvision.models.detection.fcos import FCOSHead
    from torchvision.models.detection.retinanet import RetinaNetHead
    from torchvision.models.detection.roi_heads import RoIHeads, maskrcnn_loss
    from torchvision.models.detection.rpn import RegionProposalNetwork
    from torchvision.models.detection.ssd import SSD
    from torchvision.ops import boxes as box_ops
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "brl_triton.detection needs torchvision: pip install 'brl_triton[examples]'"
    ) from error

from ._head_losses import LOSSES_BY_SHORT, MIN_QUALITY, RankingLoss, paired_box_iou

__all__ = [
    "RankingLoss",
    "RankBasedRPN",
    "RankBasedRoIHeads",
    "RankBasedRetinaNetHead",
    "RankBasedFCOSHead",
    "RankBasedFCOS",
    "convert_to_rank_based",
    "init_box_predictor",
    "iou_from_deltas",
    "paired_box_iou",
]

# The model settings of the official configs (RS-R-CNN and RS-Mask R-CNN, RS-ATSS for the
# one-stage detectors) that convert_to_rank_based applies.
RPN_BOX_CODER_WEIGHTS = (10.0, 10.0, 5.0, 5.0)  # DeltaXYWH target stds (0.1, 0.1, 0.2, 0.2)
RPN_PRE_NMS_TOP_N = {"training": 2000, "testing": 1000}  # per feature level
RPN_POST_NMS_TOP_N = {"training": 1000, "testing": 1000}  # proposals per image
ROI_SCORE_THRESH = 0.40
ROI_NMS_THRESH = 0.5
DENSE_TOPK_CANDIDATES = 1000  # per feature level, before NMS
DENSE_NMS_THRESH = 0.6
DENSE_SCORE_THRESH = 0.0  # selection by rank only; see convert_to_rank_based
DETECTIONS_PER_IMAGE = 100
MASK_POSITIVES_PER_BATCH = 200


def _decode_from_unit_box(box_coder, deltas: torch.Tensor) -> torch.Tensor:
    """Decode deltas against the box [0, 0, 1, 1]. Decoding against a real reference box is a
    per-axis affine map of this, which leaves IoU and GIoU of two boxes unchanged."""
    unit = deltas.new_tensor([0.0, 0.0, 1.0, 1.0]).expand(deltas.shape[0], 4)
    return box_coder.decode_single(deltas, unit)


def iou_from_deltas(box_coder, pred_deltas: torch.Tensor, target_deltas: torch.Tensor) -> torch.Tensor:
    """IoU of the boxes that ``pred_deltas`` and ``target_deltas`` decode to from the same
    reference box (anchor or proposal), whatever that box is."""
    return paired_box_iou(_decode_from_unit_box(box_coder, pred_deltas), _decode_from_unit_box(box_coder, target_deltas))


def _decoded_positives(box_coder, pred_deltas, target_deltas):
    """Decoded boxes of the positives and their (detached) IoU quality targets."""
    pred_boxes = _decode_from_unit_box(box_coder, pred_deltas)
    target_boxes = _decode_from_unit_box(box_coder, target_deltas)
    quality = paired_box_iou(pred_boxes.detach(), target_boxes).clamp(min=MIN_QUALITY)
    return pred_boxes, target_boxes, quality


class RankBasedRPN(RegionProposalNetwork):
    """torchvision's RPN with the ranking loss of RS-R-CNN (see the module docstring).

    Its buffer ``box_coder_weights`` says which box coder the regression layer's outputs are
    for. A state dict saved for other weights, or without it and saved before conversion (for
    ``unconverted_box_coder_weights``), has the layer rescaled as it loads, so that loading
    before or after :func:`convert_to_rank_based` gives the same model. A whole converted
    model's state dict saved before the buffer existed is told apart by its RoI classifier
    (:func:`_mark_converted_rpn`)."""

    ranking: RankingLoss
    loss_weight: float
    box_coder_weights: torch.Tensor
    unconverted_box_coder_weights: tuple[float, float, float, float]

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # state_dict is load_state_dict's own copy: replacing its entries leaves the caller's alone
        key = prefix + "box_coder_weights"
        saved_for = state_dict.get(key, torch.tensor(self.unconverted_box_coder_weights))
        scale = self.box_coder_weights.cpu() / torch.as_tensor(saved_for, dtype=torch.float32).cpu()
        for name in ("head.bbox_pred.weight", "head.bbox_pred.bias"):
            if prefix + name in state_dict and not bool((scale == 1).all()):
                state_dict[prefix + name] = _rescaled_rpn_regression(state_dict[prefix + name], scale)
        state_dict[key] = self.box_coder_weights.clone()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def compute_loss(self, objectness, pred_bbox_deltas, labels, regression_targets):
        objectness = objectness.flatten()
        labels = torch.cat(labels, dim=0)  # 1: positive, 0: negative, -1: between thresholds
        regression_targets = torch.cat(regression_targets, dim=0)
        positive = torch.where(labels == 1)[0]
        pred_boxes, target_boxes, quality = _decoded_positives(
            self.box_coder, pred_bbox_deltas[positive], regression_targets[positive]
        )
        targets = labels.to(objectness.dtype).index_put((positive,), quality.to(objectness.dtype))
        classification, box = self.ranking(objectness, targets, pred_boxes, target_boxes, objectness[positive].sigmoid())
        return self.loss_weight * classification, self.loss_weight * box


class RankBasedRoIHeads(RoIHeads):
    """torchvision's RoI heads with sigmoid box classification trained by a ranking loss; a mask
    head, if any, is torchvision's, trained on positive RoIs."""

    ranking: RankingLoss
    mask_positives_per_batch: int = MASK_POSITIVES_PER_BATCH

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # a classifier saved before conversion is re-expressed against its background row as it
        # loads, as the conversion did (a no-op on a converted one: its background row is zero)
        weight, bias = prefix + "box_predictor.cls_score.weight", prefix + "box_predictor.cls_score.bias"
        if weight in state_dict and isinstance(getattr(self.box_predictor, "cls_score", None), nn.Linear):
            state_dict[weight] = _against_background(state_dict[weight])
            if bias in state_dict:
                state_dict[bias] = _against_background(state_dict[bias])
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def subsample(self, labels):
        return [torch.where(labels_in_image >= 0)[0] for labels_in_image in labels]  # all but ignored

    def forward(self, features, proposals, image_shapes, targets=None):
        if not self.training:
            return super().forward(features, proposals, image_shapes, targets)
        proposals, matched_idxs, labels, regression_targets = self.select_training_samples(proposals, targets)
        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(box_features)
        losses = self.ranking_losses(class_logits, box_regression, labels, regression_targets)
        if self.has_mask():
            losses["loss_mask"] = self.mask_loss(features, proposals, matched_idxs, labels, image_shapes, targets)
        return [], losses

    def ranking_losses(self, class_logits, box_regression, labels, regression_targets):
        labels = torch.cat(labels, dim=0)
        regression_targets = torch.cat(regression_targets, dim=0)
        logits = class_logits[:, 1:]  # foreground classes; column 0 (background) is not used
        positive = torch.where(labels > 0)[0]
        classes = labels[positive]
        pred_deltas = box_regression.reshape(class_logits.shape[0], -1, 4)[positive, classes]
        pred_boxes, target_boxes, quality = _decoded_positives(self.box_coder, pred_deltas, regression_targets[positive])
        targets = torch.zeros_like(logits)
        targets[positive, classes - 1] = quality.to(logits.dtype)
        scores = logits[positive, classes - 1].sigmoid()
        classification, box = self.ranking(logits, targets, pred_boxes, target_boxes, scores)
        return {"loss_classifier": classification, "loss_box_reg": box}

    def mask_loss(self, features, proposals, matched_idxs, labels, image_shapes, targets):
        """torchvision's mask loss on the positive RoIs. Without subsampling every proposal that
        overlaps an object is positive, so at most ``mask_positives_per_batch`` of them, drawn at
        random, train the mask head (RS-Mask R-CNN draws 200 the same way): its cost stays that of
        torchvision's sampled positives."""
        positives = [torch.where(labels_in_image > 0)[0] for labels_in_image in labels]
        counts = [len(p) for p in positives]
        if sum(counts) > self.mask_positives_per_batch:
            chosen = torch.zeros(sum(counts), dtype=torch.bool, device=positives[0].device)
            chosen[torch.randperm(sum(counts), device=chosen.device)[: self.mask_positives_per_batch]] = True
            positives = [p[keep] for p, keep in zip(positives, chosen.split(counts))]
        mask_proposals = [boxes[p] for boxes, p in zip(proposals, positives)]
        mask_matched_idxs = [matched[p] for matched, p in zip(matched_idxs, positives)]
        mask_logits = self.mask_predictor(self.mask_head(self.mask_roi_pool(features, mask_proposals, image_shapes)))
        return maskrcnn_loss(mask_logits, mask_proposals, [t["masks"] for t in targets],
                             [t["labels"] for t in targets], mask_matched_idxs)

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


def _dense_losses(ranking, cls_logits, bbox_regression, anchors, targets, matched_idxs, decode):
    """Ranking and balanced GIoU losses of a dense head (RetinaNet, FCOS).

    One ranking over every anchor x class of the batch: the positive's target is the IoU of its
    decoded (detached) box with its ground truth, anchors between the matcher's thresholds are
    ignored (-1), everything else is negative. ``decode(deltas, anchors)`` gives boxes.
    """
    quality_targets = torch.zeros_like(cls_logits)
    pred_boxes, target_boxes, scores = [], [], []
    for image, (target, matched) in enumerate(zip(targets, matched_idxs)):
        quality_targets[image, matched == det_utils.Matcher.BETWEEN_THRESHOLDS] = -1
        foreground = torch.where(matched >= 0)[0]
        if foreground.numel() == 0:
            continue
        gt_boxes = target["boxes"][matched[foreground]]
        gt_labels = target["labels"][matched[foreground]]
        boxes = decode(bbox_regression[image, foreground], anchors[image][foreground])
        quality = paired_box_iou(boxes.detach(), gt_boxes).clamp(min=MIN_QUALITY)
        quality_targets[image, foreground, gt_labels] = quality.to(cls_logits.dtype)
        pred_boxes.append(boxes)
        target_boxes.append(gt_boxes)
        scores.append(cls_logits[image, foreground, gt_labels].sigmoid())
    if not pred_boxes:  # no positive in the batch: empty boxes that keep the regression branch in the graph
        pred_boxes = [bbox_regression.new_zeros((0, 4)) + bbox_regression.sum() * 0]
        target_boxes, scores = [bbox_regression.new_zeros((0, 4))], [bbox_regression.new_zeros(0)]
    classification, box = ranking(cls_logits, quality_targets, torch.cat(pred_boxes), torch.cat(target_boxes),
                                  torch.cat(scores))
    return {"classification": classification, "bbox_regression": box}


class RankBasedRetinaNetHead(RetinaNetHead):
    """RetinaNet's head with the focal loss replaced by a ranking loss and GIoU box loss."""

    ranking: RankingLoss

    def compute_loss(self, targets, head_outputs, anchors, matched_idxs):
        return _dense_losses(self.ranking, head_outputs["cls_logits"], head_outputs["bbox_regression"], anchors,
                             targets, matched_idxs, self.regression_head.box_coder.decode_single)


class RankBasedFCOSHead(FCOSHead):
    """FCOS's head with a ranking loss (IoU targets) and GIoU box loss; no centerness loss."""

    ranking: RankingLoss

    def compute_loss(self, targets, head_outputs, anchors, matched_idxs):
        return _dense_losses(self.ranking, head_outputs["cls_logits"], head_outputs["bbox_regression"], anchors,
                             targets, matched_idxs, self.box_coder.decode)


class RankBasedFCOS(FCOS):
    """FCOS whose detections are scored by the classifier alone, not by its geometric mean with
    centerness (the centerness branch is not trained after conversion)."""

    def postprocess_detections(self, head_outputs, anchors, image_shapes):
        detections = []
        for index, image_shape in enumerate(image_shapes):
            image_boxes, image_scores, image_labels = [], [], []
            for logits, deltas, level_anchors in zip(head_outputs["cls_logits"], head_outputs["bbox_regression"],
                                                     anchors[index]):
                scores = torch.sigmoid(logits[index]).flatten()  # (locations x classes)
                candidates = torch.where(scores > self.score_thresh)[0]
                scores, order = scores[candidates].topk(min(self.topk_candidates, candidates.numel()))
                candidates = candidates[order]
                location = torch.div(candidates, logits.shape[-1], rounding_mode="floor")
                boxes = self.box_coder.decode(deltas[index][location], level_anchors[location])
                image_boxes.append(box_ops.clip_boxes_to_image(boxes, image_shape))
                image_scores.append(scores)
                image_labels.append(candidates % logits.shape[-1])
            boxes, scores, labels = torch.cat(image_boxes), torch.cat(image_scores), torch.cat(image_labels)
            keep = box_ops.batched_nms(boxes, scores, labels, self.nms_thresh)[: self.detections_per_img]
            detections.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
        return detections


def _retype(module: torch.nn.Module, cls, **settings):
    """The same module (submodules, parameters, buffers, settings) as an instance of ``cls``."""
    converted = cls.__new__(cls)
    converted.__dict__.update(module.__dict__)
    for name, value in settings.items():
        setattr(converted, name, value)
    return converted


def _rank_based(head: torch.nn.Module, cls, ranking: RankingLoss, **settings):
    """``head`` as the rank-based ``cls`` with ``ranking`` as its loss. aLRP's self-balancing weight
    becomes the submodule ``alrp_balance``, so that it is in the model's state dict (and a resumed
    run resumes it); the other losses add no key."""
    converted = _retype(head, cls, ranking=ranking, **settings)
    if LOSSES_BY_SHORT[ranking.loss].regression:
        converted.alrp_balance = ranking.balance
    return converted


def _mark_converted_rpn(model, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                        error_msgs):
    """A converted Faster/Mask R-CNN's load pre-hook: a state dict of a converted model saved
    before ``RankBasedRPN`` had its ``box_coder_weights`` (its RoI classifier has the background
    row that conversion zeroed; a trained or freshly initialised one is never all zero) gets that
    key, so that its RPN layer is not rescaled as if it were unconverted. The RPN alone sees only
    its own keys, hence a hook of the whole model."""
    key = prefix + "rpn.box_coder_weights"
    if key not in state_dict and _background_row_is_zero(state_dict, prefix + "roi_heads."):
        state_dict[key] = model.rpn.box_coder_weights.clone()


def _background_row_is_zero(state_dict, roi_heads_prefix: str) -> bool:
    """Whether the state dict's RoI classifier has the all-zero background row that conversion
    leaves (``_foreground_against_background``)."""
    weight = state_dict.get(roi_heads_prefix + "box_predictor.cls_score.weight")
    return weight is not None and weight.dim() == 2 and not bool(weight[0].any())


def _rescaled_rpn_regression(tensor: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The RPN regression layer's weight or bias with its outputs, (anchor, dx/dy/dw/dh) in that
    order, multiplied by ``scale`` (4,)."""
    per_output = scale.to(tensor).repeat(tensor.shape[0] // 4)
    return tensor * per_output.view(-1, *([1] * (tensor.dim() - 1)))


@torch.no_grad()
def _set_rpn_box_coder(rpn: RankBasedRPN, weights):
    """Give the RPN a box coder with ``weights`` and rescale its regression layer's outputs so
    that it proposes the same boxes as before (a pretrained RPN keeps its proposals)."""
    old = tuple(rpn.box_coder.weights)
    if not hasattr(rpn, "unconverted_box_coder_weights"):  # converting a converted RPN again keeps the first
        rpn.unconverted_box_coder_weights = old
    layer = getattr(rpn.head, "bbox_pred", None)
    if isinstance(layer, nn.Conv2d):
        scale = torch.tensor(weights) / torch.tensor(old)
        for parameter in (layer.weight, layer.bias) if layer.bias is not None else (layer.weight,):
            parameter.copy_(_rescaled_rpn_regression(parameter, scale))
    rpn.box_coder = det_utils.BoxCoder(weights, rpn.box_coder.bbox_xform_clip)
    rpn.register_buffer("box_coder_weights", torch.tensor(weights, dtype=torch.float32))


def _against_background(rows: torch.Tensor) -> torch.Tensor:
    """A softmax classifier's weight or bias rows, the foreground rows minus the background row
    (row 0), which becomes zero (see :func:`_foreground_against_background`)."""
    converted = rows - rows[:1]
    converted[0] = 0
    return converted


@torch.no_grad()
def _foreground_against_background(cls_score: nn.Linear):
    """Re-express a softmax classifier's foreground rows against its background row.

    A softmax head is invariant to adding the same number to all logits of a RoI, so its raw
    logits have no absolute level and their sigmoids say nothing about background: a threshold
    on them passes or rejects RoIs at random. ``z_c - z_background`` is the log-odds of class c
    against background, which does not have that freedom: sigmoid scores then start from
    ``p_c / (p_c + p_background)`` of the softmax head. The background row, unused from here on,
    is zeroed, so converting twice changes nothing more.
    """
    cls_score.weight.copy_(_against_background(cls_score.weight))
    if cls_score.bias is not None:
        cls_score.bias.copy_(_against_background(cls_score.bias))


# mmdetection's (and Detectron's) initialisation of the RoI head's last layers
PREDICTOR_INIT_STD = {"cls_score": 0.01, "bbox_pred": 0.001}


@torch.no_grad()
def init_box_predictor(predictor: nn.Module) -> nn.Module:
    """Initialise a freshly built RoI box predictor as mmdetection and the official RS-R-CNN do:
    classification weights from N(0, 0.01), box-regression weights from N(0, 0.001), zero biases.

    torchvision's ``FastRCNNPredictor`` keeps ``nn.Linear``'s default (uniform within
    1 / sqrt(fan_in)), whose box deltas start far from zero: the example's ground-truth boxes,
    fed in as proposals, came out at a mean IoU of 0.674 with their own box at step 0, against
    0.987 with this init, and a ranking loss's low learning rate takes long to undo that
    (docs/localisation.md: +5.9 AP for BRS, +1.6 AP for cross-entropy, 1000 iterations). Use it
    on a new predictor (training from scratch or for new classes), before
    :func:`convert_to_rank_based`; a pretrained predictor keeps its weights.

    Args:
        predictor: a module with ``cls_score`` and ``bbox_pred`` ``nn.Linear`` layers, e.g.
            ``torchvision``'s ``FastRCNNPredictor`` (``model.roi_heads.box_predictor``).

    Returns:
        The same module, initialised in place.

    Example::

        >>> from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
        >>> predictor = init_box_predictor(FastRCNNPredictor(1024, 11))
        >>> bool(predictor.bbox_pred.bias.eq(0).all()), round(predictor.bbox_pred.weight.detach().std().item(), 4)
        (True, 0.001)
    """
    for name, std in PREDICTOR_INIT_STD.items():
        layer = getattr(predictor, name, None)
        if not isinstance(layer, nn.Linear):
            raise TypeError(f"predictor: expected a module with nn.Linear layers cls_score and bbox_pred (such as "
                            f"torchvision's FastRCNNPredictor), got {type(predictor).__name__} without {name!r}")
        nn.init.normal_(layer.weight, std=std)
        nn.init.zeros_(layer.bias)
    return predictor


def convert_to_rank_based(model, loss: str = "brs", *, delta: float | None = None, backend: str = "auto",
                          rpn_weight: float = 0.2, box_balance: str | None = None, box_weighting: str = "uniform",
                          matcher_class_scale: float | None = None):
    """Turn a torchvision ``FasterRCNN``, ``MaskRCNN``, ``RetinaNet`` or ``FCOS`` into its rank-based
    version (RS-R-CNN, RS-Mask R-CNN, and the RS papers' one-stage recipe), in place; or a Hugging
    Face transformers RT-DETR, RT-DETRv2, D-FINE or DEIMv2, whose ``loss_function`` becomes the
    ranking loss of every decoder, encoder and denoising term with self-balanced box terms
    (``brl_triton.detection_detr``, ``docs/detection_detr.md``; ``pip install 'brl_triton[detr]'``).

    Args:
        model: ``torchvision.models.detection.FasterRCNN`` or ``MaskRCNN`` (any backbone),
            ``RetinaNet`` or ``FCOS``, pretrained or not. Keypoint R-CNN and SSD are not supported.
            Or ``transformers``' ``RTDetrForObjectDetection``, ``RTDetrV2ForObjectDetection``,
            ``DFineForObjectDetection`` or ``Deimv2ForObjectDetection`` (other transformers
            models raise a ``TypeError``); ``rpn_weight`` and ``box_weighting`` are the
            torchvision detectors' only.
        loss: ``"brs"`` (bucketed Rank & Sort, default), ``"rs"``, ``"bap"``, ``"ap"``, or aLRP:
            ``"alrp"`` / ``"balrp"`` (exact / bucketed; box losses become aLRP's localisation
            part with its self-balancing weight, see the module docstring).
        delta: smoothing width of the ranking loss; None for the loss's default.
        backend: the ranking loss's backend (``"auto"``, ``"torch"``, ``"triton"``).
        rpn_weight: factor on the whole RPN loss (Faster/Mask R-CNN).
        box_balance: torchvision detectors: the value the GIoU box loss is scaled to (by a
            detached factor, so there is no loss weight to tune): ``"unit"`` (1, the default for
            None) or ``"classification"`` (the classification loss's, RS-R-CNN's ``lambda = cls /
            box``). transformers' DETRs: ``"weights"`` (the default for None: the config's box
            loss weights) or ``"classification"``, see
            :func:`brl_triton.detection_detr.convert_detr_to_rank_based`.
        matcher_class_scale: transformers' DETRs only: a factor on the config's matcher class
            cost (None: the default of
            :func:`brl_triton.detection_detr.convert_detr_to_rank_based`).
        box_weighting: the positives' weights in the box loss: ``"uniform"`` (default) or
            ``"score"`` (their detached scores for the ground-truth class, RS-R-CNN's).
            RS-R-CNN's pair localised worse than cross-entropy on the example: its box loss
            weakens as the classification loss falls and where scores are low. The defaults
            closed most of that gap (docs/localisation.md).

    Returns:
        The same model object. Its training losses keep torchvision's names (FCOS loses
        ``bbox_ctrness``); classification targets are IoUs (> 0 positive), 0 negative, -1
        ignored, as ``brl_triton`` expects. The state dict keeps its keys, with two additions:
        Faster/Mask R-CNN's ``rpn.box_coder_weights`` (the box coder the RPN's regression layer
        is scaled for), and for aLRP each head's ``alrp_balance._extra_state`` (its
        self-balancing weight, so that a resumed run resumes it). A checkpoint saved before
        conversion (e.g. torchvision's pretrained weights) loads into the converted model,
        strictly, before or after conversion alike: the RPN's regression layer is rescaled and
        the RoI classifier re-expressed as they load. An unconverted model refuses a converted
        checkpoint (its key ``rpn.box_coder_weights`` is unexpected) rather than load an RPN
        scaled for another box coder.

    What the conversion sets (the official RS configs' values):

    - Faster/Mask R-CNN: RPN box coder weights (10, 10, 5, 5) (RS-RPN's target stds 0.1, 0.1,
      0.2, 0.2; the RPN's regression layer is rescaled so a pretrained RPN proposes the same
      boxes); 2000 / 1000 boxes per level before NMS (train / test) and 1000 proposals per
      image after it; RoI score threshold 0.40, NMS 0.5, 100 detections per image. The RoI
      classifier's foreground rows are re-expressed against its background row (log-odds
      against background, the background row zeroed): a softmax-trained head, such as a
      COCO-pretrained one, then gives sigmoid scores that the 0.40 threshold can use (its raw
      logits have no absolute level); for a freshly initialised head it is just another random
      initialisation, whose scores start near 0.5 (on the example's Faster R-CNN 67 % of the
      (RoI, class) scores pass 0.40 right after conversion, 17 % after 40 BRS iterations). These
      are the only parameter values the conversion changes.
    - RetinaNet and FCOS: scores are sigmoids of the classifier; the 1000 best candidates per
      level (RS-ATSS's ``nms_pre``), class-wise NMS at 0.6, 100 detections per image (RS-ATSS),
      and score threshold 0 instead of RS-ATSS's 0.05. Ranking losses depend only on logit
      differences: shifting all logits changes neither the loss nor its gradient, and the
      gradient sums to zero, so nothing pulls the logits' level away from the classification
      prior (0.01, bias -4.6). The prior is kept because it sets the relative weights of the
      positives in the score-weighted box loss, as in RS-ATSS. A 0.05 threshold then removes
      every detection until training has lifted the positives' scores far above what the loss
      asks for (RS-ATSS's 0.05 is applied after 12 COCO epochs); with
      threshold 0 detections are chosen by rank, which is all COCO AP measures, and a converted
      model returns detections from its first evaluation.
    - FCOS's centerness branch is dropped, as the RS paper drops it for ATSS: the IoU target
      already makes the classifier rank positives by localisation quality, which is what
      centerness estimates, and multiplying in an independently trained centerness would
      reorder what the sorting loss ordered. Its layer stays in the state dict but is frozen
      (``requires_grad=False``, no loss reaches it, so DistributedDataParallel needs no
      ``find_unused_parameters``) and unused at inference (``model`` becomes a
      :class:`RankBasedFCOS`).

    What the training loop must do (it is not part of the model): SGD with momentum 0.9 and
    weight decay 1e-4 at a learning rate of 0.012 per 16 images for Faster/Mask R-CNN and 0.008
    per 16 images for RetinaNet/FCOS (RS-R-CNN, RS-ATSS), scaled linearly with the batch (0.003
    and 0.002 at batch 4), after a linear warm-up over the first 500 iterations (the example
    warms up over at most a fifth of a short run and decays the rate by a cosine). Rates tuned for
    cross-entropy are several times too high: on the example's digits set BRS at 0.02 with batch
    4 gives NaN logits within ~100 iterations unclipped and learns nothing clipped at norm 10.
    The official configs do not clip gradients; the rank-based heads' gradient norm is large
    (about 60 at the start of the example's Faster R-CNN, against about 25 with cross-entropy),
    and the example's run measured to learn (LR 0.003, mAP 0.233 after 300 iterations) clipped
    at norm 10, so the example keeps that clipping. ``examples/train_detector.py`` applies
    this recipe by default (its ``RECIPES`` table).

    Example:
        >>> from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_fpn
        >>> detector = fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None, num_classes=11)
        >>> model = convert_to_rank_based(detector, "brs")
    """
    if any(cls.__module__.partition(".")[0] == "transformers" for cls in type(model).__mro__):
        # imported here: transformers is an optional extra, and importing it is slow
        from .detection_detr import convert_detr_to_rank_based

        detr_options = {} if matcher_class_scale is None else {"matcher_class_scale": matcher_class_scale}
        return convert_detr_to_rank_based(model, loss, delta=delta, backend=backend,
                                          box_balance="weights" if box_balance is None else box_balance, **detr_options)
    if matcher_class_scale is not None:
        raise ValueError("matcher_class_scale applies to transformers' DETRs only (their Hungarian matcher); "
                         f"got it for a {type(model).__name__}")
    ranking = RankingLoss(loss, delta, backend, "unit" if box_balance is None else box_balance, box_weighting)
    if isinstance(model, FasterRCNN):  # MaskRCNN and KeypointRCNN are FasterRCNNs
        if model.roi_heads.has_keypoint():
            raise ValueError("convert_to_rank_based does not support Keypoint R-CNN (keypoint heads); "
                             "Faster R-CNN, Mask R-CNN, RetinaNet and FCOS are supported")
        model.rpn = _rank_based(model.rpn, RankBasedRPN, ranking, loss_weight=rpn_weight)
        _set_rpn_box_coder(model.rpn, RPN_BOX_CODER_WEIGHTS)
        model.rpn._pre_nms_top_n = dict(RPN_PRE_NMS_TOP_N)
        model.rpn._post_nms_top_n = dict(RPN_POST_NMS_TOP_N)
        model.roi_heads = _rank_based(model.roi_heads, RankBasedRoIHeads, replace(ranking),  # a balance of its own
                                      score_thresh=ROI_SCORE_THRESH, nms_thresh=ROI_NMS_THRESH,
                                      detections_per_img=DETECTIONS_PER_IMAGE)
        cls_score = getattr(model.roi_heads.box_predictor, "cls_score", None)
        if isinstance(cls_score, nn.Linear):
            _foreground_against_background(cls_score)
            model._register_load_state_dict_pre_hook(_mark_converted_rpn, with_module=True)  # idempotent
    elif isinstance(model, RetinaNet):
        model.head = _rank_based(model.head, RankBasedRetinaNetHead, ranking)
        _set_dense_inference(model)
    elif isinstance(model, FCOS):
        model.head = _rank_based(model.head, RankBasedFCOSHead, ranking)
        model.head.regression_head.bbox_ctrness.requires_grad_(False)
        model.__class__ = RankBasedFCOS  # same object: only postprocess_detections differs
        _set_dense_inference(model)
    elif isinstance(model, SSD):
        raise TypeError("convert_to_rank_based does not support SSD (its hard-negative mining loss has no "
                        "rank-based counterpart here); use RetinaNet or FCOS for a one-stage detector")
    else:
        raise TypeError("model must be a torchvision FasterRCNN, MaskRCNN, RetinaNet or FCOS, "
                        f"got {type(model).__name__}")
    return model


def _set_dense_inference(model):
    """Inference settings of a rank-based RetinaNet / FCOS (see convert_to_rank_based)."""
    model.score_thresh = DENSE_SCORE_THRESH
    model.topk_candidates = DENSE_TOPK_CANDIDATES
    model.nms_thresh = DENSE_NMS_THRESH
    model.detections_per_img = DETECTIONS_PER_IMAGE
