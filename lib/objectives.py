"""The cost objectives' names: one table read by the cost model, the search and the workflow config."""
from __future__ import annotations

# latency (CIM-AQ's), energy, energy-delay product, area; each priced against uniform 8-bit.
OBJECTIVES = ("latency", "energy", "edp", "area")
# the ones that need the hardware's `energy` section
ENERGY_OBJECTIVES = ("energy", "edp", "area")
