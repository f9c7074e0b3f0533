"""The outputs of a loss call from what a backend returns, the same on the eager path
(``functional``) and the compiled path (``_ops``)."""

from __future__ import annotations

import torch

from ._common import compute_dtype


def assemble_outputs(spec, logits, ranking_losses: tuple, regression_losses=None, weights=None, other=None):
    """The function's return value: the ranking losses (one tensor, or a tuple of them), and for
    aLRP its localisation part after the classification part."""
    if spec.regression:
        ranking_losses = (*ranking_losses, localisation(logits, regression_losses, weights, other))
    return tuple(ranking_losses) if len(ranking_losses) > 1 else ranking_losses[0]


def localisation(logits, regression_losses, weights, other=None) -> torch.Tensor:
    """aLRP's localisation part, ``sum_k c_k l_k`` plus what other ranks' positives add
    (``pipeline.localisation_terms``): the weights ``c`` are its gradient, so autograd's backward
    is one multiply, and with a process group the gradient reaches this rank's values."""
    value = torch.dot(regression_losses.reshape(-1).to(weights.dtype), weights)
    return (value if other is None else value + other).to(compute_dtype(logits.dtype))
