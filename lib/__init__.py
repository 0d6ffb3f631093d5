"""cim-aq library: crossbar-faithful quantization, cost model, search and training helpers."""
