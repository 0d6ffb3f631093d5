#!/usr/bin/env python
r"""Pretrain a classifier: FP32, or uniform-precision QAT on CIM layers (`--quant uniform`).

Examples:
  python pretrain.py --dataset digits --arch resnet20 --input-size 32 --epochs 15
  python pretrain.py --dataset digits --arch resnet20 --quant uniform --w-bit 8 --a-bit 8 \
      --hardware run/hardware/default.yaml --init runs/pretrain/digits_resnet20/model_best.pth.tar
  python pretrain.py --evaluate --resume runs/pretrain/digits_resnet20/model_best.pth.tar

Writes into --output-dir: checkpoint.pth.tar (every epoch), model_best.pth.tar, metrics.json,
tb/ (TensorBoard). --evaluate writes the checkpoint's metrics as JSON instead of training.
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
from lib.cim.noise import attach as attach_noise
from lib.data import build_loaders, default_input_size
from lib.distributed import SINGLE, DistContext
from lib.errors import UserError
from lib.fileio import atomic_write_json
from lib.model_spec import DEFAULT_HARDWARE, ModelSpec, build_model as build_spec_model
from lib.policy import check_layer_bits
from lib.run_dir import add_overwrite_arg, check_output_file, check_run_dir, open_run_dir
from lib.training import Tracker, evaluate, fit, load_checkpoint, load_model_state, seed_everything
from lib.training.checkpoint import plain
from lib.training.optim import add_optim_args, optim_config_from_args
from lib.training.train_noise import add_train_noise_arg, check_train_noise_flag, train_noise_for
from models import read_state_dict

log = logging.getLogger("pretrain")

REPO_ROOT = Path(__file__).resolve().parent
# What defines the model (and its data): taken from a checkpoint on --resume/--evaluate; an explicit
# conflicting flag is an error rather than a silently different model.
MODEL_KEYS = ("arch", "num_classes", "input_size", "quant", "w_bit", "a_bit", "hardware")
DATA_KEYS = ("dataset", "data_root")
DEFAULTS = {"dataset": "digits", "data_root": None, "arch": "resnet20", "quant": "none", "w_bit": 8, "a_bit": 8,
            "hardware": None, "input_size": None, "num_classes": None}
FLAG_MINIMUMS = {"input_size": 1, "batch_size": 1, "workers": 0, "max_batches": 1, "threads": 0}


class PretrainError(UserError, ValueError):
    """Flags that contradict each other or the checkpoint they continue."""


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=None,
                   help="digits | digits-small | cifar10 | cifar100 | imagefolder (root/train/<class>, root/val/<class>)"
                        " (default: digits, or the checkpoint's on --resume/--evaluate)")
    g.add_argument("--data-root", default=None,
                   help="dataset folder; for digits the cache folder (default data_cache/ or $CIM_AQ_DATA_CACHE)")
    g.add_argument("--input-size", type=int, default=None, help="input image side in pixels (default: 32 for digits/"
                   "CIFAR, 224 for image folders)")
    g.add_argument("--transform-style", default="auto", choices=("auto", "imagenet", "cifar"),
                   help="augmentation style; auto = cifar-style up to 64 px, imagenet-style above")
    g.add_argument("--batch-size", type=int, default=128, help="mini-batch size")
    g.add_argument("--workers", type=int, default=2, help="data-loading worker processes (0 = in the main process)")

    g = p.add_argument_group("model")
    g.add_argument("--arch", default=None, help="model name from models.list_models() (default: resnet20)")
    g.add_argument("--pretrained", default=None, help="local weights file for the FP32 model (head resized if needed)")
    g.add_argument("--init", default=None,
                   help="FP32 checkpoint (ours or a state dict) loaded strictly before quantization, e.g. for QAT")

    g = p.add_argument_group("quantization")
    g.add_argument("--quant", default=None, choices=("none", "uniform"),
                   help="none = FP32 training; uniform = QAT with every layer at --w-bit/--a-bit on CIM layers")
    g.add_argument("--w-bit", type=int, default=None, help="weight bits for --quant uniform (default 8)")
    g.add_argument("--a-bit", type=int, default=None, help="activation bits for --quant uniform (default 8)")
    add_train_noise_arg(g)
    g.add_argument("--hardware", default=None,
                   help=f"crossbar hardware YAML for --quant uniform (default {DEFAULT_HARDWARE.relative_to(REPO_ROOT)})")

    add_optim_args(p, epochs=30, lr=0.1)

    g = p.add_argument_group("run")
    g.add_argument("--output-dir", default=None,
                   help="where checkpoints and logs go (default: the --resume checkpoint's folder, else "
                        "runs/pretrain/<dataset>_<arch>[_w<W>a<A>])")
    g.add_argument("--resume", default=None,
                   help="checkpoint to continue from; 'auto' = <output-dir>/checkpoint.pth.tar if it exists")
    add_overwrite_arg(g)
    g.add_argument("--evaluate", action="store_true",
                   help="only evaluate a checkpoint (--resume, default <output-dir>/model_best.pth.tar) on the val "
                        "set and write the metrics JSON")
    g.add_argument("--metrics-out", default=None,
                   help="metrics JSON path (default <output-dir>/metrics.json, or eval_metrics.json beside the "
                        "checkpoint with --evaluate)")
    g.add_argument("--seed", type=int, default=0, help="seed for initialisation, shuffling and augmentation")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (under torchrun: each process's "
                   "local GPU, or the CPU)")
    g.add_argument("--threads", type=int, default=0,
                   help="CPU threads for torch (0 = torch's default); 1 avoids oversubscription on busy machines")
    cli.add_distributed_args(g)
    g.add_argument("--no-tensorboard", action="store_true", help="do not write TensorBoard logs")
    g.add_argument("--wandb", default=None, metavar="PROJECT",
                   help="also log to this W&B project (off by default; offline when there is no network)")
    g.add_argument("--run-name", default=None, help="run name for W&B")
    g.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    g.add_argument("--log-level", default="INFO", help="logging level")
    return p.parse_args(argv)


def resolve_spec(args: argparse.Namespace, saved: Optional[dict] = None) -> dict:
    """Model/data description from the flags, filled from a checkpoint's args (flags must not conflict)."""
    spec = {}
    for key in MODEL_KEYS + DATA_KEYS:
        given = getattr(args, key, None)
        if saved is not None and key in saved and saved[key] is not None:
            if given is not None and key in MODEL_KEYS and given != saved[key]:
                raise PretrainError(f"--{key.replace('_', '-')} {given} conflicts with the checkpoint's "
                                 f"{key}={saved[key]!r}")
            spec[key] = saved[key] if given is None else given
        else:
            spec[key] = given if given is not None else DEFAULTS[key]
    if saved is not None and saved.get("hardware_config") is not None:
        spec["hardware_config"] = saved["hardware_config"]
    if spec["input_size"] is None:
        spec["input_size"] = default_input_size(spec["dataset"])
    if spec["quant"] == "uniform" and spec["hardware"] is None:
        spec["hardware"] = str(DEFAULT_HARDWARE)
    return spec


