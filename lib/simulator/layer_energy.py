"""Energy and area of one layer at given bits, counted from the same `CrossbarPlan` the latency
model and the CIM layers read (lib.cim.crossbar), times the hardware's per-operation figures.

Per image, for `repeat` matrix copies and I invocations (output pixels or tokens):

    conversions  = repeat · I · cycles · row_tiles · read-out columns       × E_adc(adc_bits)
    row drives   = repeat · I · cycles · rows · col_tiles                   × E_dac
    array reads  = repeat · I · cycles · tiles        (= the executes)
    cell reads   = repeat · I · cycles · rows · columns                     × E_array / (R · C)
    shift-adds   = conversions (+ repeat · I · m reference subtractions for offset)  × E_shift_add
    cells        = repeat · rows · columns            (× E_write if written per inference)
    ADCs         = repeat · tiles · ⌈read-outs per array / adc_share⌉       × A_adc(adc_bits)
    area         = repeat · tiles · A_array + ADCs · A_adc

cycles = ⌈a_bit / input_bits⌉ DAC cycles (priced bit-serially in both input modes, as the
latency is); rows / columns are the physical ones of one copy (differential-row doubles rows,
differential-column doubles columns but reads each pair as one difference); every array a
layer's rows span is driven separately, hence rows · col_tiles. An array read costs
`array_read_pj` for a full R×C array and its share of the cells for a part of one (a layer's
tiles together hold rows · columns cells), so a small layer on a large array is not charged for
cells it does not use.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

from lib.cim.energy_config import EnergyConfigError
from lib.cim.hardware import HardwareConfig
from lib.simulator.crossbar_cost import CostError, check_bits, plan_for
from lib.simulator.layer_dims import LayerDims

ENERGY_PARTS = ("adc", "dac", "array", "digital", "write")


def _ceil_div(a: int, b: int) -> int:
    return -(-int(a) // int(b))


@dataclass(frozen=True)
class LayerEnergy:
    """One layer's operation counts, energy (pJ per image, split by part) and area (µm²)."""

    name: str
    w_bit: int
    a_bit: int
    adc_bits: int
    conversions: int
    row_drives: int
    array_reads: int
    cell_reads: int
    shift_adds: int
    cells: int
    cells_written: int
    arrays: int
    adcs: int
    adc_pj: float
    dac_pj: float
    array_pj: float
    digital_pj: float
    write_pj: float
    array_area_um2: float
    adc_area_um2: float

    @property
    def energy_pj(self) -> float:
        return self.adc_pj + self.dac_pj + self.array_pj + self.digital_pj + self.write_pj

    @property
    def area_um2(self) -> float:
        return self.array_area_um2 + self.adc_area_um2

    def split(self) -> dict:
        """{part: pJ} over ENERGY_PARTS."""
        return {part: getattr(self, f"{part}_pj") for part in ENERGY_PARTS}

    def to_dict(self) -> dict:
        return {**asdict(self), "energy_pj": self.energy_pj, "area_um2": self.area_um2}


def layer_energy(dims: LayerDims, hw: HardwareConfig, w_bit: int, a_bit: int,
                 adc_bits: Optional[int] = None) -> LayerEnergy:
    """Counts, energy and area of `dims` on `hw` (which must have an energy section)."""
    energy = hw.energy
    if energy is None:
        raise CostError(f"{dims.name}: the hardware has no `energy` section, so energy cannot be priced")
    w_bit = check_bits(dims.name, "w_bit", w_bit)
    a_bit = check_bits(dims.name, "a_bit", a_bit)
    adc_bits = hw.adc_bits if adc_bits is None else check_bits(dims.name, "adc_bits", adc_bits)
    try:
        energy.check_adc_bits(adc_bits, f"{dims.name}: adc_bits")
    except EnergyConfigError as err:
        raise CostError(str(err)) from None

    plan = plan_for(dims, hw, w_bit, a_bit)
    per_image = dims.repeat * dims.invocations
    cycles, tiles = plan.input_cycles, plan.tiles
    conversions = per_image * plan.adc_conversions
    row_drives = per_image * cycles * plan.rows * plan.col_tiles
    array_reads = per_image * cycles * tiles
    cell_reads = per_image * cycles * plan.rows * plan.columns
    shift_adds = conversions + (0 if plan.differential else per_image * dims.m)
    cells = dims.repeat * plan.rows * plan.columns
    cells_written = cells if energy.write_per_inference else 0
    arrays = dims.repeat * tiles
    readouts_per_array = max(1, hw.cols // plan.column_width)
    adcs = arrays * _ceil_div(readouts_per_array, energy.adc_share)
    return LayerEnergy(
        name=dims.name, w_bit=w_bit, a_bit=a_bit, adc_bits=adc_bits, conversions=conversions,
        row_drives=row_drives, array_reads=array_reads, cell_reads=cell_reads, shift_adds=shift_adds, cells=cells,
        cells_written=cells_written, arrays=arrays, adcs=adcs,
        adc_pj=conversions * energy.adc_energy_pj.at(adc_bits),
        dac_pj=row_drives * energy.dac_pj,
        array_pj=cell_reads * (energy.array_read_pj / (hw.rows * hw.cols)),
        digital_pj=shift_adds * energy.shift_add_pj,
        write_pj=cells_written * (energy.cell_write_pj or 0.0),
        array_area_um2=arrays * energy.array_area_um2,
        adc_area_um2=adcs * energy.adc_area_um2.at(adc_bits))
