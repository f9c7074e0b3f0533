"""What a training run of the example measures besides mAP: the numbers that tell why one loss
localises better than another.

Per training step (averaged over each evaluation interval by :class:`StepDiagnostics`):

- ``positive_anchors``: anchors (Faster R-CNN's RPN) or locations (FCOS) assigned to an object,
  per batch; the same count for every loss (the ce RPN then samples at most 128 per image);
- ``positive_rois``: positive RoIs in the RoI head's loss, per batch (ce: among its 512 sampled
  RoIs per image; the rank-based head: among all proposals);
- ``lambda_<head>``: a rank-based head's box-loss weight, classification loss / box loss (aLRP:
  its self-balancing weight);
- ``effective_positives_<head>``: (sum w)^2 / sum w^2 of the score weights w of its box loss, the
  number of positives the box loss effectively averages over;
- ``box_update_norm``: how far the step moved the box-regression layer (the RoI head's, or the
  dense head's), the L2 norm of the change of its weight and bias;
- ``ranking_ms``: the ranking losses' milliseconds (forward by the clock, backward from the
  pre-hook to the hook of their autograd node).

Per evaluation, for two-stage detectors (:class:`RefinementProbe`): of the top 300 proposals of
each validation image, those that overlap an object by IoU >= 0.5, their mean IoU
(``proposal_iou``), the mean IoU of the boxes that the RoI head regresses them to for their
object's class (``refined_iou``), and the share of those that reach 0.75 (``refined_iou75``).
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch
from torchvision.models.detection import _utils as det_utils
from torchvision.ops import box_iou, generalized_box_iou_loss


class ProbedRanking:
    """Stands in for a rank-based head's ``ranking`` (``brl_triton.detection.RankingLoss``): the
    same losses, timed and measured."""

    def __init__(self, ranking, head: str, record):
        self.ranking, self.head, self.record = ranking, head, record
        self.seconds, self._started = 0.0, 0.0

    def __call__(self, logits, targets, pred_boxes, target_boxes, scores):
        start = time.perf_counter()
        classification, box = self.ranking(logits, targets, pred_boxes, target_boxes, scores)
        self.seconds += time.perf_counter() - start
        node = classification.grad_fn
        nodes = [node] + [n for n, _ in node.next_functions if n is not None] if node else []
        for node in nodes:
            if node.name().startswith("RankingLossFunction"):
                node.register_prehook(self._start)
                node.register_hook(self._stop)
        with torch.no_grad():
            weights = scores.detach().double()
            if weights.numel():
                self.record(f"effective_positives_{self.head}", float(weights.sum() ** 2 / (weights**2).sum()))
                balance = getattr(self.ranking, "balance", None)
                if self.ranking.loss in ("alrp", "balrp") and balance is not None:
                    self.record(f"lambda_{self.head}", balance.weight)
                else:
                    giou = generalized_box_iou_loss(pred_boxes.detach().double(), target_boxes.double(), reduction="none")
                    box_loss = float((weights * giou).sum() / weights.sum())
                    if box_loss > 0:
                        self.record(f"lambda_{self.head}", float(classification.detach()) / box_loss)
        return classification, box

    def _start(self, grad_outputs):
        self._started = time.perf_counter()

    def _stop(self, grad_inputs, grad_outputs):
        self.seconds += time.perf_counter() - self._started

    def take_ms(self) -> float:
        seconds, self.seconds = self.seconds, 0.0
        return seconds * 1e3


def box_regression_layer(model) -> torch.nn.Module | None:
    """The layer that outputs box deltas: the RoI head's (two-stage) or the dense head's."""
    roi_heads = getattr(model, "roi_heads", None)
    if roi_heads is not None:
        return getattr(roi_heads.box_predictor, "bbox_pred", None)
    head = getattr(model, "head", None)
    return getattr(getattr(head, "regression_head", None), "bbox_reg", None)


class StepDiagnostics:
    """Collects the per-step numbers of the module docstring and averages them per evaluation."""

    def __init__(self, model):
        self.model = model
        self.steps: dict[str, list[float]] = defaultdict(list)
        self.timers = []
        self._box_layer = box_regression_layer(model)
        self._before: torch.Tensor | None = None
        for name, head in (("rpn", getattr(model, "rpn", None)), ("roi", getattr(model, "roi_heads", None)),
                           ("dense", getattr(model, "head", None))):
            if head is not None and hasattr(head, "ranking"):
                head.ranking = ProbedRanking(head.ranking, name, self.record)
                self.timers.append(head.ranking)
        self._count_positives()

    def record(self, name: str, value: float) -> None:
        self.steps[name].append(value)

    def _count_positives(self) -> None:
        """Count positives where every loss's head finds them, by wrapping the instance's method
        (the class and the state dict are untouched)."""
        rpn, roi_heads, head = (getattr(self.model, name, None) for name in ("rpn", "roi_heads", "head"))
        if rpn is not None:
            assign = rpn.assign_targets_to_anchors

            def assign_and_count(anchors, targets):
                labels, matched = assign(anchors, targets)
                self.record("positive_anchors", float(sum(int((l == 1).sum()) for l in labels)))
                return labels, matched

            rpn.assign_targets_to_anchors = assign_and_count
        if roi_heads is not None:
            select = roi_heads.select_training_samples

            def select_and_count(proposals, targets):
                selected = select(proposals, targets)
                self.record("positive_rois", float(sum(int((l > 0).sum()) for l in selected[2])))
                return selected

            roi_heads.select_training_samples = select_and_count
        elif head is not None:
            compute_loss = head.compute_loss

            def loss_and_count(targets, head_outputs, anchors, matched_idxs):
                self.record("positive_anchors", float(sum(int((m >= 0).sum()) for m in matched_idxs)))
                return compute_loss(targets, head_outputs, anchors, matched_idxs)

            head.compute_loss = loss_and_count

    def _box_parameters(self) -> torch.Tensor:
        layer = self._box_layer
        return torch.cat([p.detach().flatten() for p in layer.parameters()]).double()

    def before_step(self) -> None:
        if self._box_layer is not None:
            self._before = self._box_parameters().clone()

    def after_step(self) -> None:
        if self._box_layer is not None and self._before is not None:
            self.record("box_update_norm", float((self._box_parameters() - self._before).norm()))
        if self.timers:
            self.record("ranking_ms", sum(timer.take_ms() for timer in self.timers))

    def take_means(self) -> dict[str, float]:
        """The mean of every number over the steps since the last call."""
        means = {name: sum(values) / len(values) for name, values in self.steps.items() if values}
        self.steps.clear()
        return means


class RefinementProbe:
    """Measures how the RoI head refines validation proposals (module docstring) while the
    evaluation runs the model: forward hooks keep the proposals and the box regression of a
    batch, :meth:`add` matches them to that batch's ground truth."""

    def __init__(self, model, top: int = 300, min_iou: float = 0.5):
        self.roi_heads, self.top, self.min_iou = model.roi_heads, top, min_iou
        self._batch: dict = {}
        self._proposal_ious: list[torch.Tensor] = []
        self._refined_ious: list[torch.Tensor] = []
        self._handles = [self.roi_heads.register_forward_pre_hook(self._keep_proposals),
                         self.roi_heads.box_predictor.register_forward_hook(self._keep_regression)]

    def _keep_proposals(self, module, args):
        self._batch["proposals"], self._batch["image_shapes"] = args[1], args[2]

    def _keep_regression(self, module, args, output):
        self._batch["box_regression"] = output[1]

    def add(self, targets: list[dict], original_sizes: list[tuple[int, int]]) -> None:
        """The ground truth (boxes in the original images' pixels, labels) of the batch the model
        just ran on."""
        proposals, shapes = self._batch["proposals"], self._batch["image_shapes"]
        per_image = self._batch["box_regression"].split([len(p) for p in proposals])
        for boxes, regression, shape, original, target in zip(proposals, per_image, shapes, original_sizes, targets):
            gt_boxes = torch.as_tensor(target.get("boxes", torch.zeros(0, 4)), dtype=torch.float32).reshape(-1, 4)
            if len(gt_boxes) == 0:
                continue
            scale = gt_boxes.new_tensor([shape[1] / original[1], shape[0] / original[0]] * 2)
            gt_boxes = gt_boxes.to(boxes.device) * scale.to(boxes.device)
            gt_labels = torch.as_tensor(target["labels"], dtype=torch.int64).to(boxes.device)
            boxes, regression = boxes[: self.top], regression[: self.top]
            best, matched = box_iou(boxes, gt_boxes).max(dim=1)
            keep = best >= self.min_iou
            if not keep.any():
                continue
            classes = gt_labels[matched[keep]]
            deltas = regression[keep].reshape(int(keep.sum()), -1, 4)[torch.arange(len(classes)), classes]
            coder: det_utils.BoxCoder = self.roi_heads.box_coder
            refined = coder.decode_single(deltas, boxes[keep])
            self._proposal_ious.append(best[keep].cpu())
            self._refined_ious.append(box_iou(refined, gt_boxes).gather(1, matched[keep, None])[:, 0].cpu())

    def results(self) -> dict[str, float]:
        for handle in self._handles:
            handle.remove()
        if not self._proposal_ious:
            return {}
        proposal, refined = torch.cat(self._proposal_ious), torch.cat(self._refined_ious)
        return {"proposal_iou": float(proposal.mean()), "refined_iou": float(refined.mean()),
                "refined_iou75": float((refined >= 0.75).double().mean())}
