"""How one layer sits on crossbar arrays: row tiling, sign mapping, bit slicing, column placement
and input planes — computed once, as a `CrossbarPlan`, and read by the CIM layers, their export
form and the cost model alike.

The unrolled matrix of each group has one column per output channel and one row per input
element (C_in/g · k_h · k_w). Rows are cut into row-tiles that hold whole input channels.
A weight is stored in S cells of cell_bits each:
- offset: u = q + 2^(b-1) in [0, 2^b - 1], S = ceil(b / c);
- differential ('magnitude' slicing): each device of the pair holds a magnitude, q⁺ = max(q, 0)
  and q⁻ = max(-q, 0), of a narrow (symmetric) grid [-(2^(b-1)-1), 2^(b-1)-1], so magnitudes
  need b-1 bits and S = ceil((b-1) / c) (a 1-bit weight keeps the grid {-1, 0}: one slice);
- differential ('full-range' slicing, CIM-AQ's count): grid [-2^(b-1), 2^(b-1)-1], S = ceil(b / c).
Slices have binary significance (Σ 2^(s·c)·slice_s) or, with `slice_significance: equal`
(differential mappings), equal significance: each of S = ceil(max|q| / (2^c - 1)) slices holds a
near-equal share floor((|q| + s) / S) of the magnitude, and the shares simply add up (more
columns, but the devices' noise averages over the S cells).
Inputs of a_bit bits reach the array in ceil(a_bit / input_bits) planes (bit-serial DAC) or at
once (multi-bit, a fast approximation for training).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple, Optional

import torch

from lib.cim.constants import powers_of_two
from lib.cim.hardware import HardwareConfig


def _ceil_div(a: int, b: int) -> int:
    return -(-int(a) // int(b))


@dataclass(frozen=True)
class TileLayout:
    """Row tiling of one layer: `tiles` row-tiles of `channels_per_tile` input channels per group.

    For Linear, a "channel" is one input feature (kernel_elems = 1). The last tile may be ragged;
    compute pads it with zero channels up to `padded_channels`.
    """

    groups: int
    in_channels_per_group: int
    out_channels_per_group: int
    kernel_elems: int
    channels_per_tile: int
    tiles: int

    @classmethod
    def for_layer(cls, hw: HardwareConfig, groups: int, in_channels_per_group: int,
                  out_channels_per_group: int, kernel_elems: int, name: str = "layer") -> "TileLayout":
        hw.check_kernel_fits(kernel_elems, name)
        per_tile = max(1, hw.effective_rows // kernel_elems)
        per_tile = min(per_tile, in_channels_per_group)
        tiles = -(-in_channels_per_group // per_tile)
        return cls(groups, in_channels_per_group, out_channels_per_group, kernel_elems, per_tile, tiles)

    @property
    def padded_channels(self) -> int:
        return self.tiles * self.channels_per_tile

    @property
    def pad(self) -> int:
        return self.padded_channels - self.in_channels_per_group

    @property
    def rows(self) -> int:
        """Weight rows per group (K)."""
        return self.in_channels_per_group * self.kernel_elems

    def tile_of_channel(self, device=None) -> torch.Tensor:
        """Row-tile index of every input channel of a group."""
        return torch.arange(self.in_channels_per_group, device=device) // self.channels_per_tile

    def tile_rows(self) -> list[int]:
        """Weight rows held by each row-tile (the last one may be smaller)."""
        full = self.channels_per_tile * self.kernel_elems
        last = (self.in_channels_per_group - (self.tiles - 1) * self.channels_per_tile) * self.kernel_elems
        return [full] * (self.tiles - 1) + [last]


@dataclass(frozen=True)
class CrossbarPlan:
    """One layer at (w_bit, a_bit) on `hw`: what is stored where and how often it is read.

    groups / in_channels / out_channels are per group (out_channels = m, in_channels·kernel_elems = n);
    kernel_elems None means unknown (dims read from a YAML), which allows only dense row tiling.
    Counts are per group copy and per invocation (one output pixel or token).
    """

    hw: HardwareConfig
    groups: int
    in_channels: int
    out_channels: int
    kernel_elems: Optional[int]
    w_bit: int
    a_bit: int
    input_signed: bool = True

    @classmethod
    def for_layout(cls, hw: HardwareConfig, layout: TileLayout, w_bit: int, a_bit: int,
                   input_signed: bool) -> "CrossbarPlan":
        return cls(hw, layout.groups, layout.in_channels_per_group, layout.out_channels_per_group,
                   layout.kernel_elems, int(w_bit), int(a_bit), bool(input_signed))

    # ------------------------------------------------------------ weights
    @property
    def cell_bits(self) -> int:
        return self.hw.cell_bits

    @property
    def mapping(self) -> str:
        return self.hw.mapping

    @property
    def differential(self) -> bool:
        return self.hw.mapping != "offset"

    @property
    def narrow_weights(self) -> bool:
        """Whether the weight grid is symmetric (differential magnitudes; 1 bit keeps {-1, 0})."""
        return self.differential and self.hw.weight_slicing == "magnitude" and self.w_bit >= 2

    def weight_range(self) -> tuple[int, int]:
        """The integer weight grid [lo, hi]."""
        return -(2 ** (self.w_bit - 1)) + int(self.narrow_weights), 2 ** (self.w_bit - 1) - 1

    @property
    def stored_bits(self) -> int:
        """Bits one stored value spans: u for offset, |q| for differential."""
        if not self.differential:
            return self.w_bit
        return self.w_bit - 1 if self.narrow_weights else self.w_bit

    @property
    def equal_slices(self) -> bool:
        """Whether the slices have equal significance (`slice_significance: equal`)."""
        return self.hw.slice_significance == "equal"

    def _largest_stored(self) -> int:
        """The largest value slicing must hold: u (offset) or |q| (differential)."""
        lo, hi = self.weight_range()
        return hi - lo if not self.differential else max(-lo, hi)

    @property
    def slices(self) -> int:
        if self.equal_slices:
            return max(1, _ceil_div(self._largest_stored(), 2 ** self.cell_bits - 1))
        return _ceil_div(self.stored_bits, self.cell_bits)

    def significance(self, device=None, dtype=torch.float32) -> torch.Tensor:
        """2^(s·cell_bits) for every slice s (binary), or 1 for every slice (equal significance); made
        once per setting and shared: not to be changed."""
        return powers_of_two(0 if self.equal_slices else self.cell_bits, self.slices, dtype, device)

    def slice_significance(self, s: int) -> float:
        """The digital shift of slice s: 2^(s·cell_bits), or 1 with equal significance (also the
        offset reference column's slice)."""
        return 1.0 if self.equal_slices else 2.0 ** (s * self.cell_bits)

    @property
    def reference_significance(self) -> float:
        """The shift of the offset mapping's reference column (its one non-zero slice's)."""
        return self.slice_significance(self.offset_reference()[0])

    @property
    def slicing(self) -> "CellSlicing":
        """The slicing rule's parameters (see `stored_slices`)."""
        offset = 0 if self.differential else 2 ** (self.w_bit - 1)
        return CellSlicing(self.slices, self.cell_bits, offset, self.differential, self.equal_slices)

    def slice_max(self) -> list[int]:
        """The largest cell value (magnitude) slice s can hold, given the grid."""
        top = self._largest_stored()
        if self.equal_slices:
            return [min(2 ** self.cell_bits - 1, (top + s) // self.slices) for s in range(self.slices)]
        return [min(2 ** self.cell_bits - 1, top >> (self.cell_bits * s)) for s in range(self.slices)]

    def offset_reference(self) -> tuple[int, float]:
        """The offset mapping's reference column stores 2^(b-1): its one non-zero slice and that cell's value."""
        return (self.w_bit - 1) // self.cell_bits, 2.0 ** ((self.w_bit - 1) % self.cell_bits)

    # ------------------------------------------------------------ rows
    @cached_property
    def layout(self) -> TileLayout:
        """Whole-channel row tiles (what the layers simulate)."""
        if self.kernel_elems is None:
            raise ValueError("a plan of unknown kernel size has no whole-channel row tiling")
        return TileLayout.for_layer(self.hw, self.groups, self.in_channels, self.out_channels, self.kernel_elems)

    @property
    def rows(self) -> int:
        """Physical rows of one matrix copy (differential-row spends two per weight)."""
        rows = self.in_channels * (self.kernel_elems or 1)
        return 2 * rows if self.mapping == "differential-row" else rows

    @property
    def row_tiles(self) -> int:
        """Row-tiles as `hw.row_tiling` places them ('dense' packs rows regardless of channels)."""
        if self.hw.row_tiling == "channel" and self.kernel_elems is not None:
            return self.layout.tiles
        return _ceil_div(self.rows, self.hw.rows)

    # ------------------------------------------------------------ columns
    @property
    def column_width(self) -> int:
        """Physical columns per read-out column: a differential-column pair is read as one difference."""
        return 2 if self.mapping == "differential-column" else 1

    @property
    def readout_columns(self) -> int:
        """ADC read-outs per row-tile: slices·out_channels, then offset mapping's reference column."""
        return self.slices * self.out_channels + int(not self.differential)

    @property
    def columns(self) -> int:
        """Physical columns of one matrix copy."""
        return self.slices * self.out_channels * self.column_width + int(not self.differential)

    def column_tile_of(self) -> list[int]:
        """The array (column tile) of every read-out column, in order (slice, out), reference last.

        'whole-pairs' never splits a differential pair across arrays; 'dense' packs physical
        columns as CIM-AQ counts them (identical unless differential-column with an odd `cols`).
        """
        cols, width = self.hw.cols, self.column_width
        if self.hw.column_placement == "dense":
            return [(j * width) // cols for j in range(self.readout_columns)]
        per_array = cols // width
        return [j // per_array for j in range(self.readout_columns)]

    @property
    def col_tiles(self) -> int:
        if self.hw.column_placement == "dense":
            return _ceil_div(self.columns, self.hw.cols)
        return self.column_tile_of()[-1] + 1

    @property
    def tiles(self) -> int:
        """Arrays per matrix copy."""
        return self.row_tiles * self.col_tiles

    # ------------------------------------------------------------ inputs
    @property
    def input_cycles(self) -> int:
        """DAC cycles per execute: ceil(a_bit / input_bits)."""
        return _ceil_div(self.a_bit, self.hw.input_bits)

    def input_planes(self, input_mode: Optional[str] = None) -> int:
        """Input planes the layers simulate: one per DAC cycle (bit-serial) or one (multi-bit)."""
        mode = self.hw.input_mode if input_mode is None else input_mode
        return self.input_cycles if mode == "bit-serial" else 1

    def plane_significance(self, planes: int, device=None, dtype=torch.float32) -> torch.Tensor:
        """2^(p·input_bits) for every input plane p (the digital shift-and-add; made once per
        setting and shared: not to be changed)."""
        return powers_of_two(self.hw.input_bits, planes, dtype, device)

    def input_codes(self, planes: int) -> tuple[int, int]:
        """The least and largest integer an array row receives: an a_bit input level (one plane),
        or a DAC digit (see `input_digits`: lower digits unsigned, a signed input's top digit signed)."""
        if planes == 1:
            return (-(2 ** (self.a_bit - 1)), 2 ** (self.a_bit - 1) - 1) if self.input_signed else (0, 2 ** self.a_bit - 1)
        bits = self.hw.input_bits
        return (-(2 ** (bits - 1)) if self.input_signed else 0), 2 ** bits - 1

    def input_zero_point(self, planes: int) -> Optional[int]:
        """The offset that maps the array inputs into [0, 255] (0 or 128), or None when they span more than 8 bits."""
        lo, hi = self.input_codes(planes)
        for zero_point in (0, 128):
            if 0 <= lo + zero_point and hi + zero_point <= 255:
                return zero_point
        return None

    @property
    def adc_signed(self) -> bool:
        """Partial sums are non-negative only for unsigned inputs on unsigned (offset) cells."""
        return self.input_signed or self.differential

    @property
    def adc_conversions(self) -> int:
        """ADC reads per invocation of one matrix copy: cycles · row-tiles · read-out columns."""
        return self.input_cycles * self.row_tiles * self.readout_columns

    def simulated(self) -> "CrossbarPlan":
        """The plan as the layers simulate it: whole-channel row tiles, pairs never split."""
        hw = self.hw.simulated()
        return self if hw == self.hw else CrossbarPlan(hw, self.groups, self.in_channels, self.out_channels,
                                                       self.kernel_elems, self.w_bit, self.a_bit,
                                                       self.input_signed)


class CellSlicing(NamedTuple):
    """How integer weights become cell values (`CrossbarPlan.slicing`): plain ints, so a compiled
    kernel specialises on them and the rule itself stays in `cell_values`."""

    slices: int
    cell_bits: int
    offset: int  # added before slicing: 2^(b-1) for the offset mapping, 0 for differential
    differential: bool
    equal: bool = False  # equal-significance shares instead of binary digits (differential only)

    @property
    def storage_dtype(self) -> torch.dtype:
        """The narrowest integer dtype that holds every cell value: ±(2^c - 1) (differential), [0, 2^c - 1] (offset)."""
        return torch.int8 if self.cell_bits <= 7 else torch.int16


def stored_slices(q: torch.Tensor, plan: CrossbarPlan) -> torch.Tensor:
    """Integer cell values of the signed integer weights `q`, stacked on a new leading dim S.

    offset: u = q + 2^(b-1) stored unsigned, slices in [0, 2^c - 1].
    differential (column or row): slice s of |q| with q's sign, i.e. slice(q⁺) - slice(q⁻),
    in [-(2^c - 1), 2^c - 1] — the pair's difference that the ADC reads.
    Either way Σ_s 2^(s·c) · slice_s recombines u (offset) or q (differential) exactly; with equal
    significance slice s is floor((|q| + s) / S) with q's sign, and Σ_s slice_s = q exactly.
    """
    return cell_values(q, plan.slicing)


def cell_values(q: torch.Tensor, slicing: CellSlicing) -> torch.Tensor:
    """`stored_slices` from the plan's `slicing` (what the fused weight kernel calls)."""
    slices, cell_bits = slicing.slices, slicing.cell_bits
    ints = torch.round(q).to(torch.int32)
    shifts = (cell_bits * torch.arange(slices, device=q.device, dtype=torch.int32)).view((slices,) + (1,) * q.dim())
    mask = 2 ** cell_bits - 1
    if slicing.equal:  # Σ_s floor((m + s) / S) = m for every integer m >= 0 (Hermite's identity)
        parts = torch.arange(slices, device=q.device, dtype=torch.int32).view((slices,) + (1,) * q.dim())
        shares = torch.div(ints.abs() + parts, slices, rounding_mode="floor")
        return (shares * torch.sign(ints)).to(q.dtype)
    if not slicing.differential:
        return torch.bitwise_and(torch.bitwise_right_shift(ints + slicing.offset, shifts), mask).to(q.dtype)
    digits = torch.bitwise_and(torch.bitwise_right_shift(ints.abs(), shifts), mask)
    return (digits * torch.sign(ints)).to(q.dtype)


def input_digits(x_int: torch.Tensor, planes: int, input_bits: int) -> torch.Tensor:
    """The integer input split into `planes` digits of input_bits each, stacked on a new leading dim.

    Σ_p 2^(p·input_bits) · digit_p = x_int exactly. Lower digits are unsigned; the top digit is
    floor(x_int / 2^((P-1)·input_bits)), signed for a signed input (two's complement: with a
    1-bit DAC the sign bit, of significance -2^(a-1)). Only elementwise ops (ONNX-exportable).
    """
    if planes == 1:
        return x_int.unsqueeze(0)
    divisors = (2.0 ** (input_bits * torch.arange(planes, device=x_int.device, dtype=x_int.dtype)))
    floors = torch.floor(x_int.unsqueeze(0) / divisors.view((planes,) + (1,) * x_int.dim()))
    upper = torch.cat([floors[1:] * (2.0 ** input_bits), torch.zeros_like(floors[:1])], dim=0)
    return floors - upper
