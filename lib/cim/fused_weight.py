"""A CIM layer's weight path in training as one fused kernel per direction.

Forward: LSQ fake quantization of the weight to its integer levels (w / step, round half to
even, clamp to the plan's grid) and, in the same pass, the levels' cell slices with their sign
mapping (`crossbar.cell_values`, the plan's rule), written as small integers
(`CellSlicing.storage_dtype`) without a float copy of the levels (the crossbar nodes only route the
levels' gradient); or the levels alone where a dequantized weight is needed. Backward: from the gradient of the levels, the
gradients of the weight (straight through where the rounded value is on the grid) and of the
step grid (−Σ grad·v / step over the weights sharing a step, v = w / step), again one pass.
Brevitas' weight quantizer followed by `value / scale` and the slicing compute the same values
and gradients in a chain of full-size elementwise ops; `FusedWeights` is what the layers use
instead in training (see `CIMLayerMixin.forward_impl`). The LSQ gradient scale 1/sqrt(n·Q_p)
and the step's granularity stay with the step module (`WeightStep.scaled_step`): only the small
step grid goes into the kernels, broadcast along each tile row of the weight.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from lib.cim.adc_kernels import grid_bounds
from lib.cim.fused_op import FusedOp
from lib.cim.crossbar import CellSlicing, cell_values
from lib.cim.quantizers import int_threshold


def _levels_functional(w, step, lo, hi):
    """clamp(round(w / step), lo, hi) for w (rows, tiles, weights per tile row) and one step per
    (row, tile): the step broadcasts along the contiguous last dim."""
    return torch.clamp(torch.round(w / step.unsqueeze(-1)), lo, hi)


def _levels_eager(w, step, lo, hi):
    return torch.round(w / step.unsqueeze(-1)).clamp_(lo, hi)


def _slices_functional(w, step, lo, hi, slicing: CellSlicing):
    """The cell slices of the levels, in the slicing's compact integer dtype (the levels
    themselves are never written out)."""
    return cell_values(_levels_functional(w, step, lo, hi), slicing).to(slicing.storage_dtype)


def _slices_eager(w, step, lo, hi, slicing: CellSlicing):
    return cell_values(_levels_eager(w, step, lo, hi), slicing).to(slicing.storage_dtype)


def _backward_functional(grad, w, step, lo, hi):
    """(grad wrt w, grad wrt step (rows, tiles)) from the levels' gradient: one pass."""
    s = step.unsqueeze(-1)
    v = w / s
    rounded = torch.round(v)
    g = torch.where((rounded >= lo) & (rounded <= hi), grad, 0.0)
    return g / s, -(g * v).sum(dim=-1) / step


def _backward_eager(grad, w, step, lo, hi):
    s = step.unsqueeze(-1)
    v = w / s
    rounded = torch.round(v)
    g = grad * (rounded >= lo).logical_and_(rounded <= hi)
    sums = v.mul_(g).sum(dim=-1)
    return g.div_(s), sums.div_(step).neg_()


WEIGHT_LEVELS = FusedOp("weight_levels", _levels_functional, _levels_eager)
WEIGHT_SLICES = FusedOp("weight_slices", _slices_functional, _slices_eager)
WEIGHT_BACKWARD = FusedOp("weight_backward", _backward_functional, _backward_eager)


def _by_tile(x: torch.Tensor, tiles: int, pad: int) -> torch.Tensor:
    """(rows, channels, kernel elems) → (rows, tiles, channels_per_tile·kernel elems), the ragged
    tile zero-padded (a copy only then)."""
    if pad:
        x = F.pad(x, (0, 0, 0, pad))
    return x.reshape(x.shape[0], tiles, -1)


def _unpadded(x: torch.Tensor, shape, pad: int) -> torch.Tensor:
    """Inverse of `_by_tile` for a tensor with leading dims, to `shape` (channels, kernel elems last)."""
    x = x.reshape(x.shape[:-2] + (-1,) + tuple(shape[-1:]))
    if pad:
        x = x[..., :shape[-2], :].contiguous()
    return x.reshape(shape)


