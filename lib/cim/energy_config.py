"""The per-operation energies and per-unit areas of a crossbar accelerator (the hardware YAML's
`energy:` section), validated once when the hardware is read.

A hardware without this section has no energy model: the cost model then reports energy and
area as unavailable instead of inventing figures. The ADC's energy per conversion and its area
depend on its resolution B; `BitCurve` gives them as a function of B:
- `sar`: per_bit·B + per_level·2^B (B comparator decisions, plus a capacitor DAC of 2^B unit
  capacitors: close to linear in B at low resolution);
- `flash`: per_level·(2^B − 1) (one comparator per threshold);
- `table`: explicit {bits: value}; bits outside the table cannot be priced;
- `neurosim` (energy only): NeuroSim's SAR form, (a·B + b + c / R_col) µW for (B + 1) cycles of
  cycle_ns each.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from lib.errors import UserError

CURVE_MODELS = ("sar", "flash", "table", "neurosim")
CURVE_KEYS = {"sar": ("per_bit", "per_level"), "flash": ("per_level",), "table": ("values",),
              "neurosim": ("a_uw", "b_uw", "c_uw_ohm", "column_resistance_ohm", "cycle_ns")}
REQUIRED_CURVE_KEYS = {"sar": ("per_bit",), "flash": ("per_level",), "table": ("values",),
                       "neurosim": CURVE_KEYS["neurosim"]}
ENERGY_KEYS = ("adc_energy_pj", "adc_area_um2", "adc_share", "dac_pj", "array_read_pj", "array_area_um2",
               "shift_add_pj", "write_per_inference", "cell_write_pj")
OPTIONAL_ENERGY_KEYS = ("write_per_inference", "cell_write_pj")


class EnergyConfigError(UserError, ValueError):
    """An `energy:` section with a missing, unknown or out-of-range field."""


def _number(key: str, value: Any, positive: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and \
        (value > 0 if positive else value >= 0)
    if not ok:
        raise EnergyConfigError(f"{key}={value!r} is not allowed: expected a finite number "
                                f"{'> 0' if positive else '>= 0'}")
    return float(value)


def _bits_key(key: str, bits: Any) -> int:
    """A table's bits: an integer >= 1, also written as a digit string (JSON object keys)."""
    if isinstance(bits, str) and bits.strip().isdigit():
        bits = int(bits)
    if not isinstance(bits, int) or isinstance(bits, bool) or bits < 1:
        raise EnergyConfigError(f"{key}: bits {bits!r} are not allowed: expected integers >= 1 as table keys")
    return bits


@dataclass(frozen=True)
class BitCurve:
    """A per-ADC quantity (pJ per conversion, or µm² per ADC) as a function of the ADC's bits."""

    model: str
    per_bit: float = 0.0
    per_level: float = 0.0
    values: tuple = ()            # table: ((bits, value), ...) in ascending bits
    a_uw: float = 0.0             # neurosim: power a·B + b + c / R_col (µW) ...
    b_uw: float = 0.0
    c_uw_ohm: float = 0.0
    column_resistance_ohm: float = 1.0
    cycle_ns: float = 0.0         # ... for B + 1 cycles of cycle_ns

    @classmethod
    def from_dict(cls, key: str, data: Any, models: tuple = CURVE_MODELS) -> "BitCurve":
        if isinstance(data, BitCurve):
            return data
        if not isinstance(data, Mapping):
            raise EnergyConfigError(f"{key}={data!r} is not allowed: expected a mapping with `model` "
                                    f"(one of {list(models)}) and its parameters")
        model = data.get("model")
        if model not in models:
            raise EnergyConfigError(f"{key}.model={model!r} is not allowed: expected one of {list(models)}")
        allowed = CURVE_KEYS[model]
        unknown = sorted(set(data) - {"model", *allowed})
        if unknown:
            raise EnergyConfigError(f"{key}: unknown key(s) {unknown} for model {model!r}; allowed: "
                                    f"{['model', *allowed]}")
        missing = [k for k in REQUIRED_CURVE_KEYS[model] if data.get(k) is None]
        if missing:
            raise EnergyConfigError(f"{key}: model {model!r} needs {missing}")
        if model == "table":
            table = data["values"]
            if isinstance(table, Mapping):
                table = list(table.items())
            if not isinstance(table, (list, tuple)) or not table:
                raise EnergyConfigError(f"{key}.values={data['values']!r} is not allowed: expected a non-empty "
                                        f"mapping {{bits: value}}")
            pairs = {}
            for entry in table:
                if not isinstance(entry, (list, tuple)) or len(entry) != 2:
                    raise EnergyConfigError(f"{key}.values: entry {entry!r} is not a (bits, value) pair")
                bits = _bits_key(f"{key}.values", entry[0])
                if bits in pairs:
                    raise EnergyConfigError(f"{key}.values: bits {bits} given twice")
                pairs[bits] = _number(f"{key}.values[{bits}]", entry[1])
            return cls(model, values=tuple(sorted(pairs.items())))
        numbers = {k: _number(f"{key}.{k}", data[k], positive=(k == "column_resistance_ohm"))
                   for k in allowed if data.get(k) is not None}
        return cls(model, **numbers)

    def covers(self, bits: int) -> bool:
        """Whether this curve has a value at `bits` (a table only at its own entries)."""
        return bits >= 1 and (self.model != "table" or bits in dict(self.values))

    def at(self, bits: int) -> float:
        """The value at `bits` ADC bits (a table's bits must be in it)."""
        if self.model == "sar":
            return self.per_bit * bits + self.per_level * 2.0 ** bits
        if self.model == "flash":
            return self.per_level * (2.0 ** bits - 1)
        if self.model == "table":
            table = dict(self.values)
            if bits not in table:
                raise EnergyConfigError(f"ADC bits {bits} are not in the hardware's table (bits "
                                        f"{sorted(table)}): add them to the table or use a `sar`/`flash` model")
            return table[bits]
        power_uw = self.a_uw * bits + self.b_uw + self.c_uw_ohm / self.column_resistance_ohm
        return power_uw * (bits + 1) * self.cycle_ns * 1e-3  # µW · ns = fJ -> pJ

    def to_dict(self) -> dict:
        """The YAML form: `model` and its own parameters only."""
        if self.model == "table":
            return {"model": "table", "values": {bits: value for bits, value in self.values}}
        return {"model": self.model, **{k: getattr(self, k) for k in CURVE_KEYS[self.model]}}


