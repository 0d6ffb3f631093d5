"""Partial sums of every row-tile × cell slice × weight column, from a layer's integer weights.

One grouped conv (conv layers) or one batched matmul (linear layers) yields all partial sums.
The backward pass is written out rather than left to autograd, for one reason: every slice of a
weight receives the same input, so the gradient of the integer weight q — the straight-through
sum Σ_s share_s · ∂L/∂slice_s with share_s = 2^(-s·c)/S — equals ONE weight-gradient product
with the slice-weighted output gradient Σ_s share_s · ∂L/∂p_s. That is 1/S of the work autograd
would do (one weight-gradient conv per slice) with exactly the same result.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from lib.cim.adc_kernels import memory_format_of, slice_share
from lib.cim.fused_op import FusedOp
from lib.cim.crossbar import CrossbarPlan, TileLayout, stored_slices
from lib.cim.gradient_products import gradient_dtype
from lib.cim.integer_products import (InputGrid, LevelsConvWeight, PackedConvWeight, code_values, code_values_eager,
                                     conv_levels, integer_conv, integer_matmul, level_dtype, pack_conv_weight,
                                     pack_levels_weight, pack_matmul_weight)


_SHARES: dict = {}
FLOAT_BLOCK_BYTES = 32 * 2**20  # a compact array weight is widened to float in blocks of about this size


def in_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in `dtype` (no copy when it already is)."""
    return t if t.dtype == dtype else t.to(dtype)


