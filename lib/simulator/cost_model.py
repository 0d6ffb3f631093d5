"""The cost model the search and finetune stages call: latency tables and per-policy costs.

`CostModel(hw, layer_dims, max_bit)` holds the CIM-AQ-compatible table
`table[layer, w_bit-1, a_bit-1]` (µs) and prices whole policies exactly (counts as integers),
including against a uniform baseline whose bits may exceed max_bit (priced by the formula,
not looked up). Where the hardware has an energy section, a policy's price also holds its
energy, EDP and area (lib.simulator.layer_energy / policy_energy) and every objective's ratio.
"""
from __future__ import annotations

import functools

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
from torch import nn

from lib.cim.hardware import HardwareConfig
from lib.fileio import atomic_write
from lib.policy import Policy, PolicyError
from lib.cim.hardware import ROW_TILINGS
from lib.simulator.crossbar_cost import CostError, LayerCost, layer_cost
from lib.simulator.dims_yaml import read_layer_dims
from lib.simulator.layer_dims import LayerDims, trace_layer_dims
from lib.simulator.layer_energy import LayerEnergy, layer_energy
from lib.simulator.objectives import Totals, check_objective
from lib.simulator.policy_energy import EnergyCost, energy_totals, price_energy

logger = logging.getLogger(__name__)

PolicyLike = Union[Policy, np.ndarray, Sequence[Sequence[int]]]


@dataclass
class PolicyCost:
    """A policy's price: totals over layers (per image) and the per-layer breakdown.

    `ratio` is the latency ratio (CIM-AQ's); `energy` is None where the hardware has no energy
    model, and `ratios` then gives None for energy, EDP and area.
    """

    total_latency: float
    baseline_latency: float
    baseline_bits: tuple
    ratio: float
    per_layer: list = field(default_factory=list)  # list[LayerCost]
    arrays: int = 0
    executes: int = 0
    adc_conversions: int = 0
    energy: Optional[EnergyCost] = None

    @property
    def ratios(self) -> dict:
        """{objective: ratio to the baseline} for every objective (None where unavailable)."""
        energy = self.energy
        return {"latency": self.ratio, "energy": energy.energy_ratio if energy else None,
                "edp": energy.edp_ratio if energy else None, "area": energy.area_ratio if energy else None}

    def ratio_of(self, objective: str) -> float:
        """The ratio of one objective; an error where the hardware has no energy model for it."""
        value = self.ratios[check_objective(objective)]
        if value is None:
            raise CostError(f"objective {objective!r} needs the hardware's `energy` section (per-operation energy "
                            f"and area); this hardware has none")
        return value

    def summary(self) -> dict:
        """Flat totals and ratios for logs and reports (energy keys None without an energy model)."""
        energy = self.energy
        return {"latency_us": self.total_latency, "latency_ratio": self.ratio,
                "energy_pj": energy.energy_pj if energy else None,
                "energy_ratio": energy.energy_ratio if energy else None,
                "edp_pj_us": energy.edp_pj_us if energy else None, "edp_ratio": energy.edp_ratio if energy else None,
                "area_mm2": energy.area_mm2 if energy else None, "area_ratio": energy.area_ratio if energy else None,
                "energy_split_pj": dict(energy.split_pj) if energy else None}

    def to_dict(self) -> dict:
        return {"total_latency_us": self.total_latency, "baseline_latency_us": self.baseline_latency,
                "baseline_bits": list(self.baseline_bits), "ratio": self.ratio, "arrays": self.arrays,
                "executes": self.executes, "adc_conversions": self.adc_conversions,
                "per_layer": [c.to_dict() for c in self.per_layer], "ratios": self.ratios,
                "energy": self.energy.to_dict() if self.energy is not None else None}


