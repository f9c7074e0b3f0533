"""The losses as functions: ``bucketed_rank_sort_loss``, ``rank_sort_loss``,
``bucketed_ap_loss``, ``ap_loss`` (``interpolated=True``: the interpolated AP loss),
``alrp_loss`` and ``bucketed_alrp_loss``, one per public entry of ``registry.LOSSES`` (a test
keeps the two in step). All of them compute what ``docs/losses.md`` defines.

Inputs, the same for every loss:

- ``logits``: ``(*)`` float16, bfloat16, float32 or float64 tensor of any shape, e.g. the
  ``(B, A, C)`` classification logits of a detector. It is flattened: the whole tensor is one
  ranking (all images and classes together, as in the paper's detectors).
- ``targets``: same shape, any real dtype (float, integer or bool). ``> 0``: positive, the value
  being its quality target (the IoU of its predicted box with the ground truth); values above 1
  raise unless ``allow_targets_above_one=True``, since class indices passed by mistake look like
  them. ``== 0``: negative. ``< 0``: ignored (no contribution, zero gradient).
- ``delta``: smoothing width of the step function H, ``>= 0`` (0 is the hard step; ``> 0`` for
  aLRP and the interpolated AP loss).

Settings, keyword-only, the same for every loss:

- ``backend``: ``"auto"`` (Triton for CUDA tensors when triton is installed, else torch; the
  environment variable ``BRL_BACKEND`` overrides it), ``"torch"`` (plain torch ops, any device),
  ``"triton"`` (Triton kernels: CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``) or
  ``"reference"`` (the O(P*N) float64 oracle; slow, for tests).
- ``process_group``: a ``torch.distributed`` group (gloo or nccl). Each rank passes its share of
  the batch and the loss ranks the union of all ranks' elements: the positives (O(P) numbers)
  are all-gathered and the per-bucket statistics all-reduced. Every rank returns the same loss
  value, the loss of the concatenated batch, and its logits get exactly their slice of that
  loss's gradient. DDP then averages parameter gradients over ranks, so the step is the global
  loss's gradient divided by the world size, as with any loss under DDP. Under
  ``torch.compile`` such a call runs eagerly behind a graph break (``fullgraph=True`` refuses
  it, saying so).
- ``deterministic``: bit-identical results across runs (also on under
  ``torch.use_deterministic_algorithms(True)``): the per-bucket offset sums, the only
  order-dependent float reductions (GPU atomics), are summed as int64 fixed point instead.
- ``allow_targets_above_one``: use quality targets above 1 as given.
- ``validate`` (default ``True``): raise the errors below for bad values. The Triton backend
  finds them on the device, and the host waits for the device once per call to read them (aLRP:
  twice, its regression losses are checked before). ``validate=False`` skips those reads: with
  float16/bfloat16/float32 logits, up to 32767 positives and no ``process_group``, a Triton call
  then has no host sync at all, which lets the CPU queue ahead and CUDA graphs capture it; a
  call with bad values (NaN/Inf, targets above one, logits too far apart, for aLRP regression
  losses that are negative or not one per positive), or with more positives, returns NaN losses
  and NaN gradients instead of raising. Shapes, dtypes, devices and ``delta`` are checked either
  way; the torch backend syncs anyway and with ``validate=False`` checks no values.

Outputs: 0-d tensors, float32 (float64 for float64 logits). The logits' gradient is the paper's
error-driven "identity update", not the derivative of the step-function loss, in the logits'
dtype; Rank & Sort honours the upstream gradients of its two outputs separately. Without any
positive (or for empty input) the losses are 0, attached to the graph, with zero gradients.

Errors: ``TypeError`` for inputs of the wrong type (logits not floating point, targets complex,
delta not a number); ``brl_triton.NonFiniteError`` (a ``ValueError``) for NaN/Inf in the logits
or targets; ``ValueError`` for shape or device mismatch, targets above 1 (unless allowed), delta
< 0 or NaN (or 0 where it must be > 0), an unknown backend or ``backend="triton"`` where it
cannot run, and for aLRP ``regression_losses`` that are negative, on another device, or not one
value per positive.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import registry
from ._autograd import RankingLossFunction
from ._backends import resolve_backend
from ._checks import check_delta, check_inputs, check_regression_type, check_values
from ._common import Settings
from ._ops import compiled_apply
from ._outputs import assemble_outputs

__all__ = ["bucketed_rank_sort_loss", "rank_sort_loss", "bucketed_ap_loss", "ap_loss", "alrp_loss",
           "bucketed_alrp_loss"]


def _apply(spec, logits, targets, delta, backend, process_group, deterministic, regression_losses=None,
           allow_targets_above_one=False, validate=True):
    """Every function's body: the host-side checks, then the eager autograd Function, or under
    ``torch.compile`` (and for meta tensors) the ``torch.library`` ops of ``_ops``."""
    delta = check_delta(delta, spec)
    check_inputs(logits, targets)
    deterministic = bool(deterministic) or torch.are_deterministic_algorithms_enabled()
    if spec.regression:
        check_regression_type(regression_losses, logits)
    arguments = (spec, logits, targets, delta, backend, process_group, deterministic, regression_losses,
                 bool(allow_targets_above_one), bool(validate))
    if process_group is not None and torch.compiler.is_compiling():
        return _apply_with_process_group(*arguments)
    if torch.compiler.is_compiling() or logits.device.type == "meta":
        # the ops that the compiler sees through (and whose fake kernels give meta tensors their
        # outputs' shapes)
        return compiled_apply(spec, logits, targets, delta, backend, deterministic, regression_losses,
                              allow_targets_above_one, validate)
    return _apply_eagerly(*arguments)


def _apply_eagerly(spec, logits, targets, delta, backend, process_group, deterministic, regression_losses,
                   allow_targets_above_one, validate):
    implementation = resolve_backend(backend, logits)
    if process_group is not None:
        if implementation.name == "reference":
            raise ValueError("process_group is supported by the 'torch' and 'triton' backends, not 'reference'")
        if not torch.distributed.is_available() or not torch.distributed.is_initialized():
            raise ValueError("process_group was given but torch.distributed is not initialized")
    # without validate nothing reads the logits' values on the host (aLRP's regression losses still are)
    check_values(spec, logits, targets, delta, regression_losses, allow_targets_above_one,
                 implementation.checks_finite or not validate,
                 check_regression=validate or implementation.name != "triton")
    settings = Settings(process_group, deterministic, allow_targets_above_one, validate)
    *outputs, _state = RankingLossFunction.apply(logits, targets, delta, spec, implementation, settings,
                                                 None if regression_losses is None else regression_losses.detach())
    ranking_losses = tuple(outputs[:spec.ranking_outputs])
    if spec.regression:
        value, weights = outputs[spec.ranking_outputs:]
        return assemble_outputs(spec, logits, ranking_losses, regression_losses, value, weights)
    return assemble_outputs(spec, logits, ranking_losses)


# A global ranking exchanges data-dependent numbers of positives between the ranks, which a
# compiled graph cannot express: under torch.compile the loss runs eagerly, behind a graph break
# (and, with fullgraph=True, torch.compile reports this reason).
_apply_with_process_group = torch.compiler.disable(
    _apply_eagerly, reason="brl_triton: a loss with process_group= runs eagerly (its collectives exchange "
                           "data-dependent numbers of positives); compile without fullgraph=True, or rank each "
                           "process's batch alone (process_group=None)")


def bucketed_rank_sort_loss(logits: Tensor, targets: Tensor, delta: float = 0.5, *, backend: str = "auto",
                            process_group=None, deterministic: bool = False,
                            allow_targets_above_one: bool = False, validate: bool = True) -> tuple[Tensor, Tensor]:
    """Bucketed Rank & Sort (BRS, Yavuz et al., ECCV 2024).

    The negatives between two consecutive positives (in descending logit order) form a bucket
    and act as that many copies of their mean logit, so the cost is O(N log P + P log P) instead
    of the O(P * N) of Rank & Sort. With ``delta == 0`` it equals :func:`rank_sort_loss`.

    Args:
        logits: ``(*)`` float16/bfloat16/float32/float64 classification logits, one ranking.
        targets: ``(*)``, any real dtype: ``> 0`` positive (IoU target), ``0`` negative, ``< 0`` ignored.
        delta: smoothing width of the step function H, ``>= 0`` (0: the hard step, and RS exactly).
        backend, process_group, deterministic, allow_targets_above_one, validate: see the module docstring.

    Returns:
        ``(ranking_loss, sorting_loss)``, 0-d: the mean ranking error over the positives, in
        [0, 1], and the mean sorting error, in [-1, 1].

    Example:
        >>> logits = torch.randn(2, 100, 8, requires_grad=True)
        >>> targets = torch.zeros(2, 100, 8)
        >>> targets[0, :5, 3] = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5])  # 5 positives, IoU targets
        >>> ranking, sorting = bucketed_rank_sort_loss(logits, targets)
        >>> (ranking + sorting).backward()
    """
    return _apply(registry.BUCKETED_RANK_SORT, logits, targets, delta, backend, process_group, deterministic,
                  None, allow_targets_above_one, validate)


def rank_sort_loss(logits: Tensor, targets: Tensor, delta: float = 0.5, *, backend: str = "auto",
                   process_group=None, deterministic: bool = False,
                   allow_targets_above_one: bool = False, validate: bool = True) -> tuple[Tensor, Tensor]:
    """Rank & Sort (RS, Oksuz et al., ICCV 2021), exact, at bucketed cost.

    Every relevant negative counts with its own logit. H is piecewise linear with kinks at
    ``s_i -/+ delta``, so the negatives are reduced per interval between those 2P breakpoints,
    which gives the exact loss and gradient in O(N log P + P log P).

    Args:
        logits: ``(*)`` float16/bfloat16/float32/float64 classification logits, one ranking.
        targets: ``(*)``, any real dtype: ``> 0`` positive (IoU target), ``0`` negative, ``< 0`` ignored.
        delta: half-width of the ramp of H around each positive, ``>= 0`` (0: the hard step).
        backend, process_group, deterministic, allow_targets_above_one, validate: see the module docstring.

    Returns:
        ``(ranking_loss, sorting_loss)``: the mean ranking error over the positives, in [0, 1],
        and the mean sorting error, in [-1, 1] (0-d tensors).

    Example:
        >>> logits = torch.randn(4, 1000, requires_grad=True)
        >>> targets = torch.zeros(4, 1000)
        >>> targets[:, :3] = torch.tensor([0.95, 0.7, 0.55])  # 3 positives per row, IoU targets
        >>> targets[:, 3:10] = -1  # ignored
        >>> ranking, sorting = rank_sort_loss(logits, targets)
        >>> (ranking + 0.5 * sorting).backward()  # each output's upstream gradient is honoured
    """
    return _apply(registry.RANK_SORT, logits, targets, delta, backend, process_group, deterministic, None,
                  allow_targets_above_one, validate)


def bucketed_ap_loss(logits: Tensor, targets: Tensor, delta: float = 1.0, *, backend: str = "auto",
                     process_group=None, deterministic: bool = False,
                     allow_targets_above_one: bool = False, validate: bool = True) -> Tensor:
    """Bucketed AP loss (BAP, Yavuz et al., ECCV 2024).

    The mean bucketed ranking error over the positives (buckets as in
    :func:`bucketed_rank_sort_loss`). Only whether a target is positive matters (usually 1);
    there is no sorting term.

    Args:
        logits: ``(*)`` float16/bfloat16/float32/float64 classification logits, one ranking.
        targets: ``(*)``, any real dtype: ``> 0`` positive (IoU target), ``0`` negative, ``< 0`` ignored.
        delta: smoothing width of the step function H, ``>= 0``; buckets as in BRS.
        backend, process_group, deterministic, allow_targets_above_one, validate: see the module docstring.

    Returns:
        0-d tensor: the AP loss (1 - AP), in [0, 1].

    Example:
        >>> logits = torch.randn(16, 500, requires_grad=True)
        >>> targets = (torch.rand(16, 500) < 0.01).float()  # about 80 positives
        >>> loss = bucketed_ap_loss(logits, targets)
        >>> loss.backward()
    """
    return _apply(registry.BUCKETED_AP, logits, targets, delta, backend, process_group, deterministic, None,
                  allow_targets_above_one, validate)


def ap_loss(logits: Tensor, targets: Tensor, delta: float = 1.0, *, interpolated: bool = False,
            backend: str = "auto", process_group=None, deterministic: bool = False,
            allow_targets_above_one: bool = False, validate: bool = True) -> Tensor:
    """AP loss, exact (every negative with its own logit), at bucketed cost.

    The mean exact ranking error, 1 - AP with the smoothed step. ``interpolated=True`` gives the
    original AP-loss (Chen et al.) as in the Rank & Sort repository: precision interpolated by a
    running maximum over the positives in ascending logit order, and its error-driven gradient.

    Args:
        logits: ``(*)`` float16/bfloat16/float32/float64 classification logits, one ranking.
        targets: ``(*)``, any real dtype: ``> 0`` positive (IoU target), ``0`` negative, ``< 0`` ignored.
        delta: half-width of the ramp of H, ``>= 0``; ``> 0`` with ``interpolated=True``.
        interpolated: compute the interpolated AP loss (Chen et al.) instead.
        backend, process_group, deterministic, allow_targets_above_one, validate: see the module docstring.

    Returns:
        0-d tensor: the AP loss (1 - AP), in [0, 1].

    Example:
        >>> logits = torch.randn(300, 20, requires_grad=True)
        >>> targets = torch.zeros(300, 20, dtype=torch.bool)
        >>> targets[:4, 7] = True  # 4 positives
        >>> loss = ap_loss(logits, targets, interpolated=True)
        >>> loss.backward()
    """
    spec = registry.INTERPOLATED_AP if interpolated else registry.AP
    return _apply(spec, logits, targets, delta, backend, process_group, deterministic, None, allow_targets_above_one,
                  validate)


def alrp_loss(logits: Tensor, targets: Tensor, regression_losses: Tensor, delta: float = 1.0, *,
              backend: str = "auto", process_group=None, deterministic: bool = False,
              allow_targets_above_one: bool = False, validate: bool = True) -> tuple[Tensor, Tensor]:
    """aLRP loss (Oksuz et al., NeurIPS 2020), exact, at bucketed cost.

    Average Localisation-Recall-Precision: a positive's error counts the negatives above it and
    the regression losses of the positives above it. The classification part ranks the logits
    (its gradient goes to the logits; the regression losses are constants there); the
    localisation part is the rank-weighted mean of the regression losses and is differentiable in
    them. Weigh the two with :class:`brl_triton.SelfBalancingWeight`.

    Args:
        logits: ``(*)`` float16/bfloat16/float32/float64 classification logits, one ranking.
        targets: ``(*)``, any real dtype: ``> 0`` positive (IoU target), ``0`` negative, ``< 0`` ignored.
        regression_losses: ``(P,)`` float, one value >= 0 per positive in the flat order of
            ``logits[targets > 0]``, e.g. ``(1 - GIoU) / 2``.
        delta: smoothing width of the step function H, ``> 0`` (aLRP needs H(0) = 1/2).
        backend, process_group, deterministic, allow_targets_above_one, validate: see the module docstring.

    Returns:
        ``(classification_loss, localisation_loss)``, 0-d: the mean of FP(i) / rank(i), in
        [0, 1], and the localisation part.

    Example:
        >>> logits = torch.randn(1000, requires_grad=True)
        >>> targets = torch.zeros(1000)
        >>> targets[:6] = 1.0  # 6 positives
        >>> regression_losses = torch.rand(6, requires_grad=True)  # one per positive
        >>> classification, localisation = alrp_loss(logits, targets, regression_losses)
        >>> (classification + 10.0 * localisation).backward()
    """
    return _apply(registry.ALRP, logits, targets, delta, backend, process_group, deterministic, regression_losses,
                  allow_targets_above_one, validate)


def bucketed_alrp_loss(logits: Tensor, targets: Tensor, regression_losses: Tensor, delta: float = 1.0, *,
                       backend: str = "auto", process_group=None, deterministic: bool = False,
                       allow_targets_above_one: bool = False, validate: bool = True) -> tuple[Tensor, Tensor]:
    """Bucketed aLRP loss (aLRP of Oksuz et al. with the buckets of Yavuz et al.).

    :func:`alrp_loss` with the negatives bucketed between consecutive positives, as in
    :func:`bucketed_rank_sort_loss`; the positive x positive terms (rank+ and the
    regression-weighted rank) stay exact.

    Args:
        logits: ``(*)`` float16/bfloat16/float32/float64 classification logits, one ranking.
        targets: ``(*)``, any real dtype: ``> 0`` positive (IoU target), ``0`` negative, ``< 0`` ignored.
        regression_losses: ``(P,)`` float, one value >= 0 per positive, as for :func:`alrp_loss`.
        delta: half-width of the ramp of H, ``> 0`` as for :func:`alrp_loss`.
        backend, process_group, deterministic, allow_targets_above_one, validate: see the module docstring.

    Returns:
        ``(classification_loss, localisation_loss)``, 0-d, as :func:`alrp_loss`'s.

    Example:
        >>> logits = torch.randn(3, 2000, requires_grad=True)
        >>> targets = torch.zeros(3, 2000)
        >>> targets[:, :2] = torch.tensor([0.8, 0.6])  # 2 positives per row
        >>> regression_losses = torch.rand(6, requires_grad=True)  # in the order of logits[targets > 0]
        >>> classification, localisation = bucketed_alrp_loss(logits, targets, regression_losses)
        >>> balance = SelfBalancingWeight(period=100)
        >>> balance(classification, localisation).backward()
    """
    return _apply(registry.BUCKETED_ALRP, logits, targets, delta, backend, process_group, deterministic,
                  regression_losses, allow_targets_above_one, validate)
