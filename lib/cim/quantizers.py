"""Brevitas quantizers for CIM layers, composed by dependency injection from Brevitas' integer
quantizers and our LSQ step / mutable bit-width modules.

Weights: signed integer grid [-2^(b-1), 2^(b-1)-1], or the narrow (symmetric) grid
[-(2^(b-1)-1), 2^(b-1)-1] that differential magnitudes use (`GridSwitch`, which the layer flips
when its bits change and Brevitas reads whenever it rebuilds the quantizer, e.g. on a state
load), one learned step per layer / channel / array / column. Inputs: unsigned [0, 2^a-1] after a ReLU, signed otherwise, one learned step,
quantized by FusedIntQuant (Brevitas IntQuant's maths in one fused kernel per direction).
`scaling_impl_type = PARAMETER` makes Brevitas clamp with the gradient LSQ needs (zero outside
the grid for x, Q_n/Q_p for the step).
"""
from __future__ import annotations

import torch
from brevitas.core.scaling import IntScaling
from brevitas.inject import value
from brevitas.inject.enum import ScalingImplType
from brevitas.quant.scaled_int import Int8ActPerTensorFloat, Int8WeightPerTensorFloat, Uint8ActPerTensorFloat
from torch.nn.modules import module as module_hooks

from lib.cim.adc_kernels import grid_bounds
from lib.cim.fused_quant import FusedIntQuant
from lib.cim.steps import ActStep, MutableBitWidth, WeightStep


class GridSwitch:
    """Whether a layer's weight grid is narrow now: one mutable object shared by the layer and
    every quantizer Brevitas builds for it."""

    def __init__(self, narrow: bool) -> None:
        self.narrow = bool(narrow)


class CIMWeightQuant(Int8WeightPerTensorFloat):
    """Signed LSQ weight quantizer; pass `weight_granularity`, `weight_tile_layout`,
    `weight_weight_ndim`, `weight_bit_width` and `weight_grid_switch` as layer keyword arguments."""

    scaling_impl_type = ScalingImplType.PARAMETER
    scaling_impl = WeightStep
    bit_width_impl = MutableBitWidth
    grid_switch = None
    signed = True

    @value
    def narrow_range(grid_switch):
        return grid_switch is not None and grid_switch.narrow
    granularity = "layer"
    tile_layout = None
    weight_ndim = 4


class CIMUnsignedActQuant(Uint8ActPerTensorFloat):
    """Unsigned LSQ input quantizer (inputs that come out of a ReLU)."""

    scaling_impl_type = ScalingImplType.PARAMETER
    scaling_impl = ActStep
    bit_width_impl = MutableBitWidth
    int_quant = FusedIntQuant


class CIMSignedActQuant(Int8ActPerTensorFloat):
    """Signed LSQ input quantizer (network input, residual sums, anything not after a ReLU)."""

    scaling_impl_type = ScalingImplType.PARAMETER
    scaling_impl = ActStep
    bit_width_impl = MutableBitWidth
    int_quant = FusedIntQuant
    narrow_range = False


def hooked(*modules) -> bool:
    """Whether calling any of `modules` would run a forward hook (its own or a global one)."""
    if module_hooks._global_forward_hooks or module_hooks._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules)


def int_range(bits: int, signed: bool, narrow: bool) -> tuple[int, int]:
    """Brevitas' min_int / max_int of a `bits`-bit grid."""
    if signed:
        return -(2 ** (bits - 1)) + int(narrow), 2 ** (bits - 1) - 1
    return 0, 2 ** bits - 1 - int(narrow)


def int_threshold(tensor_quant) -> torch.Tensor:
    """What a quantizer's `int_scaling_impl(msb_clamp_bit_width_impl())` returns (IntScaling: -min_int
    signed, max_int unsigned), as a cached 0-d tensor of the bit width's dtype and device: no module
    calls or tensor ops per forward. Other modules, or modules with hooks, are called."""
    bits, scaling = tensor_quant.msb_clamp_bit_width_impl, tensor_quant.int_scaling_impl
    if type(bits) is not MutableBitWidth or type(scaling) is not IntScaling or hooked(bits, scaling):
        return scaling(bits())
    lo, hi = int_range(bits.value, scaling.signed, scaling.narrow_range)
    threshold = -lo if scaling.signed else hi
    return grid_bounds(bits.bits, threshold, threshold)[0]
