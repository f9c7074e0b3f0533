"""``nn.Module`` wrappers of the functional losses, one per entry of ``registry.LOSSES``
(``BucketedRankSortLoss``, ``RankSortLoss``, ``BucketedAPLoss``, ``APLoss``, ``ALRPLoss``,
``BucketedALRPLoss``): they hold the settings and call the function."""

from __future__ import annotations

import torch
from torch import nn

from . import functional, registry

__all__ = [spec.module for spec in registry.LOSSES if registry.public(spec)]


class RankingLoss(nn.Module):
    """Holds ``delta``, ``backend``, ``process_group``, ``deterministic``,
    ``allow_targets_above_one`` and the loss's options
    (``interpolated`` for ``APLoss``), and calls the loss's function with them."""

    spec: registry.LossSpec

    def __init__(self, delta: float | None = None, *, backend: str = "auto", process_group=None,
                 deterministic: bool = False, allow_targets_above_one: bool = False, **options):
        super().__init__()
        unknown = set(options) - set(registry.variants(self.spec))
        if unknown:
            raise TypeError(f"{type(self).__name__} got unexpected options {sorted(unknown)}")
        self.delta = self.spec.delta if delta is None else delta
        self.backend = backend
        self.process_group = process_group
        self.deterministic = deterministic
        self.allow_targets_above_one = allow_targets_above_one
        self.options = {option: bool(options.get(option, False)) for option in registry.variants(self.spec)}
        for option, value in self.options.items():
            setattr(self, option, value)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, *regression_losses: torch.Tensor):
        """``(logits, targets)``, or ``(logits, targets, regression_losses)`` for aLRP; returns what
        the function returns."""
        options = {option: getattr(self, option) for option in self.options}
        return getattr(functional, self.spec.function_name)(
            logits, targets, *regression_losses, self.delta, backend=self.backend, process_group=self.process_group,
            deterministic=self.deterministic, allow_targets_above_one=self.allow_targets_above_one, **options)

    def extra_repr(self) -> str:
        text = f"delta={self.delta}, backend={self.backend!r}, deterministic={self.deterministic}"
        return text + "".join(f", {option}={getattr(self, option)}" for option in self.options)


def _module_class(spec: registry.LossSpec) -> type:
    call = "criterion(logits, targets, regression_losses)" if spec.regression else "criterion(logits, targets)"
    outputs = ", ".join(spec.outputs) if len(spec.outputs) > 1 else "loss"
    doc = f"""Module form of :func:`brl_triton.{spec.function_name}` ({spec.paper}).

    ``forward(logits, targets{", regression_losses" if spec.regression else ""}) -> {outputs}``; shapes, dtypes and
    target semantics as there (``> 0`` positive with IoU target, ``0`` negative, ``< 0`` ignored).
    Keyword arguments: ``delta`` (default {spec.delta}), ``backend``, ``process_group``,
    ``deterministic``, ``allow_targets_above_one``{"".join(f", ``{o}``" for o in registry.variants(spec))}.

    Example:
        >>> criterion = {spec.module}()
        >>> logits, targets = torch.randn(8, 80), torch.zeros(8, 80)
        >>> targets[:, 3] = torch.linspace(0.2, 0.9, 8)  # 8 positives with their IoU targets
{"        >>> regression_losses = torch.rand(8)" + chr(10) if spec.regression else ""}        >>> {outputs} = {call}
    """
    return type(spec.module, (RankingLoss,), {"spec": spec, "__doc__": doc, "__module__": __name__})


for _spec in registry.LOSSES:
    if registry.public(_spec):
        globals()[_spec.module] = _module_class(_spec)
