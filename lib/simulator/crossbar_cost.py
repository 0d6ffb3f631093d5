"""Cost of one layer on the crossbar at given bit widths (DESIGN.md §3, CIM-AQ's published model).

    S = ceil(w_bit / cell_bits); cols = m·S; rows = n
    offset: cols += 1    differential-column: cols ·= 2    differential-row: rows ·= 2
    tiles = ceil(cols / C) · ceil(rows / R)
    executes = I · tiles · ceil(a_bit / input_bits)
    latency = repeat · (tiles · t_write + executes · t_exec)

All counts are exact integers; the latency (µs) is evaluated in the same order as CIM-AQ so
the tables agree bit for bit. Two optional extensions, both off by default:
- adc_latency_model='sar': every execute also spends adc_bits · adc_cycle_latency µs (one SAR
  cycle per bit), so t_exec becomes t_exec + adc_bits · adc_cycle_latency.
- row_tiling='channel': row-tiles hold whole input channels, floor(R_eff / (k_h·k_w)) per tile
  (R_eff = R, or R // 2 for differential-row), as lib.cim's TileLayout tiles the QAT layer
  (a conv can need one more tile than ceil(rows / R)).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

from lib.cim.hardware import HardwareConfig
from lib.simulator.layer_dims import LayerDims
from lib.errors import UserError

ROW_TILINGS = ("dense", "channel")


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
        difference, DESIGN §2) plus offset mapping's reference column.
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


def _check_bits(name: str, key: str, value) -> int:
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


def _row_tiles(dims: LayerDims, hw: HardwareConfig, rows: int, row_tiling: str) -> int:
    """ceil(rows / R) ('dense'), or whole input channels per tile like lib.cim's TileLayout ('channel').

    In 'channel' mode a Linear/MatMul row is one channel; a conv of unknown kernel (read from
    YAML) falls back to 'dense'.
    """
    kernel = dims.kernel_elems if dims.type == "Conv2D" else 1
    if row_tiling == "channel" and kernel is not None:
        hw.check_kernel_fits(kernel, dims.name)
        channels_per_tile = hw.effective_rows // kernel
        return _ceil_div(dims.n // kernel, channels_per_tile)
    return _ceil_div(rows, hw.rows)


def layer_cost(dims: LayerDims, hw: HardwareConfig, w_bit: int, a_bit: int,
               adc_bits: Optional[int] = None, row_tiling: str = "dense") -> LayerCost:
    """Footprint, operation counts and latency of `dims` on `hw` at the given bit widths."""
    if row_tiling not in ROW_TILINGS:
        raise CostError(f"row_tiling={row_tiling!r} is not allowed: expected one of {list(ROW_TILINGS)}")
    w_bit = _check_bits(dims.name, "w_bit", w_bit)
    a_bit = _check_bits(dims.name, "a_bit", a_bit)
    adc_bits = hw.adc_bits if adc_bits is None else _check_bits(dims.name, "adc_bits", adc_bits)

    slices = hw.slices(w_bit)
    columns, rows = dims.m * slices, dims.n
    adc_columns = dims.m * slices
    if hw.mapping == "offset":
        columns += 1
        adc_columns += 1
    elif hw.mapping == "differential-column":
        columns *= 2
    elif hw.mapping == "differential-row":
        rows *= 2
    else:  # HardwareConfig validates the mapping; this guards a future addition
        raise CostError(f"mapping={hw.mapping!r} has no cost model")

    col_tiles = _ceil_div(columns, hw.cols)
    row_tiles = _row_tiles(dims, hw, rows, row_tiling)
    tiles = col_tiles * row_tiles
    cycles = _ceil_div(a_bit, hw.input_bits)
    executes_per_copy = dims.invocations * tiles * cycles
    t_exec = execute_time(hw, adc_bits)
    latency = dims.repeat * (tiles * hw.write_latency + executes_per_copy * t_exec)
    return LayerCost(
        name=dims.name, w_bit=w_bit, a_bit=a_bit, adc_bits=adc_bits, slices=slices,
        columns=columns, rows=rows, col_tiles=col_tiles, row_tiles=row_tiles, tiles=tiles,
        arrays=dims.repeat * tiles, input_cycles=cycles, executes=dims.repeat * executes_per_copy,
        adc_columns=adc_columns,
        adc_conversions=dims.repeat * dims.invocations * cycles * row_tiles * adc_columns,
        write_latency=dims.repeat * tiles * hw.write_latency,
        execute_latency=dims.repeat * executes_per_copy * t_exec,
        latency=latency)
