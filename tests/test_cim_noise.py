"""Device non-idealities per cell slice (lib.cim.noise) and equal-significance slices, on real CIM layers."""
import math

import pytest
import torch

from lib.cim import CIMConv2d, CIMLinear, HardwareConfig, calibrate
from lib.cim.crossbar import CrossbarPlan, TileLayout, stored_slices
from lib.cim.hardware import HardwareConfigError
from lib.cim import noise as cim_noise
from lib.cim.noise_config import PRESETS, NoiseConfig, NoiseConfigError


def _hw(**kw):
    base = dict(rows=40, cols=64, cell_bits=2, adc_bits=6, mapping="differential-column",
                weight_granularity="column", psum_granularity="column", input_mode="multi-bit")
    base.update(kw)
    return HardwareConfig(**base)


def _conv(hw, seed=0, w_bit=4, a_bit=4):
    torch.manual_seed(seed)
    layer = CIMConv2d(6, 8, 3, padding=1, hw=hw, w_bit=w_bit, a_bit=a_bit)
    x = torch.randn(4, 6, 7, 7)
    calibrate(layer, [x])
    return layer.eval(), x


@pytest.mark.parametrize("mapping", ["offset", "differential-column", "differential-row"])
def test_all_zero_noise_equals_the_ideal_layer_exactly(mapping):
    """A zero-noise config (even with a finite on/off ratio) leaves the layer as it is; an active
    one at σ → 0 takes the plain composed path and still computes the ideal outputs exactly."""
    layer, x = _conv(_hw(mapping=mapping))
    with torch.no_grad():
        ideal = layer(x)
        assert cim_noise.attach(layer, NoiseConfig(on_off_ratio=10.0)) == 0
        assert torch.equal(layer(x), ideal)
        cim_noise.attach(layer, NoiseConfig(stuck_on=0.0, prog=0.0, read=0.0, drift_nu=0.5))  # drift at t = t0
        assert torch.equal(layer(x), ideal)
        cim_noise.attach(layer, NoiseConfig(prog=1e-30))  # active: composed path, exact cells
        assert layer._device_noise() is not None
        assert torch.equal(layer(x), ideal)
        cim_noise.detach(layer)
        assert layer._device_noise() is None and torch.equal(layer(x), ideal)


def test_programming_noise_has_the_requested_statistics_per_slice():
    """Each device's read-out error is N(0, σ·levels), a pair's difference N(0, √2·σ·levels),
    on every slice of a large layer; a level-dependent shape scales it by the target conductance."""
    hw = _hw(cell_bits=2, rows=256)
    plan = CrossbarPlan(hw, 1, 256, 512, 1, 6, 8)
    q = torch.randint(-31, 32, (512, 256)).float()
    cells = stored_slices(q, plan)
    assert cells.shape[0] == 3
    sigma, levels = 0.05, 3
    # an off state well above 0 (on/off 4): no device's conductance is clipped at 0
    state = cim_noise.LayerNoise(NoiseConfig(prog=sigma, on_off_ratio=4.0), seed=3, index=0)
    error = state.cells(cells, plan, training=False) - cells
    for s in range(3):
        e = error[s].flatten()
        assert abs(e.mean().item()) < 0.01
        assert e.std().item() == pytest.approx(math.sqrt(2) * sigma * levels, rel=0.02)
    # level dependence on an offset cell: σ(g_T) = prog·g_T, so code 0 stays exact (g_T = 0)
    offset = CrossbarPlan(_hw(mapping="offset"), 1, 256, 512, 1, 2, 8)
    codes = torch.randint(0, 4, (1, 512, 256)).float()
    shaped = cim_noise.LayerNoise(NoiseConfig(prog=sigma, prog_shape=(0.0, 1.0)), 1, 0).cells(codes, offset, False)
    for k in range(4):
        e = (shaped - codes)[codes == k]
        assert e.std().item() == pytest.approx(sigma * levels * k / 3, rel=0.03, abs=1e-6)


