"""Crossbar (CIM) quantization: hardware description, quantizers, CIM layers, model conversion."""
from lib.cim.hardware import HardwareConfig, HardwareConfigError

__all__ = ["HardwareConfig", "HardwareConfigError"]