def hardware_config(spec: dict):
    """The HardwareConfig of a quantized spec: the recorded fields if present, else the YAML file."""
    from lib.cim import HardwareConfig

    if spec.get("hardware_config"):
        return HardwareConfig.from_dict(spec["hardware_config"], source="checkpoint args")
    return HardwareConfig.from_yaml(spec["hardware"])


def build_model(spec: dict, pretrained: Optional[str] = None, init: Optional[str] = None,
                calibration_data=None) -> nn.Module:
    """create_model → (optional --init weights) → quantize_model for --quant uniform (lib.model_spec).

    calibration_data: batches that initialise the quantizers' steps of a fresh conversion (not
    needed when a checkpoint's state dict is loaded next).
    """
    hw = hardware_config(spec) if spec["quant"] == "uniform" else None
    if hw is not None:
        spec["hardware_config"] = hw.to_dict()
    model_spec = ModelSpec(arch=spec["arch"], num_classes=spec["num_classes"], input_size=spec["input_size"],
                           dataset=spec["dataset"], data_root=spec["data_root"], quant=spec["quant"],
                           w_bit=spec["w_bit"], a_bit=spec["a_bit"], hardware=hw, hardware_path=spec["hardware"])
    weights = read_state_dict(init) if init else None
    model = build_spec_model(model_spec, weights=weights, calibration=calibration_data, pretrained=pretrained)
    if init:
        log.info("initialised %s from %s", spec["arch"], init)
    if hw is not None:
        log.info("quantized %s uniformly to w%d/a%d on %s", spec["arch"], spec["w_bit"], spec["a_bit"],
                 spec["hardware"])
    return model


