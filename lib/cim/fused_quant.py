"""A drop-in for Brevitas' IntQuant in the CIM input quantizers: the same grid and LSQ gradients
(round-to-nearest-even, clamp to the grid; the input passes where the rounded value is on the
grid, the step gets level − x/step there and the clipped level elsewhere), computed in one fused
kernel per direction instead of Brevitas' chain of elementwise ops on the whole activation.
"""
from __future__ import annotations

import torch
from torch import nn

from lib.cim.adc_kernels import dense, quant_backward, quant_forward, quant_forward_abs_sum


class _FakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, lo, hi, with_abs_sum: bool, channels_last: bool):
        ctx.save_for_backward(x, scale, lo, hi)
        if not with_abs_sum:
            return quant_forward(x, scale, lo, hi, channels_last)
        out, abs_sum = quant_forward_abs_sum(x, scale, lo, hi, channels_last)
        ctx.mark_non_differentiable(abs_sum)
        return out, abs_sum

    @staticmethod
    def backward(ctx, grad, *_abs_sum_grad):
        x, scale, lo, hi = ctx.saved_tensors
        # the kernel reads grad in its own dense layout and writes x's gradient in x's
        grad_x, grad_scale = quant_backward(dense(grad), x, scale, lo, hi)
        return grad_x, grad_scale.reshape(scale.shape), None, None, None, None


class FusedIntQuant(nn.Module):
    """Brevitas IntQuant's interface (forward(scale, zero_point, bit_width, x) → dequantized x) for
    per-tensor scales and a zero zero-point, as the CIM input quantizers use."""

    def __init__(self, narrow_range: bool, signed: bool, input_view_impl: nn.Module) -> None:
        super().__init__()
        self.narrow_range = narrow_range
        self.signed = signed
        self.input_view_impl = input_view_impl

    def min_int(self, bit_width: torch.Tensor) -> torch.Tensor:
        if not self.signed:
            return torch.zeros_like(bit_width)
        low = -(2.0 ** (bit_width - 1))
        return low + 1 if self.narrow_range else low

    def max_int(self, bit_width: torch.Tensor) -> torch.Tensor:
        return 2.0 ** (bit_width - 1) - 1 if self.signed else 2.0 ** bit_width - 1

    def forward(self, scale: torch.Tensor, zero_point: torch.Tensor, bit_width: torch.Tensor,
                x: torch.Tensor) -> torch.Tensor:
        x = self.input_view_impl(x)
        if scale.numel() != 1:
            raise ValueError(f"FusedIntQuant quantizes with one step per tensor; got a scale of shape "
                             f"{tuple(scale.shape)}")
        lo, hi = self.min_int(bit_width).to(x.dtype), self.max_int(bit_width).to(x.dtype)
        return fake_quant(x, scale, lo, hi)


def fake_quant(x: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
               channels_last: bool = False) -> torch.Tensor:
    """clamp(round(x / scale), lo, hi) · scale with LSQ's gradients (one step; lo, hi: 0-d tensors
    of x's dtype); the kernel alone where autograd records nothing (evaluation). channels_last:
    the output is written NHWC whatever x's layout (x's gradient keeps x's)."""
    scale = scale.to(x.dtype)
    if torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad):
        return _FakeQuant.apply(x, scale, lo, hi, False, channels_last)
    return quant_forward(x, scale, lo, hi, channels_last)


def fake_quant_abs_sum(x: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                       channels_last: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(`fake_quant`, Σ|x| as a 0-d tensor without gradient) from one pass over x: what a training
    forward needs for the input step's running |x| mean (lib.cim.steps.ActStep)."""
    scale = scale.to(x.dtype)
    if torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad):
        return _FakeQuant.apply(x, scale, lo, hi, True, channels_last)
    return quant_forward_abs_sum(x, scale, lo, hi, channels_last)
