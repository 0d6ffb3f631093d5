"""Device non-idealities of crossbar cells as typed data: `NoiseConfig` and its named presets.

Conductances are in units of the largest programmable one, g_max = 1; a cell of c bits stores
the code k in [0, 2^c - 1] at the target g_T = g_min + (1 - g_min)·k / (2^c - 1), with
g_min = 1 / on_off_ratio (0 for an ideal off state). Every σ below is relative to the range
g_max - g_min. What the noise does to the cells is lib.cim.noise; the fields:

- prog: programming noise σ, Gaussian, sampled once per programming (per repeat);
  prog_shape: coefficients (c0, c1, ...) of a polynomial in g_T that scales it (level-dependent
  noise: σ(g_T) = prog · Σ c_i g_T^i); empty = 1 everywhere.
- read: read noise σ, drawn afresh for every forward (every MVM of a batch shares one draw).
- drift_nu, drift_nu_std: drift exponent ν ~ N(drift_nu, drift_nu_std) per device;
  g(t) = g(t0)·(t / t0)^(-ν) at drift_t seconds after programming, t0 = drift_t0;
  drift_compensation: one global scale per layer restores the summed read-out of t0.
- stuck_on, stuck_off: fractions of devices stuck at g_max / g_min, whatever was programmed.
- on_off_ratio: g_max / g_min (None: g_min = 0). The periphery subtracts the off state's
  current, so a finite ratio alone changes nothing; it shows through level-dependent noise and
  the off state's drift.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from lib.errors import UserError


class NoiseConfigError(UserError, ValueError):
    """A noise description with an unknown preset or key, or a value out of range."""


# Short names for the --noise flag and sweep columns: one per kind of non-ideality.
NOISE_KINDS = {"prog": "prog", "read": "read", "drift": "drift_nu", "drift_std": "drift_nu_std",
               "drift_t": "drift_t", "stuck_on": "stuck_on", "stuck_off": "stuck_off", "on_off": "on_off_ratio"}


@dataclass(frozen=True)
class NoiseConfig:
    """What the cells of a crossbar do besides storing their codes (see the module docstring)."""

    preset: str = "ideal"
    prog: float = 0.0
    prog_shape: tuple = ()
    read: float = 0.0
    drift_nu: float = 0.0
    drift_nu_std: float = 0.0
    drift_t: float = 1.0
    drift_t0: float = 1.0
    drift_compensation: bool = False
    stuck_on: float = 0.0
    stuck_off: float = 0.0
    on_off_ratio: Optional[float] = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "prog_shape", tuple(float(c) for c in self.prog_shape))
        for key in ("prog", "read", "drift_nu_std"):
            _check_number(key, getattr(self, key), 0.0)
        _check_number("drift_nu", self.drift_nu, None)
        for key in ("drift_t", "drift_t0"):
            _check_number(key, getattr(self, key), 0.0, strict=True)
        for key in ("stuck_on", "stuck_off"):
            _check_number(key, getattr(self, key), 0.0, 1.0)
        if self.stuck_on + self.stuck_off > 1:
            raise NoiseConfigError(f"stuck_on + stuck_off = {self.stuck_on + self.stuck_off} is not allowed: "
                                   f"expected at most 1")
        if self.on_off_ratio is not None:
            _check_number("on_off_ratio", self.on_off_ratio, 1.0, strict=True)
        if not isinstance(self.drift_compensation, bool):
            raise NoiseConfigError(f"drift_compensation={self.drift_compensation!r} is not allowed: expected a bool")
        if any(not math.isfinite(c) for c in self.prog_shape):
            raise NoiseConfigError(f"prog_shape={self.prog_shape!r} is not allowed: expected finite numbers")

    # ------------------------------------------------------------ derived
    @property
    def g_min(self) -> float:
        return 0.0 if self.on_off_ratio is None else 1.0 / self.on_off_ratio

    @property
    def drifts(self) -> bool:
        return (self.drift_nu != 0 or self.drift_nu_std > 0) and self.drift_t != self.drift_t0

    @property
    def active(self) -> bool:
        """Whether the cells' read-out differs from their codes at all."""
        return self.prog > 0 or self.read > 0 or self.drifts or self.stuck_on > 0 or self.stuck_off > 0

    def describe(self) -> str:
        """A short label for reports: 'ideal', the preset's name, or the fields that differ from it."""
        if not self.active:
            return "ideal"
        base = PRESETS.get(self.preset, IDEAL)
        changed = [f"{_short(f.name)}={getattr(self, f.name)}" for f in dataclasses.fields(self)
                   if f.name != "preset" and getattr(self, f.name) != getattr(base, f.name)]
        label = self.preset if self.preset != "ideal" else ""
        return ",".join(([label] if label else []) + changed) or self.preset

    def with_kinds(self, **kinds: Any) -> "NoiseConfig":
        """A copy with some fields replaced by their short names (NOISE_KINDS) or full names."""
        changes = {}
        for key, value in kinds.items():
            name = NOISE_KINDS.get(key, key)
            if name not in _FIELDS or name == "preset":
                raise NoiseConfigError(f"unknown noise kind {key!r}; allowed: {sorted(NOISE_KINDS)}")
            changes[name] = value
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["prog_shape"] = list(self.prog_shape)
        return data

    @classmethod
    def from_value(cls, value: Any, source: str = "noise") -> "NoiseConfig":
        """From a preset name, or a mapping with an optional `preset` and fields overriding it."""
        if isinstance(value, NoiseConfig):
            return value
        if isinstance(value, str):
            return preset(value)
        if not isinstance(value, Mapping):
            raise NoiseConfigError(f"{source}={value!r} is not allowed: expected a preset name "
                                   f"{sorted(PRESETS)} or a mapping of {sorted(_FIELDS)}")
        data = dict(value)
        unknown = sorted(set(data) - _FIELDS)
        if unknown:
            raise NoiseConfigError(f"{source}: unknown key(s) {unknown}; allowed: {sorted(_FIELDS)}")
        base = preset(data.pop("preset", "ideal"))
        try:
            return dataclasses.replace(base, **data)
        except TypeError as err:
            raise NoiseConfigError(f"{source}: {err}") from None


