#!/usr/bin/env python
r"""Search a mixed-precision policy (per-layer weight/input[/ADC] bits) for CIM crossbars: DDPG, random,
an integer program over per-layer sensitivities (--strategy ilp) or greedy lowering to a budget.

Example:
  python rl_quantize.py --arch resnet20 --dataset digits --input-size 32 \
      --init runs/workflow/demo_resnet20_default/stage2_digits/int8/model_best.pth.tar \
      --hardware run/hardware/default.yaml \
      --min-bit 2 --max-bit 8 --max-accuracy-drop 1.0 --episodes 60 --warmup 10 --finetune-steps 20 \
      --seed 0 --output-dir runs/search/digits_resnet20

Every episode starts from the INT8 checkpoint (--init), applies the agent's policy, finetunes a
few batches on the training images (minus a held-out search split), measures top-1 on the
search split (the val set is never used) and prices the policy with the crossbar cost model.
Reward (CIM-AQ): below target = baseline − max-accuracy-drop, −10·shortfall; else
100·(1/ratio − 1) + 0.1·(acc − target), where ratio is --objective's (latency by default, as
CIM-AQ; energy, edp or area with an `energy` section in the hardware YAML). With
--latency-budget / --budget latency=0.5,energy=0.6, HAQ's hard budgets, all met at once.

--strategy ilp scores every layer's bits once (lib.search.sensitivity, cached) and solves the
budget exactly (scipy's HiGHS MILP); --pareto 0.3:0.8:0.05 solves a whole front (front.jsonl,
pareto.png) and verifies the points that matter by the same finetune as an episode.
Decisions that change no priced cost are held at their highest bits (--search-free-bits: search them).

Writes into --output-dir: best_policy.npy (CIM-AQ format) / best_policy.json, episodes.jsonl,
summary.json, search_state.pth (resume with --resume auto), tb/. CIM-AQ's underscored flag
spellings (--acc_drop, --train_episode, --min_bit, ...) are accepted.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional

from lib import cli
from lib.objectives import OBJECTIVES
from lib.search.config import SENSITIVITIES, STRATEGIES, WARM_STARTS, DDPGConfig, SearchConfig, parse_budgets, \
    parse_pareto

# CIM-AQ / HAQ spellings that are not just the dashed flag with underscores.
ALIASES = {"--acc_drop": "--max-accuracy-drop", "--train_episode": "--episodes", "--finetune_epoch": "--finetune-epochs",
           "--finetune_lr": "--finetune-lr", "--lr_c": "--lr-critic", "--lr_a": "--lr-actor"}


def holdout_size(text: str):
    """An image count (int) or a fraction in (0, 1) (float)."""
    value = float(text)
    return int(value) if value >= 1 and value == int(value) else value


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model and data")
    g.add_argument("--arch", default=None, help="model name (default: the --init checkpoint's; must match it)")
    g.add_argument("--dataset", default=None, help="dataset (default: the --init checkpoint's)")
    g.add_argument("--data-root", default=None, help="dataset folder (default: the --init checkpoint's)")
    g.add_argument("--input-size", type=int, default=None, help="input image side (default: the checkpoint's)")
    g.add_argument("--init", required=True, help="INT8 checkpoint every episode starts from (pretrain.py --quant "
                   "uniform)")
    g.add_argument("--hardware", default=None, help="crossbar hardware YAML (default: the checkpoint's hardware)")
    g.add_argument("--layer-dims", default=None, help="price this CIM-AQ layer-dims YAML instead of the traced "
                   "model (one row per quantizable layer)")
    g.add_argument("--search-holdout", type=holdout_size, default=0.1,
                   help="training images held out as the search's accuracy split: a count or a fraction")
    g.add_argument("--search-train-size", type=holdout_size, default=None,
                   help="cap on the training images used for per-episode finetuning (default: all the rest)")

    g = p.add_argument_group("search space")
    g.add_argument("--min-bit", type=int, default=2, help="lowest weight/input bits")
    g.add_argument("--max-bit", type=int, default=8, help="highest weight/input bits")
    g.add_argument("--search-adc", action="store_true", help="also search the ADC bits per layer")
    g.add_argument("--min-adc-bit", type=int, default=4, help="lowest ADC bits (with --search-adc)")
    g.add_argument("--max-adc-bit", type=int, default=8, help="highest ADC bits (with --search-adc)")
    g.add_argument("--force-first-last", type=int, default=None, metavar="BITS",
                   help="fix the first and last layer's weight and input bits (their actions are not learned from)")
    g.add_argument("--cell-resolution-constraint", action="store_true",
                   help="weight bits only multiples of the hardware's cell_bits")

    g = p.add_argument_group("episodes and reward")
    g.add_argument("--episodes", type=int, default=600, help="episodes (policies tried)")
    g.add_argument("--warmup", type=int, default=20, help="episodes of random actions before the agent learns")
    g.add_argument("--strategy", default="ddpg", choices=STRATEGIES,
                   help="ddpg (agent) | random (uniform) | ilp (sensitivities + integer program) | greedy "
                        "(lower_to_budget from the highest bits)")
    g.add_argument("--pareto", default=None, metavar="LOW:HIGH:STEP|R1,R2,...",
                   help="with --strategy ilp (or --warm-start ilp): solve every budget of this sweep on --objective "
                        "and write front.jsonl")
    g.add_argument("--warm-start", default=None, choices=WARM_STARTS,
                   help="ilp: DDPG's warm-up episodes are the ILP front's policies (and fill its replay memory)")
    g.add_argument("--search-free-bits", action="store_true",
                   help="also search the decisions that change no priced cost (default: held at the highest bits)")
    g.add_argument("--sensitivity", default="kl", choices=SENSITIVITIES,
                   help="ILP scores: measured (loss increase, one layer changed) | kl (output KL divergence, one "
                        "layer changed) | hessian (Hutchinson trace × "
                        "quantization error)")
    g.add_argument("--sensitivity-batches", type=int, default=2, help="search-train batches the sensitivities use")
    g.add_argument("--hutchinson-probes", type=int, default=4, help="Rademacher probes per batch (hessian)")
    g.add_argument("--sensitivity-rounds", type=int, default=1,
                   help="1: score at INT8; R > 1: also R-1 rounds measured around the policy solved for the budget, "
                        "averaged (measured or kl, needs a budget)")
    g.add_argument("--sensitivity-cache", default=None, metavar="DIR",
                   help="folder of cached sensitivities (default: <output-dir>/sensitivity)")
    g.add_argument("--max-accuracy-drop", type=float, default=1.0,
                   help="percentage points below the INT8 baseline that still count as feasible")
    g.add_argument("--latency-budget", type=float, default=None, metavar="RATIO",
                   help="hard budget: lower bits until latency/uniform-8-bit <= RATIO before evaluating")
    g.add_argument("--budget", action="append", default=[], metavar="NAME=RATIO[,NAME=RATIO]",
                   help=f"hard budgets on any of {', '.join(OBJECTIVES)} (ratios vs uniform 8-bit), met together, "
                        f"e.g. latency=0.5,energy=0.6 (repeatable)")
    g.add_argument("--objective", default="latency", metavar="NAME",
                   help=f"the ratio the reward prices: {' | '.join(OBJECTIVES)} (default: latency, CIM-AQ's); "
                        f"energy, edp and area need an `energy` section in the hardware YAML")
    g.add_argument("--finetune-steps", type=int, default=100, help="finetune batches per episode")
    g.add_argument("--finetune-epochs", type=float, default=None, help="finetune epochs per episode (overrides "
                   "--finetune-steps)")
    g.add_argument("--finetune-lr", type=float, default=0.001, help="finetune learning rate (SGD, momentum 0.9)")
    g.add_argument("--calibration-batches", type=int, default=2, help="batches that re-initialise changed steps")
    g.add_argument("--top-k", type=int, default=3, help="feasible candidates re-evaluated at the end (0 = none)")
    g.add_argument("--top-k-finetune-steps", type=int, default=300, help="finetune batches of the re-evaluation")
    g.add_argument("--eval-noise", default=None, metavar="PRESET",
                   help="score every policy (and the baseline) under this device-noise preset (ideal, pcm, rram): "
                        "judged by its accuracy on the device, not on an ideal crossbar")
    g.add_argument("--eval-repeats", type=int, default=1,
                   help="seeded programmings of the cells per score under --eval-noise (their mean)")

    g = p.add_argument_group("DDPG agent (HAQ defaults)")
    defaults = DDPGConfig()
    g.add_argument("--hidden1", type=int, default=defaults.hidden1, help="actor/critic first hidden layer")
    g.add_argument("--hidden2", type=int, default=defaults.hidden2, help="actor/critic second hidden layer")
    g.add_argument("--lr-actor", type=float, default=defaults.lr_actor, help="actor learning rate")
    g.add_argument("--lr-critic", type=float, default=defaults.lr_critic, help="critic learning rate")
    g.add_argument("--rmsize", type=int, default=defaults.rmsize, help="replay memory, in episodes")
    g.add_argument("--window-length", type=int, default=defaults.window_length, help="states per observation")
    g.add_argument("--tau", type=float, default=defaults.tau, help="soft target update rate")
    g.add_argument("--discount", type=float, default=defaults.discount, help="reward discount")
    g.add_argument("--bsize", type=int, default=defaults.bsize, help="replay minibatch size")
    g.add_argument("--init-delta", type=float, default=defaults.init_delta, help="initial exploration noise width")
    g.add_argument("--delta-decay", type=float, default=defaults.delta_decay, help="noise decay per episode")

    g = p.add_argument_group("run")
    g.add_argument("--output-dir", required=True, help="where the search writes its outputs and state")
    g.add_argument("--resume", default=None, choices=("auto",), help="auto = continue the search in --output-dir")
    g.add_argument("--overwrite", action="store_true", help="replace an earlier search in --output-dir")
    g.add_argument("--seed", type=int, default=0, help="seed of the agent, the noise and the finetuning")
    g.add_argument("--batch-size", type=int, default=64, help="mini-batch size")
    g.add_argument("--workers", type=int, default=0, help="data-loading worker processes")
    g.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0 = default)")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    g.add_argument("--no-tensorboard", action="store_true", help="do not write TensorBoard logs")
    g.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    g.add_argument("--log-level", default="INFO", help="logging level")
    return p.parse_args(normalise_aliases(argv if argv is not None else sys.argv[1:], p))


def normalise_aliases(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """CIM-AQ's spellings → ours: the named aliases, and any --under_scored form of a dashed flag."""
    known = {s for action in parser._actions for s in action.option_strings}
    out = []
    for arg in argv:
        flag, eq, value = arg.partition("=")
        if flag.startswith("--") and flag not in known:
            flag = ALIASES.get(flag, flag.replace("_", "-"))
        out.append(flag + eq + value)
    return out


