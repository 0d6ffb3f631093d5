"""Partial sums on int8 kernels (lib.cim.integer_products) against the float32 products: the
same partial sums (exact integers times the step), the same layer outputs and gradients for every
mapping, input signedness, input mode, conv shape and linear tiling (kept and chunked partial
sums); chosen only when the codes fit in 8 bits; kept prepacked in evaluation without mixing with
the float form."""
from __future__ import annotations

import copy
import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lib.cim import calibrate, crossbar_adc
from lib.cim.crossbar import CrossbarPlan
from lib.cim.hardware import HardwareConfig
from lib.cim.integer_products import InputGrid, grid_codes, integer_kernels_here, sums_stay_exact
from lib.cim.runtime import RUNTIME
from lib.cim.layers import CIMConv2d, CIMLinear
from lib.cim.scratch import scratch_buffers
from lib.cim.tile_products import crossbar_weight

pytestmark = pytest.mark.skipif(not integer_kernels_here(),
                                reason="this CPU has no VNNI/AMX int8 convolution")

MAPPINGS = ["offset", "differential-column", "differential-row"]


def _hw(**kw) -> HardwareConfig:
    base = dict(rows=40, cols=64, cell_bits=2, input_bits=2, adc_bits=5, mapping="differential-column",
                weight_granularity="column", psum_granularity="column", input_mode="multi-bit")
    base.update(kw)
    return HardwareConfig(**base)


def _grid(layer, quant):
    """The layer's integer input grid for a quantized input (Brevitas' QuantTensor)."""
    return layer.tile.input_grid(quant.value, quant.scale, layer.input_planes, layer.route_for(quant.value))


def _conv(hw, signed: bool, shape: dict, seed: int = 0):
    torch.manual_seed(seed)
    layer = CIMConv2d(12, 6, 3, hw=hw, w_bit=5, a_bit=6, input_signed=signed, **shape)
    x = torch.randn(3, 12, 7, 7) if signed else torch.rand(3, 12, 7, 7)
    calibrate(layer, [x])
    return layer, x


SHAPES = [dict(padding=1), dict(stride=2, padding=1, groups=2), dict(dilation=2, padding=2),
          dict(padding=1, padding_mode="reflect"), dict(padding=1, groups=6), dict(stride=2, groups=3)]


def _linear(hw, signed: bool, seed: int = 0):
    """A linear layer with a ragged last row-tile, on tokens with a leading dim."""
    torch.manual_seed(seed)
    layer = CIMLinear(70, 5, hw=hw, w_bit=5, a_bit=6, input_signed=signed)
    x = torch.randn(3, 2, 70) if signed else torch.rand(3, 2, 70)
    calibrate(layer, [x])
    assert layer.layout.pad > 0
    return layer, x


@pytest.mark.parametrize("signed", [True, False])
def test_integer_linear_partial_sums_are_the_exact_integers_times_the_step(signed):
    """Per-tile int8 matmuls (codes shifted into int8, the shift added back through column sums)
    = float64 products of the integer codes, times the step, to one float32 rounding."""
    layer, x = _linear(_hw(), signed)
    quant = layer.input_quant(x.reshape(-1, 70))
    grid = _grid(layer, quant)
    assert grid is not None and grid.zero_point == (128 if signed else 0)
    tiles = layer.tile.tiles(grid)
    xt = tiles.tile_input(quant.value)
    q = torch.round(layer.quant_weight().value / layer.quant_weight().scale)
    w = crossbar_weight(q, tiles, layer.plan)
    codes = torch.round(xt / grid.step).double()
    exact = (torch.bmm(codes, w.double()) * grid.step).transpose(0, 1)
    ulp = torch.finfo(torch.float32).eps * exact.abs().max().item()
    for weight in (w, tiles.packed(w)):
        got = tiles.products(xt, weight)
        assert got.shape == exact.shape and (got.double() - exact).abs().max() <= ulp


