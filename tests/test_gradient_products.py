"""bfloat16 gradient products (lib.cim.gradient_products): taken only when asked for, on float32 CPU
tensors where bfloat16 is native; the forward stays bit for bit the same and the gradients within
bfloat16 rounding of the float32 ones, for convs and linear layers, every mapping, kept and chunked
partial sums, bit-serial inputs and the composed path; a short training run follows the float32
one; the CLIs pin the format from the environment and refuse a bad one."""
from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lib.cim import calibrate, crossbar_adc, slice_merge
from lib.cim.gradient_products import gradient_dtype, native_bfloat16
from lib.cim.runtime import RUNTIME, Runtime, RuntimeSettingError
from lib.cim.hardware import HardwareConfig
from lib.cim.layers import CIMConv2d, CIMLinear
from lib.cim.scratch import scratch_buffers

REPO = Path(__file__).resolve().parents[1]
bfloat16_here = pytest.mark.skipif(not native_bfloat16(), reason="this CPU has no native bfloat16 in oneDNN")
MAPPINGS = ["offset", "differential-column", "differential-row"]


def _hw(**kw) -> HardwareConfig:
    base = dict(rows=40, cols=64, cell_bits=2, input_bits=2, adc_bits=5, mapping="differential-column",
                weight_granularity="column", psum_granularity="column", input_mode="multi-bit")
    base.update(kw)
    return HardwareConfig(**base)


def _layer(kind: str, hw: HardwareConfig, signed: bool):
    torch.manual_seed(0)
    if kind == "conv":
        layer = CIMConv2d(12, 6, 3, padding=1, hw=hw, w_bit=5, a_bit=6, input_signed=signed)
        x = torch.randn(4, 12, 8, 8) if signed else torch.rand(4, 12, 8, 8)
    else:
        layer = CIMLinear(70, 5, hw=hw, w_bit=5, a_bit=6, input_signed=signed)
        x = torch.randn(3, 6, 70) if signed else torch.rand(3, 6, 70)
    calibrate(layer, [x])
    return layer, x


def _forward_backward(layer, x, products: str):
    """(output, gradients of x and of every parameter) of one training step with `products`."""
    xg = x.clone().requires_grad_()
    params = [p for p in layer.parameters() if p.requires_grad]
    with scratch_buffers(), RUNTIME.use(gradient_products=products):
        out = layer(xg)
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        grads = torch.autograd.grad((out * weights).sum(), [xg] + params, allow_unused=True)
    return out.detach(), [(g, p) for g, p in zip(grads, [xg] + params) if g is not None]


def _assert_bfloat16_close(layer, x):
    """Same outputs bit for bit; every gradient within bfloat16 rounding of float32, and the input
    gradient not bit-identical (bfloat16 ran). Measured: 0.2-0.4% of a gradient's norm; 1.7% for
    the offset mapping's input gradient (its reference column's gradient cancels the columns'
    offset part, which rounding no longer cancels exactly); up to 3% for the weight-step sums."""
    _forward_backward(layer, x, "float32")  # the first training forward refits the input step
    out_f, grads_f = _forward_backward(layer, x, "float32")
    out_b, grads_b = _forward_backward(layer, x, "bfloat16")
    assert torch.equal(out_f, out_b)
    for (got, _), (want, param) in zip(grads_b, grads_f):
        assert got.dtype == want.dtype == torch.float32
        bound = 0.05 if want.numel() < 64 else 0.025
        assert float((got - want).norm()) <= bound * float(want.norm()) + 1e-12, tuple(param.shape)
    assert not torch.equal(grads_b[0][0], grads_f[0][0])


def test_only_bfloat16_products_on_a_float32_cpu_tensor_take_bfloat16():
    like = torch.zeros(2)
    with RUNTIME.use(gradient_products="float32"):
        assert gradient_dtype(like) == torch.float32
    with RUNTIME.use(gradient_products="bfloat16"):
        assert gradient_dtype(like) == (torch.bfloat16 if native_bfloat16() else torch.float32)
        assert gradient_dtype(like.double()) == torch.float64


