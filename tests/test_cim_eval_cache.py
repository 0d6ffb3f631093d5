"""The eval-time cache of a CIM layer's crossbar form (lib.cim.eval_cache) on real layers: used
while nothing changes, never stale after any change of the weight side, bits, mode or state."""
import copy

import pytest
import torch

from lib.cim import CIMConv2d, CIMLinear, HardwareConfig, calibrate
from lib.cim.eval_cache import module_tensors


def _hw(**kw):
    base = dict(rows=40, cols=64, cell_bits=2, adc_bits=5, mapping="differential-column",
                weight_granularity="column", psum_granularity="column", input_mode="multi-bit")
    base.update(kw)
    return HardwareConfig(**base)


def _conv(**kw):
    torch.manual_seed(0)
    layer = CIMConv2d(10, 6, 3, padding=1, groups=2, hw=_hw(**kw), w_bit=5, a_bit=4)
    return layer, torch.randn(2, 10, 6, 6)


def _linear(**kw):
    torch.manual_seed(0)
    layer = CIMLinear(37, 5, hw=_hw(**kw), w_bit=6, a_bit=4)
    return layer, torch.randn(7, 37)


LAYERS = {
    "conv fused ADC": lambda: _conv(),
    "conv bit-serial offset": lambda: _conv(mapping="offset", input_mode="bit-serial"),
    "conv ADC off": lambda: _conv(psum_granularity="off"),
    "linear ADC": lambda: _linear(mapping="differential-row"),
    "linear bit-serial": lambda: _linear(input_mode="bit-serial"),
}


def _ready(make):
    layer, x = make()
    calibrate(layer, [x])
    layer.eval()
    return layer, x


def _cached(layer, x):
    with torch.no_grad():
        return layer(x)


def _uncached(layer, x):
    """The same eval forward with autograd reaching the weights: the cache is not used."""
    misses, hits = layer.eval_cache.misses, layer.eval_cache.hits
    with torch.enable_grad():
        out = layer(x).detach()
    assert (layer.eval_cache.misses, layer.eval_cache.hits) == (misses, hits)
    return out


def _check_fresh(layer, x):
    """The next cached forward recomputes the form and equals an uncached forward."""
    misses = layer.eval_cache.misses
    out = _cached(layer, x)
    assert layer.eval_cache.misses > misses
    assert torch.equal(out, _uncached(layer, x))
    return out


@pytest.mark.parametrize("name", list(LAYERS))
def test_eval_forward_reuses_the_crossbar_form(name):
    layer, x = _ready(LAYERS[name])
    first = _cached(layer, x)
    hits, misses = layer.eval_cache.hits, layer.eval_cache.misses
    assert len(layer.eval_cache) > 0 and misses > 0
    second = _cached(layer, x)
    assert layer.eval_cache.misses == misses and layer.eval_cache.hits > hits
    assert torch.equal(first, second) and torch.equal(first, _uncached(layer, x))
    with torch.inference_mode():
        assert torch.equal(layer(x), first)


@pytest.mark.parametrize("name", list(LAYERS))
def test_in_place_weight_change_is_seen(name):
    layer, x = _ready(LAYERS[name])
    before = _cached(layer, x)
    with torch.no_grad():
        layer.weight.mul_(-1.5)
    assert not torch.equal(_check_fresh(layer, x), before)


def test_optimizer_step_is_seen():
    layer, x = _ready(LAYERS["conv fused ADC"])
    before = _cached(layer, x)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.5)
    layer.weight.grad = torch.randn_like(layer.weight)
    layer.weight_step_module.step.grad = torch.randn_like(layer.weight_step_module.step)
    optimizer.step()
    assert not torch.equal(_check_fresh(layer, x), before)


def test_load_state_dict_is_seen():
    layer, x = _ready(LAYERS["linear ADC"])
    other = copy.deepcopy(layer)
    with torch.no_grad():
        other.weight.add_(torch.randn_like(other.weight))
    before = _cached(layer, x)
    layer.load_state_dict(other.state_dict())
    out = _check_fresh(layer, x)
    assert not torch.equal(out, before) and torch.equal(out, _cached(other, x))


