"""The planned strategies on real cost models and real CIM layers: free decisions, sensitivities
and their cache, the integer program's constraints and optimality, the Pareto sweep, greedy,
the DDPG warm start, unreachable budgets, and the workflow's keys."""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

import rl_quantize
from lib.policy import Policy
from lib.search import DDPGConfig, prepare, run_search
from lib.search.budget import lower_to_budget
from lib.search.free import HeldDecisions, find_free_decisions
from lib.search.config import SearchConfigError
from lib.search.ilp import KnapsackProblem, policy_score
from lib.search.space import ADC, INPUT, WEIGHT
from lib.workflow.config import WorkflowConfigError, load_config
from lib.workflow.steps import build_plan
from search_support import make_int8_checkpoint, tiny_config
from workflow_support import experiment_data, write_config

REPO = Path(__file__).resolve().parent.parent
CELL2 = REPO / "run" / "hardware" / "cell2bit.yaml"
SMALL_AGENT = DDPGConfig(hidden1=16, hidden2=16, bsize=8)


@pytest.fixture(scope="module")
def int8_ckpt(tmp_path_factory) -> Path:
    return make_int8_checkpoint(tmp_path_factory.mktemp("int8_ilp"))


@pytest.fixture(scope="module")
def narrow_hw(tmp_path_factory) -> Path:
    """default.yaml with 16-column arrays: tiny_cnn's weight slices then take more arrays (and latency)."""
    data = yaml.safe_load((REPO / "run" / "hardware" / "default.yaml").read_text())
    data.update(cols=16, rows=32)
    path = tmp_path_factory.mktemp("hw") / "narrow.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def seeded_scores(seed: int = 0):
    """Scores that fall with more bits (as sensitivities do), drawn once per (layer, decision, bits)."""
    rng = np.random.default_rng(seed)
    table = {}

    def score(layer: int, w: int, a: int, adc) -> float:
        total = 0.0
        for kind, bits in ((WEIGHT, w), (INPUT, a), (ADC, adc)):
            if bits is None:
                continue
            key = (layer, kind)
            if key not in table:
                table[key] = rng.uniform(0.1, 1.0)
            total += table[key] * 4.0 ** -bits
        return total
    return score


def test_free_decisions_found_where_weight_bits_change_no_latency(int8_ckpt, narrow_hw, tmp_path):
    setup = prepare(tiny_config(int8_ckpt, tmp_path / "a", latency_budget=0.6))
    free = find_free_decisions(setup.cost_model, setup.space, ("latency",))
    assert {(d.layer, d.decision) for d in free} == {(i, WEIGHT) for i in range(4)}
    assert all(d.held_at == 8 and "latency" in d.reason for d in free)
    assert setup.held.to_list() == [d.to_dict() for d in free]
    # an energy budget prices the weight bits (fewer slices, fewer conversions): searched then
    assert find_free_decisions(setup.cost_model, setup.space, ("latency", "energy")) == []
    narrow = prepare(tiny_config(int8_ckpt, tmp_path / "b", hardware=str(narrow_hw), latency_budget=0.6))
    assert not [d for d in narrow.held.free if d.decision == WEIGHT and d.layer in (1, 2)]
    searched = prepare(tiny_config(int8_ckpt, tmp_path / "c", latency_budget=0.6, search_free_bits=True))
    assert len(searched.held) == 0


