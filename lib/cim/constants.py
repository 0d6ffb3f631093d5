"""Small tensors every forward reads (grid bounds, powers of two), made once per setting and kept
for the process: a fresh one per forward costs more than its arithmetic on small layers."""
from __future__ import annotations

from typing import Callable

import torch

_CONSTANTS: dict = {}


def constant(key: tuple, make: Callable[[], object]):
    """`make()` made once per key and kept, outside inference mode (an inference tensor could not be
    saved for a later backward). Shared: callers must not change it in place."""
    value = _CONSTANTS.get(key)
    if value is None:
        with torch.inference_mode(False):
            value = _CONSTANTS[key] = make()
    return value


def powers_of_two(bits: int, count: int, dtype: torch.dtype, device) -> torch.Tensor:
    """2^(bits·i) for i < count (a slice's or an input plane's significance)."""
    device = torch.device("cpu") if device is None else torch.device(device)
    return constant(("powers", bits, count, dtype, device),
                    lambda: 2.0 ** (bits * torch.arange(count, device=device, dtype=dtype)))
