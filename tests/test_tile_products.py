"""The tiled, bit-sliced partial sums and their hand-written backward (lib.cim.tile_products).

The backward computes the integer weights' gradient with ONE weight-gradient product of the
slice-weighted output gradient; these tests compare it with plain autograd through an explicit
per-slice straight-through estimator, with an output gradient that differs per slice (as the
ADC's on-grid mask makes it).
"""
import pytest
import torch
import torch.nn.functional as F

from lib.cim import CIMConv2d, CIMLinear, HardwareConfig
from lib.cim.crossbar import stored_slices
from lib.cim.tile_products import slice_shares, tile_products

MAPPINGS = ["offset", "differential-column", "differential-row"]


def _hw(mapping, cell_bits=2, rows=40):
    return HardwareConfig(rows=rows, cols=64, cell_bits=cell_bits, mapping=mapping, psum_granularity="column")


def _integer_weights(shape, plan, seed):
    gen = torch.Generator().manual_seed(seed)
    lo, hi = plan.weight_range()
    q = torch.randint(lo, hi + 1, shape, generator=gen).float()
    return q.requires_grad_(True)


def _ste_slices(q, plan):
    """Per-slice straight-through estimator, left to autograd: slice s passes share_s of its
    gradient to q."""
    slices = stored_slices(q.detach(), plan)
    shares = slice_shares(plan).view((-1,) + (1,) * q.dim())
    return slices + shares * (q - q.detach())


def _compare(tiles, x, q, plan, seed):
    got = tile_products(x, q, tiles, plan)
    want = tiles.products(x, tiles.weight(_ste_slices(q, plan)))
    assert torch.equal(got, want)
    upstream = torch.randn(got.shape, generator=torch.Generator().manual_seed(seed))
    got_grads = torch.autograd.grad((got * upstream).sum(), [x, q])
    want_grads = torch.autograd.grad((want * upstream).sum(), [x, q])
    for g, w in zip(got_grads, want_grads):
        assert torch.allclose(g, w, atol=1e-4 * w.abs().max().item(), rtol=1e-4)


@pytest.mark.parametrize("mapping", MAPPINGS)
@pytest.mark.parametrize("cell_bits,bits", [(1, 3), (2, 5), (4, 4)])
def test_conv_backward_equals_per_slice_autograd(mapping, cell_bits, bits):
    """Groups, stride, dilation and a ragged last tile (rows=40 → 4 channels of 3×3 per tile)."""
    layer = CIMConv2d(10, 6, 3, stride=2, padding=2, dilation=2, groups=2, hw=_hw(mapping, cell_bits),
                      w_bit=bits, a_bit=4)
    assert layer.layout.pad > 0 and layer.plan.slices == layer.slices
    tiles = layer.tile.tiles()
    x = tiles.tile_input(torch.randn(3, 10, 9, 11)).detach().requires_grad_(True)
    _compare(tiles, x, _integer_weights(layer.weight.shape, layer.plan, 1), layer.plan, 2)


@pytest.mark.parametrize("mapping", MAPPINGS)
def test_linear_backward_equals_per_slice_autograd(mapping):
    layer = CIMLinear(37, 5, hw=_hw(mapping, rows=16), w_bit=6, a_bit=4)
    assert layer.layout.tiles >= 3 and layer.layout.pad > 0
    tiles = layer.tile.tiles()
    x = tiles.tile_input(torch.randn(7, 37)).detach().requires_grad_(True)
    _compare(tiles, x, _integer_weights(layer.weight.shape, layer.plan, 3), layer.plan, 4)


def test_tiled_conv_input_is_zero_padded_per_group_in_channels_last():
    layer = CIMConv2d(10, 6, 3, groups=2, hw=_hw("offset"), w_bit=4, a_bit=4)
    lay, tiles = layer.layout, layer.tile.tiles()
    x = torch.randn(2, 10, 5, 5)
    tiled = tiles.tile_input(x)
    assert tiled.is_contiguous(memory_format=torch.channels_last)
    per_group = tiled.reshape(2, lay.groups, lay.padded_channels, 5, 5)
    assert torch.equal(per_group[:, :, :lay.in_channels_per_group], x.reshape(2, 2, 5, 5, 5))
    assert per_group[:, :, lay.in_channels_per_group:].abs().sum() == 0
    padded_by_hand = F.pad(x.reshape(2, 2, 5, 5, 5), (0, 0, 0, 0, 0, lay.pad)).reshape(tiled.shape)
    assert torch.equal(tiled, padded_by_hand)


@pytest.mark.parametrize("channels_last", [False, True])
def test_tiled_conv_input_gradient_is_the_pads_in_the_inputs_memory_format(channels_last):
    """The tiled input's backward: the real channels of the gradient, as F.pad's backward gives
    them, laid out like the input (no layout copy for the quantizer before it)."""
    layer = CIMConv2d(10, 6, 3, groups=2, hw=_hw("offset"), w_bit=4, a_bit=4)
    lay, tiles = layer.layout, layer.tile.tiles()
    assert lay.pad > 0
    x = torch.randn(2, 10, 5, 4)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    tiled = tiles.tile_input(x)
    grad = torch.randn(tiled.shape).contiguous(memory_format=torch.channels_last)
    (grad_x,) = torch.autograd.grad(tiled, x, grad)
    reference = x.detach().clone().requires_grad_(True)
    padded = F.pad(reference.reshape(2, 2, 5, 5, 4), (0, 0, 0, 0, 0, lay.pad)).reshape(tiled.shape)
    (expected,) = torch.autograd.grad(padded, reference, grad)
    assert torch.equal(grad_x, expected)
    assert grad_x.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
