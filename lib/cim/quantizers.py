"""Brevitas quantizers for CIM layers, composed by dependency injection from Brevitas' integer
quantizers and our LSQ step / mutable bit-width modules.

Weights: signed integer grid [-2^(b-1), 2^(b-1)-1], one learned step per layer / channel /
array / column. Inputs: unsigned [0, 2^a-1] after a ReLU, signed otherwise, one learned step,
quantized by FusedIntQuant (Brevitas IntQuant's maths in one fused kernel per direction).
`scaling_impl_type = PARAMETER` makes Brevitas clamp with the gradient LSQ needs (zero outside
the grid for x, Q_n/Q_p for the step).
"""
from __future__ import annotations

from brevitas.inject.enum import ScalingImplType
from brevitas.quant.scaled_int import Int8ActPerTensorFloat, Int8WeightPerTensorFloat, Uint8ActPerTensorFloat

from lib.cim.fused_quant import FusedIntQuant
from lib.cim.steps import ActStep, MutableBitWidth, WeightStep


class CIMWeightQuant(Int8WeightPerTensorFloat):
    """Signed LSQ weight quantizer; pass `weight_granularity`, `weight_tile_layout`,
    `weight_weight_ndim` and `weight_bit_width` as layer keyword arguments."""

    scaling_impl_type = ScalingImplType.PARAMETER
    scaling_impl = WeightStep
    bit_width_impl = MutableBitWidth
    narrow_range = False
    signed = True
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
