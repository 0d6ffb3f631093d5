"""`run_search`: the episode loop, its resumable state and its outputs.

One episode walks the quantizable layers in call order; per layer the agent picks the weight
bits, then the input bits (then the ADC bits with search_adc). The policy is (optionally)
lowered to the budgets, evaluated (cache by policy), priced (latency, and energy / EDP / area
where the hardware has them), rewarded by the objective's ratio, and the agent learns from it.
After every episode the whole search state is written atomically, so a killed
search resumes at the last finished episode and continues exactly as it would have.

Under torchrun rank 0 runs the agent and sends each policy to every rank; all ranks evaluate it
together (lib.search.evaluator) and so hold the same accuracy, reward and records; rank 0 alone
writes the episode log, the search state, TensorBoard and the outputs. The same seed and the
same number of processes give the same policies.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from lib.cli import pick_device
from lib.cim import HardwareConfig, current_policy
from lib.cim.layers import route_counts
from lib.cim.noise_config import preset
from lib.cim.runtime import RUNTIME
from lib.cim.scratch import scratch_buffers
from lib.data import DatasetError, HoldoutSpec, build_loaders
from lib.distributed import DistContext, barrier, broadcast_object
from lib.errors import UserError
from lib.fileio import atomic_torch_save, atomic_write, atomic_write_json
from lib.model_spec import ModelSpec, cost_model_for, layer_order_of, model_at_policy
from lib.policy import Policy
from lib.run_dir import check_output_dir, open_run_dir
from lib.search.agent import DDPGAgent, RandomAgent
from lib.search.budget import check_budget_reachable, lower_to_budget
from lib.search.config import AGENT_STRATEGIES, SearchConfig, SearchConfigError
from lib.search.free import HeldDecisions, find_free_decisions, priced_objectives
from lib.search.evaluator import PolicyEvaluator
from lib.search.objective import COST_KEYS, check_objectives, cost_fields
from lib.search.reward import episode_reward, is_feasible, worst_reward
from lib.search.space import ADC, INPUT, WEIGHT, BitSpace, bits_to_action
from lib.search.state import StateEncoder
from lib.simulator import CostModel
from lib.training import CheckpointError, Tracker, load_checkpoint, seed_everything
from lib.training.checkpoint import plain

log = logging.getLogger(__name__)

STATE_NAME = "search_state.pth"
STATE_FORMAT = "cim-aq/search-state"
OUTPUTS = ("best_policy.npy", "best_policy.json", "episodes.jsonl", "summary.json", STATE_NAME, "tb", "front.jsonl",
           "pareto.png")
# Test hook: SIGKILL this process right after the state of episode N (1-based count) is written.
KILL_ENV = "CIM_AQ_SEARCH_KILL_AFTER"
# Test hook: finetune the policy of episode N (1-based count) at an infinite learning rate, so it diverges.
DIVERGE_ENV = "CIM_AQ_SEARCH_DIVERGE_EPISODE"


class SearchError(UserError, RuntimeError):
    """The search cannot produce a policy from what it observed (its start diverges, or every policy did)."""


@dataclass
class SearchResult:
    """The chosen policy and where everything was written."""

    best: dict
    baseline_accuracy: float
    target_accuracy: float
    episodes_run: int
    output_dir: Path
    top_k: list = field(default_factory=list)


@dataclass
class Setup:
    """Everything the episodes share, built and checked before any training."""

    spec: ModelSpec
    hw: HardwareConfig
    hw_source: str
    start_state: dict
    cost_model: CostModel
    space: BitSpace
    names: list
    held: HeldDecisions = field(default_factory=lambda: HeldDecisions([]))


def baseline_diverged_message(config: SearchConfig, diverged: dict, steps: Optional[int] = None) -> str:
    """Why the search cannot start: its INT8 start diverges in the search's own finetune."""
    what = diverged["what"]
    if diverged["batch"] == 1 and diverged["kind"] != "parameter":
        cause = (f"before any weight update, so the start checkpoint {config.init} itself gives it: it is not a "
                 f"usable INT8 start (train it again with pretrain.py --quant uniform)")
    else:
        cause = f"the updates made it: lower --finetune-lr (or check the start checkpoint {config.init})"
    budget = f"{steps}-batch" if steps is not None else "per-episode"
    return (f"the INT8 baseline (the start checkpoint {config.init} at its own bits) diverged in the search's "
            f"{budget} finetune at batch {diverged['batch']}: {what} became non-finite at --finetune-lr "
            f"{config.finetune_lr:g}; {cause}")


