"""`python -m lib.crossbar_eval`: post-training evaluation of a checkpoint on crossbars, swept over
hardware fields, bits and device noise.

Examples:
  python -m lib.crossbar_eval --checkpoint runs/finetune/digits_resnet20/model_best.pth.tar \\
      --sweep cell_bits=1,2,4 adc_bits=3:8 --output-dir runs/sweeps/cells_adc
  python -m lib.crossbar_eval --checkpoint runs/pretrain/digits_resnet20/model_best.pth.tar \\
      --w-bit 4 --a-bit 4 --sweep mapping=offset,differential-column --noise prog=0,0.02,0.05 \\
      --repeats 5 --output-dir runs/sweeps/ptq_noise

Input: any checkpoint this project writes (FP32, uniform, mixed). An FP32 one is quantized
post-training to --w-bit/--a-bit or --policy (steps calibrated on training batches, no gradient
step); a quantized one keeps its bits unless they are given. Every point recalibrates only what its
change requires on --calibration-batches training batches and is scored on the test split (the
dataset's val split). Writes sweep.json / sweep.csv / sweep.md after every point and sweep.png at
the end; --resume auto continues a killed sweep or extends a finished one (only new points run).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import Optional

from tqdm import tqdm

from lib import cli
from lib.cim.hardware import HardwareConfig
from lib.cim.noise_config import PRESETS, preset
from lib.crossbar_eval.evaluator import PointEvaluator, base_hardware_of, post_training_model
from lib.crossbar_eval.grid import SweepError, check_axes, parse_axis, points, setting_for
from lib.crossbar_eval.results import SweepStore, make_row
from lib.data import build_loaders
from lib.errors import UserError
from lib.layer_trace import layer_order
from lib.model_spec import DEFAULT_HARDWARE, ModelSpec, build_model, check_policy
from lib.policy import Policy
from lib.run_dir import check_output_dir, open_run_dir
from lib.training import load_checkpoint, load_model_state, seed_everything
from models import create_model

log = logging.getLogger("crossbar_eval")

KEPT_TEST_BYTES = 512 * 2**20  # a test split up to this size is decoded once and kept for every point
FLAG_MINIMUMS = {"input_size": 1, "batch_size": 1, "workers": 0, "threads": 0, "repeats": 1,
                 "calibration_batches": 1, "max_batches": 1}


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m lib.crossbar_eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--checkpoint", required=True, help="a cim-aq checkpoint (FP32, uniform or mixed)")
    g.add_argument("--arch", default=None, help="refuse a checkpoint of another architecture")
    g.add_argument("--hardware", default=None, help="base hardware YAML of the sweep (default: the checkpoint's, "
                   "else run/hardware/default.yaml)")
    g.add_argument("--w-bit", type=int, default=None, help="post-training bits of every layer (with --a-bit)")
    g.add_argument("--a-bit", type=int, default=None, help="post-training input bits of every layer")
    g.add_argument("--policy", default=None, help="post-training per-layer bits: CIM-AQ .npy or our .json")

    g = p.add_argument_group("sweep")
    g.add_argument("--sweep", nargs="+", default=[], metavar="FIELD=VALUES",
                   help="hardware fields or w_bit/a_bit with comma lists or a:b ranges, e.g. cell_bits=1,2,4 "
                        "adc_bits=3:8 mapping=offset,differential-column noise=ideal,rram")
    g.add_argument("--noise", nargs="+", default=[], metavar="KIND=VALUES",
                   help="noise kinds (prog, read, drift, drift_std, drift_t, stuck_on, stuck_off, on_off) and "
                        "their values, e.g. prog=0,0.02,0.05; on top of --noise-preset")
    g.add_argument("--noise-preset", default=None, choices=sorted(PRESETS),
                   help="base device noise of every point (default: the hardware YAML's `noise`, else ideal)")
    g.add_argument("--repeats", type=int, default=1, help="seeded programmings per noisy point (mean ± std)")
    g.add_argument("--seed", type=int, default=0, help="seed of the calibration batches and of repeat 0's noise")
    g.add_argument("--calibration-batches", type=int, default=1,
                   help="training batches that recalibrate the steps a point changes")

    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=None, help="default: the checkpoint's")
    g.add_argument("--data-root", default=None)
    g.add_argument("--input-size", type=int, default=None, help="default: the checkpoint's")
    g.add_argument("--batch-size", type=int, default=128)
    g.add_argument("--workers", type=int, default=0)
    g.add_argument("--max-batches", type=int, default=None, help="score on the first N test batches only")

    g = p.add_argument_group("run")
    g.add_argument("--output-dir", required=True)
    g.add_argument("--resume", default=None, choices=("auto",), help="continue or extend the sweep in --output-dir")
    g.add_argument("--overwrite", action="store_true", help="replace the sweep in --output-dir")
    g.add_argument("--device", default="auto")
    g.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0 = default)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


def _digest(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def _base_policy(args, spec: ModelSpec) -> Policy:
    """The base bits: the flags' (post-training), else the checkpoint's; with the layer names."""
    if args.policy and (args.w_bit is not None or args.a_bit is not None):
        raise SweepError("give either --policy or --w-bit/--a-bit, not both")
    if (args.w_bit is None) != (args.a_bit is None):
        raise SweepError("--w-bit and --a-bit go together")
    _, order = layer_order(lambda: create_model(spec.arch, spec.require_classes()), spec.input_size)
    if args.policy:
        return Policy.load(args.policy, order)
    if args.w_bit is not None:
        return Policy.uniform(list(order.call), args.w_bit, args.a_bit)
    if spec.quant == "none":
        raise SweepError(f"{args.checkpoint} is an FP32 checkpoint: give --w-bit/--a-bit or --policy to quantize "
                         f"it post-training")
    if spec.quant == "mixed":
        return spec.policy
    return Policy.uniform(list(order.call), spec.w_bit, spec.a_bit)


def run(args: argparse.Namespace) -> dict:
    started = time.time()
    cli.check_minimums(args, FLAG_MINIMUMS)
    axes = [parse_axis(text, noise=False) for text in args.sweep] + [parse_axis(text, noise=True)
                                                                     for text in args.noise]
    check_axes(axes)
    out_dir = check_output_dir(args.output_dir)
    ckpt_path = Path(args.checkpoint)
    state = load_checkpoint(ckpt_path)
    spec = ModelSpec.from_args(state["args"], source=f"{ckpt_path} args")
    if spec.num_classes is None:
        raise SweepError(f"{ckpt_path} args lack 'num_classes'; cannot rebuild the model")
    if args.arch and args.arch != spec.arch:
        raise SweepError(f"--arch {args.arch} but {ckpt_path} is a {spec.arch} checkpoint")
    spec = spec.replace(dataset=args.dataset or spec.dataset,
                        data_root=args.data_root if args.data_root is not None else spec.data_root,
                        input_size=args.input_size or spec.input_size)
    sweep_hw = HardwareConfig.from_yaml(args.hardware) if args.hardware else (
        spec.hardware or HardwareConfig.from_yaml(DEFAULT_HARDWARE))
    # base noise: the flag's preset, else an explicitly given hardware YAML's (never a checkpoint's training noise)
    base_noise = preset(args.noise_preset) if args.noise_preset else (sweep_hw.noise if args.hardware else None)
    sweep_hw = base_hardware_of(sweep_hw)
    base_policy = _base_policy(args, spec)
    # the model as loaded: the checkpoint's own crossbar (its steps fit it), else the sweep's base
    model_hw = spec.hardware or sweep_hw
    model_spec = spec.replace(hardware=model_hw)
    check_policy(base_policy, model_spec, model_hw)

    grid = points(axes)
    settings = [setting_for(p, sweep_hw, base_policy, base_noise) for p in grid]
    evaluator_spec = model_spec.at_policy(base_policy, model_hw)
    for setting in settings:  # refuse any point the cost model or the arrays refuse, before evaluating
        PointEvaluator.check(evaluator_spec, setting)
    ctx = cli.init_context(args.device)
    seed_everything(args.seed)
    data = build_loaders(spec.dataset, spec.data_root, spec.input_size, batch_size=args.batch_size,
                         workers=args.workers, seed=args.seed)
    if data.num_classes != spec.num_classes:
        raise SweepError(f"{ckpt_path} has {spec.num_classes} classes but {spec.dataset} has {data.num_classes}")
    calibration = [batch[0] for _, batch in zip(range(args.calibration_batches), data.train)]
    test_images = len(data.val.dataset) if args.max_batches is None else min(
        len(data.val.dataset), args.max_batches * args.batch_size)
    fingerprint = {"checkpoint": str(ckpt_path), "checkpoint_sha256": _digest(ckpt_path),
                   "model_hardware": model_hw.to_dict(), "sweep_hardware": sweep_hw.to_dict(),
                   "base_noise": base_noise.to_dict() if base_noise is not None else None,
                   "bits": base_policy.to_json_dict(), "dataset": spec.dataset, "input_size": spec.input_size,
                   "batch_size": args.batch_size, "calibration_batches": args.calibration_batches,
                   "seed": args.seed, "test_images": test_images}
    store = SweepStore.open(out_dir, fingerprint, axes, resume=args.resume == "auto", overwrite=args.overwrite)
    open_run_dir(out_dir)

    device = ctx.device
    if spec.quant == "none":
        base = post_training_model(evaluator_spec, state["state_dict"], calibration, device)
    else:
        base = build_model(model_spec)
        load_model_state(base, state["state_dict"], ckpt_path)
        base = base.to(device).eval()
    test = data.val
    if len(data.val.dataset) * 3 * spec.input_size ** 2 * 4 <= KEPT_TEST_BYTES:
        test = list(data.val)  # decoded and transformed once, not once per point and repeat
    evaluator = PointEvaluator(evaluator_spec, base, calibration, test,
                               device, seed=args.seed, max_batches=args.max_batches)
    rows, computed = [], 0
    bar = tqdm(list(zip(grid, settings)), desc="sweep", unit="point", disable=args.no_progress, dynamic_ncols=True)
    for point, setting in bar:
        repeats = args.repeats if setting.noise is not None else 1
        row = store.get(point, repeats)
        if row is None:
            row = make_row(point, repeats, evaluator.run(setting, repeats))
            computed += 1
            rows.append(row)
            store.add(row, rows)
            log.info("%s: top-1 %.2f ± %.2f %% (%s, %d repeat(s)), latency ratio %.3f",
                     ", ".join(f"{k}={v}" for k, v in point.values) or "base", row["top1_mean"], row["top1_std"],
                     row["noise"], row["repeats"], row["latency_ratio"])
        else:
            rows.append(row)
        bar.set_postfix_str(f"top-1 {row['top1_mean']:.2f}")
    store.finish(rows)
    summary = {"points": len(rows), "computed": computed, "reused": len(rows) - computed,
               "seconds": round(time.time() - started, 2), "output_dir": str(out_dir)}
    print(json.dumps(summary))
    return summary


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    cli.setup(args.log_level, args.threads)
    return cli.run(lambda: run(args), user_errors=(UserError,))


if __name__ == "__main__":
    sys.exit(main())
