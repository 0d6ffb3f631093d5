"""The evaluation step of a stage: accuracies, the policy's crossbar cost per layer, the export check.

Gathers what the stage's steps measured (FP32 and INT8 test top-1 from pretrain.py, the
mixed-precision test top-1 from finetune.py, onnxruntime agreement from the export) and prices
the policy with the cost model (row-tiles and share of latency per layer, ratio vs uniform
8-bit; energy, its split, EDP and area where the hardware has an energy section). Writes one
`evaluation.json`. Run by the workflow as `python -m lib.workflow.evaluate`.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

from lib import cli
from lib.fileio import atomic_write_json
from lib.policy import Policy
from lib.workflow.config import load_config
from lib.workflow.steps import stage_dirs


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def policy_table(policy: Policy, arch: str, num_classes: int, hw, input_size: int) -> tuple[list[dict], object]:
    """One row per layer (name, bits, row-tiles, latency and energy and their shares) and the whole PolicyCost."""
    from lib.simulator.cost_model import CostModel  # pulls in torch model tracing; only this step needs it
    from models import create_model

    cost_model = CostModel.from_model(create_model(arch, num_classes), hw, input_size)
    cost = cost_model.policy_cost(policy)
    rows = []
    energy = cost.energy
    for index, layer in enumerate(cost.per_layer):
        w, a, adc = policy.layer(index)
        row = {"layer": layer.name, "w_bit": w, "a_bit": a, "adc_bits": adc, "row_tiles": layer.row_tiles,
               "arrays": layer.arrays, "latency_us": layer.latency,
               "latency_share": layer.latency / cost.total_latency if cost.total_latency else 0.0,
               "energy_pj": None, "energy_share": None, "adc_energy_share": None}
        if energy is not None:
            part = energy.per_layer[index]
            row.update(energy_pj=part.energy_pj, energy_share=part.energy_pj / energy.energy_pj if energy.energy_pj
                       else 0.0, adc_energy_share=part.adc_pj / part.energy_pj if part.energy_pj else 0.0)
        rows.append(row)
    return rows, cost


def evaluate_stage(config_path: str, stage: str) -> dict:
    """The evaluation record of one stage (see the module docstring)."""
    config = load_config(config_path)
    base = stage_dirs(config)[stage]
    fp32 = read_json(base / "fp32" / "metrics.json")
    int8 = read_json(base / "int8" / "metrics.json")
    report = read_json(base / "finetune" / "report.json")
    export = read_json(base / "export" / "export.json")
    ft_args = read_json(base / "finetune" / "args.json")
    policy = Policy.from_json_dict(report["policy"], source=f"{base / 'finetune' / 'report.json'} policy")
    rows, cost = policy_table(policy, config.arch, int(ft_args["num_classes"]), config.hardware, config.input_size)
    drop = config.raw.quantization.max_accuracy_drop
    int8_top1, mixed_top1 = int8["best_acc1"], report["accuracy"]["test_top1"]
    result = {
        "stage": stage, "dataset": config.raw.datasets.small.name if stage == "stage1" else
        config.raw.datasets.large.name, "arch": config.arch, "input_size": config.input_size,
        "fp32_test_top1": fp32["best_acc1"], "int8_test_top1": int8_top1, "mixed_test_top1": mixed_top1,
        "mixed_deployed_top1": report["accuracy"].get("deployed_top1"),
        "hardware_priced_vs_simulated": report.get("hardware_priced_vs_simulated") or {},
        "accuracy_drop_vs_int8": int8_top1 - mixed_top1, "max_accuracy_drop": drop,
        "accuracy_constraint_met": bool(mixed_top1 >= int8_top1 - drop),
        "latency_ratio": cost.ratio, "speedup": (1.0 / cost.ratio) if cost.ratio else None,
        "latency_us": cost.total_latency, "baseline_latency_us": cost.baseline_latency,
        "objective": config.raw.quantization.objective, "ratios": cost.ratios,
        "energy": cost.energy.to_dict(per_layer=False) if cost.energy is not None else None,
        "policy": rows, "onnx": export.get("onnx"), "ort_top1_agreement": export.get("ort_top1_agreement"),
        "ort_max_abs_diff": export.get("ort_max_abs_diff"), "ort_images": export.get("ort_images"),
    }
    search = base / "search" / "summary.json"
    if search.is_file():
        summary = read_json(search)
        result["search"] = {key: summary.get(key) for key in ("baseline_accuracy", "target_accuracy", "best",
                                                              "episodes_run", "seconds", "free_decisions",
                                                              "sensitivity")}
        result["search"]["strategy"] = summary.get("strategy") or summary.get("config", {}).get("strategy", "ddpg")
    return result


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="the experiment YAML")
    p.add_argument("--stage", required=True, choices=("stage1", "stage2"), help="which stage to evaluate")
    p.add_argument("--output", required=True, help="evaluation JSON to write")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    p.add_argument("--log-level", default="INFO", help="logging level")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    cli.setup(args.log_level, args.threads)
    return cli.run(lambda: atomic_write_json(args.output, evaluate_stage(args.config, args.stage)))


if __name__ == "__main__":
    sys.exit(main())