def test_drift_is_identity_at_nu_zero_and_at_t0_and_compensation_restores_the_scale():
    cells = torch.randint(-3, 4, (2, 64, 32)).float()
    plan = CrossbarPlan(_hw(), 1, 32, 64, 1, 5, 8)
    g = cim_noise.target_conductance(cim_noise.device_codes(cells, True), 3, 0.1)
    nu = cim_noise.drift_exponents(torch.randn(g.shape), NoiseConfig(drift_nu=0.05, drift_nu_std=0.02))
    assert torch.equal(cim_noise.drifted(g, torch.zeros_like(g), 3600.0, 20.0), g)
    assert torch.equal(cim_noise.drifted(g, nu, 20.0, 20.0), g)
    drifting = NoiseConfig(drift_nu=0.1, drift_t=1e4, drift_t0=1.0)
    values = cim_noise.LayerNoise(drifting, 0, 0).cells(cells, plan, False)
    assert torch.allclose(values, cells * 1e4 ** -0.1, atol=1e-5)  # g_min = 0: every cell scales
    compensated = cim_noise.LayerNoise(NoiseConfig(drift_nu=0.1, drift_t=1e4, drift_t0=1.0,
                                                   drift_compensation=True), 0, 0).cells(cells, plan, False)
    assert torch.allclose(compensated, cells, atol=1e-4)


def test_stuck_at_rates_are_met_within_sampling_error():
    n = 200_000
    cells = torch.full((1, n, 1), 1.0)
    plan = CrossbarPlan(_hw(mapping="offset", cell_bits=2), 1, 1, n, 1, 2, 8)
    cfg = NoiseConfig(stuck_on=0.03, stuck_off=0.05, on_off_ratio=20.0)
    values = cim_noise.LayerNoise(cfg, 7, 0).cells(cells, plan, False).flatten()
    on, off = (values == 3).float().mean().item(), (values == 0).float().mean().item()
    for got, want in ((on, 0.03), (off, 0.05)):
        assert abs(got - want) < 4 * math.sqrt(want * (1 - want) / n)
    assert ((values == 1) | (values == 3) | (values == 0)).all()


@pytest.mark.parametrize("cell_bits,w_bit", [(1, 4), (2, 4), (2, 5), (4, 8), (3, 7)])
def test_equal_significance_slices_recombine_exactly(cell_bits, w_bit):
    hw = _hw(cell_bits=cell_bits, slice_significance="equal")
    plan = CrossbarPlan(hw, 1, 8, 4, 1, w_bit, 8)
    lo, hi = plan.weight_range()
    q = torch.arange(lo, hi + 1).float().reshape(1, -1)
    cells = stored_slices(q, plan)
    assert cells.shape[0] == plan.slices == math.ceil(max(-lo, hi) / (2 ** cell_bits - 1))
    assert torch.equal(cells.sum(dim=0), q)
    assert cells.abs().max() <= 2 ** cell_bits - 1
    assert cells.abs().amax(dim=(1, 2)).tolist() == plan.slice_max()
    binary = CrossbarPlan(_hw(cell_bits=cell_bits), 1, 8, 4, 1, w_bit, 8)
    assert plan.columns >= binary.columns  # the cost model counts the extra columns


def test_equal_significance_layer_matches_the_ordinary_conv_with_the_adc_off():
    hw = _hw(cell_bits=1, slice_significance="equal", psum_granularity="off")
    layer, x = _conv(hw, w_bit=3)
    layer.force_crossbar = True
    with torch.no_grad():
        crossbar = layer(x)
        layer.force_crossbar = False
        assert torch.allclose(crossbar, layer(x), atol=1e-4)
    assert layer.slices == 3


