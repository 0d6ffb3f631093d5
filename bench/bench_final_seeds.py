#!/usr/bin/env python
"""Benchmark (by hand): how much of a strategy comparison is the final finetune's own spread.

Reads the arms bench_search_strategies.py wrote (its --out folder's results.jsonl), finetunes
each arm's chosen policy again with more seeds of the final finetune (the same epochs and lr,
only --seed changes; seed 0 is the arm's own row), and writes final_seeds.md: per arm the mean ±
sample std of test and deployed top-1 over the seeds. Finished (arm, seed) pairs are kept in
final_seeds.jsonl, so a killed run continues.

  .venv/bin/python bench/bench_final_seeds.py --out runs/bench/strategies --seeds 1 2 \\
      --arms default-b0.35-ilp-s0 default-b0.35-greedy-s0
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from bench_search_strategies import REPO, run  # noqa: E402  (bench/)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "runs" / "bench" / "strategies",
                   help="bench_search_strategies.py's output folder")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2], help="extra seeds of the final finetune")
    p.add_argument("--arms", nargs="*", default=None, help="arm names (default: every arm in results.jsonl)")
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args()


def finetune(arm: dict, args, seed: int) -> dict:
    """The arm's policy finetuned as its own final finetune was, with another seed."""
    folder = args.out / arm["name"]
    finetune_args = json.loads((folder / "finetune" / "args.json").read_text())
    out = folder / f"finetune-seed{seed}"
    # paths the arm's finetune was given relative to the checkout the benchmark ran in
    ran_in = next((p for p in args.out.resolve().parents if (p / "finetune.py").is_file()), REPO)
    hardware, init = (Path(finetune_args[k]) for k in ("hardware", "init"))
    argv = ["finetune.py", "--init", str(init if init.is_absolute() else ran_in / init),
            "--policy", str(folder / "search" / "best_policy.json"),
            "--hardware", str(hardware if hardware.is_absolute() else ran_in / hardware),
            "--epochs", str(finetune_args["epochs"]), "--lr", str(finetune_args["lr"]), "--holdout", str(finetune_args["holdout"]), "--no-export",
            "--seed", str(seed), "--threads", str(args.threads), "--no-progress", "--no-tensorboard", "--overwrite",
            "--output-dir", str(out)]
    run(argv, folder / f"finetune-seed{seed}.log")
    report = json.loads((out / "report.json").read_text())
    return {"name": arm["name"], "seed": seed, "test_top1": report["accuracy"]["test_top1"],
            "deployed_top1": report["accuracy"].get("deployed_top1")}


def spread(values: list) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return ""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {std:.2f} %"


def table(arms: list, rows: list) -> str:
    lines = ["| arm | final-finetune seeds | test top-1 | deployed top-1 |", "|---|---|---|---|"]
    for arm in arms:
        runs = [{"seed": 0, "test_top1": arm["test_top1"], "deployed_top1": arm["deployed_top1"]}]
        runs += sorted((r for r in rows if r["name"] == arm["name"]), key=lambda r: r["seed"])
        lines.append(f"| {arm['name']} | {', '.join(str(r['seed']) for r in runs)} | "
                     f"{spread([r['test_top1'] for r in runs])} | {spread([r['deployed_top1'] for r in runs])} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    args = parse_args()
    arms = [json.loads(line) for line in (args.out / "results.jsonl").read_text().splitlines()]
    if args.arms:
        unknown = sorted(set(args.arms) - {a["name"] for a in arms})
        if unknown:
            raise SystemExit(f"--arms {unknown} are not in {args.out / 'results.jsonl'}")
        arms = [a for a in arms if a["name"] in args.arms]
    store = args.out / "final_seeds.jsonl"
    rows = [json.loads(line) for line in store.read_text().splitlines()] if store.is_file() else []
    done = {(r["name"], r["seed"]) for r in rows}
    for arm in arms:
        for seed in args.seeds:
            if (arm["name"], seed) in done:
                continue
            print(f"{arm['name']} seed {seed} ...", flush=True)
            row = finetune(arm, args, seed)
            rows.append(row)
            with open(store, "a") as handle:
                handle.write(json.dumps(row) + "\n")
            (args.out / "final_seeds.md").write_text(table(arms, rows))
    print(table(arms, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
