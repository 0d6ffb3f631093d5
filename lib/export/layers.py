"""The export form of one CIM layer: plain modules built from Brevitas quant layers with fixed steps.

A CIM layer computes every row-tile × slice partial sum in one fused grouped conv, which no
ONNX quantization format can describe (its weight steps vary along input channels). Its export
form spells the same arithmetic out in pieces ONNX can carry (see docs/export.md):

ADC off: input Q/DQ (a_bit) → one conv per row-tile (Slice/Gather of the tile's input
    channels, weight Q/DQ at w_bit with that tile's per-output-channel step) → Add over tiles →
    int32 bias. Layer/channel-wise steps need no split: one conv.
ADC on: input Q/DQ → (bit-serial: the input's DAC planes stacked along the batch, by Div /
    Floor / Sub / Mul / Concat) → per row-tile t and slice s a conv whose weights are the
    integer cell values (Q/DQ at cell width, scale 1) → partial-sum Q/DQ with the learned ADC
    step (adc_bits, per column) → Mul by 2^(s·c)·weight step → Add; offset mapping adds one
    reference-column conv per tile whose converted sum is subtracted; (bit-serial: the planes'
    outputs shifted by 2^(p·input_bits) and added); then int32 bias.
With the ADC off, bit-serial and multi-bit inputs give the same outputs exactly, so the export
form feeds the whole input (`input_mode` in the layer info says what was exported).
Slices, the weight grid and the reference column come from the layer's CrossbarPlan.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from brevitas.nn import QuantConv2d, QuantIdentity, QuantLinear
from brevitas.quant.scaled_int import Int32Bias as BrevitasInt32Bias
from brevitas.quant_tensor import IntQuantTensor, QuantTensor
from torch import nn

from lib.cim.crossbar import stored_slices
from lib.cim.input_planes import join_planes, plane_values
from lib.cim.layers import CIMConv2d, CIMLayerMixin, CIMLinear
from lib.export.quantizers import (BREVITAS_MAX_BITS, FixedQDQ, Int32Bias, act_quant, brevitas_can_export, grid,
                                   weight_quant)
from lib.finite import NonFiniteError, require_finite

log = logging.getLogger(__name__)


class ExportFormError(RuntimeError):
    """A CIM layer that cannot be turned into its export form (e.g. uncalibrated steps)."""


@dataclass
class ExportLayerInfo:
    """What the export form of one layer looks like (recorded in the export report)."""

    name: str
    kind: str
    w_bit: int
    a_bit: int
    adc_bits: Optional[int]
    tiles: int
    slices: int
    convs: int
    psum_qdq: int
    reference_columns: int
    input_mode: str = "multi-bit"
    input_planes: int = 1
    fallbacks: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _value(x):
    return x.value if isinstance(x, QuantTensor) else x


def _with_value(x, value: torch.Tensor):
    """`value` carrying x's quantization metadata when x is a QuantTensor (tile slices keep the input scale,
    which Brevitas' int32 bias needs)."""
    if isinstance(x, QuantTensor):
        return IntQuantTensor(value, x.scale, x.zero_point, x.bit_width, x.signed, x.training)
    return value


def check_calibrated(name: str, layer: CIMLayerMixin) -> None:
    """Refuse layers whose data-initialised steps were never set: their exported steps would be 1.0."""
    missing = []
    if not layer.input_step_module.initialized:
        missing.append("input step")
    if layer.psum_adc.enabled and not layer.psum_adc.initialized:
        missing.append("ADC steps")
    if missing:
        raise ExportFormError(f"{name}: {' and '.join(missing)} never initialised; calibrate the model "
                              f"(lib.cim.calibrate) or load a trained checkpoint before exporting")