@pytest.mark.parametrize("rows,signed", list(itertools.product([40, 20, 9], [True, False])))
def test_integer_partial_sums_are_the_exact_integers_times_the_step(rows, signed):
    """tiles.products on int8 kernels = float64 conv of the integer codes, times the step, to one
    float32 rounding; the float32 conv is no closer. Arrays of 4, 2 and 1 input channels (narrow
    conv groups, where oneDNN mishandles an input zero point), signed and unsigned inputs."""
    layer, x = _conv(_hw(rows=rows), signed=signed, shape=dict(padding=1, groups=2))
    assert layer.layout.channels_per_tile == rows // 9
    quant = layer.input_quant(x)
    grid = _grid(layer, quant)
    assert grid == InputGrid(float(quant.scale.detach()), 128 if signed else 0)
    tiles = layer.tile.tiles(grid)
    x_tiled = tiles.tile_input(quant.value)
    q = torch.round(layer.quant_weight().value / layer.quant_weight().scale)
    w = crossbar_weight(q, tiles, layer.plan)
    got = tiles.products(x_tiled, w)
    float_path = layer.tile.tiles().products(x_tiled, w)
    codes = torch.round(x_tiled / grid.step).double()
    exact = F.conv2d(codes, w.double(), None, tiles.stride, tiles.padding, tiles.dilation, tiles.arrays)
    exact = (exact * grid.step).permute(0, 2, 3, 1)
    ulp = torch.finfo(torch.float32).eps * exact.abs().max().item()
    assert (got.double() - exact).abs().max() <= ulp
    assert (got.double() - exact).abs().max() <= (float_path.double() - exact).abs().max()


def _assert_same_with_and_without_integer_products(layer, x):
    """A training-mode forward and backward with integer products on and off: the same outputs
    and the same gradients of the input and of every learned parameter."""
    layer.train()
    params = [layer.weight, layer.bias, layer.weight_step_module.step, layer.input_step_module.step,
              layer.psum_adc.step]
    results = []
    for enabled in (True, False):
        with RUNTIME.use(integer_products=enabled), scratch_buffers():
            xg = x.clone().requires_grad_()
            out = layer(xg)
            weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
            results.append((out.detach(), torch.autograd.grad((out * weights).sum(), [xg] + params)))
    (out_i, grads_i), (out_f, grads_f) = results
    assert torch.allclose(out_i, out_f, rtol=0, atol=1e-5 * out_f.abs().max().item()), (out_i - out_f).abs().max()
    for got, want in zip(grads_i, grads_f):
        assert torch.allclose(got, want, rtol=1e-3, atol=1e-4 * want.abs().max().item())


@pytest.mark.parametrize("mapping,signed,mode", list(itertools.product(MAPPINGS, [True, False],
                                                                      ["multi-bit", "bit-serial"])))
def test_layer_outputs_and_gradients_match_the_float_products(mapping, signed, mode):
    """Training-mode forward and backward with integer products on and off, for every conv shape
    (padding, stride, groups, dilation, a padding mode): the same outputs and gradients."""
    for index, shape in enumerate(SHAPES):
        layer, x = _conv(_hw(mapping=mapping, input_mode=mode), signed, shape, seed=index)
        assert _grid(layer, layer.input_quant(x)) is not None
        _assert_same_with_and_without_integer_products(layer, x)


@pytest.mark.parametrize("mapping,signed,mode", list(itertools.product(MAPPINGS, [True, False],
                                                                      ["multi-bit", "bit-serial"])))
def test_linear_outputs_and_gradients_match_the_float_products(mapping, signed, mode, monkeypatch):
    """The same for a linear layer, with partial sums kept for the backward and made in chunks
    (recomputed in the backward on the same int8 kernels)."""
    for chunk_bytes in (crossbar_adc.PARTIAL_SUM_CHUNK_BYTES, 256):
        monkeypatch.setattr(crossbar_adc, "PARTIAL_SUM_CHUNK_BYTES", chunk_bytes)
        layer, x = _linear(_hw(mapping=mapping, input_mode=mode), signed)
        _assert_same_with_and_without_integer_products(layer, x)


