"""Free decisions: a layer's weight, input or ADC bits that change no cost the search prices.

The search prices its objective and its budgets (latency, energy, EDP, area). A decision whose
every allowed value gives the same priced totals, whatever the layer's other decisions are, can
only cost accuracy when lowered, so every strategy holds it at its highest allowed bits (unless
asked to search it). On `run/hardware/default.yaml`, for instance, a ResNet-20 layer fits one array
at any weight width and latency follows the 1-bit DAC cycles, so its weight bits are free for a
latency search.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Iterable, Optional

from lib.simulator import CostModel, Totals
from lib.search.space import ADC, INPUT, WEIGHT, BitSpace

DECISION_NAMES = {WEIGHT: "weight", INPUT: "input", ADC: "ADC"}
# The additive totals each objective depends on (EDP is energy × latency).
TOTALS_OF = {"latency": ("latency_us",), "energy": ("energy_pj",), "edp": ("latency_us", "energy_pj"),
             "area": ("area_mm2",)}


@dataclass(frozen=True)
class FreeDecision:
    """One held decision: its layer, kind, the bits it is held at and why."""

    layer: int
    name: str
    decision: str
    held_at: int
    reason: str

    def to_dict(self) -> dict:
        return {"layer": self.layer, "name": self.name, "decision": self.decision, "held_at": self.held_at,
                "reason": self.reason}


def priced_objectives(objective: str, budgets: Iterable[str]) -> tuple:
    """The objectives whose cost a search reads: its reward's objective and every budgeted one."""
    return tuple(dict.fromkeys((objective, *budgets)))


def _priced(totals: Totals, fields: tuple) -> tuple:
    return tuple(getattr(totals, f) for f in fields)


def find_free_decisions(cost_model: CostModel, space: BitSpace, objectives: Iterable[str]) -> list[FreeDecision]:
    """Every searched (not forced) decision whose allowed bits all give the same priced totals of
    its layer, for every combination of the layer's other decisions."""
    objectives = tuple(objectives)
    fields = tuple(dict.fromkeys(f for name in objectives for f in TOTALS_OF[name]))
    priced = ", ".join(objectives)
    adc_choices: tuple = space.adc_bits if space.adc_bits is not None else (None,)
    found = []
    for i, name in enumerate(cost_model.layer_names):
        for decision in space.decisions:
            if space.is_forced(i, decision):
                continue
            choices = {WEIGHT: space.weight_bits, INPUT: space.input_bits, ADC: adc_choices}
            if len(choices[decision]) < 2:
                continue
            others = [d for d in (WEIGHT, INPUT, ADC) if d != decision]
            free = True
            for rest in itertools.product(*(_fixed_or(space, i, d, choices[d]) for d in others)):
                seen = None
                for bits in choices[decision]:
                    trial = dict(zip(others, rest), **{decision: bits})
                    value = _priced(cost_model.layer_totals(i, trial[WEIGHT], trial[INPUT], trial[ADC]), fields)
                    if seen is None:
                        seen = value
                    elif value != seen:
                        free = False
                        break
                if not free:
                    break
            if free:
                bits = choices[decision]
                found.append(FreeDecision(
                    i, name, decision, bits[-1],
                    f"{DECISION_NAMES[decision]} bits {bits[0]}..{bits[-1]} give the same {priced} on this "
                    f"hardware; held at {bits[-1]}"))
    return found


def _fixed_or(space: BitSpace, layer: int, decision: str, choices: tuple) -> tuple:
    """A forced decision's one value, else its allowed values."""
    if decision != ADC and space.is_forced(layer, decision):
        return (space.forced,)
    return choices


class HeldDecisions:
    """Which (layer, decision) a strategy does not search, and the bits it holds them at."""

    def __init__(self, free: list[FreeDecision]) -> None:
        self.free = list(free)
        self._held = {(d.layer, d.decision): d.held_at for d in self.free}

    def held_at(self, layer: int, decision: str) -> Optional[int]:
        return self._held.get((layer, decision))

    def __contains__(self, key: tuple) -> bool:
        return key in self._held

    def __len__(self) -> int:
        return len(self._held)

    def to_list(self) -> list[dict]:
        return [d.to_dict() for d in self.free]
