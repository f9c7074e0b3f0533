"""Host-side helpers shared by every backend: settings, input checks, flattening."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Settings:
    """How a loss is run, beyond what it computes.

    ``process_group``: rank the union of all ranks' elements (see ``_distributed``).
    ``deterministic``: bit-identical results across runs (no order-dependent float atomics).
    ``allow_targets_above_one``: accept quality targets > 1 (refused by default: class indices
    passed by mistake look like them).
    """

    process_group: object = None
    deterministic: bool = False
    allow_targets_above_one: bool = False


TARGETS_ABOVE_ONE = (
    "targets must be <= 1 (a positive's value is its IoU quality target, or 1 for AP losses){}; class indices "
    "passed as targets look like this. Pass allow_targets_above_one=True to use larger quality targets as given"
)


def check_delta(delta, kind) -> float:
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
    if kind.needs_smoothing and delta == 0:
        name = kind.paper.split(" (")[0]
        name = name[0].lower() + name[1:] if name[1:2].islower() else name
        raise ValueError(f"delta must be > 0 for the {name}, got 0.0")
    return delta


def check_inputs(logits, targets) -> None:
    """Raise a clear TypeError/ValueError for inputs no backend accepts (see also ``check_finite``)."""
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


# Devices without float64 tensors (Apple MPS): the torch backend keeps its O(P + E) tables in
# float32 there, with float32 round-off, instead of refusing to run.
NO_FLOAT64_DEVICES = {"mps"}


def wide_dtype(device) -> torch.dtype:
    """The dtype of the loss's small tables (per positive, per bin): float64 where the device has it."""
    return torch.float32 if torch.device(device).type in NO_FLOAT64_DEVICES else torch.float64


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float16/bfloat16 are upcast; float32 and float64 are kept."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# From this many values on, a CPU sort of floats is faster as a sort of their bit patterns: torch
# sorts integers by radix and floats by merging (2x faster for float64 at 10^5 values, 6x for float32).
RADIX_SORT_FROM = 1 << 14
_SIGNED_BITS = {torch.float32: (torch.int32, 31), torch.float64: (torch.int64, 63)}


def stable_sort(x: torch.Tensor, descending: bool = False):
    """``torch.sort(x, stable=True, descending=descending)`` of a 1-D tensor of finite values:
    ``(values, indices)``, ties in their order in ``x``."""
    if x.device.type != "cpu" or x.dtype not in _SIGNED_BITS or x.numel() < RADIX_SORT_FROM:
        return torch.sort(x, stable=True, descending=descending)
    int_dtype, sign = _SIGNED_BITS[x.dtype]
    # + 0.0 turns -0.0 into +0.0, which it ties with; flipping the magnitude bits of negatives then
    # orders the bit patterns, read as signed integers, like the floats
    bits = ((-x if descending else x) + 0.0).view(int_dtype)
    key = bits ^ ((bits >> sign) & torch.iinfo(int_dtype).max)
    order = torch.sort(key, stable=True).indices
    return x.index_select(0, order), order


def flat_inputs(logits: torch.Tensor, targets: torch.Tensor):
    """Flatten to 1-D: logits in the compute dtype, targets as they are (any real dtype)."""
    s = logits.detach().reshape(-1).to(compute_dtype(logits.dtype))
    y = targets.detach().reshape(-1)
    if y.dtype == torch.bool:
        y = y.to(torch.uint8)
    return s, y