def latency_table(layer_dims: Sequence[LayerDims], hw: HardwareConfig, max_bit: int,
                  row_tiling: Optional[str] = None) -> np.ndarray:
    """float64 [layers, max_bit, max_bit] of latency (µs) indexed [layer, w_bit-1, a_bit-1]."""
    table = np.zeros((len(layer_dims), max_bit, max_bit), dtype=np.float64)
    for i, dims in enumerate(layer_dims):
        for w in range(1, max_bit + 1):
            for a in range(1, max_bit + 1):
                table[i, w - 1, a - 1] = layer_cost(dims, hw, w, a, row_tiling=row_tiling).latency
    return table


def adc_latency_table(layer_dims: Sequence[LayerDims], hw: HardwareConfig, max_bit: int,
                      max_adc_bit: int, row_tiling: Optional[str] = None) -> np.ndarray:
    """float64 [layers, max_bit, max_bit, max_adc_bit] indexed [layer, w-1, a-1, adc-1].

    Only differs along the last axis with adc_latency_model='sar'.
    """
    table = np.zeros((len(layer_dims), max_bit, max_bit, max_adc_bit), dtype=np.float64)
    for i, dims in enumerate(layer_dims):
        for w in range(1, max_bit + 1):
            for a in range(1, max_bit + 1):
                for adc in range(1, max_adc_bit + 1):
                    table[i, w - 1, a - 1, adc - 1] = layer_cost(dims, hw, w, a, adc, row_tiling).latency
    return table


def _check_max_bit(max_bit) -> int:
    if not isinstance(max_bit, int) or isinstance(max_bit, bool) or max_bit < 1:
        raise CostError(f"max_bit={max_bit!r} is not allowed: expected an integer >= 1")
    return max_bit


