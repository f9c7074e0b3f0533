"""Backend names and dispatch: which implementation computes a loss for given inputs.

The torch and Triton backends run the steps of ``pipeline``; the reference computes every loss
on its own, as the oracle it is.

``"auto"`` picks Triton for CUDA tensors when triton imports and the GPU can run it, else torch.
The environment variable ``BRL_BACKEND`` (``torch``, ``triton`` or ``reference``) replaces what
``"auto"`` would pick; an explicit ``backend=`` argument always wins.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import torch

from ._common import flat_inputs
from .reference import localisation_weights, reference_for
from .torch_backend import TORCH

BACKEND_NAMES = ("auto", "torch", "triton", "reference")
BACKEND_ENV_VAR = "BRL_BACKEND"


class ReferenceBackend:
    """The O(P*N) float64 loops of ``reference.py``; keeps N-sized gradient vectors."""

    name = "reference"
    checks_finite = False
    inputs = staticmethod(flat_inputs)

    @staticmethod
    def forward(s, y, delta, spec, settings=None, regression=None):
        result = reference_for(spec)(s, y, delta, spec, regression)
        if result is None or not spec.regression:
            return result
        (classification, rank), grads = result
        weights = localisation_weights(s, y, rank).to(s.device)
        return (classification, torch.dot(weights, regression.reshape(-1).to(weights)), weights), grads

    @staticmethod
    def backward(state, s, y, grad_outputs):
        grad = sum(g.double().cpu() * grad_o for g, grad_o in zip(grad_outputs, state))
        return grad.to(s.device)


def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _interpreting() -> bool:
    """Whether the kernels run (or, not yet defined, will run) through the Triton interpreter."""
    config = sys.modules.get("brl_triton.kernels._config")
    if config is not None:
        return config.INTERPRET
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _gpu_runs_triton(device: torch.device) -> bool:
    if torch.version.hip is not None:
        return True
    return torch.cuda.get_device_capability(device) >= (7, 0)


def _triton_backend(logits: torch.Tensor):
    if not _triton_installed():
        raise ValueError("backend='triton' needs the triton package (pip install triton)")
    if logits.device.type == "cpu":
        if not _interpreting():
            raise ValueError(
                "backend='triton' runs on CUDA tensors; for CPU tensors it needs the Triton interpreter: "
                "set TRITON_INTERPRET=1 before brl_triton's kernels are first used (slow, meant for tests), "
                "or use backend='torch'"
            )
    elif logits.device.type != "cuda":
        raise ValueError(f"backend='triton' runs on CUDA tensors, got logits on {logits.device}")
    from .triton_backend import TRITON

    return TRITON


def check_backend_name(backend: str) -> str:
    """``backend`` if it names a backend; a ValueError otherwise."""
    if not isinstance(backend, str) or backend not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKEND_NAMES))}, got {backend!r}")
    return backend


def resolve_backend(backend: str, logits: torch.Tensor):
    """The implementation for ``backend`` and these logits."""
    check_backend_name(backend)
    if backend == "auto":
        forced = os.environ.get(BACKEND_ENV_VAR, "")
        if forced:
            if forced not in BACKEND_NAMES[1:]:
                raise ValueError(
                    f"{BACKEND_ENV_VAR} must be one of {', '.join(BACKEND_NAMES[1:])} (or unset), got {forced!r}"
                )
            backend = forced
        elif logits.is_cuda and _triton_installed() and _gpu_runs_triton(logits.device):
            backend = "triton"
        else:
            backend = "torch"
    if backend == "triton":
        return _triton_backend(logits)
    return TORCH if backend == "torch" else ReferenceBackend
