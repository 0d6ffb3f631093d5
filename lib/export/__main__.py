"""Export a trained CIM checkpoint to ONNX QCDQ and check it with onnxruntime on validation images.

Example:
  python -m lib.export --checkpoint runs/finetune/digits_resnet20/model_best.pth.tar --output model.onnx

The model is rebuilt from the checkpoint's recorded args; the validation images come from the
checkpoint's dataset (override with --dataset/--data-root). Writes the ONNX file and a JSON
report (default <output stem>.export.json) with the onnxruntime agreement and graph summary.
Existing --output/--report files are refused unless --overwrite. Exit status 2 with one line
`error: ...` on any user error, including a failed onnxruntime check, before any work where it can.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from lib import cli
from lib.fileio import atomic_write_json, remove_stale_temp_files
from lib.run_dir import add_overwrite_arg, check_output_file

if TYPE_CHECKING:
    import torch


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m lib.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="cim-aq checkpoint of a quantized model (pretrain/finetune)")
    p.add_argument("--output", required=True, help="ONNX file to write")
    p.add_argument("--report", default=None, help="JSON report path (default <output stem>.export.json)")
    p.add_argument("--dataset", default=None, help="dataset of the validation images (default: the checkpoint's)")
    p.add_argument("--data-root", default=None, help="dataset folder (default: the checkpoint's)")
    p.add_argument("--images", type=int, default=256, help="validation images for the onnxruntime check")
    p.add_argument("--min-agreement", type=float, default=0.99, help="required onnxruntime/PyTorch top-1 agreement")
    p.add_argument("--opset", type=int, default=13, help="ONNX opset (13 or newer, at most 20)")
    add_overwrite_arg(p, "existing --output/--report files")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    p.add_argument("--log-level", default="INFO", help="logging level")
    return p.parse_args(argv)


def validation_images(dataset: str, data_root: Optional[str], input_size: int, count: int) -> torch.Tensor:
    """The first `count` images of the dataset's val split, preprocessed as for evaluation."""
    from lib.data import build_loaders, first_images

    data = build_loaders(dataset, data_root, input_size, batch_size=min(count, 256), workers=0)
    return first_images(data.val, count)


def report_path(args: argparse.Namespace) -> Path:
    return Path(args.report) if args.report else Path(args.output).with_suffix(".export.json")


def check_args(args: argparse.Namespace) -> None:
    """Refuse bad values and unusable output paths before the model is rebuilt and the data loaded."""
    cli.check_minimums(args, {"images": 1, "threads": 0})
    if not 13 <= args.opset <= 20:
        raise cli.FlagError(f"--opset={args.opset} is not allowed: expected 13..20 (TorchScript exporter with int32 "
                            f"bias)")
    if not 0 < args.min_agreement <= 1:
        raise cli.FlagError(f"--min-agreement={args.min_agreement} is not allowed: expected a fraction in (0, 1]")
    check_output_file(args.output, "--output", overwrite=args.overwrite)
    check_output_file(report_path(args), "--report", overwrite=args.overwrite)


def export_checkpoint(args: argparse.Namespace) -> None:
    """Rebuild the checkpoint's model, export it, check it with onnxruntime, write the report."""
    from lib.export import export_model  # lazy: onnx/onnxruntime only after the arguments are checked
    from lib.export.checkpoint_model import model_from_checkpoint

    check_args(args)
    remove_stale_temp_files(Path(args.output).parent)
    model, state = model_from_checkpoint(args.checkpoint)
    saved = state["args"]
    dataset = args.dataset or saved.get("dataset")
    if not dataset:
        raise cli.FlagError("the checkpoint names no dataset; pass --dataset (and --data-root)")
    data_root = args.data_root if args.data_root is not None else saved.get("data_root")
    images = validation_images(dataset, data_root, int(saved.get("input_size") or 32), args.images)
    meta = {"checkpoint": str(args.checkpoint), "arch": saved.get("arch"), "dataset": dataset}
    result = export_model(model, args.output, images, metadata=meta, opset=args.opset,
                          min_agreement=args.min_agreement)
    report = report_path(args)
    atomic_write_json(report, {**result.to_dict(), "metadata": result.metadata})
    print(json.dumps({"onnx": str(result.path), "ort_top1_agreement": result.check.top1_agreement,
                      "ort_max_abs_diff": result.check.max_abs_diff, "export_seconds": round(result.export_seconds, 2),
                      "report": str(report)}))


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    cli.setup(args.log_level, args.threads)
    return cli.run(lambda: export_checkpoint(args))


if __name__ == "__main__":
    sys.exit(main())
