"""Where the CIM layers meet Brevitas' internals: the only module that reads its injector keys,
its submodule paths and its state-dict names.

A CIM layer is a Brevitas QuantConv2d / QuantLinear whose quantizers are this project's
(lib.cim.quantizers): these functions build their arguments, find the bit-width and step modules
inside Brevitas' proxies, recognise the plain CIM input quantizer (whose steps the layer calls
directly), and name the state entries that carry the bits. A Brevitas upgrade that moves any of
them changes this module alone.
"""
from __future__ import annotations

from typing import Optional

import torch
from brevitas.core.function_wrapper import Identity as BrevitasIdentity
from brevitas.core.quant import RescalingIntQuant
from brevitas.core.scaling import IntScaling
from brevitas.quant_tensor import QuantTensor
from torch import nn

from lib.cim.crossbar import TileLayout
from lib.cim.fused_quant import FusedIntQuant
from lib.cim.quantizers import (CIMSignedActQuant, CIMUnsignedActQuant, CIMWeightQuant, GridSwitch, hooked,
                                int_range, int_threshold)
from lib.cim.steps import ActStep, MutableBitWidth

_IDENTITIES = (nn.Identity, BrevitasIdentity)  # the no-op activation / input view of a plain quantizer

# state-dict entries (below the layer's prefix) that carry the bits
WEIGHT_BITS_KEY = "weight_quant.tensor_quant.msb_clamp_bit_width_impl.bits"
INPUT_BITS_KEY = "input_quant.fused_activation_quant_proxy.tensor_quant.msb_clamp_bit_width_impl.bits"


def quant_kwargs(granularity: str, layout: TileLayout, w_bit: int, a_bit: int, input_signed: bool,
                 weight_ndim: int, narrow: bool) -> dict:
    """Brevitas' keyword arguments for a CIM layer: this project's weight and input quantizers
    (weight steps at `granularity` over `layout`), no bias or output quantizer, plain outputs."""
    return dict(
        weight_quant=CIMWeightQuant,
        weight_grid_switch=GridSwitch(narrow),
        weight_granularity=granularity,
        weight_tile_layout=layout,
        weight_weight_ndim=weight_ndim,
        weight_bit_width=int(w_bit),
        input_quant=CIMSignedActQuant if input_signed else CIMUnsignedActQuant,
        input_bit_width=int(a_bit),
        bias_quant=None,
        output_quant=None,
        return_quant_tensor=False,
    )


def set_narrow_weight_grid(layer, switch: GridSwitch, narrow: bool) -> None:
    """Narrow (symmetric) or full weight grid: in the quantizer in use and in the switch Brevitas
    reads when it rebuilds one."""
    switch.narrow = narrow
    layer.weight_quant.tensor_quant.int_quant.narrow_range = narrow


# submodules read from the _modules dicts (what nn.Module.__getattr__ returns, without its lookups):
# the layer's plan reads both bit widths several times per forward
def weight_bits_module(layer) -> MutableBitWidth:
    return layer._modules["weight_quant"]._modules["tensor_quant"]._modules["msb_clamp_bit_width_impl"]


def input_bits_module(layer) -> MutableBitWidth:
    proxy = layer._modules["input_quant"]._modules["fused_activation_quant_proxy"]
    return proxy._modules["tensor_quant"]._modules["msb_clamp_bit_width_impl"]


def weight_step_module(layer):
    return layer._modules["weight_quant"]._modules["tensor_quant"]._modules["scaling_impl"]


def input_step_module(layer):
    return layer.input_quant.fused_activation_quant_proxy.tensor_quant.scaling_impl


def weight_quantizer(layer) -> nn.Module:
    """The weight quantizer proxy (whose tensors the eval cache is keyed by)."""
    return layer._modules["weight_quant"]


def weight_export_mode(layer) -> bool:
    return bool(getattr(layer.weight_quant, "export_mode", False))


def plain_input_quant(layer) -> Optional[RescalingIntQuant]:
    """The input quantizer's RescalingIntQuant when it is the CIM one (lib.cim.quantizers: ActStep
    itself, whose steps the layer calls, MutableBitWidth, FusedIntQuant, no activation, no caching,
    not exporting, no forward hooks that its calls would run), else None."""
    proxy = layer.input_quant
    if not proxy.is_quant_enabled or proxy.export_mode or proxy.cache_inference_quant_act:
        return None
    fused = proxy.fused_activation_quant_proxy
    if fused is None or type(fused.activation_impl) not in _IDENTITIES:
        return None
    tensor_quant = fused.tensor_quant
    if hooked(proxy, fused, tensor_quant, tensor_quant.scaling_impl):
        return None
    if (type(tensor_quant) is not RescalingIntQuant or tensor_quant.observer_only
            or type(tensor_quant.int_quant) is not FusedIntQuant
            or type(tensor_quant.int_quant.input_view_impl) not in _IDENTITIES
            or type(tensor_quant.int_scaling_impl) is not IntScaling
            or type(tensor_quant.msb_clamp_bit_width_impl) is not MutableBitWidth
            or type(tensor_quant.scaling_impl) is not ActStep):
        return None
    return tensor_quant


def input_grid_bounds(tensor_quant) -> tuple[int, int, torch.Tensor]:
    """(lo, hi) of the input grid at the quantizer's bit width, as FusedIntQuant computes them,
    and the threshold its scaling module receives (Brevitas' IntScaling: -lo signed, hi
    unsigned) as a cached 0-d tensor of the bit width's dtype and device."""
    int_quant = tensor_quant.int_quant
    lo, hi = int_range(tensor_quant.msb_clamp_bit_width_impl.value, int_quant.signed, int_quant.narrow_range)
    return lo, hi, int_threshold(tensor_quant)


def unwrap(x):
    """The tensor of a Brevitas QuantTensor (plain tensors as they are)."""
    return x.value if isinstance(x, QuantTensor) else x


def scale_of(x) -> Optional[torch.Tensor]:
    """The step of a Brevitas QuantTensor, None for a plain tensor."""
    return x.scale if isinstance(x, QuantTensor) else None


def tracing() -> bool:
    """Whether a graph is being traced or exported (it must then contain Brevitas' quantizers)."""
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling()
