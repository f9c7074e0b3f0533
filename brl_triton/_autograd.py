"""One autograd Function for every loss and backend.

A backend is an object with

- ``inputs(logits, targets) -> (s, y)``: what its forward and backward read, e.g. flat tensors in
  the compute dtype (``_common.flat_inputs``), or the tensors as they are for kernels that read
  any layout and dtype.
- ``forward(s, y, delta, spec, settings, regression) -> (losses, state) | None``: ``None`` when
  there is no positive (in the whole process group). ``spec`` is the ``registry.LossSpec``;
  ``regression`` its regression losses or None. For a regression loss the outputs are the
  classification loss and ``pipeline.localisation_terms``: value and weights (not differentiable).
- ``backward(state, s, y, grad_outputs) -> grad``: the flat gradient for the upstream gradients.

The no-positive / empty path lives here, once: zero losses, still attached to the graph, and
zero gradients.
"""

from __future__ import annotations

import torch

from ._common import Settings, compute_dtype, wide_dtype


class RankingLossFunction(torch.autograd.Function):
    """Outputs: the ranking losses (and, for aLRP, the localisation part's value and weights, not
    differentiable here: ``_outputs.localisation`` attaches them to the regression losses), then
    the backend's state for backward (not a tensor; ``apply``'s caller drops it).
    ``forward`` and ``setup_context`` are separate, as ``torch.func`` transforms require."""

    @staticmethod
    def forward(logits, targets, delta: float, spec, backend, settings: Settings, regression=None):
        s, y = backend.inputs(logits, targets)
        result = backend.forward(s, y, delta, spec, settings, regression)
        out_dtype = compute_dtype(logits.dtype)
        if result is None:
            outputs = tuple(logits.new_zeros((), dtype=out_dtype) for _ in range(spec.ranking_outputs))
            if spec.regression:  # no localisation part, no weight
                outputs += (logits.new_zeros((), dtype=wide_dtype(logits.device)),
                            logits.new_zeros(regression.numel(), dtype=wide_dtype(logits.device)))
            return (*outputs, None)
        losses = result[0]
        outputs = tuple(loss.to(device=logits.device, dtype=out_dtype) for loss in losses[:spec.ranking_outputs])
        return (*outputs, *losses[spec.ranking_outputs:], result[1])

    @staticmethod
    def setup_context(ctx, inputs, output):
        logits, targets, delta, spec, backend, settings, regression = inputs
        ctx.backend, ctx.delta, ctx.spec = backend, delta, spec
        ctx.state = output[-1]
        ctx.save_for_backward(logits, targets)
        # an output without upstream gradient gets None, not a tensor of zeros (a launch each, and
        # aLRP's value and weights never have one here)
        ctx.set_materialize_grads(False)
        if spec.regression:
            ctx.mark_non_differentiable(*output[spec.ranking_outputs:-1])

    @staticmethod
    def backward(ctx, *grad_outputs):
        # backward(create_graph=True) asks for a graph of this gradient; torch.func.grad asks for one
        # too, always, and gets a gradient without it
        if torch.is_grad_enabled() and not torch._C._are_functorch_transforms_active():
            raise RuntimeError(
                "ranking losses have no second derivative: their gradient is the error-driven identity "
                "update, not a differentiable function of the logits; call backward without create_graph=True"
            )
        with torch.no_grad():
            return RankingLossFunction._gradient(ctx, grad_outputs)

    @staticmethod
    def _gradient(ctx, grad_outputs):
        logits, targets = ctx.saved_tensors
        if ctx.state is None:
            grad = torch.zeros_like(logits)
        else:
            s, y = ctx.backend.inputs(logits, targets)
            upstream = [logits.new_zeros((), dtype=compute_dtype(logits.dtype)) if g is None else g
                        for g in grad_outputs[:ctx.spec.ranking_outputs]]
            grad = ctx.backend.backward(ctx.state, s, y, upstream)
            grad = grad.to(device=logits.device, dtype=logits.dtype).view(logits.shape)
        return grad, None, None, None, None, None, None
