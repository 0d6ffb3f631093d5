"""How one layer's weight matrix lands on crossbar arrays: row tiling, sign mapping, bit slicing.

The unrolled matrix of each group has one column per output channel and one row per input
element (C_in/g · k_h · k_w). Rows are cut into row-tiles that hold whole input channels;
a b-bit integer weight is stored in S = ceil(b / cell_bits) cells of cell_bits each.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lib.cim.hardware import HardwareConfig


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


def num_slices(bits: int, cell_bits: int) -> int:
    return -(-int(bits) // int(cell_bits))


def stored_slices(q: torch.Tensor, bits: int, cell_bits: int, mapping: str) -> torch.Tensor:
    """Integer cell values of the signed integer weights `q`, stacked on a new leading dim S.

    offset: u = q + 2^(b-1) stored unsigned, slices in [0, 2^c - 1].
    differential (column or row): slice s of |q| with q's sign, i.e. slice(q⁺) - slice(q⁻),
    in [-(2^c - 1), 2^c - 1] — the pair's difference that the ADC reads.
    Either way Σ_s 2^(s·c) · slice_s recombines u (offset) or q (differential) exactly.
    """
    slices = num_slices(bits, cell_bits)
    ints = torch.round(q).to(torch.int32)
    shifts = (cell_bits * torch.arange(slices, device=q.device, dtype=torch.int32)).view((slices,) + (1,) * q.dim())
    mask = 2 ** cell_bits - 1
    if mapping == "offset":
        return torch.bitwise_and(torch.bitwise_right_shift(ints + 2 ** (bits - 1), shifts), mask).to(q.dtype)
    digits = torch.bitwise_and(torch.bitwise_right_shift(ints.abs(), shifts), mask)
    return (digits * torch.sign(ints)).to(q.dtype)


def slice_significance(bits: int, cell_bits: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """2^(s·cell_bits) for every slice s."""
    slices = num_slices(bits, cell_bits)
    return (2.0 ** (cell_bits * torch.arange(slices, device=device, dtype=dtype)))


def offset_reference(bits: int, cell_bits: int) -> tuple[int, float]:
    """The offset mapping's reference column stores 2^(b-1): its one non-zero slice and that cell's value."""
    slice_index = (bits - 1) // cell_bits
    cell_value = 2.0 ** ((bits - 1) % cell_bits)
    return slice_index, cell_value