def _short(name: str) -> str:
    return {v: k for k, v in NOISE_KINDS.items()}.get(name, name)


def _check_number(key: str, value: Any, low: Optional[float], high: Optional[float] = None,
                  strict: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if strict else value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        bound = "" if low is None else (f" > {low}" if strict else f" >= {low}")
        bound += "" if high is None else f" and <= {high}"
        raise NoiseConfigError(f"noise {key}={value!r} is not allowed: expected a finite number{bound}")


def _normalised(coefficients_us: tuple, g_max_us: float) -> tuple[float, tuple]:
    """(σ at g_max relative to g_max, the polynomial's coefficients scaled so it is 1 at g_max) of a
    programming-noise fit σ(g/g_max) = Σ c_i (g/g_max)^i given in µS."""
    at_max = sum(coefficients_us)
    return at_max / g_max_us, tuple(c / at_max for c in coefficients_us)


_FIELDS = {f.name for f in dataclasses.fields(NoiseConfig)}
IDEAL = NoiseConfig()

# PCM, after aihwkit's PCMLikeNoiseModel (Nandakumar et al., ICECS 2019; Joshi et al., Nature
# Communications 2020): programming noise σ = -1.1731 g_T² + 1.9650 g_T + 0.2635 µS at
# g_max = 25 µS; drift exponent µ_ν from 0.049 to 0.1 (0.049 over most of the range,
# -0.0155 ln g_T + 0.0244 clipped) with σ_ν from 0.008 to 0.045 (here 0.01), t0 = 20 s, read one
# hour after programming, with aihwkit's global drift compensation. Read noise: aihwkit's 1/f
# model gives σ = g·Q_s·sqrt(ln((t + t_read) / (2 t_read))), Q_s = min(0.0088 / g_T^0.65, 0.2),
# t_read = 250 ns: about 4 % of g_max at g_max after one hour; taken here as a constant 2 % of the
# range (the level dependence of read noise is not modelled). g_min = 0 as in aihwkit's pairs.
_PCM_PROG, _PCM_SHAPE = _normalised((0.2635, 1.9650, -1.1731), 25.0)
PCM = NoiseConfig(preset="pcm", prog=_PCM_PROG, prog_shape=_PCM_SHAPE, read=0.02, drift_nu=0.049,
                  drift_nu_std=0.01, drift_t=3600.0, drift_t0=20.0, drift_compensation=True)

# RRAM, after aihwkit's ReRamWan2022NoiseModel (Wan et al., Nature 2022), one second after
# programming: σ(g/g_max) = 0.348 + 16.030 x - 43.853 x² + 45.393 x³ - 16.815 x⁴ µS at
# g_max = 40 µS (0.9 % of g_max at the off state, about 5 % mid-range, 2.8 % at g_max), no drift;
# read noise about 1 % (aihwkit's advice for this model); on/off ratio 10, NeuroSim's default
# RRAM setting (DNN+NeuroSim's --onoffratio).
_RRAM_PROG, _RRAM_SHAPE = _normalised((0.348, 16.030, -43.853, 45.393, -16.815), 40.0)
RRAM = NoiseConfig(preset="rram", prog=_RRAM_PROG, prog_shape=_RRAM_SHAPE, read=0.01, on_off_ratio=10.0)

PRESETS = {"ideal": IDEAL, "pcm": PCM, "rram": RRAM}


def preset(name: str) -> NoiseConfig:
    if name not in PRESETS:
        raise NoiseConfigError(f"noise preset {name!r} is not allowed: expected one of {sorted(PRESETS)}")
    return PRESETS[name]
