"""Bit-serial inputs: the quantized input split into DAC planes stacked along the batch, and the
digital shift-and-add that joins the planes' converted outputs again.

Stacking the planes along the batch (rows of the grouped conv / batched matmul) keeps one
crossbar product and one ADC call per layer, whatever the number of planes. The split's
gradient is straight-through: plane p receives share_p = 2^(-p·input_bits) / P of it, so that
Σ_p 2^(p·input_bits) · plane_p has gradient exactly 1 with respect to the input.
"""
from __future__ import annotations

import torch

from lib.cim.crossbar import input_digits


def plane_values(x: torch.Tensor, step: torch.Tensor, planes: int, input_bits: int) -> torch.Tensor:
    """The planes of the quantized input x (values on the grid of `step`), at x's scale, stacked
    along dim 0: (P·N, ...). Plain elementwise ops, so the export form can use it as is."""
    digits = input_digits(torch.round(x / step), planes, input_bits)
    return (digits * step).reshape((-1,) + tuple(x.shape[1:]))


class _SplitPlanes(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, step, planes: int, input_bits: int):
        ctx.planes = planes
        ctx.shares = 2.0 ** (-input_bits * torch.arange(planes, dtype=x.dtype, device=x.device)) / planes
        out = plane_values(x, step.detach(), planes, input_bits)
        if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
            out = out.contiguous(memory_format=torch.channels_last)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.reshape((ctx.planes, -1) + tuple(grad.shape[1:]))
        shares = ctx.shares.view((ctx.planes,) + (1,) * (grad.dim() - 1))
        return (grad * shares).sum(0), None, None, None


def split_planes(x: torch.Tensor, step: torch.Tensor, planes: int, input_bits: int) -> torch.Tensor:
    """x (N, ...) quantized with `step` → its `planes` DAC planes stacked as (P·N, ...); x itself when
    planes == 1. Differentiable in x (straight-through, see the module docstring)."""
    if planes == 1:
        return x
    return _SplitPlanes.apply(x, step, planes, input_bits)


def join_planes(y: torch.Tensor, significance: torch.Tensor) -> torch.Tensor:
    """Shift-and-add of per-plane outputs (P·M, ...) → (M, ...) with 2^(p·input_bits) per plane."""
    planes = significance.numel()
    if planes == 1:
        return y
    stacked = y.reshape((planes, -1) + tuple(y.shape[1:]))
    return (stacked * significance.view((planes,) + (1,) * (stacked.dim() - 1))).sum(0)
