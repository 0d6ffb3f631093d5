"""Mixed-precision policies: per quantizable layer (call order) its weight, input and ADC bits.

Stored as `policy.npy` (int array L×2 or L×3, CIM-AQ's format: columns w_bit, a_bit[, adc_bits])
and `policy.json` (the same plus layer names and context such as hardware, cost and accuracy).
Inside, rows follow call order. A `.npy` file's rows follow the model's layer *construction*
order, as CIM-AQ's do (see lib.layer_trace.layer_order): `load(path, order)` and
`save(path, order)` translate; the `.json` names every row, so it needs no translation.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np

from lib.bit_limits import check_bits
from lib.fileio import atomic_write
from lib.errors import UserError

if TYPE_CHECKING:  # only a type here; importing lib.layer_trace would pull in torch
    from lib.layer_trace import LayerOrder

MAX_BITS = 32  # widest a policy file may state; what the CIM layers support is check_supported's business


class PolicyError(UserError, ValueError):
    """A policy that is malformed or does not fit the model it is applied to."""


def whole_bits(value, column: str, index: int) -> int:
    """`value` as an int bit width: integers, and floats with no fraction (CIM-AQ's float arrays); never
    booleans, fractions or strings."""
    integral = isinstance(value, (int, np.integer)) or (isinstance(value, (float, np.floating))
                                                        and float(value).is_integer())
    if isinstance(value, (bool, np.bool_)) or not integral:
        raise PolicyError(f"layer {index}: {column}={value!r} is not allowed: bit widths are whole numbers "
                          f"(not booleans, fractions or text)")
    return int(value)


@dataclass
class Policy:
    """Bits per quantizable layer, in call order; `adc_bits` is optional (None = hardware default)."""

    w_bits: list[int]
    a_bits: list[int]
    adc_bits: Optional[list[int]] = None
    layer_names: Optional[list[str]] = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.w_bits = [whole_bits(b, "w_bit", i) for i, b in enumerate(self.w_bits)]
        self.a_bits = [whole_bits(b, "a_bit", i) for i, b in enumerate(self.a_bits)]
        if self.adc_bits is not None:
            self.adc_bits = [whole_bits(b, "adc_bits", i) for i, b in enumerate(self.adc_bits)]
        n = len(self.w_bits)
        if len(self.a_bits) != n or (self.adc_bits is not None and len(self.adc_bits) != n):
            raise PolicyError(
                f"policy columns differ in length: w_bits {len(self.w_bits)}, a_bits {len(self.a_bits)}"
                + (f", adc_bits {len(self.adc_bits)}" if self.adc_bits is not None else ""))
        if self.layer_names is not None and len(self.layer_names) != n:
            raise PolicyError(f"policy has {n} layers but {len(self.layer_names)} layer names")
        for column, bits in (("w_bit", self.w_bits), ("a_bit", self.a_bits), ("adc_bits", self.adc_bits or [])):
            for index, bit in enumerate(bits):
                if not 1 <= bit <= MAX_BITS:
                    raise PolicyError(f"layer {index}: {column}={bit} is not allowed: expected 1..{MAX_BITS}")

    def __len__(self) -> int:
        return len(self.w_bits)

    @classmethod
    def uniform(cls, n_layers_or_names: int | Sequence[str], w_bit: int, a_bit: int,
                adc_bits: Optional[int] = None) -> "Policy":
        names = None if isinstance(n_layers_or_names, int) else list(n_layers_or_names)
        n = n_layers_or_names if names is None else len(names)
        adc = None if adc_bits is None else [adc_bits] * n
        return cls([w_bit] * n, [a_bit] * n, adc, names)

    def layer(self, index: int) -> tuple[int, int, Optional[int]]:
        adc = None if self.adc_bits is None else self.adc_bits[index]
        return self.w_bits[index], self.a_bits[index], adc

    def as_array(self) -> np.ndarray:
        columns = [self.w_bits, self.a_bits] + ([self.adc_bits] if self.adc_bits is not None else [])
        return np.asarray(columns, dtype=np.int64).T.reshape(len(self), len(columns))

    # ------------------------------------------------------------ validation
    def check_matches(self, layer_names: Sequence[str]) -> None:
        """Refuse a policy whose length or (when it has them) layer names differ from the model's."""
        layer_names = list(layer_names)
        if len(self) != len(layer_names):
            raise PolicyError(
                f"policy has {len(self)} layers but the model has {len(layer_names)} quantizable layers "
                f"(call order: {layer_names[:3]}{' ...' if len(layer_names) > 3 else ''})")
        if self.layer_names is not None and list(self.layer_names) != layer_names:
            diffs = [(i, a, b) for i, (a, b) in enumerate(zip(self.layer_names, layer_names)) if a != b]
            i, ours, theirs = diffs[0]
            raise PolicyError(
                f"policy layer {i} is {ours!r} but the model's layer {i} is {theirs!r} "
                f"({len(diffs)} name(s) differ)")

    # ------------------------------------------------------------ files
    def to_json_dict(self) -> dict:
        layers = []
        for i in range(len(self)):
            entry = {"w_bit": self.w_bits[i], "a_bit": self.a_bits[i]}
            if self.layer_names is not None:
                entry = {"name": self.layer_names[i], **entry}
            if self.adc_bits is not None:
                entry["adc_bits"] = self.adc_bits[i]
            layers.append(entry)
        return {"layers": layers, **self.meta}

    def save(self, path: str | Path, order: Optional["LayerOrder"] = None) -> tuple[Path, Path]:
        """Write `<stem>.npy` and `<stem>.json` atomically; returns both paths.

        With the model's `order`, the .npy rows follow construction order (CIM-AQ's files);
        without it they stay in call order (identical for models that build layers as they call them).
        """
        path = Path(path)
        stem = path.with_suffix("") if path.suffix in (".npy", ".json") else path
        npy, js = stem.with_suffix(".npy"), stem.with_suffix(".json")
        npy.parent.mkdir(parents=True, exist_ok=True)
        rows = self.construction_rows(order) if order is not None else self.as_array()
        atomic_write(npy, lambda f: np.save(f, rows), binary=True)
        atomic_write(js, lambda f: json.dump(self.to_json_dict(), f, indent=2, default=_json_default))
        return npy, js

    # ------------------------------------------------------------ construction order (.npy rows)
    def construction_rows(self, order: "LayerOrder") -> np.ndarray:
        """The .npy array with rows in the model's construction order."""
        self.check_matches(order.call)
        rows = np.empty_like(self.as_array())
        rows[order.construction_index()] = self.as_array()
        return rows

    @classmethod
    def from_construction_rows(cls, array: np.ndarray, order: "LayerOrder", source: str = "policy") -> "Policy":
        """A call-order policy, named, from .npy rows in construction order."""
        if len(array) != len(order.call):
            raise PolicyError(f"{source}: policy has {len(array)} layers but the model has {len(order.call)} "
                              f"quantizable layers (construction order: {list(order.construction[:3])} ...)")
        rows = np.asarray(array)[order.construction_index()]
        adc = rows[:, 2].tolist() if rows.shape[1] == 3 else None
        return cls(rows[:, 0].tolist(), rows[:, 1].tolist(), adc, list(order.call))

    @classmethod
    def load(cls, path: str | Path, order: Optional["LayerOrder"] = None) -> "Policy":
        """Read our .json or a CIM-AQ/our .npy (L×2 or L×3 ints).

        A .npy needs the model's `order` to put its construction-ordered rows on the right layers;
        without it the rows are taken as they are (call order).
        """
        path = Path(path)
        if not path.is_file():
            raise PolicyError(f"policy file {str(path)!r} does not exist")
        if path.suffix == ".json":
            return cls._from_json(path)
        if path.suffix == ".npy":
            policy = cls._from_npy(path)
            if order is None:
                return policy
            return cls.from_construction_rows(policy.as_array(), order, source=f"policy file {str(path)!r}")
        raise PolicyError(f"policy file {str(path)!r}: unknown extension {path.suffix!r}; allowed: .npy, .json")

    @classmethod
    def _from_npy(cls, path: Path) -> "Policy":
        try:
            array = np.load(path, allow_pickle=False)
        except Exception as err:  # noqa: BLE001 - any unreadable file is the same user error
            raise PolicyError(f"policy file {str(path)!r} is not a readable .npy array: {err}") from None
        array = np.asarray(array)
        if array.dtype.kind not in "iuf":
            raise PolicyError(f"policy file {str(path)!r} holds {array.dtype} values; expected integer bit widths")
        if array.ndim != 2 or array.shape[1] not in (2, 3) or array.shape[0] == 0:
            raise PolicyError(
                f"policy file {str(path)!r} has shape {array.shape}; expected (layers, 2) or (layers, 3)")
        if not np.all(np.equal(np.mod(array, 1), 0)):
            raise PolicyError(f"policy file {str(path)!r} holds non-integer bit widths")
        array = array.astype(np.int64)
        adc = array[:, 2].tolist() if array.shape[1] == 3 else None
        return cls(array[:, 0].tolist(), array[:, 1].tolist(), adc)

    @classmethod
    def _from_json(cls, path: Path) -> "Policy":
        try:
            data = json.loads(path.read_text())
        except ValueError as err:
            raise PolicyError(f"policy file {str(path)!r} is not JSON: {err}") from None
        return cls.from_json_dict(data, source=f"policy file {str(path)!r}")

    @classmethod
    def from_json_dict(cls, data, source: str = "policy") -> "Policy":
        """The inverse of to_json_dict: {'layers': [{'name'?, 'w_bit', 'a_bit', 'adc_bits'?}, ...], ...meta}."""
        try:
            layers = data["layers"]
            names = [layer["name"] for layer in layers] if all("name" in l for l in layers) else None
            w = [layer["w_bit"] for layer in layers]
            a = [layer["a_bit"] for layer in layers]
            has_adc = [("adc_bits" in layer) for layer in layers]
        except (KeyError, TypeError) as err:
            raise PolicyError(f"{source} is not a policy JSON (need 'layers' with 'w_bit'/'a_bit' entries): "
                              f"{err}") from None
        if any(has_adc) and not all(has_adc):
            raise PolicyError(f"{source}: adc_bits given for some layers only")
        adc = [layer["adc_bits"] for layer in layers] if layers and all(has_adc) else None
        meta = {k: v for k, v in data.items() if k != "layers"}
        try:
            return cls(w, a, adc, names, meta)
        except PolicyError as err:
            raise PolicyError(f"{source}: {err}") from None


def check_layer_bits(w_bit: int, a_bit: int, adc_bits: Optional[int]) -> None:
    """Raise ValueError (naming the value and the allowed range) if the CIM layers cannot hold these bits.

    The ranges are lib.bit_limits', the table the layers themselves check against.
    """
    check_bits("w_bit", w_bit)
    check_bits("a_bit", a_bit)
    if adc_bits is not None:
        check_bits("adc_bits", adc_bits)


def check_supported(policy: Policy) -> None:
    """Refuse a policy with bits the CIM layers cannot hold, before any model is built."""
    checked = set()
    for index in range(len(policy)):
        bits = policy.layer(index)
        if bits in checked:
            continue
        try:
            check_layer_bits(*bits)
        except ValueError as err:
            name = f" ({policy.layer_names[index]!r})" if policy.layer_names else ""
            raise PolicyError(f"policy layer {index}{name}: {err} (the CIM layers' range)") from None
        checked.add(bits)


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot store {type(value).__name__} in a policy JSON")
