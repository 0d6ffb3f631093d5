"""The CPU kernels compiled without TorchDynamo: one compiled graph per argument signature serving
every size, the same values as the eager kernels, and refused calls computed eagerly."""
import gc
import weakref

import pytest
import torch
from torch._dynamo.utils import counters

from lib.cim.adc_kernels import (_backward_functional, _forward_functional, _quant_forward_functional,
                                 _slice_share_functional, adc_forward, backward_eager, forward_eager, grid_bounds,
                                 quant_forward_eager, slice_share_eager)
from lib.cim.direct_kernels import DirectKernel, signature, takes_directly
from lib.cim.fused_op import COMPILED, FusedOp
from lib.cim.integer_products import InputGrid, grid_codes
from lib.cim.runtime import RUNTIME


@pytest.fixture
def fused():
    """Kernels fused (mode auto) for the test."""
    with RUNTIME.use(compile="auto", direct_kernels=True):
        yield


def _psums(rows, groups, tiles_slices, out, seed=0):
    generator = torch.Generator().manual_seed(seed)
    p = torch.randn(rows, groups, tiles_slices, out, generator=generator) * 40
    step = torch.rand(1, groups, tiles_slices, out, generator=generator) + 0.5
    coef = torch.rand(1, groups, tiles_slices, out, generator=generator)
    return p, step, coef


def test_one_graph_serves_every_size_with_the_eager_values():
    kernel = DirectKernel("adc_forward", _forward_functional)
    lo, hi = torch.tensor(-8.0), torch.tensor(7.0)
    for rows, tiles_slices, out in ((64, 6, 16), (96, 4, 24), (2048, 3, 64)):
        p, step, coef = _psums(rows, 2, tiles_slices, out)
        assert torch.allclose(kernel(p, step, coef, lo, hi), forward_eager(p, step, coef, -8, 7), rtol=1e-6, atol=1e-5)
    assert kernel.variants == 1


def test_sizes_of_one_and_equal_sizes_are_part_of_the_signature():
    x = torch.randn(8, 5)
    assert signature((x, 3)) == signature((torch.randn(9, 6), 3))
    assert signature((x, 3)) != signature((x, 4))  # other values: another graph
    assert signature((x,)) != signature((torch.randn(8, 1),))  # a size of one is traced as such
    assert signature((x,)) != signature((torch.randn(8, 8),))  # equal sizes share a symbol in tracing
    assert signature((x,)) != signature((x.t(),))  # another layout

    kernel = DirectKernel("quant_forward", _quant_forward_functional)
    scale, lo, hi = torch.tensor(0.25), torch.tensor(-4.0), torch.tensor(3.0)
    for shape in ((8, 5), (8, 1), (8, 8), (1, 7)):
        x = torch.randn(shape)
        assert torch.equal(kernel(x, scale, lo, hi), quant_forward_eager(x, scale, lo, hi))
    assert kernel.variants == 4


def test_a_size_the_trace_fixed_gets_its_own_graph():
    """The slice-weighted sum unrolls its loop over the slices in Python, so its trace fixes their
    number: the same signature with another number of slices is traced again, not run on the
    first graph."""
    kernel = DirectKernel("slice_share", _slice_share_functional)
    for slices in (4, 7, 4):
        grad, shares = torch.randn(360, slices, 3), torch.rand(slices)
        assert torch.allclose(kernel(grad, shares), slice_share_eager(grad, shares), rtol=1e-6, atol=1e-6)
    assert kernel.variants == 2


def test_a_compiled_kernel_keeps_no_argument_alive():
    """The tensors of the call that traced a graph are freed with the caller's references (a
    kept partial-sum tensor would hold tens of MB for the whole process)."""
    kernel = DirectKernel("quant_forward", _quant_forward_functional)
    x = torch.randn(64, 32)
    watch = weakref.ref(x)
    kernel(x, torch.tensor(0.25), torch.tensor(-4.0), torch.tensor(3.0))
    del x
    gc.collect()
    assert watch() is None


