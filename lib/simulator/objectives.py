"""The cost objectives a policy is priced, budgeted and searched by: latency, energy, their
product (EDP) and area, as totals over a network and as ratios to a baseline policy.

EDP is the network's energy times its latency (not a sum over layers), so every objective is
computed from the three additive totals below.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from lib.objectives import ENERGY_OBJECTIVES, OBJECTIVES
from lib.simulator.crossbar_cost import CostError

__all__ = ["ENERGY_OBJECTIVES", "OBJECTIVES", "UNITS", "Totals", "check_objective"]
UNITS = {"latency": "µs", "energy": "pJ", "edp": "pJ·µs", "area": "mm²"}


def check_objective(name: str, what: str = "objective") -> str:
    if name not in OBJECTIVES:
        raise CostError(f"{what}={name!r} is not allowed: expected one of {list(OBJECTIVES)}")
    return name


@dataclass(frozen=True)
class Totals:
    """A network's additive totals per image; energy and area are None without an energy model."""

    latency_us: float
    energy_pj: Optional[float] = None
    area_mm2: Optional[float] = None

    def value(self, objective: str) -> Optional[float]:
        """The objective's total (None where the energy model is missing)."""
        if objective == "latency":
            return self.latency_us
        if objective == "energy":
            return self.energy_pj
        if objective == "edp":
            return None if self.energy_pj is None else self.energy_pj * self.latency_us
        if objective == "area":
            return self.area_mm2
        raise CostError(f"objective={objective!r} is not allowed: expected one of {list(OBJECTIVES)}")

    def ratio(self, objective: str, baseline: "Totals") -> Optional[float]:
        """This total over the baseline's (None where either is unavailable, NaN for a zero baseline)."""
        mine, theirs = self.value(objective), baseline.value(objective)
        if mine is None or theirs is None:
            return None
        return mine / theirs if theirs > 0 else float("nan")

    def ratios(self, baseline: "Totals") -> dict:
        return {objective: self.ratio(objective, baseline) for objective in OBJECTIVES}
