"""A layer's partial sums computed as the arrays compute them: integer inputs times integer
cell values, on the CPU's int8 instructions (VNNI, AMX) through oneDNN.

The crossbar input is an integer grid times the input step and the array weight holds small
integer cell values, so every partial sum is an integer times the step. oneDNN's int8 convolution
(convs) and int8 matmuls (linear layers, one per row-tile) accumulate those integers exactly in
int32, and the result is scaled by the step in float32: the same partial sums as the float32
products (closer to the exact value, which the float path reaches only up to its accumulation
rounding), 2-2.5x faster on a CPU with VNNI or AMX.

Used for the forward products (and their recomputation in the backward) when the inputs fit in
8 bits (`CrossbarPlan.input_zero_point`), cell values fit in int8, and the CPU has the
instructions (`INTEGER_PRODUCTS`); gradients stay in float32.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import NamedTuple

import torch

from lib.cim.adc_kernels import KERNELS

log = logging.getLogger(__name__)


class InputGrid(NamedTuple):
    """The crossbar input's integer grid: values are (code - zero_point) · step, codes in [0, 255]."""

    step: float
    zero_point: int


class _IntegerProducts:
    """Owns whether this process computes conv partial sums on int8 kernels: on when the CPU has
    VNNI or AMX and oneDNN's quantized conv is present, unless switched off (`use`)."""

    def __init__(self) -> None:
        self._enabled: bool | None = None
        self._ones: dict = {}

    @staticmethod
    def _supported() -> bool:
        ops = getattr(torch.ops, "onednn", None)
        if (not torch.backends.mkldnn.is_available() or ops is None or not hasattr(ops, "qconv2d_pointwise")
                or not hasattr(torch, "_int_mm")):
            return False
        cpu = torch.cpu
        return bool(getattr(cpu, "_is_vnni_supported", lambda: False)()
                    or getattr(cpu, "_is_amx_tile_supported", lambda: False)())

    @property
    def enabled(self) -> bool:
        if self._enabled is None:
            self._enabled = self._supported()
            log.debug("integer partial sums %s", "on" if self._enabled else "off (no VNNI/AMX int8 conv)")
        return self._enabled

    @contextmanager
    def use(self, enabled: bool):
        """Compute partial sums on int8 kernels (if supported) or in float32 inside the block."""
        previous = self._enabled
        self._enabled = bool(enabled) and self._supported()
        try:
            yield
        finally:
            self._enabled = previous

    def available_for(self, x: torch.Tensor) -> bool:
        return x.device.type == "cpu" and x.dtype == torch.float32 and self.enabled

    def scales(self, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit weight scales and zero zero-points per output channel, made once per width."""
        if channels not in self._ones:
            self._ones[channels] = (torch.ones(channels), torch.zeros(channels, dtype=torch.int64))
        return self._ones[channels]


INTEGER_PRODUCTS = _IntegerProducts()


def _codes_functional(x, step: float, offset: int, dtype: torch.dtype):
    """The input's grid codes plus `offset`, round(x / step) + offset, as `dtype`: one fused pass."""
    return (torch.round(x / step) + offset).to(dtype)


def _codes_eager(x, step: float, offset: int, dtype: torch.dtype):
    return torch.round(x / step).add_(offset).to(dtype)


def input_codes(x: torch.Tensor, grid: InputGrid, signed: bool) -> torch.Tensor:
    """x's codes on `grid`: uint8 (code + zero_point), or int8 (code + zero_point - 128) when `signed`."""
    offset, dtype = (grid.zero_point - 128, torch.int8) if signed else (grid.zero_point, torch.uint8)
    return KERNELS.run(f"input_codes_{str(dtype).rsplit('.', 1)[-1]}", _codes_functional, _codes_eager, x, x, grid.step, offset, dtype)


class IntegerMatmulWeight(NamedTuple):
    """A linear layer's array weight prepared for `integer_matmul` (what the eval cache keeps):
    int8 cell values (tiles, rows, columns) and their sums over each tile's rows (tiles, columns)."""

    weight: torch.Tensor
    column_sums: torch.Tensor


def pack_matmul_weight(w: torch.Tensor) -> IntegerMatmulWeight:
    """The array weight (tiles, rows, columns) of integer cell values as `IntegerMatmulWeight`."""
    if isinstance(w, IntegerMatmulWeight):
        return w
    wq = w if w.dtype == torch.int8 else w.to(torch.int8)
    return IntegerMatmulWeight(wq, wq.sum(dim=1, dtype=torch.int32).to(torch.float32))


def integer_matmul(xt: torch.Tensor, w, grid: InputGrid) -> torch.Tensor:
    """(tokens, tiles, columns) partial sums of the tiled input xt (tiles, tokens, rows) on `grid`
    and the integer array weight w (tiles, rows, columns, or its `pack_matmul_weight`): one int8
    matmul per tile with exact int32 sums. Codes are shifted into int8 (c = code + zero_point - 128),
    so Σ code·w = Σ c·w + (128 - zero_point)·Σ w, added back exactly before the step."""
    offset = 128 - grid.zero_point
    packed = pack_matmul_weight(w) if offset or not isinstance(w, torch.Tensor) else None
    weight = packed.weight if packed is not None else (w if w.dtype == torch.int8 else w.to(torch.int8))
    codes = input_codes(xt, grid, signed=True)
    tiles, tokens, columns = weight.shape[0], xt.shape[1], weight.shape[2]
    sums = torch.empty((tiles, tokens, columns), dtype=torch.int32, device=xt.device)
    for tile in range(tiles):
        torch._int_mm(codes[tile], weight[tile], out=sums[tile])
    out = sums.transpose(0, 1).to(xt.dtype)
    if offset:
        out.add_(packed.column_sums, alpha=offset)
    return out.mul_(grid.step)


def pack_conv_weight(w: torch.Tensor, stride, padding, dilation, groups: int) -> torch.Tensor:
    """The array weight (integer cell values, any dtype) as oneDNN's prepacked int8 weight; it
    serves any input step and zero point."""
    if w.is_mkldnn:
        return w
    wq = w if w.dtype == torch.int8 else w.to(torch.int8)
    scales, _ = INTEGER_PRODUCTS.scales(w.shape[0])
    return torch.ops.onednn.qconv_prepack(wq, scales, 1.0, 0, list(stride), list(padding), list(dilation),
                                          groups, None)


def integer_conv(x: torch.Tensor, w: torch.Tensor, grid: InputGrid, stride, padding, dilation,
                 groups: int) -> torch.Tensor:
    """F.conv2d(x, w) for x on `grid` and integer-valued w (or its `pack_conv_weight`), on int8
    kernels: float32 (N, C_out, H_out, W_out) in channels_last memory."""
    packed = pack_conv_weight(w, stride, padding, dilation, groups)
    codes = input_codes(x, grid, signed=False)
    scales, zero_points = INTEGER_PRODUCTS.scales(packed.shape[0])
    return torch.ops.onednn.qconv2d_pointwise(
        codes, grid.step, grid.zero_point, packed, scales, zero_points, None, list(stride), list(padding),
        list(dilation), groups, 1.0, 0, torch.float32, "none", [], "")
