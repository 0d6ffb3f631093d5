"""Energy and area: one layer's counts against hand counts, ADC curves, model totals, hardware without an
energy model, the energy section's validation, the CLI, and searches that budget or minimise energy."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import rl_quantize
from lib.cim.energy_config import BitCurve
from lib.cim.hardware import HardwareConfig, HardwareConfigError
from lib.policy import Policy
from lib.search import DDPGConfig, prepare, run_search
from lib.search.budget import lower_to_budget
from lib.search.reward import cim_aq_reward
from lib.search.search import STATE_NAME
from lib.simulator import CostError, CostModel, LayerDims, layer_cost, layer_energy, trace_layer_dims
from lib.simulator.latency import main as latency_main
from lib.training.checkpoint import plain
from lib.workflow.report import plot_pareto
from models import create_model
from search_support import make_int8_checkpoint, tiny_config

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_HW = ROOT / "run" / "hardware" / "default.yaml"
CELL2_HW = ROOT / "run" / "hardware" / "cell2bit.yaml"
CIM_AQ_HW = ROOT / "run" / "hardware" / "cim_aq_default.yaml"
SMALL_AGENT = DDPGConfig(hidden1=16, hidden2=16, bsize=8)
ISAAC_TABLE = {4: 0.79, 5: 0.99, 6: 1.20, 7: 1.42, 8: 1.67, 9: 1.97, 10: 2.38}

# Round figures, so that every expected energy below is a plain product of a count and one of them.
ENERGY = {"adc_energy_pj": {"model": "flash", "per_level": 0.01}, "adc_area_um2": {"model": "sar", "per_bit": 100.0},
          "adc_share": 8, "dac_pj": 0.5, "array_read_pj": 64.0, "array_area_um2": 20.0, "shift_add_pj": 0.02}


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def small_hw(**changes) -> HardwareConfig:
    """64-row x 32-column arrays (several row and column tiles for a small layer), the figures above."""
    return HardwareConfig(**{"rows": 64, "cols": 32, "energy": ENERGY, **changes})


CONV = LayerDims(name="conv", type="Conv2D", m=20, n=30 * 9, invocations=49, repeat=2, kernel_size=(3, 3),
                 in_channels=60, out_channels=40, groups=2)


def hand_count(mapping: str, cell_bits: int, input_bits: int, w_bit: int, a_bit: int) -> dict:
    """CONV's operation counts on small_hw worked out from the layer's shape, not from its plan."""
    differential = mapping != "offset"
    stored = w_bit - 1 if differential else w_bit              # magnitude slicing keeps |q| in b-1 bits
    slices = ceil_div(stored, cell_bits)
    weight_rows = 64 // 2 if mapping == "differential-row" else 64
    per_tile = weight_rows // 9                                 # whole 3x3 input channels per row-tile
    row_tiles = ceil_div(30, per_tile)
    rows = 270 * (2 if mapping == "differential-row" else 1)
    readouts = slices * 20 + (0 if differential else 1)        # offset's reference column read as well
    width = 2 if mapping == "differential-column" else 1
    columns = slices * 20 * width + (0 if differential else 1)
    col_tiles = ceil_div(readouts, 32 // width)                # pairs never split across arrays
    cycles = ceil_div(a_bit, input_bits)
    per_image = 2 * 49
    conversions = per_image * cycles * row_tiles * readouts
    return {"conversions": conversions, "row_drives": per_image * cycles * rows * col_tiles,
            "array_reads": per_image * cycles * row_tiles * col_tiles,
            "cell_reads": per_image * cycles * rows * columns,
            "shift_adds": conversions + (0 if differential else per_image * 20),
            "cells": 2 * rows * columns, "arrays": 2 * row_tiles * col_tiles,
            "adcs": 2 * row_tiles * col_tiles * ceil_div(32 // width, 8)}


@pytest.mark.parametrize("input_mode", ["bit-serial", "multi-bit"])
@pytest.mark.parametrize("input_bits", [1, 2])
@pytest.mark.parametrize("cell_bits", [1, 2, 4])
@pytest.mark.parametrize("mapping", ["offset", "differential-column", "differential-row"])
def test_one_layers_energy_terms_equal_a_hand_count(mapping, cell_bits, input_bits, input_mode):
    hw = small_hw(mapping=mapping, cell_bits=cell_bits, input_bits=input_bits, input_mode=input_mode)
    got = layer_energy(CONV, hw, w_bit=6, a_bit=5, adc_bits=7)
    want = hand_count(mapping, cell_bits, input_bits, 6, 5)
    assert {key: getattr(got, key) for key in want} == want
    assert got.cells_written == 0  # weights stay in place (write_per_inference: false)
    # each term is its count times its per-operation figure; an array read costs its share of 64x32 cells
    assert got.adc_pj == pytest.approx(want["conversions"] * 0.01 * (2 ** 7 - 1), rel=1e-12)
    assert got.dac_pj == pytest.approx(want["row_drives"] * 0.5, rel=1e-12)
    assert got.array_pj == pytest.approx(want["cell_reads"] * 64.0 / (64 * 32), rel=1e-12)
    assert got.digital_pj == pytest.approx(want["shift_adds"] * 0.02, rel=1e-12)
    assert got.write_pj == 0.0
    assert got.energy_pj == pytest.approx(sum(got.split().values()), rel=1e-12)
    assert got.area_um2 == pytest.approx(want["arrays"] * 20.0 + want["adcs"] * 700.0, rel=1e-12)
    # the same plan as the latency model: conversions, executes and arrays agree
    latency = layer_cost(CONV, hw, 6, 5, 7)
    assert (latency.adc_conversions, latency.executes, latency.arrays) == \
        (got.conversions, got.array_reads, got.arrays)


def test_one_worked_example_in_numbers():
    # differential-column, 2-bit cells, w=6 (5 magnitude bits: 3 slices), a=5 (5 cycles of a 1-bit DAC):
    # 60 read-outs per row-tile on 16 read-outs per array -> 4 column tiles; 30 channels, 7 per tile -> 5
    got = layer_energy(CONV, small_hw(mapping="dc", cell_bits=2), 6, 5, 7)
    assert (got.conversions, got.row_drives, got.array_reads, got.cell_reads, got.shift_adds, got.cells,
            got.arrays, got.adcs) == (147_000, 529_200, 9_800, 15_876_000, 147_000, 64_800, 40, 80)


def test_weights_written_per_inference_cost_every_cell():
    energy = {**ENERGY, "write_per_inference": True, "cell_write_pj": 3.0}
    got = layer_energy(CONV, small_hw(energy=energy), 8, 8)
    assert got.cells_written == got.cells == 2 * 270 * (2 * 20 * 2)  # 4-bit cells: 2 slices of 7 bits, pairs
    assert got.write_pj == pytest.approx(3.0 * got.cells, rel=1e-12)


@pytest.mark.parametrize("curve", [
    {"model": "sar", "per_bit": 0.1954, "per_level": 0.000415},
    {"model": "flash", "per_level": 0.05},
    {"model": "neurosim", "a_uw": 20.0, "b_uw": 50.0, "c_uw_ohm": 2e5, "column_resistance_ohm": 1e4,
     "cycle_ns": 1.0},
    {"model": "table", "values": ISAAC_TABLE},
])
def test_adc_energy_is_monotone_in_bits(curve):
    curve = BitCurve.from_dict("energy.adc_energy_pj", curve)
    bits = [b for b in range(1, 17) if curve.covers(b)]
    values = [curve.at(b) for b in bits]
    assert len(bits) >= 7 and all(later > earlier for earlier, later in zip(values, values[1:]))


def test_adc_curves_follow_their_forms_and_the_table():
    table = BitCurve.from_dict("t", {"model": "table", "values": ISAAC_TABLE})
    assert [table.at(b) for b in range(4, 11)] == list(ISAAC_TABLE.values())
    assert not table.covers(3) and not table.covers(11)
    flash = BitCurve.from_dict("f", {"model": "flash", "per_level": 0.05})
    assert [flash.at(b) for b in (1, 4, 8)] == pytest.approx([0.05, 0.75, 12.75])
    neurosim = BitCurve.from_dict("n", {"model": "neurosim", "a_uw": 20.0, "b_uw": 50.0, "c_uw_ohm": 2e5,
                                        "column_resistance_ohm": 1e4, "cycle_ns": 2.0})
    assert neurosim.at(8) == pytest.approx((20 * 8 + 50 + 20) * 9 * 2.0 * 1e-3)  # µW × ns = fJ
    # the shipped sar coefficients stay within 0.002 pJ of the ISAAC-class table, and the area
    # curve passes its end points and ISAAC's 8-bit ADC area
    hw = HardwareConfig.from_yaml(DEFAULT_HW)
    assert max(abs(hw.energy.adc_energy_pj.at(b) - v) for b, v in ISAAC_TABLE.items()) < 0.002
    assert [round(hw.energy.adc_area_um2.at(b)) for b in (4, 8, 10)] == [361, 1200, 3002]
    # a table hardware prices only its own bits: refused when read, and when a policy asks for others
    tabled = {**ENERGY, "adc_energy_pj": {"model": "table", "values": ISAAC_TABLE}}
    assert layer_energy(CONV, small_hw(energy=tabled), 6, 5, 9).adc_pj == \
        layer_energy(CONV, small_hw(energy=tabled), 6, 5, 9).conversions * 1.97
    with pytest.raises(HardwareConfigError, match=r"adc_bits=3 is not allowed: energy.adc_energy_pj is a table"):
        small_hw(energy=tabled, adc_bits=3)
    with pytest.raises(CostError, match=r"conv: adc_bits=12 is not allowed"):
        layer_energy(CONV, small_hw(energy=tabled), 6, 5, 12)


@pytest.fixture(scope="module")
def resnet20_dims():
    return trace_layer_dims(create_model("resnet20", 10), 32)


@pytest.mark.parametrize("hw_path", [DEFAULT_HW, CELL2_HW])
def test_a_models_energy_is_the_sum_of_its_layers(resnet20_dims, hw_path):
    model = CostModel(HardwareConfig.from_yaml(hw_path), resnet20_dims)
    n = len(model)
    policy = Policy([8] + [4] * (n - 2) + [8], [8] + [5] * (n - 2) + [8], [8] + [6] * (n - 2) + [8],
                    model.layer_names)
    cost = model.policy_cost(policy)
    energy = cost.energy
    layers = [model.layer_energy(i, *policy.layer(i)) for i in range(n)]
    assert energy.energy_pj == pytest.approx(sum(layer.energy_pj for layer in layers), rel=1e-12)
    for part, pj in energy.split_pj.items():
        assert pj == pytest.approx(sum(layer.split()[part] for layer in layers), rel=1e-12)
    assert energy.area_mm2 == pytest.approx(sum(layer.area_um2 for layer in layers) * 1e-6, rel=1e-12)
    assert energy.edp_pj_us == pytest.approx(energy.energy_pj * cost.total_latency, rel=1e-12)
    baseline = model.uniform_cost(8, 8)  # the hardware's ADC bits
    assert baseline.ratios == {"latency": 1.0, "energy": 1.0, "edp": 1.0, "area": 1.0}
    assert energy.energy_ratio == pytest.approx(energy.energy_pj / baseline.energy.energy_pj, rel=1e-12)
    assert energy.edp_ratio == pytest.approx(energy.energy_ratio * cost.ratio, rel=1e-12)
    assert 0 < energy.energy_ratio < 1 and energy.area_ratio < 1  # fewer ADC bits: less energy and ADC area
    at8 = baseline.energy.split_pj  # at 8 bits the ADCs take the largest part
    assert at8["adc"] > max(pj for part, pj in at8.items() if part != "adc")


def _cim_aq_latency(dims, cb: dict, w: int, a: int) -> float:
    """CIM-AQ's latency formula for differential-column mapping, written out."""
    total = 0.0
    for d in dims:
        cols, rows = d.m * math.ceil(w / cb["resolution_weight_bits"]) * 2, d.n
        writes = math.ceil(cols / cb["size"]["m"]) * math.ceil(rows / cb["size"]["n"])
        executes = d.invocations * writes * math.ceil(a / cb["resolution_input_bits"])
        total += d.repeat * (writes * cb["mvm_write_latency"] + executes * cb["mvm_execute_latency"])
    return total


