"""The losses as ``torch.library`` custom ops, which is how ``torch.compile`` sees through them.

Under ``torch.compile`` the functions call ``brl_triton::ranking_forward`` instead of the eager
autograd Function; ``brl_triton::ranking_backward`` gives the logits' gradient, and
``torch.library.register_autograd`` ties the two. Both run the same backends (torch, Triton).

Every output has a shape known from the inputs' shapes (the losses, aLRP's localisation part
among them; its weights, one per regression loss), so a compiled graph has no graph break and is not recompiled when the
number of positives changes from batch to batch. The price: forward's tables, whose sizes
depend on the data (p positives, E bin edges), are not kept; the backward op finds the
positives and reduces the bins again before it writes the gradient, about one more forward of
the loss. The value checks (NaN/Inf, targets > 1, the regression losses) run inside the forward
op, where a data-dependent ``if`` breaks no graph. ``process_group`` is not available under
compile.
"""

from __future__ import annotations

import torch

from . import registry
from ._backends import resolve_backend
from ._checks import check_values
from ._common import Settings, compute_dtype, wide_dtype
from ._outputs import assemble_outputs


def _implementation(backend: str, logits):
    implementation = resolve_backend(backend, logits)
    if implementation.name == "reference":
        raise ValueError("backend='reference' is not available under torch.compile; use 'torch' or 'triton'")
    return implementation


