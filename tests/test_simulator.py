"""Cost model: traced layer dims, CIM-AQ YAML dims, latency tables, policy costs and the CLI."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
import yaml
from torch import nn

from lib.cim.hardware import HardwareConfig
from lib.layer_trace import example_input_for, trace_layer_calls
from lib.policy import Policy, PolicyError
from lib.simulator import (CostError, CostModel, LayerDims, LayerDimsError, layer_cost, parse_dim, read_layer_dims,
                           trace_layer_dims, write_layer_dims)
from lib.simulator.latency import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
CIM_AQ_HW = ROOT / "run" / "hardware" / "cim_aq_default.yaml"
RESNET18_DIMS = ROOT / "run" / "layer_dims" / "resnet18_224.yaml"
NUM_CLASSES = 1000

# Base hardware for hand computations of CIM-AQ's formula: 256x256 arrays, 4-bit cells, 1-bit
# inputs, 56 / 1.4 µs, CIM-AQ's counting (dense rows, ceil(b/c) slices, dense columns).
BASE_HW = dict(rows=256, cols=256, cell_bits=4, input_bits=1, write_latency=56.0, execute_latency=1.4,
               row_tiling="dense", weight_slicing="full-range", column_placement="dense")


def hw_with(**changes) -> HardwareConfig:
    return HardwareConfig(**{**BASE_HW, **changes})


@pytest.fixture(scope="module")
def resnet18():
    return torchvision.models.resnet18(num_classes=NUM_CLASSES)


@pytest.fixture(scope="module")
def resnet18_dims(resnet18):
    return trace_layer_dims(resnet18, 224)


# --------------------------------------------------------------------------- tracing
def test_resnet18_traced_dims(resnet18, resnet18_dims):
    dims = resnet18_dims
    assert len(dims) == 21 and all(d.quantizable for d in dims)
    first = dims[0]
    assert (first.name, first.type, first.m, first.n, first.invocations, first.repeat) == \
        ("conv1", "Conv2D", 64, 147, 112 * 112, 1)
    assert (first.in_hw, first.out_hw, first.kernel_size, first.stride) == ((224, 224), (112, 112), (7, 7), (2, 2))
    assert first.params == 64 * 3 * 7 * 7 and not first.depthwise
    conv = dims[1]
    assert (conv.name, conv.m, conv.n, conv.invocations) == ("layer1.0.conv1", 64, 576, 56 * 56)
    # downsample 1x1 convs sit where they are called: after their block's conv2
    for stage, index, cin, cout, pixels in ((2, 7, 64, 128, 28 * 28), (3, 12, 128, 256, 14 * 14),
                                            (4, 17, 256, 512, 7 * 7)):
        assert dims[index - 1].name == f"layer{stage}.0.conv2"
        ds = dims[index]
        assert (ds.name, ds.m, ds.n, ds.invocations, ds.kernel_size) == \
            (f"layer{stage}.0.downsample.0", cout, cin, pixels, (1, 1))
    fc = dims[-1]
    assert (fc.name, fc.type, fc.m, fc.n, fc.invocations, fc.repeat) == ("fc", "Dense", NUM_CLASSES, 512, 1, 1)


def test_trace_order_is_the_shared_call_order(resnet18, resnet18_dims):
    calls = trace_layer_calls(resnet18, example_input_for(resnet18, 224))
    assert [d.name for d in resnet18_dims] == [c.name for c in calls]


def test_grouped_depthwise_and_token_linear_dims():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
            self.grouped = nn.Conv2d(8, 32, 3, stride=2, padding=1, groups=2)
            self.shared = nn.Linear(4, 4)
            self.tokens = nn.Linear(4, 6)

        def forward(self, x):
            x = self.grouped(self.dw(x))                  # (1, 32, 4, 4)
            t = x.flatten(2).transpose(1, 2)[..., :4]      # (1, 16 tokens, 4)
            t = self.shared(self.shared(t))                # one weight, called twice
            return self.tokens(t)

    dims = trace_layer_dims(Net(), example_input=torch.zeros(1, 8, 8, 8))
    dw, grouped, shared, tokens = dims
    assert (dw.m, dw.n, dw.repeat, dw.invocations, dw.depthwise) == (1, 9, 8, 64, True)
    assert (grouped.m, grouped.n, grouped.repeat, grouped.invocations, grouped.depthwise) == (16, 36, 2, 16, False)
    assert (shared.calls, shared.invocations) == (2, 32)
    assert (tokens.m, tokens.n, tokens.invocations) == (6, 4, 16)


class _Attention(nn.Module):
    def __init__(self, cross: bool = False):
        super().__init__()
        self.cross = cross
        self.pre = nn.Linear(16, 16)
        kw = dict(kdim=8, vdim=12) if cross else {}
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True, **kw)
        self.post = nn.Linear(16, 10)

    def forward(self, x):
        x = self.pre(x)
        if self.cross:
            out, _ = self.attn(x, torch.zeros(1, 3, 8), torch.zeros(1, 3, 12), need_weights=False)
        else:
            out, _ = self.attn(x, x, x, need_weights=False)
        return self.post(out)


def test_attention_entries_only_when_asked():
    model, x = _Attention(), torch.zeros(1, 6, 16)
    plain = trace_layer_dims(model, example_input=x)
    assert [(d.name, d.invocations) for d in plain] == [("pre", 6), ("post", 6)]
    full = trace_layer_dims(model, example_input=x, include_attention=True)
    got = [(d.name, d.type, d.m, d.n, d.invocations, d.repeat, d.quantizable) for d in full]
    assert got == [
        ("pre", "Dense", 16, 16, 6, 1, True),
        ("attn.in_proj", "Dense", 48, 16, 6, 1, False),
        ("attn.qk_matmul", "MatMul", 6, 4, 6, 4, False),   # stores K (S x d_head), heads copies
        ("attn.av_matmul", "MatMul", 4, 6, 6, 4, False),   # stores V^T (d_head x S)
        ("attn.out_proj", "Dense", 16, 16, 6, 1, False),
        ("post", "Dense", 10, 16, 6, 1, True),
    ]


def test_cross_attention_projections():
    full = trace_layer_dims(_Attention(cross=True), example_input=torch.zeros(1, 6, 16), include_attention=True)
    got = {d.name: (d.m, d.n, d.invocations, d.repeat) for d in full}
    assert got["attn.q_proj"] == (16, 16, 6, 1)
    assert got["attn.k_proj"] == (16, 8, 3, 1)
    assert got["attn.v_proj"] == (16, 12, 3, 1)
    assert got["attn.qk_matmul"] == (3, 4, 6, 4)
    assert got["attn.av_matmul"] == (4, 3, 6, 4)


def test_torchvision_vit_rows_follow_cim_aq_attention_counting():
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=16, num_layers=1, num_heads=2,
                                               hidden_dim=16, mlp_dim=32, num_classes=10)
    rows = [(d.name.split(".")[-1], d.type, d.m, d.n, d.invocations, d.repeat)
            for d in trace_layer_dims(vit, 32, include_attention=True)]
    tokens = 2 * 2 + 1  # 4 patches + class token
    assert rows == [
        ("conv_proj", "Conv2D", 16, 3 * 16 * 16, 4, 1),
        ("in_proj", "Dense", 48, 16, tokens, 1),
        ("qk_matmul", "MatMul", tokens, 8, tokens, 2),
        ("av_matmul", "MatMul", 8, tokens, tokens, 2),
        ("out_proj", "Dense", 16, 16, tokens, 1),
        ("0", "Dense", 32, 16, tokens, 1),       # mlp.0
        ("3", "Dense", 16, 32, tokens, 1),       # mlp.3
        ("head", "Dense", 10, 16, 1, 1),         # class token only
    ]


# --------------------------------------------------------------------------- hand-computed costs
def _dims(m, n, invocations=1, repeat=1, **kw):
    return LayerDims(name="L", type=kw.pop("type", "Conv2D"), m=m, n=n, invocations=invocations, repeat=repeat, **kw)


@pytest.mark.parametrize("mapping, tiles, latency, adc_columns", [
    # m=256, n=100, I=10, w=8 (S=2), a=2 (2 cycles): cols 512 (+1 / x2), rows 100 (x2 for dr)
    ("offset", 3, 3 * 56 + (10 * 3 * 2) * 1.4, 513),               # ceil(513/256)=3
    ("differential-column", 4, 4 * 56 + (10 * 4 * 2) * 1.4, 512),  # ceil(1024/256)=4
    ("differential-row", 2, 2 * 56 + (10 * 2 * 2) * 1.4, 512),     # 2 col tiles x ceil(200/256)=1
])
def test_hand_computed_mappings(mapping, tiles, latency, adc_columns):
    hw = hw_with(mapping=mapping)
    cost = layer_cost(_dims(256, 100, 10), hw, w_bit=8, a_bit=2)
    assert (cost.slices, cost.tiles, cost.input_cycles, cost.executes) == (2, tiles, 2, 10 * tiles * 2)
    assert cost.latency == pytest.approx(latency, rel=1e-12)
    assert cost.adc_conversions == 10 * 2 * 1 * adc_columns
    table = CostModel(hw, [_dims(256, 100, 10)], max_bit=8).table
    assert table[0, 7, 1] == cost.latency


def test_hand_computed_resnet_conv_and_dr_rows():
    conv = _dims(64, 576, 3136)  # layer1 3x3 conv of resnet18
    dc = layer_cost(conv, hw_with(mapping="dc"), 8, 8)
    assert (dc.columns, dc.rows, dc.tiles, dc.executes) == (256, 576, 3, 75264)
    assert dc.latency == pytest.approx(105537.6, rel=1e-12)
    dr = layer_cost(conv, hw_with(mapping="dr"), 8, 8)
    assert (dr.columns, dr.rows, dr.tiles, dr.executes) == (128, 1152, 5, 125440)
    assert dr.latency == pytest.approx(175896.0, rel=1e-12)


def test_ragged_tiling_with_repeat():
    # 128 rows x 100 cols, 2-bit cells, 3-bit DAC; w=5 -> S=3, a=7 -> 3 cycles; 3 groups
    hw = hw_with(rows=128, cols=100, cell_bits=2, input_bits=3, mapping="differential-column")
    cost = layer_cost(_dims(30, 300, 7, repeat=3), hw, w_bit=5, a_bit=7)
    assert (cost.columns, cost.col_tiles, cost.row_tiles, cost.tiles) == (180, 2, 3, 6)
    assert (cost.arrays, cost.input_cycles, cost.executes) == (18, 3, 3 * 7 * 6 * 3)
    assert cost.adc_conversions == 3 * 7 * 3 * 3 * 90
    assert cost.latency == pytest.approx(3 * (6 * 56 + 126 * 1.4), rel=1e-12)
    assert CostModel(hw, [_dims(30, 300, 7, repeat=3)], max_bit=8).table[0, 4, 6] == cost.latency


def test_sar_adc_latency_and_adc_axis():
    dims = _dims(30, 300, 7, repeat=3)
    sar = hw_with(rows=128, cols=100, cell_bits=2, input_bits=3, adc_bits=6,
                  adc_latency_model="sar", adc_cycle_latency=0.1)
    assert layer_cost(dims, sar, 5, 7).latency == pytest.approx(3 * (336 + 126 * (1.4 + 0.6)))
    assert layer_cost(dims, sar, 5, 7, adc_bits=8).latency == pytest.approx(3 * (336 + 126 * (1.4 + 0.8)))
    table4 = CostModel(sar, [dims], max_bit=8).adc_table(8)
    assert table4.shape == (1, 8, 8, 8) and table4[0, 4, 6, 7] == layer_cost(dims, sar, 5, 7, 8).latency
    fixed = CostModel(hw_with(), [dims], max_bit=4)
    assert np.array_equal(fixed.adc_table(5), np.repeat(fixed.table[..., None], 5, axis=-1))


def test_channel_row_tiling_matches_whole_channel_tiles():
    conv = _dims(256, 256 * 9, 196, kernel_size=(3, 3), in_channels=256, out_channels=256)
    hw = hw_with(mapping="dc")
    assert layer_cost(conv, hw, 8, 8).row_tiles == 9                           # ceil(2304 / 256)
    assert layer_cost(conv, hw, 8, 8, row_tiling="channel").row_tiles == 10    # 28 channels per tile
    linear = _dims(10, 300, type="Dense")
    odd_dr = hw_with(rows=255, mapping="dr")  # 127 weight rows per array
    assert layer_cost(linear, odd_dr, 8, 8, row_tiling="channel").row_tiles == 3   # ceil(300 / 127)
    assert layer_cost(linear, odd_dr, 8, 8).row_tiles == 3                         # ceil(600 / 255)
    with pytest.raises(CostError, match="row_tiling"):
        layer_cost(conv, hw, 8, 8, row_tiling="sparse")


def test_faithful_counting_magnitude_slices_whole_channels_and_whole_pairs():
    conv = _dims(256, 256 * 9, 196, kernel_size=(3, 3), in_channels=256, out_channels=256)
    faithful = HardwareConfig(**{**BASE_HW, "row_tiling": "channel", "weight_slicing": "magnitude",
                                 "column_placement": "whole-pairs"})
    assert faithful == HardwareConfig(rows=256, cols=256, cell_bits=4, input_bits=1)  # our defaults
    cost = layer_cost(conv, faithful, 5, 4)   # 4-bit magnitudes: one 4-bit cell; 28 channels per tile
    assert (cost.slices, cost.row_tiles, cost.columns, cost.col_tiles) == (1, 10, 512, 2)
    assert cost.adc_conversions == 196 * 4 * 10 * 256
    cim_aq = layer_cost(conv, hw_with(), 5, 4)
    assert (cim_aq.slices, cim_aq.row_tiles, cim_aq.columns, cim_aq.col_tiles) == (2, 9, 1024, 4)
    # a differential pair never spans two arrays: 255 columns hold 127 pairs, not 127.5
    odd = layer_cost(_dims(254, 9), faithful.with_overrides(cols=255), 5, 4)
    dense = layer_cost(_dims(254, 9), faithful.with_overrides(cols=255, column_placement="dense"), 5, 4)
    assert (odd.columns, odd.col_tiles, dense.col_tiles) == (508, 2, 2)
    assert layer_cost(_dims(255, 9), faithful.with_overrides(cols=255), 5, 4).col_tiles == 3   # 255 pairs
    assert layer_cost(_dims(255, 9), faithful.with_overrides(cols=255, column_placement="dense"),
                      5, 4).col_tiles == 2                                                        # 510 columns
    # what the layers cannot simulate is said, never silent
    assert faithful.pricing_differences() == {}
    assert set(faithful.with_overrides(cols=255, column_placement="dense").pricing_differences()) == \
        {"column_placement"}


# --------------------------------------------------------------------------- CIM-AQ compatibility
def _cim_aq_reference_table(dims, hw_yaml: dict, max_bit: int) -> np.ndarray:
    """CIM-AQ's published formula, written out with numpy float ceil as they evaluate it."""
    cb, mapping = hw_yaml["crossbar"], hw_yaml["mapper"]["mapping_type"]
    table = np.zeros((len(dims), max_bit, max_bit))
    for i, d in enumerate(dims):
        for w in range(1, max_bit + 1):
            for a in range(1, max_bit + 1):
                cols, rows = d.m * np.ceil(w / cb["resolution_weight_bits"]), d.n
                if mapping in ("of", "offset"):
                    cols = cols + 1
                elif mapping in ("dc", "differential-column"):
                    cols = cols * 2
                else:
                    rows = rows * 2
                writes = np.ceil(cols / cb["size"]["m"]) * np.ceil(rows / cb["size"]["n"])
                executes = d.invocations * writes * np.ceil(a / cb["resolution_input_bits"])
                table[i, w - 1, a - 1] = d.repeat * (writes * cb["mvm_write_latency"]
                                                     + executes * cb["mvm_execute_latency"])
    return table