def test_cim_aq_layout_reports_no_energy_and_cim_aqs_latency_exactly(resnet20_dims, tmp_path, capsys):
    hw = HardwareConfig.from_yaml(CIM_AQ_HW)
    assert hw.energy is None
    model = CostModel(hw, resnet20_dims)
    cost = model.policy_cost(Policy.uniform(model.layer_names, 4, 6))
    assert cost.energy is None and cost.ratios["energy"] is None and cost.summary()["energy_pj"] is None
    assert not model.energy_available
    crossbar = yaml.safe_load(CIM_AQ_HW.read_text())["crossbar"]
    assert cost.total_latency == _cim_aq_latency(resnet20_dims, crossbar, 4, 6)
    with pytest.raises(CostError, match="needs the hardware's `energy` section"):
        cost.ratio_of("energy")
    # the energy section changes no latency
    raw = yaml.safe_load(DEFAULT_HW.read_text())
    raw.pop("energy")
    bare = HardwareConfig.from_dict(raw)
    assert np.array_equal(CostModel(bare, resnet20_dims).table,
                          CostModel(HardwareConfig.from_yaml(DEFAULT_HW), resnet20_dims).table)
    assert bare == HardwareConfig.from_yaml(DEFAULT_HW)  # energy figures take no part in equality
    # the CLI says so, in text and JSON
    out = tmp_path / "report.json"
    assert latency_main(["--arch", "resnet20", "--num-classes", "10", "--input-size", "32", "--hardware",
                         str(CIM_AQ_HW), "--json", str(out)]) == 0
    assert "energy: unavailable" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["energy_available"] is False and report["uniform"]["energy"] is None


