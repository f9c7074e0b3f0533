"""The losses as functions: ``bucketed_rank_sort_loss``, ``rank_sort_loss``, ``bucketed_ap_loss``, ``ap_loss``.

All of them follow ``docs/losses.md``. Common conventions:

- ``logits``: float tensor (float16, bfloat16, float32 or float64) of any shape, e.g. ``(B, A, C)``
  classification logits of a detector; it is flattened, and the whole tensor is one ranking
  (all images and classes together, as in the paper's detectors).
- ``targets``: same shape, any float, integer or bool dtype. ``> 0``: positive, the value being
  its quality target (the IoU of the predicted box with its ground truth; values above 1 are
  accepted as they are); ``== 0``: negative; ``< 0``: ignored (no contribution, zero gradient).
- ``delta``: smoothing width of the step function H, ``>= 0``; 0 is the hard step.
- The gradient is the paper's error-driven "identity update", not the derivative of the
  step-function loss. Rank & Sort honours the upstream gradients of its two outputs separately.
- Losses are 0-d tensors in float32 (float64 for float64 logits); the gradient has the logits' dtype.
  Without any positive (or for empty input) the losses are 0, attached to the graph, with zero
  gradients.
- ``backend``: ``"auto"`` (Triton for CUDA tensors when triton is installed, else torch; the
  environment variable ``BRL_BACKEND`` overrides it), ``"torch"`` (plain torch ops, any device),
  ``"triton"`` (Triton kernels: CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``) or
  ``"reference"`` (the O(P*N) float64 oracle; slow, for tests).

Distributed: with ``process_group=`` (torch.distributed initialised, gloo or nccl), each rank
passes its share of the batch and the loss ranks the union of all ranks' elements: the
positives (O(P) numbers) are all-gathered and the per-bucket statistics all-reduced. Every rank
returns the same loss value, the loss of the concatenated batch, and its logits get exactly
their slice of that loss's gradient. DDP then averages parameter gradients over ranks, so the
step is the global loss's gradient divided by the world size, as with any loss under DDP;
multiply the loss by the world size if you want the undivided one.

Deterministic: ``deterministic=True`` (or ``torch.use_deterministic_algorithms(True)``) gives
bit-identical results across runs: the per-bucket offset sums, the only order-dependent float
reductions (GPU atomics), are summed as int64 fixed point instead.
"""

from __future__ import annotations

import torch

from ._autograd import RankingLossFunction
from ._backends import resolve_backend
from ._common import (
    AP,
    BUCKETED_AP,
    BUCKETED_RANK_SORT,
    INTERPOLATED_AP,
    RANK_SORT,
    Settings,
    check_delta,
    check_finite,
    check_inputs,
)

__all__ = ["bucketed_rank_sort_loss", "rank_sort_loss", "bucketed_ap_loss", "ap_loss"]


def _apply(kind, logits, targets, delta, backend, process_group, deterministic):
    delta = check_delta(delta, kind)
    check_inputs(logits, targets)
    implementation = resolve_backend(backend, logits)
    if process_group is not None:
        if implementation.name == "reference":
            raise ValueError("process_group is supported by the 'torch' and 'triton' backends, not 'reference'")
        if not torch.distributed.is_available() or not torch.distributed.is_initialized():
            raise ValueError("process_group was given but torch.distributed is not initialized")
    if not implementation.checks_finite:
        check_finite(logits, targets)
    settings = Settings(process_group, bool(deterministic) or torch.are_deterministic_algorithms_enabled())
    losses = RankingLossFunction.apply(logits, targets, delta, kind, implementation, settings)
    return losses if kind.sorting else losses[0]


