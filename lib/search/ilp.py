"""Bits under budgets as a multiple-choice knapsack, solved exactly by scipy's HiGHS MILP.

A policy's crossbar cost is a sum of per-layer table entries (latency, energy and area; EDP is
their product, not a sum, and cannot be budgeted here), so choosing one candidate (w, a[, adc])
per layer is an integer program: one binary variable per (layer, candidate), exactly one per
layer, minimise the summed sensitivity (lib.search.sensitivity) subject to Σ cost ≤ budget ×
baseline for every budgeted objective. The candidates already hold the space's rules: forced
first/last layers, cell-resolution multiples, per-layer bit ranges, ADC bits, free decisions.
"""
from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import csr_matrix

from lib.policy import Policy
from lib.search.config import SearchConfigError
from lib.search.free import HeldDecisions
from lib.search.space import ADC, INPUT, WEIGHT, BitSpace
from lib.simulator import CostModel

log = logging.getLogger(__name__)

ADDITIVE = {"latency": "latency_us", "energy": "energy_pj", "area": "area_mm2"}
# The budget is tightened by this much (relative) so HiGHS' feasibility tolerance cannot overshoot it.
MARGIN = 1e-9


@dataclass(frozen=True)
class Solution:
    """One solved budget: the policy, its predicted ratios and summed sensitivity."""

    budgets: dict
    policy: Policy
    ratios: dict
    sensitivity: float
    seconds: float

    def to_dict(self, objective: str) -> dict:
        budget = self.budgets.get(objective)
        return {"budget": budget, "budgets": self.budgets, "policy": self.policy.as_array().tolist(),
                "latency_ratio": self.ratios["latency"], "ratios": self.ratios,
                "objective_ratio": self.ratios.get(objective), "sensitivity": self.sensitivity,
                "seconds": round(self.seconds, 4)}


def layer_candidates(space: BitSpace, held: HeldDecisions, layer: int) -> list[tuple]:
    """The (w, a, adc or None) a layer may take: forced and held decisions at their one value."""
    def values(decision: str) -> tuple:
        if decision != ADC and space.is_forced(layer, decision):
            return (space.forced,)
        at = held.held_at(layer, decision)
        return (at,) if at is not None else tuple(space.choices(decision))

    adc = values(ADC) if space.adc_bits is not None else (None,)
    return list(itertools.product(values(WEIGHT), values(INPUT), adc))


def check_additive(budgets: Mapping[str, float]) -> None:
    """Refuse a budget the integer program cannot express (EDP is not a sum over layers)."""
    bad = [name for name in budgets if name not in ADDITIVE]
    if bad:
        raise SearchConfigError(f"budget(s) on {bad} cannot be solved by strategy='ilp': a policy's EDP is its energy "
                                f"times its latency, not a sum over layers; budget {sorted(ADDITIVE)} (e.g. latency "
                                f"and energy together) or use strategy='ddpg'")