@pytest.mark.parametrize("mapping", ["of", "dc", "dr"])
def test_table_equals_cim_aq_formula(resnet18_dims, mapping):
    raw = yaml.safe_load(CIM_AQ_HW.read_text())
    raw["mapper"]["mapping_type"] = mapping
    ours = CostModel(HardwareConfig.from_dict(raw), resnet18_dims, max_bit=8).table
    assert ours.shape == (21, 8, 8) and ours.dtype == np.float64
    assert np.array_equal(ours, _cim_aq_reference_table(resnet18_dims, raw, 8))


def test_cim_aq_dims_yaml_gives_the_traced_table(resnet18_dims):
    hw = HardwareConfig.from_yaml(CIM_AQ_HW)
    from_yaml = read_layer_dims(RESNET18_DIMS)
    assert [(d.m, d.n, d.invocations, d.repeat) for d in from_yaml] == \
        [(d.m, d.n, d.invocations, d.repeat) for d in resnet18_dims]
    assert np.array_equal(CostModel(hw, from_yaml).table, CostModel(hw, resnet18_dims).table)


def test_dims_yaml_round_trip(tmp_path, resnet18_dims):
    path = write_layer_dims(resnet18_dims, tmp_path / "dims.yaml", header="resnet18")
    back = read_layer_dims(path)
    assert [(d.name, d.type, d.m, d.n, d.invocations, d.repeat) for d in back] == \
        [(d.name, d.type, d.m, d.n, d.invocations, d.repeat) for d in resnet18_dims]