@dataclass(frozen=True)
class EnergyConfig:
    """Per-operation energy (pJ) and per-unit area (µm²) of the crossbar and its periphery.

    adc_energy_pj / adc_area_um2: one conversion / one ADC, as functions of the ADC bits.
    adc_share: read-out columns multiplexed onto one ADC (ADCs per array = ⌈read-outs / adc_share⌉).
    dac_pj: one row driven for one input cycle (the hardware's input_bits-bit DAC).
    array_read_pj: one full array read for one MVM cycle (a read of part of an array costs its
        share of the cells); array_area_um2: one array.
    shift_add_pj: one shift-and-add of a converted partial sum into its accumulator.
    write_per_inference: whether every image programs the weights again (what CIM-AQ's latency
        counts with its write term); then each stored cell costs cell_write_pj per image.
    """

    adc_energy_pj: BitCurve
    adc_area_um2: BitCurve
    adc_share: int
    dac_pj: float
    array_read_pj: float
    array_area_um2: float
    shift_add_pj: float
    write_per_inference: bool = False
    cell_write_pj: Optional[float] = None

    @classmethod
    def from_dict(cls, data: Any) -> "EnergyConfig":
        """Validate the `energy:` mapping: every key known, every required key given."""
        if not isinstance(data, Mapping):
            raise EnergyConfigError(f"energy={data!r} is not allowed: expected a mapping of {list(ENERGY_KEYS)}")
        unknown = sorted(set(data) - set(ENERGY_KEYS))
        if unknown:
            raise EnergyConfigError(f"unknown key(s) {['energy.' + k for k in unknown]}; allowed keys of `energy` "
                                    f"are {list(ENERGY_KEYS)}")
        missing = [k for k in ENERGY_KEYS if k not in OPTIONAL_ENERGY_KEYS and data.get(k) is None]
        if missing:
            raise EnergyConfigError(f"energy: missing key(s) {missing}; an energy model needs every per-operation "
                                    f"figure (omit the whole `energy` section to price latency only)")
        share = data["adc_share"]
        if not isinstance(share, int) or isinstance(share, bool) or share < 1:
            raise EnergyConfigError(f"energy.adc_share={share!r} is not allowed: expected an integer >= 1 "
                                    f"(read-out columns per ADC)")
        per_inference = data.get("write_per_inference", False)
        if not isinstance(per_inference, bool):
            raise EnergyConfigError(f"energy.write_per_inference={per_inference!r} is not allowed: expected "
                                    f"true or false")
        cell_write = data.get("cell_write_pj")
        if cell_write is not None:
            cell_write = _number("energy.cell_write_pj", cell_write)
        if per_inference and cell_write is None:
            raise EnergyConfigError("energy.write_per_inference=true needs energy.cell_write_pj (pJ to program "
                                    "one cell)")
        return cls(
            adc_energy_pj=BitCurve.from_dict("energy.adc_energy_pj", data["adc_energy_pj"]),
            adc_area_um2=BitCurve.from_dict("energy.adc_area_um2", data["adc_area_um2"],
                                            models=("sar", "flash", "table")),
            adc_share=share,
            dac_pj=_number("energy.dac_pj", data["dac_pj"]),
            array_read_pj=_number("energy.array_read_pj", data["array_read_pj"]),
            array_area_um2=_number("energy.array_area_um2", data["array_area_um2"]),
            shift_add_pj=_number("energy.shift_add_pj", data["shift_add_pj"]),
            write_per_inference=per_inference, cell_write_pj=cell_write)

    def check_adc_bits(self, bits: int, what: str = "adc_bits") -> None:
        """Refuse ADC bits that a table curve has no value for."""
        for key, curve in (("adc_energy_pj", self.adc_energy_pj), ("adc_area_um2", self.adc_area_um2)):
            if not curve.covers(bits):
                raise EnergyConfigError(f"{what}={bits} is not allowed: energy.{key} is a table of bits "
                                        f"{[b for b, _ in curve.values]}")

    def to_dict(self) -> dict:
        return {"adc_energy_pj": self.adc_energy_pj.to_dict(), "adc_area_um2": self.adc_area_um2.to_dict(),
                "adc_share": self.adc_share, "dac_pj": self.dac_pj, "array_read_pj": self.array_read_pj,
                "array_area_um2": self.array_area_um2, "shift_add_pj": self.shift_add_pj,
                "write_per_inference": self.write_per_inference, "cell_write_pj": self.cell_write_pj}
