"""brl_triton: bucketed ranking-based losses (Rank & Sort, AP) for object detectors.

See ``docs/losses.md`` for the definitions every backend computes.
"""

from .functional import ap_loss, bucketed_ap_loss, bucketed_rank_sort_loss, rank_sort_loss
from .modules import APLoss, BucketedAPLoss, BucketedRankSortLoss, RankSortLoss

__version__ = "0.1.0"

__all__ = [
    "APLoss",
    "BucketedAPLoss",
    "BucketedRankSortLoss",
    "RankSortLoss",
    "ap_loss",
    "bucketed_ap_loss",
    "bucketed_rank_sort_loss",
    "rank_sort_loss",
]
