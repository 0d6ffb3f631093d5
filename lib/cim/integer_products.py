"""A layer's partial sums computed as the arrays compute them: integer inputs times integer
cell values, on the CPU's int8 instructions (VNNI, AMX) through oneDNN.

The crossbar input is an integer grid times the input step and the array weight holds small
integer cell values, so every partial sum is an integer times the step. oneDNN's int8 convolution
(convs) and int8 matmuls (linear layers, one per row-tile) accumulate those integers exactly in
int32, and the result is scaled by the step in float32: the same partial sums as the float32
products (closer to the exact value, which the float path reaches only up to its accumulation
rounding), 2-2.5x faster on a CPU with VNNI or AMX. Codes are shifted into 8 bits, so a kernel's
sum can exceed the partial sum; arrays whose shifted sums could reach 2^24 (`sums_stay_exact`)
keep the float32 products.

Used for the forward products (and their recomputation in the backward) when the inputs fit in
8 bits (`CrossbarPlan.input_zero_point`), cell values fit in int8, and the CPU has the
instructions (`integer_kernels_here`) and the runtime asks for them (lib.cim.runtime); gradients
stay in float32.
"""
from __future__ import annotations

import functools
import logging
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from lib.cim.fused_op import FusedOp
from lib.cim.runtime import Runtime

log = logging.getLogger(__name__)


class InputGrid(NamedTuple):
    """The crossbar input's integer grid: values are (code - zero_point) · step, codes in [0, 255]."""

    step: float
    zero_point: int


EXACT_LIMIT = 2 ** 24  # float32 holds every integer below this exactly


def sums_stay_exact(rows_per_array: int, cell_max: int) -> bool:
    """Whether every int32 sum the kernels form for an array of `rows_per_array` rows of cells up
    to `cell_max` converts to float32 exactly: codes are shifted into 8 bits, so a sum is bounded
    by 255 · cell_max · rows whatever the true partial sum (which may be far smaller)."""
    return 255 * cell_max * rows_per_array < EXACT_LIMIT


def _sums_exact() -> bool:
    """One conv and one matmul at the largest codes and cells (255 × 127 over 64 rows), against
    the exact sums: False where the kernels saturate."""
    try:
        codes = torch.full((1, 64, 1, 1), 255, dtype=torch.uint8)
        cells = torch.full((1, 64, 1, 1), 127, dtype=torch.int8)
        grid = InputGrid(1.0, 0)
        conv = integer_conv(codes.float(), cells, grid, (1, 1), (0, 0), (1, 1), 1)
        matmul = integer_matmul(torch.full((1, 1, 64), 255.0), cells.reshape(1, 64, 1), grid)
    except RuntimeError as err:
        log.debug("int8 kernels unavailable: %s", err)
        return False
    exact = 255.0 * 127 * 64
    return float(conv.reshape(())) == exact and float(matmul.reshape(())) == exact


def _kernels_present() -> bool:
    ops = getattr(torch.ops, "onednn", None)
    if (not torch.backends.mkldnn.is_available() or ops is None or not hasattr(ops, "qconv2d_pointwise")
            or not hasattr(torch, "_int_mm")):
        return False
    cpu = torch.cpu
    return bool(getattr(cpu, "_is_vnni_supported", lambda: False)()
                or getattr(cpu, "_is_amx_tile_supported", lambda: False)())


@functools.lru_cache(maxsize=None)
def integer_kernels_here() -> bool:
    """Whether this machine computes partial sums on int8 kernels exactly: the CPU has VNNI or AMX,
    oneDNN's quantized conv and int8 matmuls are present and both return exact sums for the
    largest products we give them (checked once per process: oneDNN capped below VNNI, e.g. by
    ONEDNN_MAX_CPU_ISA, saturates them). The runtime's `integer_products` may still turn them off."""
    here = _kernels_present() and _sums_exact()
    log.debug("int8 partial-sum kernels %s", "present" if here else "absent or inexact here")
    return here


