"""The ADC at the bottom of each crossbar column: LSQ quantization of partial sums.

Partial sums are indexed (array, column) = (groups·row-tiles, slices·out_channels [+ offset
reference column]). The learned step is shared per layer, per array, or per physical column.
Optional clipping to running mean ± n_sigma·std uses statistics gathered in training only, so
in eval mode a sample's output never depends on its batch mates.
"""
from __future__ import annotations

import logging
import math
from typing import Optional, Protocol

import torch
from torch import nn

from lib.cim.adc_kernels import adc_backward, adc_forward
from lib.cim.steps import lsq_init, positive, scale_grad

log = logging.getLogger(__name__)


class Converter(Protocol):
    """How the ADC's caller converts its weight columns: given the per-column ADC step, gamma
    (weight step · 2^(s·c)) and the grid, return the converted, shifted and summed outputs
    (rows, groups, out). `_ConvertAccumulate` over given partial sums, or lib.cim.crossbar_adc
    computing the partial sums itself."""

    def __call__(self, step: torch.Tensor, gamma: torch.Tensor, lo: int, hi: int,
                 grad_factor: float) -> torch.Tensor: ...


def adc_range(bits: int, signed: bool) -> tuple[int, int]:
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2 ** bits - 1


class _ConvertAccumulate(torch.autograd.Function):
    """y[m,g,o] = Σ_{t,s} clamp(round(p/step), lo, hi) · step · gamma over partial sums p[m,g,t,s,o].

    The ADC conversion, the digital shift-and-add (gamma = weight step · 2^(s·c)) and the sum over
    row-tiles and slices in one function, so that the backward pass receives the small (m,g,o)
    gradient and reads the large partial-sum tensor once or a few times (adc_kernels).
    Gradients are LSQ's: p passes where round(p/step) is on the grid; step gets (level - v) inside
    and the clipped level outside, scaled by `grad_factor`.
    """

    @staticmethod
    def forward(ctx, p, step, gamma, lo: int, hi: int, grad_factor: float):
        ctx.save_for_backward(p, step, gamma)
        ctx.bounds = (lo, hi, grad_factor)
        return adc_forward(p, step, step * gamma, lo, hi)

    @staticmethod
    def backward(ctx, grad_y):
        p, step, gamma = ctx.saved_tensors
        lo, hi, grad_factor = ctx.bounds
        grad_p, sum_levels, sum_v = adc_backward(grad_y.contiguous(), p, step, gamma, lo, hi)
        grad_step, grad_gamma = step_and_gamma_grads(step, gamma, sum_levels, sum_v, grad_factor)
        return grad_p if ctx.needs_input_grad[0] else None, grad_step, grad_gamma, None, None, None


def step_and_gamma_grads(step, gamma, sum_levels, sum_v, grad_factor: float):
    """LSQ gradients of the ADC step (scaled by grad_factor) and of gamma (weight step · 2^(s·c)),
    from the fused backward's two column sums Σ_m grad·level and Σ_m grad·v·on_grid."""
    grad_step = (gamma * (sum_levels - sum_v) * grad_factor).sum_to_size(step.shape)
    grad_gamma = (step * sum_levels).sum_to_size(gamma.shape)
    return grad_step, grad_gamma


def _quantize(p, step, lo: int, hi: int, grad_factor: float):
    """Plain LSQ quantization (used for the small offset-reference partial sums)."""
    step = scale_grad(step, grad_factor)
    v = p / step
    levels = v + (torch.round(v) - v).detach()
    return torch.clamp(levels, lo, hi) * step


