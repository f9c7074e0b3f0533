"""Every check of a loss call's arguments, in one place: the eager path (``functional``) and the
compiled path (``_ops``) run the same ones. Type and shape checks run on the host before any
work; value checks (NaN/Inf, targets above one, the logits' range, the regression losses) read
the device once, where a backend does not check in a pass of its own (``checks_finite``)."""

from __future__ import annotations

import math
import numbers

import torch

from ._common import compute_dtype, read_host, wide_dtype


class NonFiniteError(ValueError):
    """NaN or Inf in the logits or the targets. A ``ValueError`` of its own, so that a training
    loop can tell a model that diverged from a wrong call.

    Example:
        >>> import torch, brl_triton
        >>> try:
        ...     brl_triton.bucketed_rank_sort_loss(torch.tensor([float("nan"), 0.0]), torch.tensor([1.0, 0.0]))
        ... except brl_triton.NonFiniteError as error:
        ...     print(error)
        logits contain NaN or Inf; ranking losses need finite logits
    """


NON_FINITE_LOGITS = "logits contain NaN or Inf; ranking losses need finite logits"
NON_FINITE_TARGETS = "targets contain NaN or Inf; use >0 (positive), 0 (negative) or <0 (ignored)"


def check_delta(delta, spec) -> float:
    """Return ``delta`` as a Python float, or raise if it is not a valid smoothing width."""
    if isinstance(delta, torch.Tensor):
        if delta.numel() != 1:
            raise ValueError(f"delta must be a scalar, got a tensor of shape {tuple(delta.shape)}")
        delta = delta.item()
    # numbers.Real: Python and numpy scalars alike
    if isinstance(delta, bool) or not isinstance(delta, numbers.Real):
        raise TypeError(f"delta must be a real number, got {type(delta).__name__}")
    delta = float(delta)
    # comparisons rather than math.isnan / isinf: under torch.compile(dynamic=True) delta is a
    # symbolic float, which comparisons accept (NaN fails both)
    if not 0 <= delta < math.inf:
        raise ValueError(f"delta must be a finite number >= 0, got {delta}")
    if spec.needs_smoothing and delta == 0:
        name = spec.paper.split(" (")[0]
        name = name[0].lower() + name[1:] if name[1:2].islower() else name
        raise ValueError(f"delta must be > 0 for the {name}, got 0.0")
    return delta


def check_inputs(logits, targets) -> None:
    """Raise a clear TypeError/ValueError for inputs no backend accepts (see also ``check_values``)."""
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
    if not logits.is_floating_point():
        raise TypeError(
            f"logits must be a floating-point tensor (float16, bfloat16, float32 or float64), "
            f"got {logits.dtype}"
        )
    if targets.is_complex():
        raise TypeError(f"targets must be a real (float, integer or bool) tensor, got {targets.dtype}")
    if logits.shape != targets.shape:
        raise ValueError(
            f"logits and targets must have the same shape, got logits {tuple(logits.shape)} "
            f"and targets {tuple(targets.shape)}"
        )
    if logits.device != targets.device:
        raise ValueError(
            f"logits and targets must be on the same device, got {logits.device} and {targets.device}"
        )


def check_regression_type(regression_losses, logits) -> None:
    """aLRP's ``regression_losses``: a floating-point tensor on the logits' device."""
    if not isinstance(regression_losses, torch.Tensor):
        raise TypeError(f"regression_losses must be a torch.Tensor, got {type(regression_losses).__name__}")
    if not regression_losses.is_floating_point():
        raise TypeError(f"regression_losses must be a floating-point tensor, got {regression_losses.dtype}")
    if regression_losses.device != logits.device:
        raise ValueError(f"regression_losses must be on the logits' device {logits.device}, "
                         f"got {regression_losses.device}")


def check_values(spec, logits, targets, delta: float, regression_losses, allow_targets_above_one: bool,
                 backend_checks_finite: bool, check_regression: bool = True) -> None:
    """The value checks of a call, the same on the eager and the compiled path: the logits and
    targets (unless the backend checks them in a pass of its own), and aLRP's regression losses
    (unless ``check_regression`` is False: the Triton backend without validation checks them on
    the device)."""
    if not backend_checks_finite:
        check_finite(logits, targets, allow_targets_above_one, delta)
    if spec.regression and check_regression:
        check_regression_losses(regression_losses, logits, targets)


