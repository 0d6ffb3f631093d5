#!/usr/bin/env python
"""Benchmark (by hand): what the training loop's finiteness checks cost beside a training step.

Every optimizer step is preceded by one fused check of all gradients and followed by one of all
parameters and buffers (lib.training.loop). This times a ResNet-20 CIM training step (w8a8,
run/hardware/default.yaml, 32 px) and the two checks in turn, round-robin in one process, and
prints the checks' share of a step, for an FP32 and a CIM model.
  .venv/bin/python bench/bench_finite.py [--batch-size 64] [--threads 1] [--repeats 15]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lib.cim import HardwareConfig, quantize_model  # noqa: E402
from lib.training.loop import check_gradients, check_state  # noqa: E402
from models import create_model  # noqa: E402
from timing import round_robin_medians  # noqa: E402  (bench/timing.py)

REPO = Path(__file__).resolve().parents[1]


def measure(model: nn.Module, batch: int, repeats: int) -> dict[str, float]:
    """Median seconds of a training step (forward, backward, SGD step) and of the two checks."""
    images, target = torch.rand(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    model.train()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(images), target).backward()
        optimizer.step()

    def checks() -> None:
        check_gradients(named, 1, "bench")
        check_state(model, 1, "bench")

    return round_robin_medians({"step": step, "checks": checks}, repeats)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=64, help="mini-batch size")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--repeats", type=int, default=15, help="round-robin repeats")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    hw = HardwareConfig.from_yaml(REPO / "run" / "hardware" / "default.yaml")
    calibration = [torch.rand(args.batch_size, 3, 32, 32)]
    for label, model in (("FP32", create_model("resnet20", 10)),
                         ("CIM w8a8", quantize_model(create_model("resnet20", 10), (8, 8), hw, input_size=32,
                                                     calibration_data=calibration))):
        t = measure(model, args.batch_size, args.repeats)
        print(f"resnet20 {label}, batch {args.batch_size}, {args.threads} thread(s): step {1e3 * t['step']:.1f} ms, "
              f"checks {1e3 * t['checks']:.3f} ms = {100 * t['checks'] / t['step']:.2f}% of a step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
