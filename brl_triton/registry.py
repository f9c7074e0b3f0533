"""The one list of losses. Everything that enumerates losses derives from ``LOSSES``: the
functional API (``functional``), the ``nn.Module`` wrappers (``modules``), the detection
``loss=`` choices, the benchmark rows and the tests' parametrisation.

An entry says what a loss computes; the backends read its flags:

- ``bucketed``: negatives are grouped into buckets between consecutive positives (prototype =
  bucket mean); otherwise every negative counts with its own logit (breakpoint bins).
- ``formulas``: per-positive formulas, from the per-positive sums to the losses and gradient
  tables (``_positive_terms``); the Triton kernels specialise on ``sorting``/``interpolated``/
  ``regression`` for the same formulas.
- ``reference``: the O(P*N) oracle of ``reference.py``.

Adding a loss: one entry here, its formulas in ``_positive_terms.py`` (and the tile kernel's
branch) and its reference in ``reference.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from . import _positive_terms as formulas
from . import reference


@dataclass(frozen=True)
class LossSpec:
    """One ranking loss.

    ``name``: stem of the function (``<name>_loss``); ``short``: its name in detection configs
    and benchmark tables; ``module``: its ``nn.Module`` class name; ``outputs``: names of the
    returned 0-d losses; ``paper``: where it comes from; ``summary``: what it computes, for the
    docstrings; ``variant_of``/``option``: a keyword of another loss's function selects it
    (``ap_loss(interpolated=True)``).
    """

    name: str
    short: str
    module: str
    delta: float
    outputs: tuple[str, ...]
    bucketed: bool
    formulas: Callable = field(repr=False, compare=False)
    reference: Callable = field(repr=False, compare=False)
    paper: str = ""
    summary: str = ""
    sorting: bool = False
    interpolated: bool = False
    regression: bool = False  # takes one regression loss per positive, returns a localisation loss
    variant_of: str | None = None
    option: str | None = None

    @property
    def function_name(self) -> str:
        return f"{self.name}_loss"

    @property
    def ranking_outputs(self) -> int:
        """The losses a backend computes: all outputs, but for regression losses only the
        classification part (the backend adds the positives' ranks, from which the localisation
        part is formed afterwards)."""
        return 1 if self.regression else len(self.outputs)

    @property
    def needs_smoothing(self) -> bool:
        """delta must be > 0 (the loss divides by the smoothed rank or uses H(0) = 1/2)."""
        return self.interpolated or self.regression


BUCKETED_RANK_SORT = LossSpec(
    "bucketed_rank_sort", "brs", "BucketedRankSortLoss", 0.5, ("ranking", "sorting"), bucketed=True, sorting=True,
    formulas=formulas.rank_sort_terms, reference=reference.ranking_reference,
    paper="Bucketed Rank & Sort (BRS, Yavuz et al., ECCV 2024)",
    summary="The negatives between two consecutive positives (in descending logit order) form a bucket and "
            "act as that many copies of their mean logit, so the cost is O(M log P + P log P) instead of "
            "the O(P * M) of Rank & Sort. With delta == 0 it equals rank_sort_loss exactly.",
)
RANK_SORT = LossSpec(
    "rank_sort", "rs", "RankSortLoss", 0.5, ("ranking", "sorting"), bucketed=False, sorting=True,
    formulas=formulas.rank_sort_terms, reference=reference.ranking_reference,
    paper="Rank & Sort (RS, Oksuz et al., ICCV 2021), exact, at bucketed cost",
    summary="Every relevant negative counts with its own logit. H is piecewise linear with kinks at "
            "s_i -/+ delta, so the negatives are reduced per interval between those 2P breakpoints, which "
            "gives the exact loss and gradient in O(M log P + P log P).",
)
BUCKETED_AP = LossSpec(
    "bucketed_ap", "bap", "BucketedAPLoss", 1.0, ("ap",), bucketed=True,
    formulas=formulas.ranking_terms, reference=reference.ranking_reference,
    paper="Bucketed AP loss (BAP, Yavuz et al., ECCV 2024)",
    summary="The mean bucketed ranking error over positives. Only whether a target is positive matters "
            "(usually 1); there is no sorting term.",
)
AP = LossSpec(
    "ap", "ap", "APLoss", 1.0, ("ap",), bucketed=False,
    formulas=formulas.ranking_terms, reference=reference.ranking_reference,
    paper="AP loss, exact (every negative with its own logit), at bucketed cost",
    summary="The mean exact ranking error, 1 - AP with the smoothed step. interpolated=True gives the "
            "original AP-loss (Chen et al.) as in the Rank & Sort repository: precision interpolated by a "
            "running maximum over positives in ascending logit order, and its error-driven gradient; it "
            "needs delta > 0.",
)
INTERPOLATED_AP = LossSpec(
    "interpolated_ap", "ap_interp", "APLoss", 1.0, ("ap",), bucketed=False, interpolated=True,
    formulas=formulas.interpolated_terms, reference=reference.ranking_reference,
    paper="interpolated AP loss (Chen et al.)", variant_of="ap", option="interpolated",
)
ALRP = LossSpec(
    "alrp", "alrp", "ALRPLoss", 1.0, ("classification", "localisation"), bucketed=False, regression=True,
    formulas=formulas.alrp_terms, reference=reference.alrp_reference,
    paper="aLRP loss (Oksuz et al., NeurIPS 2020), exact, at bucketed cost",
    summary="Average Localisation-Recall-Precision: a positive's error counts the negatives above it and "
            "the regression losses of the positives above it. The classification part ranks the logits "
            "(its gradient goes to the logits, the regression losses are constants there); the "
            "localisation part is the rank-weighted mean of the regression losses and is differentiable "
            "in them. Needs delta > 0.",
)
BUCKETED_ALRP = LossSpec(
    "bucketed_alrp", "balrp", "BucketedALRPLoss", 1.0, ("classification", "localisation"), bucketed=True,
    regression=True, formulas=formulas.alrp_terms, reference=reference.alrp_reference,
    paper="Bucketed aLRP loss (aLRP of Oksuz et al. with the buckets of Yavuz et al.)",
    summary="aLRP with the negatives bucketed between consecutive positives, as in bucketed_rank_sort_loss; "
            "the positive x positive terms (rank+ and the regression-weighted rank) are exact.",
)

LOSSES: tuple[LossSpec, ...] = (BUCKETED_RANK_SORT, RANK_SORT, BUCKETED_AP, AP, INTERPOLATED_AP, ALRP, BUCKETED_ALRP)
BY_NAME = {spec.name: spec for spec in LOSSES}
BY_SHORT = {spec.short: spec for spec in LOSSES}


def public(spec: LossSpec) -> bool:
    """Whether the loss has a function of its own (variants are an option of another's)."""
    return spec.variant_of is None


def variants(spec: LossSpec) -> dict[str, LossSpec]:
    """Keyword option -> variant, for the options of ``spec``'s function."""
    return {v.option: v for v in LOSSES if v.variant_of == spec.name}
