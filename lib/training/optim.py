"""Optimizer, per-epoch LR schedule and loss from one validated config."""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Iterable, Mapping, Optional

import torch
from torch import nn

from lib.errors import UserError

OPTIMIZERS = ("sgd", "adamw")
SCHEDULERS = ("cosine", "step", "constant")


class OptimConfigError(UserError, ValueError):
    """An optimisation setting outside its allowed range; the message names it."""


@dataclass
class OptimConfig:
    """How to train: optimizer, LR schedule (stepped once per epoch), regularisation.

    no_decay_1d: no weight decay on biases, norm weights and other 0/1-D parameters (such as
    learned quantizer steps), which decay would only shrink.
    """

    epochs: int = 10
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    no_decay_1d: bool = True
    scheduler: str = "cosine"
    warmup_epochs: int = 0
    min_lr: float = 0.0
    step_size: int = 30
    gamma: float = 0.1
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        def bad(key: str, allowed: str) -> OptimConfigError:
            return OptimConfigError(f"{key}={getattr(self, key)!r} is not allowed: expected {allowed}")

        if self.optimizer not in OPTIMIZERS:
            raise bad("optimizer", f"one of {list(OPTIMIZERS)}")
        if self.scheduler not in SCHEDULERS:
            raise bad("scheduler", f"one of {list(SCHEDULERS)}")
        for key in ("epochs", "step_size"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise bad(key, "an integer >= 1")
        if not isinstance(self.warmup_epochs, int) or not 0 <= self.warmup_epochs < self.epochs:
            raise bad("warmup_epochs", f"an integer in [0, epochs={self.epochs})")
        if not self.lr > 0:
            raise bad("lr", "a number > 0")
        for key in ("momentum", "weight_decay", "min_lr", "gamma"):
            if not getattr(self, key) >= 0:
                raise bad(key, "a number >= 0")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise bad("label_smoothing", "a number in [0, 1)")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "OptimConfig":
        """Build from a mapping (e.g. YAML); unknown keys are an error naming them."""
        allowed = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise OptimConfigError(f"unknown optimisation key(s) {unknown}; allowed: {sorted(allowed)}")
        return cls(**dict(data))


def param_groups(model: nn.Module, weight_decay: float, no_decay_1d: bool = True) -> list[dict]:
    """Trainable parameters split into decayed and (0/1-D, when no_decay_1d) undecayed groups."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if no_decay_1d and p.ndim <= 1 else decay).append(p)
    return [g for g in ({"params": decay, "weight_decay": weight_decay},
                        {"params": no_decay, "weight_decay": 0.0}) if g["params"]]


def build_optimizer(model: nn.Module, cfg: OptimConfig, params: Optional[Iterable] = None) -> torch.optim.Optimizer:
    """SGD (momentum, optional Nesterov) or AdamW over `params` (default: param_groups(model))."""
    params = list(params) if params is not None else param_groups(model, cfg.weight_decay, cfg.no_decay_1d)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                               weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_factor(cfg: OptimConfig, epoch: int) -> float:
    """LR multiplier for (0-based) `epoch`: linear warmup, then cosine to min_lr, step decay or constant."""
    if epoch < cfg.warmup_epochs:
        return (epoch + 1) / (cfg.warmup_epochs + 1)
    t = epoch - cfg.warmup_epochs
    if cfg.scheduler == "cosine":
        floor = min(cfg.min_lr / cfg.lr, 1.0)
        progress = t / max(1, cfg.epochs - cfg.warmup_epochs)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if cfg.scheduler == "step":
        return cfg.gamma ** (t // cfg.step_size)
    return 1.0


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-epoch scheduler following lr_factor; its state_dict resumes it exactly."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: lr_factor(cfg, epoch))


def sync_lr(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR, cfg: OptimConfig) -> None:
    """Set each group's LR for the scheduler's current epoch under `cfg` (after resuming with, e.g., more epochs)."""
    lrs = [base * lr_factor(cfg, scheduler.last_epoch) for base in scheduler.base_lrs]
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs


def build_criterion(cfg: OptimConfig) -> nn.Module:
    return nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)


def add_optim_args(parser, epochs: int, lr: float):
    """The optimization flags every training CLI shares (defaults per stage); returns the group."""
    g = parser.add_argument_group("optimization")
    g.add_argument("--epochs", type=int, default=epochs, help="total epochs (a resumed run continues up to this)")
    g.add_argument("--optimizer", default="sgd", choices=("sgd", "adamw"), help="optimizer")
    g.add_argument("--lr", type=float, default=lr, help="peak learning rate")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    g.add_argument("--nesterov", action="store_true", help="Nesterov momentum")
    g.add_argument("--wd", "--weight-decay", dest="weight_decay", type=float, default=5e-4, help="weight decay")
    g.add_argument("--decay-1d", action="store_true",
                   help="also decay biases, norm weights and other 1-D parameters (off by default)")
    g.add_argument("--scheduler", default="cosine", choices=("cosine", "step", "constant"),
                   help="per-epoch LR schedule")
    g.add_argument("--warmup-epochs", type=int, default=0, help="linear LR warmup epochs")
    g.add_argument("--min-lr", type=float, default=0.0, help="final LR of the cosine schedule")
    g.add_argument("--step-size", type=int, default=30, help="epochs per decay for --scheduler step")
    g.add_argument("--gamma", type=float, default=0.1, help="decay factor for --scheduler step")
    g.add_argument("--label-smoothing", type=float, default=0.0, help="label smoothing in [0, 1)")
    g.add_argument("--max-batches", type=int, default=None, help="cap on training batches per epoch (smoke runs)")
    return g


def optim_config_from_args(args) -> "OptimConfig":
    """OptimConfig from the flags of add_optim_args."""
    return OptimConfig(epochs=args.epochs, optimizer=args.optimizer, lr=args.lr, momentum=args.momentum,
                       nesterov=args.nesterov, weight_decay=args.weight_decay, no_decay_1d=not args.decay_1d,
                       scheduler=args.scheduler, warmup_epochs=args.warmup_epochs, min_lr=args.min_lr,
                       step_size=args.step_size, gamma=args.gamma, label_smoothing=args.label_smoothing)
