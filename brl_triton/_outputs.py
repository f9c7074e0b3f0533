"""The outputs of a loss call from what a backend returns, the same on the eager path
(``functional``) and the compiled path (``_ops``)."""

from __future__ import annotations

import torch

from ._common import compute_dtype


def assemble_outputs(spec, logits, ranking_losses: tuple, regression_losses=None, value=None, weights=None):
    """The function's return value: the ranking losses (one tensor, or a tuple of them), and for
    aLRP its localisation part after the classification part."""
    if spec.regression:
        ranking_losses = (*ranking_losses, localisation(logits, regression_losses, value, weights))
    return tuple(ranking_losses) if len(ranking_losses) > 1 else ranking_losses[0]


class _Localisation(torch.autograd.Function):
    """aLRP's localisation part ``sum_k c_k l_k`` (computed by the backend, with what other
    ranks' positives add under a process group) as a function of this rank's regression losses:
    its gradient is the weights ``c``, one multiply in backward."""

    @staticmethod
    def forward(regression_losses, value, weights):
        return value.view_as(value)

    @staticmethod
    def setup_context(ctx, inputs, output):
        regression_losses, _, weights = inputs
        ctx.shape, ctx.dtype = regression_losses.shape, regression_losses.dtype
        ctx.save_for_backward(weights)

    @staticmethod
    def backward(ctx, grad_value):
        (weights,) = ctx.saved_tensors
        grad = torch.mul(weights, grad_value, out=torch.empty(weights.shape, dtype=ctx.dtype, device=weights.device))
        return grad.view(ctx.shape), None, None


def localisation(logits, regression_losses, value, weights) -> torch.Tensor:
    """aLRP's localisation part in the logits' compute dtype, differentiable in
    ``regression_losses`` (``pipeline.localisation_terms`` defines value and weights)."""
    value = value.to(compute_dtype(logits.dtype))
    if not regression_losses.requires_grad:
        return value
    return _Localisation.apply(regression_losses, value, weights)
