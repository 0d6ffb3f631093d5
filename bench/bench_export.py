#!/usr/bin/env python
"""Benchmark (by hand): ONNX export time, and onnxruntime vs PyTorch CPU inference of resnet20 on digits.

A mixed-precision resnet20 on CIM layers (a trained CIM checkpoint via --checkpoint, or FP32 weights
(--init, else random) quantized to a seeded random --min-bits..8-bit policy and calibrated on training
images) is exported with lib.export, then both runtimes classify the same validation images at
32x32. Prints medians and ratios.
  .venv/bin/python bench/bench_export.py [--init runs/demo/pretrain_fp32/model_best.pth.tar]
      [--hardware run/hardware/default.yaml] [--psum off] [--batch-size 64] [--images 256]
      [--threads 1] [--repeats 5] [--checkpoint CKPT]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from lib.cim import HardwareConfig, quantizable_layers, quantize_model  # noqa: E402
from lib.data import build_loaders  # noqa: E402
from lib.export import export_model  # noqa: E402
from lib.export.checkpoint_model import model_from_checkpoint  # noqa: E402
from lib.layer_trace import called_layer_names  # noqa: E402
from lib.policy import Policy  # noqa: E402
from models import create_model, read_state_dict  # noqa: E402
from timing import round_robin_medians  # noqa: E402  (bench/timing.py)


def build(args, data):
    if args.checkpoint:
        model, _ = model_from_checkpoint(args.checkpoint)
        return model.eval()
    hw = HardwareConfig.from_yaml(args.hardware)
    if args.psum:
        hw = hw.with_overrides(psum_granularity=args.psum)
    model = create_model("resnet20", data.num_classes)
    if args.init:
        model.load_state_dict(read_state_dict(args.init))
    rng = np.random.RandomState(args.seed)
    layers = len(called_layer_names(model, input_size=32))
    policy = Policy(rng.randint(args.min_bits, 9, layers).tolist(), rng.randint(args.min_bits, 9, layers).tolist())
    torch.manual_seed(args.seed)
    quantize_model(model, policy, hw, input_size=32, calibration_data=data.train)
    return model.eval()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="a trained resnet20 CIM checkpoint (else --init weights)")
    p.add_argument("--init", default=None, help="FP32 resnet20 weights to quantize (e.g. runs/demo/pretrain_fp32/"
                   "model_best.pth.tar; default: fresh random weights)")
    p.add_argument("--hardware", default=str(REPO / "run" / "hardware" / "default.yaml"), help="hardware YAML")
    p.add_argument("--psum", default=None, choices=("off", "layer", "array", "column"),
                   help="override the hardware's partial-sum (ADC) granularity")
    p.add_argument("--images", type=int, default=256, help="validation images classified per run")
    p.add_argument("--batch-size", type=int, default=64, help="inference batch size (both runtimes)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for torch and onnxruntime")
    p.add_argument("--repeats", type=int, default=5, help="timed repetitions (median reported)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random policy and calibration")
    p.add_argument("--min-bits", type=int, default=4,
                   help="random policy bits in [min-bits, 8] (without finetuning, lower bits ruin accuracy and "
                        "leave logit margins that float-order differences can flip)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    data = build_loaders("digits", input_size=32, batch_size=args.batch_size, workers=0, seed=args.seed)
    model = build(args, data)
    images = torch.cat([x for x, _ in data.val])[:args.images]
    batches = images.split(args.batch_size)
    layers = quantizable_layers(model)
    hw = layers[0][1].hw

    with tempfile.TemporaryDirectory(prefix="bench_export_") as tmp:
        started = time.perf_counter()
        result = export_model(model, Path(tmp) / "resnet20.onnx", images)
        export_total = time.perf_counter() - started
        model_bytes = (Path(tmp) / "resnet20.onnx").read_bytes()

    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    started = time.perf_counter()
    session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    session_seconds = time.perf_counter() - started
    arrays = [b.numpy() for b in batches]

    def run_torch():
        with torch.no_grad():
            for batch in batches:
                model(batch)

    def run_ort():
        for batch in arrays:
            session.run(None, {"input": batch})

    with torch.no_grad():
        accuracy = float(np.mean([(model(x).argmax(1) == y).float().mean().item() for x, y in data.val]))
    medians = round_robin_medians({"torch": run_torch, "ort": run_ort}, args.repeats, warmup=1)
    torch_s, ort_s = medians["torch"], medians["ort"]
    per_image = 1e3 / len(images)
    print(f"resnet20 / digits 32x32, {len(layers)} CIM layers, psum={hw.psum_granularity}, "
          f"weights={hw.weight_granularity}, {hw.rows}x{hw.cols} arrays, {hw.cell_bits}-bit cells, "
          f"{args.threads} thread(s), batch {args.batch_size}, {len(images)} images")
    print(f"  graph: {result.graph['nodes']} nodes ({result.graph['ops'].get('Conv', 0)} Conv, "
          f"{result.graph['ops'].get('QuantizeLinear', 0)} QuantizeLinear, "
          f"{result.graph['ops'].get('DequantizeLinear', 0)} DequantizeLinear)")
    print(f"  export: {result.export_seconds:.1f} s to a checked graph, {export_total:.1f} s with the onnxruntime "
          f"check; session creation {session_seconds:.2f} s")
    print(f"  export phases (s): {result.timings}")
    print(f"  PyTorch val top-1 {100 * accuracy:.1f}% (policy w={[l.w_bit for _, l in layers]}, "
          f"a={[l.a_bit for _, l in layers]})")
    print(f"  onnxruntime vs PyTorch: top-1 agreement {result.check.top1_agreement:.4f}, "
          f"max |Δlogit| {result.check.max_abs_diff:.3g} ({result.check.images} images); onnxruntime vs the export "
          f"form in PyTorch {result.check.form_max_abs_diff:.3g}, export form vs CIM model {result.form_max_abs_diff:.3g}")
    print(f"  inference: PyTorch (CIM layers) {torch_s * per_image:.2f} ms/image, onnxruntime "
          f"{ort_s * per_image:.2f} ms/image -> onnxruntime/PyTorch time ratio {ort_s / torch_s:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