def test_the_backward_kernel_gives_the_eager_gradient_and_sums():
    kernel = DirectKernel("adc_backward", _backward_functional)
    lo, hi = torch.tensor(-8.0), torch.tensor(7.0)
    for rows in (64, 256):
        p, step, gamma = _psums(rows, 1, 6, 32, seed=rows)
        grad_y = torch.randn(rows, 1, 32)
        grad_p, sum_levels, sum_v = kernel(grad_y, p, step, gamma, lo, hi, rows // 32)
        eager = backward_eager(grad_y, p, step, gamma, -8, 7)
        assert torch.equal(grad_p, eager[0])
        assert torch.allclose(sum_levels, eager[1], rtol=1e-5, atol=1e-3)
        assert torch.allclose(sum_v, eager[2], rtol=1e-5, atol=1e-3)
    assert kernel.variants == 2  # the reduction's block count is a value


def test_an_out_view_with_its_own_strides_is_written_in_place(fused):
    p, step, coef = _psums(64, 1, 4, 16)
    out = torch.full((128, 1, 16), float("nan"))
    view = out[::2]
    adc_forward(p, step, coef, -8, 7, out=view)
    assert torch.allclose(view, forward_eager(p, step, coef, -8, 7), rtol=1e-6, atol=1e-5)
    assert torch.isnan(out[1::2]).all()


def test_cpu_kernels_compile_without_dynamo(fused):
    graphs, variants = counters["stats"]["unique_graphs"], COMPILED.direct_variants
    p, step, coef = _psums(96, 1, 6, 8, seed=3)
    out = torch.empty(96, 1, 8)
    adc_forward(p, step, coef, -16, 15, out=out)
    assert torch.allclose(out, forward_eager(p, step, coef, -16, 15), rtol=1e-6, atol=1e-5)
    lo, hi = grid_bounds(p, -16, 15)
    assert lo.item() == -16 and hi.item() == 15

    x = torch.rand(4, 9) * 3
    for step in (0.125, 0.1, 0.3):  # one graph for every step value
        codes = grid_codes(x, InputGrid(step=step, zero_point=0), signed=False)
        assert torch.equal(codes, torch.round(x / step).to(torch.uint8))
    assert COMPILED.direct_variants == variants + 2 and counters["stats"]["unique_graphs"] == graphs


def test_a_float_argument_keeps_torch_compile(fused):
    """A Python float would be part of the signature (a graph per value): such a kernel runs
    through torch.compile, whose guards make the float a symbol."""
    graphs = counters["stats"]["unique_graphs"]
    x = torch.randn(16, 8)
    assert not takes_directly((x, 0.5)) and takes_directly((x, 2, torch.float32, torch.tensor(0.5)))
    out = FusedOp("scaled_by_float", _scaled_by, _scaled_by)(x, 0.5)
    assert torch.equal(out, x * 0.5 + 1.0)
    assert counters["stats"]["unique_graphs"] > graphs


def _scaled_by(x, factor: float):
    return x * factor + 1.0


def test_kernels_can_be_timed_through_torch_compile_for_comparison(fused):
    """`RUNTIME.use(direct_kernels=False)` sends CPU kernels through torch.compile for its block
    (the benchmarks' comparison), with the same values; the direct path is back after it."""
    p, step, coef = _psums(80, 1, 6, 12, seed=5)
    graphs, variants = counters["stats"]["unique_graphs"], COMPILED.direct_variants
    with RUNTIME.use(direct_kernels=False):
        through_dynamo = adc_forward(p, step, coef, -16, 15)
    assert counters["stats"]["unique_graphs"] > graphs and COMPILED.direct_variants == variants
    direct = adc_forward(p, step, coef, -16, 15)
    assert COMPILED.direct_variants > variants
    assert torch.allclose(direct, through_dynamo, rtol=1e-6, atol=1e-5)