class KnapsackProblem:
    """The candidates, their costs and scores for one model, space and cost model; solves any budgets."""

    def __init__(self, cost_model: CostModel, space: BitSpace, held: HeldDecisions,
                 score: Callable[[int, int, int, Optional[int]], float]) -> None:
        self.cost_model = cost_model
        self.names = list(cost_model.layer_names)
        self.candidates = [layer_candidates(space, held, i) for i in range(len(self.names))]
        self.layer_of = np.concatenate([np.full(len(c), i) for i, c in enumerate(self.candidates)])
        flat = [(i, c) for i, cands in enumerate(self.candidates) for c in cands]
        self.flat = flat
        self.scores = np.asarray([score(i, *c) for i, c in flat], dtype=np.float64)
        totals = [cost_model.layer_totals(i, c[0], c[1], c[2]) for i, c in flat]
        self.baseline = cost_model.baseline_totals()
        self.costs = {}
        for name, key in ADDITIVE.items():
            column = [getattr(t, key) for t in totals]
            if None not in column:
                self.costs[name] = np.asarray(column, dtype=np.float64) / getattr(self.baseline, key)
        self.space = space
        self.adc = space.adc_bits is not None

    def lowest_ratio(self, objective: str) -> float:
        """The lowest ratio any policy of this space reaches on `objective` (each layer at its cheapest)."""
        cost = self._cost(objective)
        return float(sum(cost[self.layer_of == i].min() for i in range(len(self.names))))

    def _cost(self, name: str) -> np.ndarray:
        if name not in self.costs:
            raise SearchConfigError(f"a budget on {name!r} needs the hardware's `energy` section (per-operation "
                                    f"energy and area), which this hardware does not have")
        return self.costs[name]

    def check_reachable(self, budgets: Mapping[str, float]) -> None:
        """Refuse a budget below the lowest reachable ratio, naming that ratio (before any training)."""
        check_additive(budgets)
        for name, limit in budgets.items():
            lowest = self.lowest_ratio(name)
            if lowest > limit + 1e-12:
                given = f"latency_budget={limit}" if name == "latency" else f"budget {name}={limit}"
                raise SearchConfigError(f"{given} is not reachable: the lowest {name} ratio any allowed policy gives "
                                        f"is {lowest:.4f}; expected a budget in [{lowest:.4f}, 1]")

    def solve(self, budgets: Mapping[str, float]) -> Solution:
        """The least summed sensitivity meeting every budget (an error where no policy meets them all)."""
        self.check_reachable(budgets)
        started = time.perf_counter()
        count = len(self.flat)
        one_each = csr_matrix((np.ones(count), (self.layer_of.astype(np.int64), np.arange(count))),
                              shape=(len(self.names), count))
        constraints = [LinearConstraint(one_each, 1, 1)]
        names = list(budgets)
        if names:
            costs = np.vstack([self._cost(name) for name in names])
            limits = np.asarray([budgets[name] for name in names]) * (1 - MARGIN)
            constraints.append(LinearConstraint(costs, -np.inf, limits))
        # A tie in sensitivity goes to the cheaper candidate (a term far below any score difference).
        tie = self._cost(names[0]) if names else next(iter(self.costs.values()))
        spread = float(self.scores.max() - self.scores.min()) if count else 0.0
        c = self.scores + tie * (1e-9 * max(spread, 1e-12))
        result = milp(c, constraints=constraints, integrality=np.ones(count), bounds=Bounds(0, 1),
                      options={"mip_rel_gap": 0.0, "presolve": True})
        if result.status != 0 or result.x is None:
            raise SearchConfigError(f"budgets {dict(budgets)} are not reachable together by any allowed policy "
                                    f"(HiGHS: {result.message}); loosen one of them")
        chosen = np.flatnonzero(result.x > 0.5)
        bits = {self.flat[k][0]: self.flat[k][1] for k in chosen}
        policy = Policy([bits[i][0] for i in range(len(self.names))], [bits[i][1] for i in range(len(self.names))],
                        [bits[i][2] for i in range(len(self.names))] if self.adc else None, self.names)
        cost = self.cost_model.policy_cost(policy)
        ratios = {k: v for k, v in cost.ratios.items() if v is not None}
        for name, limit in budgets.items():
            if ratios[name] > limit + 1e-12:
                raise RuntimeError(f"the solved policy's {name} ratio {ratios[name]} exceeds its budget {limit}")
        return Solution(dict(budgets), policy, ratios, float(self.scores[chosen].sum()),
                        time.perf_counter() - started)

    def front(self, objective: str, ratios: Sequence[float], fixed: Mapping[str, float]) -> list[Solution]:
        """One solution per budget on `objective` (the reachable ones), with the `fixed` budgets held too."""
        lowest = self.lowest_ratio(objective)
        solutions = []
        for ratio in sorted(set(float(r) for r in ratios)):
            if ratio < lowest - 1e-12:
                log.info("pareto: %s budget %.4f is below the lowest reachable %.4f; skipped", objective, ratio, lowest)
                continue
            solutions.append(self.solve({**fixed, objective: ratio}))
        return solutions


def policy_score(problem: KnapsackProblem, policy: Policy) -> float:
    """The summed sensitivity of any policy of the problem's space."""
    total = 0.0
    for i in range(len(policy)):
        w, a, adc = policy.layer(i)
        key = (w, a, adc if problem.adc else None)
        index = problem.candidates[i].index(key)
        total += problem.scores[np.flatnonzero(problem.layer_of == i)[index]]
    return float(total)

