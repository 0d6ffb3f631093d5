"""ONNX QCDQ export: onnxruntime reproduces the CIM model for every step granularity, ADC on/off,
odd bit widths and torchvision ResNet-18; the graph carries Q/DQ at the policy's widths; export
never changes the model (even when it fails); a silently broken graph is caught."""
from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import lib.export.exporter as exporter
from lib.cim import HardwareConfig, quantizable_layers, quantize_model
from lib.cim.runtime import RUNTIME
from lib.export import ExportCIMLayer, ExportError, export_model, layer_qdq, ort_logits
from lib.export.__main__ import main as export_main
from lib.policy import Policy
from lib.training import make_checkpoint, save_checkpoint
from models import create_model


pytestmark = pytest.mark.usefixtures("eager_single_thread")


@pytest.fixture(scope="module")
def digits8():
    """Real images: (calibration batch from train, 96 validation images) of digits-small at 8x8."""
    from lib.data import build_loaders

    data = build_loaders("digits-small", input_size=8, batch_size=96, workers=0, seed=0)
    train, _ = next(iter(data.train))
    val, _ = next(iter(data.val))
    return train, val


class ToyNet(nn.Module):
    """Every layer shape the export form handles: plain, grouped + reflect padding, depthwise, a
    Linear over tokens (3-D input) and a biased classifier; BatchNorm instead of conv biases."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, groups=2, padding_mode="reflect", bias=False)
        self.b2 = nn.BatchNorm2d(8)
        self.c3 = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8, bias=False)
        self.b3 = nn.BatchNorm2d(8)
        self.tokens = nn.Linear(8, 6, bias=False)  # (a mid-network bias)
        self.head = nn.Linear(12, num_classes)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.c2(x)))
        x = torch.relu(self.b3(self.c3(x)))
        t = x.flatten(2).transpose(1, 2)[:, :2]  # (N, 2 tokens, 8)
        return self.head(self.tokens(t).flatten(1))


def _quantized(model, bits, hw, calib, input_size=8):
    torch.manual_seed(0)
    quantize_model(model, bits, hw, input_size=input_size, calibration_data=[calib[:48], calib[48:]])
    return model.eval()


def _check_bits(onnx_model, model):
    """Each layer's Q/DQ nodes sit at its bits: input at a_bit; weights at w_bit (ADC off) or cells at
    the cell grid with one conv per tile × slice (+ reference column) and psums at adc_bits (ADC on)."""
    for name, layer in quantizable_layers(model):
        roles = layer_qdq(onnx_model, name)
        assert {(n.bits, n.signed) for n in roles["input"]} == {(layer.a_bit, layer.input_signed)}, name
        if layer.psum_adc.enabled:
            offset = layer.hw.mapping == "offset"
            cell_bits = layer.hw.cell_bits if offset else layer.hw.cell_bits + 1
            assert {n.bits for n in roles["weight"]} == {cell_bits}, name
            assert len(roles["weight"]) == layer.layout.tiles * (layer.slices + int(offset)), name
            assert {n.bits for n in roles["psum"]} == {layer.adc_bits}, name
            assert len(roles["psum"]) == len(roles["weight"]), name
        else:
            assert {(n.bits, n.signed) for n in roles["weight"]} == {(layer.w_bit, True)}, name
            assert not roles["psum"]
        if layer.bias is not None:
            assert [n.bits for n in roles["bias"]] == [32], name


def _assert_layers_reproduced(model, images) -> None:
    """Each CIM layer's export form gives the layer's own output on the layer's own input (up to
    float order). End to end, float-order differences can flip an ADC rounding in a later layer
    (a partial sum exactly on a rounding tie), so the whole-model comparison is by agreement, not by a tight bound.
    The layers run their float32 products here, as the export form does (integer products are
    exact and can round a tie the other way; tests/test_integer_products.py covers them)."""
    captured = {}
    layers = quantizable_layers(model)
    hooks = [layer.register_forward_hook(lambda m, i, o, n=name: captured.__setitem__(n, (i[0], o)))
             for name, layer in layers]
    try:
        with torch.no_grad(), RUNTIME.use(integer_products=False):
            model.eval()(images)
    finally:
        for hook in hooks:
            hook.remove()
    for name, layer in layers:
        x, y = captured[name]
        with torch.no_grad():
            y_form = ExportCIMLayer(name, copy.deepcopy(layer)).eval()(x)
        assert (y_form - y).abs().max() <= 1e-4 * y.abs().max() + 1e-6, name


def _assert_reproduces(result, model, images) -> None:
    """onnxruntime equals the export form (PyTorch) up to float order, every export-form layer
    equals its CIM layer, and the predictions agree."""
    assert result.check.form_max_abs_diff < 1e-4
    _assert_layers_reproduced(model, images)
    assert result.check.top1_agreement >= 0.9


GRANULARITY_CASES = [
    # (weight granularity, psum granularity, mapping, n_sigma)
    ("layer", "off", "offset", None),
    ("channel", "off", "differential-column", None),
    ("array", "off", "offset", None),
    ("column", "off", "differential-column", None),
    ("layer", "column", "differential-column", None),
    ("channel", "column", "offset", None),
    ("array", "array", "differential-row", 2.0),
    ("column", "column", "offset", None),
    ("column", "layer", "differential-column", None),
]


@pytest.mark.parametrize("weight_gran,psum_gran,mapping,n_sigma", GRANULARITY_CASES)
def test_onnxruntime_reproduces_every_granularity(tmp_path, digits8, weight_gran, psum_gran, mapping, n_sigma):
    calib, images = digits8
    hw = HardwareConfig(rows=20, cols=32, cell_bits=2, adc_bits=6, mapping=mapping,
                        weight_granularity=weight_gran, psum_granularity=psum_gran, n_sigma=n_sigma)
    policy = Policy([4, 5, 3, 6, 4], [6, 5, 4, 5, 7])
    model = _quantized(ToyNet(), policy, hw, calib)
    assert max(layer.layout.tiles for _, layer in quantizable_layers(model)) > 1  # tiling is exercised
    result = export_model(model, tmp_path / "m.onnx", images, min_agreement=0.9)
    _assert_reproduces(result, model, images)
    _check_bits(onnx.load(tmp_path / "m.onnx"), model)


@pytest.mark.parametrize("bits,hw_kwargs,fallback", [
    ((1, 1), {}, "input Q/DQ at 1 bits"),
    ((6, 3), {"adc_bits": 12}, "partial-sum Q/DQ at 12 bits"),
    ((5, 4), {"cell_bits": 1, "mapping": "offset", "adc_bits": 4}, "cell Q/DQ at 1 bits"),
    ((8, 8), {"cell_bits": 8}, "cell as 9-bit integer levels × step"),
])
def test_widths_brevitas_cannot_export_use_our_qdq(tmp_path, digits8, bits, hw_kwargs, fallback):
    calib, images = digits8
    hw = HardwareConfig(**{"rows": 20, "cols": 32, "cell_bits": 2, "adc_bits": 6, **hw_kwargs})
    model = _quantized(ToyNet(), bits, hw, calib)
    result = export_model(model, tmp_path / "m.onnx", images, min_agreement=0.9)
    assert any(fallback in info["fallbacks"] for info in result.layers)
    _assert_reproduces(result, model, images)
    graph = onnx.load(tmp_path / "m.onnx")
    for name, layer in quantizable_layers(model):
        assert {n.bits for n in layer_qdq(graph, name)["input"]} == {layer.a_bit}
        assert {n.bits for n in layer_qdq(graph, name)["psum"]} == {layer.adc_bits}


@pytest.mark.parametrize("psum_gran", ["off", "column"])
def test_negative_learned_steps_are_exported_exactly(tmp_path, digits8, psum_gran):
    """LSQ can drive a raw step through zero (seen after a few epochs of QAT): the layer then uses
    |step|, and the export writes the same positive steps."""
    calib, images = digits8
    hw = HardwareConfig(rows=20, cols=32, cell_bits=2, adc_bits=6, psum_granularity=psum_gran)
    model = _quantized(ToyNet(), (5, 6), hw, calib)
    with torch.no_grad():
        for _, layer in quantizable_layers(model)[:-1]:  # (the head's bias bound needs its steps as they are)
            layer.weight_step_module.step[..., ::2].neg_()
            if layer.psum_adc.enabled:
                layer.psum_adc.step[..., 1::3].neg_()
    result = export_model(model, tmp_path / "m.onnx", images, min_agreement=0.9)
    _assert_reproduces(result, model, images)


def test_torchvision_resnet18_with_a_mixed_policy(tmp_path):
    from lib.data import build_loaders

    data = build_loaders("digits-small", input_size=32, batch_size=32, workers=0, seed=0)
    calib, images = next(iter(data.train))[0], next(iter(data.val))[0]
    model = create_model("resnet18", 10)
    rng = np.random.RandomState(0)
    policy = Policy(rng.randint(2, 9, 21).tolist(), rng.randint(2, 9, 21).tolist())
    hw = HardwareConfig(rows=1152, cols=512, cell_bits=4, adc_bits=8)  # ADC on, column-wise steps
    torch.manual_seed(0)
    quantize_model(model, policy, hw, input_size=32, calibration_data=[calib])
    result = export_model(model.eval(), tmp_path / "r18.onnx", images, min_agreement=0.9)
    # (onnxruntime vs the PyTorch export form is not asserted here: with hundreds of convs, float
    # summation order moves a few partial sums across an ADC rounding boundary either way)
    _assert_layers_reproduced(model, images)
    assert result.check.top1_agreement >= 0.9 and result.check.images == 32
    graph = onnx.load(tmp_path / "r18.onnx")
    layers = quantizable_layers(model)
    assert [layer.w_bit for _, layer in layers] == policy.w_bits
    for (name, layer), a_bit in zip(layers, policy.a_bits):
        assert {n.bits for n in layer_qdq(graph, name)["input"]} == {a_bit}, name
        assert len(layer_qdq(graph, name)["weight"]) == layer.layout.tiles * layer.slices, name
    meta = {p.key: p.value for p in graph.metadata_props}
    assert json.loads(meta["policy"])["layers"][3]["w_bit"] == policy.w_bits[3]
    assert 0 < float(meta["latency_ratio"]) < 2


def _state_copy(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_model_is_unchanged_by_export_even_when_it_fails(tmp_path, digits8):
    calib, images = digits8
    hw = HardwareConfig(rows=20, cols=32, cell_bits=2, adc_bits=6)
    model = _quantized(ToyNet(), (4, 5), hw, calib)
    state, before = _state_copy(model), model(images).detach()
    export_model(model, tmp_path / "ok.onnx", images)
    # opset 9 has no per-channel Q/DQ: Brevitas fails in the middle of its export pass
    with pytest.raises(ExportError, match="export failed"):
        export_model(model, tmp_path / "bad.onnx", images, opset=9)
    assert not (tmp_path / "bad.onnx").exists()
    assert torch.equal(model(images), before)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert not any(getattr(m, "export_mode", False) for m in model.modules())
    assert model.training is False
    export_model(model, tmp_path / "again.onnx", images)  # still exportable


def test_silently_broken_graph_is_caught_by_onnxruntime(tmp_path, digits8):
    """Brevitas exports a weight step varying along input channels without complaint (docs/export.md, "The graph"):
    exporting the CIM layers as they are, through the exporter's own Brevitas path, yields a graph
    only onnxruntime rejects — at run time, which is why export_model always runs it."""
    calib, images = digits8
    hw = HardwareConfig(rows=20, cols=32, cell_bits=2, psum_granularity="off", weight_granularity="column")
    model = _quantized(ToyNet(), (4, 5), hw, calib)
    assert any(layer.layout.tiles > 1 for _, layer in quantizable_layers(model))
    naive = exporter._brevitas_export(copy.deepcopy(model).eval(), images[:2], exporter.DEFAULT_OPSET)
    onnx.checker.check_model(naive)  # the checker does not see the problem either
    with pytest.raises(Exception):
        ort_logits(naive.SerializeToString(), images)
    result = export_model(model, tmp_path / "m.onnx", images, min_agreement=0.9)  # the export form runs
    assert result.check.passed


def test_graph_is_clean_checked_and_carries_metadata(tmp_path, digits8):
    calib, images = digits8
    hw = HardwareConfig(rows=20, cols=32, cell_bits=2, adc_bits=6)
    model = _quantized(create_model("tiny_cnn", 10), (5, 6), hw, calib)
    result = export_model(model, tmp_path / "m.onnx", images, metadata={"test_top1": 12.5})
    graph = onnx.load(tmp_path / "m.onnx")
    onnx.checker.check_model(graph, full_check=True)
    initializers = {init.name for init in graph.graph.initializer}
    assert [i.name for i in graph.graph.input] == ["input"] and not initializers & {"input"}
    meta = {p.key: p.value for p in graph.metadata_props}
    assert json.loads(meta["hardware"])["cell_bits"] == 2
    assert [l["w_bit"] for l in json.loads(meta["policy"])["layers"]] == [5, 5, 5, 5]
    assert float(meta["latency_ratio"]) == pytest.approx(result.metadata["latency_ratio"])
    assert float(meta["test_top1"]) == 12.5 and float(meta["ort_top1_agreement"]) >= 0.99
    assert result.graph["ops"]["QuantizeLinear"] > 0 and result.graph["ops"]["DequantizeLinear"] > 0
    # the default hardware is bit-serial: the ADC-on form converts each of the 6 input planes (a 6-bit
    # input, 1-bit DAC), read back from the graph as the Floor nodes that split the input
    assert all(info["input_mode"] == "bit-serial" and info["input_planes"] == 6 for info in result.layers)
    assert result.graph["ops"]["Floor"] == len(result.layers)
    # dynamic batch: any batch size runs
    with torch.no_grad():
        for n in (1, 5):
            out = ort_logits(graph.SerializeToString(), images[:n])
            assert out.shape == (n, 10)
            assert np.abs(out - model(images[:n]).numpy()).max() < 0.05


def test_uncalibrated_or_float_models_are_refused(tmp_path, digits8):
    _, images = digits8
    with pytest.raises(ExportError, match="no CIM layers"):
        export_model(create_model("tiny_cnn", 10), tmp_path / "f.onnx", images)
    model = quantize_model(create_model("tiny_cnn", 10), (8, 8), HardwareConfig(rows=32, cols=32), input_size=8)
    with pytest.raises(ExportError, match="calibrate"):
        export_model(model, tmp_path / "u.onnx", images)


def test_cli_exports_a_checkpoint_and_refuses_a_float_one(tmp_path, digits8, capsys):
    calib, _ = digits8
    hw = HardwareConfig(rows=32, cols=32, cell_bits=2, adc_bits=6)
    policy = Policy([8, 4, 3, 6], [8, 6, 4, 8], layer_names=["features.0", "features.3", "features.6", "fc"])
    model = _quantized(create_model("tiny_cnn", 10), policy, hw, calib)
    args = {"arch": "tiny_cnn", "num_classes": 10, "input_size": 8, "dataset": "digits-small", "data_root": None,
            "quant": "mixed", "policy": policy.to_json_dict(), "hardware_config": hw.to_dict()}
    save_checkpoint(make_checkpoint(epoch=1, state_dict=model.state_dict(), args=args), tmp_path / "q")
    out = tmp_path / "cli.onnx"
    assert export_main(["--checkpoint", str(tmp_path / "q" / "checkpoint.pth.tar"), "--output", str(out),
                        "--images", "64"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    report = json.loads((tmp_path / "cli.export.json").read_text())
    assert out.is_file() and printed["ort_top1_agreement"] >= 0.99
    assert report["ort_images"] == 64 and report["metadata"]["policy"]["layers"][1]["w_bit"] == 4

    fp32 = {**args, "quant": "none"}
    save_checkpoint(make_checkpoint(epoch=1, state_dict=create_model("tiny_cnn", 10).state_dict(), args=fp32),
                    tmp_path / "f")
    assert export_main(["--checkpoint", str(tmp_path / "f" / "checkpoint.pth.tar"), "--output",
                        str(tmp_path / "f.onnx")]) == 2
    assert "no CIM layers" in capsys.readouterr().err
