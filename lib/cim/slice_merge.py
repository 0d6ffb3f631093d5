"""The backward of a crossbar + ADC node with its cell slices merged wherever the ADC clipped
nothing.

The gradient of partial sum c = (group, tile, slice, out) is γ_c·g_out where the ADC's rounded
level lies on its grid and 0 where it clipped (g: the output gradient, γ_c = weight step ·
2^(s·c)). Every slice of a tile reads the same input, so wherever nothing was clipped the slices'
input-gradient products add up to one product with the merged weight Σ_s γ·slice_s: the layer's
dense product of the output gradient, 1/slices of the grouped one's work, and no full-size
partial-sum gradient to write and read back. The weight gradient is likewise one dense product,
scaled per (tile, out). The ADC usually clips few columns over a batch (none at 8 bits in the
benchmarks' networks); what clipping removed from those columns' gradient is subtracted again,
entry by entry or with a small grouped product over them alone. A layer whose ADC clips more
columns than `MAX_CLIPPED_SHARE` of an array's takes the full backward.

The gradients are those of the full backward up to float32 summation order (a test compares them).
"""
from __future__ import annotations

from typing import Optional

import torch

from lib.cim.adc_kernels import memory_format_of, merge_slices
from lib.cim.tile_products import FLOAT_BLOCK_BYTES, ConvTiles, MatmulTiles, in_dtype, untiled_channels

MAX_CLIPPED_SHARE = 0.25  # most clipped columns per array, as a share of its columns, for the merged backward
SPARSE_SHARE = 16  # clipped entries corrected one by one while under 1/16 of the slotted product's rows·slots


