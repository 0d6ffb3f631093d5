"""The planned strategies: `ilp` (sensitivities + integer program, a whole front in one run) and
`greedy` (lower_to_budget from the highest bits), and the ILP warm start of DDPG.

A planned search evaluates the INT8 baseline as DDPG does, computes (or reuses) the per-layer
sensitivities, solves the budget (and the --pareto sweep, written to front.jsonl) and verifies
the points that matter by the same finetune and evaluation as the DDPG reward, scored by their
accuracy with bit-serial inputs (what the crossbar computes). The verified points are the
episodes of episodes.jsonl; best_policy.* and summary.json are written as for DDPG.

Which points are verified: with budgets, the policy solved for them; without, the fastest front
points around the accuracy target, found by bisection over the front (the tightest point that
meets the target, assuming a looser budget never loses accuracy).
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Optional

import numpy as np

from lib.fileio import atomic_write
from lib.policy import Policy
from lib.search.budget import lower_to_budget
from lib.search.config import SearchConfigError
from lib.search.ilp import KnapsackProblem, Solution, check_additive
from lib.search.objective import cost_fields
from lib.search.refine import refine
from lib.search.reward import episode_reward, is_feasible, worst_reward
from lib.search.sensitivity import Sensitivities, cache_key, compute_sensitivities, load_or_compute
from lib.search.space import ADC, INPUT, WEIGHT

log = logging.getLogger(__name__)

# The sweep a front takes when none is given: every 0.05 from the lowest reachable ratio to 1.
DEFAULT_STEP = 0.05


def check_plan(config, setup) -> None:
    """Refuse, before any training, budgets the integer program cannot meet or express."""
    problem = KnapsackProblem(setup.cost_model, setup.space, setup.held, lambda *_: 0.0)
    if config.strategy == "ilp" and (config.pareto or not config.all_budgets) or config.warm_start == "ilp":
        check_additive({config.objective: 1.0})  # the front is swept on the objective
    problem.check_reachable(config.all_budgets)
    if config.pareto:
        lowest = problem.lowest_ratio(config.objective)
        if max(config.pareto) < lowest - 1e-12:
            raise SearchConfigError(f"pareto budgets {list(config.pareto)} are all below the lowest reachable "
                                    f"{config.objective} ratio {lowest:.4f}; expected budgets in [{lowest:.4f}, 1]")
    if config.all_budgets:
        problem.solve(config.all_budgets)  # budgets that no policy meets together are refused here


def sweep(config, problem: KnapsackProblem) -> list[float]:
    """The --pareto budgets, or every DEFAULT_STEP from the lowest reachable ratio to the objective's
    budget (1 without one)."""
    if config.pareto:
        return list(config.pareto)
    lowest = problem.lowest_ratio(config.objective)
    top = config.all_budgets.get(config.objective, 1.0)
    steps = int(np.floor((top - lowest) / DEFAULT_STEP + 1e-9))
    return [round(lowest + k * DEFAULT_STEP, 6) for k in range(steps + 1)] + [top]


def sensitivities(search) -> Sensitivities:
    """The search's sensitivities, from the cache when the checkpoint, hardware, split and space match."""
    cfg, setup, evaluator = search.config, search.setup, search.evaluator
    space = setup.space
    fields = {"hardware": setup.hw.to_dict(), "arch": setup.spec.arch, "dataset": setup.spec.dataset,
              "input_size": setup.spec.input_size, "holdout": cfg.search_holdout,
              "train_size": cfg.search_train_size, "seed": cfg.seed, "batch_size": cfg.batch_size,
              "weights": space.weight_bits, "inputs": space.input_bits, "adc": space.adc_bits,
              "forced": space.forced, "held": setup.held.to_list(), "method": cfg.sensitivity,
              "batches": cfg.sensitivity_batches, "probes": cfg.hutchinson_probes,
              "calibration_batches": cfg.calibration_batches, "processes": search.dist.world_size}
    folder = Path(cfg.sensitivity_cache) if cfg.sensitivity_cache else Path(cfg.output_dir) / "sensitivity"

    def measured(context: Optional[Policy] = None) -> Sensitivities:
        return compute_sensitivities(evaluator, space, setup.held, cfg.sensitivity, cfg.sensitivity_batches,
                                     cfg.hutchinson_probes, cfg.seed, context=context)
    first = load_or_compute(folder / f"{cfg.sensitivity}-{cache_key(Path(cfg.init), fields)}.json", measured)
    if cfg.sensitivity_rounds == 1:
        return first
    # Rounds after the first depend on the budget they solve for, so they are kept under their own key.
    around = {**fields, "rounds": cfg.sensitivity_rounds, "budgets": cfg.all_budgets}
    return load_or_compute(
        folder / f"{cfg.sensitivity}-r{cfg.sensitivity_rounds}-{cache_key(Path(cfg.init), around)}.json",
        lambda: refine(first, cfg.sensitivity_rounds, cfg.all_budgets,
                       lambda scores: KnapsackProblem(setup.cost_model, space, setup.held, scores.of), measured))