@pytest.mark.parametrize("text, value", [("64*3*3", 576), (" 7 * 7 ", 49), ("112", 112)])
def test_parse_dim_products(text, value):
    assert parse_dim(text) == value
    assert parse_dim(value) == value


@pytest.mark.parametrize("bad", ["__import__('os').system('true')", "3+4", "2**10", "", "0*5", "7*", 3.5, True,
                                 -1, None])
def test_parse_dim_rejects_everything_else(bad):
    with pytest.raises(LayerDimsError, match="input_dim"):
        parse_dim(bad, "layer_dimensions[2] input_dim")


def test_dims_yaml_errors_name_the_entry(tmp_path):
    def load(entries):
        path = tmp_path / "d.yaml"
        path.write_text(yaml.safe_dump({"layer_dimensions": entries}))
        return read_layer_dims(path)

    assert load([{"output_dim": 10, "input_dim": "4*4"}])[0].type == "Dense"   # CIM-AQ defaults
    with pytest.raises(LayerDimsError, match=r"layer_dimensions\[1\] input_dim: '64\*C'"):
        load([{"output_dim": 1, "input_dim": 1}, {"type": "Conv2D", "output_dim": 8, "input_dim": "64*C"}])
    with pytest.raises(LayerDimsError, match=r"unknown key\(s\) \['kernel'\]"):
        load([{"output_dim": 1, "input_dim": 1, "kernel": 3}])
    with pytest.raises(LayerDimsError, match="missing key 'input_dim'"):
        load([{"output_dim": 1}])
    with pytest.raises(LayerDimsError, match="type='Pool'"):
        load([{"type": "Pool", "output_dim": 1, "input_dim": 1}])
    with pytest.raises(LayerDimsError, match="does not exist"):
        read_layer_dims(tmp_path / "missing.yaml")


