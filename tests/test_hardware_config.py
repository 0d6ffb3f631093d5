"""HardwareConfig: both YAML layouts, validation errors that name key, value and what is allowed."""
from pathlib import Path

import pytest

from lib.cim import HardwareConfig, HardwareConfigError
from lib.cim.crossbar import CrossbarPlan
from lib.cim.layers import CIMConv2d

ROOT = Path(__file__).resolve().parents[1]


def _slices(hw: HardwareConfig, w_bit: int) -> int:
    return CrossbarPlan(hw, 1, 8, 8, 9, w_bit, 8).slices


def test_slice_count_follows_the_documented_rule():
    """HardwareConfig's docstring: magnitude slicing of a differential mapping takes
    ceil(max(b-1, 1)/c) slices (one for a 1-bit weight), full-range and offset ceil(b/c)."""
    for cell_bits in range(1, 9):
        for mapping in ("offset", "differential-column", "differential-row"):
            for slicing in ("magnitude", "full-range"):
                hw = HardwareConfig(cell_bits=cell_bits, mapping=mapping, weight_slicing=slicing)
                for w_bit in range(1, 17):
                    stored = max(w_bit - 1, 1) if mapping != "offset" and slicing == "magnitude" else w_bit
                    assert _slices(hw, w_bit) == -(-stored // cell_bits), (cell_bits, mapping, slicing, w_bit)


def test_shipped_cim_aq_layout_reads_unchanged_with_cim_aq_counting():
    hw = HardwareConfig.from_yaml(ROOT / "run/hardware/cim_aq_default.yaml")
    assert (hw.rows, hw.cols, hw.cell_bits, hw.input_bits) == (256, 256, 4, 1)
    assert (hw.write_latency, hw.execute_latency, hw.mapping) == (56, 1.4, "differential-column")
    assert (hw.row_tiling, hw.weight_slicing, hw.column_placement) == ("dense", "full-range", "dense")
    assert _slices(hw, 5) == 2  # ceil(5 / 4), as CIM-AQ prices it
    # what the layers cannot simulate is named: dense rows, and the multi-bit input approximation
    assert set(hw.pricing_differences()) == {"row_tiling", "input_mode"}


def test_shipped_own_layout_yamls_default_to_the_faithful_model():
    default = HardwareConfig.from_yaml(ROOT / "run/hardware/default.yaml")
    cim_aq = HardwareConfig.from_yaml(ROOT / "run/hardware/cim_aq_default.yaml")
    assert all(getattr(default, key) == getattr(cim_aq, key) for key in
               ("rows", "cols", "cell_bits", "input_bits", "write_latency", "execute_latency", "mapping"))
    hw = HardwareConfig.from_yaml(ROOT / "run/hardware/cell2bit.yaml")
    assert hw.cell_bits == 2 and _slices(hw, 5) == 2 and hw.psum_granularity == "column"
    for faithful in (default, hw, HardwareConfig()):
        assert faithful.input_mode == "bit-serial" and faithful.pricing_differences() == {}
    # a flat YAML key beside CIM-AQ's layout overrides the compatibility meaning
    mixed = HardwareConfig.from_dict({"crossbar": {"size": {"m": 8, "n": 8}}, "row_tiling": "channel"})
    assert mixed.row_tiling == "channel" and mixed.weight_slicing == "full-range"


@pytest.mark.parametrize("mapping, slicing, expected", [
    ("offset", "magnitude", [1, 1, 1, 1, 2, 2, 2, 2]),             # ceil(b / 4)
    ("dc", "magnitude", [1, 1, 1, 1, 1, 2, 2, 2]),                 # ceil((b-1) / 4); 1 bit keeps 1 slice
    ("dr", "magnitude", [1, 1, 1, 1, 1, 2, 2, 2]),
    ("dc", "full-range", [1, 1, 1, 1, 2, 2, 2, 2]),
])
def test_slice_count_follows_mapping_and_slicing(mapping, slicing, expected):
    hw = HardwareConfig(mapping=mapping, weight_slicing=slicing)
    assert [_slices(hw, b) for b in range(1, 9)] == expected


@pytest.mark.parametrize("alias,full", [("of", "offset"), ("dc", "differential-column"), ("dr", "differential-row")])
def test_mapping_aliases(alias, full):
    hw = HardwareConfig(mapping=alias)
    assert hw.mapping == full
    assert hw.effective_rows == (128 if full == "differential-row" else 256)


@pytest.mark.parametrize("changes,pattern", [
    ({"cell_bits": 0}, r"cell_bits=0 is not allowed: expected an integer in \[1, 8\]"),
    ({"adc_bits": 0}, r"adc_bits=0 is not allowed"),
    ({"mapping": "diagonal"}, r"mapping='diagonal' is not allowed: expected one of \['offset'"),
    ({"weight_granularity": "row"}, r"weight_granularity='row' is not allowed"),
    ({"psum_granularity": "tile"}, r"psum_granularity='tile' is not allowed"),
    ({"n_sigma": -1}, r"n_sigma=-1 is not allowed"),
    ({"rows": 0}, r"rows=0 is not allowed"),
    ({"execute_latency": -2.0}, r"execute_latency=-2.0 is not allowed"),
    ({"input_mode": "serial"}, r"input_mode='serial' is not allowed: expected one of \['bit-serial', 'multi-bit'\]"),
    ({"row_tiling": "sparse"}, r"row_tiling='sparse' is not allowed"),
    ({"weight_slicing": "narrow"}, r"weight_slicing='narrow' is not allowed"),
    ({"column_placement": "split"}, r"column_placement='split' is not allowed"),
    ({"cols": 1, "mapping": "dc"}, r"cols=1 is not allowed with differential-column"),
])
def test_bad_values_name_key_value_and_allowed(changes, pattern):
    with pytest.raises(HardwareConfigError, match=pattern):
        HardwareConfig(**changes)


def test_unknown_keys_are_errors_in_both_layouts(tmp_path):
    path = tmp_path / "hw.yaml"
    path.write_text("rows: 128\ncolumns: 128\n")
    with pytest.raises(HardwareConfigError, match=r"unknown key\(s\) \['columns'\]"):
        HardwareConfig.from_yaml(path)
    path.write_text("crossbar:\n  size: {m: 64, n: 64}\n  resolution_weight_bit: 2\n")
    with pytest.raises(HardwareConfigError, match="unknown key crossbar.resolution_weight_bit"):
        HardwareConfig.from_yaml(path)
    with pytest.raises(HardwareConfigError, match="does not exist"):
        HardwareConfig.from_yaml(tmp_path / "missing.yaml")


def test_rows_smaller_than_one_kernel_is_an_error():
    with pytest.raises(HardwareConfigError, match="one kernel needs 9 rows but an array holds 8"):
        CIMConv2d(4, 4, 3, hw=HardwareConfig(rows=8))
    with pytest.raises(HardwareConfigError, match="holds 4 weight rows"):
        CIMConv2d(4, 4, 3, hw=HardwareConfig(rows=8, mapping="dr"))


def test_a_record_written_before_the_modelling_fields_keeps_its_meaning():
    """Checkpoints store `to_dict()`; one from before input_mode/row_tiling/weight_slicing/
    column_placement existed meant CIM-AQ's counting and multi-bit inputs, and still does."""
    record = {k: v for k, v in HardwareConfig().to_dict().items()
              if k not in ("input_mode", "row_tiling", "weight_slicing", "column_placement", "slice_significance",
                           "noise", "energy")}
    old = HardwareConfig.from_dict(record)
    assert (old.input_mode, old.row_tiling, old.weight_slicing, old.column_placement) == \
        ("multi-bit", "dense", "full-range", "dense")
    assert HardwareConfig.from_dict(old.to_dict()) == old                     # round trip
    assert HardwareConfig.from_dict(HardwareConfig().to_dict()) == HardwareConfig()
    partial = {k: record[k] for k in ("rows", "cols", "cell_bits")}            # a hand-written YAML
    assert HardwareConfig.from_dict(partial).input_mode == "bit-serial"
