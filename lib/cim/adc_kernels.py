"""The CIM layers' elementwise work on large tensors (ADC conversion of the partial sums and its
gradient, input fake quantization, the slice-weighted gradient), eager or fused by torch.compile.

On this project's CPUs the partial sums of a layer are tens of MB and every elementwise pass
is bound by memory bandwidth, so fusing divide/round/clamp/scale/sum into one loop (Inductor)
makes the ADC several times cheaper. Each kernel is a `FusedOp` (lib.cim.fused_op): fused where
the runtime's compile mode allows (lib.cim.runtime: auto, the default; 1 forces it, 0 turns it
off), else its eager form, which computes the same values.
"""
from __future__ import annotations

import math

import torch

from lib.cim.constants import constant
from lib.cim.fused_op import FusedOp


def forward_eager(p, step, coef, lo, hi):
    """Σ over tile·slice of clamp(round(p / step), lo, hi) · coef, with p (M, g, tiles·slices, o)."""
    levels = torch.round(p / step).clamp_(lo, hi)
    return levels.mul_(coef).sum(dim=2)


def backward_eager(grad_y, p, step, gamma, lo, hi):
    """(grad wrt p, Σ_m grad·level, Σ_m grad·v·on_grid) with v = p / step; in-place to save passes."""
    grad = grad_y.unsqueeze(2)  # broadcast over tiles·slices
    v = p / step
    rounded = torch.round(v)
    levels = rounded.clamp(lo, hi)
    on_grid = rounded.eq_(levels)  # 1.0 where the clamp did not act
    sum_levels = levels.mul_(grad).sum(dim=0)
    grad_on_grid = on_grid.mul_(grad)
    sum_v = v.mul_(grad_on_grid).sum(dim=0)
    return grad_on_grid.mul_(gamma), sum_levels, sum_v


def _forward_functional(p, step, coef, lo, hi):
    return (torch.clamp(torch.round(p / step), lo, hi) * coef).sum(dim=2)


def _forward_into_functional(out, p, step, coef, lo, hi):
    """The fused conversion written into `out` (a block of a larger output: no copy after)."""
    out.copy_(_forward_functional(p, step, coef, lo, hi))
    return out


def accumulate_eager(levels, coef):
    """Σ over tile·slice of levels · coef, for ADC levels (M, g, tiles·slices, o) already converted."""
    return levels.to(coef.dtype).mul_(coef).sum(dim=2)


def _accumulate_functional(levels, coef):
    return (levels.to(coef.dtype) * coef).sum(dim=2)


def _accumulate_into_functional(out, levels, coef):
    out.copy_(_accumulate_functional(levels, coef))
    return out


def _backward_functional(grad_y, p, step, gamma, lo, hi, chunks: int):
    """Fused backward. Written so that Inductor keeps two passes over p (the gradient, and both
    sums in `chunks` blocks of M/chunks rows — 2-3x faster on CPU than one reduction over the
    outer dimension) and never materialises a full-size intermediate."""
    grad = grad_y.unsqueeze(2)
    v = p / step
    rounded = torch.round(v)
    levels = torch.clamp(rounded, lo, hi)
    on_grid = rounded == levels
    grad_p = torch.where(on_grid, grad * gamma, 0.0)
    blocks = (chunks, -1) + tuple(p.shape[1:])
    sum_levels = (levels * grad).view(blocks).sum(dim=1).sum(dim=0)
    sum_v = torch.where(on_grid, v * grad, 0.0).view(blocks).sum(dim=1).sum(dim=0)
    return grad_p, sum_levels, sum_v


def _backward_into_functional(out, grad_y, p, step, gamma, lo, hi, chunks: int):
    """The fused backward writing the gradient of p into `out` (a reused buffer: on CPU a fresh
    tens-of-MB tensor costs about as much in page faults as the kernel itself)."""
    grad_p, sum_levels, sum_v = _backward_functional(grad_y, p, step, gamma, lo, hi, chunks)
    out.copy_(grad_p)
    return sum_levels, sum_v


def _clip_sums_functional(grad_y, p, step, lo, hi, chunks: int):
    """The fused backward's two column sums without the partial sums' gradient, in one read of p,
    with +inf in Σ grad·v·on_grid wherever the ADC clipped a partial sum of the column: that marks
    the column for lib.cim.slice_merge at no third reduction (Inductor runs each reduction beyond
    two as another pass over p)."""
    grad = grad_y.unsqueeze(2)
    v = p / step
    rounded = torch.round(v)
    levels = torch.clamp(rounded, lo, hi)
    on_grid = rounded == levels
    blocks = (chunks, -1) + tuple(p.shape[1:])
    sum_levels = (levels * grad).view(blocks).sum(dim=1).sum(dim=0)
    sum_v = torch.where(on_grid, v * grad, math.inf).view(blocks).sum(dim=1).sum(dim=0)
    return sum_levels, sum_v


