"""A policy's energy and area: totals over its layers, the split by part, EDP, and the ratios to
the baseline policy (uniform 8-bit with the ADCs at the hardware's adc_bits)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from lib.simulator.layer_energy import ENERGY_PARTS, LayerEnergy
from lib.simulator.objectives import Totals


@dataclass
class EnergyCost:
    """Energy (pJ per image) with its split, EDP (pJ·µs), area (mm²), and their baseline ratios."""

    energy_pj: float
    split_pj: dict
    edp_pj_us: float
    arrays: int
    adcs: int
    array_area_mm2: float
    adc_area_mm2: float
    area_mm2: float
    baseline_energy_pj: float
    baseline_edp_pj_us: float
    baseline_area_mm2: float
    energy_ratio: float
    edp_ratio: float
    area_ratio: float
    per_layer: list = field(default_factory=list)  # list[LayerEnergy]

    @property
    def shares(self) -> dict:
        """{part: fraction of the energy}."""
        return {part: (pj / self.energy_pj if self.energy_pj > 0 else 0.0) for part, pj in self.split_pj.items()}

    def to_dict(self, per_layer: bool = True) -> dict:
        data = {"energy_pj": self.energy_pj, "split_pj": dict(self.split_pj), "shares": self.shares,
                "edp_pj_us": self.edp_pj_us, "arrays": self.arrays, "adcs": self.adcs,
                "array_area_mm2": self.array_area_mm2, "adc_area_mm2": self.adc_area_mm2, "area_mm2": self.area_mm2,
                "baseline_energy_pj": self.baseline_energy_pj, "baseline_edp_pj_us": self.baseline_edp_pj_us,
                "baseline_area_mm2": self.baseline_area_mm2, "energy_ratio": self.energy_ratio,
                "edp_ratio": self.edp_ratio, "area_ratio": self.area_ratio}
        if per_layer:
            data["per_layer"] = [layer.to_dict() for layer in self.per_layer]
        return data


def energy_totals(per_layer: Sequence[LayerEnergy]) -> tuple[float, float]:
    """(energy pJ, area mm²) summed over the layers in order."""
    return float(sum(layer.energy_pj for layer in per_layer)), float(sum(layer.area_um2 for layer in per_layer)) * 1e-6


def price_energy(per_layer: Sequence[LayerEnergy], latency_us: float, baseline: Totals) -> EnergyCost:
    """The policy's EnergyCost from its layers, its total latency and the baseline's totals."""
    energy_pj, area_mm2 = energy_totals(per_layer)
    mine = Totals(latency_us, energy_pj, area_mm2)
    split = {part: float(sum(getattr(layer, f"{part}_pj") for layer in per_layer)) for part in ENERGY_PARTS}
    return EnergyCost(
        energy_pj=energy_pj, split_pj=split, edp_pj_us=mine.value("edp"),
        arrays=sum(layer.arrays for layer in per_layer), adcs=sum(layer.adcs for layer in per_layer),
        array_area_mm2=float(sum(layer.array_area_um2 for layer in per_layer)) * 1e-6,
        adc_area_mm2=float(sum(layer.adc_area_um2 for layer in per_layer)) * 1e-6, area_mm2=area_mm2,
        baseline_energy_pj=baseline.energy_pj, baseline_edp_pj_us=baseline.value("edp"),
        baseline_area_mm2=baseline.area_mm2, energy_ratio=mine.ratio("energy", baseline),
        edp_ratio=mine.ratio("edp", baseline), area_ratio=mine.ratio("area", baseline),
        per_layer=list(per_layer))