class _PlainPiece(nn.Module):
    """A conv/linear piece whose weight grid Brevitas' QCDQ export refuses.

    1 bit: weight through our own Q → Clip → DQ. Wider than 8 bits (e.g. 8-bit differential cells,
    9 bits): opset 13 has no Q/DQ type for it, and onnxruntime fuses an int32 DequantizeLinear into
    integer MatMul kernels that reject it, so the weight is stored as its exact integer levels (a
    float initializer) times the step. A linear weight is stored transposed (in, out): no Transpose.
    """

    def __init__(self, kind: str, weight: torch.Tensor, step: torch.Tensor, bits: int, signed: bool, narrow: bool,
                 conv_args: Optional[dict] = None) -> None:
        super().__init__()
        self.kind = kind
        self.conv_args = conv_args or {}
        weight = weight.detach().float()
        axis = 0 if kind == "conv" else 1
        if kind == "linear":
            weight = weight.t()
        self.weight_qdq = FixedQDQ(step, bits, signed, narrow, axis=axis, ndim=weight.dim())
        self.wide = self.weight_qdq.zero_point.dtype == torch.int32
        if self.wide:
            q = self.weight_qdq
            levels = torch.clamp(torch.round(weight / q.step_view), q.lo, q.hi)
            self.register_buffer("levels", levels.contiguous())
            self.register_buffer("step", q.step_view.clone())
            del self.weight_qdq
        else:
            self.register_buffer("weight", weight.contiguous().clone())

    def forward(self, x):
        w = self.levels * self.step if self.wide else self.weight_qdq(self.weight)
        x = _value(x)
        if self.kind == "conv":
            return F.conv2d(x, w, None, **self.conv_args)
        return torch.matmul(x, w)


