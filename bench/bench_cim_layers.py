"""Forward and forward+backward time of CIM layers relative to nn.Conv2d/nn.Linear and Brevitas.

Run by hand: `.venv/bin/python bench/bench_cim_layers.py`. Prints medians and ratios only
(absolute times depend on the machine). Configuration: Conv 64→64 3×3 on 32×32,
batch 32, 256×256 arrays (3 row-tiles), 4-bit weights on 2-bit cells (2 slices), 4-bit ADC,
column granularity; Linear 512→512, batch 256. The ADC-on layers run in both input modes:
multi-bit (one partial sum of the whole 4-bit input) and bit-serial (4 planes of a 1-bit DAC);
"float products" is the same conv with its partial sums computed in float32 instead of on the
CPU's int8 kernels (lib.cim.integer_products); "bf16 gradients" the same layer with its gradient
products in bfloat16 (CIM_AQ_GRADIENT_PRODUCTS=bfloat16, lib.cim.gradient_products; its forward
is the default one).
The eval section (`--only eval`) times eval-mode forwards with the crossbar form kept between
forwards (the default) and recomputed each time: the conv above, and Linear 4096→4096, batch 16,
w8a8 on run/hardware/default.yaml. The large-linear section (`--only large-linear`) times VGG16's
first classifier layer as CIM-AQ maps it: CIMLinear 25088→4096, batch 16, w8a8 on
run/hardware/cim_aq_default.yaml, eval forward and forward+backward, against nn.Linear and
Brevitas' per-tensor QuantLinear.
"""
from __future__ import annotations

import argparse
import sys
from contextlib import ExitStack
from pathlib import Path

import torch
from brevitas.nn import QuantConv2d, QuantLinear
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lib.cim import calibrate  # noqa: E402
from lib.cim.hardware import HardwareConfig  # noqa: E402
from lib.cim.runtime import RUNTIME  # noqa: E402
from lib.cim.scratch import scratch_buffers  # noqa: E402
from lib.cim.layers import CIMConv2d, CIMLinear  # noqa: E402
from timing import round_robin_medians  # noqa: E402  (bench/timing.py)

from lib.model_spec import DEFAULT_HARDWARE  # noqa: E402

CIM_AQ_HARDWARE = DEFAULT_HARDWARE.parent / "cim_aq_default.yaml"


def float_products(layer):
    """The same layer computing its conv partial sums in float32 (integer products off)."""
    layer.bench_float_products = True
    return layer


def bfloat16_gradients(layer):
    """The same layer with its gradient products in bfloat16."""
    layer.bench_bfloat16_gradients = True
    return layer


def products_mode(layer) -> ExitStack:
    """The integer-products and gradient-products settings a layer is timed under."""
    stack = ExitStack()
    changes = {"gradient_products": "bfloat16" if getattr(layer, "bench_bfloat16_gradients", False) else "float32"}
    if getattr(layer, "bench_float_products", False):
        changes["integer_products"] = False
    stack.enter_context(RUNTIME.use(**changes))
    return stack


def forward_only(layer, x):
    def run():
        with torch.no_grad(), products_mode(layer):
            layer(x)
    return run


def forward_backward(layer, x):
    def run():
        with products_mode(layer):
            layer.zero_grad(set_to_none=True)
            layer(x).sum().backward()
    return run


def forced(layer):
    """The same layer taking the tiled, sliced crossbar path although its ADC is off."""
    layer.force_crossbar = True
    return layer


def uncached(layer):
    """The same layer recomputing its crossbar form on every eval forward."""
    layer.cache_eval = False
    return layer


def compare_eval(name: str, layers: dict, x: torch.Tensor, repeats: int) -> None:
    """Eval-mode forwards under no_grad (calibrated first, so the ADC is initialised)."""
    for layer in layers.values():
        if hasattr(layer, "psum_adc"):
            calibrate(layer, [x])
        layer.eval()
    fwd = round_robin_medians({k: forward_only(l, x) for k, l in layers.items()}, repeats)
    print(f"\n{name}, eval  (median of {repeats}, round-robin; ratios vs torch)")
    for label in layers:
        print(f"  {label:<26} eval forward {fwd[label] / fwd['torch']:6.2f}x")


