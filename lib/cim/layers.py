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

import logging
import math
from typing import Optional

import torch
import torch.nn.functional as F
from brevitas.core.function_wrapper import Identity as BrevitasIdentity
from brevitas.core.quant import RescalingIntQuant
from brevitas.core.scaling import IntScaling
from brevitas.nn import QuantConv2d, QuantLinear
from brevitas.quant_tensor import QuantTensor
from torch import nn
from torch.nn.modules.utils import _pair

from lib.bit_limits import check_bits
from lib.cim.adc import PartialSumADC
from lib.cim.adc_kernels import grid_bounds, powers_of_two
from lib.cim.crossbar_adc import crossbar_adc_forward
from lib.cim.crossbar import CrossbarPlan, TileLayout, stored_slices
from lib.cim.hardware import INPUT_MODES, HardwareConfig
from lib.cim.input_planes import join_planes, split_planes
from lib.cim.quantizers import (CIMSignedActQuant, CIMUnsignedActQuant, CIMWeightQuant, GridSwitch, hooked,
                                int_range, int_threshold)
from lib.cim.fused_quant import FusedIntQuant, fake_quant, fake_quant_abs_sum
from lib.cim.steps import ActStep, MutableBitWidth, positive
from lib.cim.eval_cache import EvalCache, module_tensors, tensor_versions
from lib.cim.fused_weight import FusedWeights
from lib.cim.integer_products import INTEGER_PRODUCTS, InputGrid, quantized_codes, sums_stay_exact
from lib.cim.tile_products import ConvTiles, MatmulTiles, crossbar_weight, tile_products
from lib.finite import NonFiniteError, require_finite

log = logging.getLogger(__name__)

