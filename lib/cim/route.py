"""How one CIM layer forward runs, as a value: `Route`, chosen by one pure function `choose_route`.

A CIM layer's forward can run in several ways that compute the same values (tests check each
against the others): Brevitas' proxy chain (export, tracing), the plain layer on dequantized
tensors (ADC off), or the crossbar MVM; its weight side from the fused training kernels, from
Brevitas' quantizer, or from the eval cache; its input as floats or as uint8 codes; partial sums
as float32 or int8 products (with the ADC in the int8 conv's epilogue in evaluation); converted
by one fused crossbar + ADC autograd node, by the same kernels without autograd, or by products
followed by the ADC module; partial sums whole or in chunks of rows; kernels direct, compiled or
eager. Everything that choice depends on goes in (the layer's `CrossbarPlan`, its `LayerFlags`,
the `Runtime` and the `InputMeta` of this forward); the layer then follows the route it was
given, and counts the routes it took (`CIMLayerMixin.route_counts`, in every run's report).
"""
from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch

from lib.cim.crossbar import CrossbarPlan
from lib.cim.fused_op import executor_for
from lib.cim.gradient_products import native_bfloat16
from lib.cim.integer_products import integer_kernels_here, level_dtype, sums_stay_exact
from lib.cim.runtime import Runtime

class LayerFlags(NamedTuple):
    """What a layer's state says about its forward (its switches and its quantizers' state); a
    tuple, cheap to make and hash on every forward."""

    kind: str  # conv | linear
    export_mode: bool  # the layer in Brevitas' export mode (the graph must contain its quantizers)
    weight_export_mode: bool  # its weight quantizer in export mode (no cached constants)
    weight_quant_enabled: bool
    training: bool
    force_crossbar: bool  # the crossbar path even with the ADC off (tests, studies)
    fused_adc: bool  # crossbar MVM + ADC as one autograd node where the ADC allows
    fused_weights: bool  # weight side from lib.cim.fused_weight where not cached
    cache_eval: bool  # keep the crossbar form between evaluation forwards
    adc_enabled: bool
    adc_fusable: bool  # ADC on, step set, no clipping statistics (PartialSumADC.fusable)
    adc_lo: int
    adc_hi: int
    padding_zeros: bool
    input_quantized: bool  # the input quantizer on: the crossbar input has a step
    plain_input_quant: bool  # the CIM input quantizer, called directly (CIMLayerMixin._plain_input_quant)
    input_step_ready: bool  # the input step set and frozen (evaluation)
    side_requires_grad: bool  # the weight, its quantizer's or the ADC's tensors need gradients
    input_mode: str  # bit-serial | multi-bit
    device_noise: bool  # device non-idealities change its cells (lib.cim.noise)


class InputMeta(NamedTuple):
    """What this forward's input and context say: its device and dtype, autograd, tracing, whether
    it needs a gradient, and whether its partial sums are too large to keep whole."""

    device_type: str
    dtype_name: str  # torch dtype without the "torch." prefix
    element_bytes: int
    grad_enabled: bool
    tracing: bool
    requires_grad: bool  # the input, or the input quantizer's step
    large: bool  # its partial sums exceed what a node keeps whole (crossbar_adc.partial_sums_chunked)


@dataclass(frozen=True)
class Route:
    """One CIM layer forward's way through the code (see the module docstring)."""

    chain: str  # cim: the layer's own forward | brevitas: Brevitas' proxy chain (export, tracing)
    path: str  # crossbar | dequantized (ADC off: the plain layer on dequantized tensors)
    weights: str  # fused | composed | cached
    input: str  # float | codes (uint8 codes straight from the unquantized input)
    products: str  # float32 | int8 | int8-epilogue (ADC levels written by the int8 conv) | none
    conversion: str  # node (one autograd node) | no-grad (the same kernels, no node) | adc (products, then the ADC module) | none
    chunking: str  # whole | rows (partial sums made and converted in chunks of rows) | none
    backward: str  # none | node (slices merged where the ADC clipped little, else full) | adc | autograd
    gradient_dtype: str  # float32 | bfloat16 | none
    executor: str  # direct | compiled | eager (how its fused kernels run)

    def describe(self) -> str:
        """A short, stable text form, for reports and counts."""
        return " ".join(f"{key}={value}" for key, value in asdict(self).items())


@functools.lru_cache(maxsize=None)
def dtype_name(dtype: torch.dtype) -> str:
    """A torch dtype's name without the "torch." prefix."""
    return str(dtype).rsplit(".", 1)[-1]