def compare(name: str, layers: dict, x: torch.Tensor, repeats: int) -> None:
    for layer in layers.values():
        layer.train()
    fwd = round_robin_medians({k: forward_only(l, x) for k, l in layers.items()}, repeats)
    fwd_bwd = round_robin_medians({k: forward_backward(l, x) for k, l in layers.items()}, repeats)
    print(f"\n{name}  (median of {repeats}, round-robin; ratios vs torch)")
    for label in layers:
        print(f"  {label:<22} forward {fwd[label] / fwd['torch']:6.2f}x   "
              f"forward+backward {fwd_bwd[label] / fwd_bwd['torch']:6.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per measurement (median)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    parser.add_argument("--large-repeats", type=int, default=3,
                        help="timed runs per measurement of the large-linear section (median)")
    parser.add_argument("--only", choices=["all", "train", "eval", "large-linear"], default="all",
                        help="train: the train-mode comparisons; eval: the eval-mode (cached crossbar form) "
                             "ones; large-linear: CIMLinear 25088->4096 on CIM-AQ's default crossbar")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"freed memory: {RUNTIME.apply_heap()} (lib.heap, as the stage CLIs set it)")
    torch.manual_seed(0)
    hw = HardwareConfig(rows=256, cols=256, cell_bits=2, adc_bits=4, mapping="differential-column",
                        weight_granularity="column", psum_granularity="column", input_mode="multi-bit")
    hw_off = hw.with_overrides(psum_granularity="off")
    hw_serial = hw.with_overrides(input_mode="bit-serial")

    if args.only in ("all", "train"):
        with scratch_buffers():  # as in fit: the fused backward's temporaries reuse one buffer
            train_mode(hw, hw_off, hw_serial, args.repeats)
    if args.only in ("all", "eval"):
        eval_mode(hw, hw_serial, args.repeats)
    if args.only in ("all", "large-linear"):
        with scratch_buffers():
            large_linear(args.large_repeats)


def eval_mode(hw: HardwareConfig, hw_serial: HardwareConfig, repeats: int) -> None:
    """Eval forwards with the crossbar form kept (the default) and recomputed every time."""
    conv = nn.Conv2d(64, 64, 3, padding=1)
    layers = {
        "torch": conv,
        "CIMConv2d recomputed": uncached(CIMConv2d.from_float(conv, hw, 4, 4, input_signed=False)),
        "CIMConv2d cached": CIMConv2d.from_float(conv, hw, 4, 4, input_signed=False),
        "  cached, float products": float_products(CIMConv2d.from_float(conv, hw, 4, 4, input_signed=False)),
        "  bit-serial, recomputed": uncached(CIMConv2d.from_float(conv, hw_serial, 4, 4, input_signed=False)),
        "  bit-serial, cached": CIMConv2d.from_float(conv, hw_serial, 4, 4, input_signed=False),
    }
    compare_eval("Conv2d 64->64 3x3, 32x32, batch 32", layers, torch.rand(32, 64, 32, 32), repeats)

    default = HardwareConfig.from_yaml(DEFAULT_HARDWARE)
    linear = nn.Linear(4096, 4096)
    layers = {
        "torch": linear,
        "brevitas QuantLinear": QuantLinear(4096, 4096, weight_bit_width=8),
        "CIMLinear recomputed": uncached(CIMLinear.from_float(linear, default, 8, 8)),
        "CIMLinear cached": CIMLinear.from_float(linear, default, 8, 8),
    }
    compare_eval(f"Linear 4096->4096, batch 16, w8a8, {DEFAULT_HARDWARE.name}", layers, torch.randn(16, 4096),
                 repeats)