class MergedSlices:
    """A crossbar node's weights for the merged backward, made once per backward call: the merged
    weight Σ_s γ·slice_s per (group, tile, out) (laid out by the subclass for its dense products)
    and the weight gradient's per-(tile, out) scale Σ_s share_s·γ. Subclasses: `ConvMerge`,
    `MatmulMerge`."""

    def __init__(self, tiles, cells: torch.Tensor, gamma: torch.Tensor, shares: torch.Tensor) -> None:
        lay = tiles.layout
        self.tiles, self.slices = tiles, shares.numel()
        self.cells = cells  # the saved array weight, as `tiles.products` reads it
        self.gamma = gamma
        self.shares = shares
        self.by_slice = gamma.reshape(lay.groups, lay.tiles, self.slices, lay.out_channels_per_group)
        self.scale = (self.by_slice * shares.view(1, 1, -1, 1)).sum(dim=2).permute(0, 2, 1)  # (groups, out, tiles)

    @staticmethod
    def for_node(tiles, cells: torch.Tensor, gamma: torch.Tensor, shares: torch.Tensor, x: torch.Tensor,
                 dtype: torch.dtype) -> Optional["MergedSlices"]:
        """The merged weights of a node whose dense products run in `dtype` (the gradient
        products', lib.cim.gradient_products), or None for an input that is not floating point."""
        if not x.is_floating_point():
            return None
        merge = ConvMerge if isinstance(tiles, ConvTiles) else MatmulMerge
        return merge(tiles, cells, gamma, shares, dtype)

    def backward(self, grad_y: torch.Tensor, tiled, main: torch.Tensor, step: torch.Tensor,
                 lo: int, hi: int, sum_v: torch.Tensor, q_shape: torch.Size, need_x: bool,
                 need_q: bool, source: Optional[torch.Tensor] = None) -> Optional[tuple]:
        """(grad of the input, grad of q, Σ_m grad·v·on_grid) from the output gradient grad_y (M,
        groups, out), the partial sums `main` (M, groups, tiles·slices, out) with their ADC `step`
        and grid [lo, hi], and `adc_kernels.clip_sums`' Σ_m grad·v·on_grid, +inf in the columns that
        clipped (made exact here); None when too many columns clipped. `tiled()` gives the tiled
        input; the input gradient is the untiled `source`'s when given (a one-group conv), else
        the tiled input's (a one-group conv with a ragged tile, see crossbar_adc_forward)."""
        lay = self.tiles.layout
        columns = self.slices * lay.out_channels_per_group
        dirty = torch.isfinite(sum_v).logical_not_().reshape(-1).nonzero().squeeze(1)
        per_array = most = None
        if dirty.numel():
            per_array = torch.bincount(dirty // columns, minlength=lay.groups * lay.tiles)
            most = int(per_array.max())
        if most is not None and most > MAX_CLIPPED_SHARE * columns:
            return None
        grad_x, grad_w = self._dense(grad_y, tiled, source, need_x, need_q)
        if need_q:  # (groups, out, tiles, rows per tile), in q's units
            grad_w = grad_w.reshape(lay.groups, lay.out_channels_per_group, lay.tiles, -1).mul_(self.scale.unsqueeze(-1))
        if most:
            sum_v = sum_v.clone()
            clipped = _Clipped(self, grad_y, main, step, lo, hi, dirty, sum_v)
            slots = main.shape[0] * lay.groups * lay.tiles * most
            if clipped.entries.shape[0] * SPARSE_SHARE <= slots:
                gw = self._subtract_entries(grad_x, source if source is not None else tiled(), clipped, per_array,
                                            most, need_q)
            else:  # a grouped product over the tiled input, its input gradient laid out alike
                x = tiled()
                removed = torch.zeros_like(x) if source is not None and grad_x is not None else grad_x
                gw = self._subtract_columns(removed, x, clipped, per_array, most, need_q)
                if removed is not grad_x:
                    grad_x.add_(untiled_channels(removed, 1, source.shape[1], memory_format_of(source)))
            if need_q:
                self._subtract_weight_grad(grad_w, clipped, gw)
        if need_q:
            grad_w = grad_w.reshape(lay.groups, lay.out_channels_per_group, lay.tiles * lay.channels_per_tile, -1)
            grad_w = grad_w[:, :, :lay.in_channels_per_group].reshape(q_shape)
        return grad_x, grad_w, sum_v

    def _dense(self, grad_y, tiled, source, need_x: bool, need_q: bool) -> tuple:
        """(grad of the input (source's when given, else the tiled input's), unscaled weight
        gradient (groups·out, tiles·rows per tile)) of the merged weight."""
        raise NotImplementedError

    def _subtract_columns(self, grad_x, x, clipped: "_Clipped", per_array, most: int, need_q: bool):
        """Take from grad_x what the clipped partial sums contributed to it, through one product
        over `most` column slots per array (unused slots zero); return each clipped column's
        Σ_m removed·x (D, rows per tile) when need_q."""
        raise NotImplementedError

    def _subtract_entries(self, grad_x, x, clipped: "_Clipped", per_array, most: int, need_q: bool):
        """`_subtract_columns` entry by entry, for a few clipped partial sums."""
        raise NotImplementedError

    @staticmethod
    def _slots(clipped: "_Clipped", per_array: torch.Tensor, most: int) -> torch.Tensor:
        """Each clipped column's slot among its array's `most`: array · most + its rank in the array."""
        first = torch.cumsum(per_array, 0) - per_array
        rank = torch.arange(clipped.dirty.numel(), device=per_array.device) - first[clipped.array]
        return clipped.array * most + rank

    def _subtract_weight_grad(self, grad_w, clipped: "_Clipped", per_column: torch.Tensor) -> None:
        """Subtract each clipped column's Σ_m removed·x (per_column, (D, rows per tile)), times its
        slice's share, from q's gradient (groups, out, tiles, rows per tile) at its (group, out, tile)."""
        lay = self.tiles.layout
        share = self.shares[(clipped.dirty // lay.out_channels_per_group) % self.slices]
        target = clipped.output * lay.tiles + clipped.array % lay.tiles
        grad_w.view(-1, grad_w.shape[-1]).index_add_(0, target, per_column.reshape(target.numel(), -1) *
                                                      share.unsqueeze(1), alpha=-1)


class ConvMerge(MergedSlices):
    """A conv's merged backward: the merged weight is a dense (per group) conv's over the tiled
    input; cells (arrays·slices·out, channels_per_tile, k_h, k_w), ordered (group, tile, slice, out)."""

    def __init__(self, tiles: ConvTiles, cells, gamma, shares, dtype: torch.dtype) -> None:
        super().__init__(tiles, cells, gamma, shares)
        lay = tiles.layout
        kh, kw = tiles.kernel_size
        cell_values = cells.reshape(self.by_slice.shape + (-1,)).to(gamma.dtype)
        merged = (cell_values * self.by_slice.unsqueeze(-1)).sum(dim=2)  # (groups, tiles, out, rows per tile)
        self.weight = merged.permute(0, 2, 1, 3).reshape(
            lay.groups * lay.out_channels_per_group, lay.padded_channels, kh, kw).to(dtype)

    def _dense(self, grad_y, tiled, source, need_x: bool, need_q: bool) -> tuple:
        lay = self.tiles.layout
        dtype = self.weight.dtype
        if source is None:
            inputs, weight = tiled(), self.weight
        else:  # one group: the padding channels are the tiled input's last ones, skipped here
            inputs = source.contiguous(memory_format=torch.channels_last)
            weight = self.weight.narrow(1, 0, lay.in_channels_per_group).contiguous()
        grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
            in_dtype(self._as_image(grad_y, inputs), dtype), in_dtype(inputs, dtype), weight, None,
            *self._conv_args(), lay.groups, [need_x, need_q, False])
        if grad_x is not None:
            grad_x = in_dtype(grad_x, inputs.dtype)
            if source is not None:
                grad_x = grad_x.contiguous(memory_format=memory_format_of(source))
        if grad_w is not None:
            grad_w = in_dtype(grad_w, inputs.dtype)
            if source is not None:  # the padding channels' (zero) gradient, for the tiled layout
                grad_w = torch.nn.functional.pad(grad_w, (0, 0, 0, 0, 0, lay.pad))
        return grad_x, grad_w

    def _subtract_columns(self, grad_x, x, clipped: "_Clipped", per_array, most: int, need_q: bool):
        slot = self._slots(clipped, per_array, most)
        arrays = self.tiles.arrays
        rows = clipped.removed.shape[0]
        removed = clipped.removed.new_zeros(rows, arrays * most).index_copy_(1, slot, clipped.removed)
        weight = x.new_zeros((arrays * most,) + tuple(self.cells.shape[1:]))
        weight.index_copy_(0, slot, self.cells.index_select(0, clipped.dirty).to(x.dtype))
        gx, gw, _ = torch.ops.aten.convolution_backward(
            self._as_image(removed, x), x, weight, None, *self._conv_args(), arrays,
            [grad_x is not None, need_q, False])
        if grad_x is not None:
            grad_x.sub_(gx)
        return gw.index_select(0, slot) if need_q else None

    def _subtract_entries(self, grad_x, x, clipped: "_Clipped", per_array, most: int, need_q: bool):
        """Each clipped partial sum's gradient times its column's cells, scattered into the input
        patch it read; that patch, into the column's weight gradient. x may be the tiled input or,
        for one group, the untiled one (its channels are the tiled input's first; the padding
        channels beyond hold zeros and zero cells, so they contribute nothing and are skipped)."""
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
        within = torch.arange(per_tile, device=row.device)
        channels = (clipped.array[column[entry]] * per_tile).unsqueeze(1) + within  # (V, per_tile)
        real = channels < x.shape[1]
        at = tuple(i.expand_as(channels)[real] for i in
                   (image[entry].unsqueeze(1), channels, iy[entry, ky].unsqueeze(1), ix[entry, kx].unsqueeze(1)))
        value = clipped.removed[row, column][entry].unsqueeze(1).expand_as(channels)[real]
        cell_at = tuple(i.expand_as(channels)[real] for i in
                        (column[entry].unsqueeze(1), within.expand_as(channels), ky.unsqueeze(1), kx.unsqueeze(1)))
        if grad_x is not None:
            cells = self.cells.index_select(0, clipped.dirty).to(x.dtype)  # (D, per_tile, kh, kw)
            grad_x.index_put_(at, -value * cells[cell_at], accumulate=True)
        if not need_q:
            return None
        gw = x.new_zeros((clipped.dirty.numel(), per_tile, kh, kw))
        gw.index_put_(cell_at, value * x[at], accumulate=True)
        return gw

    def _as_image(self, values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Rows (N·H_out·W_out, ...) → an (N, C, H_out, W_out) view, channels last in memory."""
        n, h, w = self.tiles.output_size(x)
        return values.reshape(n, h, w, -1).permute(0, 3, 1, 2)

    def _conv_args(self) -> tuple:
        tiles = self.tiles
        return list(tiles.stride), list(tiles.padding), list(tiles.dilation), False, [0, 0]


class MatmulMerge(MergedSlices):
    """A linear layer's merged backward: one matmul per direction over all row-tiles; cells
    (tiles, rows_per_tile, slices·out), columns ordered (slice, out); the tiled input x (tiles,
    tokens, rows_per_tile)."""

    def __init__(self, tiles: MatmulTiles, cells, gamma, shares, dtype: torch.dtype) -> None:
        super().__init__(tiles, cells, gamma, shares)
        lay = tiles.layout
        # the cells as the fused weight path stores them, (slices, out, tiles, rows_per_tile) in
        # memory (a view here), and the slices' scales laid out alike: the merged weight is made
        # transposed, (out, tiles·rows_per_tile), a block of outputs at a time (bounded memory)
        self.by_column = cells.permute(2, 0, 1).reshape(self.slices, lay.out_channels_per_group, lay.tiles,
                                                        lay.channels_per_tile)
        self.column_scale = self.by_slice[0].permute(1, 2, 0).unsqueeze(-1)  # (slices, out, tiles, 1)
        self.dtype = dtype

    def _dense(self, grad_y, tiled, source, need_x: bool, need_q: bool) -> tuple:
        x = tiled()
        tiles, tokens, rows = x.shape
        grad = in_dtype(grad_y.reshape(tokens, -1), self.dtype)
        grad_x = grad_w = None
        if need_x:  # (tokens, tiles·rows) viewed (tiles, tokens, rows)
            grad_x = x.new_zeros((tokens, tiles * rows))
            for part, weight in self._weight_blocks():
                if weight.dtype == grad_x.dtype:
                    grad_x.addmm_(grad[:, part], weight)
                else:
                    grad_x.add_(grad[:, part] @ weight)
            grad_x = grad_x.view(tokens, tiles, rows).transpose(0, 1)
        if need_q:
            flat = in_dtype(x.transpose(0, 1).reshape(tokens, tiles * rows), self.dtype)
            grad_w = in_dtype(grad.t() @ flat, x.dtype)
        return grad_x, grad_w

    def _weight_blocks(self):
        """(output slice, merged weight of those outputs (outputs, tiles·rows_per_tile)) blocks of
        about FLOAT_BLOCK_BYTES, made by the fused kernel (eagerly where it does not run)."""
        _, out, tiles, rows = self.by_column.shape
        size = torch.empty((), dtype=self.dtype).element_size()
        block = min(out, max(1, FLOAT_BLOCK_BYTES // max(1, tiles * rows * size)))
        buffer = torch.empty((block, tiles, rows), dtype=self.dtype, device=self.by_column.device)
        for start in range(0, out, block):
            part = slice(start, min(start + block, out))
            weight = buffer[:part.stop - start]
            cells, scale = self.by_column[:, part], self.column_scale[:, part]
            if not merge_slices(weight, cells, scale):
                torch.mul(cells[0], scale[0], out=weight)
                for s in range(1, self.slices):
                    weight.add_(cells[s] * scale[s])
            yield part, weight.view(-1, tiles * rows)

    def _subtract_columns(self, grad_x, x, clipped: "_Clipped", per_array, most: int, need_q: bool):
        slot = self._slots(clipped, per_array, most)
        tiles, tokens, rows = x.shape
        removed = clipped.removed.new_zeros(tokens, tiles * most).index_copy_(1, slot, clipped.removed)
        removed = removed.view(tokens, tiles, most).transpose(0, 1)  # (tiles, tokens, slots)
        weight = x.new_zeros((tiles * most, rows)).index_copy_(0, slot, self._column_cells(clipped, x.dtype))
        weight = weight.view(tiles, most, rows)
        if grad_x is not None:
            grad_x.baddbmm_(removed, weight, alpha=-1)
        if not need_q:
            return None
        return torch.bmm(removed.transpose(1, 2), x).reshape(tiles * most, rows).index_select(0, slot)

    def _subtract_entries(self, grad_x, x, clipped: "_Clipped", per_array, most: int, need_q: bool):
        """Each clipped partial sum's gradient times its column's cells, taken from its token's
        tile input gradient; that token's tile input, into the column's weight gradient."""
        row, column = clipped.entries.unbind(1)
        tile = clipped.array[column]
        value = clipped.removed[row, column].unsqueeze(1)
        if grad_x is not None:
            within = torch.arange(x.shape[2], device=row.device)
            grad_x.index_put_((tile.unsqueeze(1), row.unsqueeze(1), within),
                              -value * self._column_cells(clipped, x.dtype)[column], accumulate=True)
        if not need_q:
            return None
        return x.new_zeros((clipped.dirty.numel(), x.shape[2])).index_add_(0, column, value * x[tile, row])

    def _column_cells(self, clipped: "_Clipped", dtype: torch.dtype) -> torch.Tensor:
        """The cells of each clipped column (D, rows_per_tile)."""
        columns = self.slices * self.tiles.layout.out_channels_per_group
        return self.cells[clipped.array, :, clipped.dirty % columns].to(dtype)


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