# --------------------------------------------------------------------------- policies
@pytest.fixture(scope="module")
def resnet_cost(resnet18_dims):
    return CostModel(HardwareConfig.from_yaml(CIM_AQ_HW), resnet18_dims, max_bit=8)


def test_policy_cost_totals(resnet_cost):
    n = len(resnet_cost)
    uniform = resnet_cost.policy_cost(Policy.uniform(resnet_cost.layer_names, 8, 8))
    assert uniform.ratio == 1.0
    assert uniform.total_latency == pytest.approx(resnet_cost.table[:, 7, 7].sum(), rel=1e-12)
    rng = np.random.default_rng(0)
    bits = rng.integers(1, 9, size=(n, 2))
    cost = resnet_cost.policy_cost(bits)
    expected = sum(resnet_cost.table[i, w - 1, a - 1] for i, (w, a) in enumerate(bits))
    assert cost.total_latency == pytest.approx(expected, rel=1e-12)
    assert cost.ratio == pytest.approx(expected / resnet_cost.table[:, 7, 7].sum(), rel=1e-12)
    assert [c.latency for c in cost.per_layer] == [resnet_cost.latency(i, w, a) for i, (w, a) in enumerate(bits)]
    for key in ("arrays", "executes", "adc_conversions"):
        total = getattr(cost, key)
        assert isinstance(total, int) and total == sum(getattr(c, key) for c in cost.per_layer)


