"""Quantizers with FIXED steps for the export form, and the Q/DQ pieces Brevitas cannot emit.

The export form copies every learned step (input, weight, ADC) out of the trained CIM layer
into constant Brevitas quantizers, so Brevitas' QCDQ exporter writes them as
QuantizeLinear → Clip → DequantizeLinear. Brevitas' standard QCDQ handlers accept 2..8 bits
only (and no unsigned grid above 8 bits); for anything else `FixedQDQ` emits the same Q/DQ
itself through a torch.onnx symbolic function (wide grids: Div → Round → Clip → Cast(int32) →
DequantizeLinear, since opset-13 QuantizeLinear has no output type wider than 8 bits).
"""
from __future__ import annotations

from typing import Optional

import torch
from brevitas.quant.scaled_int import Int8ActPerTensorFloat, Int8WeightPerTensorFloat
from torch import nn

BREVITAS_MIN_BITS = 2
BREVITAS_MAX_BITS = 8


def grid(bits: int, signed: bool, narrow: bool = False) -> tuple[int, int]:
    """Integer range of a `bits`-wide grid (narrow: symmetric signed, e.g. [-127, 127])."""
    if signed:
        return -(2 ** (bits - 1)) + int(narrow), 2 ** (bits - 1) - 1
    return 0, 2 ** bits - 1


def brevitas_can_export(bits: int) -> bool:
    """Whether Brevitas' standard QCDQ handlers accept this bit width (they assert 1 < bits <= 8)."""
    return BREVITAS_MIN_BITS <= int(bits) <= BREVITAS_MAX_BITS


