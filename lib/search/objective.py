"""What a search optimises and budgets, checked against the cost model before any training, and the
cost fields every episode record and output carries."""
from __future__ import annotations

from lib.cim.energy_config import EnergyConfigError
from lib.objectives import ENERGY_OBJECTIVES
from lib.search.config import SearchConfig, SearchConfigError
from lib.search.space import BitSpace
from lib.simulator import CostModel, PolicyCost

# Cost keys of episode records, the best policy and reports, beside the latency_ratio they always had.
COST_KEYS = ("objective", "objective_ratio", "energy_ratio", "edp_ratio", "area_ratio", "latency_us", "energy_pj",
             "edp_pj_us", "area_mm2", "energy_split_pj")


def check_objectives(config: SearchConfig, cost_model: CostModel, space: BitSpace, hw_source: str) -> None:
    """Refuse an objective or budget that needs energy the hardware lacks, or searched ADC bits it cannot price."""
    needs = [name for name in (config.objective, *config.budgets) if name in ENERGY_OBJECTIVES]
    if needs and not cost_model.energy_available:
        raise SearchConfigError(f"objective/budget {sorted(set(needs))} needs the hardware's `energy` section "
                                f"(per-operation energy and area) but {hw_source} has none; add one (see "
                                f"run/hardware/default.yaml) or search latency")
    energy = cost_model.hw.energy
    if energy is not None and space.adc_bits is not None:
        for bits in space.adc_bits:
            try:
                energy.check_adc_bits(bits, "searched ADC bits")
            except EnergyConfigError as err:
                raise SearchConfigError(f"{err}; narrow min_adc_bit..max_adc_bit to the table") from None


def cost_fields(cost: PolicyCost, objective: str) -> dict:
    """The COST_KEYS of one priced policy (energy keys None without an energy model)."""
    summary = cost.summary()
    return {"objective": objective, "objective_ratio": cost.ratio_of(objective),
            **{key: summary[key] for key in COST_KEYS[2:]}}