def large_linear(repeats: int) -> None:
    """VGG16's 25088->4096 classifier layer, batch 16, w8a8 on CIM-AQ's default crossbar: eval
    forward (crossbar form cached) and train-mode forward+backward."""
    hw = HardwareConfig.from_yaml(CIM_AQ_HARDWARE)
    linear = nn.Linear(25088, 4096)
    x = torch.randn(16, 25088)
    layers = {
        "torch": linear,
        "brevitas QuantLinear": QuantLinear(25088, 4096, weight_bit_width=8),
        "CIMLinear": CIMLinear.from_float(linear, hw, 8, 8),
        "  same, bf16 gradients": bfloat16_gradients(CIMLinear.from_float(linear, hw, 8, 8)),
    }
    cim = layers["CIMLinear"]
    print(f"\nlarge linear: row-tiles {cim.layout.tiles}, slices {cim.slices}, {hw.mapping}, "
          f"{hw.weight_granularity} weight steps")
    name = f"Linear 25088->4096, batch 16, w8a8, {CIM_AQ_HARDWARE.name}"
    compare_eval(name, {k: v for k, v in layers.items() if "bf16" not in k}, x, repeats)
    for layer in layers.values():
        layer.train()
    fwd_bwd = round_robin_medians({k: forward_backward(l, x) for k, l in layers.items()}, repeats, warmup=1)
    print(f"\n{name}, train  (median of {repeats}, round-robin; ratios vs torch)")
    for label in layers:
        print(f"  {label:<26} forward+backward {fwd_bwd[label]:7.2f} s {fwd_bwd[label] / fwd_bwd['torch']:6.2f}x "
              f"(vs brevitas {fwd_bwd[label] / fwd_bwd['brevitas QuantLinear']:5.2f}x)")


def train_mode(hw: HardwareConfig, hw_off: HardwareConfig, hw_serial: HardwareConfig, repeats: int) -> None:
    conv = nn.Conv2d(64, 64, 3, padding=1)
    layers = {
        "torch": conv,
        "brevitas QuantConv2d": QuantConv2d(64, 64, 3, padding=1, weight_bit_width=4),
        "CIMConv2d ADC off": CIMConv2d.from_float(conv, hw_off, 4, 4, input_signed=False),
        "  same, crossbar path": forced(CIMConv2d.from_float(conv, hw_off, 4, 4, input_signed=False)),
        "CIMConv2d ADC on": CIMConv2d.from_float(conv, hw, 4, 4, input_signed=False),
        "  same, float products": float_products(CIMConv2d.from_float(conv, hw, 4, 4, input_signed=False)),
        "  same, bf16 gradients": bfloat16_gradients(CIMConv2d.from_float(conv, hw, 4, 4, input_signed=False)),
        "  same, bit-serial": CIMConv2d.from_float(conv, hw_serial, 4, 4, input_signed=False),
    }
    print(f"conv row-tiles: {layers['CIMConv2d ADC on'].layout.tiles}, slices: {layers['CIMConv2d ADC on'].slices}")
    compare("Conv2d 64->64 3x3, 32x32, batch 32", layers, torch.rand(32, 64, 32, 32), repeats)

    linear = nn.Linear(512, 512)
    layers = {
        "torch": linear,
        "brevitas QuantLinear": QuantLinear(512, 512, weight_bit_width=4),
        "CIMLinear ADC off": CIMLinear.from_float(linear, hw_off, 4, 4, input_signed=False),
        "  same, crossbar path": forced(CIMLinear.from_float(linear, hw_off, 4, 4, input_signed=False)),
        "CIMLinear ADC on": CIMLinear.from_float(linear, hw, 4, 4, input_signed=False),
        "  same, bf16 gradients": bfloat16_gradients(CIMLinear.from_float(linear, hw, 4, 4, input_signed=False)),
        "  same, bit-serial": CIMLinear.from_float(linear, hw_serial, 4, 4, input_signed=False),
    }
    compare("Linear 512->512, batch 256", layers, torch.rand(256, 512), repeats)


if __name__ == "__main__":
    main()