def test_ilp_honours_every_constraint(int8_ckpt, tmp_path):
    config = tiny_config(int8_ckpt, tmp_path / "s", hardware=str(CELL2), cell_resolution_constraint=True,
                         search_adc=True, min_adc_bit=4, max_adc_bit=6, force_first_last=8, min_bit=2,
                         latency_budget=0.9, budgets={"energy": 0.95}, search_free_bits=True)
    setup = prepare(config)
    problem = KnapsackProblem(setup.cost_model, setup.space, setup.held, seeded_scores())
    lowest = problem.lowest_ratio("latency")
    for budget in (0.9, (lowest + 0.9) / 2, lowest):
        solution = problem.solve({"latency": budget, "energy": 0.95})
        policy = solution.policy
        cost = setup.cost_model.policy_cost(policy)
        assert cost.ratio <= budget and cost.ratios["energy"] <= 0.95
        assert policy.layer(0)[:2] == (8, 8) and policy.layer(3)[:2] == (8, 8)
        assert all(w % 2 == 0 and 2 <= w <= 8 for w in policy.w_bits)
        assert all(2 <= a <= 8 for a in policy.a_bits)
        assert all(4 <= adc <= 6 for adc in policy.adc_bits)
        assert solution.sensitivity == pytest.approx(policy_score(problem, policy))


def test_ilp_equals_brute_force(int8_ckpt, narrow_hw, tmp_path):
    config = tiny_config(int8_ckpt, tmp_path / "s", hardware=str(narrow_hw), min_bit=5, max_bit=8,
                         latency_budget=0.8, search_free_bits=True)
    setup = prepare(config)
    score = seeded_scores(3)
    problem = KnapsackProblem(setup.cost_model, setup.space, setup.held, score)
    per_layer = problem.candidates
    assert all(len(c) == 16 for c in per_layer)
    cm, base = setup.cost_model, setup.cost_model.baseline_totals().latency_us
    latency = [[cm.layer_totals(i, w, a, None).latency_us / base for w, a, _ in c] for i, c in enumerate(per_layer)]
    scores = [[score(i, w, a, None) for w, a, _ in c] for i, c in enumerate(per_layer)]
    compared = 0
    for budget in (0.8, 0.6, 0.45):
        best = min((sum(scores[i][k] for i, k in enumerate(pick)) for pick in
                    itertools.product(*(range(len(c)) for c in per_layer))
                    if sum(latency[i][k] for i, k in enumerate(pick)) <= budget), default=None)
        if best is None:
            continue
        assert problem.solve({"latency": budget}).sensitivity == pytest.approx(best, rel=1e-9, abs=1e-12)
        compared += 1
    assert compared >= 2


def test_pareto_sweep_is_monotone_and_written(int8_ckpt, tmp_path, eager_single_thread):
    out = tmp_path / "front"
    result = run_search(tiny_config(int8_ckpt, out, strategy="ilp", pareto=(0.45, 0.55, 0.7, 0.9, 1.0), top_k=0))
    front = [json.loads(line) for line in (out / "front.jsonl").read_text().splitlines()]
    assert [p["budget"] for p in front] == [0.45, 0.55, 0.7, 0.9, 1.0]
    for point in front:
        assert point["latency_ratio"] <= point["budget"] and set(point) >= {"policy", "sensitivity", "ratios"}
    sensitivities = [p["sensitivity"] for p in front]
    assert all(looser <= tighter + 1e-12 for tighter, looser in zip(sensitivities, sensitivities[1:]))
    records = [json.loads(line) for line in (out / "episodes.jsonl").read_text().splitlines()]
    assert 1 <= len(records) <= 4 and all(r["strategy"] == "ilp" for r in records)
    assert result.best["policy"] in [p["policy"] for p in front]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["strategy"] == "ilp" and len(summary["free_decisions"]) == 4
    assert summary["sensitivity"]["passes"]["forward"] > 0
    assert (out / "pareto.png").stat().st_size > 0 and (out / "best_policy.npy").is_file()


