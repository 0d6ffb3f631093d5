"""The bit widths the CIM layers support: one table read by the layers, policies and configs."""
from __future__ import annotations

# (lowest, highest) per bit kind; ADCs may resolve more bits than a weight or input holds.
BIT_RANGES = {"w_bit": (1, 16), "a_bit": (1, 16), "adc_bits": (1, 24)}


def check_bits(key: str, value) -> None:
    """Raise ValueError naming `key`, `value` and the allowed range unless value is an integer within it."""
    low, high = BIT_RANGES[key]
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{key}={value!r} is not allowed: expected an integer in [{low}, {high}]")
