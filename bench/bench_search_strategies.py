#!/usr/bin/env python
"""Benchmark (by hand): which search strategy gives the best policy under a latency budget.

Matrix: hardware × latency budget × strategy × seed (seeds only for the random strategies:
random, ddpg and ddpg-warm). Every arm runs rl_quantize.py from the same INT8 checkpoint (digits, ResNet-20
at 32 px: the demo's stage-2 INT8 model), then finetunes its chosen policy with finetune.py the
way the workflow's final finetune does (same epochs, lr, seed for every arm) and reads the test
top-1 and the deployed (bit-serial inputs) top-1. The search's wall time is that of the
rl_quantize.py process (baseline, sensitivities or episodes, verification, outputs).

`ddpg-warm` is DDPG with `--warm-start ilp`: its first episodes (up to --warmup) are the ILP's
policies solved on a front around the arm's budget (--warm-front, offsets from the budget; points
above it are lowered to the budget by the episode, points below the lowest reachable ratio are
skipped); it runs the episodes and seeds of ddpg.

Arms already in --out's results.jsonl are skipped, so a killed run continues; the table
(results.md) is written after every arm. The hardware YAMLs are trained and searched with
multi-bit inputs (as the demo does, about 4x faster on a CPU); latency is priced bit-serially
and the deployed column measures bit-serial inputs.

  # the full matrix (hours on 2 CPU cores)
  .venv/bin/python bench/bench_search_strategies.py --out runs/bench/strategies
  # a slice
  .venv/bin/python bench/bench_search_strategies.py --hardware run/hardware/default.yaml --budgets 0.4 0.35 \
      --strategies ilp greedy random ddpg --episodes 30 --seeds 0 --final-epochs 2
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
DEMO_INT8 = REPO / "runs" / "workflow" / "demo_resnet20_default" / "stage2_digits" / "int8" / "model_best.pth.tar"
HARDWARES = [REPO / "run" / "hardware" / "default.yaml", REPO / "run" / "hardware" / "cell2bit.yaml"]
STRATEGIES = ("ilp", "greedy", "random", "ddpg", "ddpg-warm")
SEEDED = ("random", "ddpg", "ddpg-warm")
LABELS = {"ddpg-warm": "ddpg, ilp warm start"}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init", type=Path, default=DEMO_INT8, help="INT8 resnet20 digits checkpoint")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "bench" / "strategies", help="output folder")
    p.add_argument("--hardware", type=Path, nargs="+", default=HARDWARES, help="hardware YAMLs")
    p.add_argument("--budgets", type=float, nargs="+", default=[0.6, 0.45, 0.4, 0.35], help="latency budgets")
    p.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    p.add_argument("--episodes", type=int, nargs="+", default=[30, 60], help="episodes of ddpg (and random)")
    p.add_argument("--warmup", type=int, default=10, help="random warm-up episodes of ddpg")
    p.add_argument("--warm-front", type=float, nargs=3, default=[-0.03, 0.06, 0.01], metavar=("LOW", "HIGH", "STEP"),
                   help="ddpg-warm: the ILP front's budgets, as offsets from the arm's budget")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds of the random strategies")
    p.add_argument("--ilp-seeds", type=int, nargs="+", default=[0],
                   help="seeds of the ILP (they pick the sensitivities' fixed batches)")
    p.add_argument("--finetune-steps", type=int, default=10, help="finetune batches per episode / verification")
    p.add_argument("--search-holdout", type=int, default=300, help="training images held out for the search")
    p.add_argument("--min-bit", type=int, default=2)
    p.add_argument("--force-first-last", type=int, default=8)
    p.add_argument("--final-epochs", type=int, default=4, help="epochs of the final finetune (the workflow's)")
    p.add_argument("--final-lr", type=float, default=0.005, help="lr of the final finetune (the demo's)")
    p.add_argument("--search-lr", type=float, default=0.005, help="per-episode finetune lr (the demo's)")
    p.add_argument("--input-mode", default="multi-bit", choices=("multi-bit", "bit-serial"),
                   help="the inputs searched and trained with (deployed accuracy is always bit-serial)")
    p.add_argument("--sensitivity", default="measured", choices=("measured", "kl", "hessian"), help="the ILP's scores (rl_quantize.py's default is kl; arms named without a method are measured)")
    p.add_argument("--sensitivity-rounds", type=int, default=1,
                   help="the ILP's rounds of scores measured around its solved policy (1: at INT8 only)")
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args()


def hardware_copy(path: Path, input_mode: str, out: Path) -> Path:
    """The hardware YAML with `input_mode` set, written under the bench folder."""
    data = yaml.safe_load(path.read_text())
    data["input_mode"] = input_mode
    target = out / "hardware" / f"{path.stem}-{input_mode}.yaml"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(yaml.safe_dump(data, sort_keys=True))
    return target


def arms(args) -> list[dict]:
    found = []
    for hardware in args.hardware:
        for budget in args.budgets:
            for strategy in args.strategies:
                if strategy in SEEDED:
                    for episodes in args.episodes if strategy.startswith("ddpg") else args.episodes[:1]:
                        for seed in args.seeds:
                            found.append({"hardware": hardware.stem, "budget": budget, "strategy": strategy,
                                          "episodes": episodes, "seed": seed})
                else:
                    for seed in args.ilp_seeds if strategy == "ilp" else [0]:
                        arm = {"hardware": hardware.stem, "budget": budget, "strategy": strategy, "episodes": None,
                               "seed": seed}
                        if strategy == "ilp" and (args.sensitivity != "measured" or args.sensitivity_rounds > 1):
                            rounds = f"-r{args.sensitivity_rounds}" if args.sensitivity_rounds > 1 else ""
                            arm["method"] = args.sensitivity + rounds
                        found.append(arm)
    return found


def arm_name(arm: dict) -> str:
    episodes = f"-e{arm['episodes']}" if arm["episodes"] else ""
    method = f"-{arm['method']}" if arm.get("method") else ""
    return f"{arm['hardware']}-b{arm['budget']}-{arm['strategy']}{method}{episodes}-s{arm['seed']}"


def run(argv: list[str], log: Path) -> float:
    started = time.perf_counter()
    with open(log, "w") as handle:
        done = subprocess.run([sys.executable, *argv], cwd=REPO, stdout=handle, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:2])} failed (exit {done.returncode}); see {log}")
    return time.perf_counter() - started


def run_arm(args, arm: dict, hardware: Path) -> dict:
    name = arm_name(arm)
    folder = args.out / name
    folder.mkdir(parents=True, exist_ok=True)
    search = ["rl_quantize.py", "--init", str(args.init), "--hardware", str(hardware), "--min-bit", str(args.min_bit),
              "--max-bit", "8", "--force-first-last", str(args.force_first_last),
              "--latency-budget", str(arm["budget"]), "--strategy", arm["strategy"].removesuffix("-warm"),
              "--finetune-steps", str(args.finetune_steps), "--finetune-lr", str(args.search_lr),
              "--search-holdout", str(args.search_holdout), "--seed", str(arm["seed"]), "--top-k", "0",
              "--threads", str(args.threads), "--no-progress", "--no-tensorboard", "--overwrite",
              "--sensitivity-cache", str(args.out / "sensitivity"), "--output-dir", str(folder / "search")]
    if arm["strategy"] in ("ilp", "ddpg-warm"):  # an arm without a method: the measured loss increase
        method, _, rounds = (arm.get("method") or "measured").partition("-r")
        search += ["--sensitivity", method] + (["--sensitivity-rounds", rounds] if rounds else [])
    if arm["episodes"]:
        search += ["--episodes", str(arm["episodes"]), "--warmup", str(min(args.warmup, arm["episodes"]))]
    if arm["strategy"] == "ddpg-warm":
        low, high = (round(arm["budget"] + offset, 4) for offset in args.warm_front[:2])
        search += ["--warm-start", "ilp", "--pareto", f"{low}:{high}:{args.warm_front[2]}"]
    search_seconds = run(search, folder / "search.log")
    summary = json.loads((folder / "search" / "summary.json").read_text())
    finetune = ["finetune.py", "--init", str(args.init), "--policy", str(folder / "search" / "best_policy.json"),
                "--hardware", str(hardware), "--epochs", str(args.final_epochs), "--lr", str(args.final_lr),
                "--holdout", "0.1", "--no-export", "--seed", "0", "--threads", str(args.threads), "--no-progress",
                "--no-tensorboard", "--overwrite", "--output-dir", str(folder / "finetune")]
    finetune_seconds = run(finetune, folder / "finetune.log")
    report = json.loads((folder / "finetune" / "report.json").read_text())
    best = summary["best"]
    return {**arm, "name": name, "search_seconds": round(search_seconds, 1),
            "finetune_seconds": round(finetune_seconds, 1), "latency_ratio": best["latency_ratio"],
            "search_accuracy": best["accuracy"], "episodes_run": summary["episodes_run"],
            "policy": best["policy"], "free_decisions": len(summary.get("free_decisions", [])),
            "sensitivity": summary.get("sensitivity"),
            "warm_episodes": (summary.get("warm_start") or {}).get("episodes"),
            "test_top1": report["accuracy"]["test_top1"], "deployed_top1": report["accuracy"].get("deployed_top1")}


def method_of(row: dict) -> str:
    """The ILP's scores where not the default measurement ('' otherwise)."""
    method = row.get("method") or (row.get("sensitivity") or {}).get("method") or ""
    return "" if method == "measured" else method