_IDENTITIES = (nn.Identity, BrevitasIdentity)  # the no-op activation / input view of a plain quantizer


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
        return dict(
            weight_quant=CIMWeightQuant,
            weight_grid_switch=GridSwitch(narrow),
            weight_granularity=hw.weight_granularity,
            weight_tile_layout=layout,
            weight_weight_ndim=weight_ndim,
            weight_bit_width=int(w_bit),
            input_quant=CIMSignedActQuant if input_signed else CIMUnsignedActQuant,
            input_bit_width=int(a_bit),
            bias_quant=None,
            output_quant=None,
            return_quant_tensor=False,
        )

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
        self._grid_switch.narrow = plan.narrow_weights
        self.weight_quant.tensor_quant.int_quant.narrow_range = plan.narrow_weights

    def set_input_mode(self, mode: str) -> None:
        """Simulate bit-serial or multi-bit inputs from now on. The ADC steps re-initialise from the
        next partial sums when the mode changes: per-plane sums have another scale."""
        if mode not in INPUT_MODES:
            raise ValueError(f"input_mode={mode!r} is not allowed: expected one of {list(INPUT_MODES)}")
        if mode != self.input_mode and self.plan.input_planes(mode) != self.plan.input_planes(self.input_mode):
            self.psum_adc.mark_stale()
        self.input_mode = mode

    # ------------------------------------------------------------ device noise (lib.cim.noise)
    def _device_noise(self):
        """The layer's device non-idealities (lib.cim.noise.LayerNoise, set by lib.cim.noise.attach)
        when they change its cells, else None. A noisy layer takes the plain composed path: no eval
        cache, no fused weight kernels, no integer products, the crossbar even with the ADC off;
        traced and exported graphs stay noise-free."""
        noise = self.__dict__.get("device_noise")
        if noise is None or not noise.active or _tracing() or getattr(self.weight_quant, "export_mode", False):
            return None
        return noise

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
        return [self.weight, *module_tensors(self._modules["weight_quant"]), *module_tensors(self.psum_adc)]

    def _caches_crossbar_form(self) -> bool:
        """In eval mode, unless autograd must reach the weight or ADC side (then every forward
        recomputes) or a graph is being traced or exported (it must contain the quantizers, not constants)."""
        if (self.training or not self.cache_eval or _tracing() or getattr(self.weight_quant, "export_mode", False)
                or self._device_noise() is not None):
            return False
        return not (torch.is_grad_enabled() and any(t.requires_grad for t in self._cached_side_tensors()))

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
        if self.export_mode or _tracing() or not self.weight_quant.is_quant_enabled:
            return super().forward_impl(inp)
        x = self.unpack_input(inp)
        coded = self._input_codes(x)
        if coded is None:
            value, scale = self._quantize_input(x)
        cached = self._caches_crossbar_form()
        fused = self.fused_weights and not cached and self._device_noise() is None
        weights = FusedWeights(self) if fused else ComposedWeights(self, None, cached)
        if coded is not None:
            return self.pack_output(self.codes_forward(*coded, weights))
        return self.pack_output(self._forward_quantized(value, scale, weights))

    def _input_codes(self, x) -> Optional[tuple]:
        """(uint8 codes, their `InputGrid`, the input step) for `codes_forward`, or None: the input
        is quantized as floats (`_quantize_input`). Layers without a codes path return None."""
        return None

    def _quantize_input(self, x):
        """(quantized input, its step or None) as the input quantizer computes them: called
        directly when it is the plain CIM one (`_plain_input_quant`: step module, then one fused
        fake-quant kernel that in training also sums |x| for the step's running mean; the same
        values and gradients, that mean up to summation order), else through Brevitas' proxy."""
        tensor_quant = self._plain_input_quant()
        if tensor_quant is None:
            out = self.input_quant(x)
            return (out.value, out.scale) if isinstance(out, QuantTensor) else (out, None)
        x = _unwrap(x)
        lo, hi, threshold = _input_grid(tensor_quant)
        step_module = tensor_quant.scaling_impl
        records = step_module.prepare(x, threshold)
        scale = step_module.scaled_step(x, threshold)
        channels_last = self._quantizes_channels_last(x)
        if not records:
            return fake_quant(x, scale, *grid_bounds(x, lo, hi), channels_last), scale
        # the running |x| mean's sum from the quantizing pass itself, not a pass of its own
        value, abs_sum = fake_quant_abs_sum(x, scale, *grid_bounds(x, lo, hi), channels_last)
        step_module.record_abs_sum(abs_sum, x.numel())
        return value, scale

    @property
    def _takes_crossbar_path(self) -> bool:
        """Whether `_forward_quantized` takes `crossbar_forward` (the ADC on, or forced) rather
        than the plain layer on dequantized tensors."""
        return self.psum_adc.enabled or self.force_crossbar or self._device_noise() is not None

    def _quantizes_channels_last(self, x: torch.Tensor) -> bool:
        """Whether `_quantize_input` writes the quantized input channels_last whatever x's layout
        (a conv's crossbar path reads it so); layers that read it as it comes return False."""
        return False

    def _plain_input_quant(self):
        """The input quantizer's RescalingIntQuant when it is the CIM one (lib.cim.quantizers:
        ActStep itself, whose steps `_quantize_input` calls, MutableBitWidth, FusedIntQuant, no
        activation, no caching, not exporting, no forward hooks that its calls would run), else None."""
        proxy = self.input_quant
        if not proxy.is_quant_enabled or proxy.export_mode or proxy.cache_inference_quant_act:
            return None
        fused = proxy.fused_activation_quant_proxy
        if fused is None or type(fused.activation_impl) not in _IDENTITIES:
            return None
        tensor_quant = fused.tensor_quant
        if hooked(proxy, fused, tensor_quant, tensor_quant.scaling_impl):
            return None
        if (type(tensor_quant) is not RescalingIntQuant or tensor_quant.observer_only
                or type(tensor_quant.int_quant) is not FusedIntQuant
                or type(tensor_quant.int_quant.input_view_impl) not in _IDENTITIES
                or type(tensor_quant.int_scaling_impl) is not IntScaling
                or type(tensor_quant.msb_clamp_bit_width_impl) is not MutableBitWidth
                or type(tensor_quant.scaling_impl) is not ActStep):
            return None
        return tensor_quant

    # ------------------------------------------------------------ bits
    # submodules read from the _modules dicts (what nn.Module.__getattr__ returns, without its
    # lookups): `plan` reads both bit widths several times per forward
    @property
    def _weight_bits_module(self):
        return self._modules["weight_quant"]._modules["tensor_quant"]._modules["msb_clamp_bit_width_impl"]

    @property
    def _input_bits_module(self):
        proxy = self._modules["input_quant"]._modules["fused_activation_quant_proxy"]
        return proxy._modules["tensor_quant"]._modules["msb_clamp_bit_width_impl"]

    @property
    def weight_step_module(self):
        return self._modules["weight_quant"]._modules["tensor_quant"]._modules["scaling_impl"]

    @property
    def input_step_module(self):
        return self.input_quant.fused_activation_quant_proxy.tensor_quant.scaling_impl

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
        w_key = prefix + "weight_quant.tensor_quant.msb_clamp_bit_width_impl.bits"
        a_key = prefix + "input_quant.fused_activation_quant_proxy.tensor_quant.msb_clamp_bit_width_impl.bits"
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

    def _shifts(self, like: torch.Tensor) -> tuple[torch.Tensor, float]:
        """2^(s·c) per weight slice (`CrossbarPlan.significance`), and the offset reference column's significance."""
        plan = self.plan
        ref_slice, _ = plan.offset_reference()
        shifts = plan.significance(like.device, like.dtype) if plan.equal_slices else powers_of_two(
            plan.cell_bits, plan.slices, like)
        return shifts, 2.0 ** (ref_slice * plan.cell_bits)

    def _convert(self, psums: torch.Tensor, step_grid: torch.Tensor, ref: Optional[torch.Tensor],
                 floor: Optional[torch.Tensor]) -> torch.Tensor:
        """ADC + digital shift-and-add of partial sums (M, groups, tiles, slices·out) and the offset
        reference column's (M, groups, tiles) → (M, groups, out)."""
        shifts, ref_shift = self._shifts(psums)
        return self.psum_adc(psums, shifts, step_grid, ref, ref_shift if ref is not None else None, floor)

    def _split_input(self, x: torch.Tensor, scale: Optional[torch.Tensor], planes: int) -> torch.Tensor:
        """The quantized input's values (step `scale`, None: `input_step`), split into `planes` DAC
        planes stacked along dim 0 (bit-serial mode)."""
        if planes == 1:
            return x
        step = self.input_step() if scale is None else scale
        return split_planes(x, step.reshape(()), planes, self.hw.input_bits)

    def _join_planes(self, y: torch.Tensor, planes: int) -> torch.Tensor:
        """Shift-and-add of the planes' outputs, 2^(p·input_bits) each (`CrossbarPlan.plane_significance`)."""
        if planes == 1:
            return y
        return join_planes(y, powers_of_two(self.hw.input_bits, planes, y))

    def input_grid(self, x: torch.Tensor, scale: Optional[torch.Tensor], planes: int) -> Optional[InputGrid]:
        """The crossbar input's 8-bit integer grid when partial sums can be integer products
        (lib.cim.integer_products): a quantized input (`scale` its step) whose array codes in
        `planes` fit in 8 bits, cell values in int8, arrays small enough for exact sums, a CPU
        with int8 kernels, nothing traced; else None (float32 products)."""
        if scale is None or not INTEGER_PRODUCTS.available_for(x) or _tracing() or self._device_noise() is not None:
            return None
        plan = self.plan
        zero_point = plan.input_zero_point(planes)
        rows = self.layout.channels_per_tile * self.layout.kernel_elems
        if (zero_point is None or plan.slicing.storage_dtype != torch.int8
                or not sums_stay_exact(rows, 2 ** plan.cell_bits - 1)):
            return None
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

    def _converted_outputs(self, x_tiled: torch.Tensor, weights, tiles, ref: Optional[torch.Tensor],
                           floor: Optional[torch.Tensor], source: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Every partial sum of the tiled input through the ADC, shift-and-added: (M, groups, out).
        One autograd node (lib.cim.crossbar_adc) when the ADC allows, else products then ADC;
        `floor`: `adc_floor` of the real input (None once the ADC is initialised); `source`: the
        input x_tiled was tiled from, which that node may take its gradient to."""
        if self.psum_adc.fusable and self.fused_adc:
            q, step_grid, stored, shifts, ref_shift, constants = self._fused_form(weights, tiles, ref is not None)
            return crossbar_adc_forward(self, x_tiled, q, stored, tiles, step_grid, shifts, ref, ref_shift,
                                        constants, source)
        lay = self.layout
        psums, step_grid = self._tile_products(x_tiled, weights, tiles)
        psums = psums.reshape(-1, lay.groups, lay.tiles, self.plan.slices * lay.out_channels_per_group)
        return self._convert(psums, step_grid, ref, floor)

    def _fused_form(self, weights, tiles, has_ref: bool) -> tuple:
        """What the fused crossbar + ADC node reads besides the input: (q, step grid, array weight,
        2^(s·c) per slice, the reference column's significance, `PartialSumADC.constants`); kept
        as one eval-cache value per packed form of the array weight when the weights are (one key
        per forward)."""
        def compute():
            q, step_grid, stored = weights.crossbar(tiles)
            shifts, ref_shift = self._shifts(q)
            constants = self.psum_adc.constants(step_grid, shifts, has_ref)
            if weights.cached and tiles.levels_in_epilogue(*self.psum_adc.grid_range()):
                stored = tiles.with_levels_weight(stored, constants[1])  # converts in the conv's epilogue
            return q, step_grid, stored, shifts, ref_shift, constants
        if not weights.cached:
            return compute()
        return self.eval_cache.get(self._eval_cache_key, f"fused_form-{tiles.packed_form}", compute)

    def _tile_products(self, x_tiled: torch.Tensor, weights, tiles):
        """Every row-tile × slice × column partial sum, and the weight step per (group, tile, out)."""
        q, step_grid, stored = weights.crossbar(tiles)
        return tile_products(x_tiled, q, tiles, self.plan, stored), step_grid

    def inner_forward_impl(self, x, quant_weight, quant_bias):
        """Brevitas' hook (traced or exported forwards): `_forward_quantized` of its quantized input
        and weight; `quant_bias` is unused (the bias goes on its int32 grid, see `quantized_bias`)."""
        scale = x.scale if isinstance(x, QuantTensor) else None
        return self._forward_quantized(_unwrap(x), scale, ComposedWeights(self, quant_weight,
                                                                          self._caches_crossbar_form()))

    def _forward_quantized(self, x: torch.Tensor, scale: Optional[torch.Tensor], weights) -> torch.Tensor:
        """Crossbar path (`crossbar_forward`: tiled, bit-sliced MVM, ADC on every partial sum) of the
        quantized input x (step `scale`, None: `input_step`), plus the bias on its int32 grid
        (`quantized_bias`), as the digital periphery adds it. `weights`: `ComposedWeights` or
        the fused kernels' `FusedWeights`.

        With the ADC off the crossbar sum equals the plain layer on dequantized tensors exactly
        (an invariant the tests check), so that case takes the cheap path unless force_crossbar."""
        bias = self._bias_for(scale, weights)
        if self._takes_crossbar_path:
            return self.crossbar_forward(x, scale, weights, bias)
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
        if not _tracing():  # a traced graph holds no values to check
            require_finite({"integer weights": q, "weight step": step_grid}, self.layer.layer_name)
        noise = self.layer._device_noise()
        if noise is None:
            return q, step_grid, crossbar_weight(q, tiles, self.layer.plan)
        # device non-idealities per cell slice: the cells' effective values (lib.cim.noise)
        cells = noise.cells(stored_slices(q.detach(), self.layer.plan), self.layer.plan, self.layer.training)
        return q, step_grid, tiles.weight(cells)


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


def _input_grid(tensor_quant) -> tuple[int, int, torch.Tensor]:
    """(lo, hi) of the input grid at the quantizer's bit width, as FusedIntQuant computes them,
    and the threshold its scaling module receives (Brevitas' IntScaling: -lo signed, hi
    unsigned) as a cached 0-d tensor of the bit width's dtype and device."""
    int_quant = tensor_quant.int_quant
    lo, hi = int_range(tensor_quant.msb_clamp_bit_width_impl.value, int_quant.signed, int_quant.narrow_range)
    return lo, hi, int_threshold(tensor_quant)


def _grid_max(bits: int, signed: bool) -> int:
    return 2 ** (bits - 1) - 1 if signed else 2 ** bits - 1


def _plus_bias(y: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Converted outputs (M, groups, out) plus the bias (groups·out): in place when y is a fresh
    tensor (no backward keeps the converted outputs), never on a view, whose in-place change
    would make the backward copy the whole gradient."""
    if bias is None:
        return y
    bias = bias.view(y.shape[1:])
    return y.add_(bias) if y._base is None else y + bias


def _tracing() -> bool:
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling()


def _unwrap(x):
    return x.value if isinstance(x, QuantTensor) else x


class CIMConv2d(CIMLayerMixin, QuantConv2d):
    """A Conv2d mapped onto crossbars: each group's (C_in/g·k_h·k_w) × C_out/g matrix is cut into
    row-tiles of whole input channels; see the module docstring for the forward."""

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

    def tiles(self, input_grid: Optional[InputGrid] = None) -> ConvTiles:
        """The grouped-conv view of this layer's arrays (padding already applied for non-zero
        padding modes, see `pad_input`), with integer products for inputs on `input_grid`."""
        padding = self.padding if self.padding_mode == "zeros" else (0, 0)
        return ConvTiles(self.layout, tuple(self.kernel_size), tuple(self.stride), tuple(padding),
                         tuple(self.dilation), input_grid)


    def pad_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding_mode == "zeros":
            return x
        return F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)

    def reference_sums(self, x_tiled: torch.Tensor, tiles: ConvTiles) -> Optional[torch.Tensor]:
        """The offset mapping's reference column per array (N, H_out, W_out, groups·tiles): the
        same cell value on every row, so a small grouped conv of the tiled input; else None."""
        if not self.uses_reference_column:
            return None
        _, cell_value = self.plan.offset_reference()
        ones = x_tiled.new_full((tiles.arrays, self.layout.channels_per_tile) + tuple(self.kernel_size), cell_value)
        return F.conv2d(x_tiled, ones, None, tiles.stride, tiles.padding, tiles.dilation, tiles.arrays).permute(0, 2, 3, 1)

    def partial_sums(self, x: torch.Tensor, slices: torch.Tensor):
        """Every row-tile × weight column partial sum of the crossbar input x (one plane, or the
        stacked planes) for given cell slices, channels last (N, H_out, W_out, groups·tiles·slices·out),
        and the offset reference column's (N, H_out, W_out, groups·tiles) or None. For inspection;
        the forward uses `tile_products`."""
        tiles = self.tiles()
        x_tiled = tiles.tile_input(self.pad_input(x))
        return tiles.products(x_tiled, tiles.weight(slices)), self.reference_sums(x_tiled, tiles)

    def dequantized_forward(self, x, weight, bias):
        return self._conv_forward(x, weight, bias)

    def crossbar_forward(self, x, scale, weights, bias):
        lay = self.layout
        planes = self.input_planes
        tiles = self.tiles(self.input_grid(x, scale, planes))
        if tiles.input_grid is not None:
            self.check_codes_input(x)
        inputs = self._split_input(x, scale, planes)
        source = self.pad_input(inputs)
        x_tiled = tiles.tile_codes(source) if self._tiles_codes(tiles) else tiles.tile_input(source)
        n, h, w = tiles.output_size(x_tiled)
        ref = self.reference_sums(x_tiled, tiles)
        if ref is not None:
            ref = ref.reshape(n * h * w, lay.groups, lay.tiles)
        y = self._converted_outputs(x_tiled, weights, tiles, ref, self.adc_floor(inputs), source)
        return self._output_map(self._join_planes(y, planes), h, w, bias)

    def _quantizes_channels_last(self, x: torch.Tensor) -> bool:
        """The crossbar path reads its input NHWC (tiled or kept whole for the merged backward's
        channels-last conv): an NCHW input is quantized straight into that layout, in the
        quantizer's own pass, and its gradient comes back NCHW from the quantizer's backward (no
        layout copies on either side)."""
        return x.dim() == 4 and self.padding_mode == "zeros" and self._takes_crossbar_path

    def _tiles_codes(self, tiles: ConvTiles) -> bool:
        """Whether the crossbar forward tiles the input's integer codes rather than the input: its
        fused crossbar + ADC node keeps the untiled input for the backward (`ConvTiles.keeps_source`)
        and reads only the codes (integer products, no offset reference column)."""
        return (tiles.input_grid is not None and tiles.keeps_source and not self.uses_reference_column
                and self.psum_adc.fusable and self.fused_adc)

    def _input_codes(self, x) -> Optional[tuple]:
        """x's uint8 codes on the crossbar input grid straight from the unquantized input, one
        kernel (`quantized_codes`), with the grid and the input step, when that is all an
        evaluation forward reads: the plain input quantizer, its step set, no autograd, one input
        plane, zero padding, no offset reference column, the fused crossbar + ADC on integer
        products; else None. The fake-quantized float input is then never written."""
        if (self.training or torch.is_grad_enabled() or self.padding_mode != "zeros" or self.uses_reference_column
                or not (self.fused_adc and self.psum_adc.fusable) or self._device_noise() is not None):
            return None
        tensor_quant = self._plain_input_quant()
        if tensor_quant is None or self.input_planes != 1:
            return None
        step_module = tensor_quant.scaling_impl
        if step_module.training or not step_module.initialized:
            return None
        x = _unwrap(x)
        grid_form = self._codes_grid(x, tensor_quant)
        if grid_form is None:
            return None
        scale, grid, lo, hi = grid_form
        self.check_codes_input(x)
        return quantized_codes(x, scale, lo, hi, grid), grid, scale

    def _codes_grid(self, x: torch.Tensor, tensor_quant) -> Optional[tuple]:
        """(input step, `InputGrid`, grid bounds lo and hi) of `_input_codes`, or None without
        integer products; kept while the step, the bits and the integer-products switch stay as
        they are (their small tensors and the step's host read cost more than a layer's codes)."""
        step = tensor_quant.scaling_impl.step
        key = (id(step), step._version, step.data_ptr(), self.plan, INTEGER_PRODUCTS.enabled, x.dtype, x.device)
        kept = self.__dict__.get("_kept_codes_grid")
        if kept is not None and kept[0] == key:
            return kept[1]
        lo, hi, threshold = _input_grid(tensor_quant)
        scale = tensor_quant.scaling_impl.scaled_step(x, threshold)
        grid = self.input_grid(x, scale, 1)
        value = None if grid is None else (scale, grid) + grid_bounds(x, lo, hi)
        self.__dict__["_kept_codes_grid"] = (key, value)
        return value

    def codes_forward(self, codes: torch.Tensor, grid: InputGrid, scale: torch.Tensor, weights) -> torch.Tensor:
        """`crossbar_forward` (plus the bias) of an input given as its uint8 codes on `grid` (step
        `scale`), as `_input_codes` makes them: the same integer products, so the same outputs."""
        tiles = self.tiles(grid)
        x_tiled = tiles.tile_input(codes)
        _, h, w = tiles.output_size(x_tiled)
        y = self._converted_outputs(x_tiled, weights, tiles, None, None)  # the codes path runs initialised ADCs only
        return self._output_map(y, h, w, self._bias_for(scale, weights))

    def _output_map(self, y: torch.Tensor, h: int, w: int, bias: Optional[torch.Tensor]) -> torch.Tensor:
        """Converted outputs (N·H·W, groups, out) → (N, C_out, H, W), plus the bias."""
        y = _plus_bias(y, bias).reshape(-1, h, w, self.out_channels)
        # channels_last (NHWC memory), as computed: the BatchNorm/ReLU/residual ops that follow keep
        # that format, so the network runs NHWC from the first CIM conv on without layout copies
        return y.permute(0, 3, 1, 2)


class CIMLinear(CIMLayerMixin, QuantLinear):
    """A Linear mapped onto crossbars: in_features cut into row-tiles of at most `rows` features.
    Inputs may have leading dims (tokens); they are flattened for the MVM."""

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

    def tiles(self, input_grid: Optional[InputGrid] = None) -> MatmulTiles:
        """The batched-matmul view of this layer's arrays, with integer products for inputs on `input_grid`."""
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

    def dequantized_forward(self, x, weight, bias):
        return F.linear(x, weight, bias)

    def crossbar_forward(self, x, scale, weights, bias):
        lead = x.shape[:-1]
        planes = self.input_planes
        tiles = self.tiles(self.input_grid(x, scale, planes))
        if tiles.input_grid is not None:
            self.check_codes_input(x)
        inputs = self._split_input(x.reshape(-1, self.in_features), scale, planes)
        xt = tiles.tile_input(inputs)
        ref = self.reference_sums(xt)
        if ref is not None:
            ref = ref.t().unsqueeze(1)
        y = self._converted_outputs(xt, weights, tiles, ref, self.adc_floor(inputs))
        y = _plus_bias(self._join_planes(y, planes), bias).squeeze(1)
        return y.reshape(lead + (self.out_features,))