class UnsupportedRoute(ValueError):
    """A combination of plan, flags and runtime no route serves."""


@functools.lru_cache(maxsize=4096)
def choose_route(plan: CrossbarPlan, flags: LayerFlags, runtime: Runtime, inputs: InputMeta) -> Route:
    """The route of one forward. Pure: the same arguments give the same route (memoised)."""
    if flags.kind not in ("conv", "linear"):
        raise UnsupportedRoute(f"layer kind {flags.kind!r}: expected conv or linear")
    chain = "brevitas" if (flags.export_mode or inputs.tracing or not flags.weight_quant_enabled) else "cim"
    # a noisy layer's cells are formed in one place (the composed weights): the crossbar even with
    # the ADC off, nothing cached, no fused weight kernels, float products of its non-integer cells
    noisy = flags.device_noise
    path = "crossbar" if (flags.adc_enabled or flags.force_crossbar or noisy) else "dequantized"
    if caches_crossbar_form(flags.training, flags.cache_eval, inputs.tracing, flags.weight_export_mode,
                            inputs.grad_enabled, flags.side_requires_grad, noisy):
        weights = "cached"
    elif chain == "cim" and flags.fused_weights and not noisy:
        weights = "fused"
    else:
        weights = "composed"
    needs_grad = inputs.grad_enabled and (inputs.requires_grad or flags.side_requires_grad)
    fused = flags.adc_fusable and flags.fused_adc
    planes = plan.input_planes(flags.input_mode)
    executor = executor_for(inputs.device_type, runtime)

    if path == "dequantized":
        return Route(chain, path, weights, "float", "none", "none", "none", "autograd" if needs_grad else "none",
                     "none", executor)
    # an evaluation conv reading only its input's integer codes takes them from the input in one kernel
    codes = (chain == "cim" and not noisy and flags.kind == "conv" and not flags.training and not inputs.grad_enabled
             and flags.padding_zeros and plan.differential and fused and flags.plain_input_quant
             and planes == 1 and flags.input_step_ready and _integer_products(plan, runtime, inputs, 1))
    int8 = flags.input_quantized and not noisy and _integer_products(plan, runtime, inputs, planes)
    conversion = ("node" if needs_grad else "no-grad") if fused else "adc"
    chunked = conversion != "adc" and inputs.large
    products = "int8" if int8 else "float32"
    # outputs made without keeping partial sums (no autograd, or a node's chunks) convert in the
    # int8 conv's epilogue where the levels fit in 8 bits
    if (products == "int8" and (conversion == "no-grad" or chunked) and flags.kind == "conv"
            and plan.input_zero_point(planes) == 0 and level_dtype(flags.adc_lo, flags.adc_hi) is not None):
        products = "int8-epilogue"
    backward = {"node": "node", "adc": "adc" if needs_grad else "none"}.get(conversion, "none")
    grad_dtype = "none"
    if backward != "none":
        grad_dtype = ("bfloat16" if runtime.gradient_products == "bfloat16" and inputs.dtype_name == "float32"
                      and inputs.device_type == "cpu" and native_bfloat16() else inputs.dtype_name)
    return Route(chain, path, weights, "codes" if codes else "float", products, conversion,
                 "rows" if chunked else "whole", backward, grad_dtype, executor)


def caches_crossbar_form(training: bool, cache_eval: bool, tracing: bool, export_mode: bool, grad_enabled: bool,
                         side_requires_grad: bool, device_noise: bool = False) -> bool:
    """Whether a layer's weight side comes from its eval cache: in evaluation, unless autograd
    must reach the weight or ADC side (then every forward recomputes), a graph is being traced
    or exported (it must contain the quantizers, not constants), or device noise changes the cells."""
    return (not training and cache_eval and not tracing and not export_mode and not device_noise
            and not (grad_enabled and side_requires_grad))


def _integer_products(plan: CrossbarPlan, runtime: Runtime, inputs: InputMeta, planes: int) -> bool:
    """Whether the partial sums are int8 products (lib.cim.integer_products): float32 CPU inputs,
    the runtime asking for them, exact int8 kernels here, nothing traced, array codes in 8 bits,
    cell values in int8 and arrays small enough for exact sums."""
    if not (inputs.device_type == "cpu" and inputs.dtype_name == "float32" and runtime.integer_products
            and not inputs.tracing and integer_kernels_here()):
        return False
    rows = plan.layout.channels_per_tile * plan.layout.kernel_elems
    return (plan.input_zero_point(planes) is not None and plan.slicing.storage_dtype == torch.int8
            and sums_stay_exact(rows, 2 ** plan.cell_bits - 1))