def knapsack(search) -> tuple[KnapsackProblem, Sensitivities]:
    scores = sensitivities(search)
    problem = KnapsackProblem(search.setup.cost_model, search.setup.space, search.setup.held, scores.of)
    return problem, scores


def solve_front(search, problem: KnapsackProblem) -> list[Solution]:
    """The front over the sweep on the objective, every other budget held."""
    cfg = search.config
    fixed = {k: v for k, v in cfg.all_budgets.items() if k != cfg.objective}
    return problem.front(cfg.objective, sweep(cfg, problem), fixed)


def warm_policies(search) -> list[Policy]:
    """DDPG's warm-up episodes from the ILP: the solved front's distinct policies, tightest first."""
    started = time.perf_counter()
    problem, _ = knapsack(search)
    front = solve_front(search, problem)
    policies, seen = [], set()
    for solution in front:
        key = tuple(map(tuple, solution.policy.as_array().tolist()))
        if key not in seen:
            seen.add(key)
            policies.append(solution.policy)
    policies = policies[:search.config.warmup]
    search.extra_summary["warm_start"] = {"strategy": "ilp", "episodes": len(policies),
                                          "policies": [p.as_array().tolist() for p in policies],
                                          "seconds": round(time.perf_counter() - started, 3)}
    log.info("warm start: the first %d episodes take the ILP front's policies", len(policies))
    return policies


def run_planned(search, started: float):
    """The ilp or greedy search (see module docstring); returns the SearchResult."""
    cfg, setup = search.config, search.setup
    search.baseline = baseline_accuracy(search)
    front: list[Solution] = []
    point: Optional[Solution] = None
    if cfg.strategy == "ilp":
        problem, scores = knapsack(search)
        search.extra_summary["sensitivity"] = {"method": scores.method, "seconds": round(scores.seconds, 3),
                                               "passes": scores.passes, "cached": scores.cached,
                                               "rounds": scores.rounds}
        solving = time.perf_counter()
        if cfg.pareto or not cfg.all_budgets:
            front = solve_front(search, problem)
        if cfg.all_budgets:
            point = problem.solve(cfg.all_budgets)
        search.extra_summary["solve_seconds"] = round(time.perf_counter() - solving, 4)
        write_front(search, front + ([point] if point is not None else []))
        if point is not None:
            for solution in [point]:
                verify(search, solution.policy, {"budget": solution.budgets, "sensitivity": solution.sensitivity})
        else:
            bisect_front(search, front)
    else:
        top = Policy.uniform(setup.names, setup.space.max_bits(WEIGHT), setup.space.max_bits(INPUT))
        top = _with_forced_and_adc(top, setup)
        steps: list = []
        policy = lower_to_budget(top, setup.cost_model, setup.space, cfg.all_budgets, steps)
        verify(search, policy, {"budget": cfg.all_budgets, "lowering_steps": len(steps)})
    search.write_log()
    if cfg.strategy == "ilp" and search.dist.is_main:
        plot_front(search, front + ([point] if point is not None else []), search.out / "pareto.png")
    search.extra_summary["search_seconds"] = round(time.time() - started, 2)
    return search.finish([], time.time() - started)


def _with_forced_and_adc(policy: Policy, setup) -> Policy:
    """The all-highest policy with the forced layers at their bits and ADCs at the highest searched."""
    space, n = setup.space, len(policy)
    w = [space.forced if space.is_forced(i, WEIGHT) else policy.w_bits[i] for i in range(n)]
    a = [space.forced if space.is_forced(i, INPUT) else policy.a_bits[i] for i in range(n)]
    adc = [space.max_bits(ADC)] * n if space.adc_bits is not None else None
    return Policy(w, a, adc, policy.layer_names)


def baseline_accuracy(search) -> float:
    """The INT8 start after the same per-episode finetune (the target's reference, as in DDPG)."""
    from lib.search.search import SearchError, baseline_diverged_message

    evaluation = search.evaluator.evaluate(Policy.uniform(search.setup.names, 8, 8), search.steps, deployed=True)
    if evaluation.diverged is not None:
        raise SearchError(baseline_diverged_message(search.config, evaluation.diverged))
    log.info("baseline: INT8 after the same %d-batch finetune reaches %.2f%% on the search split (bit-serial "
             "%.2f%%); target %.2f%%", search.steps, evaluation.accuracy, evaluation.deployed_accuracy,
             evaluation.deployed_accuracy - search.config.max_accuracy_drop)
    return evaluation.deployed_accuracy


