"""CIM cost model: layer dims traced from a model (or CIM-AQ YAML), latency tables, policy costs
(latency, and energy / EDP / area where the hardware has an energy section).

Entry point for the search and finetune stages: `CostModel` (see cost_model.py).
CLI: `python -m lib.simulator.latency --help`.
"""
from lib.simulator.cost_model import CostModel, PolicyCost, adc_latency_table, latency_table
from lib.simulator.crossbar_cost import CostError, LayerCost, layer_cost
from lib.simulator.dims_yaml import parse_dim, read_layer_dims, write_layer_dims
from lib.simulator.layer_dims import LayerDims, LayerDimsError, quantizable_names, trace_layer_dims
from lib.simulator.layer_energy import ENERGY_PARTS, LayerEnergy, layer_energy
from lib.simulator.objectives import OBJECTIVES, Totals, check_objective
from lib.simulator.policy_energy import EnergyCost

__all__ = [
    "CostModel", "PolicyCost", "latency_table", "adc_latency_table",
    "CostError", "LayerCost", "layer_cost",
    "parse_dim", "read_layer_dims", "write_layer_dims",
    "LayerDims", "LayerDimsError", "quantizable_names", "trace_layer_dims",
    "ENERGY_PARTS", "LayerEnergy", "layer_energy", "OBJECTIVES", "Totals", "check_objective", "EnergyCost",
]
