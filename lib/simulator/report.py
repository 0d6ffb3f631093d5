"""Plain-text reports of a cost model: the per-layer dims/latency/energy table and a policy's breakdown."""
from __future__ import annotations

from typing import Optional

from lib.cim.hardware import HardwareConfig
from lib.simulator.cost_model import CostModel, PolicyCost
from lib.simulator.policy_energy import EnergyCost


def describe_hardware(hw: HardwareConfig) -> str:
    text = (f"{hw.rows}x{hw.cols} arrays (rows x cols), {hw.cell_bits}-bit cells, {hw.input_bits}-bit inputs, "
            f"{hw.mapping}, write {hw.write_latency:g} µs, execute {hw.execute_latency:g} µs")
    if hw.adc_latency_model == "sar":
        text += f", SAR ADC {hw.adc_bits} bits x {hw.adc_cycle_latency:g} µs"
    text += (f"; {hw.row_tiling} row tiling, {hw.weight_slicing} weight slicing, {hw.column_placement} "
             f"column placement, {hw.input_mode} inputs in the layers")
    energy = hw.energy
    if energy is None:
        text += "; no energy model (energy and area unavailable)"
    else:
        text += (f"; energy: {energy.adc_energy_pj.model} ADC {energy.adc_energy_pj.at(hw.adc_bits):.3g} pJ at "
                 f"{hw.adc_bits} bits, {energy.adc_share} columns per ADC, DAC {energy.dac_pj:g} pJ, array read "
                 f"{energy.array_read_pj:g} pJ, shift-add {energy.shift_add_pj:g} pJ, writes "
                 f"{'per inference' if energy.write_per_inference else 'once'}")
    return text


def _nj(value_pj: float) -> str:
    return f"{value_pj / 1e3:.3f}"


def format_energy_totals(energy: Optional[EnergyCost]) -> str:
    """One line: energy with its split, EDP and area (or why there is none)."""
    if energy is None:
        return "energy: unavailable (the hardware has no `energy` section)"
    split = ", ".join(f"{part} {100 * share:.1f}%" for part, share in energy.shares.items())
    return (f"energy: {energy.energy_pj / 1e6:.4f} µJ ({split}) | EDP {energy.edp_pj_us / 1e12:.4g} µJ·s | "
            f"area {energy.area_mm2:.4f} mm² (arrays {energy.array_area_mm2:.4f}, {energy.adcs} ADCs "
            f"{energy.adc_area_mm2:.4f})")


def format_layer_report(model: CostModel, w_bit: int, a_bit: int) -> str:
    """One line per layer: name, type, m, n, I, repeat, tiles, latency (and energy) at uniform w_bit/a_bit."""
    cost = model.uniform_cost(w_bit, a_bit)
    energy = cost.energy
    lines = [f"{'#':>3}  {'name':<32} {'type':<6} {'m':>6} {'n':>6} {'I':>7} {'rep':>4} {'tiles':>6} "
             f"{f'latency@{w_bit}/{a_bit} (µs)':>20}" + (f" {'energy (nJ)':>12} {'ADC share':>9}" if energy else "")]
    for i, (dims, c) in enumerate(zip(model.layer_dims, cost.per_layer)):
        flag = "" if dims.quantizable else " *"
        line = (f"{i:>3}  {dims.name + flag:<32} {dims.type:<6} {dims.m:>6} {dims.n:>6} {dims.invocations:>7} "
                f"{dims.repeat:>4} {c.tiles:>6} {c.latency:>20.3f}")
        if energy:
            layer = energy.per_layer[i]
            share = layer.adc_pj / layer.energy_pj if layer.energy_pj else 0.0
            line += f" {_nj(layer.energy_pj):>12} {100 * share:>8.1f}%"
        lines.append(line)
    lines.append(f"total @{w_bit}/{a_bit}: {cost.total_latency:.3f} µs | arrays {cost.arrays} | "
                 f"executes {cost.executes} | ADC conversions {cost.adc_conversions}")
    lines.append(format_energy_totals(energy))
    if any(not d.quantizable for d in model.layer_dims):
        lines.append("(* attention-only entry, not a Conv2d/Linear module)")
    return "\n".join(lines)


def format_policy_report(cost: PolicyCost) -> str:
    """One line per layer of a policy's breakdown, then totals and the ratios to the baseline."""
    bw, ba = cost.baseline_bits
    energy = cost.energy
    lines = [f"{'#':>3}  {'name':<32} {'w':>2} {'a':>2} {'adc':>3} {'tiles':>6} {'arrays':>6} "
             f"{'executes':>10} {'ADC conv':>12} {'latency (µs)':>16}" + (f" {'energy (nJ)':>12}" if energy else "")]
    for i, c in enumerate(cost.per_layer):
        line = (f"{i:>3}  {c.name:<32} {c.w_bit:>2} {c.a_bit:>2} {c.adc_bits:>3} {c.tiles:>6} {c.arrays:>6} "
                f"{c.executes:>10} {c.adc_conversions:>12} {c.latency:>16.3f}")
        if energy:
            line += f" {_nj(energy.per_layer[i].energy_pj):>12}"
        lines.append(line)
    lines.append(f"total: {cost.total_latency:.3f} µs | baseline {bw}/{ba}: {cost.baseline_latency:.3f} µs | "
                 f"ratio {cost.ratio:.6f} | arrays {cost.arrays} | executes {cost.executes} | "
                 f"ADC conversions {cost.adc_conversions}")
    lines.append(format_energy_totals(energy))
    ratios = ", ".join(f"{name} {'unavailable' if value is None else f'{value:.6f}'}"
                       for name, value in cost.ratios.items())
    lines.append(f"ratios vs uniform {bw}/{ba} (ADC at the hardware's bits): {ratios}")
    return "\n".join(lines)
