"""The ADC at the bottom of each crossbar column: LSQ quantization of partial sums.

Partial sums are indexed (array, column) = (groups·row-tiles, slices·out_channels [+ offset
reference column]). The learned step is shared per layer, per array, or per physical column.
Optional clipping to running mean ± n_sigma·std uses statistics gathered in training only, so
in eval mode a sample's output never depends on its batch mates.
"""
from __future__ import annotations

import logging
import math
from typing import Optional

import torch
from torch import nn

from lib.cim.adc_kernels import KERNELS
from lib.cim.steps import lsq_init, positive, scale_grad

log = logging.getLogger(__name__)


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
        return KERNELS.forward(p, step, step * gamma, lo, hi)

    @staticmethod
    def backward(ctx, grad_y):
        p, step, gamma = ctx.saved_tensors
        lo, hi, grad_factor = ctx.bounds
        grad_p, sum_levels, sum_v = KERNELS.backward(grad_y.contiguous(), p, step, gamma, lo, hi)
        grad_step = (gamma * (sum_levels - sum_v) * grad_factor).sum_to_size(step.shape)
        grad_gamma = (step * sum_levels).sum_to_size(gamma.shape)
        return grad_p if ctx.needs_input_grad[0] else None, grad_step, grad_gamma, None, None, None


def _quantize(p, step, lo: int, hi: int, grad_factor: float):
    """Plain LSQ quantization (used for the small offset-reference partial sums)."""
    step = scale_grad(step, grad_factor)
    v = p / step
    levels = v + (torch.round(v) - v).detach()
    return torch.clamp(levels, lo, hi) * step


class PartialSumADC(nn.Module):
    """LSQ ADC for the partial sums of one CIM layer.

    `arrays` = groups·row-tiles, `columns` = physical columns per array read by the ADC
    (slices·out_channels, then the offset reference column if any). Partial sums come as
    (M, groups, tiles, columns) with M = output pixels × batch or tokens.
    """

    def __init__(self, granularity: str, groups: int, tiles: int, columns: int, bits: int, signed: bool,
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
        self.resize(groups * tiles, columns)

    # ------------------------------------------------------------ shape
    def resize(self, arrays: int, columns: int) -> None:
        """(Re)allocate steps and statistics for a new column count (the weight's slices changed)."""
        device = self.bits.device
        self.arrays, self.columns = arrays, columns
        shape = {"off": (1, 1), "layer": (1, 1), "array": (arrays, 1), "column": (arrays, columns)}[self.granularity]
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
        """The (positive) step used for every (array, column)."""
        return positive(self.step).expand(self.arrays, self.columns)

    def clip_bounds(self) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """Running mean ± n_sigma·std per (array, column), or None when clipping is off."""
        if self.n_sigma is None or not self._has_stats:
            return None
        std = self.running_var.clamp_min(0).sqrt()
        return self.running_mean - self.n_sigma * std, self.running_mean + self.n_sigma * std

    def _grid4(self, values: torch.Tensor) -> torch.Tensor:
        """(arrays, columns) → (groups, tiles, columns), matching the partial sums' trailing dims."""
        return values.reshape(self.groups, self.tiles, self.columns)

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
    def _update_stats(self, p: torch.Tensor) -> None:
        var, mean = torch.var_mean(p.detach(), dim=0, unbiased=False)
        var, mean = var.reshape(self.arrays, self.columns), mean.reshape(self.arrays, self.columns)
        if not self._has_stats:
            self.running_mean.copy_(mean)
            self.running_var.copy_(var)
            self._has_stats = True
        else:
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var, self.momentum)
        self.stats_seen.add_(1)

    @torch.no_grad()
    def _initialize(self, p: torch.Tensor) -> None:
        abs_mean = p.detach().abs().mean(dim=0).reshape(self.arrays, self.columns)
        if self.granularity == "layer":
            abs_mean = abs_mean.mean().view(1, 1)
        elif self.granularity == "array":
            abs_mean = abs_mean.mean(dim=1, keepdim=True)
        _, hi = self.grid_range()
        self.step.copy_(lsq_init(abs_mean, hi))
        if not self.training:
            log.warning("ADC step initialised from an evaluation batch; calibrate in train mode "
                        "(lib.cim.calibrate) for batch-independent results")
        self._initialized = True

    # ------------------------------------------------------------ compute
    def forward(self, p: torch.Tensor, shifts: torch.Tensor, step_grid: torch.Tensor,
                ref_shift: Optional[float] = None) -> torch.Tensor:
        """Convert partial sums p (M, groups, tiles, columns) and shift-and-add them to (M, groups, out).

        shifts: 2^(s·c) per slice; step_grid: weight step per (group, tile, out); ref_shift: the
        offset reference column's significance (its term is subtracted per output channel).
        """
        groups, tiles, out = step_grid.shape
        slices = shifts.numel()
        weight_cols = slices * out
        gamma = step_grid.unsqueeze(2) * shifts.view(1, 1, -1, 1)  # (g, t, S, o)
        main = p if ref_shift is None else p[..., :weight_cols]
        main = main.unflatten(3, (slices, out))
        if not self.enabled:
            y = (main * gamma).sum(dim=(2, 3))
            if ref_shift is not None:
                y = y - torch.einsum("mgt,gto->mgo", p[..., weight_cols] * ref_shift, step_grid)
            return y
        if self.training and self.n_sigma is not None:
            self._update_stats(p)
        bounds = self.clip_bounds()
        if bounds is not None:
            p = torch.maximum(torch.minimum(p, self._grid4(bounds[1])), self._grid4(bounds[0]))
            main = (p if ref_shift is None else p[..., :weight_cols]).unflatten(3, (slices, out))
        if not self._initialized:
            self._initialize(p)
        lo, hi = self.grid_range()
        factor = 1.0 / math.sqrt(max(1, p.numel() // self.step.numel()) * max(hi, 1))
        step = self._grid4(self.full_step())
        main_step = step[..., :weight_cols].unflatten(2, (slices, out))
        y = _ConvertAccumulate.apply(main, main_step, gamma, lo, hi, factor)
        if ref_shift is not None:
            ref = _quantize(p[..., weight_cols], step[..., weight_cols], lo, hi, factor)
            y = y - torch.einsum("mgt,gto->mgo", ref * ref_shift, step_grid)
        return y

    def extra_repr(self) -> str:
        return (f"granularity={self.granularity}, bits={self.num_bits}, signed={self.signed}, "
                f"groups={self.groups}, tiles={self.tiles}, arrays={self.arrays}, columns={self.columns}, n_sigma={self.n_sigma}")
