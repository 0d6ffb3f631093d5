"""Device non-idealities per cell slice: integer cell codes in, the cells' effective values out.

A CIM layer's weights reach the arrays as cell slices (lib.cim.crossbar.stored_slices): codes in
[0, 2^c - 1] (offset mapping) or a differential pair's difference in [-(2^c - 1), 2^c - 1]. Each
physical device (both devices of a pair) gets its own non-idealities (lib.cim.noise_config):

  target g_T -> programming noise -> drift to time t -> stuck-at faults -> (drift compensation)
  -> read noise (per forward) -> read-out (g - g_min) / (g_max - g_min) · (2^c - 1)

The read-out is what the ADC then sees in place of the code: a pair's value is the difference
of its two devices' read-outs, an offset cell's is its own (the reference column and the off
state's current are subtracted ideally). Everything here is a pure function of tensors; the
per-layer state that keeps one sample per repeat is `LayerNoise`, attached to a model's CIM
layers by `attach` (they then take their plain composed path, see CIMLayerMixin._device_noise).

Sampling: in evaluation the persistent draws (programming noise, drift exponents, faults) are
made once per programming of a layer from a generator seeded afresh by (seed, layer index), so
one seed is one programmed chip and gives the same numbers every run, whatever ran before; read
noise continues that generator, forward after forward, until the cells change. In training (noise-aware QAT) every forward programs afresh from torch's global
generator (whose state a checkpoint keeps), so a resumed run draws what the uninterrupted one did.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from lib.cim.layers import CIMLayerMixin
from lib.cim.noise_config import NoiseConfig

log = logging.getLogger(__name__)

SEED_STRIDE = 1_000_003  # layer i of repeat seed s draws from generator seed s·SEED_STRIDE + i


# ------------------------------------------------------------------------------ pure functions
def device_codes(cells: torch.Tensor, differential: bool) -> torch.Tensor:
    """The code each physical device holds, stacked on a new leading dim: (2, ...) for a
    differential pair (q⁺ digit, q⁻ digit), (1, ...) for an offset cell."""
    if differential:
        return torch.stack([cells.clamp(min=0), (-cells).clamp(min=0)])
    return cells.unsqueeze(0)


def target_conductance(codes: torch.Tensor, levels: int, g_min: float) -> torch.Tensor:
    """g_T = g_min + (1 - g_min)·k / levels, in units of g_max."""
    return g_min + (1.0 - g_min) * codes / levels


def level_scale(g: torch.Tensor, shape: tuple) -> torch.Tensor | float:
    """Σ_i c_i g^i (1 when `shape` is empty): the level dependence of programming noise."""
    if not shape:
        return 1.0
    out = torch.zeros_like(g)
    for c in reversed(shape):  # Horner
        out = out * g + c
    return out.clamp(min=0)


def programmed(g_target: torch.Tensor, z: torch.Tensor, cfg: NoiseConfig) -> torch.Tensor:
    """g_T + N(0, σ) with σ = prog·(1 - g_min)·shape(g_T); conductances stay >= 0."""
    if cfg.prog == 0:
        return g_target
    sigma = cfg.prog * (1.0 - cfg.g_min) * level_scale(g_target, cfg.prog_shape)
    return (g_target + sigma * z).clamp(min=0)


def drift_exponents(z: torch.Tensor, cfg: NoiseConfig) -> torch.Tensor:
    """ν = drift_nu + drift_nu_std·z per device."""
    return cfg.drift_nu + cfg.drift_nu_std * z


def drifted(g: torch.Tensor, nu: torch.Tensor, t: float, t0: float) -> torch.Tensor:
    """g(t) = g(t0)·(t / t0)^(-ν): identity for ν = 0 or t = t0."""
    return g * torch.pow(torch.as_tensor(t / t0, dtype=g.dtype, device=g.device), -nu)


def stuck(g: torch.Tensor, u: torch.Tensor, cfg: NoiseConfig) -> torch.Tensor:
    """Devices with u < stuck_on read g_max, with stuck_on <= u < stuck_on + stuck_off read g_min."""
    if cfg.stuck_on > 0:
        g = torch.where(u < cfg.stuck_on, torch.ones_like(g), g)
    if cfg.stuck_off > 0:
        off = (u >= cfg.stuck_on) & (u < cfg.stuck_on + cfg.stuck_off)
        g = torch.where(off, torch.full_like(g, cfg.g_min), g)
    return g


def read_out(g: torch.Tensor, levels: int, g_min: float, differential: bool) -> torch.Tensor:
    """The cell values the ADC sees: (g - g_min) / (1 - g_min)·levels per device, a pair's difference."""
    values = (g - g_min) * (levels / (1.0 - g_min))
    return values[0] - values[1] if differential else values[0]


def compensation(reference: torch.Tensor, drifted_values: torch.Tensor) -> torch.Tensor:
    """Global drift compensation of one layer: Σ_columns |Σ_rows cells| at t0 over the same at t,
    what an all-ones input reads from every slice's columns (cells (S, out, rows...))."""
    def column_sums(v):
        return v.reshape(v.shape[0], v.shape[1], -1).sum(dim=2).abs().sum()
    now = column_sums(drifted_values)
    return torch.where(now > 0, column_sums(reference) / now.clamp(min=1e-30), torch.ones_like(now))


@dataclass
class DeviceDraws:
    """The random numbers of one programming of a layer's devices (each shaped like the devices)."""

    prog: Optional[torch.Tensor]
    drift: Optional[torch.Tensor]
    faults: Optional[torch.Tensor]