def test_sensitivities_reproducible_and_cached(int8_ckpt, tmp_path, eager_single_thread):
    def scores(folder: Path, cache: Path, method: str) -> tuple[dict, dict]:
        run_search(tiny_config(int8_ckpt, folder, strategy="ilp", latency_budget=0.6, top_k=0,
                               sensitivity=method, sensitivity_cache=str(cache)))
        files = list(cache.glob(f"{method}-*.json"))
        assert len(files) == 1
        return json.loads(files[0].read_text()), json.loads((folder / "summary.json").read_text())

    first, summary = scores(tmp_path / "a", tmp_path / "cache", "measured")
    assert summary["sensitivity"]["cached"] is False
    again, summary = scores(tmp_path / "b", tmp_path / "cache", "measured")
    assert summary["sensitivity"]["cached"] is True and again == first
    fresh, _ = scores(tmp_path / "c", tmp_path / "cache2", "measured")
    assert fresh["scores"] == first["scores"]
    assert all(v >= 0 for row in first["scores"] for d in row.values() for v in d.values())
    assert all(row["w"] == {} for row in first["scores"])  # free weight bits are not measured
    for row in first["scores"]:  # a narrower width never scores below a wider one
        ordered = [row["a"][str(b)] for b in range(2, 9) if str(b) in row["a"]]
        assert ordered == sorted(ordered, reverse=True)
    hessian, summary = scores(tmp_path / "d", tmp_path / "cache3", "hessian")
    repeat, _ = scores(tmp_path / "e", tmp_path / "cache4", "hessian")
    assert hessian["scores"] == repeat["scores"] and summary["sensitivity"]["passes"]["backward"] > 0
    assert any(v > 0 for row in hessian["scores"] for v in row["a"].values())
    kl, summary = scores(tmp_path / "f", tmp_path / "cache5", "kl")
    repeat, _ = scores(tmp_path / "g", tmp_path / "cache6", "kl")
    assert kl["scores"] == repeat["scores"] and summary["sensitivity"]["method"] == "kl"
    assert summary["sensitivity"]["passes"]["backward"] == 0
    # every narrower input moves the outputs, so no lowered width looks free (a loss increase may be 0)
    lowered = [v for row in kl["scores"] for b, v in row["a"].items() if int(b) < 8]
    assert lowered and all(v > 0 for v in lowered)


def test_greedy_equals_lower_to_budget(int8_ckpt, tmp_path, eager_single_thread):
    config = tiny_config(int8_ckpt, tmp_path / "g", strategy="greedy", latency_budget=0.8, force_first_last=8,
                         top_k=0)
    result = run_search(config)
    setup = prepare(config)
    expected = lower_to_budget(Policy.uniform(setup.names, 8, 8), setup.cost_model, setup.space, 0.8)
    assert result.best["policy"] == expected.as_array().tolist()
    assert json.loads((tmp_path / "g" / "summary.json").read_text())["strategy"] == "greedy"


def test_unreachable_budgets_exit_2_before_training(int8_ckpt, tmp_path, capsys):
    out = tmp_path / "u"
    base = ["--init", str(int8_ckpt), "--output-dir", str(out), "--device", "cpu", "--no-progress"]
    assert rl_quantize.main(base + ["--strategy", "ilp", "--latency-budget", "0.05"]) == 2
    assert "is not reachable" in capsys.readouterr().err
    assert rl_quantize.main(base + ["--strategy", "ilp", "--pareto", "0.01:0.05:0.01"]) == 2
    assert "lowest reachable latency ratio" in capsys.readouterr().err
    assert rl_quantize.main(base + ["--strategy", "ilp", "--pareto", "0.5:x"]) == 2
    assert rl_quantize.main(base + ["--strategy", "greedy"]) == 2
    assert "greedy" in capsys.readouterr().err
    assert rl_quantize.main(base + ["--strategy", "ilp", "--latency-budget", "0.5", "--budget", "edp=0.5"]) == 2
    assert "EDP" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())


def test_ddpg_warm_start_and_held_decisions(int8_ckpt, tmp_path, eager_single_thread):
    out = tmp_path / "w"
    run_search(tiny_config(int8_ckpt, out, ddpg=SMALL_AGENT, episodes=3, warmup=2, warm_start="ilp",
                           pareto=(0.5, 0.8), top_k=0))
    records = [json.loads(line) for line in (out / "episodes.jsonl").read_text().splitlines()]
    front = [json.loads(line) for line in (out / "front.jsonl").read_text().splitlines()] if \
        (out / "front.jsonl").exists() else None
    summary = json.loads((out / "summary.json").read_text())
    warm = summary["warm_start"]["policies"]
    assert 1 <= len(warm) <= 2 and [r["policy"] for r in records[:len(warm)]] == warm
    assert front is None  # the warm start solves its front in memory; DDPG writes its own outputs
    assert all(row[0] == 8 for r in records for row in r["policy"])  # free weight bits held at 8