def clip_sums_eager(grad_y, p, step, lo, hi):
    """(Σ_m grad·level, Σ_m grad·v·on_grid with +inf in the columns where the ADC clipped)."""
    grad = grad_y.unsqueeze(2)
    v = p / step
    rounded = torch.round(v)
    levels = rounded.clamp(lo, hi)
    on_grid = rounded.eq_(levels)
    sum_levels = levels.mul_(grad).sum(dim=0)
    sum_v = v.mul_(grad).masked_fill_(on_grid == 0, math.inf).sum(dim=0)
    return sum_levels, sum_v


def _merge_slices_functional(cells, gamma):
    """Σ_s gamma[s] · cells[s]: a linear layer's merged array weight (see lib.cim.slice_merge),
    its compact cells widened on the fly in one pass."""
    merged = cells[0].to(gamma.dtype) * gamma[0]
    for s in range(1, cells.shape[0]):
        merged = merged + cells[s].to(gamma.dtype) * gamma[s]
    return merged


def _merge_slices_into_functional(out, cells, gamma):
    out.copy_(_merge_slices_functional(cells, gamma))
    return out


def merge_slices_eager(cells, gamma):
    merged = cells[0].to(gamma.dtype) * gamma[0]
    for s in range(1, cells.shape[0]):
        merged.add_(cells[s].to(gamma.dtype) * gamma[s])
    return merged


ROWS_PER_CHUNK = (32, 64, 16, 128, 8)


def _reduction_chunks(rows: int) -> int:
    """Blocks of about 32 rows for the two-stage sums (measured best on AVX2/AVX-512 CPUs); 1
    when no such block size divides `rows`."""
    for per_chunk in ROWS_PER_CHUNK:
        if rows % per_chunk == 0 and rows >= 2 * per_chunk:
            return rows // per_chunk
    return 1