def test_latency_cli_prints_energy_split_and_writes_it(tmp_path, resnet20_dims):
    n = len(resnet20_dims)
    np.save(tmp_path / "policy.npy", np.array([[8, 8, 8]] + [[4, 5, 6]] * (n - 2) + [[8, 8, 8]]))
    out = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, "-m", "lib.simulator.latency", "--arch", "resnet20", "--num-classes", "10", "--input-size",
         "32", "--hardware", str(DEFAULT_HW), "--policy", str(tmp_path / "policy.npy"), "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "energy (nJ)" in result.stdout and "ADC share" in result.stdout
    assert "energy: " in result.stdout and "adc " in result.stdout and "ratios vs uniform 8/8" in result.stdout
    report = json.loads(out.read_text())
    model = CostModel(HardwareConfig.from_yaml(DEFAULT_HW), resnet20_dims)
    want = model.policy_cost(np.load(tmp_path / "policy.npy"))  # a traced resnet20's rows: same order here
    assert report["policy"]["energy"]["energy_pj"] == pytest.approx(want.energy.energy_pj, rel=1e-12)
    assert set(report["policy"]["energy"]["split_pj"]) == {"adc", "dac", "array", "digital", "write"}
    assert report["policy"]["ratios"]["energy"] == pytest.approx(want.ratios["energy"], rel=1e-12)
    assert report["uniform"]["energy"]["energy_ratio"] == 1.0


