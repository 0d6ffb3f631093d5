"""Crossbar invariants of CIMConv2d / CIMLinear (docs/crossbar-model.md) on real Brevitas layers."""
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from runtime_support import set_runtime
from lib.cim.runtime import Runtime
from lib.cim import CIMConv2d, CIMLinear, HardwareConfig, calibrate
from lib.cim.adc import adc_range
from lib.cim.crossbar import CrossbarPlan, stored_slices
from lib.cim.scratch import scratch_buffers
from lib.cim.steps import lsq_init, positive, scale_grad, scaled_positive

MAPPINGS = ["offset", "differential-column", "differential-row"]
GRANULARITIES = ["layer", "channel", "array", "column"]


def _hw(**kw):
    """Small arrays; multi-bit inputs unless a test asks for bit-serial (tested on their own below)."""
    base = dict(rows=40, cols=64, cell_bits=2, adc_bits=6, mapping="differential-column",
                weight_granularity="column", psum_granularity="off", input_mode="multi-bit")
    base.update(kw)
    return HardwareConfig(**base)


def _reference_conv(layer, x):
    """The ordinary conv on the dequantized input and weights, through the same quantizers."""
    xq = layer.input_quant(x).value
    wq = layer.quant_weight().value
    return F.conv2d(xq, wq, layer.quantized_bias(), layer.stride, layer.padding, layer.dilation, layer.groups)


def _reference_linear(layer, x):
    return F.linear(layer.input_quant(x).value, layer.quant_weight().value, layer.quantized_bias())


def _grads(out, tensors, seed=0):
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    return torch.autograd.grad((out * weights).sum(), tensors, allow_unused=True)


CASES = list(itertools.product(MAPPINGS, GRANULARITIES, [1, 2, 4]))


@pytest.mark.parametrize("mapping,granularity,cell_bits", CASES)
def test_adc_off_conv_equals_ordinary_conv(mapping, granularity, cell_bits):
    """Forward and gradients equal F.conv2d on dequantized tensors, with groups/stride/padding/
    dilation and a ragged last row-tile, for bits 1..8."""
    index = CASES.index((mapping, granularity, cell_bits))
    torch.manual_seed(index)
    w_bit, a_bit = 1 + index % 8, 1 + (index * 3) % 8
    hw = _hw(mapping=mapping, weight_granularity=granularity, cell_bits=cell_bits)
    layer = CIMConv2d(10, 6, 3, stride=2, padding=2, dilation=2, groups=2, hw=hw, w_bit=w_bit, a_bit=a_bit,
                      input_signed=index % 2 == 0)
    assert layer.layout.tiles >= 2 and layer.layout.pad > 0, "case must exercise a ragged row-tiling"
    x = torch.randn(3, 10, 9, 11, requires_grad=True)
    calibrate(layer, [x.detach()])
    fast = layer(x)  # ADC off: the layer's shortcut
    layer.force_crossbar = True
    out, ref = layer(x), _reference_conv(layer, x)
    assert torch.equal(fast, ref)
    assert out.shape == ref.shape
    scale = ref.abs().max().clamp_min(1e-3).item()
    assert torch.allclose(out, ref, atol=2e-5 * scale, rtol=1e-4)
    params = [x, layer.weight, layer.weight_step_module.step, layer.input_step_module.step, layer.bias]
    for got, want in zip(_grads(out, params), _grads(ref, params)):
        assert torch.allclose(got, want, atol=1e-4 * want.abs().max().clamp_min(1e-3).item(), rtol=1e-3)


@pytest.mark.parametrize("mapping,granularity", list(itertools.product(MAPPINGS, GRANULARITIES)))
def test_adc_off_linear_equals_ordinary_linear_with_tokens(mapping, granularity):
    torch.manual_seed(3)
    hw = _hw(mapping=mapping, weight_granularity=granularity, rows=16)
    layer = CIMLinear(37, 5, hw=hw, w_bit=5, a_bit=7)
    layer.force_crossbar = True
    x = torch.randn(2, 4, 37, requires_grad=True)  # leading token dims
    calibrate(layer, [x.detach()])
    out, ref = layer(x), _reference_linear(layer, x)
    assert out.shape == (2, 4, 5)
    assert torch.allclose(out, ref, atol=2e-5 * ref.abs().max().item(), rtol=1e-4)
    params = [x, layer.weight, layer.weight_step_module.step, layer.input_step_module.step]
    for got, want in zip(_grads(out, params), _grads(ref, params)):
        assert torch.allclose(got, want, atol=1e-4 * want.abs().max().clamp_min(1e-3).item(), rtol=1e-3)


