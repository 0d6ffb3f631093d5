"""HAQ's hard latency budget: lower bits, best latency saving per accuracy risk first, until a policy fits.

Lowering decision (layer, w|a) by one allowed step saves latency (exact, from the cost model)
and risks accuracy; the risk proxy is the growth of the layer's quantization-noise power,
(4^-b' − 4^-b) weighted by the layer's share of the parameters (the more weights a layer has,
the more its noise matters) plus a floor so tiny layers are not free.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from lib.policy import Policy
from lib.simulator import CostModel
from lib.search.config import SearchConfigError
from lib.search.space import INPUT, WEIGHT, BitSpace


def lowest_policy(space: BitSpace, base: Policy) -> Policy:
    """`base` with every searchable weight/input decision at its lowest allowed bits."""
    w, a = list(base.w_bits), list(base.a_bits)
    for i in range(len(base)):
        if not space.is_forced(i, WEIGHT):
            w[i] = space.weight_bits[0]
        if not space.is_forced(i, INPUT):
            a[i] = space.input_bits[0]
    return Policy(w, a, base.adc_bits, base.layer_names)


def check_budget_reachable(cost_model: CostModel, space: BitSpace, base: Policy, budget: float) -> None:
    """Refuse a budget that even the lowest bits cannot meet (before any training)."""
    ratio = cost_model.policy_cost(lowest_policy(space, base)).ratio
    if ratio > budget:
        raise SearchConfigError(f"latency_budget={budget} is not reachable: the lowest allowed bits give a latency "
                                f"ratio of {ratio:.4f}; expected a budget in [{ratio:.4f}, 1]")


def lower_to_budget(policy: Policy, cost_model: CostModel, space: BitSpace, budget: float,
                    steps: Optional[list] = None) -> Policy:
    """A copy of `policy` lowered greedily until its latency ratio is <= budget (records each step in `steps`)."""
    w, a = list(policy.w_bits), list(policy.a_bits)
    adc = None if policy.adc_bits is None else list(policy.adc_bits)
    params = np.asarray([d.params or d.m * d.n for d in cost_model.layer_dims], dtype=np.float64)
    share = params / params.sum()

    def ratio() -> float:
        return cost_model.policy_cost(Policy(w, a, adc, policy.layer_names)).ratio

    current = ratio()
    while current > budget:
        best = None
        for i in range(len(w)):
            for decision, bits in ((WEIGHT, w), (INPUT, a)):
                if space.is_forced(i, decision):
                    continue
                found = _next_saving_step(cost_model, space, i, decision, w[i], a[i], adc[i] if adc else None)
                if found is None:
                    continue
                new, saving = found
                risk = (4.0 ** -new - 4.0 ** -bits[i]) * share[i] + 1e-9
                score = (saving / risk, -i, decision == WEIGHT)
                if best is None or score > best[0]:
                    best = (score, i, decision, new)
        if best is None:  # nothing saves latency any more; the caller checked reachability up front
            break
        _, i, decision, new = best
        (w if decision == WEIGHT else a)[i] = new
        current = ratio()
        if steps is not None:
            steps.append((i, decision, new, current))
    return Policy(w, a, adc, policy.layer_names)


def _next_saving_step(cost_model: CostModel, space: BitSpace, layer: int, decision: str, w_bit: int, a_bit: int,
                      adc: Optional[int]) -> Optional[tuple]:
    """(the highest lower bits that save latency, the saving) for one decision, or None."""
    now = cost_model.latency(layer, w_bit, a_bit, adc)
    current = w_bit if decision == WEIGHT else a_bit
    for new in sorted((b for b in space.choices(decision) if b < current), reverse=True):
        trial = (new, a_bit) if decision == WEIGHT else (w_bit, new)
        saving = now - cost_model.latency(layer, *trial, adc)
        if saving > 0:
            return new, saving
    return None
