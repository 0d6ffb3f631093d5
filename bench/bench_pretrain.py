#!/usr/bin/env python
"""Benchmark (by hand): pretrain.py trains resnet20 on the built-in digits at 32x32 to >= 95% val top-1.

Runs the real CLI in a subprocess into a fresh folder and prints best val top-1 and wall time.
  .venv/bin/python bench/bench_pretrain.py [--epochs 15] [--threads 1] [--workers 0]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET = 95.0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=15, help="training epochs")
    p.add_argument("--batch-size", type=int, default=64, help="mini-batch size")
    p.add_argument("--lr", type=float, default=0.1, help="peak learning rate")
    p.add_argument("--workers", type=int, default=0, help="data-loading workers")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--output-dir", default=None, help="run folder (default: a fresh temp folder)")
    args = p.parse_args()
    out = Path(args.output_dir) if args.output_dir else Path(tempfile.mkdtemp(prefix="bench_pretrain_"))
    cmd = [sys.executable, str(REPO / "pretrain.py"), "--dataset", "digits", "--arch", "resnet20", "--input-size", "32",
           "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--lr", str(args.lr),
           "--workers", str(args.workers), "--threads", str(args.threads), "--no-progress", "--output-dir", str(out)]
    started = time.time()
    subprocess.run(cmd, cwd=REPO, check=True)
    wall = time.time() - started
    summary = json.loads((out / "metrics.json").read_text())
    best = summary["best_acc1"]
    print(f"resnet20 / digits 32x32 / {args.epochs} epochs: best val top-1 {best:.2f}% (epoch {summary['best_epoch']}), "
          f"final {summary['last']['top1']:.2f}%, wall {wall:.0f} s (training {summary['seconds']:.0f} s), "
          f"target {TARGET}% {'met' if best >= TARGET else 'NOT met'}")
    return 0 if best >= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
