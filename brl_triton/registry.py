"""The one list of losses. Everything that enumerates losses derives from ``LOSSES``: the
functional API (``functional``), the ``nn.Module`` wrappers (``modules``), the detection
``loss=`` choices, the benchmark rows and the tests' parametrisation.

An entry is data: it says what a loss computes, and the rest of the package reads its flags
(this module imports nothing of the package):

- ``bucketed``: negatives are grouped into buckets between consecutive positives (prototype =
  bucket mean); otherwise every negative counts with its own logit (breakpoint bins).
- ``sorting`` / ``interpolated`` / ``regression``: which per-positive formulas apply
  (``_formulas.formulas_for``, and the same branches in the Triton kernel of ``kernels/tiles.py``)
  and which O(P*N) oracle checks them (``reference.reference_for``).

Adding a loss: one entry here, its formulas in ``_formulas.py`` (and the tile kernel's
branch), its reference in ``reference.py``, and its function and module written out in
``functional.py`` and ``modules.py`` (a test checks them against the entry).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LossSpec:
    """One ranking loss.

    ``name``: stem of the function (``<name>_loss``); ``short``: its name in detection configs
    and benchmark tables; ``module``: its ``nn.Module`` class name; ``outputs``: names of the
    returned 0-d losses; ``paper``: where it comes from; ``variant_of``/``option``: a keyword of
    another loss's function selects it (``ap_loss(interpolated=True)``).
    """

    name: str
    short: str
    module: str
    delta: float
    outputs: tuple[str, ...]
    bucketed: bool
    paper: str = ""
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

    def has_slope(self, delta: float) -> bool:
        """Whether a negative's gradient is affine in its logit within a bin (exact losses with
        delta > 0, whose bins lie between breakpoints), not constant (buckets, or the hard step)."""
        return delta > 0 and not self.bucketed

    @property
    def needs_smoothing(self) -> bool:
        """delta must be > 0 (the loss divides by the smoothed rank or uses H(0) = 1/2)."""
        return self.interpolated or self.regression


BUCKETED_RANK_SORT = LossSpec(
    "bucketed_rank_sort", "brs", "BucketedRankSortLoss", 0.5, ("ranking", "sorting"), bucketed=True, sorting=True,
    paper="Bucketed Rank & Sort (BRS, Yavuz et al., ECCV 2024)",
)
RANK_SORT = LossSpec(
    "rank_sort", "rs", "RankSortLoss", 0.5, ("ranking", "sorting"), bucketed=False, sorting=True,
    paper="Rank & Sort (RS, Oksuz et al., ICCV 2021), exact, at bucketed cost",
)
BUCKETED_AP = LossSpec(
    "bucketed_ap", "bap", "BucketedAPLoss", 1.0, ("ap",), bucketed=True,
    paper="Bucketed AP loss (BAP, Yavuz et al., ECCV 2024)",
)
AP = LossSpec(
    "ap", "ap", "APLoss", 1.0, ("ap",), bucketed=False,
    paper="AP loss, exact (every negative with its own logit), at bucketed cost",
)
INTERPOLATED_AP = LossSpec(
    "interpolated_ap", "ap_interp", "APLoss", 1.0, ("ap",), bucketed=False, interpolated=True,
    paper="interpolated AP loss (Chen et al.)", variant_of="ap", option="interpolated",
)
ALRP = LossSpec(
    "alrp", "alrp", "ALRPLoss", 1.0, ("classification", "localisation"), bucketed=False, regression=True,
    paper="aLRP loss (Oksuz et al., NeurIPS 2020), exact, at bucketed cost",
)
BUCKETED_ALRP = LossSpec(
    "bucketed_alrp", "balrp", "BucketedALRPLoss", 1.0, ("classification", "localisation"), bucketed=True,
    regression=True,
    paper="Bucketed aLRP loss (aLRP of Oksuz et al. with the buckets of Yavuz et al.)",
)

LOSSES: tuple[LossSpec, ...] = (BUCKETED_RANK_SORT, RANK_SORT, BUCKETED_AP, AP, INTERPOLATED_AP, ALRP, BUCKETED_ALRP)
BY_NAME = {spec.name: spec for spec in LOSSES}


def public(spec: LossSpec) -> bool:
    """Whether the loss has a function of its own (variants are an option of another's)."""
    return spec.variant_of is None


def variants(spec: LossSpec) -> dict[str, LossSpec]:
    """Keyword option -> variant, for the options of ``spec``'s function."""
    return {v.option: v for v in LOSSES if v.variant_of == spec.name}
