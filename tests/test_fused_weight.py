"""The fused weight path (lib.cim.fused_weight) against the composed one (Brevitas' weight
quantizer, value / scale, slicing): the same crossbar form, layer outputs and gradients for every
mapping, cell width, weight granularity, weight slicing and a few weight widths, eager and
Inductor-compiled; and the same parameters after real training steps."""
from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from route_cases import ROUTES
from runtime_support import set_runtime
from lib.cim import calibrate, crossbar_adc, tile_products
from lib.cim.runtime import RUNTIME
from lib.cim.fused_weight import FusedWeights
from lib.cim.hardware import HardwareConfig
from lib.cim.layers import CIMConv2d, CIMLinear, ComposedWeights
from lib.cim.quantizers import int_threshold
from lib.cim.scratch import scratch_buffers

MAPPINGS = ["offset", "differential-column", "differential-row"]
GRANULARITIES = ["layer", "channel", "array", "column"]
W_BITS = (2, 5, 8)


def _hw(**kw) -> HardwareConfig:
    base = dict(rows=32, cols=64, cell_bits=2, adc_bits=6, mapping="differential-column",
                weight_granularity="column", psum_granularity="column", input_mode="multi-bit")
    base.update(kw)
    return HardwareConfig(**base)


def _slicings(mapping: str) -> list:
    return ["full-range"] if mapping == "offset" else ["magnitude", "full-range"]


def _layer(kind: str, hw: HardwareConfig, w_bit: int, seed: int):
    """A calibrated, training-mode CIM layer and an input: a grouped, strided conv over several
    row-tiles (a ragged last one but on differential-row, which halves the rows), or a linear
    layer with a ragged last row-tile."""
    torch.manual_seed(seed)
    if kind == "conv":
        layer = CIMConv2d(10, 4, 3, stride=2, padding=1, groups=2, hw=hw, w_bit=w_bit, a_bit=4)
        x = torch.randn(2, 10, 6, 6)
        assert layer.layout.tiles >= 2
    else:
        layer = CIMLinear(70, 5, hw=hw, w_bit=w_bit, a_bit=4)
        x = torch.randn(3, 70)
        assert layer.layout.pad > 0 and layer.layout.tiles >= 3
    calibrate(layer, [x])
    layer.train()
    return layer, x


def _layers(hw: HardwareConfig, w_bit: int, seed: int):
    return [_layer(kind, hw, w_bit, seed) for kind in ("conv", "linear")]


def _outputs_and_grads(layer, x, fused: bool):
    layer.fused_weights = fused
    params = [layer.weight, layer.bias, layer.weight_step_module.step, layer.input_step_module.step,
              layer.psum_adc.step]
    out = layer(x)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    return out.detach(), torch.autograd.grad((out * weights).sum(), params, allow_unused=True)


def _assert_same(layer, x):
    """Crossbar form, outputs and every gradient equal with and without the fused weight path."""
    tiles = layer.tile.tiles()
    fused = FusedWeights(layer)
    carrier, grid_f, stored_f = fused.crossbar(tiles)
    q_c, grid_c, stored_c = ComposedWeights(layer, layer.quant_weight()).crossbar(tiles)
    q_f = fused.levels()
    assert torch.equal(q_f, q_f.round()) and torch.allclose(q_f, q_c, rtol=0, atol=1e-4)
    assert carrier.shape == q_c.shape and carrier.requires_grad and carrier.stride() == (0,) * carrier.dim()
    assert stored_f.dtype == layer.plan.slicing.storage_dtype
    assert torch.equal(stored_f.to(stored_c.dtype), stored_c) and torch.equal(grid_f, grid_c)
    out_c, grads_c = _outputs_and_grads(layer, x, fused=False)
    out_f, grads_f = _outputs_and_grads(layer, x, fused=True)
    assert torch.allclose(out_f, out_c, rtol=1e-6, atol=1e-6 * out_c.abs().max().item())
    for g_c, g_f in zip(grads_c, grads_f):
        assert (g_c is None) == (g_f is None)  # None: the ADC step when the ADC is off
        if g_c is None:
            continue
        assert torch.allclose(g_f, g_c, rtol=1e-3, atol=1e-5 * g_c.abs().max().item()), (g_f - g_c).abs().max()


