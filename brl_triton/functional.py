"""The losses as functions, one per entry of ``registry.LOSSES``: ``bucketed_rank_sort_loss``,
``rank_sort_loss``, ``bucketed_ap_loss``, ``ap_loss``, ``alrp_loss``, ``bucketed_alrp_loss``.

All of them follow ``docs/losses.md``. Common conventions:

- ``logits``: float tensor (float16, bfloat16, float32 or float64) of any shape, e.g. ``(B, A, C)``
  classification logits of a detector; it is flattened, and the whole tensor is one ranking
  (all images and classes together, as in the paper's detectors).
- ``targets``: same shape, any float, integer or bool dtype. ``> 0``: positive, the value being
  its quality target (the IoU of the predicted box with its ground truth; values above 1 raise
  unless ``allow_targets_above_one=True``, since class indices passed by mistake look like them);
  ``== 0``: negative; ``< 0``: ignored (no contribution, zero gradient).
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

import textwrap

import torch

from . import registry
from ._autograd import RankingLossFunction
from ._backends import resolve_backend
from ._common import NonFiniteError, Settings, check_delta, check_finite, check_inputs
from ._ops import compiled_apply

__all__ = [spec.function_name for spec in registry.LOSSES if registry.public(spec)]


def _apply(kind, logits, targets, delta, backend, process_group, deterministic, regression_losses=None,
           allow_targets_above_one=False):
    delta = check_delta(delta, kind)
    check_inputs(logits, targets)
    if torch.compiler.is_compiling():  # the torch.library ops, which the compiler sees through
        if process_group is not None:
            raise ValueError("process_group is not available under torch.compile; call the loss eagerly")
        if kind.regression:
            _check_regression_type(regression_losses, logits)
        return compiled_apply(kind, logits, targets, delta, backend, bool(deterministic)
                              or torch.are_deterministic_algorithms_enabled(), regression_losses,
                              allow_targets_above_one)
    implementation = resolve_backend(backend, logits)
    if process_group is not None:
        if implementation.name == "reference":
            raise ValueError("process_group is supported by the 'torch' and 'triton' backends, not 'reference'")
        if not torch.distributed.is_available() or not torch.distributed.is_initialized():
            raise ValueError("process_group was given but torch.distributed is not initialized")
    if not implementation.checks_finite:
        check_finite(logits, targets, allow_targets_above_one)
    if kind.regression:
        check_regression_losses(regression_losses, logits)
    settings = Settings(process_group, bool(deterministic) or torch.are_deterministic_algorithms_enabled(),
                        bool(allow_targets_above_one))
    outputs = RankingLossFunction.apply(logits, targets, delta, kind, implementation, settings,
                                        None if regression_losses is None else regression_losses.detach())
    if kind.regression:
        classification, weights, other = outputs
        return classification, localisation(logits, regression_losses, weights, other)
    return outputs if len(outputs) > 1 else outputs[0]


def check_regression_losses(regression_losses, logits) -> None:
    """Finite values >= 0 on the logits' device (that there is one per positive, the pipeline
    checks once it has found the positives)."""
    _check_regression_type(regression_losses, logits)
    values = regression_losses.detach().reshape(-1)
    if values.numel():
        low, high = torch.aminmax(values)
        # one host read for both checks
        inf = float("inf")  # NaN fails both comparisons
        finite, non_negative = torch.stack([(low > -inf) & (high < inf), low >= 0]).tolist()
        if not finite:  # a diverged model's boxes, as its logits
            raise NonFiniteError("regression_losses contain NaN or Inf; they must be finite and >= 0")
        if not non_negative:
            raise ValueError("regression_losses must be finite and >= 0 (e.g. a GIoU loss scaled to [0, 1])")


def _check_regression_type(regression_losses, logits) -> None:
    if not isinstance(regression_losses, torch.Tensor):
        raise TypeError(f"regression_losses must be a torch.Tensor, got {type(regression_losses).__name__}")
    if not regression_losses.is_floating_point():
        raise TypeError(f"regression_losses must be a floating-point tensor, got {regression_losses.dtype}")
    if regression_losses.device != logits.device:
        raise ValueError(f"regression_losses must be on the logits' device {logits.device}, "
                         f"got {regression_losses.device}")


def localisation(logits, regression_losses, weights, other) -> torch.Tensor:
    """aLRP's localisation part, ``sum_k c_k l_k`` plus what other ranks' positives add
    (``pipeline.localisation_terms``): the weights ``c`` are its gradient, so autograd's backward
    is one multiply, and with a process group the gradient reaches this rank's values."""
    out_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return (torch.dot(regression_losses.reshape(-1).to(weights.dtype), weights) + other).to(out_dtype)


_OUTPUTS = {
    "ranking": "the mean over positives of the ranking error, in [0, 1]",
    "sorting": "the mean sorting error, in [-1, 1]",
    "ap": "the AP loss (1 - AP), in [0, 1]",
    "classification": "the classification part, the mean of FP(i) / rank(i), in [0, 1]",
    "localisation": "the localisation part, differentiable in ``regression_losses``",
}
_SIGNATURE_ARGS = """\
        logits: ``(*)`` float16/bfloat16/float32/float64 classification logits.
        targets: ``(*)``, same shape, any real dtype: ``> 0`` positive with its IoU (quality)
            target, ``0`` negative, ``< 0`` ignored."""