class PartialSumADC(nn.Module):
    """LSQ ADC for the partial sums of one CIM layer.

    `arrays` = groups·row-tiles, `columns` = read-out columns per row-tile (slices·out_channels,
    then the offset reference column if any), `column_tile` = the physical array (column tile)
    of each read-out column, so that an 'array' step is one per physical array. Partial sums
    come as (M, groups, tiles, columns) with M = output pixels × batch (× input planes) or tokens.
    """

    def __init__(self, granularity: str, groups: int, tiles: int, column_tile: list, bits: int, signed: bool,
                 n_sigma: Optional[float] = None, momentum: float = 0.1) -> None:
        super().__init__()
        self.granularity = granularity
        self.signed = signed
        self.groups, self.tiles = groups, tiles
        self.n_sigma = n_sigma
        self.momentum = momentum
        self.register_buffer("bits", torch.tensor(float(bits)))
        self._bits = int(bits)  # Python mirror of the buffer: no GPU sync to read it
        self._initialized = False
        self.last_conversions = 0  # partial sums converted by the last forward (counted from shapes)
        self.resize(groups * tiles, column_tile)

    # ------------------------------------------------------------ shape
    def resize(self, arrays: int, column_tile: list) -> None:
        """(Re)allocate steps and statistics for new read-out columns (the weight's slices changed)."""
        device = self.bits.device
        columns = len(column_tile)
        self.arrays, self.columns = arrays, columns
        self.column_tiles = int(max(column_tile)) + 1
        self.register_buffer("column_tile", torch.tensor(column_tile, dtype=torch.long, device=device),
                             persistent=False)
        shape = {"off": (1, 1), "layer": (1, 1), "array": (arrays, self.column_tiles),
                 "column": (arrays, columns)}[self.granularity]
        self.step = nn.Parameter(torch.ones(shape, device=device))
        self.register_buffer("running_mean", torch.zeros(arrays, columns, device=device))
        self.register_buffer("running_var", torch.ones(arrays, columns, device=device))
        self.register_buffer("stats_seen", torch.zeros((), device=device))
        self._has_stats = False
        self._initialized = False

    @property
    def enabled(self) -> bool:
        return self.granularity != "off"

    @property
    def num_bits(self) -> int:
        return self._bits

    def set_bits(self, bits: int) -> None:
        old = self.num_bits
        self.bits.fill_(float(bits))
        self._bits = int(bits)
        if bits != old:
            self._initialized = False

    @property
    def initialized(self) -> bool:
        """Whether the step has been set from partial sums or a checkpoint."""
        return self._initialized

    def mark_stale(self) -> None:
        """Re-initialise the step from the next partial sums (their scale changed)."""
        self._initialized = False

    def grid_range(self) -> tuple[int, int]:
        return adc_range(self.num_bits, self.signed)

    def full_step(self) -> torch.Tensor:
        """The (positive) step used for every (array, read-out column)."""
        step = positive(self.step)
        if self.granularity == "array" and self.column_tiles > 1:
            return step.index_select(1, self.column_tile)
        return step.expand(self.arrays, self.columns)

    def clip_bounds(self) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """Running mean ± n_sigma·std per (array, column), or None when clipping is off."""
        if self.n_sigma is None or not self._has_stats:
            return None
        std = self.running_var.clamp_min(0).sqrt()
        return self.running_mean - self.n_sigma * std, self.running_mean + self.n_sigma * std

    # ------------------------------------------------------------ state
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        key = prefix + "step"
        if key in state_dict and state_dict[key].shape != self.step.shape:
            errors.append(f"{key}: checkpoint has shape {tuple(state_dict[key].shape)}, the layer "
                          f"{tuple(self.step.shape)} — set the layer's bits (apply the policy) before loading")
            return
        if key in state_dict:
            self._initialized = True
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)
        if prefix + "bits" in state_dict:
            self._bits = int(state_dict[prefix + "bits"])
        if prefix + "stats_seen" in state_dict:
            self._has_stats = float(state_dict[prefix + "stats_seen"]) > 0

    @torch.no_grad()
    def _update_stats(self, p: torch.Tensor, ref: Optional[torch.Tensor]) -> None:
        var, mean = torch.var_mean(p.detach(), dim=0, unbiased=False)
        if ref is not None:
            ref_var, ref_mean = torch.var_mean(ref.detach(), dim=0, unbiased=False)
        else:
            ref_var = ref_mean = None
        var, mean = self._per_column(var, ref_var), self._per_column(mean, ref_mean)
        if not self._has_stats:
            self.running_mean.copy_(mean)
            self.running_var.copy_(var)
            self._has_stats = True
        else:
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var, self.momentum)
        self.stats_seen.add_(1)

    @torch.no_grad()
    def _initialize(self, p: torch.Tensor, ref: Optional[torch.Tensor], floor: Optional[torch.Tensor]) -> None:
        """LSQ init from mean |partial sum| per column, never below `floor` (arrays, columns): what
        the column can produce (its slice's largest cell at the input's scale), so that a column
        whose cells are all zero at calibration still gets a step that reads a weight moving in."""
        ref_mean = None if ref is None else ref.detach().abs().mean(dim=0)
        abs_mean = self._per_column(p.detach().abs().mean(dim=0), ref_mean)
        if floor is not None:
            abs_mean = torch.maximum(abs_mean, floor.to(abs_mean))
        if self.granularity == "layer":
            abs_mean = abs_mean.mean().view(1, 1)
        elif self.granularity == "array":
            sums = abs_mean.new_zeros(self.arrays, self.column_tiles).index_add_(1, self.column_tile, abs_mean)
            counts = torch.bincount(self.column_tile, minlength=self.column_tiles).to(abs_mean)
            abs_mean = sums / counts
        _, hi = self.grid_range()
        self.step.copy_(lsq_init(abs_mean, hi))
        if not self.training:
            log.warning("ADC step initialised from an evaluation batch; calibrate in train mode "
                        "(lib.cim.calibrate) for batch-independent results")
        self._initialized = True

    # ------------------------------------------------------------ compute
    def _per_column(self, main: torch.Tensor, ref: Optional[torch.Tensor]) -> torch.Tensor:
        """Join per-(group, tile, weight column) and per-(group, tile) reference values into the
        (arrays, columns) layout of the steps and statistics."""
        if ref is None:
            return main.reshape(self.arrays, self.columns)
        return torch.cat([main.reshape(self.arrays, -1), ref.reshape(self.arrays, 1)], dim=1)

    def _split(self, values: torch.Tensor, has_ref: bool):
        """(arrays, columns) → ((groups, tiles, weight columns), (groups, tiles) reference or None)."""
        grid = values.reshape(self.groups, self.tiles, self.columns)
        if not has_ref:
            return grid, None
        return grid[..., :-1], grid[..., -1]

    @property
    def fusable(self) -> bool:
        """Whether conversion can start without looking at the partial sums: ADC on, step set, and
        no clipping statistics to gather or apply (then `fused_forward` may compute them itself)."""
        return self.enabled and self._initialized and self.n_sigma is None

    def grad_factor(self, rows: int) -> float:
        """LSQ's step-gradient scale 1/sqrt(values per step · Q_p) for `rows` sets of partial sums."""
        _, hi = self.grid_range()
        elements = rows * self.arrays * self.columns
        return 1.0 / math.sqrt(max(1, elements // self.step.numel()) * max(hi, 1))

    @staticmethod
    def _gamma(step_grid: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
        """Digital scale of every (group, tile·slice, out) partial sum: weight step · 2^(s·c)."""
        groups, tiles, out = step_grid.shape
        return (step_grid.unsqueeze(2) * shifts.view(1, 1, -1, 1)).reshape(groups, tiles * shifts.numel(), out)

    def forward(self, p: torch.Tensor, shifts: torch.Tensor, step_grid: torch.Tensor,
                ref: Optional[torch.Tensor] = None, ref_shift: Optional[float] = None,
                floor: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Convert partial sums and shift-and-add them: p (M, groups, tiles, slices·out) → (M, groups, out).

        shifts: 2^(s·c) per slice; step_grid: weight step per (group, tile, out); ref (M, groups,
        tiles): the offset reference column's partial sums, of significance ref_shift, subtracted
        per output channel; floor: the least mean |partial sum| per (array, column) that an
        initialisation may assume (see `_initialize`).
        """
        gamma = self._gamma(step_grid, shifts)
        main = p.reshape((p.shape[0],) + gamma.shape)
        if not self.enabled:
            y = (main * gamma).sum(dim=2)
            if ref is not None:
                y = y - torch.einsum("mgt,gto->mgo", ref * ref_shift, step_grid)
            return y
        if self.training and self.n_sigma is not None:
            self._update_stats(p, ref)
        bounds = self.clip_bounds()
        if bounds is not None:
            (lo_main, lo_ref), (hi_main, hi_ref) = self._split(bounds[0], ref is not None), self._split(bounds[1], ref is not None)
            p = torch.maximum(torch.minimum(p, hi_main), lo_main)
            main = p.reshape(main.shape)
            if ref is not None:
                ref = torch.maximum(torch.minimum(ref, hi_ref), lo_ref)
        if not self._initialized:
            self._initialize(p, ref, floor)

        def convert(step, gamma_, lo, hi, factor):
            return _ConvertAccumulate.apply(main, step, gamma_, lo, hi, factor)
        constants = (gamma,) + self._steps(gamma.shape, ref is not None)
        return self._accumulate(convert, p.shape[0], constants, step_grid, ref, ref_shift)

    def constants(self, step_grid: torch.Tensor, shifts: torch.Tensor, has_ref: bool) -> tuple:
        """What a conversion reads besides the partial sums, from the weight step grid and the
        slices' 2^(s·c): (gamma, the ADC step laid out like gamma, the reference column's step
        or None). A caller may keep them while neither side changes (see `fused_forward`)."""
        gamma = self._gamma(step_grid, shifts)
        return (gamma,) + self._steps(gamma.shape, has_ref)

    def _steps(self, shape, has_ref: bool) -> tuple:
        step_main, step_ref = self._split(self.full_step(), has_ref)
        return step_main.reshape(shape), step_ref

    def fused_forward(self, convert: Converter, rows: int, shifts: torch.Tensor, step_grid: torch.Tensor,
                      ref: Optional[torch.Tensor] = None, ref_shift: Optional[float] = None,
                      constants: Optional[tuple] = None) -> torch.Tensor:
        """`forward` for a caller whose `Converter` computes the partial sums itself
        (lib.cim.crossbar_adc); only when `fusable`. `constants`: `constants(step_grid, shifts, ...)`
        when the caller keeps them (None: computed here)."""
        if not self.fusable:
            raise RuntimeError("PartialSumADC.fused_forward needs an initialised ADC without clipping")
        if constants is None:
            constants = self.constants(step_grid, shifts, ref is not None)
        return self._accumulate(convert, rows, constants, step_grid, ref, ref_shift)

    def _accumulate(self, convert: Converter, rows: int, constants: tuple, step_grid, ref, ref_shift) -> torch.Tensor:
        """Convert the weight columns (via `convert`) and the offset reference column, shift-and-add."""
        gamma, step_main, step_ref = constants
        lo, hi = self.grid_range()
        factor = self.grad_factor(rows)
        self.last_conversions = rows * self.arrays * self.columns
        y = convert(step_main, gamma, lo, hi, factor)
        if ref is not None:
            converted = _quantize(ref, step_ref, lo, hi, factor)
            y = y - torch.einsum("mgt,gto->mgo", converted * ref_shift, step_grid)
        return y

    def extra_repr(self) -> str:
        return (f"granularity={self.granularity}, bits={self.num_bits}, signed={self.signed}, "
                f"groups={self.groups}, tiles={self.tiles}, arrays={self.arrays}, columns={self.columns}, n_sigma={self.n_sigma}")