def integer_products_for(x: torch.Tensor, runtime: Runtime) -> bool:
    """Whether partial sums of x are integer products under `runtime`: float32 CPU tensors, the
    runtime asking for them, exact int8 kernels here."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and runtime.integer_products and integer_kernels_here()


@functools.lru_cache(maxsize=None)
def unit_weight_scale() -> tuple[torch.Tensor, torch.Tensor]:
    """One weight scale of 1 and zero point of 0 for the whole weight (the cells are the integers
    themselves), made once: oneDNN reads a per-channel list element by element."""
    with torch.inference_mode(False):
        return torch.ones(1), torch.zeros(1, dtype=torch.int64)



def code_values(x, step: torch.Tensor, offset: int, dtype: torch.dtype):
    """The input's grid codes plus `offset`, round(x / step) + offset, as `dtype`: one fused pass
    (the kernel `grid_codes` runs, also composed with the conv tiling, `ConvTiles.tile_codes`)."""
    return (torch.round(x / step) + offset).to(dtype)


def code_values_eager(x, step: torch.Tensor, offset: int, dtype: torch.dtype):
    return torch.round(x / step).add_(offset).to(dtype)


def grid_codes(x: torch.Tensor, grid: InputGrid, signed: bool) -> torch.Tensor:
    """x's codes on `grid`: uint8 (code + zero_point), or int8 (code + zero_point - 128) when `signed`.
    The step goes in as a 0-d tensor of x's dtype (the value x / step divides by either way), so
    one compiled kernel serves every step value."""
    offset, dtype = (grid.zero_point - 128, torch.int8) if signed else (grid.zero_point, torch.uint8)
    step = torch.tensor(grid.step, dtype=x.dtype, device=x.device)
    return GRID_CODES[dtype](x, step, offset, dtype)


GRID_CODES = {dtype: FusedOp(f"grid_codes_{str(dtype).rsplit('.', 1)[-1]}", code_values, code_values_eager)
              for dtype in (torch.uint8, torch.int8)}


def _quantized_codes_functional(x, scale, lo, hi, offset: int):
    """clamp(round(x / scale), lo, hi) + offset as uint8: the fake quantization's levels, shifted, in one pass."""
    return (torch.clamp(torch.round(x / scale), lo, hi) + offset).to(torch.uint8)


def _quantized_codes_eager(x, scale, lo, hi, offset: int):
    return torch.round(x / scale).clamp_(lo, hi).add_(offset).to(torch.uint8)


QUANTIZED_CODES = FusedOp("quantized_codes", _quantized_codes_functional, _quantized_codes_eager)


def quantized_codes(x: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                    grid: InputGrid) -> torch.Tensor:
    """The uint8 codes `grid_codes` gives for the fake-quantized x (lib.cim.fused_quant.fake_quant
    with step `scale`, grid [lo, hi]), taken from x itself: its levels plus the grid's zero point,
    one pass and no float copy (the levels times the step, divided by it again, are the levels)."""
    return QUANTIZED_CODES(x, scale.to(x.dtype), lo, hi, grid.zero_point)


def pack_matmul_weight(w: torch.Tensor) -> torch.Tensor:
    """The array weight (tiles, rows, columns) of integer cell values in int8, for `integer_matmul`."""
    return w if w.dtype == torch.int8 else w.to(torch.int8)


def integer_matmul(xt: torch.Tensor, w: torch.Tensor, grid: InputGrid) -> torch.Tensor:
    """(tokens, tiles, columns) partial sums of the tiled input xt (tiles, tokens, rows) on `grid`
    and the integer array weight w (tiles, rows, columns): one int8 matmul per tile with exact
    int32 sums. Codes are shifted into int8 (c = code + zero_point - 128), so Σ code·w =
    Σ c·w + (128 - zero_point)·Σ w; the column sums Σ w come from one more row of ones in the
    same matmul, and are added back before the step (exact within `sums_stay_exact`)."""
    offset = 128 - grid.zero_point
    weight = pack_matmul_weight(w)
    codes = grid_codes(xt, grid, signed=True)
    tiles, tokens, columns = weight.shape[0], xt.shape[1], weight.shape[2]
    if offset:
        codes = torch.cat([codes, codes.new_ones((tiles, 1, codes.shape[2]))], dim=1)
    sums = torch.empty((tiles, codes.shape[1], columns), dtype=torch.int32, device=xt.device)
    for tile in range(tiles):
        torch._int_mm(codes[tile], weight[tile], out=sums[tile])
    out = torch.empty((tokens, tiles, columns), dtype=xt.dtype, device=xt.device)
    out.copy_(sums[:, :tokens].transpose(0, 1))  # token-major, as the ADC reads the partial sums
    if offset:
        out.add_(sums[:, tokens].to(xt.dtype), alpha=offset)
    return out.mul_(grid.step)


class LevelsConvWeight(NamedTuple):
    """A conv's array weight prepared for `conv_levels`: prepacked with one scale per output
    channel, 1 / the ADC step of that column."""

    weight: torch.Tensor
    scales: torch.Tensor
    zero_points: torch.Tensor


class PackedConvWeight(NamedTuple):
    """A conv's array weight prepared for `integer_conv` (what the eval cache keeps): oneDNN's
    prepacked int8 weight, for shifted codes the shift's contribution per output channel, the
    int8 cells themselves (what a backward through the layer reads) and, when the eval cache
    keeps it too, the weight for converting in the conv's epilogue."""

    weight: torch.Tensor
    shift_bias: Optional[torch.Tensor]  # -zero_point · Σ w per output channel (float32), or None
    cells: torch.Tensor
    levels: Optional[LevelsConvWeight] = None