def verify(search, policy: Policy, extra: dict) -> dict:
    """Finetune and score one policy as a DDPG episode is (bit-serial accuracy); appended to the records."""
    cfg = search.config
    began = time.perf_counter()
    evaluation = search.evaluator.evaluate(policy, search.steps, deployed=True)
    cost = search.setup.cost_model.policy_cost(policy)
    accuracy = evaluation.deployed_accuracy
    if evaluation.diverged is None:
        reward = episode_reward(accuracy, cost.ratio_of(cfg.objective), search.baseline, search.target,
                                cfg.all_budgets)
        feasible = is_feasible(accuracy, cost.ratios, search.target, cfg.all_budgets)
    else:
        reward, feasible = worst_reward(search.baseline, search.target, cfg.all_budgets), False
    record = {"episode": len(search.records), "policy": policy.as_array().tolist(), "accuracy": accuracy,
              "multi_bit_accuracy": evaluation.accuracy, "latency_ratio": cost.ratio, "reward": reward,
              "feasible": feasible, "cached": False, "strategy": cfg.strategy,
              "status": "ok" if evaluation.diverged is None else "diverged", **cost_fields(cost, cfg.objective),
              **extra}
    if evaluation.diverged is not None:
        record["diverged"] = evaluation.diverged
    rest = time.perf_counter() - began - evaluation.finetune_seconds - evaluation.eval_seconds
    record["seconds"] = {"finetune": round(evaluation.finetune_seconds, 4), "eval": round(evaluation.eval_seconds, 4),
                         "rest": round(rest, 4)}
    search.records.append(record)
    search.write_log()
    log.info("verified %s: accuracy %s (bit-serial), %s ratio %.3f, feasible %s", cfg.strategy,
             "diverged" if accuracy is None else f"{accuracy:.2f}%", cfg.objective, cost.ratio_of(cfg.objective),
             feasible)
    return record


def bisect_front(search, front: list[Solution]) -> None:
    """Verify the tightest front point that meets the target, by bisection over the budgets."""
    ordered = sorted(front, key=lambda s: s.ratios[search.config.objective])
    low, high = 0, len(ordered) - 1
    checked: dict = {}

    def meets(index: int) -> bool:
        if index not in checked:
            solution = ordered[index]
            record = verify(search, solution.policy, {"budget": solution.budgets, "sensitivity": solution.sensitivity})
            checked[index] = record["accuracy"] is not None and record["accuracy"] >= search.target
        return checked[index]

    if not meets(high):
        return  # even the loosest point misses the target: the search reports the best it saw
    while low < high:
        middle = (low + high) // 2
        if meets(middle):
            high = middle
        else:
            low = middle + 1


def write_front(search, solutions: list[Solution]) -> None:
    if not search.dist.is_main:
        return
    lines = "".join(json.dumps(s.to_dict(search.config.objective)) + "\n" for s in solutions)
    atomic_write(search.out / "front.jsonl", lambda handle: handle.write(lines))


def plot_front(search, solutions: list[Solution], path: Path) -> None:
    """The solved front (summed sensitivity vs the objective's ratio), the verified points and INT8."""
    import matplotlib  # lazy: only the ILP draws (and matplotlib is slow to import)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    objective = search.config.objective
    fig, (ax_s, ax_a) = plt.subplots(1, 2, figsize=(10, 4))
    ordered = sorted(solutions, key=lambda s: s.ratios[objective])
    ax_s.plot([s.ratios[objective] for s in ordered], [s.sensitivity for s in ordered], "o-", label="solved front")
    ax_s.set_xlabel(f"{objective} ratio vs uniform 8-bit")
    ax_s.set_ylabel("summed sensitivity")
    ax_s.legend()
    verified = [r for r in search.records if r["accuracy"] is not None]
    ax_a.scatter([r["objective_ratio"] for r in verified], [r["accuracy"] for r in verified], color="tab:red",
                 label="verified (bit-serial)", zorder=3)
    ax_a.scatter([1.0], [search.baseline], marker="*", s=150, color="black", label="INT8 baseline", zorder=3)
    ax_a.axhline(search.target, linestyle="--", color="gray", label="target")
    ax_a.set_xlabel(f"{objective} ratio vs uniform 8-bit")
    ax_a.set_ylabel("top-1 on the search split (%)")
    ax_a.legend()
    fig.tight_layout()
    atomic_write(path, lambda handle: fig.savefig(handle, format="png"), binary=True)
    plt.close(fig)
