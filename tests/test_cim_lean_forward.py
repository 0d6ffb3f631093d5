"""The CIM layers' lean forward on real Brevitas layers: the input quantizer called directly equals
Brevitas' proxy chain (values, gradients, step statistics), train()/eval() set every submodule as
nn.Module does, and the constants made once per setting survive inference mode."""
import copy

import pytest
import torch
from torch import nn


from lib.cim import CIMConv2d, CIMLinear, HardwareConfig, calibrate
from lib.cim.adc_kernels import grid_bounds
from lib.cim.constants import powers_of_two
from lib.cim.runtime import RUNTIME
from runtime_support import set_runtime
from lib.cim.fused_quant import fake_quant, fake_quant_abs_sum


def _hw(**kw):
    base = dict(rows=40, cols=64, cell_bits=2, adc_bits=5, mapping="differential-column",
                weight_granularity="column", psum_granularity="column", input_mode="multi-bit")
    base.update(kw)
    return HardwareConfig(**base)


def _layers():
    """A signed conv (bit-serial, offset mapping, bias), an unsigned conv, a signed linear layer."""
    torch.manual_seed(0)
    return [
        (CIMConv2d(10, 6, 3, padding=1, groups=2, hw=_hw(mapping="offset", input_mode="bit-serial", input_bits=2),
                   w_bit=5, a_bit=4), torch.randn(2, 10, 6, 6)),
        (CIMConv2d(10, 6, 3, padding=1, bias=False, hw=_hw(), w_bit=4, a_bit=3, input_signed=False),
         torch.randn(2, 10, 6, 6).relu()),
        (CIMLinear(37, 5, hw=_hw(mapping="differential-row"), w_bit=6, a_bit=4), torch.randn(7, 37)),
    ]


def _through_proxy(layer):
    """The same layer, made to quantize its input through Brevitas' proxy chain (a quantizer that
    keeps its evaluation output is not the plain one, so the layer takes the proxy)."""
    other = copy.deepcopy(layer)
    other.input_quant.cache_inference_quant_act = True
    assert other._plain_input_quant() is None and layer._plain_input_quant() is not None
    return other


def _run(layer, x):
    x = x.clone().requires_grad_(True)
    out = layer(x)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    params = [x, layer.weight, layer.input_step_module.step, layer.weight_step_module.step, layer.psum_adc.step]
    return out.detach(), torch.autograd.grad((out * weights).sum(), params, allow_unused=True)


@pytest.mark.parametrize("index", range(3))
def test_direct_input_quantizer_equals_brevitas_proxy_chain(index):
    """Training forwards, after a change of input bits, and in evaluation: the same outputs and
    the input's and weight's gradients bit for bit; the steps' gradients and the input step's
    running |x| mean (sums over the whole input, which a conv's direct quantizer reads in another
    layout, or in the fake-quant kernel rather than in a pass of their own) up to summation order."""
    layer, x = _layers()[index]
    calibrate(layer, [x])
    layer.train()
    proxy = _through_proxy(layer)
    for step in range(3):
        if step == 2:  # a new input grid: both re-derive it from the bits
            layer.set_bits(layer.w_bit, 2)
            proxy.set_bits(proxy.w_bit, 2)
        out, grads = _run(layer, x)
        out_p, grads_p = _run(proxy, x)
        assert torch.equal(out, out_p)
        for g, g_p in zip(grads[:2], grads_p[:2]):
            assert torch.equal(g, g_p)
        for g, g_p in zip(grads[2:], grads_p[2:]):
            assert torch.allclose(g, g_p, rtol=1e-5, atol=0)
        assert torch.allclose(layer.input_step_module.running_abs_mean, proxy.input_step_module.running_abs_mean,
                              rtol=1e-6, atol=0)
    layer.eval()
    proxy.eval()
    with torch.no_grad():
        assert torch.equal(layer(x), proxy(x))
    value, scale = layer._quantize_input(x)
    reference = proxy.input_quant(x)
    assert torch.equal(value, reference.value) and torch.equal(scale, reference.scale)


@pytest.mark.parametrize("compile_mode", ["auto", "0"])
def test_running_abs_mean_follows_its_definition(compile_mode, monkeypatch):
    """Each training forward moves the input step's running statistic towards the batch's mean
    |x| by the momentum (fused kernel and eager fallback alike); evaluation and a forward that
    fits the step after a bit change leave it alone."""
    layer, x = _layers()[1]
    calibrate(layer, [x])
    module = layer.input_step_module
    set_runtime(monkeypatch, compile=compile_mode)
    layer.train()
    expected = module.running_abs_mean.clone()
    for scale in (1.0, 3.0, 0.5):
        batch = (x * scale).requires_grad_(True)
        layer(batch).sum().backward()
        expected = expected.lerp(batch.detach().abs().mean().view(1), module.momentum)
        assert torch.allclose(module.running_abs_mean, expected, rtol=1e-6, atol=0)
    with torch.no_grad():
        layer(x * 7.0)  # no gradient, still training: recorded too
    expected = expected.lerp((x * 7.0).abs().mean().view(1), module.momentum)
    assert torch.allclose(module.running_abs_mean, expected, rtol=1e-6, atol=0)
    layer.set_bits(layer.w_bit, layer.a_bit + 1)
    fitted = module.running_abs_mean.clone()
    layer(x * 5.0)  # fits the step to this batch instead
    assert torch.equal(module.running_abs_mean, fitted)
    layer.eval()
    with torch.no_grad():
        layer(x * 9.0)
    assert torch.equal(module.running_abs_mean, fitted)
    assert "quant_forward_abs_sum" not in RUNTIME.failed