def config_from_args(args: argparse.Namespace) -> SearchConfig:
    ddpg = DDPGConfig(hidden1=args.hidden1, hidden2=args.hidden2, lr_actor=args.lr_actor, lr_critic=args.lr_critic,
                      rmsize=args.rmsize, window_length=args.window_length, tau=args.tau, discount=args.discount,
                      bsize=args.bsize, init_delta=args.init_delta, delta_decay=args.delta_decay)
    return SearchConfig(
        init=args.init, output_dir=args.output_dir, arch=args.arch, dataset=args.dataset, data_root=args.data_root,
        input_size=args.input_size, hardware=args.hardware, layer_dims=args.layer_dims, min_bit=args.min_bit,
        max_bit=args.max_bit, max_accuracy_drop=args.max_accuracy_drop, episodes=args.episodes, warmup=args.warmup,
        finetune_steps=args.finetune_steps, finetune_epochs=args.finetune_epochs, finetune_lr=args.finetune_lr,
        calibration_batches=args.calibration_batches, search_adc=args.search_adc, min_adc_bit=args.min_adc_bit,
        max_adc_bit=args.max_adc_bit, force_first_last=args.force_first_last,
        cell_resolution_constraint=args.cell_resolution_constraint, latency_budget=args.latency_budget,
        budgets=parse_budgets(args.budget), objective=args.objective,
        strategy=args.strategy, search_free_bits=args.search_free_bits,
        pareto=parse_pareto(args.pareto) if args.pareto else (), warm_start=args.warm_start,
        sensitivity=args.sensitivity, sensitivity_batches=args.sensitivity_batches,
        hutchinson_probes=args.hutchinson_probes, sensitivity_rounds=args.sensitivity_rounds,
        sensitivity_cache=args.sensitivity_cache, top_k=args.top_k, top_k_finetune_steps=args.top_k_finetune_steps,
        search_holdout=args.search_holdout, search_train_size=args.search_train_size, seed=args.seed,
        eval_noise=args.eval_noise, eval_repeats=args.eval_repeats,
        resume=args.resume == "auto", overwrite=args.overwrite, batch_size=args.batch_size, workers=args.workers,
        threads=args.threads, device=args.device, progress=not args.no_progress, tensorboard=not args.no_tensorboard,
        ddpg=ddpg)


def search(args: argparse.Namespace) -> None:
    from lib.search import run_search  # lazy: the search loads torch, which --help and flag errors never need

    config = config_from_args(args)
    ctx = cli.init_context(args.device)  # under torchrun: rank 0 runs the agent, every rank finetunes its shard
    result = run_search(config, progress=not args.no_progress, dist=ctx)
    if not ctx.is_main:
        return
    print(json.dumps({"best_episode": result.best["episode"], "accuracy": result.best["accuracy"],
                      "latency_ratio": result.best["latency_ratio"], "objective": result.best["objective"],
                      "objective_ratio": result.best["objective_ratio"], "reward": result.best["reward"],
                      "baseline_accuracy": result.baseline_accuracy, "output_dir": str(result.output_dir)}))


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    cli.setup(args.log_level, args.threads)
    return cli.run(lambda: search(args))


if __name__ == "__main__":
    sys.exit(main())
