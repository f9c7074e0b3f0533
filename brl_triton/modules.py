"""``nn.Module`` wrappers of the functional losses: they hold the settings and call the function."""

from __future__ import annotations

import torch
from torch import nn

from . import functional as F


class _RankingLoss(nn.Module):
    """Holds ``delta``, ``backend``, ``process_group`` and ``deterministic`` (see ``functional``)."""

    def __init__(self, delta: float, backend: str = "auto", process_group=None, deterministic: bool = False):
        super().__init__()
        self.delta = delta
        self.backend = backend
        self.process_group = process_group
        self.deterministic = deterministic

    def _options(self) -> dict:
        return {"backend": self.backend, "process_group": self.process_group, "deterministic": self.deterministic}

    def extra_repr(self) -> str:
        return f"delta={self.delta}, backend={self.backend!r}, deterministic={self.deterministic}"


class BucketedRankSortLoss(_RankingLoss):
    """Module form of :func:`brl_triton.bucketed_rank_sort_loss`.

    ``forward(logits, targets) -> (ranking_loss, sorting_loss)``; shapes and target semantics
    as there (``> 0`` positive with IoU target, ``0`` negative, ``< 0`` ignored).

    Example:
        >>> criterion = BucketedRankSortLoss(delta=0.5)
        >>> ranking, sorting = criterion(torch.randn(8, 80), (torch.rand(8, 80) > 0.9).float())
    """

    def __init__(self, delta: float = 0.5, backend: str = "auto", process_group=None, deterministic: bool = False):
        super().__init__(delta, backend, process_group, deterministic)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor):
        return F.bucketed_rank_sort_loss(logits, targets, self.delta, **self._options())


class RankSortLoss(_RankingLoss):
    """Module form of :func:`brl_triton.rank_sort_loss` (exact Rank & Sort).

    ``forward(logits, targets) -> (ranking_loss, sorting_loss)``.

    Example:
        >>> criterion = RankSortLoss(delta=0.5)
        >>> ranking, sorting = criterion(torch.randn(8, 80), (torch.rand(8, 80) > 0.9).float())
    """

    def __init__(self, delta: float = 0.5, backend: str = "auto", process_group=None, deterministic: bool = False):
        super().__init__(delta, backend, process_group, deterministic)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor):
        return F.rank_sort_loss(logits, targets, self.delta, **self._options())


class BucketedAPLoss(_RankingLoss):
    """Module form of :func:`brl_triton.bucketed_ap_loss`. ``forward(logits, targets) -> loss``.

    Example:
        >>> criterion = BucketedAPLoss(delta=1.0)
        >>> loss = criterion(torch.randn(8, 80), (torch.rand(8, 80) > 0.9).float())
    """

    def __init__(self, delta: float = 1.0, backend: str = "auto", process_group=None, deterministic: bool = False):
        super().__init__(delta, backend, process_group, deterministic)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor):
        return F.bucketed_ap_loss(logits, targets, self.delta, **self._options())


class APLoss(_RankingLoss):
    """Module form of :func:`brl_triton.ap_loss` (exact, or the interpolated original).

    ``forward(logits, targets) -> loss``.

    Example:
        >>> criterion = APLoss(delta=1.0, interpolated=True)
        >>> loss = criterion(torch.randn(8, 80), (torch.rand(8, 80) > 0.9).float())
    """

    def __init__(self, delta: float = 1.0, interpolated: bool = False, backend: str = "auto", process_group=None,
                 deterministic: bool = False):
        super().__init__(delta, backend, process_group, deterministic)
        self.interpolated = interpolated

    def forward(self, logits: torch.Tensor, targets: torch.Tensor):
        return F.ap_loss(logits, targets, self.delta, interpolated=self.interpolated, **self._options())

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, interpolated={self.interpolated}"
