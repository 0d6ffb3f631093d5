"""A CIM layer's crossbar MVM and ADC as one autograd function: the fast path of its forward.

It computes what `tile_products` followed by the ADC's convert-and-accumulate compute (same
kernels, same values and gradients, which a test checks), but as one autograd node, so that the
full-size partial-sum gradient is a private temporary of one backward call and can live in a
reused scratch buffer (lib.cim.scratch) instead of fresh memory. Used when the ADC can convert
without inspecting the partial sums first (`PartialSumADC.fusable`). Where the ADC clipped few
columns, the backward merges the slices instead and needs no full-size gradient at all
(lib.cim.slice_merge).

A layer's partial sums are slices × row-tiles × (out / in channels) times its input, and
bit-serial inputs multiply them by the DAC cycles: whole, a VGG16 or ResNet-18 at 224 px would hold
tens of GB of them for the backward. Partial sums up to `PARTIAL_SUM_CHUNK_BYTES` are computed at once
and kept for the backward; larger ones are computed and converted in chunks of input rows (images,
tokens) of about that size, and each chunk is computed again in the backward from the saved input
and array weights (the same product of the same rows, so the same values). Memory then stays at
one chunk whatever the batch, and recomputing costs about one more forward product.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from lib.cim.adc import step_and_gamma_grads
from lib.cim.adc_kernels import accumulate, adc_backward, adc_forward, clip_sums, memory_format_of
from lib.cim.crossbar import CrossbarPlan
from lib.cim.gradient_products import gradient_dtype
from lib.cim.scratch import SCRATCH
from lib.cim.slice_merge import MergedSlices
from lib.cim.tile_products import ConvTiles, MatmulTiles, products_backward, slice_shares, untiled_channels

PARTIAL_SUM_CHUNK_BYTES = 64 * 2**20  # partial sums kept whole up to this size, else made in chunks of it


def partial_sums_chunked(rows: int, columns: int, element_bytes: int) -> bool:
    """Whether a node makes its partial sums (rows × columns of `element_bytes`) in chunks of rows
    rather than all at once: the rule `row_chunks` applies, which lib.cim.route reports."""
    return rows * columns * element_bytes > PARTIAL_SUM_CHUNK_BYTES


def row_chunks(tiles, x: torch.Tensor, columns: int) -> Optional[list[tuple[int, int]]]:
    """(start, length) blocks of x's rows (dim `_row_dim`) whose partial sums take about
    PARTIAL_SUM_CHUNK_BYTES each, or None when all of them fit at once."""
    dim = _row_dim(tiles)
    items = x.shape[dim]
    rows = math.prod(tiles.output_size(x))
    if not partial_sums_chunked(rows, columns, _sum_bytes(x)):
        return None
    per_item = rows // max(items, 1) * columns * _sum_bytes(x)
    size = max(1, int(PARTIAL_SUM_CHUNK_BYTES // max(per_item, 1)))
    return [(start, min(size, items - start)) for start in range(0, items, size)]


def _sum_bytes(x: torch.Tensor) -> int:
    """Bytes per partial sum of x: x's float size, float32's for an input given as integer codes."""
    return x.element_size() if x.is_floating_point() else 4


def _row_dim(tiles) -> int:
    """The dim of the tiled input that indexes independent rows: tokens (linear) or images (conv)."""
    return 1 if isinstance(tiles, MatmulTiles) else 0


class _CrossbarADC(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, q, w, step, gamma, tiles, plan: CrossbarPlan,
                lo: int, hi: int, grad_factor: float, source: Optional[torch.Tensor]):
        chunks = row_chunks(tiles, x, gamma.numel())
        ctx.tiles, ctx.q_shape, ctx.chunks = tiles, q.shape, chunks
        ctx.shares = slice_shares(plan, q.dtype, q.device)
        ctx.bounds = (lo, hi, grad_factor)
        main, y = _convert(tiles, x, w, step, gamma, lo, hi, chunks)
        ctx.by_source = source is not None
        ctx.save_for_backward(source if ctx.by_source else x, tiles.saved(w), main, step, gamma)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        saved, w, main, step, gamma = ctx.saved_tensors
        source = saved if ctx.by_source else None
        x = _TiledInput(ctx.tiles, saved, ctx.by_source)
        w_products = ctx.tiles.for_products(w, saved) if ctx.chunks is not None else None
        dtype = gradient_dtype(saved)
        merged = MergedSlices.for_node(ctx.tiles, w, gamma, ctx.shares, saved, dtype)
        w = _GradientWeight(ctx.tiles, w, dtype)
        lo, hi, grad_factor = ctx.bounds
        need_x = ctx.needs_input_grad[10] if ctx.by_source else ctx.needs_input_grad[0]
        need_q = ctx.needs_input_grad[1]
        grad_y = grad_y.contiguous()
        if ctx.chunks is None:
            grad_x, grad_q, sum_levels, sum_v = _chunk_backward(ctx, grad_y, x, source, w, main, step, gamma, need_x,
                                                                 need_q, merged)
        else:  # each chunk's partial sums again, then its gradients (see the module docstring)
            dim = _row_dim(ctx.tiles)
            rows_per_item = grad_y.shape[0] // saved.shape[dim]
            grad_x = torch.empty_like(saved) if need_x else None
            grad_q = sum_levels = sum_v = None
            for start, length in ctx.chunks:
                x_chunk = x.narrow(dim, start, length)
                source_chunk = None if source is None else source.narrow(dim, start, length)
                main = _products(ctx.tiles, x_chunk(), w_products, gamma)
                grad_y_chunk = grad_y.narrow(0, start * rows_per_item, length * rows_per_item)
                gx, gq, levels, v = _chunk_backward(ctx, grad_y_chunk, x_chunk, source_chunk, w, main, step, gamma,
                                                    need_x, need_q, merged)
                if need_x:
                    grad_x.narrow(dim, start, length).copy_(gx)
                if gq is not None:
                    grad_q = gq if grad_q is None else grad_q.add_(gq)
                sum_levels = levels if sum_levels is None else sum_levels.add_(levels)
                sum_v = v if sum_v is None else sum_v.add_(v)
        grad_step, grad_gamma = step_and_gamma_grads(step, gamma, sum_levels, sum_v, grad_factor)
        grads = [None, grad_q, None, grad_step, grad_gamma, None, None, None, None, None, None]
        grads[10 if ctx.by_source else 0] = grad_x
        return tuple(grads)


class _TiledInput:
    """The node's tiled input: as saved, or tiled on first use from the saved untiled source (a
    one-group conv whose slices merge never needs it)."""

    def __init__(self, tiles, saved: torch.Tensor, is_source: bool) -> None:
        self.tiles, self.saved = tiles, saved
        self._tiled = None if is_source else saved

    def __call__(self) -> torch.Tensor:
        if self._tiled is None:
            with torch.no_grad():
                self._tiled = self.tiles.tile_input(self.saved)
        return self._tiled

    def narrow(self, dim: int, start: int, length: int) -> "_TiledInput":
        """The same for a block of rows (the tiling keeps rows)."""
        if self._tiled is not None:
            return _TiledInput(self.tiles, self._tiled.narrow(dim, start, length), False)
        return _TiledInput(self.tiles, self.saved.narrow(dim, start, length), True)


def _convert(tiles, x, w, step, gamma, lo: int, hi: int, chunks):
    """`_CrossbarADC`'s forward: (the partial sums it keeps for the backward, None when made in
    `chunks`, which the backward recomputes; the converted outputs)."""
    if chunks is None:
        main = _products(tiles, x, w, gamma)
        return main, adc_forward(main, step, step * gamma, lo, hi)
    return None, _in_chunks(tiles, x, gamma, chunks, _chunk_converter(tiles, x, w, step, gamma, lo, hi))


def _outputs(tiles, x, w, step, gamma, lo: int, hi: int):
    """The converted outputs alone, where autograd records nothing (evaluation)."""
    chunks = row_chunks(tiles, x, gamma.numel())
    convert = _chunk_converter(tiles, x, w, step, gamma, lo, hi)
    return convert(x) if chunks is None else _in_chunks(tiles, x, gamma, chunks, convert)


def _chunk_converter(tiles, x, w, step, gamma, lo: int, hi: int):
    """convert(x_rows, out=None): the outputs of some rows of x, where no partial sum is kept. On
    a conv with integer products of unsigned codes and an ADC range within 8 bits, the ADC runs in
    the int8 conv's epilogue (`ConvTiles.levels`: 8-bit levels, a quarter of the float32 partial
    sums' memory traffic; the same outputs, which a test checks), leaving the shift-and-add; else
    float32 partial sums and the fused conversion."""
    coef = step * gamma
    if tiles.levels_in_epilogue(lo, hi):
        weight = tiles.levels_weight(w, step)

        def from_levels(x_rows, out=None):
            levels = tiles.levels(x_rows, weight, lo, hi).reshape((-1,) + tuple(gamma.shape))
            return accumulate(levels, coef, out=out)
        return from_levels
    w_products = tiles.for_products(w, x)

    def from_sums(x_rows, out=None):
        return adc_forward(_products(tiles, x_rows, w_products, gamma), step, coef, lo, hi, out=out)
    return from_sums


def _in_chunks(tiles, x, gamma, chunks, convert_chunk) -> torch.Tensor:
    """The outputs (M, groups, out) of x converted chunk by chunk, each `convert_chunk(x_chunk,
    out)` writing straight into its rows of the output (no concatenation copy)."""
    dim = _row_dim(tiles)
    rows_per_item = math.prod(tiles.output_size(x)) // x.shape[dim]
    y = gamma.new_empty((rows_per_item * x.shape[dim], gamma.shape[0], gamma.shape[2]))
    for start, length in chunks:
        convert_chunk(x.narrow(dim, start, length), y.narrow(0, start * rows_per_item, length * rows_per_item))
    return y


def _products(tiles, x, w, gamma):
    """The partial sums of x viewed (M, groups, tiles·slices, out) (`tiles.products` lays them out
    (N, H, W, groups·tiles·slices·out) for a conv, (tokens, tiles, slices·out) for a linear layer)."""
    return tiles.products(x, w).reshape((-1,) + tuple(gamma.shape))


class _GradientWeight:
    """The saved array weight widened for the gradient products (`tiles.for_gradients`) on first
    use: a backward whose slices all merge never needs it."""

    def __init__(self, tiles, w: torch.Tensor, dtype: torch.dtype) -> None:
        self._args, self._wide = (tiles, w, dtype), None

    def __call__(self) -> torch.Tensor:
        if self._wide is None:
            tiles, w, dtype = self._args
            self._wide = tiles.for_gradients(w, dtype)
        return self._wide


def _chunk_backward(ctx, grad_y, x: _TiledInput, source: Optional[torch.Tensor], w: _GradientWeight, main, step,
                    gamma, need_x: bool, need_q: bool, merged: Optional[MergedSlices]):
    """(grad of the input, grad of q, Σ_m grad·level, Σ_m grad·v·on_grid) of one block of rows:
    merged over the slices where the ADC clipped little (lib.cim.slice_merge), else from the full
    partial-sum gradient in the reused scratch buffer, in the gradient products' dtype
    (lib.cim.gradient_products). The input's gradient is the untiled `source`'s when given, else
    the tiled input's."""
    lo, hi, _ = ctx.bounds
    if merged is not None:
        sum_levels, sum_v = clip_sums(grad_y, main, step, lo, hi)
        grads = merged.backward(grad_y, x, main, step, lo, hi, sum_v, ctx.q_shape, need_x, need_q, source)
        if grads is not None:
            grad_x, grad_q, sum_v = grads
            return grad_x, grad_q, sum_levels, sum_v
    grad_x, grad_q, sum_levels, sum_v = _full_backward(ctx, grad_y, x(), w, main, step, gamma, need_x, need_q)
    if source is not None and grad_x is not None:
        grad_x = untiled_channels(grad_x, 1, source.shape[1], memory_format_of(source))
    return grad_x, grad_q, sum_levels, sum_v


