"""The points of a crossbar sweep: axes parsed from `--sweep FIELD=VALUES` and `--noise KIND=VALUES`,
their Cartesian product, and each point's hardware, bits and noise, all validated up front.

Values are comma lists (`cell_bits=1,2,4`, `mapping=offset,dc`) or inclusive integer ranges
(`adc_bits=3:8`), or both (`adc_bits=3:5,8`). Hardware fields take their own type; `w_bit` and
`a_bit` set every layer's bits; `noise` takes preset names; noise kinds (lib.cim.noise_config.
NOISE_KINDS) take numbers. Noise axes vary fastest, so points that share a calibrated model
follow each other.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
from dataclasses import dataclass
from typing import Any, Optional

from lib.bit_limits import check_bits
from lib.cim.hardware import HardwareConfig
from lib.cim.noise_config import NOISE_KINDS, NoiseConfig
from lib.errors import UserError
from lib.policy import Policy


class SweepError(UserError, ValueError):
    """A sweep axis that names an unknown field or a value the hardware or the noise model refuses."""


BIT_KEYS = ("w_bit", "a_bit")
UNSWEEPABLE = ("energy",)  # priced per operation; sweep separate YAMLs instead
_INT_FIELDS = {f.name for f in dataclasses.fields(HardwareConfig) if f.type == "int"}
_FLOAT_FIELDS = {f.name for f in dataclasses.fields(HardwareConfig) if "float" in str(f.type)}
HARDWARE_KEYS = tuple(f.name for f in dataclasses.fields(HardwareConfig) if f.name not in UNSWEEPABLE)
# Fields that change only what the cost model prices (latency and energy), not what the layers compute:
# a point that differs from the base in these alone keeps the base's calibrated steps.
PRICED_ONLY = ("write_latency", "execute_latency", "adc_latency_model", "adc_cycle_latency", "row_tiling",
               "column_placement", "energy", "noise")


@dataclass(frozen=True)
class Axis:
    """One swept key and its values, in the order given."""

    key: str
    values: tuple
    noise: bool = False  # a noise kind (else a hardware field or bits)


@dataclass(frozen=True)
class Point:
    """One sweep point: the swept values by key (hardware/bits first, then noise kinds)."""

    values: tuple  # ((key, value), ...) in axis order

    @property
    def as_dict(self) -> dict:
        return dict(self.values)

    def key(self) -> str:
        """Its identity in the results (resume compares these)."""
        return json.dumps(self.as_dict, sort_keys=True)


def parse_axis(text: str, noise: bool) -> Axis:
    """`KEY=V1,V2` or `KEY=A:B` → Axis, the values converted to the key's type (SweepError if not)."""
    flag = "--noise" if noise else "--sweep"
    if "=" not in text:
        raise SweepError(f"{flag} {text!r} is not allowed: expected KEY=VALUES like "
                         f"{'prog=0,0.02' if noise else 'cell_bits=1,2,4 or adc_bits=3:8'}")
    key, _, raw = text.partition("=")
    key = key.strip().replace("-", "_")
    allowed = sorted(NOISE_KINDS) if noise else sorted(HARDWARE_KEYS + BIT_KEYS)
    if key not in allowed:
        raise SweepError(f"{flag} {key!r} is not a field that can be swept; allowed: {allowed}")
    values = []
    for item in (part.strip() for part in raw.split(",")):
        if not item:
            raise SweepError(f"{flag} {text!r}: an empty value; expected comma-separated values")
        values.extend(_expand(key, item, noise, flag))
    if len(set(map(repr, values))) != len(values):
        raise SweepError(f"{flag} {text!r} repeats a value")
    return Axis(key, tuple(values), noise)


def _expand(key: str, item: str, noise: bool, flag: str) -> list:
    if ":" in item:
        lo, _, hi = item.partition(":")
        try:
            lo_i, hi_i = int(lo), int(hi)
        except ValueError:
            raise SweepError(f"{flag} {key}={item!r}: a range a:b needs integers") from None
        if hi_i < lo_i:
            raise SweepError(f"{flag} {key}={item!r}: the range is empty (b < a)")
        return [_typed(key, str(v), noise, flag) for v in range(lo_i, hi_i + 1)]
    return [_typed(key, item, noise, flag)]


def _typed(key: str, item: str, noise: bool, flag: str) -> Any:
    if item.lower() in ("none", "null"):
        return None
    try:
        if noise or key in _FLOAT_FIELDS:
            return float(item)
        if key in _INT_FIELDS or key in BIT_KEYS:
            return int(item)
    except ValueError:
        raise SweepError(f"{flag} {key}={item!r} is not allowed: expected a number") from None
    return item


def check_axes(axes: list[Axis]) -> None:
    keys = [a.key for a in axes]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        raise SweepError(f"swept key(s) {repeated} given twice; give each key once with all its values")


def points(axes: list[Axis]) -> list[Point]:
    """Every combination, the last axis fastest (noise axes last)."""
    ordered = [a for a in axes if not a.noise] + [a for a in axes if a.noise]
    if not ordered:
        return [Point(())]
    return [Point(tuple(zip([a.key for a in ordered], combo)))
            for combo in itertools.product(*[a.values for a in ordered])]


# ------------------------------------------------------------------------------ a point's setting
@dataclass(frozen=True)
class Setting:
    """What a point evaluates: hardware, per-layer bits and noise (None: ideal)."""

    hardware: HardwareConfig
    policy: Policy
    noise: Optional[NoiseConfig]

    def structure(self) -> tuple:
        """What the calibrated model depends on (not the noise, not what is only priced)."""
        hw = dataclasses.replace(self.hardware, **{k: getattr(HardwareConfig(), k) for k in PRICED_ONLY
                                                   if k not in ("energy", "noise")})
        return (hw, tuple(self.policy.w_bits), tuple(self.policy.a_bits), tuple(self.policy.adc_bits or ()))


def setting_for(point: Point, base_hw: HardwareConfig, base_policy: Policy,
                base_noise: Optional[NoiseConfig]) -> Setting:
    """The point's hardware, bits and noise on top of the base ones; SweepError naming the value
    the hardware, the bits or the noise model refuses."""
    values = point.as_dict
    hw_changes = {k: v for k, v in values.items() if k in HARDWARE_KEYS}
    noise_changes = {k: v for k, v in values.items() if k in NOISE_KINDS}
    label = ", ".join(f"{k}={v}" for k, v in point.values)
    try:
        hw = base_hw.with_overrides(**hw_changes) if hw_changes else base_hw
    except (UserError, TypeError) as err:
        raise SweepError(f"sweep point {label}: {err}") from None
    noise = hw.noise if "noise" in hw_changes else base_noise
    if noise_changes:
        try:
            noise = (noise or NoiseConfig()).with_kinds(**noise_changes)
        except UserError as err:
            raise SweepError(f"sweep point {label}: {err}") from None
    w_bits, a_bits = list(base_policy.w_bits), list(base_policy.a_bits)
    adc = list(base_policy.adc_bits) if base_policy.adc_bits is not None else None
    for key, column in (("w_bit", w_bits), ("a_bit", a_bits)):
        if key in values:
            try:
                check_bits(key, values[key])
            except UserError as err:
                raise SweepError(f"sweep point {label}: {err}") from None
            column[:] = [values[key]] * len(column)
    if "adc_bits" in hw_changes:
        adc = None  # every layer at the swept hardware default
    policy = Policy(w_bits, a_bits, adc, base_policy.layer_names)
    return Setting(hw, policy, noise if noise is not None and noise.active else None)
