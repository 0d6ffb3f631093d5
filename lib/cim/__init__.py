"""Crossbar (CIM) quantization: hardware description, quantizers, CIM layers, model conversion."""
from lib.cim.convert import (ConversionError, apply_policy, calibrate, current_policy, quantizable_layers,
                             quantize_model)
from lib.cim.deploy import faithful_copy, set_input_mode
from lib.cim.hardware import HardwareConfig, HardwareConfigError
from lib.cim.layers import CIMConv2d, CIMLayerMixin, CIMLinear

__all__ = ["HardwareConfig", "HardwareConfigError", "CIMConv2d", "CIMLinear", "CIMLayerMixin",
           "quantize_model", "quantizable_layers", "apply_policy", "current_policy", "calibrate",
           "ConversionError", "faithful_copy", "set_input_mode"]
