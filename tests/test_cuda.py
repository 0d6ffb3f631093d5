"""The CIM layers on a GPU compute what they compute on the CPU (runs where CUDA is present).

CPU-only machines (CI) skip this module; a GPU machine runs it as part of `make test`.
Float64 makes the two devices' partial sums agree to ~1e-12, far from any quantizer boundary,
so outputs and gradients must match closely; the fused (compiled) kernels are then checked
against the eager ones on the GPU in float32.
"""
import itertools

import pytest
import torch

from runtime_support import set_runtime
from lib.cim import CIMConv2d, CIMLinear, HardwareConfig, calibrate

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

MAPPINGS = ["offset", "differential-column", "differential-row"]


def _hw(mapping, psum="column", n_sigma=None):
    return HardwareConfig(rows=40, cols=64, cell_bits=2, adc_bits=6, mapping=mapping, weight_granularity="column",
                          psum_granularity=psum, n_sigma=n_sigma)


def _run(layer, x, device, dtype):
    """(output, gradients of x and every parameter) of two training steps' worth of forward/backward."""
    layer = layer.to(device=device, dtype=dtype).train()
    x = x.to(device=device, dtype=dtype).requires_grad_(True)
    out = layer(x)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=dtype).to(device)
    params = [x] + [p for _, p in sorted(layer.named_parameters())]
    grads = torch.autograd.grad((out * weights).sum(), params, allow_unused=True)
    return out.detach().cpu(), [None if g is None else g.detach().cpu() for g in grads]


def _calibrated(factory, x):
    layer = factory()
    calibrate(layer, [x])
    return layer


def _assert_same(cpu, gpu, rtol):
    (out_c, grads_c), (out_g, grads_g) = cpu, gpu
    torch.testing.assert_close(out_g, out_c, rtol=rtol, atol=rtol * out_c.abs().max().item())
    for g_c, g_g in zip(grads_c, grads_g):
        assert (g_c is None) == (g_g is None)
        if g_c is not None:
            torch.testing.assert_close(g_g, g_c, rtol=rtol, atol=rtol * g_c.abs().max().clamp_min(1e-6).item())


@pytest.mark.parametrize("mapping,n_sigma", list(itertools.product(MAPPINGS, [None, 2.0])))
def test_conv_cuda_equals_cpu(monkeypatch, mapping, n_sigma):
    """Fused MVM+ADC node (no clipping) and composed path (clipping), forward and all gradients."""
    set_runtime(monkeypatch, compile="0")
    torch.manual_seed(0)
    x = torch.randn(4, 10, 9, 11, dtype=torch.float64)
    layer = _calibrated(lambda: CIMConv2d(10, 6, 3, padding=1, groups=2, hw=_hw(mapping, n_sigma=n_sigma),
                                          w_bit=5, a_bit=6, input_signed=True).double(), x)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    cpu = _run(layer, x, "cpu", torch.float64)
    layer.load_state_dict(state)
    gpu = _run(layer, x, "cuda", torch.float64)
    _assert_same(cpu, gpu, rtol=1e-7)


@pytest.mark.parametrize("mapping", MAPPINGS)
def test_linear_cuda_equals_cpu(monkeypatch, mapping):
    set_runtime(monkeypatch, compile="0")
    torch.manual_seed(1)
    x = torch.randn(3, 5, 70, dtype=torch.float64)
    layer = _calibrated(lambda: CIMLinear(70, 12, hw=_hw(mapping), w_bit=6, a_bit=5).double(), x)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    cpu = _run(layer, x, "cpu", torch.float64)
    layer.load_state_dict(state)
    gpu = _run(layer, x, "cuda", torch.float64)
    _assert_same(cpu, gpu, rtol=1e-7)


def test_compiled_kernels_on_cuda_equal_eager(monkeypatch):
    """Inductor's fused ADC kernels on the GPU against the eager kernels on the GPU (float32)."""
    torch.manual_seed(2)
    x = torch.randn(8, 16, 12, 12)
    layer = _calibrated(lambda: CIMConv2d(16, 8, 3, padding=1, hw=_hw("differential-column"), w_bit=4, a_bit=4), x)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    set_runtime(monkeypatch, compile="0")
    eager = _run(layer, x, "cuda", torch.float32)
    layer.load_state_dict(state)
    set_runtime(monkeypatch, compile="1")
    fused = _run(layer, x, "cuda", torch.float32)
    out_e, out_f = eager[0], fused[0]
    # float32 sums in another order can move a partial sum across one ADC boundary: allow a few.
    close = torch.isclose(out_f, out_e, rtol=1e-4, atol=1e-4 * out_e.abs().max().item())
    assert close.float().mean().item() > 0.99
