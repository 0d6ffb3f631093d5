"""Latency lookup table and cost report CLI (latency, and energy / EDP / area where the hardware has them).

    python -m lib.simulator.latency --arch resnet18 --num-classes 1000 --input-size 224 \\
        --hardware run/hardware/cim_aq_default.yaml --max-bit 8 --output table.npy \\
        [--layer-dims FILE.yaml] [--policy policy.npy|policy.json]

Traces the model's layer dims (or reads CIM-AQ's `layer_dimensions` YAML), writes the
CIM-AQ-compatible table [layer, w_bit-1, a_bit-1] (µs) and prints a per-layer report; with
--policy also that policy's breakdown and its ratios to a uniform baseline. With an `energy`
section in the hardware YAML both also give energy (split into ADC / DAC / array / digital /
write), EDP and area; without one they say energy is unavailable.
Table rows are the model's Conv2d/Linear layers in call order (the policy rows);
--include-attention adds nn.MultiheadAttention projections and Q·Kᵀ / A·V matmuls (CIM-AQ's ViT rows).
A traced model's `.npy` policy rows follow its construction order, as CIM-AQ's files do; with
--layer-dims they follow the YAML's rows.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from lib.cim.hardware import HardwareConfig, HardwareConfigError
from lib.fileio import atomic_write, atomic_write_json
from lib.policy import Policy, PolicyError
from lib.simulator.cost_model import CostModel
from lib.layer_trace import LayerOrder, build_recording_order, construction_order
from lib.simulator.attention import attention_rows_message, has_attention_rows
from lib.simulator.crossbar_cost import ROW_TILINGS, CostError
from lib.simulator.dims_yaml import read_layer_dims, write_layer_dims
from lib.simulator.layer_dims import LayerDimsError, trace_layer_dims
from lib.simulator.report import describe_hardware, format_layer_report, format_policy_report
from lib.errors import UserError

logger = logging.getLogger(__name__)


class CLIError(UserError):
    """A user error the CLI reports as one line and exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lib.simulator.latency",
        description="Build the CIM latency lookup table [layer, w_bit-1, a_bit-1] (µs) for a model on a "
                    "crossbar and report per-layer costs: latency, and energy, EDP and area where the hardware "
                    "has an energy section (and a policy's cost).")
    source = parser.add_argument_group("layer dims (trace a model, or read a YAML)")
    source.add_argument("--arch", help="model name in the models registry (models.create_model), e.g. resnet18")
    source.add_argument("--num-classes", type=int, default=1000, help="classifier outputs (default: 1000)")
    source.add_argument("--input-size", type=int, nargs="+", default=[224], metavar="N",
                        help="input H (square RGB) or C H W for tracing (default: 224)")
    source.add_argument("--layer-dims", type=Path, metavar="FILE.yaml",
                        help="CIM-AQ `layer_dimensions` YAML to use instead of tracing --arch")
    source.add_argument("--include-attention", action="store_true",
                        help="add nn.MultiheadAttention projections and Q·Kᵀ/A·V matmuls as table rows "
                             "(then policies need those rows too); default: Conv2d/Linear modules only")
    parser.add_argument("--hardware", type=Path, required=True, help="hardware YAML (ours or CIM-AQ's layout)")
    parser.add_argument("--max-bit", type=int, default=8, help="largest w/a bit width in the table (default: 8)")
    parser.add_argument("--output", type=Path, metavar="TABLE.npy", help="where to write the latency table")
    parser.add_argument("--policy", type=Path, metavar="POLICY",
                        help="policy to price: .npy (L×2 / L×3; rows in the model's construction order, as "
                             "CIM-AQ writes them, or the --layer-dims YAML's order) or .json (rows named)")
    parser.add_argument("--baseline-bits", type=int, nargs=2, default=[8, 8], metavar=("W", "A"),
                        help="uniform bits the ratio is taken against and the report is shown at (default: 8 8)")
    parser.add_argument("--row-tiling", choices=ROW_TILINGS, default=None,
                        help="override the hardware's row_tiling: 'channel' (row-tiles hold whole input "
                             "channels, as the CIM layers simulate) or 'dense' (ceil(rows/R), CIM-AQ)")
    parser.add_argument("--write-layer-dims", type=Path, metavar="FILE.yaml",
                        help="also write the layer dims in CIM-AQ's YAML format")
    parser.add_argument("--adc-table", type=Path, metavar="FILE.npy",
                        help="also write the 4-D table [layer, w-1, a-1, adc-1] (meaningful with "
                             "adc_latency_model: sar)")
    parser.add_argument("--max-adc-bit", type=int, default=8, help="ADC bits axis length of --adc-table (default: 8)")
    parser.add_argument("--json", type=Path, metavar="FILE.json", help="also write the report as JSON")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def _create_model(arch: str, num_classes: int):
    try:
        import models  # the project's registry; imported here so the library does not need it
    except ImportError as err:
        raise CLIError(f"the model registry (models.create_model) cannot be imported: {err}") from None
    try:
        return models.create_model(arch, num_classes=num_classes, pretrained=None)
    except (KeyError, ValueError) as err:  # the registry's ModelError is a ValueError
        message = err.args[0] if err.args else str(err)
        raise CLIError(f"--arch {arch!r} (num_classes={num_classes}): {message}") from None