class _FusedWeight(torch.autograd.Function):
    """The integer levels of a weight viewed (rows, channels, kernel elems) for a step per (row,
    row-tile), or, given a `slicing`, their cell slices in its compact integer dtype with a
    gradient carrier in place of the levels: an expanded zero of the levels' shape, which the
    crossbar nodes read only for its shape and route the levels' gradient to (see
    lib.cim.tile_products); the slices come as the kernel writes them, (slices, rows, tiles,
    weights per tile row) with the padding, for the tiles to lay out (`weight_from_tiled`). Either
    way the backward takes the levels' gradient to the weight and the step."""

    @staticmethod
    def forward(ctx, w, step, lo, hi, slicing: Optional[CellSlicing], pad: int):
        tiled = _by_tile(w, step.shape[1], pad)
        ctx.save_for_backward(tiled, step, lo, hi)
        ctx.shape, ctx.pad = w.shape, pad
        if slicing is None:
            levels = WEIGHT_LEVELS(tiled, step, lo, hi)
            return _unpadded(levels, w.shape, pad), None
        ctx.set_materialize_grads(False)  # no full-size zero gradient for the slices
        slices = WEIGHT_SLICES(tiled, step, lo, hi, slicing)
        ctx.mark_non_differentiable(slices)
        return w.new_zeros(()).expand(w.shape), slices

    @staticmethod
    def backward(ctx, grad_levels, _grad_slices):
        tiled, step, lo, hi = ctx.saved_tensors
        grad = _by_tile(grad_levels, step.shape[1], ctx.pad)
        grad_w, grad_step = WEIGHT_BACKWARD(grad, tiled, step, lo, hi)
        return _unpadded(grad_w, ctx.shape, ctx.pad), grad_step, None, None, None, None


class FusedWeights:
    """A CIM layer's weight side for one training forward, from the fused kernels: the weight
    step grid, the integer levels with the stored cell slices, and the dequantized weight. The
    same values and gradients as Brevitas' quantized weight (`ComposedWeights`)."""

    cached = False  # never served from the layer's eval cache

    def __init__(self, layer) -> None:
        self.layer = layer
        module = layer.weight_step_module
        tensor_quant = layer.weight_quant.tensor_quant
        threshold = int_threshold(tensor_quant)
        self.scaled_step = module.scaled_step(layer.weight, threshold)
        self._grid = module.grid(self.scaled_step)  # (groups, tiles, out per group)

    def step_grid(self) -> torch.Tensor:
        return self._grid

    def _fused(self, slicing: Optional[CellSlicing]):
        layer = self.layer
        lay, weight = layer.layout, layer.weight
        groups, tiles, out = self._grid.shape
        step = self._grid.permute(0, 2, 1).reshape(groups * out, tiles)
        w = weight.reshape(groups * out, lay.in_channels_per_group, -1)
        lo, hi = grid_bounds(weight, *layer.plan.weight_range())
        return _FusedWeight.apply(w, step, lo, hi, slicing, lay.pad)

    def levels(self) -> torch.Tensor:
        """The integer levels, the weight's shape (differentiable in the weight and the step)."""
        levels, _ = self._fused(None)
        return levels.view(self.layer.weight.shape)

    def crossbar(self, tiles):
        """(gradient carrier of the integer weights q, weight step per (group, tile, out), array
        weight in the slicing's compact integer dtype): what the crossbar nodes need, without a
        full-size float copy of the levels or slices."""
        carrier, slices = self._fused(self.layer.plan.slicing)
        return carrier.view(self.layer.weight.shape), self._grid, tiles.weight_from_tiled(slices)

    @property
    def value(self) -> torch.Tensor:
        """The dequantized weight: levels · step."""
        return self.levels() * self.layer.weight_step_module.expand_to_weight(self.scaled_step)