def test_bad_noise_and_significance_values_are_refused():
    with pytest.raises(HardwareConfigError, match="slice_significance='equal'"):
        HardwareConfig(mapping="offset", slice_significance="equal")
    with pytest.raises(HardwareConfigError, match="stuck_on"):
        HardwareConfig.from_dict({"noise": {"stuck_on": 1.5}})
    with pytest.raises(HardwareConfigError, match="unknown key"):
        HardwareConfig.from_dict({"noise": {"sigma": 0.1}})
    with pytest.raises(NoiseConfigError, match="preset"):
        NoiseConfig.from_value("flash")
    hw = HardwareConfig.from_dict({"noise": {"preset": "rram", "read": 0.0}})
    assert hw.noise.preset == "rram" and hw.noise.read == 0.0 and hw.noise.on_off_ratio == 10.0
    assert hw == HardwareConfig()  # noise changes no structure
    assert HardwareConfig.from_dict(hw.to_dict()).noise == hw.noise
    assert set(PRESETS) == {"ideal", "pcm", "rram"} and PRESETS["pcm"].active and not PRESETS["ideal"].active


def test_same_seed_same_noisy_outputs_other_seed_others_and_one_programming_per_repeat():
    layer, x = _conv(_hw())
    cfg = PRESETS["rram"].with_kinds(read=0.0)
    with torch.no_grad():
        cim_noise.attach(layer, cfg, seed=4)
        first, again = layer(x), layer(x)
        assert torch.equal(first, again)  # programmed once, read many times
        cim_noise.attach(layer, cfg, seed=4)
        assert torch.equal(layer(x), first)
        cim_noise.attach(layer, cfg, seed=5)
        assert not torch.equal(layer(x), first)


def test_noise_aware_training_takes_gradients_through_noisy_slices():
    hw = _hw()
    torch.manual_seed(0)
    layer = CIMLinear(30, 6, hw=hw, w_bit=4, a_bit=4)
    x = torch.randn(16, 30)
    calibrate(layer, [x])
    cim_noise.attach(layer, NoiseConfig(prog=0.05))
    layer.train()
    torch.manual_seed(1)
    out = layer(x)
    out.square().sum().backward()
    assert layer.weight.grad is not None and torch.isfinite(layer.weight.grad).all()
    torch.manual_seed(1)
    assert torch.equal(layer(x), out.detach())  # the global generator decides the training draws
    assert not torch.equal(layer(x), out.detach())  # and every forward programs afresh


def test_an_equal_significance_model_with_noise_attached_exports_its_ideal_cells(tmp_path):
    """The ONNX graph is noise-free: onnxruntime agrees with the ideal model, noise attached or not."""
    from lib.cim import quantize_model
    from lib.export import export_model
    from models import create_model

    torch.manual_seed(0)
    hw = HardwareConfig(cell_bits=1, slice_significance="equal", input_mode="multi-bit", adc_bits=6)
    model = quantize_model(create_model("tiny_cnn", 10), (4, 4), hw, input_size=8)
    images = torch.randn(16, 3, 8, 8)
    calibrate(model, [images], batch_norm="running")
    model.eval()
    with torch.no_grad():
        ideal = model(images)
    cim_noise.attach(model, NoiseConfig(prog=0.2), seed=0)
    result = export_model(model, tmp_path / "model.onnx", images)
    assert result.check.passed and result.check.max_abs_diff < 1e-4 * ideal.abs().max().item()
    assert model.get_submodule("fc")._device_noise() is not None  # the model itself keeps its noise


def test_a_noisy_forward_after_ideal_ones_is_the_same_as_on_a_fresh_layer():
    """The ideal evaluation's fast routes (eval cache, integer codes of the input) must not serve a
    noisy forward: noise attached after ideal forwards gives what it gives on a fresh copy."""
    import copy

    layer, x = _conv(_hw())
    fresh = copy.deepcopy(layer)
    cfg = NoiseConfig(prog=0.05)
    with torch.no_grad():
        ideal = layer(x)
        assert torch.equal(layer(x), ideal)  # the cached and codes routes of the ideal layer
        cim_noise.attach(layer, cfg, seed=2)
        cim_noise.attach(fresh, cfg, seed=2)
        noisy = layer(x)
        assert torch.equal(noisy, fresh(x))
        assert not torch.equal(noisy, ideal)
