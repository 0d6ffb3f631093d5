"""The crossbar node's merged-slice backward (lib.cim.slice_merge) gives the full backward's
gradients, for convs and linear layers: with no clipped column, with a few clipped columns
corrected, and it hands a layer whose ADC clips many columns to the full backward."""
import pytest
import torch

from runtime_support import set_runtime
from lib.cim import CIMConv2d, CIMLinear, HardwareConfig, calibrate
from lib.cim import slice_merge
from lib.cim.adc_kernels import adc_backward, clip_sums
from lib.cim.scratch import scratch_buffers

MAPPINGS = ["offset", "differential-column", "differential-row"]


def _layer(mapping: str, input_mode: str = "multi-bit", psum_granularity: str = "column", kind: str = "conv"):
    """A conv with groups, stride, dilation and a ragged last row-tile, or a linear layer with a
    ragged last row-tile; calibrated, ADC on."""
    hw = HardwareConfig(rows=16 if kind == "linear" else 40, cols=64, cell_bits=2, adc_bits=5, mapping=mapping,
                        weight_granularity="column", psum_granularity=psum_granularity, input_mode=input_mode,
                        input_bits=2)
    torch.manual_seed(3)
    if kind == "conv":
        layer = CIMConv2d(10, 6, 3, stride=2, padding=2, dilation=2, groups=2, hw=hw, w_bit=5, a_bit=4)
    elif kind == "conv, one group":  # the merged products skip the padding channels
        layer = CIMConv2d(13, 6, 3, stride=2, padding=1, hw=hw, w_bit=5, a_bit=4)
    else:
        layer = CIMLinear(37, 5, hw=hw, w_bit=6, a_bit=4)
    assert layer.layout.tiles >= 2 and layer.layout.pad > 0
    calibrate(layer, [torch.randn(_shape(kind, 4))])
    assert layer.psum_adc.fusable
    return layer


def _shape(kind: str, items: int) -> tuple:
    return {"conv": (items, 10, 9, 9), "conv, one group": (items, 13, 9, 9)}.get(kind, (items, 3, 37))


def _set_adc_steps(layer, wide: float, narrow_columns: slice = slice(0, 0)) -> None:
    """ADC steps `wide` times their calibrated size (nothing clips when large), and 1/50 of it in
    `narrow_columns` of the first array (those columns clip)."""
    with torch.no_grad():
        step = layer.psum_adc.step
        step.mul_(wide)
        if step.dim() == 2:
            step[0, narrow_columns] /= 50 * wide


def _gradients(layer, x: torch.Tensor) -> list:
    x = x.clone().requires_grad_(True)
    params = [x, layer.weight, layer.weight_step_module.step, layer.input_step_module.step, layer.psum_adc.step]
    out = layer(x)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    return [out.detach()] + list(torch.autograd.grad((out * weights).sum(), params))


def _merged_and_full(layer, x, monkeypatch) -> tuple:
    """(gradients with the merged backward, which routes it took: 'merged' or 'full'; gradients
    of the full backward)."""
    routes = []
    backward = slice_merge.MergedSlices.backward

    def spy(self, *args, **kwargs):
        grads = backward(self, *args, **kwargs)
        routes.append("full" if grads is None else "merged")
        return grads
    with scratch_buffers():
        monkeypatch.setattr(slice_merge.MergedSlices, "backward", spy)
        merged = _gradients(layer, x)
        monkeypatch.setattr(slice_merge.MergedSlices, "for_node", staticmethod(lambda *args: None))
        full = _gradients(layer, x)
    return merged, routes, full


def _assert_close(merged: list, full: list, same_forward: bool = True) -> None:
    if same_forward:  # the forward is untouched
        assert torch.equal(merged[0], full[0])
    for got, want in zip(merged[int(same_forward):], full[int(same_forward):]):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())


def _correct(how: str, monkeypatch) -> None:
    """Correct clipped columns entry by entry ('entries') or with the slotted product ('columns')."""
    monkeypatch.setattr(slice_merge, "SPARSE_SHARE", 0 if how == "entries" else 10**9)


@pytest.mark.parametrize("kind", ["conv", "conv, one group", "linear"])
@pytest.mark.parametrize("mapping", MAPPINGS)
@pytest.mark.parametrize("clipped", ["none", "few, entries", "few, columns"])
def test_merged_backward_equals_the_full_backward(kind, mapping, clipped, monkeypatch):
    layer = _layer(mapping, kind=kind)
    _set_adc_steps(layer, wide=8.0, narrow_columns=slice(0, 0) if clipped == "none" else slice(1, 2))
    _correct(clipped.split(", ")[-1], monkeypatch)
    x = torch.randn(_shape(kind, 4))
    merged, routes, full = _merged_and_full(layer, x, monkeypatch)
    assert routes == ["merged"]
    _assert_close(merged, full)


