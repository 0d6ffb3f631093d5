"""The crossbar form of a CIM layer (quantized weights, integer weights, cell slices with their
sign mapping, weight step grid, and the ADC's conversion constants: gamma = weight step · 2^(s·c)
and the ADC steps laid out like it), kept between evaluation forwards while nothing it depends on
changes.

In evaluation the weights are fixed, yet quantizing, slicing and laying them out costs as much as
the MVM for a large layer, and on a small network each of the small tensors derived per forward
costs more than its arithmetic. The cache is keyed by everything the form is computed from: the
layer's plan (bits, grid), its input mode, whether its weight and ADC steps are initialised, and
for every tensor of the weight side and of the ADC its identity, storage and autograd version
counter (`Tensor._version`, which every in-place change bumps: an optimizer step,
`load_state_dict`, `copy_`). A key that differs empties the cache, so a value is never served
after its inputs changed, whoever changed them.
"""
from __future__ import annotations

from typing import Callable, Hashable


def module_tensors(module) -> list:
    """Every parameter and buffer of `module` and its submodules, read straight from their dicts:
    what `parameters()` and `buffers()` yield (duplicates kept), without their generator
    machinery, since a layer's key reads them on every evaluation forward."""
    tensors: list = []
    stack = [module]
    while stack:
        current = stack.pop()
        # most of a quantizer's modules hold no tensors: skip their empty dicts (4x faster walk)
        if current._parameters:
            tensors.extend([t for t in current._parameters.values() if t is not None])
        if current._buffers:
            tensors.extend([t for t in current._buffers.values() if t is not None])
        if current._modules:
            stack.extend([m for m in current._modules.values() if m is not None])
    return tensors


def tensor_versions(tensors) -> tuple:
    """(identity, storage, dtype, version) of each tensor: changes whenever its values may have."""
    return tuple((id(t), t.data_ptr(), t.dtype, t._version) for t in tensors)


class EvalCache:
    """Values derived from a layer's parameters, valid while `key()` returns the same value."""

    def __init__(self) -> None:
        self._key: Hashable = None
        self._values: dict = {}
        self.hits = 0
        self.misses = 0

    def __deepcopy__(self, memo) -> "EvalCache":
        """A copied layer starts with an empty cache: its values are derived data (some, like
        oneDNN's prepacked weights, cannot be copied) and are recomputed on first use."""
        return EvalCache()

    def clear(self) -> None:
        """Drop every value (frees the memory they hold)."""
        self._key, self._values = None, {}

    def __len__(self) -> int:
        return len(self._values)

    def get(self, key: Callable[[], Hashable], name: str, compute: Callable[[], object]):
        """The value `name` for the current key: the kept one, or `compute()` kept under the key
        as it is afterwards (computing may initialise a step in place, which changes the key)."""
        current = key()
        if current != self._key:
            self._key, self._values = current, {}
        if name in self._values:
            self.hits += 1
            return self._values[name]
        self.misses += 1
        value = compute()
        after = key()
        if after != self._key:
            self._key, self._values = after, {}
        self._values[name] = value
        return value
