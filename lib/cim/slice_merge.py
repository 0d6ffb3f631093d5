"""The backward of a conv's crossbar + ADC node with its cell slices merged wherever the ADC
clipped nothing.

The gradient of partial sum c = (group, tile, slice, out) is γ_c·g_out where the ADC's rounded
level lies on its grid and 0 where it clipped (g: the output gradient, γ_c = weight step ·
2^(s·c)). Every slice of a tile reads the same input, so wherever nothing was clipped the slices'
input-gradient products add up to one product with the merged weight Σ_s γ·slice_s: the dense
conv of the output gradient, 1/slices of the grouped conv's work, and no full-size partial-sum
gradient to write and read back. The weight gradient is likewise one dense product scaled per
(tile, out). The ADC usually clips few columns over a batch (none at 8 bits in the benchmarks'
networks), so the columns that did clip are corrected with a small grouped product over them alone:
the part of the gradient their clipping removed, subtracted. A layer whose ADC clips more columns
than `MAX_CLIPPED_SHARE` of an array's takes the full grouped backward.

The gradients are those of the full backward up to float32 summation order (a test compares them).
"""
from __future__ import annotations

from typing import Optional

import torch

from lib.cim.tile_products import ConvTiles

MAX_CLIPPED_SHARE = 0.25  # most clipped columns per array, as a share of its columns, for the merged backward
SPARSE_SHARE = 16  # clipped entries corrected one by one while under 1/16 of the slotted product's rows·slots


