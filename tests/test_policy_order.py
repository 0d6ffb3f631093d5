"""Policy .npy rows follow the model's layer construction order (CIM-AQ's files); inside, call order."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lib.cim import HardwareConfig, apply_policy, quantizable_layers, quantize_model
from lib.layer_trace import called_layer_names, layer_order
from lib.policy import Policy, PolicyError
from lib.search import DDPGConfig, run_search
from lib.simulator import CostModel
from lib.simulator.latency import main as latency_main
from models import create_model
from search_support import make_int8_checkpoint, tiny_config

CIM_AQ_HW = Path(__file__).resolve().parents[1] / "run" / "hardware" / "cim_aq_default.yaml"


@pytest.fixture(scope="module")
def resnet18():
    return layer_order(lambda: create_model("resnet18", 10), 32)


def distinct_policy(names):
    """Bits that differ between neighbouring layers, so a shifted row shows."""
    return Policy([2 + i % 7 for i in range(len(names))], [8 - i % 5 for i in range(len(names))],
                  layer_names=list(names))


def test_resnet18_builds_downsample_before_the_block_convs(resnet18):
    model, order = resnet18
    assert order.call == tuple(called_layer_names(model, input_size=32))
    assert sorted(order.call) == sorted(order.construction) and len(order.call) == 21
    for block in ("layer2.0", "layer3.0", "layer4.0"):
        down, conv1 = f"{block}.downsample.0", f"{block}.conv1"
        assert order.construction.index(down) < order.construction.index(conv1)
        assert order.call.index(down) > order.call.index(conv1)


def test_construction_order_equals_call_order_for_a_plain_network():
    _, order = layer_order(lambda: create_model("tiny_cnn", 10), 16)
    assert order.construction == order.call


def test_saved_npy_rows_follow_construction_order_and_load_back_onto_named_layers(tmp_path, resnet18):
    _, order = resnet18
    policy = distinct_policy(order.call)
    npy, js = policy.save(tmp_path / "policy", order)
    rows = np.load(npy)
    by_name = {entry["name"]: (entry["w_bit"], entry["a_bit"]) for entry in json.loads(js.read_text())["layers"]}
    assert [tuple(row) for row in rows.tolist()] == [by_name[name] for name in order.construction]
    loaded = Policy.load(npy, order)
    assert loaded.layer_names == list(order.call)
    assert [(loaded.w_bits[i], loaded.a_bits[i]) for i in range(len(loaded))] == [by_name[n] for n in order.call]


def test_cim_aq_npy_in_construction_order_lands_every_row_on_its_layer(tmp_path, resnet18):
    """A CIM-AQ-style file (rows in construction order, 3 columns) applied to real CIM layers."""
    model, order = resnet18
    rows = np.array([[2 + k % 7, 8 - k % 5, 3 + k % 4] for k in range(len(order.construction))])
    np.save(tmp_path / "cim_aq.npy", rows)
    expected = {name: tuple(rows[k]) for k, name in enumerate(order.construction)}
    quantized = quantize_model(model, (8, 8), HardwareConfig(), input_size=32)
    apply_policy(quantized, Policy.load(tmp_path / "cim_aq.npy", order))
    for name, layer in quantizable_layers(quantized):
        assert (layer.w_bit, layer.a_bit, layer.adc_bits) == expected[name], name


def test_npy_with_the_wrong_number_of_rows_is_refused(tmp_path, resnet18):
    _, order = resnet18
    np.save(tmp_path / "short.npy", np.full((20, 2), 4))
    with pytest.raises(PolicyError, match="policy has 20 layers but the model has 21"):
        Policy.load(tmp_path / "short.npy", order)


def test_latency_cli_prices_a_construction_order_npy_like_the_same_named_json(tmp_path, resnet18, capsys):
    _, order = resnet18
    npy, js = distinct_policy(order.call).save(tmp_path / "policy", order)
    reports = {}
    for path in (npy, js):
        report = tmp_path / f"{path.suffix[1:]}.json"
        assert latency_main(["--arch", "resnet18", "--num-classes", "10", "--input-size", "32", "--hardware",
                             str(CIM_AQ_HW), "--policy", str(path), "--json", str(report)]) == 0, capsys.readouterr()
        reports[path.suffix] = {k: v for k, v in json.loads(report.read_text())["policy"].items() if k != "path"}
    assert reports[".npy"] == reports[".json"]
    names = [layer["name"] for layer in json.loads(js.read_text())["layers"]]
    assert [row["name"] for row in reports[".npy"]["per_layer"]] == names
    # Taken in call order instead, the same rows would put other bits on 6 of the 21 layers:
    # the price the CLI gave before it knew the row order.
    cost = CostModel.from_model(create_model("resnet18", 10), HardwareConfig.from_yaml(CIM_AQ_HW), 32)
    assert cost.policy_cost(np.load(npy)).total_latency != pytest.approx(reports[".npy"]["total_latency_us"])


def test_search_writes_best_policy_npy_in_construction_order(tmp_path, eager_single_thread):
    init = make_int8_checkpoint(tmp_path / "int8", arch="resnet18", input_size=16)
    out = tmp_path / "search"
    run_search(tiny_config(init, out, episodes=1, warmup=1, top_k=0, finetune_steps=1, search_holdout=8, batch_size=8,
                           search_train_size=8, ddpg=DDPGConfig(hidden1=8, hidden2=8, bsize=4)))
    _, order = layer_order(lambda: create_model("resnet18", 10), 16)
    assert order.construction != order.call
    from_npy = Policy.load(out / "best_policy.npy", order)
    from_json = Policy.load(out / "best_policy.json")
    assert from_npy.layer_names == from_json.layer_names == list(order.call)
    assert (from_npy.w_bits, from_npy.a_bits) == (from_json.w_bits, from_json.a_bits)
    assert len(set(zip(from_json.w_bits, from_json.a_bits))) > 1  # a mixed policy, so a shifted row would show