def draw(shape: torch.Size, cfg: NoiseConfig, generator: Optional[torch.Generator], device, dtype) -> DeviceDraws:
    """Standard normals for programming noise and drift, uniforms for faults (None where off)."""
    def normal():
        return torch.randn(shape, generator=generator, dtype=dtype).to(device)

    def uniform():
        return torch.rand(shape, generator=generator, dtype=dtype).to(device)
    return DeviceDraws(prog=normal() if cfg.prog > 0 else None,
                       drift=normal() if cfg.drifts and cfg.drift_nu_std > 0 else None,
                       faults=uniform() if cfg.stuck_on > 0 or cfg.stuck_off > 0 else None)


def programmed_values(cells: torch.Tensor, levels: int, differential: bool, cfg: NoiseConfig,
                      draws: DeviceDraws) -> torch.Tensor:
    """The cells' read-out after programming, drift, faults and compensation, without read noise."""
    g = target_conductance(device_codes(cells, differential), levels, cfg.g_min)
    if draws.prog is not None:
        g = programmed(g, draws.prog, cfg)
    if cfg.drifts:
        nu = drift_exponents(draws.drift, cfg) if draws.drift is not None else torch.full_like(g, cfg.drift_nu)
        at_t0 = g
        g = drifted(g, nu, cfg.drift_t, cfg.drift_t0)
    if draws.faults is not None:
        g = stuck(g, draws.faults, cfg)
        if cfg.drifts:
            at_t0 = stuck(at_t0, draws.faults, cfg)
    values = read_out(g, levels, cfg.g_min, differential)
    if cfg.drifts and cfg.drift_compensation:
        values = values * compensation(read_out(at_t0, levels, cfg.g_min, differential), values)
    return values


def with_read_noise(values: torch.Tensor, z: torch.Tensor, levels: int, differential: bool,
                    cfg: NoiseConfig) -> torch.Tensor:
    """values plus each device's read noise (σ = read of the range, in cell-value units; a pair's
    two devices each add their own: z is shaped like the devices)."""
    noise = z * (cfg.read * levels)
    return values + (noise[0] - noise[1] if differential else noise[0])


# ------------------------------------------------------------------------------ per-layer state
class LayerNoise:
    """One CIM layer's non-idealities: its config, the programming drawn for the current repeat
    (evaluation) and the generator its read noise comes from."""

    def __init__(self, cfg: NoiseConfig, seed: int, index: int) -> None:
        self.cfg = cfg
        self.seed = int(seed)
        self.index = int(index)
        self._generator = torch.Generator()
        self._kept: Optional[tuple] = None  # (cells' key, programmed values)

    @property
    def active(self) -> bool:
        return self.cfg.active

    def cells(self, cells: torch.Tensor, plan, training: bool) -> torch.Tensor:
        """The effective values of `cells` (integer cell values, (S, *weight shape)) on `plan`'s devices."""
        levels, differential = 2 ** plan.cell_bits - 1, plan.differential
        devices = (2 if differential else 1,) + tuple(cells.shape)
        if training:  # noise-aware training: a fresh programming every forward, torch's global generator
            values = programmed_values(cells, levels, differential, self.cfg,
                                       draw(devices, self.cfg, None, cells.device, cells.dtype))
            generator = None
        else:
            values = self._programmed(cells, levels, differential, devices)
            generator = self._generator
        if self.cfg.read > 0:
            z = torch.randn(devices, generator=generator, dtype=cells.dtype).to(cells.device)
            values = with_read_noise(values, z, levels, differential, self.cfg)
        return values

    def _programmed(self, cells, levels, differential, devices) -> torch.Tensor:
        """The evaluation programming, kept while the cells stay the same (one chip per repeat)."""
        key = (tuple(cells.shape), levels, differential, cells.device, cells.dtype)
        if self._kept is not None and self._kept[0] == key and torch.equal(self._kept[1], cells):
            return self._kept[2]
        self._generator.manual_seed(self.seed * SEED_STRIDE + self.index)  # a programming depends on the seed alone
        draws = draw(devices, self.cfg, self._generator, cells.device, cells.dtype)
        values = programmed_values(cells, levels, differential, self.cfg, draws)
        self._kept = (key, cells.clone(), values)
        return values


NOISE_ATTR = "device_noise"


def attach(model: nn.Module, cfg: Optional[NoiseConfig], seed: int = 0) -> int:
    """Give every CIM layer of `model` the non-idealities `cfg` with repeat seed `seed` (None or an
    inactive config: remove them); returns how many layers got them. Layers are numbered in
    module order, so a seed programs the same devices whatever else the run does."""
    count = 0
    for index, module in enumerate(m for m in model.modules() if isinstance(m, CIMLayerMixin)):
        if cfg is None or not cfg.active:
            module.__dict__.pop(NOISE_ATTR, None)
            continue
        module.__dict__[NOISE_ATTR] = LayerNoise(cfg, seed, index)
        count += 1
    if count:
        log.debug("device noise %s (seed %d) on %d layers", cfg.describe(), seed, count)
    return count


def detach(model: nn.Module) -> int:
    """Remove the non-idealities from every CIM layer (the ideal crossbar again); returns how many had them."""
    had = sum(NOISE_ATTR in m.__dict__ for m in model.modules() if isinstance(m, CIMLayerMixin))
    attach(model, None)
    return had