# Both may wait for the device (the validation's host read; the torch backend's data-dependent
# sizes), which a CUDA graph cannot capture: tagged so that Inductor's CUDA graphs leave them out.
# The triton_op path below has no sync and no tag.
@torch.library.custom_op("brl_triton::ranking_forward", mutates_args=(), tags=(torch.Tag.cudagraph_unsafe,))
def ranking_forward(logits: torch.Tensor, targets: torch.Tensor, regression: torch.Tensor | None, delta: float,
                    loss: str, backend: str, deterministic: bool, allow_targets_above_one: bool, validate: bool
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The losses (ranking outputs, then aLRP's localisation part, stacked) and, for aLRP, the
    localisation weights."""
    spec = registry.BY_NAME[loss]
    implementation = _implementation(backend, logits)
    check_values(spec, logits, targets, delta, regression, allow_targets_above_one,
                 implementation.checks_finite or not validate,
                 check_regression=validate or implementation.name != "triton")
    settings = Settings(None, deterministic, allow_targets_above_one, validate)
    s, y = implementation.inputs(logits, targets)
    result = implementation.forward(s, y, delta, spec, settings, None if regression is None else regression.detach())
    out_dtype = compute_dtype(logits.dtype)
    weight = logits.new_zeros(0 if regression is None else regression.shape, dtype=wide_dtype(logits.device))
    if result is None:
        return logits.new_zeros(len(spec.outputs), dtype=out_dtype), weight
    outputs = result[0]
    losses = torch.stack([o.to(device=logits.device, dtype=out_dtype) for o in outputs[:len(spec.outputs)]])
    if spec.regression:
        weight = outputs[len(spec.outputs)].to(logits.device)
    return losses, weight


@ranking_forward.register_fake
def _(logits, targets, regression, delta, loss, backend, deterministic, allow_targets_above_one, validate):
    losses = logits.new_empty(len(registry.BY_NAME[loss].outputs), dtype=compute_dtype(logits.dtype))
    return losses, logits.new_empty(regression.shape if regression is not None else (0,), dtype=wide_dtype(logits.device))


@torch.library.custom_op("brl_triton::ranking_backward", mutates_args=(), tags=(torch.Tag.cudagraph_unsafe,))
def ranking_backward(logits: torch.Tensor, targets: torch.Tensor, regression: torch.Tensor | None,
                     grad_losses: torch.Tensor, delta: float, loss: str, backend: str, deterministic: bool,
                     allow_targets_above_one: bool, validate: bool) -> torch.Tensor:
    """The logits' gradient for the upstream gradients of the stacked losses."""
    spec = registry.BY_NAME[loss]
    implementation = _implementation(backend, logits)
    settings = Settings(None, deterministic, allow_targets_above_one, validate)
    s, y = implementation.inputs(logits, targets)
    result = implementation.forward(s, y, delta, spec, settings, regression)
    if result is None:
        return torch.zeros_like(logits)
    grad = implementation.backward(result[1], s, y, [g for g in grad_losses[:spec.ranking_outputs]])
    return grad.to(device=logits.device, dtype=logits.dtype).view(logits.shape).clone()


@ranking_backward.register_fake
def _(logits, targets, regression, grad_losses, delta, loss, backend, deterministic, allow_targets_above_one,
      validate):
    return torch.empty_like(logits)


def _setup_context(ctx, inputs, output):
    logits, targets, regression, *settings = inputs
    ctx.settings = settings
    ctx.save_for_backward(logits, targets, regression)


def _backward(ctx, grad_losses, _grad_weight):
    logits, targets, regression = ctx.saved_tensors
    regression = None if regression is None else regression.detach()
    grad = ranking_backward(logits.detach(), targets, regression, grad_losses, *ctx.settings)
    return grad, None, None, None, None, None, None, None, None


torch.library.register_autograd("brl_triton::ranking_forward", _backward, setup_context=_setup_context)


# The Triton backend without validation has no host sync and no data-dependent size: every
# buffer is sized by bounds the host knows. Its forward and backward are then ``triton_op``s, whose
# kernels the compiler sees (``wrap_triton`` nodes, which Inductor compiles and launches itself)
# instead of one opaque op. They return, and take back, the tables that backward needs, so the
# backward op is one kernel and does not recompute the forward.
_TRITON_STATE = ("edges", "status", "const", "slope", "pos_index", "pos_rank_grad", "pos_sort_grad")


@torch.library.triton_op("brl_triton::triton_forward", mutates_args=())
def triton_forward(logits: torch.Tensor, targets: torch.Tensor, regression: torch.Tensor | None, delta: float,
                   loss: str, deterministic: bool, allow_targets_above_one: bool
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                              torch.Tensor, torch.Tensor, torch.Tensor]:
    """The losses (stacked, aLRP's localisation part last), aLRP's localisation weights (empty
    otherwise), and the state of ``_TRITON_STATE`` (empty tensors where a loss has none)."""
    from .triton_backend import TRITON

    spec = registry.BY_NAME[loss]
    settings = Settings(None, deterministic, allow_targets_above_one, False)
    s, y = TRITON.inputs(logits, targets)
    outputs, state = TRITON.forward(s, y, delta, spec, settings, regression)
    losses = torch.stack([o.to(dtype=compute_dtype(logits.dtype)) for o in outputs[:len(spec.outputs)]])
    weights = outputs[len(spec.outputs)] if spec.regression else logits.new_empty(0, dtype=torch.float64)
    none = logits.new_empty(0, dtype=torch.float64)
    # the gradient rows are views of one table: an op's outputs must not alias each other
    return (losses, weights.clone(), state.bins.edges, state.bins.status, state.const,
            none if state.slope is None else state.slope, state.pos_index, state.pos_rank_grad.clone(),
            none if state.pos_sort_grad is None else state.pos_sort_grad.clone())


@torch.library.triton_op("brl_triton::triton_backward", mutates_args=())
def triton_backward(logits: torch.Tensor, targets: torch.Tensor, grad_losses: torch.Tensor, edges: torch.Tensor,
                    status: torch.Tensor, const: torch.Tensor, slope: torch.Tensor, pos_index: torch.Tensor,
                    pos_rank_grad: torch.Tensor, pos_sort_grad: torch.Tensor) -> torch.Tensor:
    """The logits' gradient: one ``streaming.distribute`` launch on the forward's tables."""
    from .kernels import streaming
    from .kernels._config import on_device
    from .kernels._layout import layout
    from .triton_backend import TRITON

    s, y = TRITON.inputs(logits, targets)
    with on_device(logits.device):
        grad = streaming.distribute(layout(s), layout(y), edges, status, const, slope if slope.numel() else None,
                                    pos_index, pos_rank_grad, pos_sort_grad if pos_sort_grad.numel() else None,
                                    [grad_losses[0], grad_losses[1 if grad_losses.numel() > 1 else 0]], logits.dtype)
    return grad.view(logits.shape)


def _triton_setup_context(ctx, inputs, output):
    logits, targets, _regression, _delta, loss, *_ = inputs
    ctx.ranking_outputs = registry.BY_NAME[loss].ranking_outputs
    ctx.save_for_backward(logits, targets, *output[2:])


def _triton_backward(ctx, grad_losses, *_):
    logits, targets, *state = ctx.saved_tensors
    grad = triton_backward(logits, targets, grad_losses[:ctx.ranking_outputs], *state)
    return grad, None, None, None, None, None, None


torch.library.register_autograd("brl_triton::triton_forward", _triton_backward, setup_context=_triton_setup_context)


def _traceable_triton(backend: str, logits, validate: bool) -> bool:
    """Whether a compiled call takes the ``triton_op`` path: the Triton backend compiled for a GPU
    (the interpreter's kernels cannot be traced), without validation, in float32 arithmetic."""
    from .kernels._config import INTERPRET

    return (not validate and not INTERPRET and compute_dtype(logits.dtype) == torch.float32
            and resolve_backend(backend, logits).name == "triton")


def compiled_apply(spec, logits, targets, delta, backend, deterministic, regression_losses, allow_targets_above_one,
                   validate=True):
    """The functions' path under ``torch.compile``: the same outputs as the eager path."""
    regression = None if regression_losses is None else regression_losses.detach()
    if _traceable_triton(backend, logits, validate):
        losses, weights, *_state = triton_forward(logits, targets, regression, float(delta), spec.name,
                                                  bool(deterministic), bool(allow_targets_above_one))
        ranking_losses = tuple(losses[i] for i in range(spec.ranking_outputs))
        value = losses[spec.ranking_outputs] if spec.regression else None
        return assemble_outputs(spec, logits, ranking_losses, regression_losses, value, weights)
    losses, weights = ranking_forward(logits, targets, regression, delta, spec.name, backend, bool(deterministic),
                                      bool(allow_targets_above_one), bool(validate))
    ranking_losses = tuple(losses[i] for i in range(spec.ranking_outputs))
    value = losses[spec.ranking_outputs] if spec.regression else None
    return assemble_outputs(spec, logits, ranking_losses, regression_losses, value, weights)