def default_output_dir(spec: dict) -> Path:
    name = f"{spec['dataset']}_{spec['arch']}"
    if spec["quant"] == "uniform":
        name += f"_w{spec['w_bit']}a{spec['a_bit']}"
    return REPO_ROOT / "runs" / "pretrain" / name



def load_data(args: argparse.Namespace, spec: dict, ctx: DistContext = SINGLE):
    data = build_loaders(spec["dataset"], spec["data_root"], spec["input_size"], batch_size=args.batch_size,
                         workers=args.workers, transform_style=args.transform_style, seed=args.seed, dist=ctx)
    if spec["num_classes"] is None:
        spec["num_classes"] = data.num_classes
    elif spec["num_classes"] != data.num_classes:
        raise PretrainError(f"the model has {spec['num_classes']} classes but dataset {spec['dataset']} "
                         f"has {data.num_classes}")
    return data


def run_evaluate(args: argparse.Namespace) -> dict:
    out_dir = Path(args.output_dir) if args.output_dir else None
    if args.resume and args.resume != "auto":
        ckpt_path = Path(args.resume)
    elif out_dir is not None:
        ckpt_path = out_dir / "model_best.pth.tar"
    else:
        raise PretrainError("--evaluate needs --resume CHECKPOINT or --output-dir holding model_best.pth.tar")
    state = load_checkpoint(ckpt_path)
    spec = resolve_spec(args, state["args"])
    out = check_output_file(args.metrics_out or ckpt_path.parent / "eval_metrics.json", "--metrics-out")
    ctx = cli.init_context(args.device)
    data = load_data(args, spec, ctx)
    model = build_model(spec)
    load_model_state(model, state["state_dict"], ckpt_path)
    model.to(ctx.device)
    started = time.time()
    metrics = evaluate(model, data.val, nn.CrossEntropyLoss(), ctx.device, progress=not args.no_progress, dist=ctx)
    result = {"checkpoint": str(ckpt_path), "epoch": state["epoch"], "dataset": spec["dataset"], "split": "val",
              "val": metrics, "seconds": round(time.time() - started, 3), "spec": plain(spec)}
    if not ctx.is_main:
        return result
    atomic_write_json(out, result)
    print(json.dumps({"top1": metrics["top1"], "top5": metrics["top5"], "loss": metrics["loss"],
                      "samples": metrics["samples"], "metrics": str(out)}))
    return result


def check_quant_flags(args: argparse.Namespace, spec: dict) -> None:
    """Quantization flags only mean something for --quant uniform: refuse them on an FP32 run."""
    if spec["quant"] != "uniform":
        given = [flag for flag, value in (("--hardware", args.hardware), ("--w-bit", args.w_bit),
                                          ("--a-bit", args.a_bit)) if value is not None]
        if given:
            raise PretrainError(f"{', '.join(given)}: for quantized training only; add --quant uniform, "
                                f"or drop {', '.join(given)} for an FP32 run")


