"""Accuracy of a policy after a short finetune, on ONE model kept in memory for the whole search.

Per evaluation: restore the INT8 weights, steps and BatchNorm statistics from an in-memory copy
(the bits come back with them), apply the policy in place, calibrate the steps whose bits
changed, build a fresh optimizer (apply_policy may replace step parameters), finetune a fixed
number of batches on the search-train split, measure top-1 on the held-out search split. Every
evaluation starts from the same RNG state, so a policy's accuracy does not depend on when it was
evaluated (which makes the cache by policy exact and a resumed search identical).

Under torchrun every rank evaluates the same policy: it calibrates and finetunes its own shard,
takes rank 0's state after calibration and after finetuning (so the CIM layers' steps, ADC
statistics and bits are the same on every rank), trains under DDP and reports the accuracy
summed over the ranks' disjoint shards of the search split.
"""
from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from lib.cim import apply_policy, calibrate, faithful_copy
from lib.cim.noise import attach as attach_noise, detach as detach_noise
from lib.cim.noise_config import NoiseConfig
from lib.distributed import SINGLE, DistContext, broadcast_module_state, ddp_model
from lib.policy import Policy
from lib.training import DivergedError, OptimConfig, build_optimizer, evaluate, seed_epoch, train_one_epoch

# Seeds evaluations apart from the agent's own generators and the data split.
EVAL_SEED_OFFSET = 7919


@dataclass
class Evaluation:
    """A policy's accuracy (top-1 %, search split) and where the time went (seconds).

    diverged: where the finetune produced a NaN/inf ({"batch", "kind", "tensor", "what"}: see
    lib.training.DivergedError), else None;
    accuracy is then None (the policy has no accuracy to measure)."""

    accuracy: Optional[float]
    finetune_seconds: float
    eval_seconds: float
    diverged: Optional[dict] = None
    deployed_accuracy: Optional[float] = None  # with bit-serial inputs (asked for with deployed=True)


def snapshot(model: nn.Module) -> OrderedDict:
    """A detached copy of the model's state dict, with the per-module versions load_state_dict reads."""
    state = model.state_dict()
    copy = OrderedDict((k, v.detach().clone()) for k, v in state.items())
    copy._metadata = getattr(state, "_metadata", None)
    return copy


class PolicyEvaluator:
    """Finetunes and scores policies on one in-memory model (see module docstring)."""

    def __init__(self, model: nn.Module, train_loader, search_loader, device: torch.device, lr: float,
                 calibration_batches: int, seed: int, dist: DistContext = SINGLE,
                 noise: Optional[NoiseConfig] = None, repeats: int = 1) -> None:
        self.model = model.to(device)
        self.device = device
        self.dist = dist
        broadcast_module_state(self.model, dist)  # each rank calibrated the start on its own shard
        self.train_loader = train_loader
        self.search_loader = search_loader
        self.lr = lr
        self.calibration_batches = calibration_batches
        self.seed = seed + EVAL_SEED_OFFSET
        self.start_state = snapshot(self.model)
        self.criterion = nn.CrossEntropyLoss()
        self.noise = noise if noise is not None and noise.active else None
        self.repeats = int(repeats) if self.noise is not None else 1

    def steps_for(self, finetune_steps: int, finetune_epochs: Optional[float]) -> int:
        """Finetune batches per evaluation: the steps, or epochs × batches per epoch."""
        if finetune_epochs is None:
            return finetune_steps
        return max(1, math.ceil(finetune_epochs * len(self.train_loader)))

    def restore(self) -> None:
        """Back to the INT8 start: weights, steps, BN statistics and bits."""
        self.model.load_state_dict(self.start_state, strict=True)

    def evaluate(self, policy: Policy, steps: int, lr: Optional[float] = None, deployed: bool = False) -> Evaluation:
        """Restore, apply `policy`, calibrate, finetune `steps` batches (at `lr`, default the
        search's), score; a finetune that diverges is reported in `Evaluation.diverged`.
        deployed: also score the finetuned model with bit-serial inputs (what the crossbar computes;
        the same number where the model already is bit-serial)."""
        started = time.perf_counter()
        self.restore()
        apply_policy(self.model, policy)
        seed_epoch(self.seed, 0, self.train_loader, self.dist.rank)
        calibrate(self.model, self.train_loader, max_batches=self.calibration_batches,
                  batch_norm="batch" if steps > 0 else "running")  # the mode that comes next
        broadcast_module_state(self.model, self.dist)
        if steps > 0:
            lr = self.lr if lr is None else lr
            optimizer = build_optimizer(self.model, OptimConfig(epochs=1, lr=lr, scheduler="constant"))
            done, epoch = 0, 0
            try:
                with ddp_model(self.model, self.dist) as train_model:  # anew: apply_policy may replace steps
                    while done < steps:
                        seed_epoch(self.seed, epoch, self.train_loader, self.dist.rank)
                        batches = min(steps - done, len(self.train_loader))
                        train_one_epoch(train_model, self.train_loader, self.criterion, optimizer, self.device,
                                        max_batches=batches, progress=False, dist=self.dist)
                        done, epoch = done + batches, epoch + 1
            except DivergedError as err:  # every rank stops at the same batch (lib.training.loop)
                self.restore()  # no NaN stays in the model
                where = {"batch": done + err.step, "kind": err.kind, "tensor": err.tensor, "what": err.what()}
                return Evaluation(None, time.perf_counter() - started, 0.0, where)
            broadcast_module_state(self.model, self.dist)  # the buffers the last batch updated per rank
        finetuned = time.perf_counter()
        accuracy = self.score()
        on_crossbar = None
        if deployed:
            seed_epoch(self.seed, 1, self.train_loader, self.dist.rank)  # the recalibration's batches, fixed
            faithful, changed = faithful_copy(self.model, self.train_loader, self.calibration_batches)
            if changed:
                broadcast_module_state(faithful, self.dist)
            on_crossbar = accuracy if not changed else self.score(faithful)
        return Evaluation(accuracy, finetuned - started, time.perf_counter() - finetuned, None, on_crossbar)

    def score(self, model: Optional[nn.Module] = None) -> float:
        """Top-1 of `model` (default: the search's) on the search split: on the ideal crossbar, or
        the mean over `repeats` seeded programmings of the cells under `noise` (the same seeds for
        every policy)."""
        model = self.model if model is None else model
        if self.noise is None:
            return float(evaluate(model, self.search_loader, None, self.device, dist=self.dist)["top1"])
        scores = []
        try:
            for repeat in range(self.repeats):
                attach_noise(model, self.noise, seed=self.seed + repeat)
                scores.append(float(evaluate(model, self.search_loader, None, self.device, dist=self.dist)["top1"]))
        finally:
            detach_noise(model)
        return sum(scores) / len(scores)
