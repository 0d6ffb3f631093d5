"""The fused crossbar+ADC node recomputes large partial sums in its backward instead of keeping
them: same outputs and gradients as keeping them, and nothing partial-sum-sized saved."""
import pytest
import torch

from lib.cim import CIMConv2d, CIMLinear, HardwareConfig, calibrate
from lib.cim import crossbar_adc
from lib.cim.scratch import scratch_buffers


def _layer(kind: str, input_mode: str):
    hw = HardwareConfig(rows=40, cols=64, cell_bits=2, adc_bits=4, mapping="differential-column",
                        weight_granularity="column", psum_granularity="column", input_mode=input_mode,
                        input_bits=2)
    torch.manual_seed(3)
    if kind == "conv":
        layer = CIMConv2d(10, 6, 3, stride=2, padding=1, groups=2, hw=hw, w_bit=5, a_bit=4)
        shape = (4, 10, 8, 8)
    else:
        layer = CIMLinear(37, 5, hw=hw, w_bit=6, a_bit=4)
        shape = (3, 4, 37)
    calibrate(layer, [torch.randn(shape)])
    assert layer.psum_adc.fusable
    return layer, shape


def _step(layer, x):
    params = [layer.weight, layer.bias, layer.weight_step_module.step, layer.input_step_module.step,
              layer.psum_adc.step]
    out = layer(x)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    return out.detach(), torch.autograd.grad((out * weights).sum(), [x] + params)


def _saved_bytes(out: torch.Tensor) -> int:
    """Bytes of the tensors the output's crossbar+ADC node saved for its backward."""
    node, seen = out.grad_fn, set()
    stack = [node]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ == "_CrossbarADCBackward":
            return sum(t.numel() * t.element_size() for t in node.saved_tensors if t is not None)
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    raise AssertionError("no crossbar+ADC node in the graph")


@pytest.mark.parametrize("kind", ["conv", "linear"])
@pytest.mark.parametrize("input_mode", ["multi-bit", "bit-serial"])
def test_recomputed_partial_sums_give_the_kept_results(kind, input_mode, monkeypatch):
    layer, shape = _layer(kind, input_mode)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(7), requires_grad=True)
    with scratch_buffers():
        kept_out, kept_grads = _step(layer, x)
        kept_saved = _saved_bytes(layer(x))
        monkeypatch.setattr(crossbar_adc, "KEEP_PARTIAL_SUMS_BYTES", 0)
        out, grads = _step(layer, x)
        recomputed_saved = _saved_bytes(layer(x))
    assert torch.equal(out, kept_out)
    for got, want in zip(grads, kept_grads):
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-7 * want.abs().max().clamp_min(1e-6).item())
    assert recomputed_saved < kept_saved
