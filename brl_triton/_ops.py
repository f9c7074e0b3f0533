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


@torch.library.custom_op("brl_triton::ranking_forward", mutates_args=())
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


@torch.library.custom_op("brl_triton::ranking_backward", mutates_args=())
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


def compiled_apply(spec, logits, targets, delta, backend, deterministic, regression_losses, allow_targets_above_one,
                   validate=True):
    """The functions' path under ``torch.compile``: the same outputs as the eager path."""
    regression = None if regression_losses is None else regression_losses.detach()
    losses, weights = ranking_forward(logits, targets, regression, delta, spec.name, backend, bool(deterministic),
                                      bool(allow_targets_above_one), bool(validate))
    ranking_losses = tuple(losses[i] for i in range(spec.ranking_outputs))
    value = losses[spec.ranking_outputs] if spec.regression else None
    return assemble_outputs(spec, logits, ranking_losses, regression_losses, value, weights)