def pack_conv_weight(w, grid: InputGrid, stride, padding, dilation, groups: int) -> PackedConvWeight:
    """The array weight (integer cell values, any dtype) as `PackedConvWeight` for inputs on `grid`."""
    if isinstance(w, PackedConvWeight):
        return w
    wq = w if w.dtype == torch.int8 else w.to(torch.int8)
    scale, _ = unit_weight_scale()
    shifted = grid.zero_point != 0
    packed = torch.ops.onednn.qconv_prepack(wq, scale, 1.0, 0, list(stride), [0, 0] if shifted else list(padding),
                                            list(dilation), groups, None)
    shift_bias = None
    if shifted:
        shift_bias = wq.sum(dim=(1, 2, 3), dtype=torch.int32).to(torch.float32).mul_(-grid.zero_point)
    return PackedConvWeight(packed, shift_bias, wq)


def level_dtype(lo: int, hi: int) -> Optional[torch.dtype]:
    """The 8-bit integer dtype holding every ADC level in [lo, hi], or None when none does."""
    if lo >= 0 and hi <= 255:
        return torch.uint8
    if lo >= -128 and hi <= 127:
        return torch.int8
    return None


def pack_levels_weight(cells: torch.Tensor, adc_step: torch.Tensor, stride, padding, dilation,
                       groups: int) -> LevelsConvWeight:
    """The int8 cells (C_out, C_in/groups, k_h, k_w) prepacked for `conv_levels` with the ADC step
    of every output channel (adc_step: C_out values in channel order)."""
    scales = adc_step.detach().reshape(-1).reciprocal().to(torch.float32).contiguous()
    zero_points = torch.zeros(scales.numel(), dtype=torch.int64)
    packed = torch.ops.onednn.qconv_prepack(cells, scales, 1.0, 0, list(stride), list(padding), list(dilation),
                                            groups, None)
    return LevelsConvWeight(packed, scales, zero_points)


def conv_levels(x: torch.Tensor, weight: LevelsConvWeight, grid: InputGrid, lo: int, hi: int,
                stride, padding, dilation, groups: int) -> torch.Tensor:
    """The ADC levels clamp(round(partial sum / adc_step), lo, hi) of the conv of x with the cells
    of `weight`, for x on an unsigned `grid` (zero point 0; or x's uint8 codes there), converted
    in the int8 conv's epilogue: oneDNN scales each exact int32 sum by step · (1 / adc_step of its
    output channel), clips to [lo, hi] and rounds to the nearest even integer, writing 8-bit levels
    (N, C_out, H_out, W_out) instead of float32 partial sums, a quarter of the memory traffic. The scale is applied as one
    product, so a level could differ from the float32 conversion's only where the partial sum over
    the step falls within a float32 rounding of a half-integer (tests find none)."""
    dtype = level_dtype(lo, hi)
    if grid.zero_point or dtype is None:
        raise ValueError("conv_levels needs an unsigned input grid and an ADC range within 8 bits")
    codes = x if x.dtype == torch.uint8 else grid_codes(x, grid, signed=False)
    return torch.ops.onednn.qconv2d_pointwise(
        codes, grid.step, 0, weight.weight, weight.scales, weight.zero_points, None, list(stride), list(padding),
        list(dilation), groups, 1.0, 0, dtype, "hardtanh", [float(lo), float(hi)], "")


def integer_conv(x: torch.Tensor, w, grid: InputGrid, stride, padding, dilation, groups: int) -> torch.Tensor:
    """F.conv2d(x, w) for x on `grid` (or x's uint8 codes there, `grid_codes`) and integer-valued w
    (or its `pack_conv_weight`), on int8 kernels: float32 (N, C_out, H_out, W_out).

    oneDNN is given unsigned codes and no zero point (its int8 conv mishandles a non-zero input
    zero point for groups of fewer than 4 channels). Signed inputs are therefore shifted into
    [0, 255] by the grid's zero point z, zero-padded with z themselves (a padded input is 0), and
    the shift's contribution z · Σ w, the same at every output position, is taken off through the
    conv's bias while the sums are still integers (exact within `sums_stay_exact`); the step is
    applied after."""
    packed = pack_conv_weight(w, grid, stride, padding, dilation, groups)
    codes = x if x.dtype == torch.uint8 else grid_codes(x, grid, signed=False)
    scale, zero_point = unit_weight_scale()
    if not grid.zero_point:
        return torch.ops.onednn.qconv2d_pointwise(
            codes, grid.step, 0, packed.weight, scale, zero_point, None, list(stride), list(padding),
            list(dilation), groups, 1.0, 0, torch.float32, "none", [], "")
    pad_h, pad_w = padding
    if pad_h or pad_w:
        codes = F.pad(codes, (pad_w, pad_w, pad_h, pad_h), value=grid.zero_point)
        codes = codes.contiguous(memory_format=torch.channels_last)
    sums = torch.ops.onednn.qconv2d_pointwise(
        codes, 1.0, 0, packed.weight, scale, zero_point, packed.shift_bias, list(stride), [0, 0],
        list(dilation), groups, 1.0, 0, torch.float32, "none", [], "")
    return sums.mul_(grid.step)