@pytest.mark.parametrize("mapping", MAPPINGS)
@pytest.mark.parametrize("cell_bits", [1, 2, 3, 4])
@pytest.mark.parametrize("slicing", ["magnitude", "full-range"])
def test_slices_are_cell_integers_that_recombine_exactly(mapping, cell_bits, slicing):
    for bits in range(1, 9):
        plan = CrossbarPlan(HardwareConfig(mapping=mapping, cell_bits=cell_bits, weight_slicing=slicing),
                            1, 1, 1, 1, bits, 8)
        lo, hi = plan.weight_range()
        q = torch.arange(lo, hi + 1, dtype=torch.float32)
        slices = stored_slices(q, plan)
        stored = bits if mapping == "offset" or slicing == "full-range" or bits == 1 else bits - 1
        assert slices.shape[0] == plan.slices == -(-stored // cell_bits)
        assert torch.equal(slices, slices.round())
        recombined = (slices * plan.significance().view(-1, 1)).sum(0)
        assert [slices[s].abs().max().item() for s in range(plan.slices)] == plan.slice_max()
        if mapping == "offset":
            assert (lo, hi) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
            assert slices.min() >= 0 and slices.max() <= 2 ** cell_bits - 1
            assert torch.equal(recombined, q + 2 ** (bits - 1))
            ref_slice, ref_value = plan.offset_reference()
            assert ref_value * 2 ** (ref_slice * cell_bits) == 2 ** (bits - 1)
        else:  # each cell of the pair holds a digit of the magnitude q⁺ or q⁻ in [0, 2^c - 1]
            assert lo == -hi - int(slicing == "full-range" or bits == 1)  # symmetric grid for magnitudes
            positive, negative = slices.clamp(min=0), (-slices).clamp(min=0)
            assert positive.max() <= 2 ** cell_bits - 1 and negative.max() <= 2 ** cell_bits - 1
            assert torch.equal(recombined, q)


def _adc_layer(mapping="differential-column", granularity="column", adc_bits=4, n_sigma=None, **kw):
    hw = _hw(mapping=mapping, psum_granularity=granularity, adc_bits=adc_bits, n_sigma=n_sigma,
             weight_granularity="column", **kw)
    torch.manual_seed(0)
    return CIMConv2d(12, 5, 3, padding=1, hw=hw, w_bit=5, a_bit=4, input_signed=False)


@pytest.mark.parametrize("mapping", MAPPINGS)
@pytest.mark.parametrize("granularity", ["layer", "array", "column"])
def test_adc_outputs_lie_on_the_grid(mapping, granularity):
    layer = _adc_layer(mapping, granularity, adc_bits=3)
    x = torch.rand(2, 12, 6, 6)
    calibrate(layer, [x])
    layer.eval()
    with torch.no_grad():
        out = layer(x)
        xq = layer.input_quant(x).value
        qw = layer.quant_weight()
        q = torch.round(qw.value / qw.scale)
        slices = stored_slices(q, layer.plan)
        psums, ref = layer.tile.partial_sums(xq, slices)
        n, h, w, _ = psums.shape
        lay = layer.layout
        p = psums.reshape(n * h * w, lay.groups * lay.tiles, -1)
        if ref is not None:  # the offset reference column is the last column of each array
            p = torch.cat([p, ref.reshape(n * h * w, lay.groups * lay.tiles, 1)], dim=2)
        step = layer.psum_adc.full_step()
        levels = p / step
        lo, hi = adc_range(3, layer.psum_adc.signed)
        codes = torch.round(levels).clamp(lo, hi)
        # per step group at most 2^adc_bits distinct codes
        groups = {"layer": [codes.reshape(-1)], "array": list(codes.transpose(0, 1).reshape(lay.tiles, -1)),
                  "column": list(codes.reshape(codes.shape[0], -1).T)}[granularity]
        assert all(torch.unique(g).numel() <= 2 ** 3 for g in groups)
        # rebuilding the output from those grid values reproduces the layer's output
        step_grid = layer._step_grid(qw.scale)
        quantized = (codes * step).reshape(n * h * w, lay.groups, lay.tiles, -1)
        main, ref_q = (quantized[..., :-1], quantized[..., -1]) if ref is not None else (quantized, None)
        layer.psum_adc.granularity = "off"  # the layer's own shift-and-add, on grid values
        try:
            rebuilt = layer.tile.convert(main, step_grid, ref_q, None)
        finally:
            layer.psum_adc.granularity = granularity
        rebuilt = rebuilt.reshape(n, h, w, -1).permute(0, 3, 1, 2) + layer.quantized_bias().view(1, -1, 1, 1)
    assert torch.allclose(out, rebuilt, atol=1e-5 * out.abs().max().item())


@pytest.mark.parametrize("mapping", MAPPINGS)
def test_more_adc_bits_move_output_towards_adc_off(mapping):
    x = torch.rand(4, 12, 8, 8)
    errors = []
    reference = None
    for bits in (2, 4, 8):
        layer = _adc_layer(mapping, "column", adc_bits=bits)
        calibrate(layer, [x])
        layer.eval()
        with torch.no_grad():
            out = layer(x)
            if reference is None:
                reference = _reference_conv(layer, x)
        errors.append((out - reference).pow(2).mean().item())
    assert errors[0] > errors[1] > errors[2], errors


def test_row_tiles_see_only_their_own_input_channels():
    hw = _hw(rows=27, psum_granularity="column")  # 3 channels of a 3x3 kernel per tile
    layer = CIMConv2d(8, 4, 3, padding=1, hw=hw, w_bit=4, a_bit=4)
    assert layer.layout.tiles == 3 and layer.layout.channels_per_tile == 3
    with torch.no_grad():
        qw = layer.quant_weight()
        slices = stored_slices(torch.round(qw.value / qw.scale), layer.plan)
        x = torch.randn(2, 8, 5, 5)
        x2 = x.clone()
        x2[:, 3:6] += torch.randn(2, 3, 5, 5)  # perturb tile 1 only
        cols = layer.psum_adc.columns
        p1 = layer.tile.partial_sums(x, slices)[0].reshape(2, 5, 5, 3, cols)
        p2 = layer.tile.partial_sums(x2, slices)[0].reshape(2, 5, 5, 3, cols)
    assert torch.equal(p1[..., 0, :], p2[..., 0, :]) and torch.equal(p1[..., 2, :], p2[..., 2, :])
    assert not torch.equal(p1[..., 1, :], p2[..., 1, :])
    # same for Linear: features [16, 32) form tile 1
    lin = CIMLinear(40, 3, hw=hw.with_overrides(rows=16), w_bit=3, a_bit=4)
    with torch.no_grad():
        qw = lin.quant_weight()
        slices = stored_slices(torch.round(qw.value / qw.scale), lin.plan)
        x = torch.randn(5, 40)
        x2 = x.clone()
        x2[:, 16:32] += 1.0
        p1, p2 = lin.tile.partial_sums(x, slices)[0], lin.tile.partial_sums(x2, slices)[0]
    assert torch.equal(p1[:, 0], p2[:, 0]) and torch.equal(p1[:, 2], p2[:, 2]) and not torch.equal(p1[:, 1], p2[:, 1])


@pytest.mark.parametrize("n_sigma", [None, 2.0])
def test_eval_output_of_a_sample_does_not_depend_on_its_batch(n_sigma):
    layer = _adc_layer(adc_bits=4, n_sigma=n_sigma)
    calibrate(layer, [torch.rand(8, 12, 6, 6), torch.rand(8, 12, 6, 6)])
    layer.eval()
    sample = torch.rand(1, 12, 6, 6)
    with torch.no_grad():
        alone = layer(sample)
        in_batch = layer(torch.cat([sample, 10 * torch.rand(7, 12, 6, 6)]))[:1]
    assert torch.allclose(alone, in_batch, atol=1e-5)


def test_gradients_reach_all_steps_and_training_lowers_loss():
    torch.manual_seed(0)
    hw = _hw(psum_granularity="column", adc_bits=5, rows=36)
    model = nn.Sequential(
        CIMConv2d(3, 8, 3, padding=1, hw=hw, w_bit=4, a_bit=6, input_signed=True), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), CIMLinear(32, 4, hw=hw, w_bit=4, a_bit=6, input_signed=False))
    x = torch.randn(32, 3, 8, 8)
    y = (x[:, 0].mean(dim=(1, 2)) > 0).long() + 2 * (x[:, 1].mean(dim=(1, 2)) > 0).long()
    calibrate(model, [x])
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    for layer in (model[0], model[4]):
        for tensor in (layer.weight, layer.weight_step_module.step, layer.input_step_module.step, layer.psum_adc.step):
            assert tensor.grad is not None and tensor.grad.abs().sum() > 0
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = loss.item()
    for _ in range(30):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.8 * first


