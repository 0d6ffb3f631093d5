"""CIMConv2d / CIMLinear: Brevitas quantized layers whose forward is the tiled, bit-sliced
crossbar MVM with ADC quantization of every row-tile × slice (× input plane) partial sum.

Per forward: quantize the input (Brevitas, LSQ) and the weight (LSQ step per granularity: in
training by the fused kernels of lib.cim.fused_weight, else by Brevitas); split the input into
DAC planes (bit-serial mode) stacked along the batch; split the integer weights into cell
slices; compute every plane × row-tile × slice × column partial sum in ONE grouped conv (or
batched matmul), as integer products on int8 kernels where the CPU has them
(lib.cim.integer_products); convert them with the ADC while applying the digital shift (2^(s·c)) and
weight step; sum over tiles and slices; shift-and-add the planes (2^(p·input_bits)); add bias.
What is stored where is the layer's `plan` (lib.cim.crossbar.CrossbarPlan), the same description
the export form and the cost model read.
"""
from __future__ import annotations

import collections
import logging
from typing import Optional

import torch
import torch.nn.functional as F
from brevitas.nn import QuantConv2d, QuantLinear
from brevitas.quant_tensor import QuantTensor
from torch import nn
from torch.nn.modules.utils import _pair

from lib.bit_limits import check_bits
from lib.cim import brevitas_adapter as brevitas
from lib.cim.adc import PartialSumADC
from lib.cim.adc_kernels import grid_bounds
from lib.cim.crossbar import CrossbarPlan, TileLayout, stored_slices
from lib.cim.crossbar_adc import partial_sums_chunked
from lib.cim.eval_cache import EvalCache, module_tensors, tensor_versions
from lib.cim.fused_quant import fake_quant, fake_quant_abs_sum
from lib.cim.fused_weight import FusedWeights
from lib.cim.hardware import INPUT_MODES, HardwareConfig
from lib.cim.integer_products import quantized_codes
from lib.cim.quantizers import GridSwitch
from lib.cim.route import InputMeta, LayerFlags, Route, caches_crossbar_form, choose_route, dtype_name
from lib.cim.runtime import RUNTIME
from lib.cim.steps import positive
from lib.cim.tile import ConvTile, LinearTile
from lib.cim.tile_products import crossbar_weight
from lib.finite import require_finite

log = logging.getLogger(__name__)

_LOOK_UP = object()  # `_quantize_input`: the plain input quantizer is looked up


