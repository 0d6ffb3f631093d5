"""Rewards: CIM-AQ's accuracy-target shape (default) and HAQ's accuracy-only reward under a latency budget.

CIM-AQ shape, with target = baseline − max_accuracy_drop (percentage points):
    acc <  target:  −10 · (target − acc)
    acc >= target:  100 · (1 / latency_ratio − 1) + 0.1 · (acc − target)
Budget mode (every evaluated policy already meets the latency budget): 0.1 · (acc − baseline).
"""
from __future__ import annotations

from typing import Optional


def cim_aq_reward(accuracy: float, latency_ratio: float, target: float) -> float:
    """Penalise a shortfall below the target linearly; above it, reward the speed-up (and a little accuracy)."""
    if accuracy < target:
        return -10.0 * (target - accuracy)
    return 100.0 * (1.0 / latency_ratio - 1.0) + 0.1 * (accuracy - target)


def budget_reward(accuracy: float, baseline: float) -> float:
    """HAQ's reward when the budget fixes the latency: accuracy relative to the baseline."""
    return 0.1 * (accuracy - baseline)


def episode_reward(accuracy: float, latency_ratio: float, baseline: float, target: float,
                   latency_budget: Optional[float]) -> float:
    if latency_budget is not None:
        return budget_reward(accuracy, baseline)
    return cim_aq_reward(accuracy, latency_ratio, target)


def worst_reward(baseline: float, target: float, latency_budget: Optional[float]) -> float:
    """The lowest reward the shape gives (0% accuracy at any latency): what a diverged policy scores."""
    if latency_budget is not None:
        return budget_reward(0.0, baseline)
    return -10.0 * max(target, 0.0)


def is_feasible(accuracy: float, latency_ratio: float, target: float, latency_budget: Optional[float]) -> bool:
    """Meets the accuracy target (and, in budget mode, the latency budget)."""
    return accuracy >= target and (latency_budget is None or latency_ratio <= latency_budget + 1e-12)