@pytest.mark.parametrize("changes, pattern", [
    ({"adc_share": 0}, r"energy.adc_share=0 is not allowed: expected an integer >= 1"),
    ({"dac_pj": -1}, r"energy.dac_pj=-1 is not allowed: expected a finite number >= 0"),
    ({"adc_energy_pj": {"model": "pipeline"}},
     r"energy.adc_energy_pj.model='pipeline' is not allowed: expected one of \['sar', 'flash', 'table', 'neurosim'\]"),
    ({"adc_energy_pj": {"model": "flash", "per_bit": 1.0}},
     r"energy.adc_energy_pj: unknown key\(s\) \['per_bit'\] for model 'flash'; allowed: \['model', 'per_level'\]"),
    ({"adc_energy_pj": {"model": "sar"}}, r"energy.adc_energy_pj: model 'sar' needs \['per_bit'\]"),
    ({"adc_area_um2": {"model": "neurosim"}}, r"energy.adc_area_um2.model='neurosim' is not allowed"),
    ({"adc_energy_pj": {"model": "table", "values": {0: 1.0}}}, r"bits 0 are not allowed"),
    ({"write_per_inference": True}, r"write_per_inference=true needs energy.cell_write_pj"),
    ({"write_per_inference": "yes"}, r"energy.write_per_inference='yes' is not allowed: expected true or false"),
    ({"adc_lsb_pj": 1.0}, r"unknown key\(s\) \['energy.adc_lsb_pj'\]; allowed keys of `energy` are"),
])
def test_bad_energy_fields_name_key_value_and_allowed(changes, pattern):
    with pytest.raises(HardwareConfigError, match=pattern):
        small_hw(energy={**ENERGY, **changes})


