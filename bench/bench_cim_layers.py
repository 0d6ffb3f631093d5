"""Forward and forward+backward time of CIM layers relative to nn.Conv2d/nn.Linear and Brevitas.

Run by hand: `.venv/bin/python bench/bench_cim_layers.py`. Prints medians and ratios only
(absolute times depend on the machine). Configuration from issue #3: Conv 64→64 3×3 on 32×32,
batch 32, 256×256 arrays (3 row-tiles), 4-bit weights on 2-bit cells (2 slices), 4-bit ADC,
column granularity; Linear 512→512, batch 256. The ADC-on layers run in both input modes:
multi-bit (one partial sum of the whole 4-bit input) and bit-serial (4 planes of a 1-bit DAC).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from brevitas.nn import QuantConv2d, QuantLinear
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lib.cim.hardware import HardwareConfig  # noqa: E402
from lib.cim.layers import CIMConv2d, CIMLinear  # noqa: E402
from timing import round_robin_medians  # noqa: E402  (bench/timing.py)


def forward_only(layer, x):
    def run():
        with torch.no_grad():
            layer(x)
    return run


def forward_backward(layer, x):
    def run():
        layer.zero_grad(set_to_none=True)
        layer(x).sum().backward()
    return run


def forced(layer):
    """The same layer taking the tiled, sliced crossbar path although its ADC is off."""
    layer.force_crossbar = True
    return layer


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
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    hw = HardwareConfig(rows=256, cols=256, cell_bits=2, adc_bits=4, mapping="differential-column",
                        weight_granularity="column", psum_granularity="column", input_mode="multi-bit")
    hw_off = hw.with_overrides(psum_granularity="off")
    hw_serial = hw.with_overrides(input_mode="bit-serial")

    conv = nn.Conv2d(64, 64, 3, padding=1)
    layers = {
        "torch": conv,
        "brevitas QuantConv2d": QuantConv2d(64, 64, 3, padding=1, weight_bit_width=4),
        "CIMConv2d ADC off": CIMConv2d.from_float(conv, hw_off, 4, 4, input_signed=False),
        "  same, crossbar path": forced(CIMConv2d.from_float(conv, hw_off, 4, 4, input_signed=False)),
        "CIMConv2d ADC on": CIMConv2d.from_float(conv, hw, 4, 4, input_signed=False),
        "  same, bit-serial": CIMConv2d.from_float(conv, hw_serial, 4, 4, input_signed=False),
    }
    print(f"conv row-tiles: {layers['CIMConv2d ADC on'].layout.tiles}, slices: {layers['CIMConv2d ADC on'].slices}")
    compare("Conv2d 64->64 3x3, 32x32, batch 32", layers, torch.rand(32, 64, 32, 32), args.repeats)

    linear = nn.Linear(512, 512)
    layers = {
        "torch": linear,
        "brevitas QuantLinear": QuantLinear(512, 512, weight_bit_width=4),
        "CIMLinear ADC off": CIMLinear.from_float(linear, hw_off, 4, 4, input_signed=False),
        "  same, crossbar path": forced(CIMLinear.from_float(linear, hw_off, 4, 4, input_signed=False)),
        "CIMLinear ADC on": CIMLinear.from_float(linear, hw, 4, 4, input_signed=False),
        "  same, bit-serial": CIMLinear.from_float(linear, hw_serial, 4, 4, input_signed=False),
    }
    compare("Linear 512->512, batch 256", layers, torch.rand(256, 512), args.repeats)


if __name__ == "__main__":
    main()
