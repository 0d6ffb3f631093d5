"""ROUTES: one case per way a CIM layer forward can run (lib.cim.route), shared by the tests that
check each route against the reference one (composed weights, products then the ADC module,
float32 products, eager kernels, nothing cached)."""
from __future__ import annotations

from dataclasses import dataclass, field

from lib.cim.integer_products import integer_kernels_here

INT8 = "int8" if integer_kernels_here() else "float32"  # what integer products become on this CPU


@dataclass(frozen=True)
class RouteCase:
    """A layer (kind, hardware overrides, attributes), a mode (train: forward and backward;
    eval: no autograd; eval-grad: evaluation mode with autograd recording), runtime changes, and
    the route fields the forward must take."""

    name: str
    kind: str
    mode: str
    expect: dict
    hw: dict = field(default_factory=dict)
    attributes: dict = field(default_factory=dict)
    runtime: dict = field(default_factory=dict)
    input_signed: bool = True
    large: bool = False  # partial sums past the node's chunk size
    noise: str = ""  # a device-noise preset attached to the layer (lib.cim.noise)

    def __str__(self) -> str:
        return self.name


ROUTES = [
    RouteCase("conv-train-node", "conv", "train",
              dict(chain="cim", path="crossbar", weights="fused", input="float", products=INT8, conversion="node",
                   chunking="whole", backward="node", gradient_dtype="float32", executor="direct")),
    RouteCase("conv-train-composed-weights", "conv", "train", dict(weights="composed", conversion="node"),
              attributes={"fused_weights": False}),
    RouteCase("conv-train-adc-module", "conv", "train", dict(weights="fused", conversion="adc", backward="adc"),
              attributes={"fused_adc": False}),
    RouteCase("conv-train-float-products", "conv", "train", dict(products="float32", conversion="node"),
              runtime={"integer_products": False}),
    RouteCase("conv-train-eager", "conv", "train", dict(executor="eager", conversion="node"),
              runtime={"compile": "0"}),
    RouteCase("conv-train-chunked", "conv", "train", dict(conversion="node", chunking="rows"), large=True),
    RouteCase("conv-train-bit-serial", "conv", "train", dict(conversion="node", products=INT8),
              hw={"input_mode": "bit-serial", "input_bits": 2}),
    RouteCase("conv-train-offset", "conv", "train", dict(conversion="node"), hw={"mapping": "offset"}),
    RouteCase("conv-eval-codes", "conv", "eval",
              dict(weights="cached", input="codes" if INT8 == "int8" else "float", products=INT8,
                   conversion="no-grad", backward="none", gradient_dtype="none")),
    RouteCase("conv-eval-codes-epilogue", "conv", "eval",
              dict(weights="cached", input="codes" if INT8 == "int8" else "float",
                   products="int8-epilogue" if INT8 == "int8" else "float32", conversion="no-grad"),
              input_signed=False),
    RouteCase("conv-eval-offset", "conv", "eval", dict(weights="cached", input="float", conversion="no-grad"),
              hw={"mapping": "offset"}),
    RouteCase("conv-eval-uncached", "conv", "eval", dict(weights="fused", conversion="no-grad"),
              attributes={"cache_eval": False}),
    RouteCase("conv-eval-chunked", "conv", "eval", dict(weights="cached", conversion="no-grad", chunking="rows"),
              large=True, input_signed=False),
    RouteCase("conv-eval-autograd", "conv", "eval-grad", dict(weights="fused", conversion="node", backward="node")),
    RouteCase("conv-adc-off", "conv", "train", dict(path="dequantized", products="none", conversion="none",
                                                     backward="autograd"), hw={"psum_granularity": "off"}),
    RouteCase("conv-adc-off-forced", "conv", "train", dict(path="crossbar", conversion="adc", backward="adc"),
              hw={"psum_granularity": "off"}, attributes={"force_crossbar": True}),
    RouteCase("linear-train-node", "linear", "train", dict(weights="fused", products=INT8, conversion="node")),
    RouteCase("linear-train-bit-serial", "linear", "train", dict(conversion="node"),
              hw={"input_mode": "bit-serial", "input_bits": 2}),
    RouteCase("linear-train-chunked", "linear", "train", dict(conversion="node", chunking="rows"), large=True),
    RouteCase("linear-eval", "linear", "eval", dict(weights="cached", input="float", products=INT8,
                                                    conversion="no-grad")),
    RouteCase("linear-adc-off", "linear", "train", dict(path="dequantized"), hw={"psum_granularity": "off"}),
    RouteCase("conv-train-noisy", "conv", "train", dict(weights="composed", products="float32", conversion="node"),
              noise="rram"),
    RouteCase("conv-eval-noisy", "conv", "eval", dict(weights="composed", input="float", products="float32",
                                                      conversion="no-grad"), noise="rram"),
    RouteCase("linear-adc-off-noisy", "linear", "train", dict(path="crossbar", weights="composed", conversion="adc"),
              hw={"psum_granularity": "off"}, noise="rram"),
]
