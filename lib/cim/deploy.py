"""The faithful (deployed) view of a CIM model: bit-serial inputs in every layer.

A model may train with multi-bit inputs (fast); its accuracy on the hardware the cost model
prices is measured on a copy in bit-serial mode. The ADC steps of a layer whose mode changes
re-initialise from a few calibration batches first: per-plane partial sums have another scale
than whole-input ones, so the trained steps do not carry over.
"""
from __future__ import annotations

import copy
import logging
from typing import Iterable

from torch import nn

from lib.cim.convert import calibrate, quantizable_layers

log = logging.getLogger(__name__)

FAITHFUL_INPUT_MODE = "bit-serial"


def set_input_mode(model: nn.Module, mode: str) -> int:
    """Set every CIM layer's input mode; returns how many layers changed (their ADCs re-initialise)."""
    changed = 0
    for _, layer in quantizable_layers(model):
        if layer.input_mode != mode:
            layer.set_input_mode(mode)
            changed += 1
    return changed


def faithful_copy(model: nn.Module, calibration: Iterable, batches: int = 4) -> tuple[nn.Module, int]:
    """A copy of `model` in bit-serial mode (the model is untouched), and how many layers changed
    mode; those layers' ADC steps are recalibrated on `calibration` (training batches)."""
    faithful = copy.deepcopy(model)
    changed = set_input_mode(faithful, FAITHFUL_INPUT_MODE)
    if changed:
        log.info("%d layer(s) switched to bit-serial inputs: recalibrating their ADC steps on %d batch(es)",
                 changed, batches)
        calibrate(faithful, calibration, max_batches=batches, batch_norm="running")  # evaluated next
    return faithful, changed
