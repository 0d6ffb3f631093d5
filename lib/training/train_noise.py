"""The --train-noise flag of the training CLIs: noise-aware QAT / finetuning under device noise.

`--train-noise PRESET` (or no value: the hardware YAML's `noise` section) attaches the noise to the
model's CIM layers for training (lib.cim.noise): every training forward programs the cells afresh.
A resumed run takes the noise its checkpoint recorded (`args["train_noise"]`).
"""
from __future__ import annotations

from typing import Mapping, Optional

from lib.cim.noise_config import PRESETS, NoiseConfig, preset
from lib.errors import UserError

FROM_HARDWARE = "hardware"


class TrainNoiseError(UserError, ValueError):
    """A --train-noise value that names no preset, or a hardware YAML without noise to train under."""


def add_train_noise_arg(group) -> None:
    group.add_argument("--train-noise", nargs="?", const=FROM_HARDWARE, default=None, metavar="PRESET",
                       help="noise-aware training: every training forward programs the cells afresh with device "
                            f"noise (a preset: {', '.join(sorted(PRESETS))}; no value: the hardware YAML's `noise`); "
                            "the best epoch is picked under it")


def check_train_noise_flag(value: Optional[str]) -> None:
    """Refuse an unknown preset name before any work."""
    if value is not None and value != FROM_HARDWARE and value not in PRESETS:
        raise TrainNoiseError(f"--train-noise {value!r} is not allowed: expected a preset, one of {sorted(PRESETS)}, "
                              f"or no value (the hardware YAML's `noise`)")


def train_noise_for(value: Optional[str], hardware_noise: Optional[NoiseConfig],
                    resumed_args: Optional[Mapping] = None) -> Optional[NoiseConfig]:
    """The noise to train under: a resumed run's, else the flag's; None trains on the ideal crossbar."""
    if resumed_args is not None:
        saved = resumed_args.get("train_noise")
        return NoiseConfig.from_value(saved, "the resumed run's train_noise") if saved else None
    if value is None:
        return None
    check_train_noise_flag(value)
    noise = hardware_noise if value == FROM_HARDWARE else preset(value)
    if noise is None or not noise.active:
        raise TrainNoiseError(f"--train-noise {value}: " + (
            "the hardware YAML has no active `noise` section; name a preset (pcm, rram) or add one"
            if value == FROM_HARDWARE else "the preset adds no noise"))
    return noise
