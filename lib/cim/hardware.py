"""Crossbar hardware description (array size, cells, converters, mapping, latencies).

One dataclass, read from our own flat YAML or from CIM-AQ's nested `hardware_config.yaml`,
validated up front so a bad value fails before any training starts.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import yaml
from lib.cim.energy_config import EnergyConfig, EnergyConfigError
from lib.cim.noise_config import NoiseConfig, NoiseConfigError
from lib.errors import UserError

MAPPINGS = ("offset", "differential-column", "differential-row")
MAPPING_ALIASES = {"of": "offset", "dc": "differential-column", "dr": "differential-row"}
WEIGHT_GRANULARITIES = ("layer", "channel", "array", "column")
PSUM_GRANULARITIES = ("off", "layer", "array", "column")
ADC_LATENCY_MODELS = ("fixed", "sar")
INPUT_MODES = ("bit-serial", "multi-bit")
ROW_TILINGS = ("channel", "dense")
WEIGHT_SLICINGS = ("magnitude", "full-range")
COLUMN_PLACEMENTS = ("whole-pairs", "dense")
SLICE_SIGNIFICANCES = ("binary", "equal")
# What a hardware YAML in CIM-AQ's own layout means unless it says otherwise: CIM-AQ's pricing
# (dense rows, ceil(b/c) slices, dense columns) and whole multi-bit inputs in the layers.
CIMAQ_COMPATIBILITY = {"row_tiling": "dense", "weight_slicing": "full-range", "column_placement": "dense",
                        "input_mode": "multi-bit"}


class HardwareConfigError(UserError, ValueError):
    """A hardware description with a missing, unknown or out-of-range field."""


@dataclass(frozen=True)
class HardwareConfig:
    """An RRAM crossbar accelerator as the quantizers and the cost model see it.

    rows/cols: array size (rows take inputs, columns produce outputs).
    cell_bits: bits stored per cell (slices per weight: see weight_slicing and lib.cim.crossbar).
    input_bits: DAC bits applied per cycle; an a-bit input takes ceil(a / input_bits) cycles.
    adc_bits: default ADC resolution for partial sums (a policy may override it per layer).
    write_latency / execute_latency: µs to program one array / run one MVM cycle on it.
    mapping: how signed weights are stored (offset column or differential pairs).
    weight_granularity: which weights share one learned step.
    psum_granularity: which partial sums share one learned ADC step ('off' disables the ADC model).
    n_sigma: if set, partial sums are clipped to running mean ± n_sigma·std before the ADC.
    adc_latency_model: 'fixed' (CIM-AQ: ADC time inside execute_latency) or 'sar'
        (one ADC cycle of adc_cycle_latency µs per ADC bit, added to each execute).
    input_mode: 'bit-serial' (each DAC cycle's partial sums through the ADC, shifted and added
        digitally: what the cost model prices) or 'multi-bit' (one partial sum of the whole
        input: a fast approximation for training).
    row_tiling: 'channel' (row-tiles hold whole input channels: what the layers simulate) or
        'dense' (CIM-AQ: ceil(rows / R), priced only).
    weight_slicing: 'magnitude' (differential mappings store magnitudes of a symmetric grid:
        ceil(max(b-1, 1)/c) slices; a 1-bit weight keeps {-1, 0} in one) or 'full-range'
        (CIM-AQ: ceil(b/c) slices, grid down to -2^(b-1)). The offset mapping takes ceil(b/c).
    column_placement: 'whole-pairs' (a differential pair never spans two arrays) or 'dense'
        (CIM-AQ: ceil(physical columns / C); the same unless differential-column with odd cols).
    slice_significance: 'binary' (slice s weighs 2^(s·c)) or 'equal' (differential mappings only:
        ceil(max|q| / (2^c - 1)) slices of equal weight, each a share of the magnitude; more
        columns and arrays, the devices' noise averaged over the slices).
    noise: device non-idealities of the cells (lib.cim.noise.NoiseConfig; YAML: a preset name or
        a mapping), applied only where a run asks for them (crossbar evaluation, --train-noise,
        the search's --eval-noise). Like `energy` it takes no part in equality: it changes no
        structure, and a model trained on the ideal crossbar is the same model on a noisy one.
    energy: per-operation energies and per-unit areas (lib.cim.energy_config), or None: no energy
        model. They price the hardware and change nothing the layers compute, so they take no
        part in equality (a model quantized on hardware that differs only in them is the same).
    """

    rows: int = 256
    cols: int = 256
    cell_bits: int = 4
    input_bits: int = 1
    adc_bits: int = 8
    write_latency: float = 56.0
    execute_latency: float = 1.4
    mapping: str = "differential-column"
    weight_granularity: str = "column"
    psum_granularity: str = "column"
    n_sigma: Optional[float] = None
    adc_latency_model: str = "fixed"
    adc_cycle_latency: float = 0.0
    input_mode: str = "bit-serial"
    row_tiling: str = "channel"
    weight_slicing: str = "magnitude"
    column_placement: str = "whole-pairs"
    slice_significance: str = "binary"
    noise: Optional[NoiseConfig] = field(default=None, compare=False)
    energy: Optional[EnergyConfig] = field(default=None, compare=False)

    def __post_init__(self) -> None:
        mapping = MAPPING_ALIASES.get(self.mapping, self.mapping)
        object.__setattr__(self, "mapping", mapping)
        _check_int("rows", self.rows, 1)
        _check_int("cols", self.cols, 1)
        _check_int("cell_bits", self.cell_bits, 1, 8)
        _check_int("input_bits", self.input_bits, 1, 16)
        _check_int("adc_bits", self.adc_bits, 1, 24)
        _check_choice("mapping", mapping, MAPPINGS + tuple(MAPPING_ALIASES))
        _check_choice("weight_granularity", self.weight_granularity, WEIGHT_GRANULARITIES)
        _check_choice("psum_granularity", self.psum_granularity, PSUM_GRANULARITIES)
        _check_choice("adc_latency_model", self.adc_latency_model, ADC_LATENCY_MODELS)
        _check_choice("input_mode", self.input_mode, INPUT_MODES)
        _check_choice("row_tiling", self.row_tiling, ROW_TILINGS)
        _check_choice("weight_slicing", self.weight_slicing, WEIGHT_SLICINGS)
        _check_choice("column_placement", self.column_placement, COLUMN_PLACEMENTS)
        _check_choice("slice_significance", self.slice_significance, SLICE_SIGNIFICANCES)
        if self.slice_significance == "equal" and mapping == "offset":
            raise HardwareConfigError("slice_significance='equal' is not allowed with mapping='offset': "
                                      "equal-significance slices need a differential mapping")
        if self.noise is not None:
            try:
                noise = self.noise if isinstance(self.noise, NoiseConfig) else NoiseConfig.from_value(self.noise)
            except NoiseConfigError as err:
                raise HardwareConfigError(str(err)) from None
            object.__setattr__(self, "noise", noise)
        for key in ("write_latency", "execute_latency", "adc_cycle_latency"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0 or not math.isfinite(value):
                raise HardwareConfigError(f"{key}={value!r} is not allowed: expected a finite number >= 0 (µs)")
        if self.n_sigma is not None:
            if isinstance(self.n_sigma, bool) or not isinstance(self.n_sigma, (int, float)) or not self.n_sigma > 0:
                raise HardwareConfigError(f"n_sigma={self.n_sigma!r} is not allowed: expected a number > 0 or null")
        if self.mapping == "differential-row" and self.rows < 2:
            raise HardwareConfigError(f"rows={self.rows} is not allowed with differential-row mapping: need >= 2")
        if self.mapping == "differential-column" and self.cols < 2:
            raise HardwareConfigError(f"cols={self.cols} is not allowed with differential-column mapping: need >= 2")
        if self.energy is not None:
            try:
                energy = self.energy if isinstance(self.energy, EnergyConfig) else EnergyConfig.from_dict(self.energy)
                energy.check_adc_bits(self.adc_bits)
            except EnergyConfigError as err:
                raise HardwareConfigError(str(err)) from None
            object.__setattr__(self, "energy", energy)

    # ----------------------------------------------------------------- derived
    @property
    def effective_rows(self) -> int:
        """Weight rows one array holds: differential-row spends two physical rows per weight."""
        return self.rows // 2 if self.mapping == "differential-row" else self.rows

    @property
    def adc_enabled(self) -> bool:
        return self.psum_granularity != "off"

    def simulated(self) -> "HardwareConfig":
        """The hardware the CIM layers simulate: whole-channel row tiles, differential pairs whole
        (the input mode and everything else as given)."""
        return dataclasses.replace(self, row_tiling="channel", column_placement="whole-pairs")

    def pricing_differences(self) -> dict:
        """{field: {"priced": ..., "simulated": ...}} where the layers cannot simulate what the cost
        model prices; empty when both describe the same hardware. (Placing columns densely only
        differs for differential-column pairs on arrays of odd width.)"""
        out = {}
        if self.row_tiling != "channel":
            out["row_tiling"] = {"priced": self.row_tiling, "simulated": "channel"}
        if self.column_placement == "dense" and self.mapping == "differential-column" and self.cols % 2:
            out["column_placement"] = {"priced": "dense", "simulated": "whole-pairs"}
        if self.input_mode == "multi-bit":
            out["input_mode"] = {"priced": f"bit-serial ({self.input_bits}-bit DAC cycles)",
                                 "simulated": "multi-bit"}
        return out

    def with_overrides(self, **changes: Any) -> "HardwareConfig":
        """A copy with some fields replaced (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["energy"] = self.energy.to_dict() if self.energy is not None else None
        data["noise"] = self.noise.to_dict() if self.noise is not None else None
        return data

    # ----------------------------------------------------------------- reading
    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "<dict>") -> "HardwareConfig":
        """Build from our flat layout or from CIM-AQ's nested `crossbar:`/`mapper:` layout."""
        if not isinstance(data, Mapping):
            raise HardwareConfigError(f"{source}: expected a mapping at top level, got {type(data).__name__}")
        if "crossbar" in data or "mapper" in data:
            data = _from_cim_aq_layout(data, source)
        elif _is_legacy_record(data):
            data = {**CIMAQ_COMPATIBILITY, **data}
        allowed = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise HardwareConfigError(
                f"{source}: unknown key(s) {unknown}; allowed keys are {sorted(allowed)}")
        try:
            return cls(**dict(data))
        except HardwareConfigError as err:
            raise HardwareConfigError(f"{source}: {err}") from None

    @classmethod
    def from_yaml(cls, path: str | Path) -> "HardwareConfig":
        path = Path(path)
        if not path.is_file():
            raise HardwareConfigError(f"hardware config {str(path)!r} does not exist")
        with open(path) as handle:
            try:
                data = yaml.safe_load(handle)
            except yaml.YAMLError as err:
                mark = getattr(err, "problem_mark", None)
                where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
                problem = getattr(err, "problem", None) or str(err).splitlines()[0]
                raise HardwareConfigError(f"hardware config {str(path)!r}{where} is not valid YAML: {problem}") from None
        return cls.from_dict(data or {}, source=str(path))

    def to_yaml(self, path: str | Path) -> None:
        with open(path, "w") as handle:
            yaml.safe_dump(self.to_dict(), handle, sort_keys=False)

    def check_kernel_fits(self, kernel_elems: int, layer_name: str = "layer") -> None:
        """A conv tile holds whole input channels: one kernel (k_h·k_w rows) must fit in an array."""
        if kernel_elems > self.effective_rows:
            raise HardwareConfigError(
                f"{layer_name}: one kernel needs {kernel_elems} rows but an array holds "
                f"{self.effective_rows} weight rows (rows={self.rows}, mapping={self.mapping}); "
                f"allowed: rows >= kernel size — exclude this layer or use larger arrays")


_LEGACY_FIELDS = ("rows", "cols", "cell_bits", "input_bits", "adc_bits", "write_latency", "execute_latency",
                  "mapping", "weight_granularity", "psum_granularity", "n_sigma", "adc_latency_model",
                  "adc_cycle_latency")


def _is_legacy_record(data: Mapping[str, Any]) -> bool:
    """A complete record written by `to_dict` before the modelling fields existed (a checkpoint's):
    it meant CIM-AQ's counting and multi-bit inputs, and is read with that meaning."""
    return set(data) == set(_LEGACY_FIELDS)


def _check_int(key: str, value: Any, low: int, high: Optional[int] = None) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low and (high is None or value <= high)
    if not ok:
        allowed = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
        raise HardwareConfigError(f"{key}={value!r} is not allowed: expected {allowed}")


def _check_choice(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise HardwareConfigError(f"{key}={value!r} is not allowed: expected one of {list(allowed)}")


_CIMAQ_CROSSBAR_KEYS = {
    "resolution_weight_bits": "cell_bits",
    "resolution_input_bits": "input_bits",
    "mvm_write_latency": "write_latency",
    "mvm_execute_latency": "execute_latency",
}


def _from_cim_aq_layout(data: Mapping[str, Any], source: str) -> dict:
    """Translate CIM-AQ's `crossbar.size.m/n, resolution_*, mvm_*, mapper.mapping_type` layout.

    CIM-AQ's m is the number of columns (outputs) and n the number of rows (inputs).
    Keys of our own flat layout may sit beside `crossbar:`/`mapper:` to extend it; the modelling
    fields not given take CIM-AQ's meaning (CIMAQ_COMPATIBILITY).
    """
    flat = dict(CIMAQ_COMPATIBILITY)
    flat.update({k: v for k, v in data.items() if k not in ("crossbar", "mapper")})
    crossbar = dict(data.get("crossbar") or {})
    size = crossbar.pop("size", {}) or {}
    unknown_size = sorted(set(size) - {"m", "n"})
    if unknown_size:
        raise HardwareConfigError(f"{source}: unknown key(s) crossbar.size.{unknown_size}; allowed: m, n")
    if "m" in size:
        flat["cols"] = size["m"]
    if "n" in size:
        flat["rows"] = size["n"]
    for key, value in crossbar.items():
        if key not in _CIMAQ_CROSSBAR_KEYS:
            raise HardwareConfigError(
                f"{source}: unknown key crossbar.{key}; allowed: size, {', '.join(_CIMAQ_CROSSBAR_KEYS)}")
        flat[_CIMAQ_CROSSBAR_KEYS[key]] = value
    mapper = dict(data.get("mapper") or {})
    for key, value in mapper.items():
        if key != "mapping_type":
            raise HardwareConfigError(f"{source}: unknown key mapper.{key}; allowed: mapping_type")
        flat["mapping"] = value
    return flat