def _percent(value: Optional[float]) -> str:
    return "diverged" if value is None else f"{value:.2f}%"


def policy_key(policy: Policy) -> tuple:
    return tuple(map(tuple, policy.as_array().tolist()))


# ------------------------------------------------------------------------------------------ set-up
def read_init(config: SearchConfig) -> tuple[ModelSpec, dict]:
    """The INT8 start: a cim-aq checkpoint of a quantized model of the requested architecture."""
    state = load_checkpoint(config.init)
    spec = ModelSpec.from_args(state["args"], source=f"{config.init} args")
    if spec.quant == "none":
        raise CheckpointError(f"{config.init} holds an FP32 model (quant='none'); the search starts from a "
                              f"quantized (uniform INT8) checkpoint of pretrain.py --quant uniform")
    if config.arch and config.arch != spec.arch:
        raise CheckpointError(f"--arch {config.arch} does not match the --init checkpoint's arch={spec.arch!r}; "
                              f"expected a checkpoint of {config.arch}")
    if spec.num_classes is None:
        raise CheckpointError(f"{config.init} args lack 'num_classes'; cannot rebuild the model")
    changes = {k: getattr(config, k) for k in ("dataset", "data_root", "input_size") if getattr(config, k)}
    return spec.replace(**changes), state


def prepare(config: SearchConfig) -> Setup:
    """Check the config, the checkpoint, the hardware and the cost model (cheap; no data, no training)."""
    config.check()
    spec, start_state = read_init(config)
    if config.hardware:
        hw, hw_source = HardwareConfig.from_yaml(config.hardware), str(config.hardware)
    else:
        hw, hw_source = spec.hardware, spec.hardware_path or f"{config.init} (recorded)"
    max_bit = max(config.max_bit, 8, config.force_first_last or 0)
    cost_model = cost_model_for(spec, hw, max_bit=max_bit, layer_dims=config.layer_dims)
    space = BitSpace.build(config, hw.cell_bits, len(cost_model))
    names = list(cost_model.layer_names)
    check_objectives(config, cost_model, space, hw_source)
    if config.all_budgets:
        check_budget_reachable(cost_model, space, Policy.uniform(names, 8, 8), config.all_budgets)
    free = [] if config.search_free_bits else \
        find_free_decisions(cost_model, space, priced_objectives(config.objective, config.all_budgets))
    for decision in free:
        log.info("free decision: layer %d (%s): %s", decision.layer, decision.name, decision.reason)
    setup = Setup(spec, hw, hw_source, start_state, cost_model, space, names, HeldDecisions(free))
    if config.strategy == "ilp" or config.warm_start == "ilp":
        from lib.search.plan import check_plan  # scipy's MILP: only the ILP needs it
        check_plan(config, setup)
    return setup


def saved_search(config: SearchConfig) -> Optional[dict]:
    """The saved search state to resume from, or None; refuses to mix with an earlier search's files."""
    out = check_output_dir(config.output_dir)
    state_path = out / STATE_NAME
    if config.resume and config.strategy not in AGENT_STRATEGIES:
        return None  # a planned strategy runs again from its cached sensitivities
    if config.resume and state_path.exists():
        state = load_search_state(state_path)
        if _with_new_defaults(state["config"]) != plain(_resumable(config)):
            raise SearchConfigError(f"{out} holds a search with other settings; resume it with the same settings "
                                    f"or start over with --overwrite")
        return state
    existing = [name for name in OUTPUTS if (out / name).exists()]
    if existing and not config.overwrite:
        raise SearchConfigError(f"--output-dir {out} already holds a search ({', '.join(existing)}); use "
                                f"--resume auto to continue it or --overwrite to start over")
    return None


