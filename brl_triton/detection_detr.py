"""Rank-based DETRs of Hugging Face transformers: RT-DETR, RT-DETRv2, D-FINE and DEIMv2.

``brl_triton.detection.convert_to_rank_based(model, loss="brs")`` sends a transformers
``RTDetrForObjectDetection``, ``RTDetrV2ForObjectDetection``, ``DFineForObjectDetection`` or
``Deimv2ForObjectDetection`` here. The conversion replaces only the model's public loss hook,
``model.loss_function``, by a :class:`RankBasedDetrLoss`; parameters, state-dict keys (but aLRP's
weight, below) and inference are unchanged. ``docs/detection_detr.md`` has the design and the recipe.

What the loss computes, for every term of transformers' criterion (the final decoder layer, each
auxiliary decoder layer, the encoder's top-k proposals and each decoder layer's denoising queries):

- Matching: transformers' own (``RTDetrHungarianMatcher`` with the config's costs, the class
  cost times ``matcher_class_scale``, 1 by default; the denoising
  queries are matched to their ground truth by construction, DEIMv2's dense one-to-one union for
  its box terms), through transformers' criterion classes, which this module subclasses.
- Classification: the ranking loss of the registry's ``loss`` over all (image, query, class)
  logits of the term, one ranking per term. Target: the IoU of the matched query's predicted box
  (detached) with its ground truth, for the ground truth's class (at least ``1e-6``, so that every
  matched query stays positive); 0 for every other entry. VFL and MAL use the same IoU. Its
  weight is the config's weight of the loss it replaces (``weight_loss_vfl``, DEIMv2's
  ``weight_loss_mal``). Loss-dict names: ``loss_<short>`` (``loss_brs``, ``loss_brs_aux_0``,
  ``loss_brs_dn_0``, ...) where transformers writes ``loss_vfl`` / ``loss_mal``.
- Box terms (BRS, RS, BAP, AP): transformers' L1 and GIoU (and D-FINE's / DEIMv2's FGL) with
  the config's weights (``weight_loss_bbox`` / ``giou`` / ``fgl``), as one version of the
  official Co-DETR BRS head runs (commit ``15bd5822``: it computes a self-balancing factor but
  returns the unscaled L1 and GIoU). ``box_balance="classification"`` is the other version
  (``726b2fb7``): each box term multiplied by the detached ratio of its term's classification
  loss to its own value, so its value is the classification loss's and the config weights cancel
  out; its box gradients shrink as the ranking loss falls (docs/detection_detr.md compares the
  two on the example). D-FINE's DDF (self-distillation between decoder layers, not a regression
  to the ground truth) keeps ``weight_loss_ddf`` either way.
- aLRP (``"alrp"`` / ``"balrp"``): the classification part as above, and the localisation part
  with ``(1 - GIoU) / 2`` of each matched box as its regression loss (``loss_<short>_localisation``
  and its suffixes), instead of L1, GIoU and FGL; times one self-balancing weight for the whole
  model, the submodule ``alrp_balance`` (its ``_extra_state`` is the only state-dict key the
  conversion adds). DDF stays as above.

Needs transformers 5 and scipy (``pip install 'brl_triton[detr]'``); ``brl_triton.detection``
imports this module only when it is given a transformers model.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.ops import box_convert, generalized_box_iou_loss

from . import functional
from .balancing import SelfBalancingWeight
from ._head_losses import ALRP_BALANCE_PERIOD, LOSSES_BY_SHORT, MIN_QUALITY, RankingLoss, paired_box_iou

try:
    import scipy  # noqa: F401  (transformers' Hungarian matcher solves the assignment with scipy)
    from transformers import (
        DFineForObjectDetection,
        Deimv2ForObjectDetection,
        RTDetrForObjectDetection,
        RTDetrV2ForObjectDetection,
    )
    from transformers.loss.loss_d_fine import DFineLoss, _set_aux_loss2
    from transformers.loss.loss_deimv2 import Deimv2Loss
    from transformers.loss.loss_rt_detr import RTDetrLoss, _set_aux_loss
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "brl_triton.detection_detr (rank-based RT-DETR, RT-DETRv2, D-FINE and DEIMv2) needs transformers 5 "
        f"(5.24 or later) and scipy: pip install 'brl_triton[detr]' ({error})"
    ) from error

__all__ = ["RankBasedDetrLoss", "TensorStateBalancingWeight", "convert_detr_to_rank_based", "SUPPORTED_MODELS"]

BALANCED_BOX_LOSSES = ("loss_bbox", "loss_giou", "loss_fgl")  # box_balance="classification" scales these
REGRESSION_TO_GROUND_TRUTH = BALANCED_BOX_LOSSES  # what aLRP's localisation part replaces
DETR_BOX_BALANCES = ("weights", "classification")  # RankBasedDetrLoss.box_balance
_TERM_SUFFIX = r"(?:_aux_\d+|_dn_\d+)?"  # transformers' names: final layer, auxiliary terms, denoising terms


class _RankingCriterion:
    """Mixin for transformers' DETR criteria (``RTDetrLoss`` and its subclasses): the loss named
    ``"ranking"`` in ``self.losses`` is the ranking loss of one term. Everything else (matching,
    box terms, the terms' list and names) is the criterion's own.

    ``ranking`` (a :class:`brl_triton.detection.RankingLoss`) says which loss; ``ranking_key`` is
    the loss-dict name of the classification part, e.g. ``"loss_brs"``.
    """

    ranking: RankingLoss
    ranking_key: str

    def get_loss(self, loss, outputs, targets, indices, num_boxes):
        if loss == "ranking":
            return self.loss_ranking(outputs, targets, indices)
        return super().get_loss(loss, outputs, targets, indices, num_boxes)

    def loss_ranking(self, outputs: dict, targets: list[dict], indices: list[tuple[Tensor, Tensor]]) -> dict:
        """The ranking loss of one term.

        ``outputs["logits"]``: ``(B, Q, C)``; ``outputs["pred_boxes"]``: ``(B, Q, 4)`` cxcywh in
        [0, 1]; ``targets[b]``: ``class_labels`` ``(G_b,)`` and ``boxes`` ``(G_b, 4)`` cxcywh;
        ``indices[b]``: (matched queries, their ground truths). Returns ``{ranking_key: loss}``,
        plus ``ranking_key + "_localisation"`` for aLRP (before its self-balancing weight).
        """
        logits = outputs["logits"]
        image, query = self._get_source_permutation_idx(indices)
        classes = torch.cat([target["class_labels"][gt] for target, (_, gt) in zip(targets, indices)])
        pred_boxes = box_convert(outputs["pred_boxes"][image, query], "cxcywh", "xyxy")
        gt_boxes = box_convert(torch.cat([target["boxes"][gt] for target, (_, gt) in zip(targets, indices)]),
                               "cxcywh", "xyxy")
        quality = paired_box_iou(pred_boxes.detach(), gt_boxes).clamp(min=MIN_QUALITY)
        quality_targets = torch.zeros_like(logits)
        quality_targets[image, query, classes] = quality.to(logits.dtype)
        spec = LOSSES_BY_SHORT[self.ranking.loss]
        loss_fn = getattr(functional, spec.function_name)
        delta = spec.delta if self.ranking.delta is None else self.ranking.delta
        if not spec.regression:
            out = loss_fn(logits, quality_targets, delta, backend=self.ranking.backend)
            return {self.ranking_key: out[0] + out[1] if isinstance(out, tuple) else out}
        # aLRP wants the regression losses in the flat order of quality_targets > 0; a matched
        # query has exactly one positive entry, so spreading them over its classes and reading
        # them back at the positives gives that order, whatever order the matcher returned
        giou_losses = generalized_box_iou_loss(pred_boxes, gt_boxes, reduction="none").float() / 2
        per_query = giou_losses.new_zeros(logits.shape[:2]).index_put((image, query), giou_losses)
        regression_losses = per_query.unsqueeze(-1).expand(logits.shape)[quality_targets > 0]
        classification, localisation = loss_fn(logits, quality_targets, regression_losses, delta,
                                               backend=self.ranking.backend)
        return {self.ranking_key: classification, self.ranking_key + "_localisation": localisation}


class _RankBasedRTDetrCriterion(_RankingCriterion, RTDetrLoss):
    """RT-DETR's and RT-DETRv2's criterion with the ranking loss in place of VFL."""


class _RankBasedDFineCriterion(_RankingCriterion, DFineLoss):
    """D-FINE's criterion with the ranking loss in place of VFL."""


class _RankBasedDeimv2Criterion(_RankingCriterion, Deimv2Loss):
    """DEIMv2's criterion with the ranking loss in place of MAL."""


@dataclass(frozen=True)
class _Family:
    """What differs between the supported models' losses.

    ``criterion``: the rank-based subclass of transformers' criterion; ``replaced``: the
    classification loss the ranking loss replaces (``"vfl"``, ``"mal"``), whose config weight
    ``weight_loss_<replaced>`` it takes; ``distribution``: D-FINE's distribution boxes (boxes
    clamped to [0, 1] and the corner distributions in every decoder term, for FGL and DDF).
    """

    criterion: type
    replaced: str
    distribution: bool


_RT_DETR = _Family(_RankBasedRTDetrCriterion, "vfl", distribution=False)
_D_FINE = _Family(_RankBasedDFineCriterion, "vfl", distribution=True)
_DEIMV2 = _Family(_RankBasedDeimv2Criterion, "mal", distribution=True)
_FAMILIES = {
    RTDetrForObjectDetection: _RT_DETR,
    RTDetrV2ForObjectDetection: _RT_DETR,
    DFineForObjectDetection: _D_FINE,
    Deimv2ForObjectDetection: _DEIMV2,
}
SUPPORTED_MODELS = tuple(cls.__name__ for cls in _FAMILIES)


class TensorStateBalancingWeight(SelfBalancingWeight):
    """:class:`brl_triton.SelfBalancingWeight` whose state-dict entry (``_extra_state``) is a
    float64 tensor ``(weight, period, steps, classification sum, localisation sum)``, NaN for a
    sum that is not started, instead of a dict: ``save_pretrained`` writes safetensors, which
    hold tensors only. It loads either form.

    Example:
        >>> balance = TensorStateBalancingWeight(period=2)
        >>> balance.get_extra_state().tolist()
        [50.0, 2.0, 0.0, nan, nan]
    """

    _FIELDS = ("weight", "period", "steps", "classification", "localisation")

    def get_extra_state(self) -> Tensor:
        state = super().get_extra_state()
        return torch.tensor([math.nan if state[name] is None else state[name] for name in self._FIELDS],
                            dtype=torch.float64)

    def set_extra_state(self, state: Tensor | dict) -> None:
        if isinstance(state, Tensor):
            values = dict(zip(self._FIELDS, state.tolist()))
            state = {name: None if math.isnan(value) else value for name, value in values.items()}
        super().set_extra_state(state)


def _balanced_to(loss: Tensor, reference: Tensor) -> Tensor:
    """``loss`` times the detached ratio ``reference / loss``: the value of ``reference``, the
    gradient direction of ``loss`` (0 when ``loss`` is 0, e.g. a term without positives)."""
    return loss * (reference.detach() / loss.detach().clamp(min=torch.finfo(loss.dtype).tiny))


def _check_box_balance(box_balance: str) -> None:
    if box_balance not in DETR_BOX_BALANCES:
        raise ValueError(f"box_balance must be one of {', '.join(DETR_BOX_BALANCES)} for transformers' "
                         f"detectors, got {box_balance!r}")


def _check_matcher_class_scale(matcher_class_scale: float) -> None:
    if not (isinstance(matcher_class_scale, (int, float)) and math.isfinite(matcher_class_scale)
            and matcher_class_scale > 0):
        raise ValueError(f"matcher_class_scale must be a finite number > 0 (a factor on the config's "
                         f"matcher_class_cost), got {matcher_class_scale!r}")


def _term_suffixes(losses: dict, key: str) -> list[str]:
    """The suffixes (``""``, ``"_aux_0"``, ``"_dn_1"``, ...) of the terms named ``key + suffix``."""
    pattern = re.compile(re.escape(key) + f"({_TERM_SUFFIX})")
    return [match.group(1) for name in losses if (match := pattern.fullmatch(name))]


def _per_layer_outputs(per_layer: list[Tensor], *, without_last: bool) -> list[dict]:
    """One outputs dict per decoder layer, as transformers' criterion reads them, from
    ``(B, layers, queries, ...)`` tensors: logits and boxes, and for D-FINE also corners and
    reference points, with the last layer's corners and logits as the distillation teacher.
    ``without_last``: leave the last layer out (the final outputs hold it)."""
    layers = slice(None, -1) if without_last else slice(None)
    by_layer = [tensor[:, layers].transpose(0, 1) for tensor in per_layer]
    if len(per_layer) == 2:
        return _set_aux_loss(*by_layer)
    outputs_class, _, corners, _ = per_layer
    return _set_aux_loss2(*by_layer, corners[:, -1], outputs_class[:, -1])


def _criterion_outputs(family: _Family, config, logits, pred_boxes, outputs_class, outputs_coord, enc_topk_logits,
                       enc_topk_bboxes, denoising_meta_values, predicted_corners,
                       initial_reference_points) -> tuple[dict, list | None]:
    """The outputs dict that transformers' own loss function of the family hands its criterion,
    and the auxiliary outputs it returns (the decoder layers but the last, then the encoder).

    The final outputs drop the denoising queries whenever there are some (transformers' DEIMv2
    does so only with ``auxiliary_loss``; without it, its Hungarian matching would also see the
    denoising queries)."""
    clamp = (lambda boxes: boxes.clamp(min=0, max=1)) if family.distribution else (lambda boxes: boxes)
    split = None if denoising_meta_values is None else denoising_meta_values["dn_num_split"]
    if split is not None:
        logits, pred_boxes = logits.split(split, dim=1)[1], pred_boxes.split(split, dim=1)[1]
    outputs = {"logits": logits, "pred_boxes": clamp(pred_boxes)}
    if not config.auxiliary_loss:
        return outputs, None
    per_layer = [outputs_class, clamp(outputs_coord)]
    if family.distribution:
        per_layer += [predicted_corners, initial_reference_points]
    denoising = None
    if split is not None:
        denoising, per_layer = zip(*(tensor.split(split, dim=2) for tensor in per_layer))
    auxiliary = _per_layer_outputs(list(per_layer), without_last=True)
    auxiliary.extend(_set_aux_loss([enc_topk_logits], [clamp(enc_topk_bboxes)]))
    outputs["auxiliary_outputs"] = auxiliary
    if denoising is not None:
        outputs["dn_auxiliary_outputs"] = _per_layer_outputs(list(denoising), without_last=False)
        outputs["denoising_meta_values"] = denoising_meta_values
    return outputs, auxiliary


class RankBasedDetrLoss:
    """``model.loss_function`` of a converted RT-DETR, RT-DETRv2, D-FINE or DEIMv2 (see the
    module docstring): called by the model's forward with labels, as transformers' own
    ``RTDetrForObjectDetectionLoss`` / ``DFineForObjectDetectionLoss`` /
    ``Deimv2ForObjectDetectionLoss``.

    Args:
        family: the model family (from :func:`convert_detr_to_rank_based`).
        ranking: which ranking loss, its delta and backend.
        balance: aLRP's self-balancing weight (None for the other losses), updated once per
            training call (a call whose logits require grad).
        box_balance: the box terms' weights (not aLRP's): ``"weights"`` (the config's) or
            ``"classification"`` (each scaled to its term's classification loss).

    Call arguments: the model's final ``logits`` ``(B, Q, C)`` and ``pred_boxes`` ``(B, Q, 4)``
    (cxcywh in [0, 1]; denoising queries first in training), ``labels`` (per image
    ``class_labels`` ``(G,)`` int64 and ``boxes`` ``(G, 4)`` cxcywh normalised), the device and
    config, and the decoder's per-layer ``outputs_class`` / ``outputs_coord`` ``(B, layers, Q,
    ...)``, the encoder's ``enc_topk_logits`` / ``enc_topk_bboxes``, ``denoising_meta_values``,
    and for D-FINE / DEIMv2 ``predicted_corners`` / ``initial_reference_points``.

    Returns:
        ``(loss, loss_dict, auxiliary_outputs)``: the sum of ``loss_dict``'s 0-d terms, the terms
        by name (transformers' names with ``loss_<short>`` for ``loss_vfl`` / ``loss_mal``), and the
        auxiliary outputs as transformers returns them (None without ``config.auxiliary_loss``).
    """

    def __init__(self, family: _Family, ranking: RankingLoss, balance: SelfBalancingWeight | None = None,
                 box_balance: str = "weights", matcher_class_scale: float = 1.0):
        _check_box_balance(box_balance)
        _check_matcher_class_scale(matcher_class_scale)
        self.family = family
        self.ranking = ranking
        self.balance = balance
        self.box_balance = box_balance
        self.matcher_class_scale = matcher_class_scale
        self.key = f"loss_{ranking.loss}"

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.family.criterion.__name__}, {self.ranking}, "
                f"box_balance={self.box_balance!r}, matcher_class_scale={self.matcher_class_scale!r})")

    def criterion(self, config) -> RTDetrLoss:
        """transformers' criterion of the family for ``config``, with the ranking loss in place
        of its classification loss (and for aLRP also of its ground-truth box regression)."""
        criterion = self.family.criterion(config)
        criterion.ranking, criterion.ranking_key = self.ranking, self.key
        criterion.matcher.class_cost = config.matcher_class_cost * self.matcher_class_scale
        replaced_key = f"loss_{self.family.replaced}"
        weight = getattr(config, f"weight_{replaced_key}")
        weights = {name: value for name, value in criterion.weight_dict.items() if name != replaced_key}
        weights[self.key] = weight
        losses = ["ranking", "boxes"]
        if self.balance is not None:
            weights = {name: value for name, value in weights.items() if name not in REGRESSION_TO_GROUND_TRUTH}
            weights[self.key + "_localisation"] = weight
            losses = ["ranking"]
        if self.family.distribution:
            losses.append("local")  # FGL and DDF; the weights leave out what is not kept
        criterion.weight_dict, criterion.losses = weights, losses
        return criterion

    def __call__(self, logits: Tensor, labels: list[dict], device, pred_boxes: Tensor, config,
                 outputs_class: Tensor | None = None, outputs_coord: Tensor | None = None,
                 enc_topk_logits: Tensor | None = None, enc_topk_bboxes: Tensor | None = None,
                 denoising_meta_values: dict | None = None, predicted_corners: Tensor | None = None,
                 initial_reference_points: Tensor | None = None, **kwargs) -> tuple[Tensor, dict, list | None]:
        criterion = self.criterion(config).to(device)
        outputs, auxiliary_outputs = _criterion_outputs(
            self.family, config, logits, pred_boxes, outputs_class, outputs_coord, enc_topk_logits, enc_topk_bboxes,
            denoising_meta_values, predicted_corners, initial_reference_points)
        losses = criterion(outputs, labels)
        self._balance(losses, training=logits.requires_grad)
        return sum(losses.values()), losses, auxiliary_outputs

    def _balance(self, losses: dict, training: bool) -> None:
        """Weigh the box terms of ``losses`` in place: with ``box_balance="classification"`` scale
        each to its term's classification loss (the config's weights stay otherwise); for aLRP,
        record and apply the self-balancing weight of the localisation part."""
        suffixes = _term_suffixes(losses, self.key)
        if self.balance is None:
            if self.box_balance == "weights":
                return
            for suffix in suffixes:
                for box_key in BALANCED_BOX_LOSSES:
                    if box_key + suffix in losses:
                        losses[box_key + suffix] = _balanced_to(losses[box_key + suffix], losses[self.key + suffix])
            return
        localisation_key = self.key + "_localisation"
        weight = self.balance.weight
        if training:  # one step of the period per training call, with all terms' parts summed
            self.balance.record(sum(losses[self.key + suffix] for suffix in suffixes),
                                sum(losses[localisation_key + suffix] for suffix in suffixes))
        for suffix in suffixes:
            losses[localisation_key + suffix] = weight * losses[localisation_key + suffix]