def bucketed_rank_sort_loss(
    logits: torch.Tensor, targets: torch.Tensor, delta: float = 0.5, *, backend: str = "auto",
    process_group=None, deterministic: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bucketed Rank & Sort loss (BRS, Yavuz et al., ECCV 2024).

    The negatives between two consecutive positives (in descending logit order) form a bucket
    and act as that many copies of their mean logit, so the cost is O(M log P + P^2) instead of
    the O(P * M) of Rank & Sort. With ``delta == 0`` it equals :func:`rank_sort_loss` exactly.

    Args:
        logits: ``(*)`` float16/bfloat16/float32/float64 classification logits.
        targets: ``(*)``, same shape, any real dtype: ``> 0`` positive with its IoU (quality)
            target, ``0`` negative, ``< 0`` ignored.
        delta: smoothing width of the step function, ``>= 0`` (default 0.5).
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"reference"``.
        process_group: a ``torch.distributed`` group: rank the union of all its ranks' logits
            (see "Distributed" above); None: this tensor alone.
        deterministic: bit-identical results across runs (also on under
            ``torch.use_deterministic_algorithms(True)``).

    Returns:
        ``(ranking_loss, sorting_loss)``: 0-d tensors, the means over positives of the
        (bucketed) ranking error in [0, 1] and of the sorting error in [-1, 1]. Add them (or
        weight them) to form the training loss.

    Raises:
        TypeError: logits not floating point, targets complex, delta not a number.
        ValueError: shape or device mismatch, NaN/Inf in logits or targets, delta < 0 or NaN,
            unknown backend, ``backend="triton"`` where it cannot run.

    Example:
        >>> logits = torch.tensor([2.0, 1.0, 0.5, -1.0], requires_grad=True)
        >>> targets = torch.tensor([0.9, 0.0, 0.6, -1.0])  # two positives, one negative, one ignored
        >>> ranking, sorting = bucketed_rank_sort_loss(logits, targets)
        >>> (ranking + sorting).backward()
    """
    return _apply(BUCKETED_RANK_SORT, logits, targets, delta, backend, process_group, deterministic)


def rank_sort_loss(
    logits: torch.Tensor, targets: torch.Tensor, delta: float = 0.5, *, backend: str = "auto",
    process_group=None, deterministic: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank & Sort loss (RS, Oksuz et al., ICCV 2021), exact, at bucketed cost.

    Every relevant negative counts with its own logit (no bucketing). Since H is piecewise
    linear with kinks at ``s_i -/+ delta``, the negatives are reduced per interval between those
    2P breakpoints, which gives the exact loss and gradient in O(M log P + P^2).

    Args:
        logits: ``(*)`` float16/bfloat16/float32/float64 classification logits.
        targets: ``(*)``, same shape, any real dtype: ``> 0`` positive with its IoU (quality)
            target, ``0`` negative, ``< 0`` ignored.
        delta: smoothing width of the step function, ``>= 0`` (default 0.5).
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"reference"``.
        process_group: a ``torch.distributed`` group: rank the union of all its ranks' logits
            (see "Distributed" above); None: this tensor alone.
        deterministic: bit-identical results across runs (also on under
            ``torch.use_deterministic_algorithms(True)``).

    Returns:
        ``(ranking_loss, sorting_loss)``: 0-d tensors (ranking error in [0, 1], sorting error in
        [-1, 1], both averaged over positives).

    Raises:
        TypeError, ValueError: as :func:`bucketed_rank_sort_loss`.

    Example:
        >>> logits = torch.randn(2, 1000, 80, requires_grad=True)
        >>> targets = torch.zeros(2, 1000, 80)
        >>> targets[0, :5, 3] = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5])
        >>> ranking, sorting = rank_sort_loss(logits, targets)
        >>> (ranking + sorting).backward()
    """
    return _apply(RANK_SORT, logits, targets, delta, backend, process_group, deterministic)


def bucketed_ap_loss(
    logits: torch.Tensor, targets: torch.Tensor, delta: float = 1.0, *, backend: str = "auto",
    process_group=None, deterministic: bool = False,
) -> torch.Tensor:
    """Bucketed AP loss (BAP): the mean bucketed ranking error over positives.

    Only whether a target is positive matters (usually 1); there is no sorting term.

    Args:
        logits: ``(*)`` float16/bfloat16/float32/float64 classification logits.
        targets: ``(*)``, same shape, any real dtype: ``> 0`` positive, ``0`` negative,
            ``< 0`` ignored.
        delta: smoothing width of the step function, ``>= 0`` (default 1.0).
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"reference"``.
        process_group: a ``torch.distributed`` group: rank the union of all its ranks' logits
            (see "Distributed" above); None: this tensor alone.
        deterministic: bit-identical results across runs (also on under
            ``torch.use_deterministic_algorithms(True)``).

    Returns:
        0-d tensor in [0, 1].

    Raises:
        TypeError, ValueError: as :func:`bucketed_rank_sort_loss`.

    Example:
        >>> logits = torch.randn(4, 100, requires_grad=True)
        >>> targets = (torch.rand(4, 100) > 0.95).float()
        >>> bucketed_ap_loss(logits, targets).backward()
    """
    return _apply(BUCKETED_AP, logits, targets, delta, backend, process_group, deterministic)


def ap_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    delta: float = 1.0,
    *,
    interpolated: bool = False,
    backend: str = "auto",
    process_group=None,
    deterministic: bool = False,
) -> torch.Tensor:
    """AP loss, exact (every negative with its own logit), at bucketed cost.

    ``interpolated=False``: the mean exact ranking error, ``1 - AP`` with the smoothed step.
    ``interpolated=True``: the original AP-loss (Chen et al.) as in the Rank & Sort repository:
    precision interpolated by a running maximum over positives in ascending logit order, and
    its error-driven gradient; it needs ``delta > 0``.

    Args:
        logits: ``(*)`` float16/bfloat16/float32/float64 classification logits.
        targets: ``(*)``, same shape, any real dtype: ``> 0`` positive, ``0`` negative,
            ``< 0`` ignored.
        delta: smoothing width of the step function (default 1.0); ``>= 0``, or ``> 0`` when
            interpolated.
        interpolated: use the original interpolated AP-loss.
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"reference"``.
        process_group: a ``torch.distributed`` group: rank the union of all its ranks' logits
            (see "Distributed" above); None: this tensor alone.
        deterministic: bit-identical results across runs (also on under
            ``torch.use_deterministic_algorithms(True)``).

    Returns:
        0-d tensor in [0, 1].

    Raises:
        TypeError, ValueError: as :func:`bucketed_rank_sort_loss`; ValueError also for
            ``interpolated=True`` with ``delta == 0``.

    Example:
        >>> logits = torch.randn(4, 100, requires_grad=True)
        >>> targets = (torch.rand(4, 100) > 0.95).long()
        >>> ap_loss(logits, targets, interpolated=True).backward()
    """
    return _apply(INTERPOLATED_AP if interpolated else AP, logits, targets, delta, backend, process_group, deterministic)