def test_train_and_eval_set_every_submodule_as_nn_module_does():
    layer, _ = _layers()[0]
    model = nn.Sequential(layer, nn.ReLU())
    for mode in (False, True, False):
        reference = copy.deepcopy(model)
        nn.Module.train(reference, mode)  # the generic walk, every module by its own train()
        assert model.train(mode) is model
        flags = [m.training for m in model.modules()]
        assert flags == [m.training for m in reference.modules()] and set(flags) == {mode}
    with pytest.raises(ValueError, match="training mode='yes' is not allowed: expected a bool"):
        layer.train("yes")


def test_constants_made_in_inference_mode_serve_a_later_backward():
    """Grid bounds and powers of two are made once per setting, possibly first under
    inference_mode; a training graph must still be able to save them for its backward."""
    x = torch.randn(5, dtype=torch.float64)
    with torch.inference_mode():
        lo, hi = grid_bounds(x, -3, 1234)
        powers = powers_of_two(7, 3, x.dtype, x.device)
    assert not lo.is_inference() and not powers.is_inference()
    assert torch.equal(powers, torch.tensor([1.0, 2.0 ** 7, 2.0 ** 14], dtype=torch.float64))
    x.requires_grad_(True)
    scale = torch.tensor([0.25], dtype=torch.float64, requires_grad=True)
    (fake_quant(x, scale, lo, hi).sum() + (x[:3] * powers).sum()).backward()
    assert x.grad is not None and scale.grad is not None


def test_hooks_on_the_input_quantizer_still_run():
    """A forward hook on the input quantizer (e.g. to record activations) sends the layer through
    Brevitas' proxy, so the hook sees every forward, with the same output."""
    layer, x = _layers()[1]
    calibrate(layer, [x])
    layer.eval()
    with torch.no_grad():
        plain = layer(x)
    seen = []
    handle = layer.input_quant.register_forward_hook(lambda module, args, out: seen.append(out.value))
    assert layer._plain_input_quant() is None
    with torch.no_grad():
        hooked = layer(x)
    handle.remove()
    assert len(seen) == 1 and torch.equal(hooked, plain)
    assert torch.equal(seen[0], layer._quantize_input(x)[0])


@pytest.mark.parametrize("compile_mode", ["auto", "0"])
@pytest.mark.parametrize("with_abs_sum", [False, True])
def test_quantizing_into_channels_last_keeps_the_values_and_the_inputs_gradient_layout(compile_mode, with_abs_sum):
    """The fake quantization written channels_last from an NCHW input (fused kernel and eager
    fallback): the same values and Σ|x|, NHWC memory; its backward, given the NHWC gradient the
    conv's crossbar path returns, gives the input's gradient in NCHW and the step's, both equal
    to those of the NCHW quantization given an NCHW gradient."""
    with RUNTIME.use(compile=compile_mode):
        x = torch.randn(2, 6, 5, 7)
        scale, lo, hi = torch.tensor(0.3), torch.tensor(-8.0), torch.tensor(7.0)
        grad = torch.randn(2, 5, 7, 6).permute(0, 3, 1, 2)  # NHWC memory
        results = []
        for channels_last in (False, True):
            xg, sg = x.clone().requires_grad_(True), scale.clone().requires_grad_(True)
            quantize = fake_quant_abs_sum if with_abs_sum else fake_quant
            out = quantize(xg, sg, lo, hi, channels_last)
            value, abs_sum = out if with_abs_sum else (out, None)
            assert value.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
            grad_x, grad_s = torch.autograd.grad(value, [xg, sg], grad if channels_last else grad.contiguous())
            assert grad_x.is_contiguous()  # as the backward returned it (a leaf's .grad would be made so)
            results.append((value, abs_sum, grad_x, grad_s))
    (value, abs_sum, grad_x, grad_s), (value_cl, abs_sum_cl, grad_x_cl, grad_s_cl) = results
    assert torch.equal(value_cl, value) and torch.equal(grad_x_cl, grad_x)
    assert torch.allclose(grad_s_cl, grad_s, rtol=1e-5, atol=1e-6)
    if with_abs_sum:
        assert torch.allclose(abs_sum_cl, abs_sum, rtol=1e-6)


@pytest.mark.parametrize("input_mode", ["multi-bit", "bit-serial"])
def test_a_conv_quantizes_an_nchw_input_channels_last_with_the_same_results(input_mode, monkeypatch):
    """A CIM conv's crossbar path quantizes an NCHW input straight into channels_last: the
    outputs and every gradient (the input's NCHW) as when it quantizes it NCHW and its crossbar
    path changes the layout itself."""
    torch.manual_seed(3)
    layer = CIMConv2d(11, 6, 3, padding=1, hw=_hw(input_mode=input_mode, input_bits=2), w_bit=4, a_bit=4)
    x = torch.randn(2, 11, 6, 6)
    calibrate(layer, [x])
    layer.train()
    assert layer._quantizes_channels_last(x, layer.route_for(x))
    direct = _run(layer, x)
    monkeypatch.setattr(CIMConv2d, "_quantizes_channels_last", lambda self, inp, route: False)
    converted = _run(layer, x)
    assert torch.equal(direct[0], converted[0])
    for got, want in zip(direct[1], converted[1]):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6 * want.abs().max().item())