def test_integer_products_only_where_the_codes_fit_in_8_bits():
    """9-bit multi-bit inputs, 8-bit signed DAC digits and 8-bit cells take the float32 conv."""
    plan = CrossbarPlan(_hw(), 1, 8, 4, 9, w_bit=5, a_bit=8, input_signed=True)
    assert plan.input_codes(1) == (-128, 127) and plan.input_zero_point(1) == 128
    unsigned = CrossbarPlan(_hw(), 1, 8, 4, 9, w_bit=5, a_bit=8, input_signed=False)
    assert unsigned.input_codes(1) == (0, 255) and unsigned.input_zero_point(1) == 0
    assert CrossbarPlan(_hw(), 1, 8, 4, 9, w_bit=5, a_bit=9, input_signed=False).input_zero_point(1) is None
    serial = CrossbarPlan(_hw(input_bits=8), 1, 8, 4, 9, w_bit=5, a_bit=16, input_signed=True)
    assert serial.input_codes(2) == (-128, 255) and serial.input_zero_point(2) is None
    cases = [(_hw(), dict(a_bit=9, input_signed=False)), (_hw(cell_bits=8), dict(w_bit=9)),
             (_hw(input_mode="bit-serial", input_bits=8), dict(a_bit=12))]
    for hw, bits in cases:
        layer = CIMConv2d(4, 4, 3, hw=hw, **bits)
        x = torch.rand(1, 4, 5, 5)
        calibrate(layer, [x])
        assert _grid(layer, layer.input_quant(x)) is None
    layer, x = _conv(_hw(), signed=True, shape={})
    with RUNTIME.use(integer_products=False):
        assert _grid(layer, layer.input_quant(x)) is None
    assert _grid(layer, layer.input_quant(x)) is not None


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_eval_keeps_the_prepacked_weight_apart_from_the_float_form(kind):
    """In evaluation the int8-packed array weight is kept; switching integer products off and on
    between forwards serves each path its own form, with the same outputs."""
    layer, x = _conv(_hw(), signed=False, shape=dict(padding=1)) if kind == "conv" else _linear(_hw(), False)
    layer.eval()
    with torch.no_grad():
        first = layer(x)
        misses = layer.eval_cache.misses
        assert torch.equal(layer(x), first) and layer.eval_cache.misses == misses
        with RUNTIME.use(integer_products=False):
            float_out = layer(x)
        again = layer(x)
    assert torch.equal(again, first)
    assert torch.allclose(float_out, first, rtol=0, atol=1e-5 * first.abs().max().item())


def test_arrays_too_tall_for_exact_sums_keep_the_float_products():
    """Codes are shifted into 8 bits, so a kernel sums up to 255 · cell · rows: arrays where that
    could reach 2^24 (here 1100 rows of 7-bit cells) take the float32 products."""
    tall = _hw(rows=1100, cols=256, cell_bits=7)
    cases = [(CIMConv2d(64, 4, 3, padding=1, hw=tall, w_bit=8, a_bit=8), torch.randn(1, 64, 4, 4)),
             (CIMLinear(600, 4, hw=tall, w_bit=8, a_bit=8, input_signed=False), torch.rand(2, 600))]
    for layer, x in cases:
        calibrate(layer, [x])
        assert not sums_stay_exact(layer.layout.channels_per_tile * layer.layout.kernel_elems, 127)
        assert _grid(layer, layer.input_quant(x)) is None
    short = CIMLinear(600, 4, hw=_hw(rows=400, cols=256, cell_bits=7), w_bit=8, a_bit=8, input_signed=False)
    calibrate(short, [cases[1][1]])
    assert _grid(short, short.input_quant(cases[1][1])) is not None
    assert sums_stay_exact(256, 15) and not sums_stay_exact(4400, 15)


def test_input_gradient_through_a_frozen_layer_in_eval():
    """Eval mode, every parameter frozen, an input that needs its gradient (saliency, attacks):
    the kept prepacked form serves the forward and its int8 cells the backward, with the same
    input gradient as float32 products."""
    layer, x = _conv(_hw(), signed=True, shape=dict(padding=1))
    layer.eval()
    for parameter in layer.parameters():
        parameter.requires_grad_(False)
    grads = []
    for enabled in (True, False):
        with RUNTIME.use(integer_products=enabled):
            xg = x.clone().requires_grad_()
            layer(xg).square().sum().backward()
            grads.append(xg.grad)
    assert len(layer.eval_cache) > 0
    assert torch.allclose(grads[0], grads[1], rtol=1e-3, atol=1e-4 * grads[1].abs().max().item())


def test_kernels_that_saturate_turn_integer_products_off():
    """oneDNN capped below VNNI (ONEDNN_MAX_CPU_ISA=AVX2) saturates 8-bit × 7-bit products: the
    one-time check at start-up sees it and the process keeps float32 products (a real process)."""
    code = ("import torch; from lib.cim.integer_products import integer_kernels_here; "
            "print(integer_kernels_here())")
    outputs = {}
    for isa in ("AVX2", "ALL"):
        env = dict(os.environ, ONEDNN_MAX_CPU_ISA=isa, CIM_AQ_COMPILE="0")
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parents[1], timeout=300)
        assert done.returncode == 0, done.stderr[-500:]
        outputs[isa] = done.stdout.strip().splitlines()[-1]
    assert outputs == {"AVX2": "False", "ALL": "True"}


