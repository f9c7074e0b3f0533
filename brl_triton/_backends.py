"""Backend names and dispatch: which implementation computes a loss for given inputs."""

from __future__ import annotations

import torch

from .reference import reference_forward
from .torch_backend import torch_backward, torch_forward

BACKEND_NAMES = ("auto", "torch", "reference")


class TorchBackend:
    """Sort-free bucketed/breakpoint computation in plain torch ops; runs on any device."""

    name = "torch"
    forward = staticmethod(torch_forward)
    backward = staticmethod(torch_backward)


class ReferenceBackend:
    """The O(P*N) float64 loops of ``reference.py``; keeps N-sized gradient vectors."""

    name = "reference"
    forward = staticmethod(reference_forward)

    @staticmethod
    def backward(state, s, y, grad_outputs):
        grad = sum(g.double().cpu() * grad_o for g, grad_o in zip(grad_outputs, state))
        return grad.to(s.device)


_IMPLEMENTATIONS = {"torch": TorchBackend, "reference": ReferenceBackend}


def resolve_backend(backend: str, logits: torch.Tensor):
    """The implementation for ``backend`` ("auto", "torch" or "reference") and these logits."""
    if not isinstance(backend, str) or backend not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKEND_NAMES))}, got {backend!r}")
    if backend == "auto":
        return TorchBackend
    return _IMPLEMENTATIONS[backend]
