"""brl_triton: bucketed ranking-based losses (Rank & Sort, AP, aLRP) for object detectors.

See ``docs/losses.md`` for the definitions every backend computes, and ``registry.LOSSES`` for
the list of losses.
"""

from . import functional, modules
from ._checks import NonFiniteError as NonFiniteError
from .balancing import SelfBalancingWeight as SelfBalancingWeight
from .functional import *  # noqa: F403  (one function per loss of the registry)
from .modules import *  # noqa: F403  (one module per loss of the registry)

__version__ = "0.1.0"

__all__ = sorted(functional.__all__ + modules.__all__ + ["NonFiniteError", "SelfBalancingWeight"])