@pytest.mark.parametrize("signed", [True, False])
def test_eval_codes_from_the_input_give_the_float_quantized_inputs_outputs(signed):
    """An evaluation forward takes the input's uint8 codes straight from the input (no float
    fake-quantized copy) for every conv shape with zero padding, channels_last inputs and ragged
    tiles included: outputs bit for bit those of the same layer quantizing its input as floats
    (Brevitas' proxy chain, which never takes the codes path)."""
    ragged = 0
    for index, shape in enumerate(SHAPES):
        layer, x = _conv(_hw(rows=50), signed, shape, seed=index)
        ragged += layer.layout.pad > 0
        layer.eval()
        floats = copy.deepcopy(layer)
        floats.input_quant.cache_inference_quant_act = True  # not the plain quantizer: the float path
        with torch.no_grad():
            for inp in (x, x.contiguous(memory_format=torch.channels_last)):
                coded = layer._input_codes(inp)
                assert (coded is not None) == (shape.get("padding_mode", "zeros") == "zeros")
                assert floats._input_codes(inp) is None
                if coded is not None:
                    codes, grid, scale = coded
                    quantized = layer.input_quant(inp)
                    assert codes.dtype == torch.uint8
                    assert torch.equal(codes.float(), torch.round(quantized.value / scale) + grid.zero_point)
                assert torch.equal(layer(inp), floats(inp))
    assert ragged >= 3
    for bits in (None, 5):  # the grid kept between forwards follows a new step, and new bits
        if bits is None:
            with torch.no_grad():
                layer.input_step_module.step.mul_(1.7)
        else:
            layer.set_bits(layer.w_bit, bits)
            calibrate(layer, [x])
            layer.eval()
        floats = copy.deepcopy(layer)
        floats.input_quant.cache_inference_quant_act = True
        with torch.no_grad():
            _, grid, scale = layer._input_codes(x)
            assert torch.equal(scale.reshape(()), layer.input_step()) and grid.step == float(scale)
            assert torch.equal(layer(x), floats(x))
    layer.train()
    with torch.no_grad():
        assert layer._input_codes(x) is None  # training (statistics, step fits): the float path
    layer.eval()
    assert layer._input_codes(x) is None  # autograd recording: the float path


def _epilogue_case(mapping: str, mode: str, granularity: str, adc_bits: int, seed: int = 0):
    """An eval-mode conv on unsigned inputs (stride, groups, a ragged row-tile) and its input."""
    hw = _hw(mapping=mapping, input_mode=mode, psum_granularity=granularity, adc_bits=adc_bits)
    torch.manual_seed(seed)
    layer = CIMConv2d(12, 6, 3, stride=2, padding=1, groups=2, hw=hw, w_bit=5, a_bit=6, input_signed=False)
    x = torch.rand(5, 12, 9, 9)
    calibrate(layer, [x])
    layer.eval()
    return layer, x


def _converts_in_epilogue(layer, x) -> bool:
    grid = _grid(layer, layer.input_quant(x))
    return grid is not None and layer.tile.tiles(grid).levels_in_epilogue(*layer.psum_adc.grid_range())


@pytest.mark.parametrize("mapping,mode,granularity", list(itertools.product(
    MAPPINGS, ["multi-bit", "bit-serial"], ["layer", "array", "column"])))
def test_evaluation_converts_in_the_conv_epilogue_with_the_same_outputs(mapping, mode, granularity, monkeypatch):
    """Without autograd, a conv of unsigned codes converts its partial sums to ADC levels inside the
    int8 conv (8-bit levels, not float32 sums): the same outputs, bit for bit, as the forward that
    keeps the float32 partial sums for a backward; kept and in chunks."""
    for chunk_bytes in (crossbar_adc.PARTIAL_SUM_CHUNK_BYTES, 256):
        monkeypatch.setattr(crossbar_adc, "PARTIAL_SUM_CHUNK_BYTES", chunk_bytes)
        layer, x = _epilogue_case(mapping, mode, granularity, adc_bits=5)
        assert _converts_in_epilogue(layer, x)
        with torch.no_grad():
            levels_path = layer(x)
        float_sums_path = layer(x.clone().requires_grad_()).detach()
        assert torch.equal(levels_path, float_sums_path)


def test_wide_adc_ranges_and_signed_inputs_keep_the_float32_conversion():
    """9-bit ADC levels fit no 8-bit dtype, and shifted (signed) codes need the integer bias: both
    convert float32 partial sums, with the outputs of the autograd forward."""
    layer, x = _epilogue_case("differential-column", "multi-bit", "column", adc_bits=9)
    assert not _converts_in_epilogue(layer, x)
    signed, xs = _conv(_hw(), signed=True, shape=dict(padding=1))
    signed.eval()
    assert not _converts_in_epilogue(signed, xs)
    for case, inp in ((layer, x), (signed, xs)):
        with torch.no_grad():
            out = case(inp)
        assert torch.equal(out, case(inp.clone().requires_grad_()).detach())