def _load_dims(args):
    """(rows to price, the full traced rows or None, where they came from, the .npy row order or None)."""
    if args.layer_dims is not None:
        if args.include_attention:
            logger.warning("--include-attention has no effect with --layer-dims (the YAML lists every row)")
        return read_layer_dims(args.layer_dims), None, str(args.layer_dims), None
    if not args.arch:
        raise CLIError("give --arch (to trace a model) or --layer-dims FILE.yaml")
    if len(args.input_size) not in (1, 3):
        raise CLIError(f"--input-size takes H or C H W, got {args.input_size}")
    input_size = args.input_size[0] if len(args.input_size) == 1 else tuple(args.input_size)
    model, ranks = build_recording_order(lambda: _create_model(args.arch, args.num_classes))
    full = trace_layer_dims(model, input_size, include_attention=True)
    dims = full if args.include_attention else [d for d in full if d.quantizable]
    order = construction_order([d.name for d in dims], ranks)
    return dims, full, f"{args.arch} traced at input {args.input_size}", order


def _load_policy(path: Path, order: Optional[LayerOrder], full_dims, include_attention: bool) -> Policy:
    """The policy at `path` in call order; one with attention rows (by length or names) needs --include-attention."""
    if full_dims is not None and not include_attention:
        written = Policy.load(path)  # rows as stored: their count or names show attention rows
        if has_attention_rows(written, full_dims):
            raise CLIError(f"{attention_rows_message(written, full_dims, f'policy {str(path)!r}')}; "
                           f"add --include-attention to price those rows")
    return Policy.load(path, order)


def run(args) -> dict:
    """Do the work of one CLI call; returns the JSON report (also printed as text)."""
    hw = HardwareConfig.from_yaml(args.hardware)
    dims, full_dims, source, order = _load_dims(args)
    model = CostModel(hw, dims, args.max_bit, baseline_bits=tuple(args.baseline_bits), row_tiling=args.row_tiling)
    bw, ba = model.baseline_bits
    # The policy is read and priced before anything is written: a bad policy leaves no files.
    cost = None
    if args.policy is not None:
        cost = model.policy_cost(_load_policy(args.policy, order, full_dims, args.include_attention))
    print(f"layer dims: {source} ({len(model)} rows, call order)")
    print(f"hardware: {args.hardware}: {describe_hardware(model.hw)}")
    print(format_layer_report(model, bw, ba))
    report = {"source": source, "hardware": model.hw.to_dict(), "max_bit": model.max_bit,
              "energy_available": model.energy_available,
              "layers": [d.to_dict() for d in model.layer_dims],
              "uniform": model.uniform_cost(bw, ba).to_dict()}
    if args.output is not None:
        model.save_table(args.output)
        print(f"table {list(model.table.shape)} written to {args.output}")
    if args.write_layer_dims is not None:
        write_layer_dims(model.layer_dims, args.write_layer_dims, header=f"layer dims of {source}")
        print(f"layer dims written to {args.write_layer_dims}")
    if args.adc_table is not None:
        table4 = model.adc_table(args.max_adc_bit)
        atomic_write(args.adc_table, lambda handle: np.save(handle, table4), binary=True)
        print(f"ADC-bits table {list(table4.shape)} written to {args.adc_table}")
    if cost is not None:
        print(f"\npolicy {args.policy}:")
        print(format_policy_report(cost))
        report["policy"] = {"path": str(args.policy), **cost.to_dict()}
    if args.json is not None:
        atomic_write_json(args.json, report)
    return report


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        run(args)
    except (CLIError, PolicyError, CostError, LayerDimsError, HardwareConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