def test_set_bits_rederives_slices_and_grids_in_place():
    layer = _adc_layer(adc_bits=4)
    x = torch.rand(2, 12, 6, 6)
    calibrate(layer, [x])
    module_id, weight_id = id(layer), id(layer.weight)
    assert layer.slices == 2 and layer.psum_adc.columns == 10  # 5-bit magnitudes on 2-bit cells: 4 bits
    layer.set_bits(8, 3, adc_bits=6)
    assert (layer.w_bit, layer.a_bit, layer.adc_bits, layer.slices) == (8, 3, 6, 4)
    assert layer.psum_adc.columns == 4 * 5 and layer.psum_adc.step.shape == (layer.layout.tiles, 20)
    calibrate(layer, [x])
    layer.eval()
    with torch.no_grad():
        xq = layer.input_quant(x).value
        assert torch.unique(torch.round(xq / layer.input_step_module.step)).numel() <= 8
        assert torch.isfinite(layer(x)).all()
    assert id(layer) == module_id and id(layer.weight) == weight_id
    with pytest.raises(ValueError, match="w_bit=0"):
        layer.set_bits(0, 4)


def _quant_error(values, step, lo, hi):
    return (torch.clamp(torch.round(values / step), lo, hi) * step - values).square().mean()


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_a_bit_change_reinitialises_steps_to_the_least_quantization_error(granularity):
    """After set_bits, the input step (on the calibration batch) and every weight step (on its
    weights) quantize with no more error than LSQ's init or any nearby multiple of the chosen step."""
    torch.manual_seed(0)
    hw = _hw(psum_granularity="column", adc_bits=6, weight_granularity=granularity)
    layer = CIMConv2d(12, 5, 3, padding=1, hw=hw, w_bit=5, a_bit=4, input_signed=False)
    x = torch.randn(4, 12, 6, 6).relu() * torch.rand(4, 12, 1, 1) * 3
    calibrate(layer, [x])
    layer.set_bits(3, 2)
    lsq_input_step = layer.input_step().clone()
    calibrate(layer, [x])
    step = layer.input_step()
    fitted = _quant_error(x, step, 0, 3)
    assert fitted < _quant_error(x, lsq_input_step, 0, 3)
    for factor in (0.8, 0.95, 1.05, 1.25):
        assert fitted <= _quant_error(x, step * factor, 0, 3) + 1e-12
    module = layer.weight_step_module
    w = layer.weight.detach()
    chosen = module.step.detach().clone()
    lsq = lsq_init(module._group_mean(w.abs()), 3)

    def per_group(step):
        s = module.expand_to_weight(step)
        return module._group_mean((torch.clamp(torch.round(w / s), -3, 3) * s - w).square())
    fitted = per_group(chosen)
    assert (fitted <= per_group(lsq) + 1e-12).all() and (fitted < per_group(lsq)).any()
    for factor in (0.9, 1.1):
        assert (fitted <= per_group(chosen * factor) + 1e-12).all()


