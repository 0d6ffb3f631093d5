"""A CIM layer's weight path in training as one fused kernel per direction.

Forward: LSQ fake quantization of the weight to its integer levels (w / step, round half to
even, clamp to the plan's grid) and, in the same pass, the levels' cell slices with their sign
mapping (`crossbar.cell_values`, the plan's rule). Backward: from the gradient of the levels, the
gradients of the weight (straight through where the rounded value is on the grid) and of the
step grid (−Σ grad·v / step over the weights sharing a step, v = w / step), again one pass.
Brevitas' weight quantizer followed by `value / scale` and the slicing compute the same values
and gradients in a chain of full-size elementwise ops; `FusedWeights` is what the layers use
instead in training (see `CIMLayerMixin.forward_impl`). The LSQ gradient scale 1/sqrt(n·Q_p)
and the step's granularity stay with the step module (`WeightStep.scaled_step`): only the small
step grid is expanded per weight, inside the kernels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lib.cim.adc_kernels import KERNELS, grid_bounds
from lib.cim.crossbar import CellSlicing, cell_values


def _levels(w, step, tile_index, lo, hi):
    """clamp(round(w / step), lo, hi) with w (rows, channels, kernel elems) and the step per
    (row, row-tile) read at each channel's tile."""
    return torch.clamp(torch.round(w / step[:, tile_index].unsqueeze(-1)), lo, hi)


def _forward_functional(w, step, tile_index, lo, hi, slicing: CellSlicing):
    levels = _levels(w, step, tile_index, lo, hi)
    return levels, cell_values(levels, slicing)


def _forward_eager(w, step, tile_index, lo, hi, slicing: CellSlicing):
    levels = torch.round(w / step[:, tile_index].unsqueeze(-1)).clamp_(lo, hi)
    return levels, cell_values(levels, slicing)


def _backward_functional(grad, w, step, tile_index, lo, hi, per_tile: int, tiles: int):
    """(grad wrt w, grad wrt step (rows, tiles)): one pass over the weight."""
    s = step[:, tile_index].unsqueeze(-1)
    v = w / s
    rounded = torch.round(v)
    on_grid = (rounded >= lo) & (rounded <= hi)
    g = torch.where(on_grid, grad, 0.0)
    per_channel = (g * v).sum(dim=-1)
    padded = F.pad(per_channel, (0, per_tile * tiles - per_channel.shape[1]))
    return g / s, -padded.view(per_channel.shape[0], tiles, per_tile).sum(dim=-1) / step


def _backward_eager(grad, w, step, tile_index, lo, hi, per_tile: int, tiles: int):
    s = step[:, tile_index].unsqueeze(-1)
    v = w / s
    rounded = torch.round(v)
    on_grid = (rounded >= lo).logical_and_(rounded <= hi)
    g = grad * on_grid
    per_channel = (v.mul_(g)).sum(dim=-1)
    sums = per_channel.new_zeros(per_channel.shape[0], tiles).index_add_(1, tile_index, per_channel)
    return g.div_(s), sums.div_(step).neg_()


class _FusedWeight(torch.autograd.Function):
    """(levels, cell slices) of a weight viewed (rows, channels, kernel elems) for a step per
    (row, row-tile); gradients to the weight and the step, the slices carry none (the crossbar
    nodes route their gradient to the levels, see lib.cim.tile_products)."""

    @staticmethod
    def forward(ctx, w, step, tile_index, lo, hi, slicing: CellSlicing, per_tile: int):
        levels, slices = KERNELS.run("weight_forward", _forward_functional, _forward_eager, w,
                                     w, step, tile_index, lo, hi, slicing)
        ctx.save_for_backward(w, step, tile_index, lo, hi)
        ctx.per_tile = per_tile
        ctx.mark_non_differentiable(slices)
        ctx.set_materialize_grads(False)  # no full-size zero gradient for the slices
        return levels, slices

    @staticmethod
    def backward(ctx, grad_levels, _grad_slices):
        w, step, tile_index, lo, hi = ctx.saved_tensors
        grad_w, grad_step = KERNELS.run("weight_backward", _backward_functional, _backward_eager, w,
                                        grad_levels, w, step, tile_index, lo, hi, ctx.per_tile, step.shape[1])
        return grad_w, grad_step, None, None, None, None, None


class FusedWeights:
    """A CIM layer's weight side for one training forward, from the fused kernels: the weight
    step grid, the integer levels with the stored cell slices, and the dequantized weight. The
    same values and gradients as Brevitas' quantized weight (`ComposedWeights`)."""

    def __init__(self, layer) -> None:
        self.layer = layer
        module = layer.weight_step_module
        tensor_quant = layer.weight_quant.tensor_quant
        threshold = tensor_quant.int_scaling_impl(tensor_quant.msb_clamp_bit_width_impl())
        self.scaled_step = module.scaled_step(layer.weight, threshold)
        self._grid = module.grid(self.scaled_step)  # (groups, tiles, out per group)

    def step_grid(self) -> torch.Tensor:
        return self._grid

    def _levels_and_slices(self):
        layer = self.layer
        lay, weight = layer.layout, layer.weight
        groups, tiles, out = self._grid.shape
        step = self._grid.permute(0, 2, 1).reshape(groups * out, tiles)
        w = weight.reshape(groups * out, lay.in_channels_per_group, -1)
        lo, hi = grid_bounds(weight, *layer.plan.weight_range())
        levels, slices = _FusedWeight.apply(w, step, layer.weight_step_module.tile_index, lo, hi,
                                            layer.plan.slicing, lay.channels_per_tile)
        return levels.view(weight.shape), slices.view((-1,) + tuple(weight.shape))

    def crossbar(self, tiles):
        """(integer weights q, weight step per (group, tile, out), array weight)."""
        q, slices = self._levels_and_slices()
        return q, self._grid, tiles.weight(slices)

    @property
    def value(self) -> torch.Tensor:
        """The dequantized weight: levels · step."""
        q, _ = self._levels_and_slices()
        return q * self.layer.weight_step_module.expand_to_weight(self.scaled_step)