def test_baseline_above_max_bit_is_priced(resnet18_dims):
    hw = HardwareConfig.from_yaml(CIM_AQ_HW)
    small = CostModel(hw, resnet18_dims, max_bit=4)           # table stops at 4 bits
    full = CostModel(hw, resnet18_dims, max_bit=8)
    cost = small.policy_cost([(4, 4)] * len(small))         # default baseline 8/8
    assert cost.baseline_latency == pytest.approx(full.table[:, 7, 7].sum(), rel=1e-12)
    assert 0 < cost.ratio < 1
    assert small.policy_cost([(4, 4)] * len(small), baseline_bits=(16, 16)).ratio < cost.ratio


def test_policy_errors(resnet_cost, tmp_path):
    n = len(resnet_cost)
    with pytest.raises(PolicyError, match=f"policy has {n - 1} layers but the cost model has {n}"):
        resnet_cost.policy_cost([(8, 8)] * (n - 1))
    with pytest.raises(PolicyError, match=r"layer 3 \(layer1.1.conv1\): a_bit=9 is outside 1..8"):
        resnet_cost.policy_cost([(8, 8)] * 3 + [(8, 9)] + [(8, 8)] * (n - 4))
    with pytest.raises(PolicyError, match="w_bit=0"):
        resnet_cost.policy_cost([(0, 8)] * n)
    wrong = Policy.uniform(["x"] + resnet_cost.layer_names[1:], 8, 8)
    with pytest.raises(PolicyError, match="policy layer 0 is 'x'"):
        resnet_cost.policy_cost(wrong)
    with pytest.raises(CostError, match="baseline_bits"):
        resnet_cost.policy_cost([(8, 8)] * n, baseline_bits=(0, 8))


