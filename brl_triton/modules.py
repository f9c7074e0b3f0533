"""The losses as ``nn.Module``: ``BucketedRankSortLoss``, ``RankSortLoss``, ``BucketedAPLoss``,
``APLoss``, ``ALRPLoss`` and ``BucketedALRPLoss``. Each holds its settings, checked when it is
built, and calls its function of ``brl_triton.functional`` with them; ``forward`` takes what the
function takes before ``delta``."""

from __future__ import annotations

from torch import Tensor, nn

from . import functional, registry
from ._backends import check_backend_name
from ._checks import check_delta

__all__ = ["BucketedRankSortLoss", "RankSortLoss", "BucketedAPLoss", "APLoss", "ALRPLoss", "BucketedALRPLoss"]


class LossModule(nn.Module):
    """What every loss module holds: ``delta`` (None: the loss's default) and the settings of
    ``brl_triton.functional`` (``backend``, ``process_group``, ``deterministic``,
    ``allow_targets_above_one``, ``validate``). A bad ``delta`` or ``backend`` raises here, not at the first
    call."""

    spec: registry.LossSpec

    def __init__(self, delta: float | None = None, *, backend: str = "auto", process_group=None,
                 deterministic: bool = False, allow_targets_above_one: bool = False, validate: bool = True):
        super().__init__()
        self.delta = check_delta(self.spec.delta if delta is None else delta, self.spec)
        self.backend = check_backend_name(backend)
        self.process_group = process_group
        self.deterministic = bool(deterministic)
        self.allow_targets_above_one = bool(allow_targets_above_one)
        self.validate = bool(validate)

    def settings(self) -> dict:
        """The keyword arguments this module passes to its function."""
        return {"backend": self.backend, "process_group": self.process_group, "deterministic": self.deterministic,
                "allow_targets_above_one": self.allow_targets_above_one, "validate": self.validate}

    def extra_repr(self) -> str:
        return f"delta={self.delta}, backend={self.backend!r}, deterministic={self.deterministic}"


