"""Learned step sizes (LSQ) and mutable bit widths, as modules that Brevitas injectors compose.

Brevitas computes `scale = scaling_impl(x, int_threshold)` with int_threshold = the largest
integer of the grid (Q_p); our scaling modules return the learned step itself and use Q_p
only to initialise it (LSQ: 2·mean|x| / sqrt(Q_p)) and to scale its gradient by
1/sqrt(n·Q_p), which Brevitas does not do.

After a bit-width change a step is re-initialised by minimising the quantization error
(`mse_step`) instead: LSQ's rule is far from the best clipping range at low bits (a 2- or 3-bit
input initialised by it costs a resnet20 tens of points before finetuning), and a search or a
finetune starts every new policy from that point.
"""
from __future__ import annotations

import logging
import math

import torch
from torch import nn

from lib.cim.crossbar import TileLayout

log = logging.getLogger(__name__)

MIN_STEP = 1e-8
MSE_SAMPLES = 1 << 18  # input values an input step's error fit looks at, at most


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def scale_grad(x: torch.Tensor, factor) -> torch.Tensor:
    """Exact identity forward; gradient multiplied by `factor` (LSQ's step-gradient scaling)."""
    return _ScaleGrad.apply(x, factor)


def _records_grad(x: torch.Tensor) -> bool:
    """Whether autograd records an op on x now: else a gradient scale has nothing to act on."""
    return x.requires_grad and torch.is_grad_enabled()


def positive(step: torch.Tensor) -> torch.Tensor:
    """The step a quantizer uses: |learned value|, floored. LSQ's gradient can push a raw step
    through zero; the magnitude keeps the grid valid (and what the export writes)."""
    return step.abs().clamp_min(MIN_STEP)


class _ScaledPositive(torch.autograd.Function):
    """`positive` then `scale_grad` as one autograd node (a training forward makes two per layer):
    the backward computes what ScaleGrad's, clamp_min's and abs' would, in their order."""

    @staticmethod
    def forward(ctx, step, factor):
        ctx.save_for_backward(step)
        ctx.factor = factor
        return positive(step)

    @staticmethod
    def backward(ctx, grad):
        (step,) = ctx.saved_tensors
        grad = grad * ctx.factor
        magnitude = step.abs()
        grad = torch.where(magnitude >= MIN_STEP, grad, torch.zeros((), dtype=grad.dtype, device=grad.device))
        return grad * step.sgn(), None


def scaled_positive(step: torch.Tensor, factor) -> torch.Tensor:
    """`positive(step)` with its gradient multiplied by `factor` (LSQ's step-gradient scale); the
    plain step where autograd records nothing."""
    if not _records_grad(step):
        return positive(step)
    return _ScaledPositive.apply(step, factor)


def lsq_init(abs_mean: torch.Tensor, qp: float) -> torch.Tensor:
    return (2.0 * abs_mean / math.sqrt(max(qp, 1.0))).clamp_min(MIN_STEP)


# Candidate multiples of a starting step: a coarse sweep over [1/16, 4], then a fine one around the best.
_COARSE_FACTORS = [2.0 ** (k / 2) for k in range(-8, 5)]
_FINE_FACTORS = [2.0 ** (k / 16) for k in range(-7, 8) if k]


@torch.no_grad()
def mse_step(x: torch.Tensor, start: torch.Tensor, lo: float, hi: float, expand, group_mean) -> torch.Tensor:
    """The step (shaped like `start`, one per group) whose grid [lo, hi]·step reproduces `x` with
    the least mean squared error, searched over multiples of `start`.

    expand: start-shaped step → a step that broadcasts over x; group_mean: an x-shaped error →
    its mean per group, start-shaped.
    """
    x = x.detach()
    best, best_err = start.clone(), torch.full_like(start, float("inf"))

    def consider(trial: torch.Tensor) -> None:
        nonlocal best, best_err
        step = expand(trial)
        err = group_mean((torch.clamp(torch.round(x / step), lo, hi) * step - x).square_())
        better = err < best_err
        best, best_err = torch.where(better, trial, best), torch.where(better, err, best_err)

    for factor in _COARSE_FACTORS:
        consider((start * factor).clamp_min(MIN_STEP))
    center = best.clone()
    for factor in _FINE_FACTORS:
        consider((center * factor).clamp_min(MIN_STEP))
    return best


class MutableBitWidth(nn.Module):
    """A bit width kept in a buffer (saved in the state_dict) so a policy can change it in place.

    `value` mirrors it as a Python int so that reading it never synchronises with a GPU.
    """

    def __init__(self, bit_width: int) -> None:
        super().__init__()
        self.register_buffer("bits", torch.tensor(float(bit_width)))
        self.value = int(bit_width)

    def forward(self) -> torch.Tensor:
        return self.bits

    def set(self, bit_width: int) -> None:
        self.bits.fill_(float(bit_width))
        self.value = int(bit_width)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "bits" in state_dict:
            self.value = int(state_dict[prefix + "bits"])