class FixedStep(nn.Module):
    """A scaling module that returns a constant step (a learned step frozen for export).

    Brevitas computes `scale = scaling_impl(x, int_threshold)`; ignoring the threshold makes the
    scale exactly the stored step.
    """

    def __init__(self, fixed_step: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("value", torch.as_tensor(fixed_step, dtype=torch.float32).detach().clone())

    def forward(self, x: torch.Tensor, threshold: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.value


class FixedWeightQuant(Int8WeightPerTensorFloat):
    """Weight quantizer with a constant step of any broadcastable shape (per-tensor or (C_out, 1, ...)).

    Use `FixedWeightQuant.let(fixed_step=..., bit_width=..., signed=..., narrow_range=...)`.
    """

    scaling_impl = FixedStep
    fixed_step = None
    narrow_range = False
    signed = True


class FixedActQuant(Int8ActPerTensorFloat):
    """Activation quantizer with a constant step (per tensor, or per channel as (1, C, 1, 1)/(1, C))."""

    scaling_impl = FixedStep
    fixed_step = None
    narrow_range = False
    signed = True


def weight_quant(step: torch.Tensor, bits: int, signed: bool = True, narrow: bool = False):
    """A Brevitas weight-quantizer injector frozen at `step` with a `bits` grid."""
    return FixedWeightQuant.let(fixed_step=step.detach().float().clone(), bit_width=int(bits), signed=bool(signed),
                                narrow_range=bool(narrow))


def act_quant(step: torch.Tensor, bits: int, signed: bool, narrow: bool = False):
    """A Brevitas activation-quantizer injector frozen at `step` with a `bits` grid."""
    return FixedActQuant.let(fixed_step=step.detach().float().clone(), bit_width=int(bits), signed=bool(signed),
                             narrow_range=bool(narrow))


# ---------------------------------------------------------------------------------------------
# Our own Q/DQ for the grids Brevitas refuses, and the int32 bias where no Brevitas layer owns it.

def _onnx_int_type(lo: int, hi: int) -> torch.dtype:
    """The narrowest ONNX Q/DQ integer type holding [lo, hi] (int32 when 8 bits do not)."""
    if -128 <= lo and hi <= 127:
        return torch.int8
    if 0 <= lo and hi <= 255:
        return torch.uint8
    return torch.int32


def _const(g, value: torch.Tensor):
    return g.op("Constant", value_t=value)


class _FixedQDQFn(torch.autograd.Function):
    """clamp(round(x / step), lo, hi) · step; exported as Q → Clip → DQ (or its int32 form)."""

    @staticmethod
    def forward(ctx, x, step_flat, step_view, zero_point, lo: int, hi: int, axis: Optional[int]):
        return torch.clamp(torch.round(x / step_view), lo, hi) * step_view

    @staticmethod
    def symbolic(g, x, step_flat, step_view, zero_point, lo: int, hi: int, axis: Optional[int]):
        axis_kw = {} if axis is None else {"axis_i": axis}
        dtype = _onnx_int_type(lo, hi)
        if dtype != torch.int32:
            q = g.op("QuantizeLinear", x, step_flat, zero_point, **axis_kw)
            info = torch.iinfo(dtype)
            if (lo, hi) != (info.min, info.max):
                q = g.op("Clip", q, _const(g, torch.tensor(lo, dtype=dtype)), _const(g, torch.tensor(hi, dtype=dtype)))
            return g.op("DequantizeLinear", q, step_flat, zero_point, **axis_kw)
        # Wider than 8 bits: opset-13 QuantizeLinear cannot produce it; quantize with plain ops
        # and keep the DequantizeLinear (int32 input) so the integer grid stays explicit.
        levels = g.op("Round", g.op("Div", x, step_view))
        levels = g.op("Clip", levels, _const(g, torch.tensor(float(lo))), _const(g, torch.tensor(float(hi))))
        ints = g.op("Cast", levels, to_i=6)  # TensorProto.INT32
        return g.op("DequantizeLinear", ints, step_flat, zero_point, **axis_kw)


class FixedQDQ(nn.Module):
    """Fake quantization with a constant step, for grids Brevitas' QCDQ export refuses (1 bit, > 8 bits).

    step: one value, or one per channel along `axis` of an `ndim`-D input. Exported by our own
    symbolic function as QuantizeLinear → Clip → DequantizeLinear.
    """

    def __init__(self, step: torch.Tensor, bits: int, signed: bool, narrow: bool = False, axis: int = 1,
                 ndim: int = 4) -> None:
        super().__init__()
        step = step.detach().float().reshape(-1).clone()
        self.bits, self.signed, self.narrow = int(bits), bool(signed), bool(narrow)
        self.lo, self.hi = grid(self.bits, self.signed, self.narrow)
        per_channel = step.numel() > 1
        self.axis = axis if per_channel else None
        view = [1] * ndim
        if per_channel:
            view[axis] = step.numel()
        dtype = _onnx_int_type(self.lo, self.hi)
        self.register_buffer("step_flat", step if per_channel else step.reshape(()))
        self.register_buffer("step_view", step.reshape(view) if per_channel else step.reshape(()))
        self.register_buffer("zero_point", torch.zeros(step.numel() if per_channel else (), dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _FixedQDQFn.apply(x, self.step_flat, self.step_view, self.zero_point, self.lo, self.hi, self.axis)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, signed={self.signed}, narrow={self.narrow}, axis={self.axis}"


class _Int32BiasFn(torch.autograd.Function):
    """int32 bias · scale; exported as DequantizeLinear(int32 initializer, scale, axis 0)."""

    @staticmethod
    def forward(ctx, bias_int, scale, zero_point):
        return bias_int.to(scale.dtype) * scale

    @staticmethod
    def symbolic(g, bias_int, scale, zero_point):
        return g.op("DequantizeLinear", bias_int, scale, zero_point, axis_i=0)


class Int32Bias(nn.Module):
    """A bias stored as int32 at scale input_step · weight_step (per output channel), added to an
    (N, C, ...) output; used where no Brevitas layer owns the bias (ADC on, fallback pieces)."""

    def __init__(self, bias: torch.Tensor, scale: torch.Tensor, ndim: int) -> None:
        super().__init__()
        scale = scale.detach().float().reshape(-1).expand_as(bias).clone()
        levels = torch.round(bias.detach().float() / scale)
        if levels.abs().max() > 2 ** 31 - 1:
            raise OverflowError("bias does not fit int32 at scale input_step·weight_step")
        self.register_buffer("bias_int", levels.to(torch.int32))
        self.register_buffer("scale", scale)
        self.register_buffer("zero_point", torch.zeros(bias.numel(), dtype=torch.int32))
        self.view = (1, -1) + (1,) * (ndim - 2)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return y + _Int32BiasFn.apply(self.bias_int, self.scale, self.zero_point).reshape(self.view)