def run_train(args: argparse.Namespace) -> dict:
    cli.check_minimums(args, FLAG_MINIMUMS)
    cfg = optim_config_from_args(args)
    resume_state = None
    resume_path = None
    if args.resume == "auto":
        guess = Path(args.output_dir or default_output_dir(resolve_spec(args))) / "checkpoint.pth.tar"
        resume_path = guess if guess.exists() else None
        if resume_path is None:
            log.info("--resume auto: no checkpoint at %s, starting fresh", guess)
    elif args.resume:
        resume_path = Path(args.resume)
    if resume_path is not None:
        resume_state = load_checkpoint(resume_path)
        log.info("resuming from %s (epoch %d)", resume_path, resume_state["epoch"])
    spec = resolve_spec(args, resume_state["args"] if resume_state else None)
    check_quant_flags(args, spec)
    check_train_noise_flag(args.train_noise)
    train_noise = None
    if spec["quant"] != "uniform" and args.train_noise is not None:
        raise PretrainError("--train-noise needs --quant uniform: device noise lives on the CIM layers' cells")
    if spec["quant"] == "uniform":  # hardware file and bits are checked before any data or model
        hw = hardware_config(spec)
        train_noise = train_noise_for(args.train_noise, hw.noise, resume_state["args"] if resume_state else None)
        spec["hardware_config"] = hw.to_dict()
        try:
            check_layer_bits(spec["w_bit"], spec["a_bit"], None)
        except ValueError as err:
            raise PretrainError(f"--w-bit {spec['w_bit']} --a-bit {spec['a_bit']}: {err} "
                                f"(the CIM layers' range)") from None
    if args.output_dir:
        out_dir = Path(args.output_dir)
    else:  # a resumed run continues in its checkpoint's folder
        out_dir = resume_path.parent if resume_path is not None else default_output_dir(spec)
    check_run_dir(out_dir, resume=args.resume is not None, overwrite=args.overwrite)
    metrics_out = check_output_file(args.metrics_out or out_dir / "metrics.json", "--metrics-out")
    if spec["quant"] == "uniform" and not (args.init or args.pretrained or resume_state):
        log.warning("--quant uniform without --init: QAT starts from random weights")
    seed_everything(args.seed)
    ctx = cli.init_context(args.device, args.sync_bn)  # after every rank's checks: joining waits for all ranks
    data = load_data(args, spec, ctx)
    fresh = resume_state is None
    # each rank calibrates on its shard; fit starts every rank from rank 0's state
    model = build_model(spec, pretrained=args.pretrained if fresh else None, init=args.init if fresh else None,
                        calibration_data=data.train if fresh else None)
    saved_args = {**spec, **{k: v for k, v in vars(args).items() if k not in spec},
                  "train_noise": train_noise.to_dict() if train_noise is not None else None}
    if train_noise is not None:
        attach_noise(model, train_noise, seed=args.seed)
        log.info("noise-aware QAT under %s: every training forward programs the cells afresh", train_noise.describe())
    tracker = None
    if ctx.is_main:
        open_run_dir(out_dir)
        atomic_write_json(out_dir / "args.json", plain(saved_args))
        tracker = Tracker(out_dir, tensorboard=not args.no_tensorboard, wandb_project=args.wandb,
                          run_name=args.run_name or out_dir.name, config=plain(saved_args))
    try:
        result = fit(model, data.train, data.val, cfg, out_dir, args=saved_args, device=ctx.device, seed=args.seed,
                     resume=resume_state, tracker=tracker, max_batches=args.max_batches,
                     progress=not args.no_progress, dist=ctx, sync_bn=args.sync_bn)
    finally:
        if tracker is not None:
            tracker.close()
    summary = {"best_acc1": result.best_acc1, "best_epoch": result.best_epoch, "last": result.last,
               "epochs": cfg.epochs, "epochs_run": result.epochs_run, "seconds": round(result.seconds, 3),
               "output_dir": str(out_dir), "spec": plain(spec), "history": result.history,
               "processes": ctx.world_size}
    if not ctx.is_main:
        return summary
    atomic_write_json(metrics_out, summary)
    print(json.dumps({"best_acc1": result.best_acc1, "best_epoch": result.best_epoch,
                      "last_top1": result.last.get("top1"), "seconds": round(result.seconds, 1),
                      "output_dir": str(out_dir)}))
    return summary


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    cli.setup(args.log_level, args.threads)
    job = run_evaluate if args.evaluate else run_train
    return cli.run(lambda: job(args))


if __name__ == "__main__":
    sys.exit(main())