_REGRESSION_ARG = """
        regression_losses: ``(P,)`` float, one loss >= 0 per positive in the flat order of the
            positives (the order of ``logits[targets > 0]``), e.g. a GIoU loss scaled to [0, 1]."""
_SETTINGS_ARGS = """
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"reference"``.
        process_group: a ``torch.distributed`` group: rank the union of all its ranks' logits
            (see "Distributed" in ``brl_triton.functional``); None: this tensor alone.
        deterministic: bit-identical results across runs (also on under
            ``torch.use_deterministic_algorithms(True)``).
        allow_targets_above_one: use quality targets > 1 as given; by default they are refused,
            since class indices passed by mistake look like them."""


def _example(spec) -> str:
    outputs = ", ".join(spec.outputs) if len(spec.outputs) > 1 else "loss"
    extra = ", regression_losses" if spec.regression else ""
    lines = [
        ">>> logits = torch.randn(2, 100, 8, requires_grad=True)",
        ">>> targets = torch.zeros(2, 100, 8)",
        ">>> targets[0, :5, 3] = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5])  # 5 positives, IoU targets",
    ]
    if spec.regression:
        lines.append(">>> regression_losses = torch.rand(5, requires_grad=True)  # one per positive")
    lines.append(f">>> {outputs} = {spec.function_name}(logits, targets{extra})")
    total = " + ".join(spec.outputs) if len(spec.outputs) > 1 else "loss"
    lines.append(f">>> ({total}).backward()" if len(spec.outputs) > 1 else ">>> loss.backward()")
    return "\n".join("        " + line for line in lines)


def _docstring(spec) -> str:
    options = registry.variants(spec)
    delta_rule = ">= 0" if not spec.needs_smoothing else "> 0"
    args = _SIGNATURE_ARGS + (_REGRESSION_ARG if spec.regression else "")
    args += f"\n        delta: smoothing width of the step function, ``{delta_rule}`` (default {spec.delta})."
    for option, variant in options.items():
        args += f"\n        {option}: compute the {variant.paper} instead (needs delta > 0)."
    args += _SETTINGS_ARGS
    if len(spec.outputs) > 1:
        returns = f"``({', '.join(name + '_loss' for name in spec.outputs)})``: 0-d tensors, " + "; ".join(
            _OUTPUTS[name] for name in spec.outputs) + "."
    else:
        returns = f"0-d tensor, {_OUTPUTS[spec.outputs[0]]}."
    summary = textwrap.fill(spec.summary, 96, initial_indent="    ", subsequent_indent="    ")
    returns = textwrap.fill(returns, 96, initial_indent="        ", subsequent_indent="        ").lstrip()
    regression_raises = ("\n        TypeError: regression_losses not a floating-point tensor."
                         "\n        NonFiniteError: NaN/Inf in regression_losses."
                         "\n        ValueError: regression_losses on another device, negative, or not one value"
                         "\n            per positive.") if spec.regression else ""
    return f"""{spec.paper}.

{summary}

    Args:
{args}

    Returns:
        {returns}
        float32 (float64 for float64 logits); the logits' gradient is the error-driven identity update.

    Raises:
        TypeError: logits not floating point, targets complex, delta not a number.
        NonFiniteError: NaN/Inf in logits or targets (a ValueError, see ``brl_triton.NonFiniteError``).
        ValueError: shape or device mismatch, targets > 1 (unless allowed), delta < 0 or NaN (or 0
            where it must be > 0), unknown backend, ``backend="triton"`` where it cannot run.{regression_raises}

    Example:
{_example(spec)}
    """


def _loss_function(spec):
    """The function of ``spec``, with a real signature (generated source, so that ``inspect``,
    IDEs and ``torch.compile`` see plain Python)."""
    options = registry.variants(spec)
    regression = "regression_losses, " if spec.regression else ""
    option_parameters = "".join(f"{option}=False, " for option in options)
    # the first option that is set picks its variant
    choose = "".join(f"variants[{option!r}] if {option} else " for option in options) + "spec"
    source = f"""
def {spec.function_name}(logits, targets, {regression}delta={spec.delta!r}, *, {option_parameters}backend="auto",
                         process_group=None, deterministic=False, allow_targets_above_one=False):
    return _apply({choose}, logits, targets, delta, backend, process_group, deterministic,
                  {"regression_losses" if spec.regression else "None"}, allow_targets_above_one)
"""
    namespace = {"_apply": _apply, "spec": spec, "variants": options}
    exec(compile(source, f"<brl_triton.functional.{spec.function_name}>", "exec"), namespace)
    loss = namespace[spec.function_name]
    loss.__module__ = __name__
    loss.__doc__ = _docstring(spec)
    return loss


for _spec in registry.LOSSES:
    if registry.public(_spec):
        globals()[_spec.function_name] = _loss_function(_spec)
