"""A CIM layer's arrays and how a forward runs on them: `CrossbarTile`.

The Brevitas-facing layer (lib.cim.layers) owns bits, quantizers, the ADC module and the learned
state; its tile owns the crossbar computation: tiling the quantized input onto the arrays, the
row-tile × slice partial sums (one grouped conv or batched matmul), the ADC conversion and the
digital shift-and-add, along the `Route` the layer chose for the forward (lib.cim.route). What is
stored where is the layer's `CrossbarPlan`. `ConvTile` and `LinearTile` are the two forms, chosen
once when the layer is made.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from lib.cim.crossbar_adc import crossbar_adc_forward
from lib.cim.input_planes import join_planes, split_planes
from lib.cim.integer_products import InputGrid
from lib.cim.route import Route
from lib.cim.tile_products import ConvTiles, MatmulTiles, tile_products
from lib.finite import NonFiniteError, require_finite


class CrossbarTile:
    """The crossbar side of one CIM layer (see the module docstring). `layer`: the CIM layer it
    computes for; the tile reads its plan, layout, ADC and eval cache, and holds no state of its own."""

    def __init__(self, layer) -> None:
        self.layer = layer

    # ------------------------------------------------------------ what the layer holds
    @property
    def plan(self):
        return self.layer.plan

    @property
    def layout(self):
        return self.layer.layout

    @property
    def psum_adc(self):
        return self.layer.psum_adc

    @property
    def layer_name(self) -> str:
        return self.layer.layer_name

    @property
    def uses_reference_column(self) -> bool:
        return not self.plan.differential

    # ------------------------------------------------------------ shared steps
    def shifts(self, like: torch.Tensor) -> tuple[torch.Tensor, float]:
        """2^(s·c) per weight slice (`CrossbarPlan.significance`), and the offset reference column's."""
        plan = self.plan
        return plan.significance(like.device, like.dtype), plan.reference_significance

    def convert(self, psums: torch.Tensor, step_grid: torch.Tensor, ref: Optional[torch.Tensor],
                floor: Optional[torch.Tensor]) -> torch.Tensor:
        """ADC + digital shift-and-add of partial sums (M, groups, tiles, slices·out) and the offset
        reference column's (M, groups, tiles) → (M, groups, out)."""
        shifts, ref_shift = self.shifts(psums)
        return self.psum_adc(psums, shifts, step_grid, ref, ref_shift if ref is not None else None, floor)

    def split_input(self, x: torch.Tensor, scale: Optional[torch.Tensor], planes: int) -> torch.Tensor:
        """The quantized input's values (step `scale`, None: the layer's input step), split into
        `planes` DAC planes stacked along dim 0 (bit-serial mode)."""
        if planes == 1:
            return x
        step = self.layer.input_step() if scale is None else scale
        return split_planes(x, step.reshape(()), planes, self.plan.hw.input_bits)

    def join_planes(self, y: torch.Tensor, planes: int) -> torch.Tensor:
        """Shift-and-add of the planes' outputs, 2^(p·input_bits) each (`CrossbarPlan.plane_significance`)."""
        if planes == 1:
            return y
        return join_planes(y, self.plan.plane_significance(planes, y.device, y.dtype))

    def input_grid(self, x: torch.Tensor, scale: Optional[torch.Tensor], planes: int,
                   route: Route) -> Optional[InputGrid]:
        """The crossbar input's 8-bit integer grid where the route computes integer products
        (lib.cim.integer_products) of a quantized input (`scale` its step), else None (float32)."""
        if scale is None or route.products not in ("int8", "int8-epilogue"):
            return None
        zero_point = self.plan.input_zero_point(planes)
        step = float(scale.detach().reshape(()))
        if not math.isfinite(step):
            raise NonFiniteError(f"the input step of {self.layer_name} is {step}: it cannot make integer codes",
                                 f"the input step of {self.layer_name}")
        return InputGrid(step, zero_point)

    def check_codes_input(self, x: torch.Tensor) -> None:
        """Refuse an input holding NaN/inf before it becomes integer codes (which would hide it)."""
        require_finite(x, f"the input of {self.layer_name} to convert to integer codes")

    def adc_floor(self, crossbar_input: torch.Tensor) -> Optional[torch.Tensor]:
        """Least mean |partial sum| per (array, read-out column) an ADC step may be initialised from:
        the column's largest cell value (its slice's; the reference cell's) times the mean |input|
        over the real inputs. `crossbar_input`: the quantized input (or its stacked DAC planes)
        before any padding, so that neither a ragged row-tile's padding channels nor a padded
        border lower the mean. None once the ADC is initialised (nothing to compute)."""
        if self.psum_adc.initialized or not self.psum_adc.enabled:
            return None
        plan = self.plan
        cells = torch.tensor(plan.slice_max(), dtype=crossbar_input.dtype).repeat_interleave(plan.out_channels)
        if self.uses_reference_column:
            cells = torch.cat([cells, cells.new_tensor([plan.offset_reference()[1]])])
        scale = crossbar_input.detach().abs().mean().to("cpu")
        return (cells * scale).expand(self.psum_adc.arrays, -1)

    def converted_outputs(self, x_tiled: torch.Tensor, weights, tiles, ref: Optional[torch.Tensor],
                          floor: Optional[torch.Tensor], route: Route,
                          source: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Every partial sum of the tiled input through the ADC, shift-and-added: (M, groups, out).
        One autograd node (lib.cim.crossbar_adc) where the route says so, else products then the
        ADC module; `floor`: `adc_floor` of the real input (None once the ADC is initialised);
        `source`: the input x_tiled was tiled from, which that node may take its gradient to."""
        if route.conversion != "adc":
            q, step_grid, stored, shifts, ref_shift, constants = self.fused_form(weights, tiles, ref is not None)
            return crossbar_adc_forward(self, x_tiled, q, stored, tiles, step_grid, shifts, route, ref, ref_shift,
                                        constants, source)
        lay = self.layout
        q, step_grid, stored = weights.crossbar(tiles)
        psums = tile_products(x_tiled, q, tiles, self.plan, stored)
        psums = psums.reshape(-1, lay.groups, lay.tiles, self.plan.slices * lay.out_channels_per_group)
        return self.convert(psums, step_grid, ref, floor)

    def fused_form(self, weights, tiles, has_ref: bool) -> tuple:
        """What the fused crossbar + ADC node reads besides the input: (q, step grid, array weight,
        2^(s·c) per slice, the reference column's significance, `PartialSumADC.constants`); kept
        as one eval-cache value per packed form of the array weight when the weights are (one key
        per forward)."""
        def compute():
            q, step_grid, stored = weights.crossbar(tiles)
            shifts, ref_shift = self.shifts(q)
            constants = self.psum_adc.constants(step_grid, shifts, has_ref)
            if weights.cached and tiles.levels_in_epilogue(*self.psum_adc.grid_range()):
                stored = tiles.with_levels_weight(stored, constants[1])  # converts in the conv's epilogue
            return q, step_grid, stored, shifts, ref_shift, constants
        if not weights.cached:
            return compute()
        layer = self.layer
        return layer.eval_cache.get(layer._eval_cache_key, f"fused_form-{tiles.packed_form}", compute)


def plus_bias(y: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Converted outputs (M, groups, out) plus the bias (groups·out): in place when y is a fresh
    tensor (no backward keeps the converted outputs), never on a view, whose in-place change
    would make the backward copy the whole gradient."""
    if bias is None:
        return y
    bias = bias.view(y.shape[1:])
    return y.add_(bias) if y._base is None else y + bias


class ConvTile(CrossbarTile):
    """A conv's arrays: each group's (C_in/g·k_h·k_w) × C_out/g matrix cut into row-tiles of whole
    input channels, computed as one grouped conv over the tiled input."""

    def __init__(self, layer) -> None:
        super().__init__(layer)
        self.kernel_size, self.stride = tuple(layer.kernel_size), tuple(layer.stride)
        self.dilation, self.padding_mode = tuple(layer.dilation), layer.padding_mode
        self.padding = tuple(layer.padding) if layer.padding_mode == "zeros" else (0, 0)
        self.explicit_padding = layer._reversed_padding_repeated_twice
        self.out_channels = layer.out_channels
        self._output_sizes: dict = {}

    def tiles(self, input_grid: Optional[InputGrid] = None) -> ConvTiles:
        """The grouped-conv view of the arrays (padding already applied for non-zero padding modes,
        see `pad_input`), with integer products for inputs on `input_grid`."""
        return ConvTiles(self.layout, self.kernel_size, self.stride, self.padding, self.dilation, input_grid)

    def pad_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding_mode == "zeros":
            return x
        return F.pad(x, self.explicit_padding, mode=self.padding_mode)

    def reference_sums(self, x_tiled: torch.Tensor, tiles: ConvTiles) -> Optional[torch.Tensor]:
        """The offset mapping's reference column per array (N, H_out, W_out, groups·tiles): the
        same cell value on every row, so a small grouped conv of the tiled input; else None."""
        if not self.uses_reference_column:
            return None
        _, cell_value = self.plan.offset_reference()
        ones = x_tiled.new_full((tiles.arrays, self.layout.channels_per_tile) + self.kernel_size, cell_value)
        return F.conv2d(x_tiled, ones, None, tiles.stride, tiles.padding, tiles.dilation, tiles.arrays).permute(0, 2, 3, 1)

    def partial_sums(self, x: torch.Tensor, slices: torch.Tensor):
        """Every row-tile × weight column partial sum of the crossbar input x (one plane, or the
        stacked planes) for given cell slices, channels last (N, H_out, W_out, groups·tiles·slices·out),
        and the offset reference column's (N, H_out, W_out, groups·tiles) or None. For inspection;
        the forward uses `tile_products`."""
        tiles = self.tiles()
        x_tiled = tiles.tile_input(self.pad_input(x))
        return tiles.products(x_tiled, tiles.weight(slices)), self.reference_sums(x_tiled, tiles)

    def partial_sum_rows(self, x: torch.Tensor, planes: int) -> int:
        """Rows of partial sums a forward of x makes: output positions × input planes."""
        if x.dim() != 4:
            return 0
        h_out, w_out = self._output_size(tuple(x.shape[2:]))
        return x.shape[0] * planes * h_out * w_out

    def _output_size(self, size: tuple) -> tuple[int, int]:
        """(H_out, W_out) of the layer's conv over an input of spatial `size` (kept per size)."""
        known = self._output_sizes.get(size)
        if known is None:
            padding = self.layer.padding
            if isinstance(padding, str):  # 'same' keeps the size, 'valid' pads nothing
                padding = (0, 0) if padding == "valid" else None
            if padding is None:
                known = size
            else:
                known = tuple(max((n + 2 * pad - dil * (k - 1) - 1) // stride + 1, 0) for n, pad, dil, k, stride
                              in zip(size, padding, self.dilation, self.kernel_size, self.stride))
            self._output_sizes[size] = known
        return known

    def tiles_codes(self, tiles: ConvTiles, route: Route) -> bool:
        """Whether the forward tiles the input's integer codes rather than the input: its fused
        crossbar + ADC node keeps the untiled input for the backward (`ConvTiles.keeps_source`) and
        reads only the codes (integer products, no offset reference column)."""
        return (tiles.input_grid is not None and tiles.keeps_source and not self.uses_reference_column
                and route.conversion != "adc")

    def forward(self, x, scale, weights, bias, planes: int, route: Route) -> torch.Tensor:
        """The layer's output (N, C_out, H, W) for its quantized input x (step `scale`), the bias on
        its int32 grid added."""
        lay = self.layout
        tiles = self.tiles(self.input_grid(x, scale, planes, route))
        if tiles.input_grid is not None:
            self.check_codes_input(x)
        inputs = self.split_input(x, scale, planes)
        source = self.pad_input(inputs)
        x_tiled = tiles.tile_codes(source) if self.tiles_codes(tiles, route) else tiles.tile_input(source)
        n, h, w = tiles.output_size(x_tiled)
        ref = self.reference_sums(x_tiled, tiles)
        if ref is not None:
            ref = ref.reshape(n * h * w, lay.groups, lay.tiles)
        y = self.converted_outputs(x_tiled, weights, tiles, ref, self.adc_floor(inputs), route, source)
        return self.output_map(self.join_planes(y, planes), h, w, bias)

    def codes_forward(self, codes: torch.Tensor, grid: InputGrid, weights, bias, route: Route) -> torch.Tensor:
        """`forward` of an input given as its uint8 codes on `grid`: the same integer products, so
        the same outputs."""
        tiles = self.tiles(grid)
        x_tiled = tiles.tile_input(codes)
        _, h, w = tiles.output_size(x_tiled)
        y = self.converted_outputs(x_tiled, weights, tiles, None, None, route)  # the codes path runs initialised ADCs only
        return self.output_map(y, h, w, bias)

    def output_map(self, y: torch.Tensor, h: int, w: int, bias: Optional[torch.Tensor]) -> torch.Tensor:
        """Converted outputs (N·H·W, groups, out) → (N, C_out, H, W), plus the bias."""
        y = plus_bias(y, bias).reshape(-1, h, w, self.out_channels)
        # channels_last (NHWC memory), as computed: the BatchNorm/ReLU/residual ops that follow keep
        # that format, so the network runs NHWC from the first CIM conv on without layout copies
        return y.permute(0, 3, 1, 2)


class LinearTile(CrossbarTile):
    """A linear layer's arrays: in_features cut into row-tiles of at most `rows` features, one
    matmul per tile; inputs may have leading dims (tokens), flattened for the MVM."""

    def __init__(self, layer) -> None:
        super().__init__(layer)
        self.in_features, self.out_features = layer.in_features, layer.out_features

    def tiles(self, input_grid: Optional[InputGrid] = None) -> MatmulTiles:
        """The batched-matmul view of the arrays, with integer products for inputs on `input_grid`."""
        return MatmulTiles(self.layout, input_grid)

    def reference_sums(self, xt: torch.Tensor) -> Optional[torch.Tensor]:
        """The offset mapping's reference column per tile (tiles, tokens): the cell value times the
        tile's input sum; else None."""
        if not self.uses_reference_column:
            return None
        _, cell_value = self.plan.offset_reference()
        return cell_value * xt.sum(dim=2)

    def partial_sums(self, x2d: torch.Tensor, slices: torch.Tensor):
        """Every row-tile × weight column partial sum for given cell slices (tokens, tiles,
        slices·out), and the offset reference column's (tiles, tokens) or None. For inspection;
        the forward uses `tile_products`."""
        tiles = self.tiles()
        xt = tiles.tile_input(x2d)
        return tiles.products(xt, tiles.weight(slices)), self.reference_sums(xt)

    def partial_sum_rows(self, x: torch.Tensor, planes: int) -> int:
        """Rows of partial sums a forward of x makes: tokens × input planes."""
        return x.numel() // max(x.shape[-1], 1) * planes if x.dim() else 0

    def forward(self, x, scale, weights, bias, planes: int, route: Route) -> torch.Tensor:
        """The layer's output (..., out_features) for its quantized input x (step `scale`)."""
        lead = x.shape[:-1]
        tiles = self.tiles(self.input_grid(x, scale, planes, route))
        if tiles.input_grid is not None:
            self.check_codes_input(x)
        inputs = self.split_input(x.reshape(-1, self.in_features), scale, planes)
        xt = tiles.tile_input(inputs)
        ref = self.reference_sums(xt)
        if ref is not None:
            ref = ref.t().unsqueeze(1)
        y = self.converted_outputs(xt, weights, tiles, ref, self.adc_floor(inputs), route)
        y = plus_bias(self.join_planes(y, planes), bias).squeeze(1)
        return y.reshape(lead + (self.out_features,))
