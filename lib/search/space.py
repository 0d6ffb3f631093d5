"""The search space: which decisions an episode makes per layer and how an action in [0, 1] becomes bits."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from lib.search.config import SearchConfig, SearchConfigError

WEIGHT, INPUT, ADC = "w", "a", "adc"


def action_to_bits(action: float, low: int, high: int, allowed: Optional[tuple] = None) -> int:
    """[0, 1] → one of `allowed` (default low..high) by equal-width intervals: [0, 1/n) → first, ..., [1-1/n, 1] → last."""
    choices = tuple(range(low, high + 1)) if allowed is None else tuple(allowed)
    index = int(float(action) * len(choices))
    return choices[min(max(index, 0), len(choices) - 1)]


def bits_to_action(bits: int, low: int, high: int, allowed: Optional[tuple] = None) -> float:
    """The centre of `bits`' interval (the action a forced decision is recorded with)."""
    choices = tuple(range(low, high + 1)) if allowed is None else tuple(allowed)
    return (choices.index(bits) + 0.5) / len(choices)


@dataclass(frozen=True)
class BitSpace:
    """Allowed bits per decision kind, and the layers whose bits are forced."""

    weight_bits: tuple
    input_bits: tuple
    adc_bits: Optional[tuple]
    forced: Optional[int]
    layers: int

    @classmethod
    def build(cls, config: SearchConfig, cell_bits: int, layers: int) -> "BitSpace":
        """The space of `config` on hardware with `cell_bits` per cell; refuses an empty weight space."""
        weights = tuple(range(config.min_bit, config.max_bit + 1))
        if config.cell_resolution_constraint:
            if cell_bits > config.max_bit:
                raise SearchConfigError(f"cell_bits={cell_bits} > max_bit={config.max_bit} with the cell resolution "
                                        f"constraint: no weight width in [{config.min_bit}, {config.max_bit}] is a "
                                        f"multiple of {cell_bits}; raise max_bit to >= {cell_bits}")
            weights = tuple(b for b in weights if b % cell_bits == 0)
            if not weights:
                raise SearchConfigError(f"no weight width in [{config.min_bit}, {config.max_bit}] is a multiple of "
                                        f"cell_bits={cell_bits} (cell resolution constraint)")
        adc = tuple(range(config.min_adc_bit, config.max_adc_bit + 1)) if config.search_adc else None
        return cls(weights, tuple(range(config.min_bit, config.max_bit + 1)), adc, config.force_first_last, layers)

    @property
    def decisions(self) -> tuple:
        return (WEIGHT, INPUT, ADC) if self.adc_bits is not None else (WEIGHT, INPUT)

    def choices(self, decision: str) -> tuple:
        return {WEIGHT: self.weight_bits, INPUT: self.input_bits, ADC: self.adc_bits}[decision]

    def is_forced(self, layer: int, decision: str) -> bool:
        """First and last layer's weight and input bits are fixed by --force-first-last (the ADC stays searched)."""
        return self.forced is not None and decision != ADC and layer in (0, self.layers - 1)

    def bits(self, action: float, decision: str) -> int:
        choices = self.choices(decision)
        return action_to_bits(action, choices[0], choices[-1], choices)

    def max_bits(self, decision: str) -> int:
        return self.choices(decision)[-1]
