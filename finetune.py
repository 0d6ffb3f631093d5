#!/usr/bin/env python
"""Finetune a model to a mixed-precision policy on CIM layers, export it to ONNX QCDQ, report.

Examples:
  python finetune.py --dataset digits --arch resnet20 --policy runs/search/policy.npy \
      --hardware run/hardware/default.yaml --init runs/pretrain/digits_resnet20_w8a8/model_best.pth.tar \
      --epochs 10 --lr 0.01
  python finetune.py --evaluate --resume runs/finetune/digits_resnet20/model_best.pth.tar

The policy (CIM-AQ `.npy`, L×2 or L×3 ints: w_bit, a_bit[, adc_bits], or our `.json` with layer
names) is checked against the model's quantizable layers in call order before anything trains;
a mismatch is an error. --init is the starting point: a uniform-INT8 (or any quantized) checkpoint
from pretrain.py, an FP32 checkpoint, or a plain state dict. The best epoch is chosen on a holdout
split of the training images; the val split is only the reported test set.

Writes into --output-dir: checkpoint.pth.tar, model_best.pth.tar, policy.npy/policy.json,
model.onnx (validated with onnxruntime), report.json, tb/. --evaluate writes eval_metrics.json.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Optional

from torch import nn

from lib import cli
from lib.cim.layers import route_counts
from lib.cim.noise import attach as attach_noise, detach as detach_noise
from lib.cim.runtime import RUNTIME
from lib.data import HoldoutSpec, build_loaders, first_images
from lib.distributed import SINGLE, DistContext, barrier, broadcast_module_state
from lib.errors import UserError
from lib.fileio import atomic_write_json
from lib.layer_trace import layer_order
from lib.model_spec import (BASELINE_BITS, DEFAULT_HARDWARE, ModelSpec, build_model, check_policy, hardware_for,
                            model_at_policy, read_start, spec_from_flags)
from lib.policy import Policy, check_supported
from lib.run_dir import add_overwrite_arg, check_output_file, check_run_dir, open_run_dir
from lib.simulator.attention import refuse_attention_rows
from lib.training import Tracker, evaluate, fit, load_checkpoint, load_model_state, seed_everything
from lib.training.checkpoint import plain
from lib.training.optim import add_optim_args, optim_config_from_args
from lib.training.train_noise import add_train_noise_arg, check_train_noise_flag, train_noise_for
from models import create_model

log = logging.getLogger("finetune")

REPO_ROOT = Path(__file__).resolve().parent
FLAG_MINIMUMS = {"input_size": 1, "batch_size": 1, "workers": 0, "max_batches": 1, "threads": 0,
                 "calibration_batches": 1, "export_images": 1}


class FinetuneError(UserError, ValueError):
    """Flags that are missing, contradict each other, or contradict the starting checkpoint."""


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=None, help="digits | digits-small | cifar10 | cifar100 | imagefolder "
                   "(default: the --init/--resume checkpoint's, else digits)")
    g.add_argument("--data-root", default=None, help="dataset folder (for digits: the cache folder)")
    g.add_argument("--input-size", type=int, default=None, help="input image side (default: the checkpoint's, "
                   "else 32 for digits/CIFAR, 224 for image folders)")
    g.add_argument("--transform-style", default="auto", choices=("auto", "imagenet", "cifar"), help="augmentation")
    g.add_argument("--batch-size", type=int, default=128, help="mini-batch size")
    g.add_argument("--workers", type=int, default=2, help="data-loading worker processes")
    g.add_argument("--holdout", type=float, default=0.1,
                   help="fraction of the training images held out to pick the best epoch (the val split is the "
                        "reported test set)")

    g = p.add_argument_group("model and policy")
    g.add_argument("--arch", default=None, help="model name (default: the --init checkpoint's)")
    g.add_argument("--policy", default=None, help="policy file: CIM-AQ .npy (L×2 / L×3) or our .json")
    g.add_argument("--hardware", default=None,
                   help="crossbar hardware YAML (default: the --init checkpoint's hardware, else "
                        f"{DEFAULT_HARDWARE.relative_to(REPO_ROOT)})")
    g.add_argument("--init", default=None,
                   help="starting weights: a quantized (e.g. uniform INT8) or FP32 cim-aq checkpoint, or a plain "
                        "state dict")

    g = add_optim_args(p, epochs=10, lr=0.01)
    g.add_argument("--calibration-batches", type=int, default=4,
                   help="training batches that initialise the quantizer steps a new policy changed")
    add_train_noise_arg(g)

    g = p.add_argument_group("export")
    g.add_argument("--no-export", action="store_true", help="skip the ONNX export and its onnxruntime check")
    g.add_argument("--export-images", type=int, default=256, help="validation images for the onnxruntime check")
    g.add_argument("--min-agreement", type=float, default=0.99, help="required onnxruntime/PyTorch top-1 agreement")

    g = p.add_argument_group("run")
    g.add_argument("--output-dir", default=None, help="default runs/finetune/<dataset>_<arch>_<policy stem>")
    g.add_argument("--resume", default=None,
                   help="checkpoint to continue from; 'auto' = <output-dir>/checkpoint.pth.tar if it exists")
    add_overwrite_arg(g)
    g.add_argument("--evaluate", action="store_true",
                   help="only evaluate a checkpoint (--resume, default <output-dir>/model_best.pth.tar) on the val set")
    g.add_argument("--seed", type=int, default=0, help="seed for initialisation, shuffling, augmentation")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (under torchrun: each process's "
                   "local GPU, or the CPU)")
    g.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0 = default)")
    cli.add_distributed_args(g)
    g.add_argument("--no-tensorboard", action="store_true", help="do not write TensorBoard logs")
    g.add_argument("--wandb", default=None, metavar="PROJECT", help="also log to this W&B project (offline without "
                   "network)")
    g.add_argument("--run-name", default=None, help="run name for W&B")
    g.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    g.add_argument("--log-level", default="INFO", help="logging level")
    return p.parse_args(argv)



# ------------------------------------------------------------------------------------------ set-up
def load_data(args: argparse.Namespace, dataset: str, data_root: Optional[str], input_size: int,
              holdout: bool = True, ctx: DistContext = SINGLE):
    spec_holdout = HoldoutSpec(size=args.holdout, seed=0) if holdout and args.holdout > 0 else None
    return build_loaders(dataset, data_root, input_size, batch_size=args.batch_size, workers=args.workers,
                         holdout=spec_holdout, transform_style=args.transform_style, seed=args.seed, dist=ctx)


def default_output_dir(spec: ModelSpec, policy_path: str) -> Path:
    return REPO_ROOT / "runs" / "finetune" / f"{spec.dataset}_{spec.arch}_{Path(policy_path).stem}"


# ------------------------------------------------------------------------------------------ jobs
def run_evaluate(args: argparse.Namespace) -> dict:
    from lib.export.checkpoint_model import model_from_checkpoint

    if args.resume and args.resume != "auto":
        ckpt = Path(args.resume)
    elif args.output_dir:
        ckpt = Path(args.output_dir) / "model_best.pth.tar"
    else:
        raise FinetuneError("--evaluate needs --resume CHECKPOINT or --output-dir holding model_best.pth.tar")
    model, state = model_from_checkpoint(ckpt)
    out = check_output_file(ckpt.parent / "eval_metrics.json", "the metrics file")
    saved = state["args"]
    dataset = args.dataset or saved.get("dataset")
    data_root = args.data_root if args.data_root is not None else saved.get("data_root")
    ctx = cli.init_context(args.device)
    data = load_data(args, dataset, data_root, saved.get("input_size"), holdout=False, ctx=ctx)
    metrics = evaluate(model.to(ctx.device), data.val, nn.CrossEntropyLoss(), ctx.device,
                       progress=not args.no_progress, dist=ctx)
    result = {"checkpoint": str(ckpt), "epoch": state["epoch"], "dataset": dataset, "split": "val",
              "val": metrics, "policy": saved.get("policy")}
    if not ctx.is_main:
        return result
    atomic_write_json(out, result)
    print(json.dumps({"top1": metrics["top1"], "top5": metrics["top5"], "loss": metrics["loss"],
                      "samples": metrics["samples"], "metrics": str(out)}))
    return result


def check_flags(args: argparse.Namespace) -> None:
    """Refuse bad values before any work (the export runs last, so its flags too)."""
    cli.check_minimums(args, FLAG_MINIMUMS)
    if not 0 < args.min_agreement <= 1:
        raise FinetuneError(f"--min-agreement={args.min_agreement} is not allowed: expected a fraction in (0, 1]")
    if not 0 <= args.holdout < 1:
        raise FinetuneError(f"--holdout={args.holdout} is not allowed: expected a fraction in [0, 1) "
                            f"(0 = pick the best epoch on the val split)")
    optim_config_from_args(args)  # validates the optimisation flags


def run_train(args: argparse.Namespace) -> dict:
    started = time.time()
    check_flags(args)
    resume_state = None
    if args.resume == "auto":
        if not args.output_dir:
            raise FinetuneError("--resume auto needs --output-dir")
        guess = Path(args.output_dir) / "checkpoint.pth.tar"
        resume_state = load_checkpoint(guess) if guess.exists() else None
    elif args.resume:
        resume_state = load_checkpoint(args.resume)
        if not args.output_dir:
            args.output_dir = str(Path(args.resume).parent)
    if resume_state is not None:
        return _train(args, resume_state["args"], None, None, resume_state, started)
    check_train_noise_flag(args.train_noise)
    if not args.policy:
        raise FinetuneError("--policy is required (a CIM-AQ .npy or our .json)")
    start_state, start_plain = read_start(args.init)
    return _train(args, start_state["args"] if start_state else None, start_state, start_plain, None, started)


def _train(args, start_args, start_state, start_plain, resume_state, started) -> dict:
    from lib.export import export_model

    seed_everything(args.seed)
    if resume_state is not None:
        saved = resume_state["args"]
        resumed = ModelSpec.from_args(saved, source="resume checkpoint args")
        spec, policy, hw = resumed.replace(quant="none", policy=None, hardware=None), resumed.policy, resumed.hardware
        hw_path, policy_file = resumed.hardware_path, saved.get("policy_file")
    else:
        start_spec = ModelSpec.from_args(start_args, source="--init checkpoint args") if start_args else None
        spec = spec_from_flags(args.arch, args.dataset, args.data_root, args.input_size, start=start_spec)
        policy, policy_file = Policy.load(args.policy), str(args.policy)
        hw, hw_path = hardware_for(args.hardware, start_spec)
    check_supported(policy)
    train_noise = train_noise_for(args.train_noise, hw.noise, resume_state["args"] if resume_state else None)
    out_dir = Path(args.output_dir) if args.output_dir else default_output_dir(spec, policy_file)
    check_run_dir(out_dir, resume=args.resume is not None, overwrite=args.overwrite)
    ctx = cli.init_context(args.device, args.sync_bn)  # after every rank's checks: joining waits for all ranks
    device = ctx.device
    data = load_data(args, spec.dataset, spec.data_root, spec.input_size, ctx=ctx)
    if spec.num_classes not in (None, data.num_classes):
        raise FinetuneError(f"--init has {spec.num_classes} classes but {spec.dataset} has {data.num_classes}")
    spec = spec.replace(num_classes=data.num_classes)
    # .npy rows follow the model's construction order (CIM-AQ's files); inside, call order.
    float_model, order = layer_order(lambda: create_model(spec.arch, spec.num_classes), spec.input_size)
    refuse_attention_rows(policy, float_model, spec.input_size, f"policy {policy_file!r}")
    if resume_state is None and Path(args.policy).suffix == ".npy":
        policy = Policy.load(args.policy, order)
    # The policy must fit the model before anything trains (length, names, bits).
    cost = check_policy(policy, spec, hw)
    log.info("policy %s: %d layers, latency %.1f µs = %.3f × uniform %d/%d-bit", args.policy or "(resumed)",
             len(policy), cost.total_latency, cost.ratio, *BASELINE_BITS)
    for key, sides in hw.pricing_differences().items():
        log.warning("hardware %s: the cost model prices %s, the CIM layers simulate %s", key, sides["priced"],
                    sides["simulated"])
    if ctx.is_main:
        open_run_dir(out_dir)
        policy.save(out_dir / "policy", order)
    mixed = spec.at_policy(policy, hw, hw_path)
    if resume_state is not None:
        model = build_model(mixed)
    else:
        model = model_at_policy(spec, policy, hw, start_state, start_plain, data.train, args.calibration_batches)
    flags = {k: v for k, v in vars(args).items()
             if k not in ("arch", "dataset", "data_root", "input_size", "policy", "hardware", "resume", "train_noise")}
    saved_args = {**flags, **mixed.to_args(), "policy_file": policy_file,
                  "train_noise": train_noise.to_dict() if train_noise is not None else None}
    if train_noise is not None:
        attach_noise(model, train_noise, seed=args.seed)
        log.info("noise-aware training under %s: every training forward programs the cells afresh",
                 train_noise.describe())
    cfg = optim_config_from_args(args)
    tracker = None
    if ctx.is_main:
        atomic_write_json(out_dir / "args.json", plain(saved_args))
        tracker = Tracker(out_dir, tensorboard=not args.no_tensorboard, wandb_project=args.wandb,
                          run_name=args.run_name or out_dir.name, config=plain(saved_args))
    try:
        selection = data.holdout if data.holdout is not None else data.val
        result = fit(model, data.train, selection, cfg, out_dir, args=saved_args, device=device,
                     seed=args.seed, resume=resume_state, tracker=tracker, max_batches=args.max_batches,
                     progress=not args.no_progress, dist=ctx, sync_bn=args.sync_bn)
    finally:
        if tracker is not None:
            tracker.close()

    if ctx.is_main:  # rank 0 reads the best checkpoint; every rank then holds its weights
        best = load_checkpoint(result.best_checkpoint or result.checkpoint)
        load_model_state(model, best["state_dict"], result.best_checkpoint)
    broadcast_module_state(model, ctx)
    detach_noise(model)  # the test accuracy on the ideal crossbar; under the training noise below
    test = evaluate(model, data.val, nn.CrossEntropyLoss(), device, dist=ctx)
    noisy = None
    if train_noise is not None:
        attach_noise(model, train_noise, seed=args.seed)
        noisy = evaluate(model, data.val, nn.CrossEntropyLoss(), device, dist=ctx)
        detach_noise(model)
        log.info("test top-1 under %s: %.2f%% (ideal crossbar %.2f%%)", train_noise.describe(), noisy["top1"],
                 test["top1"])
    log.info("best epoch %d (holdout top-1 %.2f%%): test top-1 %.2f%% top-5 %.2f%%", result.best_epoch,
             result.best_acc1, test["top1"], test["top5"])
    deployed = deployed_accuracy(model, data, args, test, ctx)
    report = {
        "accuracy": {"test_top1": test["top1"], "test_top5": test["top5"], "test_loss": test["loss"],
                     "test_samples": test["samples"], "holdout_best_top1": result.best_acc1,
                     "best_epoch": result.best_epoch,
                     "selected_on": "holdout" if data.holdout is not None else "val",
                     "deployed_top1": deployed["top1"], "deployed": deployed,
                     "test_noise": "ideal", "train_noise": train_noise.describe() if train_noise else None,
                     "noisy_test_top1": noisy["top1"] if noisy else None},
        "policy": policy.to_json_dict(),
        "latency_us": cost.total_latency, "baseline_latency_us": cost.baseline_latency,
        "baseline_bits": list(cost.baseline_bits), "latency_ratio": cost.ratio, "arrays": cost.arrays,
        "executes": cost.executes, "adc_conversions": cost.adc_conversions,
        # energy_pj, energy/edp/area ratios, area_mm2, energy_split_pj: None where the hardware has no energy model
        **{k: v for k, v in cost.summary().items() if k not in ("latency_us", "latency_ratio")},
        "hardware": hw.to_dict(), "hardware_priced_vs_simulated": hw.pricing_differences(),
        "arch": spec.arch, "dataset": spec.dataset,
        "checkpoint": str(result.best_checkpoint), "epochs": cfg.epochs, "history": result.history,
        "kernels": RUNTIME.report(), "routes": route_counts(model),
    }
    if not ctx.is_main:
        barrier(ctx)  # while rank 0 writes the report and exports
        return report
    # Written before the export too, so a failed export leaves the training results on disk.
    atomic_write_json(out_dir / "report.json", plain(report))
    if not args.no_export:
        images = first_images(data.val, args.export_images)
        meta = {"arch": spec.arch, "dataset": spec.dataset, "test_top1": test["top1"]}
        exported = export_model(model, out_dir / "model.onnx", images, metadata=meta,
                                min_agreement=args.min_agreement)
        report.update(exported.check.to_dict())
        report["export"] = {k: v for k, v in exported.to_dict().items() if not k.startswith("ort_")}
    report["seconds"] = round(time.time() - started, 2)
    atomic_write_json(out_dir / "report.json", plain(report))
    print(json.dumps({"test_top1": test["top1"], "latency_ratio": cost.ratio,
                      "ort_top1_agreement": report.get("ort_top1_agreement"),
                      "ort_max_abs_diff": report.get("ort_max_abs_diff"), "output_dir": str(out_dir)}))
    barrier(ctx)
    return report


def deployed_accuracy(model: nn.Module, data, args: argparse.Namespace, test: dict, ctx: DistContext) -> dict:
    """Test accuracy in the faithful (bit-serial) input mode, whichever mode trained; a layer that
    trained multi-bit gets its ADC steps recalibrated on training batches first (lib.cim.deploy)."""
    from lib.cim import faithful_copy

    faithful, changed = faithful_copy(model, data.train, args.calibration_batches)
    if changed:
        broadcast_module_state(faithful, ctx)  # each rank recalibrated on its own shard: rank 0's steps
    metrics = test if not changed else evaluate(faithful, data.val, nn.CrossEntropyLoss(), ctx.device, dist=ctx)
    log.info("deployed (bit-serial inputs) test top-1 %.2f%%%s", metrics["top1"],
             f" ({changed} layers' ADC steps recalibrated)" if changed else "")
    return {"top1": metrics["top1"], "input_mode": "bit-serial", "adc_recalibrated_layers": changed}


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    cli.setup(args.log_level, args.threads)
    job = run_evaluate if args.evaluate else run_train
    return cli.run(lambda: job(args))


if __name__ == "__main__":
    sys.exit(main())