def _laid_out(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """t, written channels_last when asked (a 4-d quantizer output its conv reads NHWC)."""
    return t.contiguous(memory_format=torch.channels_last) if channels_last else t


def quant_forward_eager(x, scale, lo, hi, channels_last: bool = False):
    """clamp(round(x / scale), lo, hi) · scale (channels_last: in that memory format)."""
    return _laid_out(torch.round(x / scale).clamp_(lo, hi).mul_(scale), channels_last)


def quant_forward_abs_sum_eager(x, scale, lo, hi, channels_last: bool = False):
    """(clamp(round(x / scale), lo, hi) · scale (channels_last: in that memory format), Σ|x|)."""
    return quant_forward_eager(x, scale, lo, hi, channels_last), torch.linalg.vector_norm(x, ord=1)


def quant_backward_eager(grad, x, scale, lo, hi):
    """LSQ: (grad wrt x where round(x/scale) is on the grid, in x's memory format whatever grad's;
    Σ grad·(level − v·on_grid))."""
    v = x / scale
    rounded = torch.round(v)
    levels = rounded.clamp(lo, hi)
    on_grid = rounded.eq_(levels)
    grad_x = on_grid * grad  # the first operand's layout: x's
    return grad_x, (levels.sub_(v.mul_(on_grid))).mul_(grad).sum()


def _quant_forward_functional(x, scale, lo, hi, channels_last: bool = False):
    return _laid_out(torch.clamp(torch.round(x / scale), lo, hi) * scale, channels_last)


def _quant_forward_abs_sum_functional(x, scale, lo, hi, channels_last: bool = False):
    """The fake quantization and the input's Σ|x| in one pass over x (Inductor fuses the sum into
    the elementwise loop): a training forward's running |x| statistic at no extra read. With
    channels_last the output is written NHWC whatever x's layout, in the same pass."""
    return _laid_out(torch.clamp(torch.round(x / scale), lo, hi) * scale, channels_last), x.abs().sum()


def _quant_backward_functional(grad, x, scale, lo, hi):
    """`quant_backward_eager` in one pass; grad and x may differ in layout (an NHWC gradient of
    an NCHW input's channels-last quantized copy): the input's gradient takes x's."""
    v = x / scale
    rounded = torch.round(v)
    levels = torch.clamp(rounded, lo, hi)
    on_grid = (rounded == levels).to(x.dtype)
    return on_grid * grad, (grad * (levels - v * on_grid)).sum()


def slice_share_eager(grad, shares):
    """Σ_s shares[s] · grad[:, s, :] for grad (rows, slices, columns) → (rows, columns)."""
    out = grad[:, 0] * shares[0]
    for s in range(1, grad.shape[1]):
        out.addcmul_(grad[:, s], shares[s])
    return out


def _slice_share_functional(grad, shares):
    """Unrolled over the (few) slices: a pointwise kernel, which Inductor can write straight into
    an `out` buffer (a reduction it would compute into a fresh buffer and copy)."""
    acc = grad[:, 0] * shares[0]
    for s in range(1, grad.shape[1]):
        acc = acc + grad[:, s] * shares[s]
    return acc


def _slice_share_into_functional(out, grad, shares):
    out.copy_(_slice_share_functional(grad, shares))
    return out


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """channels_last for a 4-d tensor laid out NHWC, else the default contiguous format."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def dense(x: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
    """x in the memory format of `like` (default: its own): a channels-last model stays channels
    last, with no layout-changing copy on the way into or out of a kernel."""
    return x.contiguous(memory_format=memory_format_of(x if like is None else like))


FORWARD = FusedOp("forward", _forward_functional, forward_eager, into=_forward_into_functional)
ACCUMULATE = FusedOp("accumulate", _accumulate_functional, accumulate_eager, into=_accumulate_into_functional)
QUANT_FORWARD = FusedOp("quant_forward", _quant_forward_functional, quant_forward_eager)
QUANT_FORWARD_ABS_SUM = FusedOp("quant_forward_abs_sum", _quant_forward_abs_sum_functional,
                                quant_forward_abs_sum_eager)
QUANT_BACKWARD = FusedOp("quant_backward", _quant_backward_functional, quant_backward_eager)
SLICE_SHARE = FusedOp("slice_share", _slice_share_functional, slice_share_eager, into=_slice_share_into_functional)
BACKWARD = FusedOp("backward", _backward_functional, backward_eager, into=_backward_into_functional)
CLIP_SUMS = FusedOp("clip_sums", _clip_sums_functional, clip_sums_eager)
MERGE_SLICES = FusedOp("merge_slices", _merge_slices_functional, merge_slices_eager, into=_merge_slices_into_functional)


def adc_forward(p, step, coef, lo: int, hi: int, out=None):
    """Σ over tile·slice of clamp(round(p / step), lo, hi) · coef; written into `out` when given."""
    bounds = grid_bounds(p, lo, hi)
    if out is None:
        return FORWARD(p, step, coef, *bounds)
    if FORWARD.into(out, p, step, coef, *bounds) is None:
        out.copy_(forward_eager(p, step, coef, *bounds))
    return out


def accumulate(levels, coef, out=None):
    """Σ over tile·slice of levels · coef (the shift-and-add of converted levels); into `out` when given."""
    if out is None:
        return ACCUMULATE(levels, coef)
    if ACCUMULATE.into(out, levels, coef) is None:
        out.copy_(accumulate_eager(levels, coef))
    return out


def quant_forward(x, scale, lo, hi, channels_last: bool = False):
    """Per-tensor LSQ fake quantization (lo, hi: 0-d tensors), written channels_last when asked."""
    return QUANT_FORWARD(x, scale, lo, hi, channels_last)


def quant_forward_abs_sum(x, scale, lo, hi, channels_last: bool = False):
    """`quant_forward` and Σ|x| (a 0-d tensor) from one pass over x."""
    return QUANT_FORWARD_ABS_SUM(x, scale, lo, hi, channels_last)


def quant_backward(grad, x, scale, lo, hi):
    """LSQ's gradients of `quant_forward`: the input's (in x's memory format) and Σ for the step."""
    return QUANT_BACKWARD(grad, x, scale, lo, hi)


def slice_share(grad, shares, out=None):
    """Σ_s shares[s] · grad[:, s, :] (shares: a (slices,) tensor), into `out` when given and fused."""
    if out is not None and SLICE_SHARE.into(out, grad, shares) is not None:
        return out
    return SLICE_SHARE(grad, shares)


def adc_backward(grad_y, p, step, gamma, lo: int, hi: int, out=None):
    """(grad wrt p, Σ_m grad·level, Σ_m grad·v·on_grid); the gradient is written into `out`
    (same shape as p) when given and the fused kernel runs, else into a fresh tensor."""
    bounds = grid_bounds(p, lo, hi)
    chunks = (_reduction_chunks(p.shape[0]),)
    if out is not None:
        sums = BACKWARD.into(out, grad_y, p, step, gamma, *bounds, static=chunks)
        if sums is not None:
            return (out,) + tuple(sums)
    return BACKWARD(grad_y, p, step, gamma, *bounds, static=chunks)


def clip_sums(grad_y, p, step, lo: int, hi: int):
    """(Σ_m grad·level, Σ_m grad·v·on_grid with +inf in every column where the ADC clipped):
    `adc_backward`'s sums without its full-size gradient, for a backward that needs no
    partial-sum gradient where nothing was clipped (lib.cim.slice_merge)."""
    bounds = grid_bounds(p, lo, hi)
    return CLIP_SUMS(grad_y, p, step, *bounds, static=(_reduction_chunks(p.shape[0]),))


def merge_slices(out, cells, gamma) -> bool:
    """Σ_s gamma[s] · cells[s] into `out` with the fused kernel; False where it does not run
    (the caller then computes it eagerly)."""
    return MERGE_SLICES.into(out, cells, gamma) is not None


def grid_bounds(p: torch.Tensor, lo: int, hi: int):
    """Grid bounds as 0-d tensors (a compiled kernel then serves every ADC width without
    recompiling), made once per value, dtype and device: no host-to-device copy per call."""
    dtype, device = p.dtype, p.device
    return constant(("bounds", lo, hi, dtype, device),
                     lambda: (torch.tensor(float(lo), dtype=dtype, device=device),
                              torch.tensor(float(hi), dtype=dtype, device=device)))