def test_a_loaded_step_is_kept_although_the_bits_changed_on_load():
    """Loading a checkpoint at other bits adopts its steps as they are (no error fit on the next batch)."""
    layer = _adc_layer(adc_bits=5)
    x = torch.rand(2, 12, 6, 6)
    layer.set_bits(4, 3, 6)
    calibrate(layer, [x])
    fresh = _adc_layer(adc_bits=5)
    fresh.load_state_dict(layer.state_dict())
    calibrate(fresh, [x * 5])  # another batch: a pending error fit would move the input step
    assert torch.equal(fresh.input_step(), layer.input_step())
    assert torch.equal(fresh.weight_step_module.step, layer.weight_step_module.step)


def test_state_dict_round_trip_restores_bits_and_outputs_exactly():
    layer = _adc_layer(adc_bits=5)
    x = torch.rand(2, 12, 6, 6)
    layer.set_bits(6, 5, 7)
    calibrate(layer, [x])
    layer.eval()
    fresh = _adc_layer(adc_bits=5)  # different bits and shapes until the state is loaded
    fresh.load_state_dict(layer.state_dict())
    fresh.eval()
    assert (fresh.w_bit, fresh.a_bit, fresh.adc_bits) == (6, 5, 7)
    with torch.no_grad():
        assert torch.equal(fresh(x), layer(x))