CASES = list(itertools.product(MAPPINGS, [1, 2, 4], GRANULARITIES, ["0", "1"]))


@pytest.mark.parametrize("mapping,cell_bits,granularity,compile_mode", CASES)
def test_fused_weight_path_equals_the_composed_path(mapping, cell_bits, granularity, compile_mode, monkeypatch):
    """Every mapping × cell width × weight granularity × weight slicing × w_bit in {2, 5, 8},
    eager (0) and compiled (1), on a conv (groups, stride, ragged tile) and a linear layer in turn."""
    set_runtime(monkeypatch, compile=compile_mode)
    for index, (slicing, w_bit) in enumerate(itertools.product(_slicings(mapping), W_BITS)):
        hw = _hw(mapping=mapping, cell_bits=cell_bits, weight_granularity=granularity, weight_slicing=slicing)
        layer, x = _layer(("conv", "linear")[(index + cell_bits) % 2], hw, w_bit, seed=w_bit)
        with scratch_buffers():
            _assert_same(layer, x)
    assert not RUNTIME.failed


# the training routes of the shared list (tests/route_cases.py), each with the fused and the composed weights
TRAINING_ROUTES = {(tuple(sorted(case.hw.items())), tuple(sorted(case.attributes.items())))
                   for case in ROUTES if case.mode == "train" and "mapping" not in case.hw
                   and "fused_weights" not in case.attributes}


@pytest.mark.parametrize("mapping", MAPPINGS)
@pytest.mark.parametrize("compile_mode", ["0", "1"])
def test_every_crossbar_route_takes_the_same_values(mapping, compile_mode, monkeypatch):
    """Every training route of ROUTES (the one-node crossbar+ADC, products then ADC, bit-serial
    inputs, the ADC off, the crossbar path with the ADC off...) with 1-bit and 6-bit weights: the
    fused weight path gives the composed path's values and gradients."""
    set_runtime(monkeypatch, compile=compile_mode)
    variants = [(dict(hw), dict(attributes)) for hw, attributes in sorted(TRAINING_ROUTES)]
    assert len(variants) >= 5
    for hw_overrides, attributes in variants:
        for w_bit in (1, 6):
            for layer, x in _layers(_hw(mapping=mapping, **hw_overrides), w_bit, seed=3):
                for name, value in attributes.items():
                    setattr(layer, name, value)
                _assert_same(layer, x)


def _tiny_model(hw: HardwareConfig) -> nn.Module:
    return nn.Sequential(CIMConv2d(3, 8, 3, padding=1, hw=hw, w_bit=4, a_bit=4), nn.ReLU(),
                         CIMConv2d(8, 8, 3, stride=2, hw=hw, w_bit=3, a_bit=4, input_signed=False),
                         nn.ReLU(), nn.Flatten(),
                         CIMLinear(8 * 3 * 3, 4, hw=hw, w_bit=5, a_bit=4, input_signed=False))


@pytest.mark.parametrize("compile_mode", ["0", "1"])
def test_training_steps_with_the_fused_path_equal_the_composed_ones(compile_mode, monkeypatch):
    """Three SGD (momentum) steps of a tiny CIM model, from the same calibrated state: the same
    loss at every step and the same parameters after, with and without the fused weight path."""
    set_runtime(monkeypatch, compile=compile_mode)
    hw = _hw(mapping="offset", weight_granularity="channel", adc_bits=7)
    torch.manual_seed(0)
    data = [(torch.randn(4, 3, 8, 8), torch.randint(0, 4, (4,))) for _ in range(3)]
    reference = _tiny_model(hw)
    calibrate(reference, [images for images, _ in data])
    runs = []
    for fused in (False, True):
        model = _tiny_model(hw)
        model.load_state_dict(reference.state_dict())
        for module in model.modules():
            if hasattr(module, "fused_weights"):
                module.fused_weights = fused
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        losses = []
        with scratch_buffers():
            for images, labels in data:
                optimizer.zero_grad()
                loss = nn.functional.cross_entropy(model(images), labels)
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
        runs.append((losses, model.state_dict()))
    (losses_c, state_c), (losses_f, state_f) = runs
    assert losses_f == pytest.approx(losses_c, rel=1e-5)
    for key, value in state_c.items():
        assert torch.allclose(state_f[key], value, rtol=1e-4, atol=1e-6), key


