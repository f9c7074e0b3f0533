"""aLRP's self-balancing weight of the localisation loss, for training loops."""

from __future__ import annotations

import math
import numbers
import operator

import torch
from torch import nn


class SelfBalancingWeight(nn.Module):
    """The weight ``w`` of ``classification + w * localisation`` that aLRP trains with (Oksuz et
    al., NeurIPS 2020): every ``period`` steps it becomes the period's
    ``mean(classification + localisation) / mean(localisation)``, so that the localisation part's
    gradient keeps pace with the classification part's without a tuned weight.

    Calling it with the two losses of :func:`brl_triton.alrp_loss` (0-d tensors or Python
    numbers) records them (detached, on their device: no host sync but one per period) and
    returns the weighted total. A step whose losses are NaN or Inf is not recorded, so one bad
    batch does not poison the weight. The weight, the step count and the period's sums are in
    ``state_dict()`` (as its ``_extra_state``), so a checkpoint of a model that holds the module
    resumes it; loading a state dict without them (one saved before the module existed) keeps
    the current state.

    Args:
        period: steps per update (an int >= 1), e.g. the iterations of one epoch (the aLRP paper
            updates once per epoch).
        initial: the weight before the first update (the paper's 50), a finite number > 0.

    Example:
        >>> balance = SelfBalancingWeight(period=2)
        >>> total = balance(torch.tensor(0.8), torch.tensor(0.1))  # 0.8 + 50 * 0.1
        >>> total = balance(0.6, 0.1)  # end of the period
        >>> round(balance.weight, 6)  # (0.7 + 0.1) / 0.1
        8.0
    """

    weight: float
    period: int

    def __init__(self, period: int, initial: float = 50.0):
        super().__init__()
        if isinstance(period, bool) or not isinstance(period, numbers.Integral) or period < 1:
            raise ValueError(f"period must be an int >= 1, got {period!r}")
        if isinstance(initial, bool) or not isinstance(initial, numbers.Real) or not 0 < initial < math.inf:
            raise ValueError(f"initial must be a finite number > 0, got {initial!r}")
        self.period = operator.index(period)
        self.weight = float(initial)
        self._steps = 0
        self._classification: torch.Tensor | None = None
        self._localisation: torch.Tensor | None = None

    def forward(self, classification: torch.Tensor | float, localisation: torch.Tensor | float):
        """``classification + weight * localisation``; records the step (see :meth:`record`)."""
        total = classification + self.weight * localisation
        self.record(classification, localisation)
        return total

    def record(self, classification: torch.Tensor | float, localisation: torch.Tensor | float) -> None:
        """Add one step's losses to the period; at its end, update ``weight``."""
        c = torch.as_tensor(classification).detach().double()
        l = torch.as_tensor(localisation).detach().double()  # noqa: E741
        finite = torch.isfinite(c) & torch.isfinite(l)
        # a NaN/Inf step adds nothing; torch.where keeps that decision on the device
        c, l = torch.where(finite, c, 0.0), torch.where(finite, l, 0.0)
        self._classification = c if self._classification is None else self._classification + c
        self._localisation = l if self._localisation is None else self._localisation + l
        self._steps += 1
        if self._steps >= self.period:
            localisation_sum = float(self._localisation)
            if localisation_sum > 0:  # a period without positives keeps the weight
                self.weight = (float(self._classification) + localisation_sum) / localisation_sum
            self._steps, self._classification, self._localisation = 0, None, None

    def get_extra_state(self) -> dict:
        return {"weight": self.weight, "period": self.period, "steps": self._steps,
                "classification": None if self._classification is None else float(self._classification),
                "localisation": None if self._localisation is None else float(self._localisation)}

    def set_extra_state(self, state: dict) -> None:
        self.weight, self.period, self._steps = float(state["weight"]), int(state["period"]), int(state["steps"])
        self._classification, self._localisation = (
            None if state[key] is None else torch.tensor(state[key], dtype=torch.float64)
            for key in ("classification", "localisation"))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        if prefix + "_extra_state" not in state_dict:
            return  # a checkpoint from before the weight existed (e.g. of the model before conversion)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        return f"period={self.period}, weight={self.weight:.4g}"