def as_float(w: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The array weight in `like`'s float dtype: the fused weight path stores cell values as
    small integers (`CellSlicing.storage_dtype`), a quarter of their float size, until a product
    needs them."""
    return in_dtype(w, like.dtype)


def tile_blocks(w: torch.Tensor, like: torch.Tensor) -> list[tuple[int, int]]:
    """(start, stop) blocks of the leading (tile) dim of a batched-matmul array weight, each about
    FLOAT_BLOCK_BYTES when widened to float; one block when w already is `like`'s dtype."""
    tiles = w.shape[0]
    if w.dtype == like.dtype:
        return [(0, tiles)]
    per_tile = max(1, w[0].numel() * like.element_size())
    size = max(1, FLOAT_BLOCK_BYTES // per_tile)
    return [(start, min(start + size, tiles)) for start in range(0, tiles, size)]


def slice_shares(plan: CrossbarPlan, dtype=torch.float32, device=None) -> torch.Tensor:
    """share_s = 2^(-s·c) / S: the part of slice s's gradient that reaches q, so that
    Σ_s 2^(s·c) · slice_s has gradient exactly 1 with respect to q. Made once per setting."""
    key = (plan.slices, plan.cell_bits, plan.equal_slices, dtype, device)
    if key not in _SHARES:
        significance = plan.significance(device, dtype)
        _SHARES[key] = significance.reciprocal() / significance.numel()
    return _SHARES[key]


def share_over_slices(grad_p: torch.Tensor, shares: torch.Tensor, columns: int, out=None) -> torch.Tensor:
    """Σ_s share_s · grad_p[..., s, :] for gradients laid out (..., slices·columns) → (rows, columns),
    written into `out` (rows, columns) when given (see adc_kernels.slice_share)."""
    return slice_share(grad_p.reshape(-1, shares.numel(), columns), shares, out=out)


def products_backward(tiles, x: torch.Tensor, w: torch.Tensor, grad_p: torch.Tensor, shares: torch.Tensor,
                      q_shape: torch.Size, need_x: bool, need_q: bool, share_out=None):
    """Gradients of the tiled input and of the integer weights (both in x's dtype) from the partial
    sums' gradient (laid out as `tiles.products` returns them): see the module docstring. The two
    products run in `gradient_dtype` (lib.cim.gradient_products)."""
    dtype = gradient_dtype(x)
    grad_p = in_dtype(grad_p, dtype)
    grad_x = in_dtype(tiles.input_grad(grad_p, x, w), x.dtype) if need_x else None
    grad_q = None
    if need_q:
        columns = tiles.layout.out_channels_per_group
        shared = share_over_slices(grad_p, shares, columns, out=share_out).reshape(grad_p.shape[:-1] + (-1,))
        grad_q = in_dtype(tiles.weight_grad(in_dtype(shared, dtype), in_dtype(x, dtype), q_shape), x.dtype)
    return grad_x, grad_q


def _tiled_channels(x: torch.Tensor, groups: int, pad: int, fill: int = 0) -> torch.Tensor:
    """(N, C, H, W) → each group's channels followed by `pad` channels of `fill` (zero, or a grid's
    code of zero), channels_last: one cat."""
    n, channels, h, w = x.shape
    by_group = x.permute(0, 2, 3, 1).reshape(n, h, w, groups, channels // groups)
    padding = x.new_full((), fill).expand(n, h, w, groups, pad)
    return torch.cat([by_group, padding], dim=4).view(n, h, w, -1).permute(0, 3, 1, 2)


def _tiled_codes_functional(x, step: torch.Tensor, offset: int, groups: int, pad: int) -> torch.Tensor:
    """`_tiled_channels` of x's uint8 grid codes (`code_values`), padded with the code of zero: one
    pass over x."""
    return _tiled_channels(code_values(x, step, offset, torch.uint8), groups, pad, offset)


def _tiled_codes_eager(x, step: torch.Tensor, offset: int, groups: int, pad: int) -> torch.Tensor:
    return _tiled_channels(code_values_eager(x, step, offset, torch.uint8), groups, pad, offset)


TILED_CODES = FusedOp("tiled_codes", _tiled_codes_functional, _tiled_codes_eager)


class _TiledChannels(torch.autograd.Function):
    """(N, C, H, W) → each group's channels followed by `pad` zero channels, channels_last, in one
    pass over the output (F.pad zero-fills all of it first, then copies the input in); the backward
    copies the gradient's real channels straight into the input's memory format (F.pad's clones
    them, and a layout copy for the input quantizer followed)."""

    @staticmethod
    def forward(ctx, x, groups: int, pad: int):
        ctx.groups, ctx.per_group, ctx.memory_format = groups, x.shape[1] // groups, memory_format_of(x)
        return _tiled_channels(x, groups, pad)

    @staticmethod
    def backward(ctx, grad):
        return untiled_channels(grad, ctx.groups, ctx.per_group, ctx.memory_format), None, None


def untiled_channels(grad: torch.Tensor, groups: int, per_group: int, memory_format) -> torch.Tensor:
    """The real channels of a tiled input's gradient (each group's channels followed by padding)
    copied straight into a tensor of the input's `memory_format`: the inverse of the tiling."""
    n, _, h, w = grad.shape
    by_group = grad.permute(0, 2, 3, 1).reshape(n, h, w, groups, -1)[..., :per_group]
    grad_x = torch.empty((n, groups * per_group, h, w), dtype=grad.dtype, device=grad.device,
                         memory_format=memory_format)
    grad_x.permute(0, 2, 3, 1).view(n, h, w, groups, per_group).copy_(by_group)
    return grad_x


@dataclass(frozen=True)
class ConvTiles:
    """The crossbar view of a conv: groups·tiles arrays, each a grouped-conv group of
    `channels_per_tile` input channels and slices·out_channels_per_group weight columns."""

    layout: TileLayout
    kernel_size: tuple
    stride: tuple
    padding: tuple
    dilation: tuple
    input_grid: Optional[InputGrid] = None  # inputs on an 8-bit grid: products on int8 kernels

    @property
    def arrays(self) -> int:
        return self.layout.groups * self.layout.tiles

    @property
    def packed_form(self) -> str:
        """What `packed` returns: oneDNN's int8 weight for integer products, else the float weight."""
        return "int8" if self.input_grid is not None else "float"

    def weight(self, slices: torch.Tensor) -> torch.Tensor:
        """Grouped-conv weight (groups·tiles·slices·out, channels_per_tile, k_h, k_w), ordered
        (group, tile, slice, out), from slices (slices, groups·out, in/groups, k_h, k_w); the ragged
        last tile is padded with zero channels."""
        lay = self.layout
        n_slices = slices.shape[0]
        w = slices.reshape(n_slices, lay.groups * lay.out_channels_per_group, lay.in_channels_per_group, -1)
        if lay.pad:
            w = F.pad(w, (0, 0, 0, lay.pad))
        return self.weight_from_tiled(w.reshape(n_slices, w.shape[1], lay.tiles, -1), padding_is_zero=True)

    def weight_from_tiled(self, tiled: torch.Tensor, padding_is_zero: bool = False) -> torch.Tensor:
        """`weight`'s result from slices already cut into row-tiles, (slices, groups·out, tiles,
        channels_per_tile·k_h·k_w), as the fused weight kernel writes them (its padding channels hold
        whatever the kernel computed for zero weights): one copy into the array layout, then the
        padding channels zeroed, unless `padding_is_zero` (slices padded with zeros, as `weight` does)."""
        lay = self.layout
        kh, kw = self.kernel_size
        n_slices = tiled.shape[0]
        by_tile = tiled.view(n_slices, lay.groups, lay.out_channels_per_group, lay.tiles, lay.channels_per_tile, kh * kw)
        w = tiled.new_empty((lay.groups, lay.tiles, n_slices, lay.out_channels_per_group, lay.channels_per_tile,
                             kh * kw))
        w.copy_(by_tile.permute(1, 3, 0, 2, 4, 5))
        if lay.pad and not padding_is_zero:
            w[:, -1, :, :, lay.channels_per_tile - lay.pad:].zero_()
        return w.view(-1, lay.channels_per_tile, kh, kw)

    def packed(self, w: torch.Tensor) -> torch.Tensor:
        """`weight`'s result laid out for many reads (the eval cache keeps it): prepacked for the
        int8 kernels when the products are integer, else channels_last, as the float conv reads it
        with the channels_last tiled input (else it converts it on every call)."""
        if self.input_grid is None:
            return w.contiguous(memory_format=torch.channels_last)
        return pack_conv_weight(w, self.input_grid, self.stride, self.padding, self.dilation, self.arrays)

    def saved(self, w) -> torch.Tensor:
        """The array weight as a tensor, for a backward to keep: the int8 cells of a prepacked one."""
        return w.cells if isinstance(w, PackedConvWeight) else w

    def for_products(self, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The array weight as `products` takes it fastest when it reads it several times (chunks):
        prepacked for int8 kernels, else in x's float dtype (a conv's weights are small)."""
        if self.input_grid is not None:
            return pack_conv_weight(w, self.input_grid, self.stride, self.padding, self.dilation, self.arrays)
        return as_float(w, x)

    def for_gradients(self, w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The saved array weight for repeated `input_grad` (chunks): widened to the gradient
        products' `dtype` once (a conv's weights are small)."""
        return in_dtype(w, dtype)

    def tile_input(self, x: torch.Tensor) -> torch.Tensor:
        """Each group's input channels zero-padded to whole tiles, in channels_last memory format
        (oneDNN runs these odd group shapes about twice as fast in it)."""
        lay = self.layout
        if not lay.pad:
            return x.contiguous(memory_format=torch.channels_last)
        if torch.is_grad_enabled() and x.requires_grad:
            return _TiledChannels.apply(x, lay.groups, lay.pad)
        return _tiled_channels(x, lay.groups, lay.pad)  # no autograd node to make (evaluation, codes)

    @property
    def keeps_source(self) -> bool:
        """Whether a crossbar node over these arrays keeps the untiled input for its backward and
        takes the input gradient there (lib.cim.crossbar_adc): one group with padding channels,
        which are then the tiled input's last ones, skipped by the merged backward's products."""
        return self.layout.groups == 1 and self.layout.pad > 0

    def tile_codes(self, x: torch.Tensor) -> torch.Tensor:
        """`tile_input` of x's unsigned codes on `input_grid` (`grid_codes`: what the int8 products
        read of it; tiles with integer products only), made in one pass over x: the tiled float
        input is never written. For a node that `keeps_source`, the codes are all its forward reads."""
        lay, grid = self.layout, self.input_grid
        step = torch.tensor(grid.step, dtype=x.dtype, device=x.device)
        return TILED_CODES(x, step, grid.zero_point, lay.groups, lay.pad)

    def output_size(self, x: torch.Tensor) -> tuple[int, int, int]:
        """(N, H_out, W_out) of the conv over the tiled input x."""
        n, _, h, w = x.shape
        h_out, w_out = [(size + 2 * pad - dil * (k - 1) - 1) // stride + 1 for size, pad, dil, k, stride
                        in zip((h, w), self.padding, self.dilation, self.kernel_size, self.stride)]
        return n, h_out, w_out

    def products(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """(N, H_out, W_out, groups·tiles·slices·out) partial sums of the tiled input x: integer
        inputs times cell values on int8 kernels when `input_grid` is set (lib.cim.integer_products),
        else a float32 conv."""
        if self.input_grid is not None:
            p = integer_conv(x, w, self.input_grid, self.stride, self.padding, self.dilation, self.arrays)
        else:
            p = F.conv2d(x, as_float(w, x), None, self.stride, self.padding, self.dilation, self.arrays)
        return p.permute(0, 2, 3, 1)

    def levels_in_epilogue(self, lo: int, hi: int) -> bool:
        """Whether `levels` can convert these partial sums to ADC levels in [lo, hi] inside the int8
        conv: integer products of unsigned codes (zero point 0) and levels within 8 bits."""
        return self.input_grid is not None and not self.input_grid.zero_point and level_dtype(lo, hi) is not None

    def levels_weight(self, w, adc_step: torch.Tensor) -> LevelsConvWeight:
        """The array weight prepacked for `levels` with the ADC step of every column (the one a
        packed weight carries from the eval cache, else packed now)."""
        if isinstance(w, PackedConvWeight):
            if w.levels is not None:
                return w.levels
            w = w.cells
        return pack_levels_weight(in_dtype(w, torch.int8), adc_step, self.stride, self.padding, self.dilation,
                                  self.arrays)

    def with_levels_weight(self, w, adc_step: torch.Tensor) -> PackedConvWeight:
        """`packed(w)` carrying its `levels_weight` too: what the eval cache keeps for a layer that
        converts in the conv's epilogue."""
        packed = w if isinstance(w, PackedConvWeight) else self.packed(w)
        return packed._replace(levels=self.levels_weight(packed, adc_step))

    def levels(self, x: torch.Tensor, weight: LevelsConvWeight, lo: int, hi: int) -> torch.Tensor:
        """(N, H_out, W_out, groups·tiles·slices·out) ADC levels of the partial sums of x, converted
        in the int8 conv's epilogue (`integer_products.conv_levels`)."""
        return conv_levels(x, weight, self.input_grid, lo, hi, self.stride, self.padding, self.dilation,
                           self.arrays).permute(0, 2, 3, 1)

    def _backward(self, grad_out: torch.Tensor, x: torch.Tensor, w: torch.Tensor, mask: list) -> tuple:
        n, h, wd = grad_out.shape[:3]
        grad_nchw = grad_out.reshape(n, h, wd, -1).permute(0, 3, 1, 2)
        return torch.ops.aten.convolution_backward(
            grad_nchw, x, w, None, list(self.stride), list(self.padding), list(self.dilation),
            False, [0, 0], self.arrays, mask)

    def input_grad(self, grad_p: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Gradient of the tiled input, in grad_p's dtype (x is read for its shape only)."""
        shape_of_x = x if x.dtype == grad_p.dtype else torch.empty_like(x, dtype=grad_p.dtype)
        return self._backward(grad_p, shape_of_x, as_float(w, grad_p), [True, False, False])[0]

    def weight_grad(self, grad_shared: torch.Tensor, x: torch.Tensor, grad_shape: torch.Size) -> torch.Tensor:
        """Gradient of the integer weights (groups·out, in/groups, k_h, k_w) from the slice-weighted
        output gradient (N, H_out, W_out, groups·tiles·out) and x, both in the products' dtype."""
        lay = self.layout
        kh, kw = self.kernel_size
        shape_only = x.new_empty((self.arrays * lay.out_channels_per_group, lay.channels_per_tile, kh, kw))
        dw = self._backward(grad_shared, x, shape_only, [False, True, False])[1]
        dw = dw.reshape(lay.groups, lay.tiles, lay.out_channels_per_group, lay.channels_per_tile, kh, kw)
        dw = dw.permute(0, 2, 1, 3, 4, 5).reshape(lay.groups, lay.out_channels_per_group, lay.padded_channels, kh, kw)
        return dw[:, :, :lay.in_channels_per_group].reshape(grad_shape)


@dataclass(frozen=True)
class MatmulTiles:
    """The crossbar view of a linear layer: `tiles` arrays of `channels_per_tile` input features.
    Partial sums are laid out (tokens, tiles, slices·out): row by row, as the ADC reads them."""

    layout: TileLayout
    input_grid: Optional[InputGrid] = None  # inputs on an 8-bit grid: products on int8 kernels

    @property
    def packed_form(self) -> str:
        """What `packed` returns: int8 cell values for integer products, else the float weight."""
        return "int8" if self.input_grid is not None else "float"

    def weight(self, slices: torch.Tensor) -> torch.Tensor:
        """Batched-matmul weight (tiles, rows_per_tile, slices·out): a strided view of the slices
        when no padding is needed (BLAS reads it in place), columns ordered (slice, out)."""
        lay = self.layout
        w = slices.reshape(-1, lay.in_channels_per_group)
        if lay.pad:
            w = F.pad(w, (0, lay.pad))
        return w.view(w.shape[0], lay.tiles, lay.channels_per_tile).permute(1, 2, 0)

    def weight_from_tiled(self, tiled: torch.Tensor) -> torch.Tensor:
        """`weight`'s result from slices cut into row-tiles, (slices, out, tiles, rows_per_tile), as
        the fused weight kernel writes them: the padding features dropped (a copy only then) and
        padded with zeros again by `weight`."""
        slices = tiled.reshape(tiled.shape[0], tiled.shape[1], -1)[..., :self.layout.in_channels_per_group]
        return self.weight(slices)

    def packed(self, w: torch.Tensor):
        """`weight`'s result laid out for many reads (the eval cache keeps it): each tile's block
        contiguous (tiles, slices·out, rows_per_tile), read transposed — about 1.4x faster in the
        small-batch matmul than the strided view, for one copy; in int8 for integer products."""
        if self.input_grid is not None:
            w = pack_matmul_weight(w)  # narrowed first: one copy, of the int8 cells
        return w.transpose(1, 2).contiguous().transpose(1, 2)

    def saved(self, w: torch.Tensor) -> torch.Tensor:
        """The array weight for a backward to keep: as it is."""
        return w

    def for_products(self, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The array weight for repeated `products`: as it is (a compact one is widened block by block)."""
        return w

    def for_gradients(self, w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The saved array weight for repeated `input_grad`: as it is (widened block by block)."""
        return w

    def levels_in_epilogue(self, lo: int, hi: int) -> bool:
        """int8 matmuls have no epilogue to convert in: the ADC reads float32 partial sums."""
        return False

    def tile_input(self, x2d: torch.Tensor) -> torch.Tensor:
        """(tokens, features) → (tiles, tokens, rows_per_tile), the ragged tile zero-padded."""
        lay = self.layout
        if lay.pad:
            x2d = F.pad(x2d, (0, lay.pad))
        return x2d.reshape(x2d.shape[0], lay.tiles, lay.channels_per_tile).transpose(0, 1)

    def output_size(self, xt: torch.Tensor) -> tuple[int]:
        """(tokens,): the rows of partial sums per read-out column."""
        return (xt.shape[1],)

    def products(self, xt: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """(tokens, tiles, slices·out) partial sums: each tile's matmul writes its block of every
        row in place (a strided output BLAS takes as is), so no transpose copy follows; a compact
        integer w is widened block by block (`tile_blocks`). Where autograd records (inspection,
        tests) a transposed view of the plain product, with the same values. Integer products
        (`input_grid` set) come from lib.cim.integer_products."""
        if self.input_grid is not None:
            return integer_matmul(xt, w, self.input_grid)
        if torch.is_grad_enabled() and (xt.requires_grad or w.requires_grad):
            return torch.bmm(xt, as_float(w, xt)).transpose(0, 1)
        out = xt.new_empty((xt.shape[1], xt.shape[0], w.shape[2]))
        by_tile = out.transpose(0, 1)
        for start, stop in tile_blocks(w, xt):
            torch.bmm(xt[start:stop], as_float(w[start:stop], xt), out=by_tile[start:stop])
        return out

    def input_grad(self, grad_p: torch.Tensor, xt: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Gradient of the tiled input, in grad_p's dtype (xt is read for its shape only)."""
        grad_by_tile = grad_p.transpose(0, 1)
        blocks = tile_blocks(w, grad_p)
        if len(blocks) == 1:
            return torch.bmm(grad_by_tile, as_float(w, grad_p).transpose(1, 2))
        grad_x = torch.empty_like(xt, dtype=grad_p.dtype)
        for start, stop in blocks:
            torch.bmm(grad_by_tile[start:stop], as_float(w[start:stop], grad_p).transpose(1, 2),
                      out=grad_x[start:stop])
        return grad_x

    def weight_grad(self, grad_shared: torch.Tensor, xt: torch.Tensor, grad_shape: torch.Size) -> torch.Tensor:
        """Gradient of the integer weights (out, in) from the slice-weighted output gradient (tokens, tiles, out)."""
        lay = self.layout
        shared = grad_shared.reshape(xt.shape[1], lay.tiles, -1).transpose(0, 1)
        # each tile's (out, rows_per_tile) block written in place into an (out, in) row-major
        # gradient: no transposed result for the weight's own backward to copy
        dw = xt.new_empty((lay.out_channels_per_group, lay.tiles, lay.channels_per_tile), dtype=shared.dtype)
        torch.bmm(shared.transpose(1, 2), xt, out=dw.transpose(0, 1))
        return dw.reshape(lay.out_channels_per_group, -1)[:, :lay.in_channels_per_group].reshape(grad_shape)


def crossbar_weight(q: torch.Tensor, tiles, plan: CrossbarPlan) -> torch.Tensor:
    """The cell slices of the integer weights q (sign mapping included) laid out as `tiles.products`
    reads them: what the arrays store. Integer-valued, no gradient (tile_products carries q's)."""
    return tiles.weight(stored_slices(q.detach(), plan))


class _TileProducts(torch.autograd.Function):
    """Partial sums from the integer weights q stored as the array weight w; gradients to the
    tiled input and to q (see the module docstring)."""

    @staticmethod
    def forward(ctx, x, q, w, tiles, plan: CrossbarPlan):
        ctx.save_for_backward(x, tiles.saved(w))
        ctx.tiles, ctx.q_shape = tiles, q.shape
        ctx.shares = slice_shares(plan, q.dtype, q.device)
        return tiles.products(x, w)

    @staticmethod
    def backward(ctx, grad_p):
        x, w = ctx.saved_tensors
        grad_x, grad_q = products_backward(ctx.tiles, x, w, grad_p.contiguous(), ctx.shares, ctx.q_shape,
                                           ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return grad_x, grad_q, None, None, None


def tile_products(x: torch.Tensor, q: torch.Tensor, tiles, plan: CrossbarPlan,
                  w: Optional[torch.Tensor] = None) -> torch.Tensor:
    """All row-tile × slice × column partial sums of the tiled input x (`tiles.tile_input`) with the
    integer-valued weights q stored as `plan` says (w: their `crossbar_weight`, when already made);
    differentiable in x and q (straight-through to q)."""
    w = crossbar_weight(q, tiles, plan) if w is None else w
    return _TileProducts.apply(x, q, w, tiles, plan)
