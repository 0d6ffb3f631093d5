"""Model state first, optimizer second: the training state that resumes a run exactly.

Loading a CIM model's state dict replaces its Brevitas step Parameters, so an optimizer built
before the load would hold parameters the model no longer has (those steps would never train
again). `prepare_training` loads the state, then builds optimizer and scheduler over the
parameters that exist now, then restores their states. Callers that restore a model repeatedly
(e.g. a search episode) use it the same way.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch
from torch import nn

from lib.training.checkpoint import CheckpointError, load_model_state
from lib.training.optim import OptimConfig, build_optimizer, build_scheduler, sync_lr

ParamsFactory = Callable[[nn.Module], Iterable]


@dataclass
class TrainingState:
    """Optimizer, scheduler and progress of a run, built over the model's current parameters."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    start_epoch: int = 0
    best_acc1: float = -1.0
    best_epoch: int = -1
    history: list = field(default_factory=list)


def prepare_training(model: nn.Module, cfg: OptimConfig, state: Optional[dict] = None,
                     source: str | Path = "the given checkpoint state",
                     params: Optional[ParamsFactory] = None) -> TrainingState:
    """Load checkpoint `state` (if any) into `model`, then build and restore optimizer and scheduler.

    params: parameter groups from the loaded model (default: optim.param_groups via build_optimizer).
    """
    if state is not None:
        load_model_state(model, state["state_dict"], source)
    optimizer = build_optimizer(model, cfg, params(model) if params is not None else None)
    scheduler = build_scheduler(optimizer, cfg)
    if state is None:
        return TrainingState(optimizer, scheduler)
    try:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    except (KeyError, ValueError) as err:
        raise CheckpointError(f"{source}: optimizer/scheduler state does not fit this run: {err}") from None
    sync_lr(optimizer, scheduler, cfg)  # the schedule may have grown (more --epochs)
    return TrainingState(optimizer, scheduler, start_epoch=int(state["epoch"]),
                         best_acc1=float(state.get("best_acc1", -1.0)), best_epoch=int(state.get("best_epoch", -1)),
                         history=list(state.get("history", [])))