def test_policy_with_adc_bits_counts_conversions(resnet_cost):
    n = len(resnet_cost)
    cost = resnet_cost.policy_cost(np.array([[4, 4, 5]] * n))
    assert all(c.adc_bits == 5 for c in cost.per_layer)
    fc = cost.per_layer[-1]  # 1000 outputs, S=1 (4-bit cells), dc: 2000 cols -> 8 tiles; 512 rows -> 2
    assert (fc.tiles, fc.executes, fc.adc_conversions) == (16, 16 * 4, 4 * 2 * 1000)


# --------------------------------------------------------------------------- CLI
def _report_rows(stdout: str) -> tuple[list[float], float]:
    """Per-layer latency column and the total of the CLI's layer report."""
    rows = [float(line.split()[-1]) for line in stdout.splitlines() if re.match(r"\s*\d+\s+\S+\s+(Conv2D|Dense)", line)]
    total = float(re.search(r"total @8/8: ([\d.]+) µs", stdout).group(1))
    return rows, total


def test_cli_with_layer_dims_and_policy(tmp_path, resnet_cost):
    n = len(resnet_cost)
    bits = np.array([[8, 8]] + [[4, 6]] * (n - 2) + [[8, 8]])
    np.save(tmp_path / "policy.npy", bits)
    out, report_json = tmp_path / "table.npy", tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, "-m", "lib.simulator.latency", "--layer-dims", str(RESNET18_DIMS), "--hardware",
         str(CIM_AQ_HW), "--max-bit", "8", "--output", str(out), "--policy", str(tmp_path / "policy.npy"),
         "--json", str(report_json)],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    table = np.load(out)
    assert np.array_equal(table, resnet_cost.table)
    rows, total = _report_rows(result.stdout)
    assert rows == pytest.approx(table[:, 7, 7].tolist(), abs=1e-3)
    assert total == pytest.approx(table[:, 7, 7].sum(), abs=1e-3)
    report = json.loads(report_json.read_text())
    expected = sum(table[i, w - 1, a - 1] for i, (w, a) in enumerate(bits))
    assert report["policy"]["total_latency_us"] == pytest.approx(expected, rel=1e-12)
    assert report["policy"]["ratio"] == pytest.approx(expected / table[:, 7, 7].sum(), rel=1e-12)
    match = re.search(r"total: ([\d.]+) µs \| baseline 8/8: ([\d.]+) µs \| ratio ([\d.]+)", result.stdout)
    assert float(match.group(1)) == pytest.approx(expected, abs=1e-3)
    assert float(match.group(3)) == pytest.approx(report["policy"]["ratio"], abs=1e-6)