TARGETS_ABOVE_ONE = (
    "targets must be <= 1 (a positive's value is its IoU quality target, or 1 for AP losses){}; class indices "
    "passed as targets look like this. Pass allow_targets_above_one=True to use larger quality targets as given"
)


LOGIT_RANGE = (
    "logits span [{low:g}, {high:g}], which with delta = {delta:g} and {n} elements is too wide for {dtype} "
    "arithmetic: the loss's sums of logit differences would overflow. Rescale the logits or delta{hint}"
)


def check_logit_range(low: float, high: float, delta: float, n: int, dtype: torch.dtype) -> None:
    """ValueError when ``n * ((high + delta) - (low - delta))`` overflows ``dtype``, the loss's
    compute dtype: the widest difference a loss forms (breakpoints ``s -/+ delta`` included),
    summed over every element. Within that range finite logits give a finite, exact loss."""
    # in Python floats (float64, which holds every float32 exactly), against the dtype's largest
    # value: no torch op, so no kernel launch or host sync on the loss's path
    widest = ((high + delta) - (low - delta)) * n
    if not widest <= torch.finfo(dtype).max:  # NaN fails too
        hint = "" if dtype == torch.float64 else ", or pass float64 logits"
        raise ValueError(LOGIT_RANGE.format(low=low, high=high, delta=delta, n=n, dtype=dtype, hint=hint))


def check_finite(logits: torch.Tensor, targets: torch.Tensor, allow_targets_above_one: bool = False,
                 delta: float = 0.0) -> None:
    """NonFiniteError for NaN/Inf in the logits or in float targets; ValueError for targets > 1
    unless allowed, and for logits too far apart for the compute dtype (``check_logit_range``).

    It reads every element once and the device once, so that the loss fails here rather than
    return a silent NaN; backends that check in a pass of their own skip it.
    """
    if logits.numel() == 0:
        return
    logits, targets = logits.detach(), targets.detach()  # reading them must not warn about their graph
    wide = wide_dtype(logits.device)
    # min and max propagate NaN and are infinite iff some element is: one pass instead of isfinite's four
    ends = list(torch.aminmax(logits))
    if targets.dtype != torch.bool:
        ends += list(torch.aminmax(targets))
    low, high, *target_ends = torch.stack([end.to(wide) for end in ends]).tolist()
    if not (math.isfinite(low) and math.isfinite(high)):
        raise NonFiniteError(NON_FINITE_LOGITS)
    if target_ends:
        if not all(map(math.isfinite, target_ends)):
            raise NonFiniteError(NON_FINITE_TARGETS)
        if not allow_targets_above_one and target_ends[1] > 1:
            raise ValueError(TARGETS_ABOVE_ONE.format(f", got a target of {target_ends[1]:g}"))
    check_logit_range(low, high, delta, logits.numel(), compute_dtype(logits.dtype))


def check_regression_losses(regression_losses, logits, targets) -> None:
    """Finite values >= 0 on the logits' device, one per positive of ``targets`` (of this
    process, with a process group)."""
    check_regression_type(regression_losses, logits)
    values = regression_losses.detach().reshape(-1)
    checks = [(targets.detach() > 0).sum()]
    if values.numel():
        low, high = torch.aminmax(values)
        inf = float("inf")  # NaN fails both comparisons
        checks += [(low > -inf) & (high < inf), low >= 0]
    # one host read for all checks
    positives, *finite_and_non_negative = read_host(torch.stack([c.to(torch.int64) for c in checks]))
    if finite_and_non_negative:
        finite, non_negative = finite_and_non_negative
        if not finite:  # a diverged model's boxes, as its logits
            raise NonFiniteError("regression_losses contain NaN or Inf; they must be finite and >= 0")
        if not non_negative:
            raise ValueError("regression_losses must be finite and >= 0 (e.g. a GIoU loss scaled to [0, 1])")
    if values.numel() != positives:
        raise ValueError(f"regression_losses must hold one value per positive target ({positives}, in the flat "
                         f"order of targets > 0), got {values.numel()}")