@bfloat16_here
@pytest.mark.parametrize("kind,mapping,signed", list(itertools.product(["conv", "linear"], MAPPINGS, [True, False])))
@pytest.mark.parametrize("backward", ["merged", "full"])
def test_bfloat16_products_keep_the_forward_and_round_only_the_gradients(kind, mapping, signed, backward, monkeypatch):
    """Kept partial sums and chunks recomputed in the backward alike; the slices merged (little
    clipping, lib.cim.slice_merge) or the full backward."""
    if backward == "full":
        monkeypatch.setattr(slice_merge.MergedSlices, "for_node", staticmethod(lambda *args: None))
    for chunk_bytes in (crossbar_adc.PARTIAL_SUM_CHUNK_BYTES, 512):
        monkeypatch.setattr(crossbar_adc, "PARTIAL_SUM_CHUNK_BYTES", chunk_bytes)
        layer, x = _layer(kind, _hw(mapping=mapping), signed)
        _assert_bfloat16_close(layer, x)


@bfloat16_here
@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_bit_serial_and_composed_paths_round_their_gradients_the_same_way(kind):
    """Bit-serial inputs, and the composed path (ADC that inspects its partial sums first: n-sigma)."""
    _assert_bfloat16_close(*_layer(kind, _hw(input_mode="bit-serial"), False))
    composed, x = _layer(kind, _hw(), False)
    composed.psum_adc.n_sigma = 3.0
    assert not composed.psum_adc.fusable
    _assert_bfloat16_close(composed, x)


@bfloat16_here
def test_training_with_bfloat16_gradients_follows_the_float32_run():
    """Twenty SGD steps of a two-layer CIM network: the loss curves stay within 2% of each other."""
    losses = {}
    for products in ("float32", "bfloat16"):
        torch.manual_seed(0)
        conv = CIMConv2d(3, 8, 3, padding=1, hw=_hw(), w_bit=4, a_bit=4, input_signed=True)
        head = CIMLinear(8 * 36, 4, hw=_hw(), w_bit=4, a_bit=4, input_signed=False)
        x, y = torch.randn(32, 3, 6, 6), torch.randint(0, 4, (32,))
        model = torch.nn.Sequential(conv, torch.nn.ReLU(), torch.nn.Flatten(), head)
        calibrate(model, [x])
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        curve = []
        with scratch_buffers(), RUNTIME.use(gradient_products=products):
            for _ in range(20):
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(model(x), y)
                loss.backward()
                opt.step()
                curve.append(loss.item())
        losses[products] = torch.tensor(curve)
    assert losses["bfloat16"][-1] < 0.8 * losses["bfloat16"][0]
    assert torch.allclose(losses["bfloat16"], losses["float32"], rtol=0.02)


def test_format_is_read_from_the_environment():
    assert Runtime.from_environment({}).gradient_products == "float32"  # the default
    assert Runtime.from_environment({"CIM_AQ_GRADIENT_PRODUCTS": " BFloat16 "}).gradient_products == "bfloat16"


def test_bad_format_is_a_user_error_naming_the_value():
    expected = r"CIM_AQ_GRADIENT_PRODUCTS='bf16' is not allowed: expected one of \['float32', 'bfloat16'\]"
    with pytest.raises(RuntimeSettingError, match=expected):
        Runtime.from_environment({"CIM_AQ_GRADIENT_PRODUCTS": "bf16"})
    with pytest.raises(RuntimeSettingError, match="gradient_products='half' is not allowed"):
        Runtime(gradient_products="half")
    env = {**os.environ, "CIM_AQ_GRADIENT_PRODUCTS": "bf16"}
    done = subprocess.run([sys.executable, "-m", "lib.workflow.report", "--config", "missing.yaml"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert [line for line in done.stderr.splitlines() if line.startswith("error:")] == [
        "error: CIM_AQ_GRADIENT_PRODUCTS='bf16' is not allowed: expected one of ['float32', 'bfloat16']"]