def test_training_skips_brevitas_weight_quantizer_and_its_accessors_still_work():
    """In training the weight side comes from the fused kernels (Brevitas' weight quantizer is not
    run); quant_weight() still answers, with the levels · step the fused path used; evaluation
    (cached crossbar form) gives the training forward's values on the same weights."""
    torch.manual_seed(1)
    hw = _hw(mapping="differential-row", adc_bits=8)
    layer = CIMConv2d(6, 4, 3, padding=1, hw=hw, w_bit=5, a_bit=4)
    x = torch.randn(2, 6, 6, 6)
    calibrate(layer, [x])
    calls = []
    layer.weight_quant.register_forward_hook(lambda *args: calls.append(1))
    layer.train()
    train_out = layer(x)
    assert calls == []
    fused = FusedWeights(layer)
    assert torch.allclose(layer.quant_weight().value, fused.value, rtol=1e-6, atol=0)
    assert len(calls) == 1
    layer.psum_adc.n_sigma = None  # eval reads the same ADC (no clipping in either)
    layer.eval()
    with torch.no_grad():
        eval_out = layer(x)
        again = layer(x)
    assert torch.allclose(eval_out, train_out.detach(), rtol=1e-6, atol=1e-6 * eval_out.abs().max().item())
    assert torch.equal(again, eval_out) and layer.eval_cache.hits >= 1


@pytest.mark.parametrize("mapping", ["offset", "differential-column"])
def test_compact_array_weight_widened_tile_by_tile_gives_the_same_values(mapping, monkeypatch):
    """The fused path stores cell values as small integers and widens them to float in blocks of
    row-tiles for the linear products and their input gradient: with one tile per block, the same
    outputs and gradients as the composed (float) path, kept and chunked partial sums alike."""
    monkeypatch.setattr(tile_products, "FLOAT_BLOCK_BYTES", 1)
    for chunk_bytes in (crossbar_adc.PARTIAL_SUM_CHUNK_BYTES, 64):
        monkeypatch.setattr(crossbar_adc, "PARTIAL_SUM_CHUNK_BYTES", chunk_bytes)
        layer, x = _layer("linear", _hw(mapping=mapping, cell_bits=4), w_bit=6, seed=5)
        assert len(tile_products.tile_blocks(FusedWeights(layer).crossbar(layer.tile.tiles())[2], x)) == layer.layout.tiles
        with scratch_buffers():
            _assert_same(layer, x)


@pytest.mark.parametrize("mapping", MAPPINGS)
def test_cached_thresholds_equal_what_brevitas_scaling_returns(mapping):
    """The LSQ thresholds the fused paths read without calling Brevitas' modules: the same 0-d
    tensors its IntScaling returns, for weights (narrow grid or not) and signed or unsigned
    inputs, at the bits set first and after a change; with a hook on the scaling module, the
    module itself is called."""
    for signed in (True, False):
        layer = CIMConv2d(6, 4, 3, hw=_hw(mapping=mapping), w_bit=5, a_bit=4, input_signed=signed)
        for w_bit, a_bit in ((5, 4), (3, 7)):
            layer.set_bits(w_bit, a_bit)
            for tensor_quant in (layer.weight_quant.tensor_quant,
                                 layer.input_quant.fused_activation_quant_proxy.tensor_quant):
                expected = tensor_quant.int_scaling_impl(tensor_quant.msb_clamp_bit_width_impl())
                got = int_threshold(tensor_quant)
                assert got.dtype == expected.dtype and got.shape == expected.shape and torch.equal(got, expected)
    calls = []
    scaling = layer.weight_quant.tensor_quant.int_scaling_impl
    handle = scaling.register_forward_hook(lambda *args: calls.append(args))
    int_threshold(layer.weight_quant.tensor_quant)
    handle.remove()
    assert len(calls) == 1