class MergedSlices:
    """A conv crossbar node's weights for the merged backward, made once per backward call: the
    merged weight Σ_s γ·slice_s per (group, out, tile) and the weight gradient's per-(tile, out)
    scale Σ_s share_s·γ."""

    def __init__(self, tiles: ConvTiles, cells: torch.Tensor, gamma: torch.Tensor, shares: torch.Tensor,
                 dtype: torch.dtype) -> None:
        lay = tiles.layout
        kh, kw = tiles.kernel_size
        self.tiles, self.slices = tiles, shares.numel()
        self.cells = cells  # (arrays·slices·out, channels_per_tile, k_h, k_w), ordered (group, tile, slice, out)
        self.gamma = gamma
        self.shares = shares
        by_slice = gamma.reshape(lay.groups, lay.tiles, self.slices, lay.out_channels_per_group)
        cell_values = cells.reshape(by_slice.shape + (-1,)).to(dtype)
        merged = (cell_values * by_slice.unsqueeze(-1)).sum(dim=2)  # (groups, tiles, out, rows per tile)
        self.weight = merged.permute(0, 2, 1, 3).reshape(
            lay.groups * lay.out_channels_per_group, lay.padded_channels, kh, kw)
        self.scale = (by_slice * shares.view(1, 1, -1, 1)).sum(dim=2).permute(0, 2, 1)  # (groups, out, tiles)

    @classmethod
    def for_node(cls, tiles, cells: torch.Tensor, gamma: torch.Tensor, shares: torch.Tensor,
                 x: torch.Tensor, dtype: torch.dtype) -> Optional["MergedSlices"]:
        """The merged weights of a node, or None where the merged backward does not apply: a linear
        layer's tiles, or gradient products in another dtype than the input's (bfloat16)."""
        if not isinstance(tiles, ConvTiles) or not x.is_floating_point() or dtype != x.dtype:
            return None
        return cls(tiles, cells, gamma, shares, dtype)

    def backward(self, grad_y: torch.Tensor, x: torch.Tensor, main: torch.Tensor, step: torch.Tensor,
                 lo: int, hi: int, sum_v: torch.Tensor, q_shape: torch.Size, need_x: bool,
                 need_q: bool) -> Optional[tuple]:
        """(grad of the tiled input x, grad of q, Σ_m grad·v·on_grid) from the output gradient
        grad_y (M, groups, out), the partial sums `main` (M, groups, tiles·slices, out) with their
        ADC `step` and grid [lo, hi], and `KERNELS.clip_sums`' Σ_m grad·v·on_grid, +inf in the
        columns that clipped (made exact here); None when too many columns clipped."""
        lay = self.tiles.layout
        columns = self.slices * lay.out_channels_per_group
        dirty = torch.isfinite(sum_v).logical_not_().reshape(-1).nonzero().squeeze(1)
        per_array = torch.bincount(dirty // columns, minlength=self.tiles.arrays)
        most = int(per_array.max()) if dirty.numel() else 0
        if most > MAX_CLIPPED_SHARE * columns:
            return None
        mask = [need_x, need_q, False]
        grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
            self._as_image(grad_y, x), x, self.weight, None, *self._conv_args(), lay.groups, mask)
        if need_q:  # (groups, out, tiles, rows per tile), in q's units
            grad_w = grad_w.reshape(lay.groups, lay.out_channels_per_group, lay.tiles, -1).mul_(self.scale.unsqueeze(-1))
        if most:
            sum_v = sum_v.clone()
            clipped = _Clipped(self, grad_y, main, step, lo, hi, dirty, sum_v)
            if clipped.entries.shape[0] * SPARSE_SHARE <= main.shape[0] * self.tiles.arrays * most:
                self._subtract_entries(grad_x, grad_w, x, clipped)
            else:
                self._subtract_columns(grad_x, grad_w, x, clipped, per_array, most)
        if need_q:
            grad_w = grad_w.reshape(lay.groups, lay.out_channels_per_group, lay.padded_channels, -1)
            grad_w = grad_w[:, :, :lay.in_channels_per_group].reshape(q_shape)
        return grad_x, grad_w, sum_v

    def _subtract_columns(self, grad_x, grad_w, x, clipped: "_Clipped", per_array: torch.Tensor, most: int) -> None:
        """Take from the merged gradients what the clipped partial sums contributed to them: one
        grouped product over `most` column slots per array (unused slots zero)."""
        dirty = clipped.dirty
        first = torch.cumsum(per_array, 0) - per_array
        slot = clipped.array * most + torch.arange(dirty.numel(), device=dirty.device) - first[clipped.array]
        rows = clipped.removed.shape[0]
        slots = clipped.removed.new_zeros(rows, self.tiles.arrays * most).index_copy_(1, slot, clipped.removed)
        weight = x.new_zeros((self.tiles.arrays * most,) + tuple(self.cells.shape[1:]))
        weight.index_copy_(0, slot, self.cells.index_select(0, dirty).to(x.dtype))
        need_x, need_q = grad_x is not None, grad_w is not None
        gx, gw, _ = torch.ops.aten.convolution_backward(
            self._as_image(slots, x), x, weight, None, *self._conv_args(), self.tiles.arrays, [need_x, need_q, False])
        if need_x:
            grad_x.sub_(gx)
        if need_q:
            self._subtract_weight_grad(grad_w, clipped, gw.index_select(0, slot).reshape(dirty.numel(), -1))

    def _subtract_entries(self, grad_x, grad_w, x, clipped: "_Clipped") -> None:
        """`_subtract_columns` entry by entry, for a few clipped partial sums: each one's gradient
        times its column's cells, scattered into the input patch it read (and that patch, into
        the column's weight gradient)."""
        tiles = self.tiles
        per_tile = tiles.layout.channels_per_tile
        kh, kw = tiles.kernel_size
        row, column = clipped.entries.unbind(1)
        _, h_out, w_out = tiles.output_size(x)
        image, oy, ox = row // (h_out * w_out), (row // w_out) % h_out, row % w_out
        iy = (oy * tiles.stride[0] - tiles.padding[0]).unsqueeze(1) + \
            torch.arange(kh, device=row.device) * tiles.dilation[0]  # (E, kh)
        ix = (ox * tiles.stride[1] - tiles.padding[1]).unsqueeze(1) + \
            torch.arange(kw, device=row.device) * tiles.dilation[1]  # (E, kw)
        inside = ((iy >= 0) & (iy < x.shape[2])).unsqueeze(2) & ((ix >= 0) & (ix < x.shape[3])).unsqueeze(1)
        entry, ky, kx = inside.nonzero(as_tuple=True)  # every (entry, kernel position) inside the input
        channels = (clipped.array[column[entry]] * per_tile).unsqueeze(1) + torch.arange(per_tile, device=row.device)
        at = (image[entry].unsqueeze(1), channels, iy[entry, ky].unsqueeze(1), ix[entry, kx].unsqueeze(1))
        value = clipped.removed[row, column][entry].unsqueeze(1)  # (V, 1)
        if grad_x is not None:
            cells = self.cells.index_select(0, clipped.dirty).to(x.dtype)  # (D, per_tile, kh, kw)
            grad_x.index_put_(at, -value * cells[column[entry], :, ky, kx], accumulate=True)
        if grad_w is not None:
            gw = x.new_zeros((clipped.dirty.numel(), per_tile, kh, kw))
            gw.index_put_((column[entry].unsqueeze(1), torch.arange(per_tile, device=row.device), ky.unsqueeze(1),
                           kx.unsqueeze(1)), value * x[at], accumulate=True)
            self._subtract_weight_grad(grad_w, clipped, gw.reshape(clipped.dirty.numel(), -1))

    def _subtract_weight_grad(self, grad_w, clipped: "_Clipped", per_column: torch.Tensor) -> None:
        """Subtract each clipped column's Σ_m removed·x (per_column, (D, rows per tile)), times its
        slice's share, from q's gradient (groups, out, tiles, rows per tile) at its (group, out, tile)."""
        lay = self.tiles.layout
        out = lay.out_channels_per_group
        dirty = clipped.dirty
        share = self.shares[(dirty // out) % self.slices]
        target = clipped.output * lay.tiles + clipped.array % lay.tiles
        grad_w.view(-1, grad_w.shape[-1]).index_add_(0, target, per_column * share.unsqueeze(1), alpha=-1)

    def _as_image(self, values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Rows (N·H_out·W_out, ...) → an (N, C, H_out, W_out) view, channels last in memory."""
        n, h, w = self.tiles.output_size(x)
        return values.reshape(n, h, w, -1).permute(0, 3, 1, 2)

    def _conv_args(self) -> tuple:
        tiles = self.tiles
        return list(tiles.stride), list(tiles.padding), list(tiles.dilation), False, [0, 0]


class _Clipped:
    """The clipped partial sums of a merged backward's `dirty` columns (flat (group, tile, slice,
    out) indices, ascending): the gradient their clipping removed (rows, D), its nonzero entries
    (E, 2: row, column), each column's array and (group, out) output channel; makes the columns'
    Σ_m grad·v·on_grid in `sum_v` exact on the way."""

    def __init__(self, merged: MergedSlices, grad_y, main, step, lo: int, hi: int, dirty: torch.Tensor,
                 sum_v: torch.Tensor) -> None:
        lay = merged.tiles.layout
        out = lay.out_channels_per_group
        columns = merged.slices * out
        rows = main.shape[0]
        self.dirty = dirty
        self.array = dirty // columns
        self.output = (dirty // (lay.tiles * columns)) * out + dirty % out
        v = main.reshape(rows, -1).index_select(1, dirty) / step.expand(main.shape[1:]).reshape(-1)[dirty]
        rounded = torch.round(v)
        off = (rounded < lo) | (rounded > hi)
        grad = grad_y.reshape(rows, -1).index_select(1, self.output)
        sum_v.view(-1)[dirty] = (v * grad).masked_fill_(off, 0.0).sum(dim=0)
        self.removed = (grad * merged.gamma.expand(main.shape[1:]).reshape(-1)[dirty]).mul_(off)
        self.entries = off.nonzero()