class BucketedRankSortLoss(LossModule):
    """Module form of :func:`brl_triton.bucketed_rank_sort_loss` (default delta 0.5).

    ``forward(logits, targets) -> (ranking, sorting)``: ``(*)`` float logits, same-shape targets
    (``> 0`` positive with its IoU target, ``0`` negative, ``< 0`` ignored); 0-d losses.

    Example:
        >>> criterion = BucketedRankSortLoss()
        >>> logits, targets = torch.randn(8, 80, requires_grad=True), torch.zeros(8, 80)
        >>> targets[:, 3] = torch.linspace(0.2, 0.9, 8)  # 8 positives with their IoU targets
        >>> ranking, sorting = criterion(logits, targets)
        >>> (ranking + sorting).backward()
    """

    spec = registry.BUCKETED_RANK_SORT

    def forward(self, logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        return functional.bucketed_rank_sort_loss(logits, targets, self.delta, **self.settings())


class RankSortLoss(LossModule):
    """Module form of :func:`brl_triton.rank_sort_loss` (exact Rank & Sort, default delta 0.5).

    ``forward(logits, targets) -> (ranking, sorting)``: ``(*)`` float logits, same-shape targets
    (``> 0`` positive with its IoU target, ``0`` negative, ``< 0`` ignored); 0-d losses.

    Example:
        >>> criterion = RankSortLoss(delta=0.25, deterministic=True)
        >>> logits, targets = torch.randn(2, 500), torch.zeros(2, 500)
        >>> targets[0, :4] = torch.tensor([0.9, 0.8, 0.6, 0.5])
        >>> ranking, sorting = criterion(logits, targets)
    """

    spec = registry.RANK_SORT

    def forward(self, logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        return functional.rank_sort_loss(logits, targets, self.delta, **self.settings())


class BucketedAPLoss(LossModule):
    """Module form of :func:`brl_triton.bucketed_ap_loss` (default delta 1.0).

    ``forward(logits, targets) -> loss``: ``(*)`` float logits, same-shape targets (``> 0``
    positive, ``0`` negative, ``< 0`` ignored); a 0-d loss, 1 - AP.

    Example:
        >>> criterion = BucketedAPLoss()
        >>> logits = torch.randn(64, 10, dtype=torch.float16)
        >>> targets = torch.zeros(64, 10, dtype=torch.int64)
        >>> targets[:5, 2] = 1
        >>> loss = criterion(logits, targets)  # float32
    """

    spec = registry.BUCKETED_AP

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        return functional.bucketed_ap_loss(logits, targets, self.delta, **self.settings())


class APLoss(LossModule):
    """Module form of :func:`brl_triton.ap_loss` (exact AP loss, default delta 1.0);
    ``interpolated=True`` gives the interpolated AP loss (Chen et al.).

    ``forward(logits, targets) -> loss``: ``(*)`` float logits, same-shape targets (``> 0``
    positive, ``0`` negative, ``< 0`` ignored); a 0-d loss, 1 - AP.

    Example:
        >>> criterion = APLoss(interpolated=True)
        >>> logits, targets = torch.randn(100), torch.zeros(100)
        >>> targets[[3, 50, 97]] = 1.0
        >>> loss = criterion(logits, targets)
    """

    spec = registry.AP

    def __init__(self, delta: float | None = None, *, interpolated: bool = False, backend: str = "auto",
                 process_group=None, deterministic: bool = False, allow_targets_above_one: bool = False,
                 validate: bool = True):
        self.interpolated = bool(interpolated)
        if self.interpolated:  # the variant's delta rule (> 0) is checked when the module is built
            self.spec = registry.INTERPOLATED_AP
        super().__init__(delta, backend=backend, process_group=process_group, deterministic=deterministic,
                         allow_targets_above_one=allow_targets_above_one, validate=validate)

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        return functional.ap_loss(logits, targets, self.delta, interpolated=self.interpolated, **self.settings())

    def extra_repr(self) -> str:
        return super().extra_repr() + f", interpolated={self.interpolated}"


class ALRPLoss(LossModule):
    """Module form of :func:`brl_triton.alrp_loss` (exact aLRP, default delta 1.0).

    ``forward(logits, targets, regression_losses) -> (classification, localisation)``: ``(*)``
    float logits, same-shape targets (``> 0`` positive with its IoU target, ``0`` negative,
    ``< 0`` ignored), ``(P,)`` regression losses >= 0, one per positive in the flat order of
    ``logits[targets > 0]``; 0-d losses.

    Example:
        >>> criterion = ALRPLoss()
        >>> logits, targets = torch.randn(8, 80), torch.zeros(8, 80)
        >>> targets[:, 3] = torch.linspace(0.2, 0.9, 8)  # 8 positives with their IoU targets
        >>> classification, localisation = criterion(logits, targets, regression_losses=torch.rand(8))
    """

    spec = registry.ALRP

    def forward(self, logits: Tensor, targets: Tensor, regression_losses: Tensor) -> tuple[Tensor, Tensor]:
        return functional.alrp_loss(logits, targets, regression_losses, self.delta, **self.settings())


class BucketedALRPLoss(LossModule):
    """Module form of :func:`brl_triton.bucketed_alrp_loss` (default delta 1.0).

    ``forward(logits, targets, regression_losses) -> (classification, localisation)``, as
    :class:`ALRPLoss`'s.

    Example:
        >>> criterion = BucketedALRPLoss(backend="torch")
        >>> logits, targets = torch.randn(1000), torch.zeros(1000)
        >>> targets[:5] = 0.7
        >>> classification, localisation = criterion(logits, targets, torch.full((5,), 0.3))
    """

    spec = registry.BUCKETED_ALRP

    def forward(self, logits: Tensor, targets: Tensor, regression_losses: Tensor) -> tuple[Tensor, Tensor]:
        return functional.bucketed_alrp_loss(logits, targets, regression_losses, self.delta, **self.settings())