def test_cli_traces_registry_model(tmp_path, resnet_cost):
    out = tmp_path / "t.npy"
    result = subprocess.run(
        [sys.executable, "-m", "lib.simulator.latency", "--arch", "resnet18", "--num-classes", str(NUM_CLASSES),
         "--input-size", "224", "--hardware", str(CIM_AQ_HW), "--max-bit", "8", "--output", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert np.array_equal(np.load(out), resnet_cost.table)
    rows, total = _report_rows(result.stdout)
    assert rows == pytest.approx(resnet_cost.table[:, 7, 7].tolist(), abs=1e-3)
    assert "layer2.0.downsample.0" in result.stdout


def test_cli_errors(tmp_path, capsys):
    def run(*argv):
        code = cli_main(["--hardware", str(CIM_AQ_HW), *argv])
        return code, capsys.readouterr().err

    np.save(tmp_path / "short.npy", np.array([[8, 8]] * 3))
    code, err = run("--layer-dims", str(RESNET18_DIMS), "--policy", str(tmp_path / "short.npy"))
    assert code == 2 and "policy has 3 layers but the cost model has 21" in err
    np.save(tmp_path / "wide.npy", np.array([[8, 8]] * 20 + [[12, 8]]))
    code, err = run("--layer-dims", str(RESNET18_DIMS), "--policy", str(tmp_path / "wide.npy"))
    assert code == 2 and "w_bit=12 is outside 1..8" in err
    code, err = run("--layer-dims", str(RESNET18_DIMS), "--max-bit", "0")
    assert code == 2 and "max_bit=0" in err
    code, err = run()
    assert code == 2 and "--arch" in err


def test_cli_unknown_arch(capsys):
    code = cli_main(["--hardware", str(CIM_AQ_HW), "--arch", "resnet_nonexistent"])
    err = capsys.readouterr().err
    assert code == 2 and "unknown model 'resnet_nonexistent'" in err and "Traceback" not in err