@pytest.mark.parametrize("kind", ["conv", "linear"])
@pytest.mark.parametrize("correction", ["entries", "columns"])
def test_merged_backward_in_bit_serial_mode(kind, correction, monkeypatch):
    _correct(correction, monkeypatch)
    layer = _layer("differential-column", input_mode="bit-serial", kind=kind)
    assert layer.input_planes == 2
    _set_adc_steps(layer, wide=8.0, narrow_columns=slice(2, 3))
    merged, routes, full = _merged_and_full(layer, torch.randn(_shape(kind, 3)), monkeypatch)
    assert routes == ["merged"]
    _assert_close(merged, full)


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_many_clipped_columns_take_the_full_backward(kind, monkeypatch):
    layer = _layer("offset", psum_granularity="layer", kind=kind)
    _set_adc_steps(layer, wide=1 / 50)
    merged, routes, full = _merged_and_full(layer, torch.randn(_shape(kind, 4)), monkeypatch)
    assert routes == ["full"]
    _assert_close(merged, full)


@pytest.mark.parametrize("kind", ["conv", "conv, one group", "linear"])
@pytest.mark.parametrize("correction", ["entries", "columns"])
def test_merged_backward_over_recomputed_chunks(kind, correction, monkeypatch):
    """Partial sums made in chunks of images (tokens): each chunk decides on its own clipped columns."""
    _correct(correction, monkeypatch)
    monkeypatch.setattr("lib.cim.crossbar_adc.PARTIAL_SUM_CHUNK_BYTES", 256 if kind == "linear" else 4096)
    layer = _layer("differential-column", kind=kind)
    _set_adc_steps(layer, wide=8.0, narrow_columns=slice(0, 1))
    merged, routes, full = _merged_and_full(layer, torch.randn(_shape(kind, 5)), monkeypatch)
    assert len(routes) > 1 and set(routes) == {"merged"}
    _assert_close(merged, full)


@pytest.mark.parametrize("compile_mode", ["0", "1"])
def test_clip_sums_are_the_backward_sums_with_clipped_columns_marked(compile_mode, monkeypatch):
    """adc_kernels.clip_sums, eager and fused: the backward kernel's Σ grad·level, and its Σ grad·v·on_grid
    in every column the ADC did not clip, +inf in exactly the columns it did."""
    set_runtime(monkeypatch, compile=compile_mode)
    torch.manual_seed(0)
    p = torch.randn(64, 2, 6, 5) * torch.rand(1, 2, 6, 5) * 16
    step, gamma, grad_y = torch.rand(2, 6, 5) + 0.5, torch.rand(2, 6, 5), torch.randn(64, 2, 5)
    sum_levels, sum_v = clip_sums(grad_y, p, step, -8, 7)
    _, want_levels, want_v = adc_backward(grad_y, p, step, gamma, -8, 7)
    clipped = ((torch.round(p / step) < -8) | (torch.round(p / step) > 7)).any(dim=0)
    assert 0 < clipped.sum() < clipped.numel()
    assert torch.allclose(sum_levels, want_levels, rtol=1e-5, atol=1e-5)
    assert torch.equal(torch.isinf(sum_v), clipped)
    assert torch.allclose(sum_v[~clipped], want_v[~clipped], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_merged_backward_eager_equals_fused(kind, monkeypatch):
    """CIM_AQ_COMPILE=0 (eager kernels: the sums, a linear layer's merged weight built block by
    block) gives the fused kernels' gradients."""
    layer = _layer("offset", kind=kind)
    _set_adc_steps(layer, wide=8.0, narrow_columns=slice(1, 2))
    x = torch.randn(_shape(kind, 4))
    results = []
    for mode in ("0", "1"):
        set_runtime(monkeypatch, compile=mode)
        merged, routes, _ = _merged_and_full(layer, x, monkeypatch)
        monkeypatch.undo()
        assert routes == ["merged"]
        results.append(merged)
    _assert_close(*results, same_forward=False)  # eager and fused forward kernels round alike only up to float32


@pytest.mark.parametrize("compile_mode", ["0", "1"])
def test_linear_merged_weight_made_in_blocks_of_outputs(compile_mode, monkeypatch):
    """A linear layer's merged weight made a few outputs at a time (bounded memory) gives the same
    gradients as the full backward."""
    set_runtime(monkeypatch, compile=compile_mode)
    monkeypatch.setattr(slice_merge, "FLOAT_BLOCK_BYTES", 2 * 16 * 3 * 4)  # two outputs of 3 tiles of 16 rows
    layer = _layer("differential-column", kind="linear")
    assert layer.layout.tiles == 3 and layer.out_features == 5
    _set_adc_steps(layer, wide=8.0, narrow_columns=slice(1, 2))
    merged, routes, full = _merged_and_full(layer, torch.randn(_shape("linear", 4)), monkeypatch)
    assert routes == ["merged"]
    _assert_close(merged, full)


def test_one_group_conv_whose_input_needs_no_gradient(monkeypatch):
    """A first layer (its input needs no gradient) still keeps the untiled input for the merged
    weight gradient, which equals the full backward's."""
    layer = _layer("differential-column", kind="conv, one group")
    _set_adc_steps(layer, wide=8.0)
    x = torch.randn(_shape("conv, one group", 4))
    params = [layer.weight, layer.weight_step_module.step, layer.psum_adc.step]
    results = []
    for merge in (True, False):
        if not merge:
            monkeypatch.setattr(slice_merge.MergedSlices, "for_node", staticmethod(lambda *args: None))
        with scratch_buffers():
            out = layer(x)
            results.append([out.detach()] + list(torch.autograd.grad(out.sum(), params)))
    _assert_close(*results)