@pytest.mark.parametrize("mapping", MAPPINGS)
def test_chunked_training_forward_converts_in_the_epilogue_and_recomputes_sums_for_the_backward(mapping, monkeypatch):
    """Partial sums made in chunks are not kept, so a training forward converts them in the conv's
    epilogue too; the backward recomputes float32 sums: the kept path's outputs and gradients."""
    layer, x = _epilogue_case(mapping, "multi-bit", "column", adc_bits=5)
    layer.train()
    assert _converts_in_epilogue(layer, x)
    params = [p for p in layer.parameters() if p.requires_grad]
    results = []
    for chunk_bytes in (crossbar_adc.PARTIAL_SUM_CHUNK_BYTES, 256):
        monkeypatch.setattr(crossbar_adc, "PARTIAL_SUM_CHUNK_BYTES", chunk_bytes)
        xg = x.clone().requires_grad_()
        with scratch_buffers():
            out = layer(xg)
            weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
            results.append((out.detach(), torch.autograd.grad((out * weights).sum(), [xg] + params)))
    (kept, kept_grads), (chunked, chunked_grads) = results
    assert torch.equal(chunked, kept)
    for got, want in zip(chunked_grads, kept_grads):  # sums over chunks: float32 reassociation only
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().clamp_min(1e-6).item())


@pytest.mark.parametrize("mode", ["0", "auto"])
@pytest.mark.parametrize("signed", [True, False])
def test_tiled_codes_are_the_codes_of_the_tiled_input(signed, mode):
    """`ConvTiles.tile_codes` (one pass over the input, eager and fused) gives the uint8 codes
    the int8 products take of the tiled input, channels last, for one group and several, from an
    NCHW or a channels-last input."""
    with RUNTIME.use(compile=mode):
        for groups in (1, 2):
            layer = CIMConv2d(10 * groups, 4, 3, padding=1, groups=groups, hw=_hw(), w_bit=5, a_bit=6,
                              input_signed=signed)
            x = torch.randn(2, 10 * groups, 5, 6) if signed else torch.rand(2, 10 * groups, 5, 6)
            calibrate(layer, [x])
            quantized = layer.input_quant(x)
            tiles = layer.tile.tiles(_grid(layer, quantized))
            assert tiles.layout.pad > 0
            for inp in (quantized.value, quantized.value.contiguous(memory_format=torch.channels_last)):
                got = tiles.tile_codes(inp)
                want = grid_codes(tiles.tile_input(inp), tiles.input_grid, signed=False)
                assert got.dtype == torch.uint8 and got.is_contiguous(memory_format=torch.channels_last)
                assert torch.equal(got, want)


@pytest.mark.parametrize("mapping,signed,mode", list(itertools.product(MAPPINGS, [True, False],
                                                                      ["multi-bit", "bit-serial"])))
def test_one_group_conv_with_a_ragged_tile_reads_only_the_codes(mapping, signed, mode, monkeypatch):
    """A one-group conv whose last row-tile is ragged tiles the input's codes, not the input (its
    crossbar node keeps the untiled input for the backward): the outputs and gradients of the float
    products, which tile the input itself, with zero or reflected padding, and with the partial
    sums kept or made in chunks (recomputed in the backward from the kept input)."""
    for padding_mode, chunk_bytes in itertools.product(["zeros", "reflect"],
                                                       [crossbar_adc.PARTIAL_SUM_CHUNK_BYTES, 256]):
        monkeypatch.setattr(crossbar_adc, "PARTIAL_SUM_CHUNK_BYTES", chunk_bytes)
        torch.manual_seed(1)
        layer = CIMConv2d(11, 6, 3, padding=1, padding_mode=padding_mode, hw=_hw(mapping=mapping, input_mode=mode),
                          w_bit=5, a_bit=6, input_signed=signed)
        x = torch.randn(3, 11, 7, 7) if signed else torch.rand(3, 11, 7, 7)
        calibrate(layer, [x])
        tiles = layer.tile.tiles(_grid(layer, layer.input_quant(x)))
        assert tiles.layout.pad > 0
        assert layer.tile.tiles_codes(tiles, layer.route_for(x)) == (mapping != "offset")  # the offset mapping's reference column reads floats
        _assert_same_with_and_without_integer_products(layer, x)
