#!/usr/bin/env python
"""Benchmark (by hand): the mixed-precision search on digits / resnet20 at 32 px, DDPG vs random.

Per run (hardware × seed × strategy) it reports the per-episode time and its split (finetune,
eval, rest; rest should stay <= 5% of an episode), torch.compile graph compilations (all, and
after the first episodes: a search changes bits every episode and must not keep recompiling),
resident memory (and CUDA peak) early vs late in the run, and the best feasible policy's latency
ratio vs uniform 8-bit with its search-split accuracy against the INT8 baseline. `--final-epochs N`
also finetunes each best policy with finetune.py and compares its test top-1 with uniform 8-bit
finetuned the same way on the same hardware.

It starts from the stage-2 INT8 checkpoint of `make demo`
(runs/workflow/demo_resnet20_default/stage2_digits/int8/model_best.pth.tar).
When that file is absent it builds one with pretrain.py first (FP32, then uniform INT8 QAT) and
says so.

  .venv/bin/python bench/bench_search.py                       # 60 episodes, seeds 0 1 2, both hardwares
  .venv/bin/python bench/bench_search.py --episodes 5 --seeds 0 --hardware run/hardware/default.yaml
  # docs/performance.md's figures: HAQ's hard budget at 2x, first/last layer 8-bit
  .venv/bin/python bench/bench_search.py --episodes 60 --warmup 10 --seeds 0 1 --latency-budget 0.5 \
      --force-first-last 8 --min-bit 3 --finetune-steps 10 --top-k 3 --top-k-finetune-steps 40 --final-epochs 10
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from lib.cim.fused_op import COMPILED  # noqa: E402
from lib.cim.runtime import RUNTIME  # noqa: E402
from lib.cim.hardware import HardwareConfig  # noqa: E402
from lib.fileio import atomic_write_json  # noqa: E402
from lib.search import DDPGConfig, SearchConfig, run_search  # noqa: E402

DEMO_INT8 = REPO / "runs" / "workflow" / "demo_resnet20_default" / "stage2_digits" / "int8" / "model_best.pth.tar"
HARDWARES = [REPO / "run" / "hardware" / "cim_aq_default.yaml", REPO / "run" / "hardware" / "cell2bit.yaml"]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init", type=Path, default=DEMO_INT8, help="INT8 resnet20 checkpoint (built if absent)")
    p.add_argument("--episodes", type=int, default=60, help="episodes per search")
    p.add_argument("--warmup", type=int, default=10, help="random warm-up episodes of the agent")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds")
    p.add_argument("--hardware", type=Path, nargs="+", default=HARDWARES, help="hardware YAMLs")
    p.add_argument("--strategies", nargs="+", default=["ddpg", "random"], choices=("ddpg", "random"))
    p.add_argument("--finetune-steps", type=int, default=20, help="finetune batches per episode")
    p.add_argument("--top-k", type=int, default=3, help="candidates re-evaluated at the end")
    p.add_argument("--top-k-finetune-steps", type=int, default=100, help="finetune batches of the re-evaluation")
    p.add_argument("--min-bit", type=int, default=2, help="lowest bits")
    p.add_argument("--max-accuracy-drop", type=float, default=1.0, help="pp below the INT8 baseline")
    p.add_argument("--latency-budget", type=float, default=None,
                   help="hard-budget mode: every evaluated policy is lowered to this latency ratio")
    p.add_argument("--force-first-last", type=int, default=None, help="bits of the first and last layer")
    p.add_argument("--search-holdout", type=float, default=0.25,
                   help="fraction of the training images held out as the search split (0.1 = 144 digits)")
    p.add_argument("--finetune-lr", type=float, default=0.001, help="per-episode finetune learning rate")
    p.add_argument("--input-mode", choices=("multi-bit", "bit-serial", "as-is"), default="multi-bit",
                   help="input mode the layers train in (latency is priced as the YAML says either way); "
                        "multi-bit is the fast QAT approximation, as-is keeps the YAML's")
    p.add_argument("--batch-size", type=int, default=64, help="mini-batch size")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = default)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--final-epochs", type=int, default=0,
                   help="finetune.py epochs for each best policy, compared on the test split (0 = skip)")
    p.add_argument("--build-epochs", type=int, nargs=2, default=[15, 3], metavar=("FP32", "INT8"),
                   help="epochs when the INT8 checkpoint has to be built")
    p.add_argument("--output-dir", type=Path, default=None, help="default: a fresh temp folder")
    return p.parse_args()


def run(cmd: list) -> None:
    subprocess.run([sys.executable, *map(str, cmd)], cwd=REPO, check=True)


def ensure_int8(args, out: Path) -> Path:
    if args.init.is_file():
        return args.init
    print(f"{args.init} is absent: building an INT8 resnet20 checkpoint with pretrain.py "
          f"({args.build_epochs[0]} FP32 + {args.build_epochs[1]} INT8 epochs) into {out / 'int8'}", flush=True)
    common = ["--dataset", "digits", "--input-size", "32", "--batch-size", "64", "--workers", "0", "--arch", "resnet20",
              "--threads", str(args.threads), "--no-progress", "--resume", "auto"]
    run(["pretrain.py", *common, "--epochs", args.build_epochs[0], "--lr", "0.1", "--output-dir", out / "fp32"])
    run(["pretrain.py", *common, "--epochs", args.build_epochs[1], "--lr", "0.01", "--quant", "uniform",
         "--hardware", HARDWARES[0], "--init", out / "fp32" / "model_best.pth.tar", "--output-dir", out / "int8"])
    return out / "int8" / "model_best.pth.tar"


def training_hardware(args, path: Path, out: Path) -> Path:
    """The hardware YAML with the layers' input mode set as asked (a copy in the output folder)."""
    if args.input_mode == "as-is":
        return path
    hw = HardwareConfig.from_yaml(path)
    if hw.input_mode == args.input_mode:
        return path
    copy = out / f"{path.stem}_{args.input_mode}.yaml"
    out.mkdir(parents=True, exist_ok=True)
    hw.with_overrides(input_mode=args.input_mode).to_yaml(copy)
    return copy


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def compiled_graphs() -> int:
    """Graphs compiled so far: torch.compile's (TorchDynamo's count) and the CPU DirectKernels'."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"]) + COMPILED.direct_variants


def one_search(args, init: Path, hardware: Path, seed: int, strategy: str, out: Path) -> dict:
    samples = []

    def on_episode(record: dict) -> None:
        samples.append({"episode": record["episode"], "rss_mb": rss_mb(), "graphs": compiled_graphs(),
                        "time": time.perf_counter()})

    config = SearchConfig(init=str(init), output_dir=str(out), hardware=str(hardware), min_bit=args.min_bit,
                          search_holdout=args.search_holdout, finetune_lr=args.finetune_lr,
                          max_accuracy_drop=args.max_accuracy_drop, episodes=args.episodes, warmup=args.warmup,
                          latency_budget=args.latency_budget, force_first_last=args.force_first_last,
                          finetune_steps=args.finetune_steps, top_k=args.top_k,
                          top_k_finetune_steps=args.top_k_finetune_steps, batch_size=args.batch_size, seed=seed,
                          strategy=strategy, device=args.device, progress=False, overwrite=True, ddpg=DDPGConfig())
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    graphs_before, started = compiled_graphs(), time.perf_counter()
    result = run_search(config, on_episode=on_episode)
    wall = time.perf_counter() - started
    records = [json.loads(line) for line in (out / "episodes.jsonl").read_text().splitlines()]
    evaluated = [r for r in records if not r["cached"]]
    episode_times = [b["time"] - a["time"] for a, b in zip(samples, samples[1:])]
    split = {k: statistics.mean(r["seconds"][k] for r in evaluated) for k in ("finetune", "eval", "rest")}
    per_episode = sum(split.values())
    early = samples[min(len(samples) - 1, 4)]
    return {
        "hardware": hardware.name, "hardware_path": str(hardware), "seed": seed, "strategy": strategy, "episodes": len(records),
        "evaluated": len(evaluated), "wall_s": round(wall, 1),
        "episode_s": round(per_episode, 3), "episode_wall_s": round(statistics.mean(episode_times), 3)
        if episode_times else None, "split_s": {k: round(v, 3) for k, v in split.items()},
        "rest_share": round(split["rest"] / per_episode, 4) if per_episode else None,
        "graphs_compiled": samples[-1]["graphs"] - graphs_before if samples else 0,
        "graphs_after_episode_5": samples[-1]["graphs"] - early["graphs"] if samples else 0,
        "rss_mb_episode_5": round(early["rss_mb"], 1), "rss_mb_last": round(samples[-1]["rss_mb"], 1),
        "cuda_peak_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else None,
        "baseline_accuracy": result.baseline_accuracy, "best": result.best,
        "best_policy": str(out / "best_policy.json"),
    }


def final_check(args, init: Path, row: dict, out: Path) -> dict:
    """finetune.py on the best policy; test top-1 against the INT8 checkpoint's test top-1."""
    run(["finetune.py", "--policy", row["best_policy"], "--init", init, "--hardware",
         row["hardware_path"], "--epochs", args.final_epochs, "--lr", "0.005",
         "--batch-size", "64", "--workers", "0", "--threads", str(args.threads), "--no-progress", "--no-export",
         "--output-dir", out])
    report = json.loads((out / "report.json").read_text())
    return {"test_top1": report["accuracy"]["test_top1"], "deployed_top1": report["accuracy"].get("deployed_top1"),
            "latency_ratio": report["latency_ratio"]}