def _full_backward(ctx, grad_y, x, w: _GradientWeight, main, step, gamma, need_x: bool, need_q: bool):
    """`_chunk_backward` from the full partial-sum gradient, for the tiled input x."""
    lo, hi, _ = ctx.bounds
    dtype = gradient_dtype(main)
    scratch = SCRATCH.tensor("psum_grad", main.shape, main, dtype)
    grad_main, sum_levels, sum_v = adc_backward(grad_y, main, step, gamma, lo, hi, out=scratch)
    rows = main.numel() // (main.shape[-1] * ctx.shares.numel())
    share_out = SCRATCH.tensor("slice_share", (rows, main.shape[-1]), main, dtype)
    p_shape = _products_shape(ctx.tiles, x)
    grad_x, grad_q = products_backward(ctx.tiles, x, w(), grad_main.reshape(p_shape), ctx.shares, ctx.q_shape,
                                       need_x, need_q, share_out=share_out)
    return grad_x, grad_q, sum_levels, sum_v


def _products_shape(tiles, x) -> tuple:
    """The layout `tiles.products` gives the partial sums of x: (N, H, W, columns) or (tokens, tiles, columns)."""
    if isinstance(tiles, MatmulTiles):
        return (x.shape[1], tiles.layout.tiles, -1)
    return tuple(tiles.output_size(x)) + (-1,)