def test_workflow_passes_strategy_and_pareto(tmp_path):
    data = experiment_data(tmp_path)
    data["quantization"].update(pareto="0.4:0.8:0.1", latency_budget=0.5)
    data["training"]["rl"]["strategy"] = "ilp"
    plan = build_plan(load_config(write_config(tmp_path, data)))
    argv = next(s for s in plan if s.name == "stage1/search").argv
    assert argv[argv.index("--strategy") + 1] == "ilp" and argv[argv.index("--pareto") + 1] == "0.4:0.8:0.1"
    assert "--sensitivity" not in argv and "--sensitivity-rounds" not in argv  # the defaults add no flags
    data["training"]["rl"].update(sensitivity="measured", sensitivity_rounds=5)
    argv = next(s for s in build_plan(load_config(write_config(tmp_path, data))) if s.name == "stage1/search").argv
    assert argv[argv.index("--sensitivity") + 1] == "measured" and argv[argv.index("--sensitivity-rounds") + 1] == "5"
    data["training"]["rl"]["sensitivity_rounds"] = 0
    with pytest.raises(WorkflowConfigError, match="sensitivity_rounds"):
        load_config(write_config(tmp_path, data))
    data["training"]["rl"]["sensitivity_rounds"] = 1
    data["quantization"]["pareto"] = "0.8:0.4:0.1"
    with pytest.raises(WorkflowConfigError, match="pareto"):
        load_config(write_config(tmp_path, data))


def test_sensitivity_rounds_measure_around_the_solved_policy(int8_ckpt, tmp_path, eager_single_thread):
    """Rounds after the first re-measure every layer with the others at the solved policy: the
    scores move, the policy meets the budget, the rounds are counted and come back from the cache."""
    cache = tmp_path / "cache"

    def run(folder: str, rounds: int) -> tuple[dict, dict]:
        result = run_search(tiny_config(int8_ckpt, tmp_path / folder, strategy="ilp", latency_budget=0.6, top_k=0,
                                        sensitivity="kl", sensitivity_rounds=rounds,
                                        sensitivity_cache=str(cache)))
        summary = json.loads((tmp_path / folder / "summary.json").read_text())
        return summary, result.best

    single, _ = run("one", 1)
    refined, best = run("three", 3)
    assert single["sensitivity"]["rounds"] == 1 and 2 <= refined["sensitivity"]["rounds"] <= 3
    assert refined["sensitivity"]["passes"]["forward"] > single["sensitivity"]["passes"]["forward"]
    assert best["latency_ratio"] <= 0.6
    first = json.loads(next(cache.glob("kl-[0-9a-f]*.json")).read_text())
    mean = json.loads(next(cache.glob("kl-r3-*.json")).read_text())
    assert mean["scores"] != first["scores"]  # the context changed what a layer's bits cost
    again, _ = run("again", 3)
    assert again["sensitivity"]["cached"] is True and again["sensitivity"]["rounds"] == refined["sensitivity"]["rounds"]


@pytest.mark.parametrize("changes, message", [
    (dict(sensitivity="hessian", sensitivity_rounds=2, latency_budget=0.6), "cannot"),
    (dict(sensitivity="kl", sensitivity_rounds=2), "no budget"),
    (dict(sensitivity="kl", sensitivity_rounds=0, latency_budget=0.6), "sensitivity_rounds"),
])
def test_sensitivity_rounds_refused(int8_ckpt, tmp_path, changes, message):
    with pytest.raises(SearchConfigError, match=message):
        tiny_config(int8_ckpt, tmp_path, strategy="ilp", **changes).check()
