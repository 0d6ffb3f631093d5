"""The CIM layers simulate the hardware the cost model prices: live ADC columns, bit-serial
inputs, magnitude slices, and the same tiles / slices / columns / conversions per layer."""
import itertools
from pathlib import Path

import pytest
import torch
import torchvision

from lib.cim import CIMConv2d, CIMLinear, HardwareConfig, calibrate, quantizable_layers, quantize_model
from lib.cim.adc import adc_range
from lib.cim.crossbar import stored_slices
from lib.cim.steps import lsq_init
from lib.policy import Policy
from lib.simulator import CostModel

ROOT = Path(__file__).resolve().parents[1]
MAPPINGS = ["offset", "differential-column", "differential-row"]


# --------------------------------------------------------------------------- dead ADC columns
@pytest.mark.parametrize("mapping,cell_bits", list(itertools.product(MAPPINGS, [1, 2, 4])))
def test_no_adc_column_is_dead_after_calibration(mapping, cell_bits):
    """Every column gets a step it can read with, even when all its cells are zero at calibration:
    a weight pushed to the end of its grid moves the ADC-on output as it moves the ideal one."""
    for w_bit in range(2, 9):
        torch.manual_seed(w_bit)
        hw = HardwareConfig(rows=288, cols=256, cell_bits=cell_bits, adc_bits=8, mapping=mapping,
                            psum_granularity="column", input_mode="multi-bit")
        layer = CIMConv2d(32, 8, 3, padding=1, bias=False, hw=hw, w_bit=w_bit, a_bit=6)
        torch.nn.init.normal_(layer.weight, std=0.05)
        x = torch.randn(4, 32, 8, 8)
        calibrate(layer, [x])
        step = layer.psum_adc.full_step()
        assert step.min() > 1e-4 * step.max(), (w_bit, step.min().item())
        layer.eval()
        with torch.no_grad():
            ideal_before, before = _adc_off(layer, x), layer(x)
            lo, hi = layer.plan.weight_range()
            grid = layer.weight_step_grid()
            for o in range(8):  # one weight per output channel to the farther end of its grid
                q = torch.round(layer.weight[o, 0, 1, 1] / grid[0, 0, o])
                layer.weight[o, 0, 1, 1] = (lo if q - lo >= hi - q else hi) * grid[0, 0, o]
            ideal, moved = _adc_off(layer, x) - ideal_before, layer(x) - before
        follow = (moved * ideal).sum(dim=(0, 2, 3)) / ideal.pow(2).sum(dim=(0, 2, 3))
        assert ((follow > 0.7) & (follow < 1.3)).all(), (w_bit, follow)


@pytest.mark.parametrize("case", ["conv-ragged", "conv-reflect", "linear-130"])
def test_adc_floor_is_largest_cell_times_mean_input_over_real_inputs(case):
    """A column that reads only zero cells at calibration gets the step of its floor: its slice's
    largest cell value times the mean |input| over the real inputs, not over a ragged tile's
    padding channels (64 channels in 3 tiles of 28 = 84; 130 inputs in 2 tiles of 128) nor a
    reflected border."""
    torch.manual_seed(0)
    linear = case.startswith("linear")
    hw = HardwareConfig(rows=128 if linear else 256, cols=256, cell_bits=4, adc_bits=8,
                        mapping="differential-column", weight_granularity="layer", psum_granularity="column",
                        input_mode="multi-bit")
    if linear:
        layer = CIMLinear(130, 6, bias=False, hw=hw, w_bit=8, a_bit=6, input_signed=False)
        x = torch.rand(32, 130)
    else:
        layer = CIMConv2d(64, 6, 3, padding=1, bias=False, padding_mode="reflect" if case == "conv-reflect" else "zeros",
                          hw=hw, w_bit=8, a_bit=6, input_signed=False)
        x = torch.rand(4, 64, 6, 6)
        x[:, :, 0, :] += 3.0  # a bright border row: reflecting it would change the mean
    assert layer.layout.pad > 0, "case must exercise a ragged row-tile"
    with torch.no_grad():
        layer.weight[3:] = 0  # output channels 3..5: every cell of their columns is zero
    calibrate(layer, [x])
    layer.eval()
    with torch.no_grad():
        mean_input = layer.input_quant(x).value.abs().mean()
    plan, adc = layer.plan, layer.psum_adc
    _, hi = adc.grid_range()
    step = adc.full_step()  # (arrays, slice-major read-out columns)
    for s, largest in enumerate(plan.slice_max()):
        expected = lsq_init(largest * mean_input, hi)
        for o in range(3, 6):
            torch.testing.assert_close(step[:, s * 6 + o], expected.expand(step.shape[0]), rtol=1e-5, atol=0)


def _adc_off(layer, x):
    layer.psum_adc.granularity = "off"
    try:
        return layer(x)
    finally:
        layer.psum_adc.granularity = "column"


