"""One training epoch and one evaluation pass, model-agnostic (FP32, QAT or mixed precision)."""
from __future__ import annotations

import itertools
import math
from typing import Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from lib.distributed import SINGLE, DistContext, all_reduce_sum
from lib.errors import UserError
from lib.training.metrics import RunningMeter


class DivergedError(UserError, FloatingPointError):
    """The loss became NaN or infinite; training stops before the weights are wrecked."""

    def __init__(self, message: str, step: int, loss: float) -> None:
        super().__init__(message)
        self.step, self.loss = step, loss


def _batches(loader, max_batches: Optional[int]):
    return itertools.islice(loader, max_batches) if max_batches else loader


def _total(loader, max_batches: Optional[int]) -> Optional[int]:
    try:
        n = len(loader)
    except TypeError:
        return max_batches
    return min(n, max_batches) if max_batches else n


def train_one_epoch(model: nn.Module, loader, criterion: nn.Module, optimizer: torch.optim.Optimizer,
                    device: torch.device | str = "cpu", *, max_batches: Optional[int] = None,
                    progress: bool = True, desc: str = "train", dist: DistContext = SINGLE) -> dict:
    """Train over `loader` (at most `max_batches` batches); returns {'loss', 'top1', 'top5', 'samples'}.

    A non-finite loss stops training with an error instead of silently wrecking the weights.
    dist: under torchrun `model` is the DDP-wrapped model and `loader` this rank's shard; the
    returned metrics are summed over all ranks, and every rank stops together on a non-finite loss.
    """
    model.train()
    meter = RunningMeter()
    bar = tqdm(_batches(loader, max_batches), total=_total(loader, max_batches), desc=desc,
               disable=not (progress and dist.is_main), leave=False, dynamic_ncols=True)
    for step, (images, target) in enumerate(bar):
        images, target = images.to(device, non_blocking=True), target.to(device, non_blocking=True)
        output = model(images)
        loss = criterion(output, target)
        loss_value = loss.item()  # one device sync serves the finiteness check and the meter
        # the sum over ranks is non-finite when any rank's loss is: every rank stops at the same batch
        checked = all_reduce_sum([loss_value], dist)[0] if dist.distributed else loss_value
        if not math.isfinite(checked):
            bad = loss_value if not math.isfinite(loss_value) else checked
            raise DivergedError(f"{desc}: loss became {bad} at batch {step + 1}; lower the learning rate",
                                step + 1, bad)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        meter.update(loss_value, output.detach(), target)
        if progress:
            stats = meter.summary()
            bar.set_postfix(loss=f"{stats['loss']:.3f}", top1=f"{stats['top1']:.1f}")
    bar.close()
    return meter.all_reduce(dist).summary()


@torch.no_grad()
def evaluate(model: nn.Module, loader, criterion: Optional[nn.Module] = None,
             device: torch.device | str = "cpu", *, max_batches: Optional[int] = None,
             progress: bool = False, desc: str = "eval", dist: DistContext = SINGLE) -> dict:
    """Eval-mode pass over `loader`; returns {'loss', 'top1', 'top5', 'samples'} (loss 0 without criterion).

    dist: under torchrun `loader` holds this rank's unpadded shard and the counts are summed over
    ranks, so the result equals one process evaluating the whole set with the same weights.
    """
    model.eval()
    meter = RunningMeter()
    for images, target in tqdm(_batches(loader, max_batches), total=_total(loader, max_batches), desc=desc,
                               disable=not (progress and dist.is_main), leave=False, dynamic_ncols=True):
        images, target = images.to(device, non_blocking=True), target.to(device, non_blocking=True)
        output = model(images)
        loss = criterion(output, target).item() if criterion is not None else 0.0
        meter.update(loss, output, target)
    return meter.all_reduce(dist).summary()
