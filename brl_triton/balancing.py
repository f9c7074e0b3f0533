"""aLRP's self-balancing weight of the localisation loss, for training loops."""

from __future__ import annotations

import torch


class SelfBalancingWeight:
    """The weight ``w`` of ``classification + w * localisation`` that aLRP trains with (Oksuz et
    al., NeurIPS 2020): every ``period`` steps it becomes the period's
    ``mean(classification + localisation) / mean(localisation)``, so that the localisation part's
    gradient keeps pace with the classification part's without a tuned weight.

    Calling it with the two losses of :func:`brl_triton.alrp_loss` records them (detached, on
    their device: no host sync but one per period) and returns the weighted total. ``state_dict``
    and ``load_state_dict`` let a checkpoint resume it.

    Args:
        period: steps per update, e.g. the iterations of one epoch (the aLRP paper updates once
            per epoch).
        initial: the weight before the first update (the paper's 50).

    Example:
        >>> balance = SelfBalancingWeight(period=2)
        >>> total = balance(torch.tensor(0.8), torch.tensor(0.1))  # 0.8 + 50 * 0.1
        >>> total = balance(torch.tensor(0.6), torch.tensor(0.1))  # end of the period
        >>> round(balance.weight, 6)  # (0.7 + 0.1) / 0.1
        8.0
    """

    def __init__(self, period: int, initial: float = 50.0):
        if not isinstance(period, int) or period < 1:
            raise ValueError(f"period must be an int >= 1, got {period!r}")
        self.period = period
        self.weight = float(initial)
        self._steps = 0
        self._classification = self._localisation = None

    def __call__(self, classification: torch.Tensor, localisation: torch.Tensor) -> torch.Tensor:
        total = classification + self.weight * localisation
        self.record(classification, localisation)
        return total

    def record(self, classification: torch.Tensor, localisation: torch.Tensor) -> None:
        """Add one step's losses to the period; at its end, update ``weight``."""
        c, l = classification.detach().double(), localisation.detach().double()
        self._classification = c if self._classification is None else self._classification + c
        self._localisation = l if self._localisation is None else self._localisation + l
        self._steps += 1
        if self._steps >= self.period:
            localisation_sum = float(self._localisation)
            if localisation_sum > 0:  # a period without positives keeps the weight
                self.weight = (float(self._classification) + localisation_sum) / localisation_sum
            self._steps, self._classification, self._localisation = 0, None, None

    def state_dict(self) -> dict:
        return {"weight": self.weight, "period": self.period, "steps": self._steps,
                "classification": None if self._classification is None else float(self._classification),
                "localisation": None if self._localisation is None else float(self._localisation)}

    def load_state_dict(self, state: dict) -> None:
        self.weight, self.period, self._steps = float(state["weight"]), int(state["period"]), int(state["steps"])
        as_tensor = lambda v: None if v is None else torch.tensor(v, dtype=torch.float64)  # noqa: E731
        self._classification, self._localisation = as_tensor(state["classification"]), as_tensor(state["localisation"])
