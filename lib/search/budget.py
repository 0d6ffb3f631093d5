"""HAQ's hard budgets: lower bits, best saving per accuracy risk first, until a policy meets every budget.

A budget is a ratio vs uniform 8-bit on one objective (latency, energy, EDP, area); several may
hold at once. Lowering decision (layer, w|a|adc) by one allowed step saves cost (exact, from the
cost model: the saving is the fall of the ratios still over their budgets) and risks accuracy;
the risk proxy is the growth of the layer's quantization-noise power, (4^-b' − 4^-b) weighted by
the layer's share of the parameters (the more weights a layer has, the more its noise matters)
plus a floor so tiny layers are not free. ADC bits are lowered only where the search sets them.
"""
from __future__ import annotations

from typing import Mapping, Optional, Union

import numpy as np

from lib.objectives import ENERGY_OBJECTIVES
from lib.policy import Policy
from lib.simulator import CostModel, Totals
from lib.search.config import SearchConfigError
from lib.search.space import ADC, INPUT, WEIGHT, BitSpace

Budget = Union[float, Mapping[str, float]]


def budgets_of(budget: Budget) -> dict:
    """{objective: ratio}: a bare number is a latency budget."""
    return {"latency": float(budget)} if isinstance(budget, (int, float)) else dict(budget)


def lowest_policy(space: BitSpace, base: Policy) -> Policy:
    """`base` with every searchable weight/input (and ADC) decision at its lowest allowed bits."""
    w, a = list(base.w_bits), list(base.a_bits)
    for i in range(len(base)):
        if not space.is_forced(i, WEIGHT):
            w[i] = space.weight_bits[0]
        if not space.is_forced(i, INPUT):
            a[i] = space.input_bits[0]
    adc = [space.adc_bits[0]] * len(base) if space.adc_bits is not None else base.adc_bits
    return Policy(w, a, adc, base.layer_names)


def check_budget_reachable(cost_model: CostModel, space: BitSpace, base: Policy, budget: Budget) -> None:
    """Refuse a budget that even the lowest bits cannot meet, or that needs energy the hardware lacks
    (before any training)."""
    budgets = budgets_of(budget)
    missing = [name for name in budgets if name in ENERGY_OBJECTIVES and not cost_model.energy_available]
    if missing:
        raise SearchConfigError(f"budget(s) on {missing} need the hardware's `energy` section (per-operation energy "
                                f"and area), which this hardware does not have")
    ratios = cost_model.policy_cost(lowest_policy(space, base)).ratios
    for name, limit in budgets.items():
        ratio = ratios[name]
        if ratio > limit:
            given = f"latency_budget={limit}" if name == "latency" else f"budget {name}={limit}"
            article = "an" if name[0] in "ae" else "a"
            raise SearchConfigError(f"{given} is not reachable: the lowest allowed bits give {article} {name} ratio "
                                    f"of {ratio:.4f}; expected a budget in [{ratio:.4f}, 1]")


def lower_to_budget(policy: Policy, cost_model: CostModel, space: BitSpace, budget: Budget,
                    steps: Optional[list] = None) -> Policy:
    """A copy of `policy` lowered greedily until every budget's ratio is <= its budget.

    Each step is recorded in `steps` as (layer, decision, new bits, ratio after it): the latency
    ratio for a bare-number budget, else {objective: ratio} of the budgeted objectives.
    """
    budgets = budgets_of(budget)
    w, a = list(policy.w_bits), list(policy.a_bits)
    adc = None if policy.adc_bits is None else list(policy.adc_bits)
    decisions = (WEIGHT, INPUT) + ((ADC,) if adc is not None and space.adc_bits is not None else ())
    params = np.asarray([d.params or d.m * d.n for d in cost_model.layer_dims], dtype=np.float64)
    share = params / params.sum()
    baseline = cost_model.baseline_totals()

    def layer(i: int, w_bit: int, a_bit: int, adc_bit: Optional[int]) -> Totals:
        return cost_model.layer_totals(i, w_bit, a_bit, adc_bit)

    def totals() -> Totals:
        layers = [layer(i, w[i], a[i], adc[i] if adc else None) for i in range(len(w))]
        energy = None if layers[0].energy_pj is None else float(sum(t.energy_pj for t in layers))
        area = None if layers[0].area_mm2 is None else float(sum(t.area_mm2 for t in layers))
        return Totals(float(sum(t.latency_us for t in layers)), energy, area)

    def ratios(t: Totals) -> dict:
        return {name: t.ratio(name, baseline) for name in budgets}

    current = totals()
    now = ratios(current)
    while any(now[name] > limit for name, limit in budgets.items()):
        over = [name for name, limit in budgets.items() if now[name] > limit]
        best = None
        for i in range(len(w)):
            bits_now = {WEIGHT: w[i], INPUT: a[i], ADC: adc[i] if adc else None}
            for decision in decisions:
                if space.is_forced(i, decision):
                    continue
                found = _next_saving_step(space, decision, bits_now, over, now, current, baseline,
                                          lambda trial: layer(i, *trial), layer(i, w[i], a[i], bits_now[ADC]))
                if found is None:
                    continue
                new, saving = found
                risk = (4.0 ** -new - 4.0 ** -bits_now[decision]) * share[i] + 1e-9
                score = (saving / risk, -i, decision == WEIGHT)
                if best is None or score > best[0]:
                    best = (score, i, decision, new)
        if best is None:  # nothing saves any more; the caller checked reachability up front
            break
        _, i, decision, new = best
        {WEIGHT: w, INPUT: a, ADC: adc}[decision][i] = new
        current = totals()
        now = ratios(current)
        if steps is not None:
            steps.append((i, decision, new, now["latency"] if isinstance(budget, (int, float)) else dict(now)))
    return Policy(w, a, adc, policy.layer_names)


def _next_saving_step(space: BitSpace, decision: str, bits_now: dict, over: list, now: dict, current: Totals,
                      baseline: Totals, trial_totals, old: Totals) -> Optional[tuple]:
    """(the highest lower bits of `decision` that lower an over-budget ratio, the summed fall of those ratios),
    or None."""
    for new in sorted((b for b in space.choices(decision) if b < bits_now[decision]), reverse=True):
        trial = dict(bits_now, **{decision: new})
        changed = trial_totals((trial[WEIGHT], trial[INPUT], trial[ADC]))
        after = _swap(current, old, changed)
        saving = sum(now[name] - after.ratio(name, baseline) for name in over)
        if saving > 0:
            return new, saving
    return None


def _swap(total: Totals, old: Totals, new: Totals) -> Totals:
    """The totals with one layer's `old` contribution replaced by `new`."""
    def part(key: str) -> Optional[float]:
        value = getattr(total, key)
        return None if value is None else value - getattr(old, key) + getattr(new, key)
    return Totals(part("latency_us"), part("energy_pj"), part("area_mm2"))
