"""Training checkpoints: one self-describing dict, written atomically, validated on load.

Every tensor of a checkpoint is finite: a state holding NaN or inf is neither written nor read.

Format (a dict, `format` == CHECKPOINT_FORMAT):
  version, epoch (epochs completed), state_dict, optimizer, scheduler, best_acc1, best_epoch,
  metrics (last validation), history (per-epoch metrics), args (plain, JSON-able: everything
  needed to rebuild the model, e.g. arch/num_classes/quant/bits/hardware), extra (caller's).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch

from lib.errors import UserError
from lib.fileio import atomic_torch_save
from lib.finite import NonFiniteError, require_finite

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "cim-aq/checkpoint"
CHECKPOINT_VERSION = 1
CHECKPOINT_NAME = "checkpoint.pth.tar"
BEST_NAME = "model_best.pth.tar"
REQUIRED_KEYS = ("epoch", "state_dict", "args")


class CheckpointError(UserError, ValueError):
    """A checkpoint file that is missing, truncated, foreign or does not fit; the message names it."""


def plain(value: Any) -> Any:
    """`value` reduced to python that torch.load(weights_only=True) accepts.

    Paths → str, Namespaces/dataclasses → dicts, numpy → lists; tensors stay tensors.
    """
    if isinstance(value, torch.Tensor):
        return value
    if hasattr(value, "tolist") and type(value).__module__ == "numpy":
        return value.tolist()
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return plain(dataclasses.asdict(value))
    if isinstance(value, argparse.Namespace):
        return plain(vars(value))
    return str(value)


def make_checkpoint(**fields: Any) -> dict:
    """A checkpoint dict with the format marker; args are reduced to plain python (see `plain`)."""
    missing = [k for k in REQUIRED_KEYS if k not in fields]
    if missing:
        raise CheckpointError(f"checkpoint lacks required field(s) {missing}")
    fields["args"] = plain(fields["args"])
    return {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **fields}


def save_checkpoint(state: dict, out_dir: str | Path, is_best: bool = False, name: str = CHECKPOINT_NAME,
                    best_name: str = BEST_NAME, between: Optional[Callable[[], None]] = None) -> Path:
    """Write `out_dir/name` atomically, and first, when `is_best`, `out_dir/best_name`.

    Best first: a crash between the two writes leaves the checkpoint one epoch behind, so a resume
    redoes that epoch and rewrites both; the best file is never older than the checkpoint says.
    `between` runs after the best write, before the checkpoint write (a testing hook).
    A state holding a NaN or infinite tensor is refused (NonFiniteError) and nothing is written.
    """
    out_dir = Path(out_dir)
    require_finite(state, f"refusing to write a checkpoint into {out_dir}")
    if is_best:
        atomic_torch_save(state, out_dir / best_name)
    if between is not None:
        between()
    return atomic_torch_save(state, out_dir / name)


def repair_best(state: dict, out_dir: str | Path, best_name: str = BEST_NAME) -> bool:
    """Rewrite `out_dir/best_name` from `state` when state is its own best epoch and the file is older or absent.

    Heals runs whose best copy was interrupted (or written after the checkpoint, as older versions
    did); returns whether it wrote.
    """
    if state.get("best_epoch") != state.get("epoch"):
        return False
    path = Path(out_dir) / best_name
    if path.is_file():
        try:
            if int(load_checkpoint(path).get("epoch", -1)) >= int(state["epoch"]):
                return False
        except CheckpointError:
            pass  # unreadable: replace it
    atomic_torch_save(state, path)
    log.warning("%s was older than the checkpoint's best epoch %d: rewrote it", path, state["epoch"])
    return True


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict:
    """Read and validate a checkpoint written by save_checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        raise CheckpointError(f"checkpoint {path} cannot be read (truncated or not a torch file): {err}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        keys = sorted(state)[:8] if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path} is not a cim-aq checkpoint (found {keys}); "
                              f"use it as --pretrained weights instead if it is a plain state dict")
    if state.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path}: checkpoint version {state.get('version')!r} is not supported "
                              f"(expected {CHECKPOINT_VERSION})")
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks field(s) {missing}")
    try:
        require_finite(state, f"checkpoint {path}")
    except NonFiniteError as err:
        raise CheckpointError(f"{err}; a model holding them gives no usable start: train it again") from None
    return state


def load_model_state(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], source: str | Path) -> None:
    """Strict load_state_dict whose failure names the source file and the offending keys."""
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:
        detail = " ".join(str(err).split())  # torch lists every key on its own line: one line for the user
        detail = detail if len(detail) <= 600 else detail[:600] + " ..."
        raise CheckpointError(f"{source} does not fit {type(model).__name__} (another --arch or "
                              f"--num-classes?): {detail}") from None