class _LazyStep(nn.Module):
    """A step parameter initialised on first use from the tensor it quantizes.

    The python flag avoids a device sync per call; loading a state_dict that holds the step
    counts as initialised.
    """

    def __init__(self) -> None:
        super().__init__()
        self._initialized = False
        self._fit_error = False  # the next initialisation minimises the quantization error (bits changed)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if prefix + "step" in state_dict:
            self._initialized = True
            self._fit_error = False
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def mark_stale(self) -> None:
        """Re-initialise from the next tensor seen, minimising its quantization error (bits changed)."""
        self._initialized = False
        self._fit_error = True

    @property
    def initialized(self) -> bool:
        """Whether the step has been set from data or a checkpoint (else the next forward sets it)."""
        return self._initialized


class WeightStep(_LazyStep):
    """Weight step per layer / output channel / row-tile (array) / row-tile × output channel (column).

    The parameter has the granularity's own shape; `forward` expands it to a scale that
    broadcasts over the weight: (1,..) for layer, (C_out,1,..) for channel, and
    (C_out, C_in/g, 1, ..) for array/column (each input channel takes its row-tile's step).
    """

    def __init__(self, granularity: str, tile_layout: TileLayout, weight_ndim: int) -> None:
        super().__init__()
        self.granularity = granularity
        self.layout = tile_layout
        self.weight_ndim = weight_ndim
        g, t, o = tile_layout.groups, tile_layout.tiles, tile_layout.out_channels_per_group
        shape = {"layer": (1,), "channel": (g * o,), "array": (g, t), "column": (g, t, o)}[granularity]
        self.step = nn.Parameter(torch.ones(shape))
        self.register_buffer("tile_index", tile_layout.tile_of_channel(), persistent=False)

    def grid(self, step: torch.Tensor | None = None) -> torch.Tensor:
        """The step (default: the positive learned one; or `scaled_step`'s) as (groups, tiles,
        out_per_group): what the crossbar's digital scaling uses."""
        g, t, o = self.layout.groups, self.layout.tiles, self.layout.out_channels_per_group
        step = positive(self.step) if step is None else step
        if self.granularity == "layer":
            return step.view(1, 1, 1).expand(g, t, o)
        if self.granularity == "channel":
            return step.view(g, 1, o).expand(g, t, o)
        if self.granularity == "array":
            return step.view(g, t, 1).expand(g, t, o)
        return step

    def _group_mean(self, values: torch.Tensor) -> torch.Tensor:
        """Mean of a weight-shaped tensor over the weights that share each step, in the parameter's shape."""
        lay = self.layout
        w = values.reshape(lay.groups, lay.out_channels_per_group, lay.in_channels_per_group, -1)
        if self.granularity == "layer":
            return w.mean().view(1)
        if self.granularity == "channel":
            return w.mean(dim=(2, 3)).reshape(-1)
        per_channel = w.mean(dim=3)  # (g, o, c)
        sums = torch.zeros(lay.groups, lay.out_channels_per_group, lay.tiles, device=w.device, dtype=w.dtype)
        sums.index_add_(2, self.tile_index.to(w.device), per_channel)
        counts = torch.bincount(self.tile_index, minlength=lay.tiles).to(w.dtype).to(w.device)
        per_tile = sums / counts  # (g, o, t)
        if self.granularity == "array":
            return per_tile.mean(dim=1)
        return per_tile.permute(0, 2, 1).contiguous()

    def weights_per_step(self) -> int:
        lay = self.layout
        total = lay.groups * lay.out_channels_per_group * lay.rows
        return max(1, total // self.step.numel())

    @torch.no_grad()
    def initialize(self, weight: torch.Tensor, qp: float) -> None:
        """LSQ's init; after a bit change, the step of least quantization error on the symmetric grid."""
        weight = weight.detach()
        step = lsq_init(self._group_mean(weight.abs()), qp)
        if self._fit_error:
            step = mse_step(weight, step, -qp, qp, self.expand_to_weight, self._group_mean)
        self.step.copy_(step)
        self._initialized = True
        self._fit_error = False

    def scaled_step(self, weight: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
        """The positive step in its own shape, with LSQ's gradient scale 1/sqrt(n·Q_p); set from
        `weight` first if not yet initialised."""
        if not self._initialized:
            self.initialize(weight, float(threshold))
        if not _records_grad(self.step):
            return positive(self.step)
        return scaled_positive(self.step, torch.rsqrt(threshold.clamp_min(1.0) * self.weights_per_step()))

    def forward(self, weight: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
        return self.expand_to_weight(self.scaled_step(weight, threshold))

    def expand_to_weight(self, step: torch.Tensor) -> torch.Tensor:
        trailing = (1,) * (self.weight_ndim - 2)
        if self.granularity == "layer":
            return step.view((1, 1) + trailing)
        if self.granularity == "channel":
            return step.view((-1, 1) + trailing)
        lay = self.layout
        if self.granularity == "array":
            grid = step.view(lay.groups, 1, lay.tiles).expand(lay.groups, lay.out_channels_per_group, lay.tiles)
        else:
            grid = step.permute(0, 2, 1)  # (g, o, t)
        # each tile's step repeated over its channels (expand + reshape: its backward is a plain sum)
        per_channel = grid.reshape(-1, lay.tiles, 1).expand(-1, lay.tiles, lay.channels_per_tile)
        per_channel = per_channel.reshape(-1, lay.padded_channels)[:, :lay.in_channels_per_group]
        return per_channel.reshape(per_channel.shape + trailing)


class ActStep(_LazyStep):
    """One learned input step per layer, initialised from the first batch it sees.

    It also keeps a running mean of |x| (training batches only) so that a change of bit width
    can re-initialise the step from data without looking at any evaluation batch.
    """

    def __init__(self, momentum: float = 0.1) -> None:
        super().__init__()
        self.step = nn.Parameter(torch.ones(1))
        self.register_buffer("running_abs_mean", torch.zeros(1))
        self.momentum = momentum

    @torch.no_grad()
    def initialize(self, x: torch.Tensor, qp: float) -> None:
        abs_mean = x.detach().abs().mean().view(1)
        if not self.training:
            log.warning("input step initialised from an evaluation batch; calibrate in train mode "
                        "(lib.cim.calibrate) for batch-independent results")
        self.running_abs_mean.copy_(abs_mean)
        self.step.copy_(lsq_init(abs_mean, qp))
        self._initialized = True

    @torch.no_grad()
    def fit_error(self, x: torch.Tensor, qp: float) -> None:
        """The step of least quantization error on this batch (grid [-Q_p-1, Q_p] if x has negatives, else [0, Q_p])."""
        x = x.detach().flatten()
        if x.numel() > MSE_SAMPLES:  # an evenly strided subset keeps the search cheap on large maps
            x = x[:: -(-x.numel() // MSE_SAMPLES)]
        lo = -qp - 1.0 if bool((x < 0).any()) else 0.0
        start = lsq_init(x.abs().mean().view(1), qp)
        self.step.copy_(mse_step(x, start, lo, qp, lambda step: step, lambda err: err.mean().view(1)))
        self._fit_error = False

    @torch.no_grad()
    def rescale_for(self, old_qp: float, new_qp: float) -> None:
        """New grid width: LSQ init from the running |x| statistics when known (else keep the range),
        refined to the least quantization error on the next training batch."""
        if self._initialized and float(self.running_abs_mean) > 0:
            self.step.copy_(lsq_init(self.running_abs_mean, new_qp))
        elif self._initialized:
            self.step.mul_(max(old_qp, 1.0) / max(new_qp, 1.0))
        self._fit_error = True

    def forward(self, x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
        if self.prepare(x, threshold):
            with torch.no_grad():  # one fused pass: Σ|x|
                self.record_abs_sum(torch.linalg.vector_norm(x.detach(), ord=1), x.numel())
        return self.scaled_step(x, threshold)

    def prepare(self, x: torch.Tensor, threshold: torch.Tensor) -> bool:
        """What `forward` does before it returns the step: initialise the step from x, or fit it
        to x after a bit change (training); True when x's mean |x| is then due in the running
        statistic (`record_abs_sum`), which a caller may compute along with its own pass over x."""
        if not self._initialized:
            self.initialize(x, float(threshold))
        if self._fit_error and self.training:
            self.fit_error(x, float(threshold))
            return False
        return self.training

    @torch.no_grad()
    def record_abs_sum(self, abs_sum: torch.Tensor, numel: int) -> None:
        """Move the running |x| mean towards a training batch's Σ|x| / numel."""
        self.running_abs_mean.lerp_((abs_sum / max(1, numel)).view(1), self.momentum)

    def scaled_step(self, x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
        """The positive step with LSQ's gradient scale 1/sqrt(values per sample · Q_p)."""
        if not _records_grad(self.step):
            return positive(self.step)
        numel_per_sample = max(1, x[0].numel()) if x.dim() > 1 else x.numel()
        return scaled_positive(self.step, torch.rsqrt(threshold.clamp_min(1.0) * numel_per_sample))
