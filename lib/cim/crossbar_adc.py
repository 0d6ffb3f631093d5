"""A CIM layer's crossbar MVM and ADC as one autograd function: the fast path of its forward.

It computes what `tile_products` followed by the ADC's convert-and-accumulate compute (same
kernels, same values and gradients, which a test checks), but as one autograd node, so that the
full-size partial-sum gradient is a private temporary of one backward call and can live in a
reused scratch buffer (lib.cim.scratch) instead of fresh memory. Used when the ADC can convert
without inspecting the partial sums first (`PartialSumADC.fusable`).

The backward needs the partial sums again. A layer's partial sums are slices × row-tiles × (out /
in channels) times its input, and bit-serial inputs multiply them by the DAC cycles: kept for the
backward, a VGG16 or ResNet-18 at 224 px holds tens of GB of them. Partial sums larger than
`KEEP_PARTIAL_SUMS_BYTES` are therefore recomputed in the backward from the saved input and array
weights (the same product, so the same values); smaller ones are kept (recomputing costs about one
more forward product).
"""
from __future__ import annotations

import math

import torch

from lib.cim.adc import step_and_gamma_grads
from lib.cim.adc_kernels import KERNELS
from lib.cim.crossbar import CrossbarPlan
from lib.cim.scratch import SCRATCH
from lib.cim.tile_products import products_backward, slice_shares

KEEP_PARTIAL_SUMS_BYTES = 64 * 2**20  # a layer's partial sums up to this size are kept for the backward


class _CrossbarADC(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, q, w, step, gamma, tiles, plan: CrossbarPlan,
                lo: int, hi: int, grad_factor: float):
        p = tiles.products(x, w)  # conv (N, H, W, groups·tiles·slices·out); linear (tokens, tiles, slices·out)
        main = p.reshape((-1,) + tuple(gamma.shape))  # (M, groups, tiles·slices, out)
        kept = main if main.numel() * main.element_size() <= KEEP_PARTIAL_SUMS_BYTES else None
        ctx.save_for_backward(x, w, kept, step, gamma)
        ctx.tiles, ctx.p_shape, ctx.q_shape, ctx.main_shape = tiles, p.shape, q.shape, main.shape
        ctx.shares = slice_shares(plan, q.dtype, q.device)
        ctx.bounds = (lo, hi, grad_factor)
        return KERNELS.forward(main, step, step * gamma, lo, hi)

    @staticmethod
    def backward(ctx, grad_y):
        x, w, main, step, gamma = ctx.saved_tensors
        if main is None:  # not kept: the forward's product again (see the module docstring)
            main = ctx.tiles.products(x, w).reshape(ctx.main_shape)
        lo, hi, grad_factor = ctx.bounds
        scratch = SCRATCH.tensor("psum_grad", main.shape, main)
        grad_main, sum_levels, sum_v = KERNELS.backward(grad_y.contiguous(), main, step, gamma, lo, hi, out=scratch)
        grad_step, grad_gamma = step_and_gamma_grads(step, gamma, sum_levels, sum_v, grad_factor)
        rows = main.numel() // (main.shape[-1] * ctx.shares.numel())
        share_out = SCRATCH.tensor("slice_share", (rows, main.shape[-1]), main)
        grad_x, grad_q = products_backward(ctx.tiles, x, w, grad_main.reshape(ctx.p_shape), ctx.shares,
                                           ctx.q_shape, ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                                           share_out=share_out)
        return grad_x, grad_q, None, grad_step, grad_gamma, None, None, None, None, None


def crossbar_adc_forward(layer, x_tiled: torch.Tensor, q: torch.Tensor, w: torch.Tensor, tiles,
                         step_grid: torch.Tensor, shifts: torch.Tensor, ref=None, ref_shift=None) -> torch.Tensor:
    """ADC-converted, shift-and-added outputs (M, groups, out) of a CIM layer whose ADC is `fusable`
    (tiles: its ConvTiles or MatmulTiles),
    from the integer weights q stored as w (`tile_products.crossbar_weight`)."""
    plan = layer.plan

    def convert(step, gamma, lo, hi, factor):
        return _CrossbarADC.apply(x_tiled, q, w, step, gamma, tiles, plan, lo, hi, factor)
    rows = math.prod(tiles.output_size(x_tiled))
    return layer.psum_adc.fused_forward(convert, rows, shifts, step_grid, ref, ref_shift)