# --------------------------------------------------------------------------- bit-serial inputs
def _planes_by_bits(x_int: torch.Tensor, a_bit: int, input_bits: int) -> list[torch.Tensor]:
    """DAC digits by integer bit operations: two's complement word, top digit arithmetic-shifted."""
    planes = -(-a_bit // input_bits)
    ints = x_int.long()
    word = ints & (2 ** a_bit - 1)
    digits = [(word >> (p * input_bits)) & (2 ** input_bits - 1) for p in range(planes - 1)]
    return digits + [ints >> ((planes - 1) * input_bits)]


def _per_plane_reference(layer: CIMConv2d, x: torch.Tensor) -> torch.Tensor:
    """The bit-serial conv written out plane by plane: partial sums of each plane, ADC, digital
    shift-and-add over slices and tiles, reference column subtracted, then over planes."""
    plan, adc = layer.plan, layer.psum_adc
    g, t, o, s_n = layer.layout.groups, layer.layout.tiles, layer.layout.out_channels_per_group, plan.slices
    xq = layer.input_quant(x).value
    step_in = layer.input_step()
    qw = layer.quant_weight()
    slices = stored_slices(torch.round(qw.value / qw.scale), plan)
    w_grid = layer.weight_step_grid()
    step = adc.full_step().reshape(g, t, -1)
    lo, hi = adc_range(adc.num_bits, adc.signed)
    shifts = 2.0 ** (plan.cell_bits * torch.arange(s_n))
    total = 0
    for p, digit in enumerate(_planes_by_bits(torch.round(xq / step_in), plan.a_bit, layer.hw.input_bits)):
        psums, ref = layer.tile.partial_sums(digit.float() * step_in, slices)
        n, h, w, _ = psums.shape
        main_step = step[..., :s_n * o].reshape(g, t, s_n, o)
        codes = torch.clamp(torch.round(psums.reshape(n, h, w, g, t, s_n, o) / main_step), lo, hi) * main_step
        y = torch.einsum("nhwgtso,s,gto->nhwgo", codes, shifts, w_grid)
        if ref is not None:
            ref_step = step[..., -1]
            ref_codes = torch.clamp(torch.round(ref.reshape(n, h, w, g, t) / ref_step), lo, hi) * ref_step
            ref_slice, _ = plan.offset_reference()
            y = y - torch.einsum("nhwgt,gto->nhwgo", ref_codes * 2.0 ** (ref_slice * plan.cell_bits), w_grid)
        total = total + 2.0 ** (p * layer.hw.input_bits) * y
    return total.reshape(n, h, w, -1).permute(0, 3, 1, 2) + layer.quantized_bias().view(1, -1, 1, 1)


@pytest.mark.parametrize("mapping", MAPPINGS)
@pytest.mark.parametrize("input_bits,signed", [(1, False), (1, True), (2, False), (2, True)])
def test_bit_serial_conv_equals_a_per_plane_loop(mapping, input_bits, signed):
    torch.manual_seed(0)
    hw = HardwareConfig(rows=36, cols=16, cell_bits=2, input_bits=input_bits, adc_bits=5, mapping=mapping,
                        psum_granularity="column", input_mode="bit-serial")
    layer = CIMConv2d(10, 6, 3, padding=1, groups=2, hw=hw, w_bit=5, a_bit=5, input_signed=signed)
    assert layer.input_planes == -(-5 // input_bits) and layer.layout.tiles >= 2
    x = torch.randn(2, 10, 6, 6) if signed else torch.rand(2, 10, 6, 6)
    calibrate(layer, [x])
    layer.eval()
    with torch.no_grad():
        got = layer(x)
        want = _per_plane_reference(layer, x)
    assert torch.allclose(got, want, atol=1e-5 * want.abs().max().item()), (got - want).abs().max()


@pytest.mark.parametrize("mapping", MAPPINGS)
def test_bit_serial_with_the_adc_off_equals_multi_bit(mapping):
    """Forward and gradients: the planes' shift-and-add is exact and the split is straight-through."""
    torch.manual_seed(1)
    results = []
    for mode in ("bit-serial", "multi-bit"):
        hw = HardwareConfig(rows=40, cols=64, cell_bits=2, input_bits=2, mapping=mapping, psum_granularity="off",
                            input_mode=mode)
        torch.manual_seed(1)
        conv = CIMConv2d(10, 6, 3, padding=1, hw=hw, w_bit=6, a_bit=7, input_signed=True)
        linear = CIMLinear(12, 4, hw=hw, w_bit=4, a_bit=5, input_signed=False)
        conv.force_crossbar = linear.force_crossbar = True
        x = torch.randn(2, 10, 5, 5, requires_grad=True)
        tokens = torch.rand(3, 2, 12, requires_grad=True)
        calibrate(conv, [x.detach()])
        calibrate(linear, [tokens.detach()])
        out = conv(x).square().sum() + linear(tokens).square().sum()
        params = [x, tokens, conv.weight, conv.input_step_module.step, linear.weight, linear.input_step_module.step]
        results.append((out.detach(), torch.autograd.grad(out, params)))
    (out_s, grads_s), (out_m, grads_m) = results
    # float32: the offset mapping subtracts its reference column from large sums (about 5e-5 relative per output)
    assert torch.allclose(out_s, out_m, rtol=1e-4)
    for got, want in zip(grads_s, grads_m):
        assert torch.allclose(got, want, rtol=1e-3, atol=1e-4 * want.abs().max().item())


def test_bit_serial_linear_trains_and_switching_mode_recalibrates_the_adc():
    torch.manual_seed(2)
    hw = HardwareConfig(rows=16, cols=32, cell_bits=2, adc_bits=6, psum_granularity="column")
    layer = CIMLinear(20, 3, hw=hw, w_bit=4, a_bit=4, input_signed=False)
    x = torch.rand(32, 20)
    calibrate(layer, [x])
    serial_step = layer.psum_adc.full_step().detach().clone()
    out = layer(x)
    out.square().sum().backward()
    assert layer.psum_adc.step.grad.abs().sum() > 0 and layer.weight.grad.abs().sum() > 0
    layer.set_input_mode("multi-bit")
    assert not layer.psum_adc.initialized
    calibrate(layer, [x])
    assert layer.psum_adc.full_step().mean() > 2 * serial_step.mean()  # whole inputs: larger sums
    with pytest.raises(ValueError, match="input_mode='analog' is not allowed"):
        layer.set_input_mode("analog")


# --------------------------------------------------------------------------- one hardware, one model
@pytest.mark.parametrize("yaml_name", ["default.yaml", "cell2bit.yaml"])
def test_resnet18_layers_simulate_what_the_cost_model_prices(yaml_name):
    hw = HardwareConfig.from_yaml(ROOT / "run" / "hardware" / yaml_name)
    assert hw.pricing_differences() == {}
    float_model = torchvision.models.resnet18(num_classes=10)
    cost_model = CostModel.from_model(float_model, hw, 32)
    names = cost_model.layer_names
    rng = torch.Generator().manual_seed(0)
    bits = [(int(w), int(a)) for w, a in torch.randint(2, 9, (len(names), 2), generator=rng)]
    policy = Policy([w for w, _ in bits], [a for _, a in bits], None, names)
    model = quantize_model(float_model, policy, hw, input_size=32)
    calibrate(model, [torch.randn(1, 3, 32, 32)])  # batch 1: one image, as the cost model counts
    cost = cost_model.policy_cost(policy)
    layers = quantizable_layers(model)
    assert [n for n, _ in layers] == names
    for (name, layer), priced in zip(layers, cost.per_layer):
        adc = layer.psum_adc
        qw = layer.quant_weight()
        slices = stored_slices(torch.round(qw.value / qw.scale), layer.plan).shape[0]
        simulated = dict(slices=slices, row_tiles=layer.layout.tiles, col_tiles=adc.column_tiles,
                         arrays=layer.layout.groups * layer.layout.tiles * adc.column_tiles,
                         adc_columns=adc.columns, input_cycles=layer.input_planes,
                         adc_conversions=adc.last_conversions)
        assert simulated == {key: getattr(priced, key) for key in simulated}, name


def test_differential_weight_grid_is_symmetric_through_bit_changes_and_state_loads():
    hw = HardwareConfig(rows=36, cols=16, cell_bits=2, mapping="dc", psum_granularity="off")
    layer = CIMConv2d(4, 6, 3, hw=hw, w_bit=4, a_bit=4)
    with torch.no_grad():  # two outliers far beyond any step: both grid ends are hit
        layer.weight[0, 0, 0, 0], layer.weight[1, 0, 0, 0] = 1e6, -1e6

    def grid_ends(module):
        qw = module.quant_weight()
        q = torch.round(qw.value / qw.scale)
        return int(q.min()), int(q.max())

    assert grid_ends(layer) == (-7, 7) and layer.slices == 2
    layer.set_bits(1, 4)       # one bit keeps {-1, 0}
    assert grid_ends(layer) == (-1, 0) and layer.slices == 1
    layer.set_bits(5, 4)
    assert grid_ends(layer) == (-15, 15)
    fresh = CIMConv2d(4, 6, 3, hw=hw, w_bit=1, a_bit=4)
    fresh.load_state_dict(layer.state_dict())  # Brevitas rebuilds its quantizer on load
    assert grid_ends(fresh) == (-15, 15) and torch.equal(fresh.quant_weight().value, layer.quant_weight().value)
    offset = CIMConv2d(4, 6, 3, hw=hw.with_overrides(mapping="offset"), w_bit=4, a_bit=4)
    with torch.no_grad():
        offset.weight.copy_(layer.weight)
    assert grid_ends(offset) == (-8, 7)