@pytest.mark.parametrize("mapping", ["offset", "differential-column"])
@pytest.mark.parametrize("size", [7, 8])  # 4·8·8 output pixels: sums in blocks; 4·7·7: in one
def test_fused_and_eager_adc_kernels_agree(mapping, size, monkeypatch):
    """CIM_AQ_COMPILE=0 (eager) and =1 (Inductor-fused) give the same outputs and gradients."""
    x = torch.rand(4, 12, size, size)
    results = []
    for mode in ("0", "1"):
        set_runtime(monkeypatch, compile=mode)
        layer = _adc_layer(mapping, "column", adc_bits=4)
        calibrate(layer, [x])
        out = layer(x)
        grads = _grads(out, [layer.weight, layer.weight_step_module.step, layer.input_step_module.step,
                             layer.psum_adc.step])
        results.append((out.detach(), grads))
    (out0, grads0), (out1, grads1) = results
    assert torch.allclose(out0, out1, atol=1e-5 * out0.abs().max().item())
    for g0, g1 in zip(grads0, grads1):
        assert torch.allclose(g0, g1, atol=1e-4 * g0.abs().max().item(), rtol=1e-3)


def test_bad_compile_setting_is_a_clear_error():
    with pytest.raises(ValueError, match=r"CIM_AQ_COMPILE='yes' is not allowed: expected one of \['auto', '0', '1'\]"):
        Runtime.from_environment({"CIM_AQ_COMPILE": "yes"})
    with pytest.raises(ValueError, match=r"compile='yes' is not allowed"):
        Runtime(compile="yes")


def test_steps_stay_positive_and_bias_sits_on_its_int32_grid():
    layer = _adc_layer(adc_bits=4)
    x = torch.rand(2, 12, 6, 6)
    calibrate(layer, [x])
    assert layer.is_calibrated
    with torch.no_grad():  # LSQ can drive raw steps through zero; the quantizers use |step|
        layer.weight_step_module.step.neg_()
        layer.input_step_module.step.neg_()
        layer.psum_adc.step.neg_()
    assert (layer.weight_step_grid() > 0).all() and layer.input_step() > 0 and (layer.psum_adc.full_step() > 0).all()
    assert torch.isfinite(layer(x)).all()
    codes = layer.quantized_bias() / layer.bias_step()
    assert torch.allclose(codes, codes.round(), atol=1e-3)
    bias_grad = torch.autograd.grad(layer(x).sum(), layer.bias)[0]
    assert torch.allclose(bias_grad, torch.full_like(bias_grad, 2 * 6 * 6.0))  # straight through


def test_channels_last_input_gives_the_same_results_and_keeps_its_layout():
    """NHWC inputs (a channels_last model) go through the quantizer and crossbar without layout
    copies and give the NCHW results; the conv output is NHWC either way (its compute layout)."""
    layer = _adc_layer(adc_bits=4)
    x = torch.rand(2, 12, 8, 8)
    calibrate(layer, [x])
    x_nchw = x.clone().requires_grad_(True)
    x_nhwc = x.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    assert layer.input_quant(x_nhwc).value.is_contiguous(memory_format=torch.channels_last)
    out_nchw, out_nhwc = layer(x_nchw), layer(x_nhwc)
    assert out_nhwc.is_contiguous(memory_format=torch.channels_last)
    assert out_nchw.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(out_nchw, out_nhwc, atol=1e-6 * out_nchw.abs().max().item())
    params = [layer.weight, layer.weight_step_module.step, layer.input_step_module.step, layer.psum_adc.step]
    grads_nchw = _grads(out_nchw, [x_nchw] + params)
    grads_nhwc = _grads(out_nhwc, [x_nhwc] + params)
    for a, b in zip(grads_nchw, grads_nhwc):
        assert torch.allclose(a, b, atol=1e-5 * a.abs().max().item(), rtol=1e-4)