def _family_of(model) -> _Family:
    for cls, family in _FAMILIES.items():
        if isinstance(model, cls):
            return family
    raise TypeError(f"convert_to_rank_based supports the transformers detectors {', '.join(SUPPORTED_MODELS)} "
                    f"(and the torchvision ones), got {type(model).__name__}")


def convert_detr_to_rank_based(model, loss: str = "brs", *, delta: float | None = None, backend: str = "auto",
                               box_balance: str = "weights", matcher_class_scale: float = 1.0):
    """Give a transformers RT-DETR, RT-DETRv2, D-FINE or DEIMv2 a rank-based loss, in place (see
    the module docstring and ``docs/detection_detr.md``); called by
    :func:`brl_triton.detection.convert_to_rank_based`.

    Args:
        model: ``RTDetrForObjectDetection``, ``RTDetrV2ForObjectDetection``,
            ``DFineForObjectDetection`` or ``Deimv2ForObjectDetection``, pretrained or not.
        loss: a short name of ``registry.LOSSES``: ``"brs"``, ``"rs"``, ``"bap"``, ``"ap"``,
            ``"alrp"``, ``"balrp"``.
        delta: smoothing width of the ranking loss; None for the loss's default.
        backend: the ranking loss's backend (``"auto"``, ``"torch"``, ``"triton"``).
        box_balance: the L1, GIoU and FGL terms' weights: ``"weights"`` (the config's) or
            ``"classification"`` (each scaled to its term's classification loss by a detached
            factor). aLRP replaces these terms and ignores it.
        matcher_class_scale: a factor on the config's ``matcher_class_cost`` in the Hungarian
            matching of the converted loss (the config itself is unchanged). The official
            Co-DETR BRS config matches with twice its focal baseline's class cost (4 against 2).

    Returns:
        The same model, whose ``loss_function`` is a :class:`RankBasedDetrLoss`. For aLRP it
        also holds ``alrp_balance`` (a :class:`TensorStateBalancingWeight`, in the state dict);
        converting to another loss removes it again.

    Raises:
        TypeError: for another model (the message lists the supported ones).
        ValueError: for an unknown ``loss`` or ``box_balance``, or a ``matcher_class_scale`` that
            is not a finite number > 0.

    Example:
        >>> from transformers import RTDetrConfig, RTDetrForObjectDetection
        >>> model = convert_detr_to_rank_based(RTDetrForObjectDetection(RTDetrConfig()), "brs")
        >>> type(model.loss_function).__name__
        'RankBasedDetrLoss'
    """
    family = _family_of(model)
    ranking = RankingLoss(loss, delta, backend)
    _check_box_balance(box_balance)  # before the model changes
    _check_matcher_class_scale(matcher_class_scale)
    balance = None
    if LOSSES_BY_SHORT[ranking.loss].regression:
        balance = TensorStateBalancingWeight(ALRP_BALANCE_PERIOD)
        model.alrp_balance = balance
    elif "alrp_balance" in model._modules:  # converted to aLRP before: its weight has no use now
        del model.alrp_balance
    model.loss_function = RankBasedDetrLoss(family, ranking, balance, box_balance, matcher_class_scale)
    return model