def test_energy_section_reads_from_yaml_and_round_trips(tmp_path):
    raw = yaml.safe_load(DEFAULT_HW.read_text())
    missing = {k: v for k, v in raw.items() if k != "energy"}
    missing["energy"] = {k: v for k, v in raw["energy"].items() if k != "dac_pj"}
    path = tmp_path / "hw.yaml"
    path.write_text(yaml.safe_dump(missing))
    with pytest.raises(HardwareConfigError, match=rf"{path}: energy: missing key\(s\) \['dac_pj'\]"):
        HardwareConfig.from_yaml(path)
    hw = small_hw(energy={**ENERGY, "adc_energy_pj": {"model": "table", "values": ISAAC_TABLE}})
    # a checkpoint stores to_dict() through JSON-like plain(): the table's bits become strings
    again = HardwareConfig.from_dict(json.loads(json.dumps(plain(hw.to_dict()))))
    assert again.energy == hw.energy and again == hw


@pytest.fixture(scope="module")
def int8_ckpt(tmp_path_factory) -> Path:
    return make_int8_checkpoint(tmp_path_factory.mktemp("int8_energy"))


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "episodes.jsonl").read_text().splitlines()]


def test_lowering_meets_every_budget(int8_ckpt, tmp_path):
    config = tiny_config(int8_ckpt, tmp_path, budgets={"latency": 0.8, "energy": 0.45, "edp": 0.3})
    setup = prepare(config)
    assert config.latency_budget == 0.8 and config.budgets == {"energy": 0.45, "edp": 0.3}
    steps = []
    lowered = lower_to_budget(Policy.uniform(setup.names, 8, 8), setup.cost_model, setup.space,
                              config.all_budgets, steps)
    ratios = setup.cost_model.policy_cost(lowered).ratios
    assert ratios["latency"] <= 0.8 and ratios["energy"] <= 0.45 and ratios["edp"] <= 0.3
    assert steps[-1][3] == pytest.approx({k: ratios[k] for k in ("latency", "energy", "edp")})
    assert any(v > config.all_budgets[k] for k, v in steps[-2][3].items())  # the step before still missed one


def test_energy_budget_is_met_by_every_evaluated_policy(int8_ckpt, tmp_path, eager_single_thread):
    out = tmp_path / "budget"
    result = run_search(tiny_config(int8_ckpt, out, budgets={"energy": 0.5}, search_adc=True, ddpg=SMALL_AGENT,
                                    top_k=1, episodes=3))
    records = read_log(out)
    assert records and all(r["energy_ratio"] <= 0.5 for r in records)
    assert all(r["reward"] == pytest.approx(0.1 * (r["accuracy"] - json.loads(
        (out / "summary.json").read_text())["baseline_accuracy"])) for r in records)
    best = json.loads((out / "best_policy.json").read_text())
    assert best["energy_ratio"] == pytest.approx(result.best["energy_ratio"]) and best["energy_ratio"] <= 0.5
    assert set(best["energy_split_pj"]) == {"adc", "dac", "array", "digital", "write"}