class CIMLayerMixin:
    """Bits, tiling and crossbar compute shared by the conv and linear CIM layers."""

    hw: HardwareConfig
    layout: TileLayout
    psum_adc: PartialSumADC

    # ------------------------------------------------------------ setup
    def _quant_kwargs(self, hw: HardwareConfig, layout: TileLayout, w_bit: int, a_bit: int,
                      input_signed: bool, weight_ndim: int) -> dict:
        check_bits("w_bit", w_bit)
        check_bits("a_bit", a_bit)
        narrow = CrossbarPlan.for_layout(hw.simulated(), layout, w_bit, a_bit, input_signed).narrow_weights
        return brevitas.quant_kwargs(hw.weight_granularity, layout, w_bit, a_bit, input_signed, weight_ndim, narrow)

    def _setup_crossbar(self, hw: HardwareConfig, layout: TileLayout, adc_bits: Optional[int],
                        input_signed: bool, grid_switch: GridSwitch, name: str) -> None:
        self.layer_name = name  # the model's module path, for messages
        self.hw = hw
        self._grid_switch = grid_switch
        self.layout = layout
        self.input_signed = bool(input_signed)
        self.input_mode = hw.input_mode  # bit-serial | multi-bit; see set_input_mode
        self._plan = None
        adc_bits = hw.adc_bits if adc_bits is None else int(adc_bits)
        check_bits("adc_bits", adc_bits)
        plan = self.plan
        self.uses_reference_column = not plan.differential
        self._set_weight_grid(plan)
        self.psum_adc = PartialSumADC(hw.psum_granularity, layout.groups, layout.tiles, plan.column_tile_of(),
                                      adc_bits, plan.adc_signed, hw.n_sigma)
        self.force_crossbar = False  # take the crossbar path even with the ADC off (tests, studies)
        self.fused_adc = True  # crossbar MVM + ADC as one autograd node when the ADC allows
        self.fused_weights = True  # weight path by lib.cim.fused_weight when not cached or traced
        self.register_buffer("first_channel_of_tile",
                             torch.arange(layout.tiles) * layout.channels_per_tile, persistent=False)
        self.eval_cache = EvalCache()  # the crossbar form between evaluation forwards
        self.cache_eval = True  # keep it (off: recompute every forward, for comparisons)
        self.route_counts: collections.Counter = collections.Counter()  # Route -> forwards that took it
        self.tile = self._tile_kind(self)  # the crossbar computation (lib.cim.tile)

    @property
    def plan(self) -> CrossbarPlan:
        """This layer on the crossbar at its current bits, as simulated (see lib.cim.crossbar)."""
        if self._plan is None or (self._plan.w_bit, self._plan.a_bit) != (self.w_bit, self.a_bit):
            self._plan = CrossbarPlan.for_layout(self.hw.simulated(), self.layout, self.w_bit, self.a_bit,
                                                 self.input_signed)
        return self._plan

    def _set_weight_grid(self, plan: CrossbarPlan) -> None:
        """Narrow (symmetric) weight grid for differential magnitudes, full grid otherwise: in the
        quantizer in use and in the switch Brevitas reads when it rebuilds one."""
        brevitas.set_narrow_weight_grid(self, self._grid_switch, plan.narrow_weights)

    def set_input_mode(self, mode: str) -> None:
        """Simulate bit-serial or multi-bit inputs from now on. The ADC steps re-initialise from the
        next partial sums when the mode changes: per-plane sums have another scale."""
        if mode not in INPUT_MODES:
            raise ValueError(f"input_mode={mode!r} is not allowed: expected one of {list(INPUT_MODES)}")
        if mode != self.input_mode and self.plan.input_planes(mode) != self.plan.input_planes(self.input_mode):
            self.psum_adc.mark_stale()
        self.input_mode = mode

    # ------------------------------------------------------------ eval cache
    def train(self, mode: bool = True):
        """nn.Module.train, walking the ~30 Brevitas submodules without its per-module generators
        (loops switch modes every step); training empties the eval cache."""
        if not isinstance(mode, bool):
            raise ValueError(f"training mode={mode!r} is not allowed: expected a bool")
        if mode:
            self.eval_cache.clear()  # training changes the weights every step: free the memory
        self.training = mode
        _set_training(self._modules.values(), mode)
        return self

    def _cached_side_tensors(self) -> list:
        """Everything the eval cache's values are computed from: the weight, the weight quantizer's
        state and the ADC's (its steps, for the conversion constants)."""
        return [self.weight, *module_tensors(brevitas.weight_quantizer(self)), *module_tensors(self.psum_adc)]

    def _caches_crossbar_form(self) -> bool:
        """Whether the weight side comes from the eval cache now (lib.cim.route's rule)."""
        grad = torch.is_grad_enabled()
        return caches_crossbar_form(self.training, self.cache_eval, brevitas.tracing(), self._weight_export_mode,
                                    grad, grad and self._side_requires_grad(), self._device_noise() is not None)

    def _device_noise(self):
        """The layer's device non-idealities (lib.cim.noise.LayerNoise, set by lib.cim.noise.attach)
        when they change its cells, else None; traced and exported graphs stay noise-free. Its
        route then forms the cells in one place, `ComposedWeights` (lib.cim.route)."""
        noise = self.__dict__.get("device_noise")
        if noise is None or not noise.active or brevitas.tracing() or brevitas.weight_export_mode(self):
            return None
        return noise

    @property
    def _weight_export_mode(self) -> bool:
        return brevitas.weight_export_mode(self)

    def _side_requires_grad(self) -> bool:
        """Whether the weight, its quantizer's or the ADC's tensors need gradients."""
        return self.weight.requires_grad or any(t.requires_grad for t in self._cached_side_tensors())

    # ------------------------------------------------------------ route
    def route_for(self, x: torch.Tensor) -> Route:
        """The route (lib.cim.route) a forward of input x takes now."""
        return self._route_and_input_quant(x)[0]

    def _route_and_input_quant(self, x: torch.Tensor) -> tuple:
        """(`route_for(x)`, `_plain_input_quant()`): the forward reads both. Submodules are read
        from the _modules dicts (what nn.Module.__getattr__ returns, without its lookups): this
        runs on every forward."""
        x = brevitas.unwrap(x)
        grad = torch.is_grad_enabled()
        modules = self._modules
        adc, weight_quant, input_quant = modules["psum_adc"], modules["weight_quant"], modules["input_quant"]
        lo, hi = adc.grid_range()
        tensor_quant = self._plain_input_quant()
        plain = tensor_quant is not None
        step_module = tensor_quant.scaling_impl if plain else brevitas.input_step_module(self)
        flags = LayerFlags(
            self._route_kind, bool(self.export_mode), brevitas.weight_export_mode(self),
            weight_quant.is_quant_enabled, self.training, self.force_crossbar, self.fused_adc, self.fused_weights,
            self.cache_eval, adc.enabled, adc.fusable, lo, hi, getattr(self, "padding_mode", "zeros") == "zeros",
            input_quant.is_quant_enabled, plain, plain and not step_module.training and step_module.initialized,
            grad and self._side_requires_grad(), self.input_mode, self._device_noise() is not None)
        step = getattr(step_module, "step", None)
        requires_grad = x.requires_grad or (step is not None and step.requires_grad)
        plan, lay = self.plan, self.layout
        columns = lay.groups * lay.tiles * plan.slices * lay.out_channels_per_group
        rows = self.tile.partial_sum_rows(x, plan.input_planes(self.input_mode))
        inputs = InputMeta(x.device.type, dtype_name(x.dtype), x.element_size(), grad, brevitas.tracing(),
                           requires_grad, partial_sums_chunked(rows, columns, x.element_size()))
        return choose_route(plan, flags, RUNTIME.current, inputs), tensor_quant

    def _eval_cache_key(self) -> tuple:
        return (self.plan, self.input_mode, self.weight_step_module.initialized, self.psum_adc.initialized,
                tensor_versions(self._cached_side_tensors()))

    def quant_weight(self, quant_input=None, subtensor_slice_list=None):
        """Brevitas' quantized weight; in evaluation the kept one while the weight side is unchanged."""
        if subtensor_slice_list is not None or not self._caches_crossbar_form():
            return super().quant_weight(quant_input, subtensor_slice_list)
        compute = super().quant_weight
        return self.eval_cache.get(self._eval_cache_key, "quant_weight", lambda: compute(quant_input))

    def forward_impl(self, inp):
        """Brevitas' forward without its proxy chain: the input quantized by `_quantize_input`, the
        weight side from the fused kernels (lib.cim.fused_weight) when the crossbar form is not
        served from the eval cache and `fused_weights` is on, else Brevitas' quantized weight
        (`ComposedWeights`, kept in evaluation). The bias is quantized by `quantized_bias` and
        there is no output quantizer: Brevitas' own steps that this skips are no-ops for CIM
        layers. An evaluation forward that needs only the input's integer codes takes them from the
        input in one kernel (`_input_codes`). Traced or exported graphs take Brevitas' forward (they
        must contain its quantizers)."""
        x = self.unpack_input(inp)
        route, tensor_quant = self._route_and_input_quant(x)
        self.route_counts[route] += 1
        self._route = route  # what Brevitas' chain calls back into (`inner_forward_impl`) follows
        if route.chain == "brevitas":
            return super().forward_impl(inp)
        coded = self._input_codes(x, route, tensor_quant)
        if coded is None:
            value, scale = self._quantize_input(x, route, tensor_quant)
        weights = FusedWeights(self) if route.weights == "fused" else ComposedWeights(self, None,
                                                                                      route.weights == "cached")
        if coded is not None:
            codes, grid, scale = coded
            return self.pack_output(self.tile.codes_forward(codes, grid, weights, self._bias_for(scale, weights), route))
        return self.pack_output(self._forward_quantized(value, scale, weights, route))

    def _input_codes(self, x, route: Optional[Route] = None, tensor_quant=None) -> Optional[tuple]:
        """(uint8 codes, their `InputGrid`, the input step) for `tile.codes_forward` where the route
        reads the input as codes (None: the route of x now), else None: the input is quantized as
        floats (`_quantize_input`). `tensor_quant`: `_plain_input_quant()` when the caller has it."""
        route = self.route_for(x) if route is None else route
        if route.input != "codes":
            return None
        x = brevitas.unwrap(x)
        tensor_quant = self._plain_input_quant() if tensor_quant is None else tensor_quant
        scale, grid, lo, hi = self._codes_grid(x, tensor_quant, route)
        self.tile.check_codes_input(x)
        return quantized_codes(x, scale, lo, hi, grid), grid, scale

    def _quantize_input(self, x, route: Optional[Route] = None, tensor_quant=_LOOK_UP):
        """(quantized input, its step or None) as the input quantizer computes them: called
        directly when it is the plain CIM one (`_plain_input_quant`, which the caller may pass as
        `tensor_quant`: step module, then one fused fake-quant kernel that in training also sums
        |x| for the step's running mean; the same values and gradients, that mean up to summation
        order), else through Brevitas' proxy."""
        if tensor_quant is _LOOK_UP:
            tensor_quant = self._plain_input_quant()
        if tensor_quant is None:
            out = self.input_quant(x)
            return brevitas.unwrap(out), brevitas.scale_of(out)
        x = brevitas.unwrap(x)
        lo, hi, threshold = brevitas.input_grid_bounds(tensor_quant)
        step_module = tensor_quant.scaling_impl
        records = step_module.prepare(x, threshold)
        scale = step_module.scaled_step(x, threshold)
        channels_last = self._quantizes_channels_last(x, self.route_for(x) if route is None else route)
        if not records:
            return fake_quant(x, scale, *grid_bounds(x, lo, hi), channels_last), scale
        # the running |x| mean's sum from the quantizing pass itself, not a pass of its own
        value, abs_sum = fake_quant_abs_sum(x, scale, *grid_bounds(x, lo, hi), channels_last)
        step_module.record_abs_sum(abs_sum, x.numel())
        return value, scale

    def _quantizes_channels_last(self, x: torch.Tensor, route: Route) -> bool:
        """Whether `_quantize_input` writes the quantized input channels_last whatever x's layout
        (a conv's crossbar path reads it so); layers that read it as it comes return False."""
        return False

    def _plain_input_quant(self):
        """The input quantizer's RescalingIntQuant when it is the plain CIM one, else None
        (lib.cim.brevitas_adapter.plain_input_quant)."""
        return brevitas.plain_input_quant(self)

    # ------------------------------------------------------------ bits
    @property
    def _weight_bits_module(self):
        return brevitas.weight_bits_module(self)

    @property
    def _input_bits_module(self):
        return brevitas.input_bits_module(self)

    @property
    def weight_step_module(self):
        return brevitas.weight_step_module(self)

    @property
    def input_step_module(self):
        return brevitas.input_step_module(self)

    @property
    def w_bit(self) -> int:
        return self._weight_bits_module.value

    @property
    def a_bit(self) -> int:
        return self._input_bits_module.value

    @property
    def adc_bits(self) -> int:
        return self.psum_adc.num_bits

    @property
    def slices(self) -> int:
        return self.plan.slices

    @property
    def input_planes(self) -> int:
        """Input planes the forward stacks: DAC cycles in bit-serial mode, else 1."""
        return self.plan.input_planes(self.input_mode)

    def set_bits(self, w_bit: int, a_bit: int, adc_bits: Optional[int] = None) -> None:
        """Change bit widths in place: re-derive slices and grids, re-initialise affected steps.

        Weight steps re-initialise to the least quantization error on the weights, input steps to
        the least error on the next training batch (lib.cim.steps.mse_step), ADC steps from the
        next training batch's partial sums.
        """
        check_bits("w_bit", w_bit)
        check_bits("a_bit", a_bit)
        old_w, old_a = self.w_bit, self.a_bit
        if w_bit != old_w:
            self._weight_bits_module.set(w_bit)
            self.weight_step_module.mark_stale()
            self._set_weight_grid(self.plan)
            column_tile = self.plan.column_tile_of()
            if column_tile != self.psum_adc.column_tile.tolist():
                self.psum_adc.resize(self.psum_adc.arrays, column_tile)
            else:
                self.psum_adc.mark_stale()
        if a_bit != old_a:
            old_qp, new_qp = _grid_max(old_a, self.input_signed), _grid_max(a_bit, self.input_signed)
            self._input_bits_module.set(a_bit)
            self.input_step_module.rescale_for(old_qp, new_qp)
            self.psum_adc.mark_stale()
        if adc_bits is not None:
            check_bits("adc_bits", adc_bits)
            self.psum_adc.set_bits(int(adc_bits))

    def mark_steps_stale(self, weight: bool = False) -> None:
        """Re-initialise, at the current bits, the steps an input-bit change (with `weight`, a
        weight-bit change) re-initialises: the ADC's, and the weights' with `weight`."""
        if weight:
            self.weight_step_module.mark_stale()
        self.psum_adc.mark_stale()

    # ------------------------------------------------------------ state
    def _copy_float_parameters(self, source: nn.Module) -> None:
        """Take the weight and bias of the float layer this one replaces."""
        with torch.no_grad():
            self.weight.copy_(source.weight)
            if source.bias is not None:
                self.bias.copy_(source.bias)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self._load_bits_first(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _load_bits_first(self, state_dict, prefix) -> None:
        """Checkpoints carry the bits: adopt them before the (bits-dependent) ADC shapes load."""
        w_key, a_key = prefix + brevitas.WEIGHT_BITS_KEY, prefix + brevitas.INPUT_BITS_KEY
        adc_key = prefix + "psum_adc.bits"
        if w_key in state_dict and a_key in state_dict:
            adc = int(state_dict[adc_key]) if adc_key in state_dict else None
            self.set_bits(int(state_dict[w_key]), int(state_dict[a_key]), adc)

    # ------------------------------------------------------------ compute
    def _step_grid(self, weight_scale: torch.Tensor) -> torch.Tensor:
        """Weight step per (group, row-tile, out channel), taken from Brevitas' expanded scale so
        the LSQ gradient scaling applied in the step module carries over."""
        lay = self.layout
        scale = weight_scale.reshape(weight_scale.shape[0], -1)
        if scale.shape[1] > 1:
            scale = scale[:, self.first_channel_of_tile]
        scale = scale.expand(lay.groups * lay.out_channels_per_group, lay.tiles)
        return scale.reshape(lay.groups, lay.out_channels_per_group, lay.tiles).permute(0, 2, 1)

    # ------------------------------------------------------------ public views of the learned state
    def weight_step_grid(self) -> torch.Tensor:
        """Weight step per (group, row-tile, output channel of the group), as the forward uses it."""
        return self._step_grid(self.quant_weight().scale)

    def input_step(self) -> torch.Tensor:
        """The input quantizer's step (a 0-d tensor), as the forward uses it."""
        return positive(self.input_step_module.step).reshape(())

    def bias_step(self, input_scale: Optional[torch.Tensor] = None,
                  step_grid: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Step of the int32 bias per output channel: input step × row-tile 0's weight step, the
        accumulator scale at which the digital periphery adds it."""
        input_scale = self.input_step() if input_scale is None else input_scale
        step_grid = self.weight_step_grid() if step_grid is None else step_grid
        return (input_scale.reshape(()) * step_grid[:, 0, :].reshape(-1)).detach()

    def quantized_bias(self, bias_step: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """The bias on its int32 grid (straight-through gradient), or None without a bias."""
        if self.bias is None:
            return None
        step = self.bias_step() if bias_step is None else bias_step
        limit = 2.0 ** 31
        codes = torch.clamp(self.bias / step, -limit, limit - 1)
        return (codes + (torch.round(codes) - codes).detach()) * step

    @property
    def is_calibrated(self) -> bool:
        """True once the input, weight and (if on) ADC steps have been set from data or a checkpoint."""
        return (self.input_step_module.initialized and self.weight_step_module.initialized
                and (not self.psum_adc.enabled or self.psum_adc.initialized))

    def _bias_for(self, scale: Optional[torch.Tensor], weights) -> Optional[torch.Tensor]:
        if self.bias is None:
            return None
        return self.quantized_bias(self.bias_step(scale, weights.step_grid()))

    def inner_forward_impl(self, x, quant_weight, quant_bias):
        """Brevitas' hook (traced or exported forwards): `_forward_quantized` of its quantized input
        and weight; `quant_bias` is unused (the bias goes on its int32 grid, see `quantized_bias`)."""
        scale = brevitas.scale_of(x)
        route = self._route
        return self._forward_quantized(brevitas.unwrap(x), scale, ComposedWeights(self, quant_weight,
                                                                          route.weights == "cached"), route)

    def _forward_quantized(self, x: torch.Tensor, scale: Optional[torch.Tensor], weights, route: Route) -> torch.Tensor:
        """Crossbar path (`tile.forward`: tiled, bit-sliced MVM, ADC on every partial sum) of the
        quantized input x (step `scale`, None: `input_step`), plus the bias on its int32 grid
        (`quantized_bias`), as the digital periphery adds it. `weights`: `ComposedWeights` or
        the fused kernels' `FusedWeights`.

        With the ADC off the crossbar sum equals the plain layer on dequantized tensors exactly
        (an invariant the tests check), so that case takes the cheap path unless force_crossbar."""
        bias = self._bias_for(scale, weights)
        if route.path == "crossbar":
            return self.tile.forward(x, scale, weights, bias, self.input_planes, route)
        return self.dequantized_forward(x, weights.value, bias)


class ComposedWeights:
    """A CIM layer's weight side from Brevitas' quantized weight (evaluation, export, tracing):
    integer weights value / scale (Brevitas' STE gradients), their step grid and cell slices.
    `cached`: served from the layer's eval cache (`_caches_crossbar_form`); Brevitas' weight
    (None: `layer.quant_weight()`) is then only computed when the cache misses."""

    def __init__(self, layer: CIMLayerMixin, quant_weight: Optional[QuantTensor], cached: bool = False) -> None:
        self.layer = layer
        self._quant_weight = quant_weight
        self.cached = cached

    @property
    def quant_weight(self) -> QuantTensor:
        if self._quant_weight is None:
            self._quant_weight = self.layer.quant_weight()
        return self._quant_weight

    @property
    def value(self) -> torch.Tensor:
        return self.quant_weight.value

    def step_grid(self) -> torch.Tensor:
        layer = self.layer
        if not self.cached:
            return layer._step_grid(self.quant_weight.scale)
        return layer.eval_cache.get(layer._eval_cache_key, "step_grid",
                                    lambda: layer._step_grid(self.quant_weight.scale))

    def crossbar(self, tiles):
        """(integer weights q, weight step per (group, tile, out), array weight); kept in the
        eval cache (the array weight laid out for many reads) when `cached`."""
        if not self.cached:
            return self._crossbar(tiles)

        def compute():
            q, step_grid, stored = self._crossbar(tiles)
            return q, step_grid, tiles.packed(stored)
        return self.layer.eval_cache.get(self.layer._eval_cache_key, f"crossbar-{tiles.packed_form}", compute)

    def _crossbar(self, tiles):
        q = self.quant_weight.value / self.quant_weight.scale
        step_grid = self.step_grid()
        if not brevitas.tracing():  # a traced graph holds no values to check
            require_finite({"integer weights": q, "weight step": step_grid}, self.layer.layer_name)
        noise = self.layer._device_noise()
        if noise is None:
            return q, step_grid, crossbar_weight(q, tiles, self.layer.plan)
        # device non-idealities per cell slice: the cells' effective values (lib.cim.noise)
        cells = noise.cells(stored_slices(q.detach(), self.layer.plan), self.layer.plan, self.layer.training)
        return q, step_grid, tiles.weight(cells)


def route_counts(model: nn.Module) -> dict:
    """The routes each CIM layer of `model` took and how many forwards took each, for a report:
    {layer name: [{"route": Route.describe(), "forwards": n}, ...]} (most taken first)."""
    counts = {}
    for name, module in model.named_modules():
        if isinstance(module, CIMLayerMixin) and module.route_counts:
            counts[name or module.layer_name] = [{"route": route.describe(), "forwards": n}
                                                 for route, n in module.route_counts.most_common()]
    return counts


def _set_training(modules, mode: bool) -> None:
    """nn.Module.train(mode) on each module and its submodules, in the same order; a module whose
    class overrides train() is called as such."""
    for module in modules:
        if module is None:
            continue
        if type(module).train is not nn.Module.train:
            module.train(mode)
            continue
        module.__dict__["training"] = mode  # what nn.Module.__setattr__ does for a plain attribute
        _set_training(module._modules.values(), mode)


def _grid_max(bits: int, signed: bool) -> int:
    return 2 ** (bits - 1) - 1 if signed else 2 ** bits - 1


class CIMConv2d(CIMLayerMixin, QuantConv2d):
    """A Conv2d mapped onto crossbars: each group's (C_in/g·k_h·k_w) × C_out/g matrix is cut into
    row-tiles of whole input channels; see the module docstring for the forward."""

    _route_kind = "conv"
    _tile_kind = ConvTile

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros", *,
                 hw: HardwareConfig, w_bit: int = 8, a_bit: int = 8, adc_bits: Optional[int] = None,
                 input_signed: bool = True, name: str = "conv", device=None, dtype=None) -> None:
        kh, kw = _pair(kernel_size)
        layout = TileLayout.for_layer(hw, groups, in_channels // groups, out_channels // groups, kh * kw, name)
        quant = self._quant_kwargs(hw, layout, w_bit, a_bit, input_signed, 4)
        QuantConv2d.__init__(
            self, in_channels, out_channels, kernel_size, stride=stride, padding=padding,
            dilation=dilation, groups=groups, padding_mode=padding_mode, bias=bias, device=device,
            dtype=dtype, **quant)
        self._setup_crossbar(hw, layout, adc_bits, input_signed, quant["weight_grid_switch"], name)

    @classmethod
    def from_float(cls, conv: nn.Conv2d, hw: HardwareConfig, w_bit: int, a_bit: int,
                   adc_bits: Optional[int] = None, input_signed: bool = True, name: str = "conv") -> "CIMConv2d":
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode, hw=hw,
                    w_bit=w_bit, a_bit=a_bit, adc_bits=adc_bits, input_signed=input_signed, name=name,
                    device=conv.weight.device, dtype=conv.weight.dtype)
        layer._copy_float_parameters(conv)
        return layer

    def dequantized_forward(self, x, weight, bias):
        return self._conv_forward(x, weight, bias)

    def _quantizes_channels_last(self, x: torch.Tensor, route: Route) -> bool:
        """The crossbar path reads its input NHWC (tiled or kept whole for the merged backward's
        channels-last conv): an NCHW input is quantized straight into that layout, in the
        quantizer's own pass, and its gradient comes back NCHW from the quantizer's backward (no
        layout copies on either side)."""
        return x.dim() == 4 and self.padding_mode == "zeros" and route.path == "crossbar"

    def _codes_grid(self, x: torch.Tensor, tensor_quant, route: Route) -> Optional[tuple]:
        """(input step, `InputGrid`, grid bounds lo and hi) of `_input_codes`, or None without
        integer products; kept while the step, the bits and the route stay as they are (their
        small tensors and the step's host read cost more than a layer's codes)."""
        step = tensor_quant.scaling_impl.step
        key = (id(step), step._version, step.data_ptr(), self.plan, route, x.dtype, x.device)
        kept = self.__dict__.get("_kept_codes_grid")
        if kept is not None and kept[0] == key:
            return kept[1]
        lo, hi, threshold = brevitas.input_grid_bounds(tensor_quant)
        scale = tensor_quant.scaling_impl.scaled_step(x, threshold)
        grid = self.tile.input_grid(x, scale, 1, route)
        value = None if grid is None else (scale, grid) + grid_bounds(x, lo, hi)
        self.__dict__["_kept_codes_grid"] = (key, value)
        return value

class CIMLinear(CIMLayerMixin, QuantLinear):
    """A Linear mapped onto crossbars: in_features cut into row-tiles of at most `rows` features.
    Inputs may have leading dims (tokens); they are flattened for the MVM."""

    _route_kind = "linear"
    _tile_kind = LinearTile

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, hw: HardwareConfig,
                 w_bit: int = 8, a_bit: int = 8, adc_bits: Optional[int] = None, input_signed: bool = True,
                 name: str = "linear", device=None, dtype=None) -> None:
        layout = TileLayout.for_layer(hw, 1, in_features, out_features, 1, name)
        quant = self._quant_kwargs(hw, layout, w_bit, a_bit, input_signed, 2)
        QuantLinear.__init__(self, in_features, out_features, bias=bias, device=device, dtype=dtype, **quant)
        self._setup_crossbar(hw, layout, adc_bits, input_signed, quant["weight_grid_switch"], name)

    @classmethod
    def from_float(cls, linear: nn.Linear, hw: HardwareConfig, w_bit: int, a_bit: int,
                   adc_bits: Optional[int] = None, input_signed: bool = True, name: str = "linear") -> "CIMLinear":
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, hw=hw, w_bit=w_bit,
                    a_bit=a_bit, adc_bits=adc_bits, input_signed=input_signed, name=name,
                    device=linear.weight.device, dtype=linear.weight.dtype)
        layer._copy_float_parameters(linear)
        return layer

    def dequantized_forward(self, x, weight, bias):
        return F.linear(x, weight, bias)