@pytest.mark.parametrize("mapping", MAPPINGS)
@pytest.mark.parametrize("granularity", ["layer", "array", "column"])
@pytest.mark.parametrize("compile_mode", ["0", "1"])
def test_fused_crossbar_adc_equals_the_composed_path(mapping, granularity, compile_mode, monkeypatch):
    """The one-node crossbar+ADC (scratch-buffer backward) gives the outputs and gradients of
    tile_products followed by the ADC, with groups, stride and a ragged last tile, over two steps
    (the second reuses the scratch buffers)."""
    set_runtime(monkeypatch, compile=compile_mode)
    hw = _hw(mapping=mapping, psum_granularity=granularity, adc_bits=3)
    torch.manual_seed(1)
    layer = CIMConv2d(10, 6, 3, stride=2, padding=1, groups=2, hw=hw, w_bit=5, a_bit=4)
    assert layer.layout.pad > 0
    calibrate(layer, [torch.randn(4, 10, 8, 8)])
    assert layer.psum_adc.fusable
    params = [layer.weight, layer.bias, layer.weight_step_module.step, layer.input_step_module.step,
              layer.psum_adc.step]
    with scratch_buffers():
        _compare_fused_and_composed(layer, params, (4, 10, 8, 8))


LINEAR_CASES = list(itertools.product(MAPPINGS, ["layer", "array", "column"], ["multi-bit", "bit-serial"]))


@pytest.mark.parametrize("mapping,granularity,input_mode", LINEAR_CASES)
def test_fused_linear_crossbar_adc_equals_the_composed_path(mapping, granularity, input_mode, monkeypatch):
    """CIMLinear's one-node crossbar+ADC: the outputs and every gradient of tile_products followed
    by the ADC, with a ragged last tile, leading token dims, both input modes, over two steps."""
    index = LINEAR_CASES.index((mapping, granularity, input_mode))
    set_runtime(monkeypatch, compile="1" if index % 2 else "0")
    hw = _hw(mapping=mapping, psum_granularity=granularity, adc_bits=4, rows=16, input_mode=input_mode,
             input_bits=2)
    torch.manual_seed(index)
    layer = CIMLinear(37, 5, hw=hw, w_bit=6, a_bit=4, input_signed=index % 3 != 0)
    assert layer.layout.tiles >= 3 and layer.layout.pad > 0
    assert layer.input_planes == (2 if input_mode == "bit-serial" else 1)
    calibrate(layer, [torch.randn(3, 4, 37)])
    assert layer.psum_adc.fusable
    params = [layer.weight, layer.bias, layer.weight_step_module.step, layer.input_step_module.step,
              layer.psum_adc.step]
    with scratch_buffers():
        _compare_fused_and_composed(layer, params, (3, 4, 37))


def _compare_fused_and_composed(layer, params, shape):
    for seed in range(2):
        x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), requires_grad=True)
        results = []
        for fused in (True, False):
            layer.fused_adc = fused
            out = layer(x)
            results.append((out.detach(), _grads(out, [x] + params, seed=seed)))
        (out_f, grads_f), (out_c, grads_c) = results
        assert torch.allclose(out_f, out_c, atol=1e-6 * out_c.abs().max().item())
        for got, want in zip(grads_f, grads_c):
            assert torch.allclose(got, want, atol=1e-5 * want.abs().max().clamp_min(1e-6).item(), rtol=1e-4)


def test_scaled_positive_step_equals_its_three_ops():
    """One autograd node for |step| floored with LSQ's gradient scale: the values and gradients of
    abs, clamp_min and scale_grad, for positive, negative, tiny and zero steps."""
    raw = torch.tensor([0.3, -0.7, 1e-9, -1e-9, 0.0, 2.5], requires_grad=True)
    factor = torch.rsqrt(torch.tensor(15.0) * 1234)
    upstream = torch.tensor([1.0, -2.0, 3.0, 0.5, -1.5, 0.25])
    fused = scaled_positive(raw, factor)
    (grad_fused,) = torch.autograd.grad(fused, raw, upstream)
    chained = scale_grad(positive(raw), factor)
    (grad_chained,) = torch.autograd.grad(chained, raw, upstream)
    assert torch.equal(fused, chained) and torch.equal(grad_fused, grad_chained)
    with torch.no_grad():
        assert torch.equal(scaled_positive(raw, factor), positive(raw))