def table(rows: list[dict]) -> str:
    lines = ["| hardware | budget | strategy | seed | latency ratio | search wall time | test top-1 | deployed top-1 |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["hardware"], -r["budget"], r["strategy"], method_of(r),
                                         r["episodes"] or 0, r["seed"])):
        strategy = LABELS.get(r["strategy"], r["strategy"]) + (f" ({method_of(r)})" if method_of(r) else "") + \
            (f" {r['episodes']} ep" if r["episodes"] else "")
        deployed = "" if r["deployed_top1"] is None else f"{r['deployed_top1']:.2f} %"
        lines.append(f"| {r['hardware']} | {r['budget']} | {strategy} | {r['seed'] if r['episodes'] or r['strategy'] == 'ilp' else ''} | "
                     f"{r['latency_ratio']:.3f} | {r['search_seconds']:.0f} s | {r['test_top1']:.2f} % | {deployed} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    args = parse_args()
    if not args.init.is_file():
        raise SystemExit(f"--init {args.init} is missing: build the demo's INT8 checkpoint first with "
                         f".venv/bin/python -m lib.workflow run/configs/demo.yaml --until stage2/int8")
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "results.jsonl"
    rows = [json.loads(line) for line in results.read_text().splitlines()] if results.is_file() else []
    done = {r["name"] for r in rows}
    hardware = {path.stem: hardware_copy(path, args.input_mode, args.out) for path in args.hardware}
    for arm in arms(args):
        if arm_name(arm) in done:
            continue
        print(f"arm {arm_name(arm)} ...", flush=True)
        row = run_arm(args, arm, hardware[arm["hardware"]])
        rows.append(row)
        with open(results, "a") as handle:
            handle.write(json.dumps(row) + "\n")
        (args.out / "results.md").write_text(table(rows))
        print(f"  search {row['search_seconds']:.0f} s, ratio {row['latency_ratio']:.3f}, test {row['test_top1']:.2f} %,"
              f" deployed {row['deployed_top1']}", flush=True)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