def main() -> int:
    args = parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    print(f"freed memory: {RUNTIME.apply_heap()} (lib.heap, as rl_quantize.py's set-up does)")
    out = args.output_dir or Path(tempfile.mkdtemp(prefix="bench_search_"))
    os.environ.setdefault("CIM_AQ_DATA_CACHE", str(REPO / "data_cache"))
    init = ensure_int8(args, out)
    rows = []
    hardwares = [training_hardware(args, path, out) for path in args.hardware]
    for hardware in hardwares:
        for seed in args.seeds:
            for strategy in args.strategies:
                row = one_search(args, init, hardware, seed, strategy, out / f"{hardware.stem}_{strategy}_s{seed}")
                if args.final_epochs > 0 and row["best"]["feasible"]:
                    row["final"] = final_check(args, init, row, out / f"final_{hardware.stem}_{strategy}_s{seed}")
                rows.append(row)
                best = row["best"]
                print(f"{hardware.stem:16s} seed {seed} {strategy:6s}: {row['episode_s']:.2f} s/episode "
                      f"(finetune {row['split_s']['finetune']:.2f} eval {row['split_s']['eval']:.2f} rest "
                      f"{row['split_s']['rest']:.3f} = {100 * row['rest_share']:.1f}%), graphs {row['graphs_compiled']}"
                      f" ({row['graphs_after_episode_5']} after ep. 5), RSS {row['rss_mb_episode_5']:.0f}->"
                      f"{row['rss_mb_last']:.0f} MB | best ep {best['episode']}: ratio {best['latency_ratio']:.3f} "
                      f"({1 / best['latency_ratio']:.2f}x) acc {best['accuracy']:.2f}% vs INT8 "
                      f"{row['baseline_accuracy']:.2f}% feasible={best['feasible']}"
                      + (f" | test top-1 {row['final']['test_top1']:.2f}% (deployed bit-serial "
                         f"{row['final']['deployed_top1']:.2f}%)" if "final" in row else ""), flush=True)
    if args.final_epochs > 0:
        for hardware in hardwares:  # the INT8 reference: uniform 8-bit finetuned the same way on the same hardware
            layers = len(rows[0]["best"]["policy"])
            uniform = out / "uniform_w8a8.npy"
            np.save(uniform, np.full((layers, 2), 8, dtype=np.int64))
            final = final_check(args, init, {"best_policy": str(uniform), "hardware_path": str(hardware)},
                                out / f"final_{hardware.stem}_int8")
            print(f"{hardware.stem:16s} INT8 after the same {args.final_epochs}-epoch finetune: test top-1 "
                  f"{final['test_top1']:.2f}% (deployed bit-serial {final['deployed_top1']:.2f}%)", flush=True)
            rows.append({"hardware": hardware.name, "strategy": "uniform-int8", "final": final})
    for hardware in hardwares:
        for strategy in args.strategies:
            ratios = [r["best"]["latency_ratio"] for r in rows if "best" in r
                      if r["hardware"] == hardware.name and r["strategy"] == strategy]
            if ratios:
                print(f"{hardware.stem:16s} {strategy:6s}: best latency ratio over seeds "
                      f"mean {statistics.mean(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f})")
    atomic_write_json(out / "bench_search.json", rows)
    print(f"results: {out / 'bench_search.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
