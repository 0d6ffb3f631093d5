#!/usr/bin/env python
"""Training throughput of N torchrun processes against one: images per second over all ranks.

Launches `torchrun --nproc_per_node=N` for each N of --procs (round-robin, --repeats times) on
this very script in worker mode. Each worker trains its data shard under DDP with
lib.training.train_one_epoch (one warm-up pass, then --batches timed batches) and rank 0 reports
the images all ranks trained per second. Prints one JSON line per run and a summary with the
median throughput of each N and its ratio to the first N.

  python bench/bench_distributed.py --arch resnet20 --dataset digits --input-size 32 --procs 1 2
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lib.distributed import torchrun_command  # noqa: E402 (after the repository is on the path)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet20")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--input-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=32, help="per process")
    p.add_argument("--batches", type=int, default=10, help="timed batches per process")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2], help="process counts to compare")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def worker(args: argparse.Namespace) -> None:
    """One rank: DDP training of its shard, timed; rank 0 prints the all-rank throughput as JSON."""
    import torch

    from lib import cli
    from lib.data import build_loaders
    from lib.distributed import barrier, ddp_model
    from lib.training import OptimConfig, build_criterion, build_optimizer, train_one_epoch
    from models import create_model

    torch.set_num_threads(args.threads)
    ctx = cli.init_context(args.device)
    data = build_loaders(args.dataset, None, args.input_size, batch_size=args.batch_size, workers=0, dist=ctx)
    model = create_model(args.arch, data.num_classes).to(ctx.device)
    cfg = OptimConfig(epochs=1, lr=0.01)
    optimizer, criterion = build_optimizer(model, cfg), build_criterion(cfg)
    with ddp_model(model, ctx) as train_model:
        train_one_epoch(train_model, data.train, criterion, optimizer, ctx.device, max_batches=2, progress=False,
                        dist=ctx)
        barrier(ctx)
        started = time.perf_counter()
        stats = train_one_epoch(train_model, data.train, criterion, optimizer, ctx.device, max_batches=args.batches,
                                progress=False, dist=ctx)
        seconds = time.perf_counter() - started
    if ctx.is_main:
        print("RESULT " + json.dumps({"procs": ctx.world_size, "images": stats["samples"], "seconds": seconds,
                                      "images_per_s": stats["samples"] / seconds}), flush=True)


def launch(args: argparse.Namespace, procs: int) -> dict:
    cmd = torchrun_command(__file__, ["--worker", "--arch", args.arch, "--dataset", args.dataset, "--input-size",
                                      args.input_size, "--batch-size", args.batch_size, "--batches", args.batches,
                                      "--threads", args.threads, "--device", args.device], procs)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "CIM_AQ_COMPILE": os.environ.get("CIM_AQ_COMPILE", "0")}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"torchrun with {procs} processes failed:\n{done.stderr[-2000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    results: dict[int, list[float]] = {n: [] for n in args.procs}
    for _ in range(args.repeats):
        for procs in args.procs:
            run = launch(args, procs)
            results[procs].append(run["images_per_s"])
            print(json.dumps(run), flush=True)
    base = statistics.median(results[args.procs[0]])
    summary = {str(n): {"median_images_per_s": round(statistics.median(v), 2), "runs": [round(x, 2) for x in v],
                        "ratio": round(statistics.median(v) / base, 3)} for n, v in results.items()}
    print(json.dumps({"arch": args.arch, "dataset": args.dataset, "input_size": args.input_size,
                      "batch_size_per_process": args.batch_size, "threads_per_process": args.threads,
                      "summary": summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
