"""Write a policy file for a model: uniform bits, optionally with other bits for the first and
last quantizable layer (the common "keep the ends at 8 bit" recipe), or bits listed per layer.

  python -m lib.make_policy --arch resnet20 --num-classes 10 --input-size 32 \\
      --w-bit 4 --a-bit 4 --first-last 8 8 --output runs/policies/resnet20_w4a4

Writes `<output>.npy` (CIM-AQ format: rows in the model's layer construction order) and
`<output>.json` (with the layer names, in call order).
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from lib.policy import MAX_BITS, Policy, PolicyError


def build_policy(layer_names: Sequence[str], w_bit: int, a_bit: int, adc_bits: Optional[int] = None,
                 first_last: Optional[Sequence[int]] = None, per_layer: Optional[str] = None) -> Policy:
    """Uniform (w_bit, a_bit[, adc_bits]); `first_last` (w, a) overrides both ends; `per_layer`
    'w:a,w:a,...' (one entry per layer) replaces everything else."""
    names = list(layer_names)
    if per_layer:
        entries = [e.strip() for e in per_layer.split(",") if e.strip()]
        if len(entries) != len(names):
            raise PolicyError(f"--per-layer has {len(entries)} entries but the model has {len(names)} layers")
        try:
            pairs = [tuple(int(b) for b in e.split(":")) for e in entries]
        except ValueError:
            raise PolicyError(f"--per-layer={per_layer!r} is not allowed: expected 'w:a' pairs like 8:8,4:6") from None
        if any(len(p) != 2 for p in pairs):
            raise PolicyError(f"--per-layer={per_layer!r} is not allowed: expected 'w:a' pairs like 8:8,4:6")
        w_bits, a_bits = [p[0] for p in pairs], [p[1] for p in pairs]
    else:
        w_bits, a_bits = [w_bit] * len(names), [a_bit] * len(names)
        if first_last is not None:
            w_bits[0], a_bits[0] = first_last
            w_bits[-1], a_bits[-1] = first_last
    adc = None if adc_bits is None else [adc_bits] * len(names)
    return Policy(w_bits, a_bits, adc, names)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", required=True, help="model name (models.create_model)")
    p.add_argument("--num-classes", type=int, default=10, help="classifier outputs")
    p.add_argument("--input-size", type=int, default=32, help="input image side used to trace call order")
    p.add_argument("--w-bit", type=int, default=8, help=f"weight bits for every layer (1..{MAX_BITS})")
    p.add_argument("--a-bit", type=int, default=8, help=f"input (activation) bits for every layer (1..{MAX_BITS})")
    p.add_argument("--adc-bits", type=int, default=None, help="ADC bits for every layer (default: the hardware's)")
    p.add_argument("--first-last", type=int, nargs=2, metavar=("W", "A"), default=None,
                   help="bits of the first and last quantizable layer")
    p.add_argument("--per-layer", default=None, help="comma-separated w:a per layer in call order (overrides the rest)")
    p.add_argument("--output", required=True, help="output path without extension (.npy and .json are written)")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    # lazy: the models and the layer trace load torch, which --help and flag errors never need
    from lib.layer_trace import layer_order
    from models import ModelError, create_model

    try:
        _, order = layer_order(lambda: create_model(args.arch, args.num_classes), args.input_size)
        policy = build_policy(order.call, args.w_bit, args.a_bit, args.adc_bits, args.first_last, args.per_layer)
    except (ModelError, PolicyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    npy, js = policy.save(args.output, order)
    print(f"{len(policy)} layers: w {policy.w_bits}, a {policy.a_bits} -> {npy}, {js}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
