"""Read and write CIM-AQ's `layer_dimensions` YAML, so users can bring or inspect their own dims.

Format: a top key `layer_dimensions:` holding one entry per table row, in call order:
`{type: Conv2D|Dense|MatMul, output_dim, input_dim, mvm_invocations (default 1),
repeat_factor (default 1)}`; values are integers or products of integers such as '64*3*3'
(parsed here without eval). We also write and accept an optional `name` per entry.
Note: input_dim of a conv is C_in/groups·k_h·k_w (the weight's row count), not C·H·W.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Sequence

import yaml

from lib.fileio import atomic_write
from lib.simulator.layer_dims import LAYER_TYPES, LayerDims, LayerDimsError

ENTRY_KEYS = ("name", "type", "output_dim", "input_dim", "mvm_invocations", "repeat_factor")
_PRODUCT = re.compile(r"\s*\d+(\s*\*\s*\d+)*\s*")


def parse_dim(value: Any, where: str = "value") -> int:
    """An integer >= 1 from an int or a string product of integers like '64*3*3' (no eval)."""
    if isinstance(value, bool):
        raise LayerDimsError(f"{where}: {value!r} is not a dimension: expected an integer or a product like '64*3*3'")
    if isinstance(value, int):
        result = value
    elif isinstance(value, str) and _PRODUCT.fullmatch(value):
        result = 1
        for factor in value.split("*"):
            result *= int(factor)
    else:
        raise LayerDimsError(
            f"{where}: {value!r} is not a dimension: expected an integer or a product of integers like '64*3*3'")
    if result < 1:
        raise LayerDimsError(f"{where}: {value!r} evaluates to {result}: expected >= 1")
    return result


def _canonical_type(value: Any, where: str) -> str:
    lookup = {t.lower(): t for t in LAYER_TYPES}
    if not isinstance(value, str) or value.lower() not in lookup:
        raise LayerDimsError(f"{where}: type={value!r} is not allowed: expected one of {list(LAYER_TYPES)}")
    return lookup[value.lower()]


def layer_dims_from_entries(entries: Sequence[Any], source: str = "<entries>") -> list[LayerDims]:
    """LayerDims from parsed `layer_dimensions` entries (CIM-AQ semantics and defaults)."""
    if not isinstance(entries, (list, tuple)) or not entries:
        raise LayerDimsError(f"{source}: `layer_dimensions` must be a non-empty list of layer entries")
    dims = []
    for index, entry in enumerate(entries):
        where = f"{source}: layer_dimensions[{index}]"
        if not isinstance(entry, dict):
            raise LayerDimsError(f"{where}: expected a mapping, got {type(entry).__name__}")
        unknown = sorted(set(entry) - set(ENTRY_KEYS))
        if unknown:
            raise LayerDimsError(f"{where}: unknown key(s) {unknown}; allowed keys are {list(ENTRY_KEYS)}")
        for key in ("output_dim", "input_dim"):
            if key not in entry:
                raise LayerDimsError(f"{where}: missing key {key!r}")
        layer_type = _canonical_type(entry.get("type", "Dense"), where)
        name = entry.get("name", f"layer{index}")
        if not isinstance(name, str) or not name:
            raise LayerDimsError(f"{where}: name={name!r} is not allowed: expected a non-empty string")
        dims.append(LayerDims(
            name=name, type=layer_type,
            m=parse_dim(entry["output_dim"], f"{where} output_dim"),
            n=parse_dim(entry["input_dim"], f"{where} input_dim"),
            invocations=parse_dim(entry.get("mvm_invocations", 1), f"{where} mvm_invocations"),
            repeat=parse_dim(entry.get("repeat_factor", 1), f"{where} repeat_factor"),
            quantizable=layer_type != "MatMul"))
    return dims


def read_layer_dims(path: str | Path) -> list[LayerDims]:
    """Load a CIM-AQ-format layer dims YAML (rows in the file's order)."""
    path = Path(path)
    if not path.is_file():
        raise LayerDimsError(f"layer dims file {str(path)!r} does not exist")
    try:
        with open(path) as handle:
            data = yaml.safe_load(handle)
    except yaml.YAMLError as err:
        raise LayerDimsError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict) or "layer_dimensions" not in data:
        raise LayerDimsError(f"{path}: expected a top-level key `layer_dimensions:` with a list of layers")
    unknown = sorted(set(data) - {"layer_dimensions"})
    if unknown:
        raise LayerDimsError(f"{path}: unknown top-level key(s) {unknown}; allowed: layer_dimensions")
    return layer_dims_from_entries(data["layer_dimensions"], source=str(path))


def layer_dims_to_entries(dims: Sequence[LayerDims]) -> list[dict]:
    return [{"name": d.name, "type": d.type, "output_dim": d.m, "input_dim": d.n,
             "mvm_invocations": d.invocations, "repeat_factor": d.repeat} for d in dims]


def write_layer_dims(dims: Sequence[LayerDims], path: str | Path, header: str = "") -> Path:
    """Write dims in CIM-AQ's format (plus `name`), atomically; `header` becomes a comment block."""
    comment = "".join(f"# {line}\n" for line in header.splitlines()) if header else ""
    text = comment + yaml.safe_dump({"layer_dimensions": layer_dims_to_entries(dims)}, sort_keys=False)
    return atomic_write(path, lambda handle: handle.write(text))
