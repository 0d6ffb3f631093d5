"""Policy .npy rows follow the model's layer construction order (CIM-AQ's files); inside, call order."""
from __future__ import annotations

import json

import numpy as np
import pytest

from lib.cim import HardwareConfig, apply_policy, quantizable_layers, quantize_model
from lib.layer_trace import called_layer_names, layer_order
from lib.policy import Policy, PolicyError
from models import create_model


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