def crossbar_adc_forward(layer, x_tiled: torch.Tensor, q: torch.Tensor, w: torch.Tensor, tiles,
                         step_grid: torch.Tensor, shifts: torch.Tensor, route, ref=None, ref_shift=None,
                         constants=None, source: Optional[torch.Tensor] = None) -> torch.Tensor:
    """ADC-converted, shift-and-added outputs (M, groups, out) of a CIM layer whose ADC is `fusable`
    (tiles: its ConvTiles or MatmulTiles),
    from the integer weights q stored as w (`tile_products.crossbar_weight`); `constants`: the
    ADC's `PartialSumADC.constants` when the layer keeps them; `source`: the conv input x_tiled
    was tiled from (`ConvTiles.tile_input` or, when the node `keeps_source`, `tile_codes`); `route`:
    the layer's `Route`, whose conversion says whether autograd needs the node."""
    plan = layer.plan
    # a one-group conv's padding channels are the tiled input's last ones: the node then keeps the
    # untiled input and takes the gradient to it itself (the merged backward computes it there);
    # its tiled input may then be the codes alone (`ConvTiles.tile_codes`)
    by_source = source is not None and isinstance(tiles, ConvTiles) and tiles.keeps_source
    node_input, source = (x_tiled.detach(), source) if by_source else (x_tiled, None)

    def convert(step, gamma, lo, hi, factor):
        if route.conversion == "node":
            return _CrossbarADC.apply(node_input, q, w, step, gamma, tiles, plan, lo, hi, factor, source)
        # nothing to differentiate (evaluation): the outputs without an autograd node
        return _outputs(tiles, x_tiled, w, step, gamma, lo, hi)
    rows = math.prod(tiles.output_size(x_tiled))
    return layer.psum_adc.fused_forward(convert, rows, shifts, step_grid, ref, ref_shift, constants)