@pytest.mark.parametrize("name", ["conv fused ADC", "linear ADC"])
def test_set_bits_is_seen(name):
    layer, x = _ready(LAYERS[name])
    before = _cached(layer, x)
    layer.set_bits(3, 4)
    layer.train()
    calibrate(layer, [x])
    layer.eval()
    assert not torch.equal(_check_fresh(layer, x), before)
    assert layer.plan.w_bit == 3


def test_set_input_mode_is_seen():
    layer, x = _ready(LAYERS["conv fused ADC"])
    before = _cached(layer, x)
    layer.set_input_mode("bit-serial")
    layer.train()
    calibrate(layer, [x])
    layer.eval()
    assert not torch.equal(_check_fresh(layer, x), before)


def test_train_mode_empties_the_cache_and_a_training_step_is_seen():
    layer, x = _ready(LAYERS["conv fused ADC"])
    before = _cached(layer, x)
    layer.train()
    assert len(layer.eval_cache) == 0
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer(x).square().sum().backward()
    optimizer.step()
    layer.eval()
    assert not torch.equal(_check_fresh(layer, x), before)


def test_no_cache_where_autograd_reaches_the_weights():
    """Eval mode with gradients on: every forward recomputes, and the weight gets its gradient."""
    layer, x = _ready(LAYERS["linear ADC"])
    layer(x).sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    assert layer.eval_cache.hits == 0 and layer.eval_cache.misses == 0


@pytest.mark.parametrize("name", list(LAYERS))
def test_a_copied_layer_starts_with_an_empty_cache(name):
    """deepcopy drops the kept form (it may hold oneDNN's prepacked int8 weight, which cannot be
    copied); the copy recomputes it and gives the same outputs."""
    layer, x = _ready(LAYERS[name])
    first = _cached(layer, x)
    assert len(layer.eval_cache) > 0
    twin = copy.deepcopy(layer)
    assert len(twin.eval_cache) == 0 and len(layer.eval_cache) > 0
    assert torch.equal(_cached(twin, x), first) and len(twin.eval_cache) > 0


FUSED_ADC = ["conv fused ADC", "conv bit-serial offset", "linear ADC", "linear bit-serial"]


@pytest.mark.parametrize("name", FUSED_ADC)
def test_adc_step_change_is_seen(name):
    """The conversion constants (gamma, the ADC steps) are kept with the crossbar form: an in-place
    change of the ADC step recomputes them."""
    layer, x = _ready(LAYERS[name])
    before = _cached(layer, x)
    assert any(name.startswith("fused_form") for name in layer.eval_cache._values)
    with torch.no_grad():
        layer.psum_adc.step.mul_(1.7)
    assert not torch.equal(_check_fresh(layer, x), before)


def test_adc_bits_and_loaded_adc_state_are_seen():
    layer, x = _ready(LAYERS["conv fused ADC"])
    before = _cached(layer, x)
    layer.set_bits(layer.w_bit, layer.a_bit, adc_bits=3)
    layer.train()
    calibrate(layer, [x])
    layer.eval()
    after_bits = _check_fresh(layer, x)
    assert not torch.equal(after_bits, before)
    other = copy.deepcopy(layer)
    with torch.no_grad():
        other.psum_adc.step.mul_(0.6)
    layer.load_state_dict(other.state_dict())
    out = _check_fresh(layer, x)
    assert not torch.equal(out, after_bits) and torch.equal(out, _cached(other, x))


def test_no_cache_where_autograd_reaches_only_the_adc_step():
    """Weights frozen, the ADC step still learning: eval forwards with gradients on recompute."""
    layer, x = _ready(LAYERS["conv fused ADC"])
    layer.weight.requires_grad_(False)
    layer.weight_step_module.step.requires_grad_(False)
    layer(x).sum().backward()
    assert layer.psum_adc.step.grad is not None and layer.psum_adc.step.grad.abs().sum() > 0
    assert layer.eval_cache.hits == 0 and layer.eval_cache.misses == 0


def test_the_key_reads_every_parameter_and_buffer_of_the_weight_side_and_the_adc():
    """The cache key's walk finds what parameters() and buffers() find, with no modules' generators."""
    layer, _ = _conv()
    for module in (layer.weight_quant, layer.psum_adc, layer):
        found = module_tensors(module)
        expected = [t for _, t in module.named_parameters(remove_duplicate=False)]
        expected += [t for _, t in module.named_buffers(remove_duplicate=False)]
        assert sorted(map(id, found)) == sorted(map(id, expected)) and found
