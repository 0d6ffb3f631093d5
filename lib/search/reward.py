"""Rewards: CIM-AQ's accuracy-target shape (default) and HAQ's accuracy-only reward under hard budgets.

CIM-AQ shape, with target = baseline − max_accuracy_drop (percentage points) and the ratio of
the search's objective (latency by default, as CIM-AQ; or energy, EDP, area) vs uniform 8-bit:
    acc <  target:  −10 · (target − acc)
    acc >= target:  100 · (1 / ratio − 1) + 0.1 · (acc − target)
Budget mode (every evaluated policy already meets every budget): 0.1 · (acc − baseline).
"""
from __future__ import annotations

from typing import Mapping, Optional


def cim_aq_reward(accuracy: float, ratio: float, target: float) -> float:
    """Penalise a shortfall below the target linearly; above it, reward the saving (and a little accuracy)."""
    if accuracy < target:
        return -10.0 * (target - accuracy)
    return 100.0 * (1.0 / ratio - 1.0) + 0.1 * (accuracy - target)


def budget_reward(accuracy: float, baseline: float) -> float:
    """HAQ's reward when the budgets fix the cost: accuracy relative to the baseline."""
    return 0.1 * (accuracy - baseline)


def episode_reward(accuracy: float, ratio: float, baseline: float, target: float,
                   budgets: Optional[Mapping[str, float]]) -> float:
    """The objective's `ratio` rewarded CIM-AQ's way, or accuracy alone where budgets are set."""
    if budgets:
        return budget_reward(accuracy, baseline)
    return cim_aq_reward(accuracy, ratio, target)


def worst_reward(baseline: float, target: float, budgets: Optional[Mapping[str, float]]) -> float:
    """The lowest reward the shape gives (0% accuracy at any cost): what a diverged policy scores."""
    if budgets:
        return budget_reward(0.0, baseline)
    return -10.0 * max(target, 0.0)


def is_feasible(accuracy: float, ratios: Mapping[str, Optional[float]], target: float,
                budgets: Optional[Mapping[str, float]]) -> bool:
    """Meets the accuracy target (and, in budget mode, every budget)."""
    return accuracy >= target and all(ratios[name] is not None and ratios[name] <= limit + 1e-12
                                      for name, limit in (budgets or {}).items())
