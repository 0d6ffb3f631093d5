"""Plain-text reports of a cost model: the per-layer dims/latency table and a policy's breakdown."""
from __future__ import annotations

from lib.cim.hardware import HardwareConfig
from lib.simulator.cost_model import CostModel, PolicyCost


def describe_hardware(hw: HardwareConfig) -> str:
    text = (f"{hw.rows}x{hw.cols} arrays (rows x cols), {hw.cell_bits}-bit cells, {hw.input_bits}-bit inputs, "
            f"{hw.mapping}, write {hw.write_latency:g} µs, execute {hw.execute_latency:g} µs")
    if hw.adc_latency_model == "sar":
        text += f", SAR ADC {hw.adc_bits} bits x {hw.adc_cycle_latency:g} µs"
    text += (f"; {hw.row_tiling} row tiling, {hw.weight_slicing} weight slicing, {hw.column_placement} "
             f"column placement, {hw.input_mode} inputs in the layers")
    return text


def format_layer_report(model: CostModel, w_bit: int, a_bit: int) -> str:
    """One line per layer: name, type, m, n, I, repeat, tiles and latency at uniform w_bit/a_bit."""
    cost = model.uniform_cost(w_bit, a_bit)
    lines = [f"{'#':>3}  {'name':<32} {'type':<6} {'m':>6} {'n':>6} {'I':>7} {'rep':>4} {'tiles':>6} "
             f"{f'latency@{w_bit}/{a_bit} (µs)':>20}"]
    for i, (dims, c) in enumerate(zip(model.layer_dims, cost.per_layer)):
        flag = "" if dims.quantizable else " *"
        lines.append(f"{i:>3}  {dims.name + flag:<32} {dims.type:<6} {dims.m:>6} {dims.n:>6} {dims.invocations:>7} "
                     f"{dims.repeat:>4} {c.tiles:>6} {c.latency:>20.3f}")
    lines.append(f"total @{w_bit}/{a_bit}: {cost.total_latency:.3f} µs | arrays {cost.arrays} | "
                 f"executes {cost.executes} | ADC conversions {cost.adc_conversions}")
    if any(not d.quantizable for d in model.layer_dims):
        lines.append("(* attention-only entry, not a Conv2d/Linear module)")
    return "\n".join(lines)


def format_policy_report(cost: PolicyCost) -> str:
    """One line per layer of a policy's breakdown, then totals and the ratio to the baseline."""
    bw, ba = cost.baseline_bits
    lines = [f"{'#':>3}  {'name':<32} {'w':>2} {'a':>2} {'adc':>3} {'tiles':>6} {'arrays':>6} "
             f"{'executes':>10} {'ADC conv':>12} {'latency (µs)':>16}"]
    for i, c in enumerate(cost.per_layer):
        lines.append(f"{i:>3}  {c.name:<32} {c.w_bit:>2} {c.a_bit:>2} {c.adc_bits:>3} {c.tiles:>6} {c.arrays:>6} "
                     f"{c.executes:>10} {c.adc_conversions:>12} {c.latency:>16.3f}")
    lines.append(f"total: {cost.total_latency:.3f} µs | baseline {bw}/{ba}: {cost.baseline_latency:.3f} µs | "
                 f"ratio {cost.ratio:.6f} | arrays {cost.arrays} | executes {cost.executes} | "
                 f"ADC conversions {cost.adc_conversions}")
    return "\n".join(lines)