def test_energy_objective_prices_the_reward_and_old_searches_resume(int8_ckpt, tmp_path, eager_single_thread):
    out = tmp_path / "energy"
    run_search(tiny_config(int8_ckpt, out, objective="energy", episodes=2, top_k=0, ddpg=SMALL_AGENT))
    summary = json.loads((out / "summary.json").read_text())
    target = summary["target_accuracy"]
    for r in read_log(out):
        assert r["objective"] == "energy" and r["objective_ratio"] == r["energy_ratio"]
        assert r["reward"] == pytest.approx(cim_aq_reward(r["accuracy"], r["energy_ratio"], target))
    # a search written before objectives and budgets existed resumes
    old = tmp_path / "old"
    run_search(tiny_config(int8_ckpt, old, episodes=2, top_k=0, ddpg=SMALL_AGENT))
    state = torch.load(old / STATE_NAME, weights_only=True)
    for key in ("objective", "budgets"):
        state["config"].pop(key)
    torch.save(state, old / STATE_NAME)
    resumed = run_search(tiny_config(int8_ckpt, old, episodes=3, top_k=0, ddpg=SMALL_AGENT, resume=True))
    assert resumed.episodes_run == 3 and [r["episode"] for r in read_log(old)] == [0, 1, 2]


def cli_args(init: Path, out: Path) -> list[str]:
    return ["--init", str(init), "--output-dir", str(out), "--episodes", "2", "--warmup", "1", "--finetune-steps",
            "1", "--batch-size", "16", "--search-holdout", "32", "--top-k", "0", "--no-progress", "--device", "cpu",
            "--threads", "1"]


@pytest.mark.parametrize("extra, message", [
    (["--objective", "power"], "objective='power' is not allowed: expected one of ['latency', 'energy', 'edp', "
                               "'area']"),
    (["--budget", "energy=0.01"], "budget energy=0.01 is not reachable: the lowest allowed bits give an energy ratio "
                                  "of 0."),
    (["--budget", "latency=0.5,area=0.5"], "budget area=0.5 is not reachable"),
    (["--budget", "latency=0.001"], "latency_budget=0.001 is not reachable"),
    (["--budget", "speed=0.5"], "budget 'speed=0.5' is not allowed: expected NAME=RATIO"),
    (["--budget", "energy=2"], "budget energy=2.0 is not allowed: expected a ratio of energy vs uniform 8-bit in (0, 1]"),
    (["--latency-budget", "0.5", "--budget", "latency=0.6"], "two latency budgets"),
    (["--objective", "edp", "--hardware", str(CIM_AQ_HW)], "objective/budget ['edp'] needs the hardware's `energy` "
                                                          "section"),
    (["--search-adc", "--min-adc-bit", "3", "--hardware", "TABLE"], "searched ADC bits=3 is not allowed"),
])
def test_unknown_objective_or_unreachable_budget_exits_2_before_training(int8_ckpt, tmp_path, capsys, extra, message):
    if "TABLE" in extra:
        raw = yaml.safe_load(DEFAULT_HW.read_text())
        raw["energy"]["adc_energy_pj"] = {"model": "table", "values": ISAAC_TABLE}
        (tmp_path / "table.yaml").write_text(yaml.safe_dump(raw))
        extra = [str(tmp_path / "table.yaml") if e == "TABLE" else e for e in extra]
    out = tmp_path / "out"
    assert rl_quantize.main(cli_args(int8_ckpt, out) + extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err
    assert not (out / "episodes.jsonl").exists() and not (out / STATE_NAME).exists()


def test_pareto_plot_takes_any_objective_on_its_x_axis(tmp_path):
    episodes = [{"episode": i, "accuracy": 90.0 + i, "latency_ratio": 0.5 + 0.1 * i, "energy_ratio": 0.4 + 0.1 * i,
                 "edp_ratio": 0.2, "area_ratio": 1.0, "reward": float(i), "feasible": i != 1} for i in range(3)]
    summary = {"baseline_accuracy": 92.0, "target_accuracy": 91.0, "best": episodes[2]}
    sizes = {}
    for name, objectives in (("default", ("latency", "energy")), ("edp", ("edp",)), ("no_energy", ("energy",))):
        shown = episodes if name != "no_energy" else [{**e, "energy_ratio": None} for e in episodes]
        plot_pareto(shown, summary, tmp_path / f"{name}.png", objectives)
        sizes[name] = Image.open(tmp_path / f"{name}.png").size
    assert sizes["default"][0] == 2 * sizes["edp"][0]       # latency and energy side by side
    assert sizes["no_energy"] == sizes["edp"]                # without energy figures: latency alone
