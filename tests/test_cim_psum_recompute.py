"""The fused crossbar+ADC node makes large partial sums in chunks of input rows and recomputes them
in its backward instead of keeping them: the outputs and gradients of keeping them whole, and
nothing partial-sum-sized saved."""
import pytest
import torch

from lib.cim import CIMConv2d, CIMLinear, HardwareConfig, calibrate
from lib.cim import crossbar_adc
from lib.cim.runtime import RUNTIME
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
        shape = (2, 5, 37)
    calibrate(layer, [torch.randn(shape)])
    assert layer.psum_adc.fusable
    return layer, shape


def _step(layer, x):
    params = [layer.weight, layer.bias, layer.weight_step_module.step, layer.input_step_module.step,
              layer.psum_adc.step]
    out = layer(x)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    return out.detach(), torch.autograd.grad((out * weights).sum(), [x] + params)


def _saved(out: torch.Tensor) -> list:
    """The tensors (None where not saved) the output's crossbar+ADC node keeps for its backward:
    input, array weights, partial sums, ADC step, gamma."""
    node, seen = out.grad_fn, set()
    stack = [node]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ == "_CrossbarADCBackward":
            return list(node.saved_tensors)
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    raise AssertionError("no crossbar+ADC node in the graph")


@pytest.mark.parametrize("kind", ["conv", "linear"])
@pytest.mark.parametrize("input_mode", ["multi-bit", "bit-serial"])
@pytest.mark.parametrize("items_per_chunk", [1, 3])
def test_chunked_recomputed_partial_sums_give_the_kept_results(kind, input_mode, items_per_chunk, monkeypatch):
    """Chunks of one image (token), and of three with a shorter last one."""
    layer, shape = _layer(kind, input_mode)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(7), requires_grad=True)
    with scratch_buffers():
        kept_out, kept_grads = _step(layer, x)
        out = layer(x)
        psums = _saved(out)[2]
        rows_per_item = out.shape[2] * out.shape[3] if kind == "conv" else 1
        items = psums.shape[0] // rows_per_item
        assert items % 3 and items > 3
        chunk = items_per_chunk * psums.numel() * psums.element_size() // items
        monkeypatch.setattr(crossbar_adc, "PARTIAL_SUM_CHUNK_BYTES", chunk)
        chunked_out, chunked_grads = _step(layer, x)
        assert _saved(layer(x))[2] is None
    assert torch.allclose(chunked_out, kept_out, rtol=1e-6, atol=1e-6 * kept_out.abs().max().item())
    for got, want in zip(chunked_grads, kept_grads):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6 * want.abs().max().clamp_min(1e-6).item())


@pytest.mark.parametrize("kind", ["conv", "linear"])
@pytest.mark.parametrize("mode", ["0", "auto"])
def test_chunked_forward_without_autograd_writes_the_kept_outputs(kind, mode, monkeypatch):
    """Where nothing is differentiated, each chunk is converted straight into its rows of the
    output (eager and fused kernels): the outputs of the whole partial sums."""
    layer, shape = _layer(kind, "multi-bit")
    x = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    with RUNTIME.use(compile=mode), torch.no_grad():
        kept = layer(x)
        monkeypatch.setattr(crossbar_adc, "PARTIAL_SUM_CHUNK_BYTES", 1)  # one image (token) per chunk
        chunked = layer(x)
    assert torch.allclose(chunked, kept, rtol=1e-6, atol=1e-6 * kept.abs().max().item())
