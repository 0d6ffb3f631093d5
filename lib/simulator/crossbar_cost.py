"""Cost of one layer on the crossbar at given bit widths: CIM-AQ's published model, counted from
the layer's `CrossbarPlan` (lib.cim.crossbar), the same description the CIM layers simulate.

    S = slices of the plan (CIM-AQ: ceil(w_bit / cell_bits)); cols = m·S; rows = n
    offset: cols += 1    differential-column: cols ·= 2    differential-row: rows ·= 2
    tiles = col_tiles · row_tiles (CIM-AQ: ceil(cols / C) · ceil(rows / R))
    executes = I · tiles · ceil(a_bit / input_bits)
    latency = repeat · (tiles · t_write + executes · t_exec)

The hardware's `row_tiling`, `weight_slicing` and `column_placement` choose between the faithful
counts (whole-channel row tiles, magnitude slices, whole differential pairs) and CIM-AQ's
(what a CIM-AQ-layout YAML means). All counts are exact integers; the latency (µs) is evaluated
in the same order as CIM-AQ so the tables agree bit for bit. adc_latency_model='sar' adds
adc_bits · adc_cycle_latency µs (one SAR cycle per bit) to every execute.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

from lib.cim.crossbar import CrossbarPlan
from lib.cim.hardware import ROW_TILINGS, HardwareConfig
from lib.simulator.layer_dims import LayerDims
from lib.errors import UserError



class CostError(UserError, ValueError):
    """Bit widths or options the cost model cannot evaluate."""


@dataclass(frozen=True)
class LayerCost:
    """One layer's crossbar footprint and latency at (w_bit, a_bit, adc_bits).

    columns/rows: physical columns/rows one matrix copy needs after slicing and sign mapping.
    tiles: arrays per matrix copy; arrays = repeat · tiles (all copies, e.g. heads or groups).
    executes: array activations per image = repeat · I · tiles · input_cycles.
    adc_conversions: ADC reads per image = repeat · I · input_cycles · row_tiles · adc_columns,
        where adc_columns = m·S read-out columns per row-tile (a differential pair is read as one
        difference) plus offset mapping's reference column.
    write_latency / execute_latency: the two parts of `latency` (µs).
    """

    name: str
    w_bit: int
    a_bit: int
    adc_bits: int
    slices: int
    columns: int
    rows: int
    col_tiles: int
    row_tiles: int
    tiles: int
    arrays: int
    input_cycles: int
    executes: int
    adc_columns: int
    adc_conversions: int
    write_latency: float
    execute_latency: float
    latency: float

    def to_dict(self) -> dict:
        return asdict(self)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def check_bits(name: str, key: str, value) -> int:
    """`value` as an integer >= 1, or a CostError naming the layer, the key and the value."""
    if not isinstance(value, int) or isinstance(value, bool):
        try:
            if int(value) != value:
                raise ValueError
            value = int(value)
        except (TypeError, ValueError):
            raise CostError(f"{name}: {key}={value!r} is not allowed: expected an integer >= 1") from None
    if value < 1:
        raise CostError(f"{name}: {key}={value} is not allowed: expected an integer >= 1")
    return value


def execute_time(hw: HardwareConfig, adc_bits: int) -> float:
    """µs per array execute: the fixed execute latency, plus SAR conversion time if modelled."""
    if hw.adc_latency_model == "sar":
        return hw.execute_latency + adc_bits * hw.adc_cycle_latency
    return hw.execute_latency


def plan_for(dims: LayerDims, hw: HardwareConfig, w_bit: int, a_bit: int) -> CrossbarPlan:
    """The crossbar plan of one matrix copy of `dims` (a conv of unknown kernel tiles its rows densely)."""
    kernel = dims.kernel_elems if dims.type == "Conv2D" else 1
    if kernel is not None and dims.n % kernel:
        kernel = None
    in_channels = dims.n // kernel if kernel is not None else dims.n
    return CrossbarPlan(hw, 1, in_channels, dims.m, kernel, w_bit, a_bit)


def layer_cost(dims: LayerDims, hw: HardwareConfig, w_bit: int, a_bit: int,
               adc_bits: Optional[int] = None, row_tiling: Optional[str] = None) -> LayerCost:
    """Footprint, operation counts and latency of `dims` on `hw` at the given bit widths
    (`row_tiling`, if given, overrides the hardware's)."""
    if row_tiling is not None:
        if row_tiling not in ROW_TILINGS:
            raise CostError(f"row_tiling={row_tiling!r} is not allowed: expected one of {list(ROW_TILINGS)}")
        hw = hw.with_overrides(row_tiling=row_tiling)
    w_bit = check_bits(dims.name, "w_bit", w_bit)
    a_bit = check_bits(dims.name, "a_bit", a_bit)
    adc_bits = hw.adc_bits if adc_bits is None else check_bits(dims.name, "adc_bits", adc_bits)

    plan = plan_for(dims, hw, w_bit, a_bit)
    col_tiles, row_tiles = plan.col_tiles, plan.row_tiles
    tiles = col_tiles * row_tiles
    cycles = plan.input_cycles
    executes_per_copy = dims.invocations * tiles * cycles
    t_exec = execute_time(hw, adc_bits)
    latency = dims.repeat * (tiles * hw.write_latency + executes_per_copy * t_exec)
    return LayerCost(
        name=dims.name, w_bit=w_bit, a_bit=a_bit, adc_bits=adc_bits, slices=plan.slices,
        columns=plan.columns, rows=plan.rows, col_tiles=col_tiles, row_tiles=row_tiles, tiles=tiles,
        arrays=dims.repeat * tiles, input_cycles=cycles, executes=dims.repeat * executes_per_copy,
        adc_columns=plan.readout_columns,
        adc_conversions=dims.repeat * dims.invocations * plan.adc_conversions,
        write_latency=dims.repeat * tiles * hw.write_latency,
        execute_latency=dims.repeat * executes_per_copy * t_exec,
        latency=latency)
