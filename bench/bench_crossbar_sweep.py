#!/usr/bin/env python
"""Benchmark (by hand): the 18-point crossbar sweep (cell_bits 1,2,4 × adc_bits 3..8) of a W4A4
ResNet-20 (first/last layer 8-bit) on digits at 32 px, against one finetuning epoch of the same
model, timed round-robin in this process (bench/timing.py), one torch thread. A third figure,
the 18 points' test evaluations alone (their point models built and calibrated beforehand), is
the floor any exact sweep of these points pays.

The epoch is what finetune.py runs per epoch: one pass over the training images minus its 10 %
holdout (SGD, batch 64) and the holdout's evaluation. The sweep is `python -m lib.crossbar_eval`
in this process (its kernels already warm after the first round). The checkpoint is
runs/xeval/w4a4/model_best.pth.tar, built with pretrain.py and finetune.py when absent.

  .venv/bin/python bench/bench_crossbar_sweep.py --repeats 2
"""
from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from timing import round_robin_medians  # noqa: E402  (bench/timing.py)
from lib.crossbar_eval.cli import main as sweep_main  # noqa: E402
from lib.crossbar_eval.evaluator import PointEvaluator, base_hardware_of  # noqa: E402
from lib.crossbar_eval.grid import parse_axis, points, setting_for  # noqa: E402
from lib.data import HoldoutSpec, build_loaders  # noqa: E402
from lib.model_spec import ModelSpec, model_from_checkpoint  # noqa: E402
from lib.training import OptimConfig, build_optimizer, evaluate, load_checkpoint, train_one_epoch  # noqa: E402

WORK = REPO / "runs" / "xeval"
CHECKPOINT = WORK / "w4a4" / "model_best.pth.tar"


def build_checkpoint() -> None:
    """FP32 ResNet-20 (4 epochs), then W4A4 with 8-bit ends finetuned 3 epochs on multi-bit inputs."""
    py = sys.executable
    run = lambda *argv: subprocess.run([py, *map(str, argv)], cwd=REPO, check=True)  # noqa: E731
    run("-m", "lib.make_policy", "--arch", "resnet20", "--num-classes", "10", "--input-size", "32", "--w-bit", "4",
        "--a-bit", "4", "--first-last", "8", "8", "--output", WORK / "w4a4_e8")
    run("pretrain.py", "--dataset", "digits", "--arch", "resnet20", "--input-size", "32", "--epochs", "4", "--lr",
        "0.1", "--batch-size", "64", "--workers", "0", "--threads", "1", "--output-dir", WORK / "fp32",
        "--no-tensorboard", "--no-progress")
    (WORK / "hw.yaml").write_text("rows: 256\ncols: 256\ncell_bits: 4\ninput_bits: 1\nadc_bits: 8\n"
                                  "mapping: differential-column\ninput_mode: multi-bit\n")
    run("finetune.py", "--dataset", "digits", "--policy", WORK / "w4a4_e8.npy", "--hardware", WORK / "hw.yaml",
        "--init", WORK / "fp32" / "model_best.pth.tar", "--epochs", "3", "--lr", "0.005", "--batch-size", "64",
        "--workers", "0", "--threads", "1", "--output-dir", WORK / "w4a4", "--no-tensorboard", "--no-progress",
        "--no-export")


def point_models(test: list, calibration: list) -> list:
    """The 18 points' models, built and calibrated as the sweep does (each one a copy)."""
    state = load_checkpoint(CHECKPOINT)
    spec = ModelSpec.from_args(state["args"])
    base, _ = model_from_checkpoint(CHECKPOINT)
    policy = spec.policy
    evaluator = PointEvaluator(spec, base.eval(), calibration, test, torch.device("cpu"))
    grid = points([parse_axis("cell_bits=1,2,4", noise=False), parse_axis("adc_bits=3:8", noise=False)])
    settings = [setting_for(p, base_hardware_of(spec.hardware), policy, None) for p in grid]
    return [copy.deepcopy(evaluator.model_for(s)[0]) for s in settings]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(1)
    if not CHECKPOINT.exists():
        print(f"{CHECKPOINT} is absent: building it with pretrain.py and finetune.py", file=sys.stderr)
        build_checkpoint()
    model, _ = model_from_checkpoint(CHECKPOINT)
    data = build_loaders("digits", None, 32, batch_size=64, workers=0, holdout=HoldoutSpec(size=0.1, seed=0), seed=0)
    optimizer = build_optimizer(model, OptimConfig(epochs=1, lr=0.001, scheduler="constant"))
    criterion = nn.CrossEntropyLoss()
    out = Path(tempfile.mkdtemp(prefix="sweep_bench_"))

    def epoch():
        train_one_epoch(model, data.train, criterion, optimizer, "cpu", progress=False)
        evaluate(model, data.holdout, criterion, "cpu")

    def sweep():
        code = sweep_main(["--checkpoint", str(CHECKPOINT), "--sweep", "cell_bits=1,2,4", "adc_bits=3:8",
                           "--batch-size", "128", "--output-dir", str(out), "--overwrite", "--no-progress",
                           "--log-level", "WARNING"])
        assert code == 0

    sweep_data = build_loaders("digits", None, 32, batch_size=128, workers=0, seed=0)  # the sweep's split
    test, calibration = list(sweep_data.val), [next(iter(sweep_data.train))[0]]
    prepared = point_models(test, calibration)

    def evaluations():
        with torch.no_grad():
            for point_model in prepared:
                evaluate(point_model, test, None, "cpu")

    medians = round_robin_medians({"finetune epoch": epoch, "18-point sweep": sweep,
                                   "18 evaluations alone": evaluations}, repeats=args.repeats, warmup=1)
    rows = json.loads((out / "sweep.json").read_text())["rows"]
    print(json.dumps({"seconds": medians, "sweep / epoch": medians["18-point sweep"] / medians["finetune epoch"],
                      "evaluations alone / epoch": medians["18 evaluations alone"] / medians["finetune epoch"],
                      "train_images": len(data.train.dataset), "holdout_images": len(data.holdout.dataset),
                      "test_images": rows and json.loads((out / "sweep.json").read_text())["fingerprint"]["test_images"],
                      "per_point_seconds": [r["seconds"] for r in rows]}, indent=1))


if __name__ == "__main__":
    main()