def clear_outputs(out: Path) -> None:
    """Remove an earlier search's outputs (--overwrite), once everything else has been checked."""
    for name in OUTPUTS:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _resumable(config: SearchConfig) -> dict:
    """The settings a resumed search must share with the one it continues (not the run-time knobs)."""
    data = config.to_dict()
    for key in ("resume", "overwrite", "progress", "workers", "threads", "device", "tensorboard", "episodes", "top_k",
                "top_k_finetune_steps", "sensitivity_cache"):
        data.pop(key)
    return data


def _with_new_defaults(saved: dict) -> dict:
    """A saved search's settings with the keys added since it was written at their defaults (so it resumes)."""
    defaults = plain(_resumable(SearchConfig(init="", output_dir="")))
    return {**{key: value for key, value in defaults.items() if key not in saved}, **saved}


def load_search_state(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - an unreadable state is the same user-facing problem
        raise CheckpointError(f"search state {path} cannot be read (truncated or not a torch file): {err}") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{path} is not a cim-aq search state; remove it or use --overwrite")
    return state


# ------------------------------------------------------------------------------------------ search
class Search:
    """One search run: environment, agent, evaluator, log and outputs."""

    def __init__(self, config: SearchConfig, setup: Setup, saved: Optional[dict],
                 dist: Optional[DistContext] = None) -> None:
        self.config, self.setup = config, setup
        self.dist = dist if dist is not None else DistContext(device=pick_device(config.device))
        self.out = Path(config.output_dir)
        self.encoder = StateEncoder(setup.cost_model, setup.space)
        decisions = len(setup.names) * len(setup.space.decisions)
        if config.strategy == "ddpg":
            self.agent = DDPGAgent(self.encoder.dim, decisions, config.ddpg, config.warmup, config.seed)
        else:
            self.agent = RandomAgent(config.seed + 2)  # also the (unused) agent of the planned strategies
        self.warm: list = []  # policies the first episodes take instead of the agent's (warm start)
        self.extra_summary: dict = {"strategy": config.strategy, "free_decisions": setup.held.to_list()}
        self.episode = 0
        self.records: list[dict] = []
        self.cache: dict = {}
        self.baseline: Optional[float] = None
        if saved is not None:
            self.agent.load_state_dict(saved["agent"])
            self.episode = int(saved["episode"])
            self.records = list(saved["records"])
            self.cache = {tuple(map(tuple, k)): v for k, v in saved["cache"]}
            self.baseline = saved["baseline_accuracy"]
            log.info("resuming the search after episode %d of %d", self.episode, config.episodes)
        self.evaluator: Optional[PolicyEvaluator] = None

    # ------------------------------------------------------------ model and data
    def build_evaluator(self) -> PolicyEvaluator:
        """Data, and the start model (INT8 on the search's hardware), built the same way in every process."""
        cfg, setup = self.config, self.setup
        seed_everything(cfg.seed)  # a conversion to other hardware calibrates on augmented batches
        holdout = HoldoutSpec(size=cfg.search_holdout, train_size=cfg.search_train_size, seed=0)
        try:
            data = build_loaders(setup.spec.dataset, setup.spec.data_root, setup.spec.input_size,
                                 batch_size=cfg.batch_size, workers=cfg.workers, holdout=holdout, seed=cfg.seed,
                                 dist=self.dist)
        except DatasetError:
            raise
        except ValueError as err:  # the holdout does not fit the training set
            raise SearchConfigError(f"search split: {err}") from None
        if data.num_classes != setup.spec.num_classes:
            raise CheckpointError(f"--init has {setup.spec.num_classes} classes but {setup.spec.dataset} has "
                                  f"{data.num_classes}")
        start = Policy.uniform(setup.names, 8, 8)
        model = model_at_policy(setup.spec, start, setup.hw, setup.start_state, calibration=data.train,
                                calibration_batches=cfg.calibration_batches)
        names = current_policy(model).layer_names
        if names != setup.names:
            raise SearchConfigError(f"the model's quantizable layers {names[:3]}... differ from the cost model's "
                                    f"{setup.names[:3]}...; expected the same layers in call order")
        noise = preset(cfg.eval_noise) if cfg.eval_noise is not None else None
        if noise is not None:
            log.info("every policy is scored under device noise %s, the mean of %d seeded programming(s)",
                     noise.describe(), cfg.eval_repeats)
        return PolicyEvaluator(model, data.train, data.holdout, self.dist.device, cfg.finetune_lr,
                               cfg.calibration_batches, cfg.seed, self.dist, noise=noise, repeats=cfg.eval_repeats)

    @property
    def steps(self) -> int:
        return self.evaluator.steps_for(self.config.finetune_steps, self.config.finetune_epochs)

    @property
    def target(self) -> float:
        return self.baseline - self.config.max_accuracy_drop

    # ------------------------------------------------------------ one episode
    def propose(self) -> tuple[Policy, list]:
        """Walk the layers: the agent's bits per decision, and the transitions to learn from."""
        space, n = self.setup.space, len(self.setup.names)
        bits = {WEIGHT: [0] * n, INPUT: [0] * n, ADC: [0] * n}
        steps = []  # (state, action, stored?)
        previous = 0.0
        for layer in range(n):
            w_now, a_now = space.max_bits(WEIGHT), space.max_bits(INPUT)
            for decision in space.decisions:
                state = self.encoder.row(layer, decision, w_now, a_now, previous)
                action = self.agent.act(state, self.episode)
                held = self.setup.held.held_at(layer, decision)
                if space.is_forced(layer, decision):
                    chosen = space.forced
                    choices = space.choices(decision)
                    action = min(max((chosen - choices[0] + 0.5) / len(choices), 0.0), 1.0)
                    stored = False
                elif held is not None:  # a free decision: at its highest bits, not learned from
                    chosen = held
                    choices = space.choices(decision)
                    action = bits_to_action(chosen, choices[0], choices[-1], choices)
                    stored = False
                elif self.episode < len(self.warm):  # warm start: the solved front's bits, learned from
                    warm = self.warm[self.episode]
                    chosen = {WEIGHT: warm.w_bits, INPUT: warm.a_bits, ADC: warm.adc_bits}[decision][layer]
                    choices = space.choices(decision)
                    action = bits_to_action(chosen, choices[0], choices[-1], choices)
                    stored = True
                else:
                    chosen = space.bits(action, decision)
                    stored = True
                bits[decision][layer] = chosen
                if decision == WEIGHT:
                    w_now = chosen
                elif decision == INPUT:
                    a_now = chosen
                steps.append((state, action, stored))
                previous = action
        transitions = []
        for i, (state, action, stored) in enumerate(steps):
            done = i == len(steps) - 1
            next_state = steps[i + 1][0] if not done else state
            if stored:
                transitions.append((state, action, next_state, done))
        adc = bits[ADC] if space.adc_bits is not None else None
        return Policy(bits[WEIGHT], bits[INPUT], adc, list(self.setup.names)), transitions

    def evaluate(self, policy: Policy, steps: int) -> tuple[Optional[float], float, float, bool, Optional[dict]]:
        """(accuracy, finetune s, eval s, cached?, diverged) for the per-episode budget, from the
        cache when seen; a diverged finetune has no accuracy and is cached as such."""
        key = policy_key(policy)
        if key in self.cache:
            value = self.cache[key]
            if isinstance(value, dict):
                return None, 0.0, 0.0, True, value["diverged"]
            return value, 0.0, 0.0, True, None
        forced = int(os.environ.get(DIVERGE_ENV, "0") or 0) == self.episode + 1
        result = self.evaluator.evaluate(policy, steps, lr=math.inf if forced else None)
        self.cache[key] = {"diverged": result.diverged} if result.diverged else result.accuracy
        return result.accuracy, result.finetune_seconds, result.eval_seconds, False, result.diverged

    def run_episode(self) -> dict:
        started = time.perf_counter()
        cfg = self.config
        policy = transitions = None
        if self.dist.is_main:  # the agent lives on rank 0; every rank evaluates its policy
            policy, transitions = self.propose()
            if cfg.all_budgets:
                policy = lower_to_budget(policy, self.setup.cost_model, self.setup.space, cfg.all_budgets)
        policy = broadcast_object(policy, self.dist)
        accuracy, t_finetune, t_eval, cached, diverged = self.evaluate(policy, self.steps)
        cost = self.setup.cost_model.policy_cost(policy)
        if diverged is None:
            reward = episode_reward(accuracy, cost.ratio_of(cfg.objective), self.baseline, self.target,
                                    cfg.all_budgets)
            feasible = is_feasible(accuracy, cost.ratios, self.target, cfg.all_budgets)
        else:
            reward = worst_reward(self.baseline, self.target, cfg.all_budgets)
            feasible = False
            if not cached:
                log.warning("episode %d: the finetune of its policy diverged at batch %d (%s became non-finite); "
                            "scored as infeasible, the search goes on from the INT8 start", self.episode + 1,
                            diverged["batch"], diverged["what"])
        if self.dist.is_main:
            self.agent.observe_episode(transitions, reward, self.episode)
        record = {"episode": self.episode, "policy": policy.as_array().tolist(), "accuracy": accuracy,
                  "latency_ratio": cost.ratio, "reward": reward, "feasible": feasible, "cached": cached,
                  "strategy": cfg.strategy, "status": "ok" if diverged is None else "diverged",
                  **cost_fields(cost, cfg.objective)}
        if diverged is not None:
            record["diverged"] = diverged
        rest = time.perf_counter() - started - t_finetune - t_eval
        record["seconds"] = {"finetune": round(t_finetune, 4), "eval": round(t_eval, 4), "rest": round(rest, 4)}
        return record

    # ------------------------------------------------------------ persistence
    def save_state(self) -> None:
        if not self.dist.is_main:
            return
        state = {"format": STATE_FORMAT, "episode": self.episode, "agent": self.agent.state_dict(),
                 "records": plain(self.records), "cache": [[list(map(list, k)), v] for k, v in self.cache.items()],
                 "baseline_accuracy": self.baseline, "config": plain(_resumable(self.config))}
        atomic_torch_save(state, self.out / STATE_NAME)

    def write_log(self) -> None:
        if not self.dist.is_main:
            return
        lines = "".join(json.dumps(r) + "\n" for r in self.records)
        atomic_write(self.out / "episodes.jsonl", lambda handle: handle.write(lines))

    # ------------------------------------------------------------ whole search
    def run(self, progress: bool, on_episode: Optional[Callable[[dict], None]] = None) -> SearchResult:
        cfg = self.config
        started = time.time()
        if cfg.strategy not in AGENT_STRATEGIES:
            from lib.search.plan import run_planned  # scipy's MILP: only the planned strategies need it
            return run_planned(self, started)
        if self.baseline is None:
            base = Policy.uniform(self.setup.names, 8, 8)
            evaluation = self.evaluator.evaluate(base, self.steps)
            if evaluation.diverged is not None:
                raise SearchError(baseline_diverged_message(cfg, evaluation.diverged))
            self.baseline = evaluation.accuracy
            log.info("baseline: INT8 after the same %d-batch finetune reaches %.2f%% on the search split; target "
                     "%.2f%%", self.steps, self.baseline, self.target)
            self.save_state()
        if cfg.warm_start == "ilp":
            from lib.search.plan import warm_policies  # scipy's MILP: only the warm start needs it
            self.warm = warm_policies(self)
        main = self.dist.is_main
        tracker = Tracker(self.out, tensorboard=cfg.tensorboard and main)
        kill_after = int(os.environ.get(KILL_ENV, "0") or 0) if main else 0
        bar = tqdm(total=cfg.episodes, initial=self.episode, desc="search", disable=not (progress and main),
                   dynamic_ncols=True)
        try:
            while self.episode < cfg.episodes:
                record = self.run_episode()
                self.records.append(record)
                self.episode += 1
                persisting = time.perf_counter()
                self.write_log()
                self.save_state()
                # the writes belong to this episode's "rest"; the log on disk gets it with the next write
                record["seconds"]["rest"] = round(record["seconds"]["rest"] + time.perf_counter() - persisting, 4)
                scalars = {"search/reward": record["reward"], "search/latency_ratio": record["latency_ratio"],
                           "search/objective_ratio": record["objective_ratio"],
                           "search/best_reward": max(r["reward"] for r in self.records)}
                if record["accuracy"] is not None:
                    scalars["search/accuracy"] = record["accuracy"]
                tracker.log(scalars, self.episode)
                best = max(self.records, key=lambda r: r["reward"])
                bar.set_postfix(best_reward=f"{best['reward']:.2f}", acc=_percent(best["accuracy"]),
                                speedup=f"{1 / best['latency_ratio']:.2f}x")
                bar.update(1)
                if on_episode is not None:
                    on_episode(record)
                if kill_after and self.episode == kill_after:
                    os.kill(os.getpid(), signal.SIGKILL)
        finally:
            bar.close()
            tracker.close()
        self.write_log()
        top_k = self.rerank()
        return self.finish(top_k, time.time() - started)

    def rerank(self) -> list[dict]:
        """Re-evaluate the top-k feasible policies (by reward) with a longer finetune; one noisy episode must not decide."""
        cfg = self.config
        if cfg.top_k == 0:
            return []
        unique = {}
        for record in sorted(self.records, key=lambda r: -r["reward"]):
            if record["feasible"]:
                unique.setdefault(tuple(map(tuple, record["policy"])), record)
        candidates = list(unique.values())[:cfg.top_k]
        if not candidates:
            return []
        steps = cfg.top_k_finetune_steps
        names = self.setup.names
        evaluation = self.evaluator.evaluate(Policy.uniform(names, 8, 8), steps)
        if evaluation.diverged is not None:
            raise SearchError(baseline_diverged_message(cfg, evaluation.diverged, steps))
        baseline = evaluation.accuracy
        target = baseline - cfg.max_accuracy_drop
        results = []
        for record in candidates:
            array = np.asarray(record["policy"])
            policy = Policy(array[:, 0], array[:, 1], array[:, 2] if array.shape[1] == 3 else None, names)
            evaluation = self.evaluator.evaluate(policy, steps)
            accuracy = evaluation.accuracy
            cost = self.setup.cost_model.policy_cost(policy)
            ratio = cost.ratio_of(cfg.objective)
            result = {"episode": record["episode"], "policy": record["policy"], "accuracy": accuracy,
                      "latency_ratio": cost.ratio, "search_accuracy": record["accuracy"],
                      "baseline_accuracy": baseline, "finetune_steps": steps, **cost_fields(cost, cfg.objective)}
            if evaluation.diverged is None:
                result.update(reward=episode_reward(accuracy, ratio, baseline, target, cfg.all_budgets),
                              feasible=is_feasible(accuracy, cost.ratios, target, cfg.all_budgets), status="ok")
            else:
                result.update(reward=worst_reward(baseline, target, cfg.all_budgets), feasible=False,
                              status="diverged", diverged=evaluation.diverged)
            results.append(result)
            log.info("top-k: episode %d re-evaluated with %d batches: %s (search %.2f%%), %s ratio %.3f",
                     record["episode"], steps, _percent(accuracy), record["accuracy"], cfg.objective, ratio)
        return results

    def finish(self, top_k: list[dict], seconds: float) -> SearchResult:
        cfg, setup = self.config, self.setup
        candidates = [r for r in (top_k or self.records) if r["accuracy"] is not None] or \
            [r for r in self.records if r["accuracy"] is not None]
        if not candidates:
            raise SearchError(f"every one of the {len(self.records)} explored policies diverged in its finetune "
                              f"(--finetune-lr {cfg.finetune_lr:g}); lower --finetune-lr or raise --min-bit")
        feasible = [r for r in candidates if r["feasible"]] or candidates
        best = max(feasible, key=lambda r: r["reward"])
        best = {**{k: best[k] for k in ("episode", "policy", "accuracy", "latency_ratio", "reward", "feasible")},
                **{k: best.get(k) for k in COST_KEYS}}
        if not self.dist.is_main:
            barrier(self.dist)  # while rank 0 writes the outputs
            return SearchResult(best, self.baseline, self.target, len(self.records), self.out, top_k)
        array = np.asarray(best["policy"], dtype=np.int64)
        policy = Policy(array[:, 0], array[:, 1], array[:, 2] if array.shape[1] == 3 else None, setup.names,
                        meta={"accuracy": best["accuracy"], "latency_ratio": best["latency_ratio"],
                              **{k: best[k] for k in COST_KEYS},
                              "reward": best["reward"], "episode": best["episode"], "feasible": best["feasible"],
                              "hardware": setup.hw.to_dict(), "hardware_source": setup.hw_source,
                              "arch": setup.spec.arch, "baseline_accuracy": self.baseline})
        policy.save(self.out / "best_policy", layer_order_of(setup.spec))  # .npy rows: construction order
        summary = {"baseline_accuracy": self.baseline, "target_accuracy": self.target, "best": best,
                   "accuracy_noise": (f"{cfg.eval_noise}, mean of {cfg.eval_repeats} programming(s)"
                                      if cfg.eval_noise else "ideal"),
                   "top_k": top_k, "episodes_run": len(self.records), "seconds": round(seconds, 2),
                   "finetune_steps": self.steps, **plain(self.extra_summary), "config": plain(cfg.to_dict()),
                   "kernels": RUNTIME.report(), "routes": route_counts(self.evaluator.model)}
        atomic_write_json(self.out / "summary.json", summary)
        log.info("best policy: episode %d, accuracy %.2f%%, latency ratio %.3f (%.2fx), reward %.3f",
                 best["episode"], best["accuracy"], best["latency_ratio"], 1 / best["latency_ratio"], best["reward"])
        barrier(self.dist)
        return SearchResult(best, self.baseline, self.target, len(self.records), self.out, top_k)


@scratch_buffers()
def run_search(config: SearchConfig, *, progress: bool = True,
               on_episode: Optional[Callable[[dict], None]] = None, dist: Optional[DistContext] = None) -> SearchResult:
    """Run (or resume) a search; every user error is raised before any training starts.

    on_episode: called with each finished episode's record (after its state is written).
    dist: this process's place in a torchrun run (default: one process on config.device).
    """
    setup = prepare(config)
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    saved = saved_search(config)
    search = Search(config, setup, saved, dist)
    search.evaluator = search.build_evaluator()  # data and model: their errors come before any file changes
    barrier(search.dist)  # every rank has checked the folder before rank 0 changes it
    if search.dist.is_main:
        if saved is None:
            clear_outputs(Path(config.output_dir))
        open_run_dir(config.output_dir)  # also removes temp files a killed write left behind
    return search.run(progress and config.progress, on_episode)