class ExportCIMLayer(nn.Module):
    """Drop-in replacement of a CIMConv2d/CIMLinear in the model to export (eval only)."""

    def __init__(self, name: str, layer: CIMLayerMixin) -> None:
        super().__init__()
        if not isinstance(layer, (CIMConv2d, CIMLinear)):
            raise ExportFormError(f"{name}: {type(layer).__name__} is not a CIM layer")
        check_calibrated(name, layer)
        self.layer_name = name
        self.kind = "conv" if isinstance(layer, CIMConv2d) else "linear"
        self.fallbacks: list[str] = []
        lay, hw = layer.layout, layer.hw
        self.groups, self.tiles = lay.groups, lay.tiles
        self.out_channels = lay.groups * lay.out_channels_per_group
        self.adc = layer.psum_adc.enabled
        # With the ADC on, a Linear is computed as a 1×1 conv on (tokens, features, 1, 1):
        # onnxruntime fuses MatMul → per-channel QuantizeLinear into QLinearMatMul, which only
        # supports a per-tensor output step, and then fails at run time.
        self.pointwise = self.kind == "linear" and self.adc
        self.ndim = 4 if self.kind == "conv" or self.pointwise else 2
        self.piece_kind = "conv" if self.ndim == 4 else "linear"
        with torch.no_grad():
            qw = layer.quant_weight()
            scale = qw.scale.detach()
            q = torch.round(qw.value.detach() / scale)
            step_grid = layer.weight_step_grid().detach()  # (groups, tiles, out_per_group), positive
            a_step = layer.input_step().detach()
        try:
            require_finite({"integer weights": q, "weight step": step_grid, "input step": a_step}, name)
        except NonFiniteError as err:
            raise ExportFormError(str(err)) from None
        self.w_bit, self.a_bit, self.cell_bits = layer.w_bit, layer.a_bit, hw.cell_bits
        self.adc_bits = layer.adc_bits if self.adc else None
        plan = layer.plan
        self.narrow_weights = plan.narrow_weights
        # Planes matter only where the ADC converts each of them; without it their sum is the input.
        self.planes = layer.input_planes if self.adc else 1
        self.input_mode = "bit-serial" if self.planes > 1 else "multi-bit"
        self.input_bits = hw.input_bits
        self.register_buffer("plane_step", a_step.detach().reshape(()).clone())
        self.register_buffer("plane_significance", plan.plane_significance(self.planes))
        self.padding_mode = "zeros"
        if self.kind == "conv":
            self.padding_mode = layer.padding_mode
            self.reversed_padding = layer._reversed_padding_repeated_twice
            padding = layer.padding if layer.padding_mode == "zeros" else 0
            self.conv_args = dict(stride=layer.stride, padding=padding, dilation=layer.dilation, groups=lay.groups)
            self.kernel_size = layer.kernel_size
        elif self.pointwise:
            q = q.reshape(q.shape + (1, 1))
            self.conv_args = dict(stride=1, padding=0, dilation=1, groups=1)
            self.kernel_size = (1, 1)
        self._build_input(a_step, layer.input_signed)
        self._build_tiles(lay)
        bias = layer.bias.detach() if layer.bias is not None else None
        # The int32 bias at the step the layer itself quantizes it to (input step × tile 0's weight step).
        bias_scale = layer.bias_step().detach()
        self.pieces = nn.ModuleList()
        self.bias = None
        if self.adc:
            self._build_adc_on(layer, q, step_grid)
            self.psum_count = len(self.psum_quants)
        else:
            self._build_adc_off(layer, q, step_grid, bias, hw.weight_granularity)
            self.psum_count = 0
        if bias is not None and not self.brevitas_bias:
            self.bias = Int32Bias(bias, bias_scale, self.ndim)

    # ------------------------------------------------------------------ building
    def _build_input(self, a_step: torch.Tensor, signed: bool) -> None:
        self.input_signed = bool(signed)
        if brevitas_can_export(self.a_bit):
            self.input_quant = QuantIdentity(act_quant=act_quant(a_step, self.a_bit, signed), return_quant_tensor=True)
            self.brevitas_input = True
        else:
            self.input_quant = FixedQDQ(a_step, self.a_bit, signed, ndim=self.ndim)
            self.brevitas_input = False
            self.fallbacks.append(f"input Q/DQ at {self.a_bit} bits")

    def _build_tiles(self, lay) -> None:
        """Input channels (group-major, as a grouped conv expects them) of each row-tile."""
        self.tile_ranges = []
        for t in range(lay.tiles):
            start = t * lay.channels_per_tile
            stop = min(start + lay.channels_per_tile, lay.in_channels_per_group)
            self.tile_ranges.append((start, stop))
            index = torch.cat([torch.arange(g * lay.in_channels_per_group + start, g * lay.in_channels_per_group + stop)
                               for g in range(lay.groups)])
            self.register_buffer(f"tile_index_{t}", index, persistent=False)

    def _piece(self, weight: torch.Tensor, step: torch.Tensor, bits: int, signed: bool, narrow: bool,
               out_channels: int, groups: int, bias: Optional[torch.Tensor] = None, what: str = "weights"):
        """One conv/linear over one tile's channels: Brevitas Quant layer, or our own Q/DQ when Brevitas
        cannot export the grid. `step` is per tensor (1 value) or per output channel."""
        in_channels = weight.shape[1] * groups
        if not brevitas_can_export(bits):
            self.fallbacks.append(f"{what} Q/DQ at {bits} bits" if bits <= BREVITAS_MAX_BITS else
                                  f"{what} as {bits}-bit integer levels × step")
            args = dict(self.conv_args, groups=groups) if self.piece_kind == "conv" else None
            return _PlainPiece(self.piece_kind, weight, step, bits, signed, narrow, args)
        shape = (-1,) + (1,) * (weight.dim() - 1) if step.numel() > 1 else (1,) * weight.dim()
        quant = weight_quant(step.reshape(shape), bits, signed, narrow)
        with_bias = bias is not None
        bias_kw = dict(bias_quant=BrevitasInt32Bias) if with_bias else {}
        if self.piece_kind == "conv":
            args = dict(self.conv_args, groups=groups)
            module = QuantConv2d(in_channels, out_channels, self.kernel_size, bias=with_bias, weight_quant=quant,
                                 **args, **bias_kw)
        else:
            module = QuantLinear(in_channels, out_channels, bias=with_bias, weight_quant=quant, **bias_kw)
        with torch.no_grad():
            module.weight.copy_(weight)
            if with_bias:
                module.bias.copy_(bias)
        return module

    def _per_channel(self, granularity: str) -> bool:
        """Whether a step of this granularity varies across one piece's output channels."""
        return granularity == "column" or granularity == "channel" or (granularity == "array" and self.groups > 1)

    def _build_adc_off(self, layer, q: torch.Tensor, step_grid: torch.Tensor, bias, granularity: str) -> None:
        split = self.tiles > 1 and granularity in ("array", "column")
        self.split_tiles = split
        self.brevitas_bias = bias is not None and self.brevitas_input and brevitas_can_export(self.w_bit)
        per_channel = self._per_channel(granularity)
        for t in range(self.tiles if split else 1):
            step = step_grid[:, t, :].reshape(-1)
            if not per_channel:
                step = step[:1]
            if split:
                start, stop = self.tile_ranges[t]
                w_int = q[:, start:stop]
            else:
                w_int = q
            scale_view = step.reshape((-1,) + (1,) * (q.dim() - 1)) if step.numel() > 1 else step.reshape(())
            piece_bias = bias if (t == 0 and self.brevitas_bias) else None
            self.pieces.append(self._piece(w_int * scale_view, step, self.w_bit, True, self.narrow_weights,
                                           self.out_channels, self.groups, piece_bias))
        self.psum_quants = nn.ModuleList()

    def _build_adc_on(self, layer, q: torch.Tensor, step_grid: torch.Tensor) -> None:
        hw, adc, plan = layer.hw, layer.psum_adc, layer.plan
        self.split_tiles = True
        self.brevitas_bias = False
        offset = not plan.differential
        cells = stored_slices(q, plan)  # (S, *q.shape)
        self.slices = cells.shape[0]
        # Cell grid: offset stores unsigned c-bit cells; differential the pair's difference, a signed
        # (c+1)-bit narrow grid [-(2^c-1), 2^c-1].
        cell_bits, cell_signed, cell_narrow = ((hw.cell_bits, False, False) if offset
                                                else (hw.cell_bits + 1, True, True))
        out_per_group = q.shape[0] // self.groups
        columns = adc.columns
        steps = adc.full_step().detach().reshape(self.groups, self.tiles, columns)
        bounds = adc.clip_bounds()
        if bounds is not None:
            bounds = tuple(b.detach().reshape(self.groups, self.tiles, columns) for b in bounds)
        self.psum_quants = nn.ModuleList()
        self.clip = bounds is not None
        one = torch.ones(1)
        view = (1, -1) + (1,) * (self.ndim - 2)
        self.piece_index = []  # (tile, slice or 'ref')
        for t in range(self.tiles):
            start, stop = self.tile_ranges[t]
            for s in range(self.slices):
                cols = slice(s * out_per_group, (s + 1) * out_per_group)
                self.pieces.append(self._piece(cells[s][:, start:stop], one, cell_bits, cell_signed, cell_narrow,
                                               self.out_channels, self.groups, what="cell"))
                self._add_psum(steps[:, t, cols], bounds, t, cols, adc, view)
                gamma = float(plan.significance()[s]) * step_grid[:, t, :].reshape(-1)
                self.register_buffer(f"gamma_{len(self.piece_index)}", gamma.reshape(view))
                self.piece_index.append((t, s))
            if offset:
                ref_slice, cell_value = plan.offset_reference()
                shape = (self.groups, stop - start) + tuple(q.shape[2:])
                self.pieces.append(self._piece(torch.full(shape, cell_value), one, hw.cell_bits, False, False,
                                               self.groups, self.groups, what="reference cell"))
                ref_cols = slice(columns - 1, columns)
                self._add_psum(steps[:, t, ref_cols], bounds, t, ref_cols, adc, view)
                gamma = (2.0 ** (ref_slice * hw.cell_bits)) * step_grid[:, t, :].reshape(-1)
                self.register_buffer(f"gamma_{len(self.piece_index)}", -gamma.reshape(view))
                self.piece_index.append((t, "ref"))
        if offset and self.groups > 1:
            # Reference sums come one per group; repeat each for its group's output channels.
            self.register_buffer("ref_expand", torch.arange(self.groups).repeat_interleave(out_per_group),
                                 persistent=False)
        else:
            self.ref_expand = None

    def _add_psum(self, step: torch.Tensor, bounds, t: int, cols: slice, adc, view) -> None:
        """The ADC of one (tile, slice) group of columns: optional clip bounds, then Q/DQ at adc_bits
        (one step when all its columns share it, else one per column)."""
        step = step.reshape(-1)
        if bool((step == step[0]).all()):
            step = step[:1]
        index = len(self.psum_quants)
        if bounds is not None:
            lo, hi = (b[:, t, cols].reshape(view) for b in bounds)
            self.register_buffer(f"clip_lo_{index}", lo.clone())
            self.register_buffer(f"clip_hi_{index}", hi.clone())
        bits, signed = adc.num_bits, adc.signed
        if step.numel() > 1:
            # The ADC's input range [lo·step, hi·step] as Max/Min before the Q/DQ: the same values
            # (QuantizeLinear saturates there anyway), but it keeps onnxruntime from fusing the
            # conv with a per-channel QuantizeLinear into QLinearConv/QLinearMatMul, whose output
            # step must be per tensor (the fused graph fails at run time).
            low, high = grid(bits, signed)
            self.register_buffer(f"range_lo_{index}", (low * step).reshape(view))
            self.register_buffer(f"range_hi_{index}", (high * step).reshape(view))
        if brevitas_can_export(bits):
            shaped = step.reshape(view) if step.numel() > 1 else step.reshape(())
            self.psum_quants.append(QuantIdentity(act_quant=act_quant(shaped, bits, signed)))
        else:
            self.fallbacks.append(f"partial-sum Q/DQ at {bits} bits")
            self.psum_quants.append(FixedQDQ(step, bits, signed, axis=1, ndim=self.ndim))

    # ------------------------------------------------------------------ forward
    def _tile_input(self, xq, t: int):
        x = _value(xq)
        if not self.split_tiles:
            return xq
        if self.groups == 1:
            start, stop = self.tile_ranges[t]
            return _with_value(xq, x[:, start:stop])
        return _with_value(xq, x.index_select(1, getattr(self, f"tile_index_{t}")))

    def forward(self, x):
        x = _value(x)
        lead = None
        if self.kind == "linear" and x.dim() != 2:
            lead = x.shape[:-1]
            x = x.reshape(-1, x.shape[-1])
        if self.pointwise:
            x = x[:, :, None, None]
        xq = self.input_quant(x)
        if self.kind == "conv" and self.padding_mode != "zeros":
            xq = _with_value(xq, F.pad(_value(xq), self.reversed_padding, mode=self.padding_mode))
        if self.adc:
            y = self._forward_adc(xq)
        else:
            y = None
            for t, piece in enumerate(self.pieces):
                out = piece(self._tile_input(xq, t))
                y = out if y is None else y + out
        if self.bias is not None:
            y = self.bias(y)
        if self.pointwise:
            y = y.flatten(1)
        if lead is not None:
            y = y.reshape(tuple(lead) + (y.shape[-1],))
        return y

    def _forward_adc(self, xq):
        if self.planes > 1:
            xq = plane_values(_value(xq), self.plane_step, self.planes, self.input_bits)
        y = None
        tile_inputs = {}
        for index, ((t, s), piece) in enumerate(zip(self.piece_index, self.pieces)):
            if t not in tile_inputs:
                tile_inputs = {t: self._tile_input(xq, t)}
            p = piece(tile_inputs[t])
            if self.clip:
                p = torch.maximum(torch.minimum(p, getattr(self, f"clip_hi_{index}")), getattr(self, f"clip_lo_{index}"))
            range_lo = getattr(self, f"range_lo_{index}", None)
            if range_lo is not None:
                p = torch.minimum(torch.maximum(p, range_lo), getattr(self, f"range_hi_{index}"))
            level = self.psum_quants[index](p)
            if s == "ref" and self.ref_expand is not None:
                level = level.index_select(1, self.ref_expand)
            term = level * getattr(self, f"gamma_{index}")
            y = term if y is None else y + term
        return join_planes(y, self.plane_significance)

    def info(self) -> ExportLayerInfo:
        refs = sum(1 for _, s in getattr(self, "piece_index", []) if s == "ref")
        return ExportLayerInfo(self.layer_name, self.kind, self.w_bit, self.a_bit, self.adc_bits, self.tiles,
                               getattr(self, "slices", 1) if self.adc else 1, len(self.pieces), self.psum_count, refs,
                               self.input_mode, self.planes, sorted(set(self.fallbacks)))

    def extra_repr(self) -> str:
        return (f"name={self.layer_name}, kind={self.kind}, w_bit={self.w_bit}, a_bit={self.a_bit}, "
                f"adc_bits={self.adc_bits}, tiles={self.tiles}, pieces={len(self.pieces)}")