class CostModel:
    """Latency table and policy pricing for one network on one crossbar configuration.

    Rows follow `layer_dims` (call order). Policies must have one row per layer and bits in
    1..max_bit. `baseline_bits` is the uniform (w_bit, a_bit) that ratios are taken against.
    Tiling, slicing and column placement are the hardware's (`row_tiling`, if given, overrides
    the hardware's row tiling).
    """

    def __init__(self, hw: HardwareConfig, layer_dims: Sequence[LayerDims], max_bit: int = 8,
                 baseline_bits: tuple = (8, 8), row_tiling: Optional[str] = None) -> None:
        if not layer_dims:
            raise CostError("a cost model needs at least one layer")
        if row_tiling is not None and row_tiling not in ROW_TILINGS:
            raise CostError(f"row_tiling={row_tiling!r} is not allowed: expected one of {list(ROW_TILINGS)}")
        if row_tiling is not None:
            hw = hw.with_overrides(row_tiling=row_tiling)
        names = [d.name for d in layer_dims]
        if len(set(names)) != len(names):
            duplicates = sorted({n for n in names if names.count(n) > 1})
            raise CostError(f"layer names must be unique; repeated: {duplicates}")
        self.hw = hw
        self.layer_dims = list(layer_dims)
        self.max_bit = _check_max_bit(max_bit)
        self.row_tiling = hw.row_tiling
        self.baseline_bits = self._check_baseline(baseline_bits)
        self._metrics: dict = {}
        self._baselines: dict = {}
        self._latencies: dict = {}  # (layer, w_bit, a_bit) -> µs, where the table is not built
        self.uniform_latency(*self.baseline_bits)  # prices every layer once: a hardware it refuses fails here

    @functools.cached_property
    def table(self) -> np.ndarray:
        """float64 [layers, max_bit, max_bit] of latency (µs) indexed [layer, w_bit-1, a_bit-1]
        (CIM-AQ's lookup table), built on first use: pricing a few policies needs a few entries."""
        return latency_table(self.layer_dims, self.hw, self.max_bit)

    # ------------------------------------------------------------ construction
    @classmethod
    def from_model(cls, model: nn.Module, hw: HardwareConfig, input_size, max_bit: int = 8, *,
                   include_attention: bool = False, exclude=(), **kwargs) -> "CostModel":
        """Trace `model` at `input_size` (batch 1) and build its cost model."""
        dims = trace_layer_dims(model, input_size, include_attention=include_attention, exclude=exclude)
        return cls(hw, dims, max_bit, **kwargs)

    @classmethod
    def from_dims_yaml(cls, path: str | Path, hw: HardwareConfig, max_bit: int = 8, **kwargs) -> "CostModel":
        """Build from a CIM-AQ-format `layer_dimensions` YAML instead of tracing."""
        return cls(hw, read_layer_dims(path), max_bit, **kwargs)

    # ------------------------------------------------------------ lookups
    def __len__(self) -> int:
        return len(self.layer_dims)

    @property
    def layer_names(self) -> list[str]:
        return [d.name for d in self.layer_dims]

    def layer_cost(self, index: int, w_bit: int, a_bit: int, adc_bits: Optional[int] = None) -> LayerCost:
        """Full footprint/latency of one layer (any bits >= 1, not limited to max_bit)."""
        return layer_cost(self.layer_dims[index], self.hw, w_bit, a_bit, adc_bits)

    @property
    def energy_available(self) -> bool:
        """Whether the hardware has an energy model (else energy, EDP and area are unavailable)."""
        return self.hw.energy is not None

    def layer_energy(self, index: int, w_bit: int, a_bit: int, adc_bits: Optional[int] = None) -> LayerEnergy:
        """Counts, energy and area of one layer (an error without an energy model)."""
        return layer_energy(self.layer_dims[index], self.hw, w_bit, a_bit, adc_bits)

    def layer_totals(self, index: int, w_bit: int, a_bit: int, adc_bits: Optional[int] = None) -> Totals:
        """One layer's latency, energy and area (mm²), remembered: the search's budget lowering asks often."""
        adc = self.hw.adc_bits if adc_bits is None else adc_bits
        key = (index, w_bit, a_bit, adc)
        found = self._metrics.get(key)
        if found is None:
            latency = self.latency(index, w_bit, a_bit, adc_bits)
            if self.energy_available:
                layer = self.layer_energy(index, w_bit, a_bit, adc)
                found = Totals(latency, layer.energy_pj, layer.area_um2 * 1e-6)
            else:
                found = Totals(latency)
            self._metrics[key] = found
        return found

    def baseline_totals(self, baseline_bits: Optional[tuple] = None) -> Totals:
        """The uniform baseline's totals (ADCs at the hardware's adc_bits), summed as policy_cost sums."""
        bits = self.baseline_bits if baseline_bits is None else self._check_baseline(baseline_bits)
        found = self._baselines.get(bits)
        if found is None:
            latency = self.uniform_latency(*bits)
            if self.energy_available:
                energy_pj, area_mm2 = energy_totals([self.layer_energy(i, *bits) for i in range(len(self))])
                found = Totals(latency, energy_pj, area_mm2)
            else:
                found = Totals(latency)
            self._baselines[bits] = found
        return found

    def latency(self, index: int, w_bit: int, a_bit: int, adc_bits: Optional[int] = None) -> float:
        """Latency (µs) of one layer; from the table when the bits are inside it."""
        if adc_bits is None and 1 <= w_bit <= self.max_bit and 1 <= a_bit <= self.max_bit:
            if "table" in self.__dict__:
                return float(self.table[index, w_bit - 1, a_bit - 1])
            key = (index, w_bit, a_bit)
            if key not in self._latencies:
                self._latencies[key] = float(self.layer_cost(index, w_bit, a_bit).latency)
            return self._latencies[key]
        return self.layer_cost(index, w_bit, a_bit, adc_bits).latency

    def uniform_latency(self, w_bit: int, a_bit: int, adc_bits: Optional[int] = None) -> float:
        """Total latency (µs) with every layer at the same bits (any bits >= 1)."""
        return float(sum(self.latency(i, w_bit, a_bit, adc_bits) for i in range(len(self))))

    def uniform_cost(self, w_bit: int, a_bit: int, adc_bits: Optional[int] = None) -> PolicyCost:
        """Breakdown with every layer at the same bits (any bits >= 1, unlike policy_cost)."""
        per_layer = [self.layer_cost(i, w_bit, a_bit, adc_bits) for i in range(len(self))]
        return self._priced(per_layer, self.baseline_bits)

    def adc_table(self, max_adc_bit: int) -> np.ndarray:
        """The 4-D table with an ADC-bits axis (see adc_latency_table)."""
        return adc_latency_table(self.layer_dims, self.hw, self.max_bit, _check_max_bit(max_adc_bit))

    def save_table(self, path: str | Path) -> Path:
        """Write `table` as .npy (CIM-AQ's lookup-table format), atomically."""
        return atomic_write(path, lambda handle: np.save(handle, self.table), binary=True)

    # ------------------------------------------------------------ policies
    def policy_cost(self, policy: PolicyLike, baseline_bits: Optional[tuple] = None) -> PolicyCost:
        """Price a policy (Policy, L×2/L×3 int array, or [(w, a[, adc]), ...]) against a uniform baseline."""
        policy = self._as_policy(policy)
        self._check_length(policy)
        if policy.layer_names is not None:
            policy.check_matches(self.layer_names)
        for i in range(len(policy)):
            for key, bit in (("w_bit", policy.w_bits[i]), ("a_bit", policy.a_bits[i])):
                if not 1 <= bit <= self.max_bit:
                    raise PolicyError(f"layer {i} ({self.layer_names[i]}): {key}={bit} is outside 1..{self.max_bit} "
                                      f"(max_bit of this cost model)")
        per_layer = [self.layer_cost(i, *policy.layer(i)) for i in range(len(policy))]
        baseline = self._check_baseline(baseline_bits) if baseline_bits is not None else self.baseline_bits
        return self._priced(per_layer, baseline)

    def _priced(self, per_layer: list, baseline: tuple) -> PolicyCost:
        baseline_latency = self.uniform_latency(*baseline)
        total = float(sum(c.latency for c in per_layer))
        energy = None
        if self.energy_available:
            layers = [self.layer_energy(i, c.w_bit, c.a_bit, c.adc_bits) for i, c in enumerate(per_layer)]
            energy = price_energy(layers, total, self.baseline_totals(baseline))
        return PolicyCost(
            total_latency=total, baseline_latency=baseline_latency, baseline_bits=tuple(baseline),
            ratio=total / baseline_latency if baseline_latency > 0 else float("nan"),
            per_layer=per_layer,
            arrays=sum(c.arrays for c in per_layer),
            executes=sum(c.executes for c in per_layer),
            adc_conversions=sum(c.adc_conversions for c in per_layer),
            energy=energy)

    def _check_length(self, policy: Policy) -> None:
        if len(policy) != len(self):
            names = self.layer_names
            raise PolicyError(f"policy has {len(policy)} layers but the cost model has {len(self)} "
                              f"(call order: {names[:3]}{' ...' if len(names) > 3 else ''})")

    @staticmethod
    def _as_policy(policy: PolicyLike) -> Policy:
        if isinstance(policy, Policy):
            return policy
        array = np.asarray(policy)
        if array.ndim != 2 or array.shape[1] not in (2, 3):
            raise PolicyError(f"policy array has shape {array.shape}; expected (layers, 2) or (layers, 3)")
        if not np.all(np.equal(np.mod(array, 1), 0)):
            raise PolicyError("policy array holds non-integer bit widths")
        array = array.astype(np.int64)
        return Policy(array[:, 0].tolist(), array[:, 1].tolist(),
                      array[:, 2].tolist() if array.shape[1] == 3 else None)

    @staticmethod
    def _check_baseline(bits) -> tuple:
        try:
            w_bit, a_bit = (int(b) for b in bits)
        except (TypeError, ValueError):
            raise CostError(f"baseline_bits={bits!r} is not allowed: expected (w_bit, a_bit)") from None
        if w_bit < 1 or a_bit < 1:
            raise CostError(f"baseline_bits={bits!r} is not allowed: bits must be >= 1")
        return (w_bit, a_bit)
