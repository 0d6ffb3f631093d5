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
from lib.finite import NonFiniteError, first_nonfinite
from lib.training.metrics import RunningMeter


class DivergedError(UserError, FloatingPointError):
    """Training produced a NaN or infinite value; it stops before the value reaches a checkpoint.

    kind: "loss" (the batch's loss), "activation" (a layer's input, refused by the layer),
    "gradient" (a parameter's gradient, found before the optimizer step) or "parameter" (a
    parameter or buffer after the step); tensor: that tensor (a module path, or the activation
    in words); step: the 1-based batch.
    """

    def __init__(self, message: str, step: int, kind: str = "loss", tensor: Optional[str] = None,
                 loss: Optional[float] = None) -> None:
        super().__init__(message)
        self.step, self.kind, self.tensor, self.loss = step, kind, tensor, loss

    def what(self) -> str:
        """What became non-finite, in words: 'the loss (nan)', 'the gradient of conv1.weight'."""
        if self.kind == "loss":
            return f"the loss ({self.loss})"
        if self.kind == "activation":
            return str(self.tensor)
        return f"the {self.kind} {self.tensor}" if self.kind == "parameter" else f"the gradient of {self.tensor}"


def _unwrapped(model: nn.Module) -> nn.Module:
    return model.module if isinstance(getattr(model, "module", None), nn.Module) else model


def check_gradients(named_params: list, step: int, desc: str) -> None:
    """Raise DivergedError if any gradient holds NaN/inf (one fused check), naming the first one."""
    bad = first_nonfinite((name, p.grad) for name, p in named_params)
    if bad is not None:
        raise DivergedError(f"{desc}: the gradient of {bad} became non-finite at batch {step}", step, "gradient", bad)


def check_state(model: nn.Module, step: int, desc: str, dist: DistContext = SINGLE) -> None:
    """Raise DivergedError if a parameter or floating buffer holds NaN/inf after the optimizer step.

    Under torchrun buffers (BatchNorm statistics) differ between ranks: every rank learns whether
    any rank found one, so all stop at the same batch."""
    bad = first_nonfinite(itertools.chain(model.named_parameters(), model.named_buffers()))
    if dist.distributed and not all_reduce_sum([float(bad is not None)], dist)[0]:
        return
    if bad is not None or dist.distributed:
        where = bad if bad is not None else "a buffer on another rank"
        raise DivergedError(f"{desc}: {where} became non-finite after the update of batch {step}", step,
                            "parameter", where)


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

    A non-finite loss, gradient (checked before the optimizer step) or parameter / buffer (after
    it) raises DivergedError, so no NaN ever stays in the weights unnoticed.
    dist: under torchrun `model` is the DDP-wrapped model and `loader` this rank's shard; the
    returned metrics are summed over all ranks, and every rank stops together on a non-finite loss.
    """
    model.train()
    meter = RunningMeter()
    named_params = [(name, p) for name, p in _unwrapped(model).named_parameters() if p.requires_grad]
    bar = tqdm(_batches(loader, max_batches), total=_total(loader, max_batches), desc=desc,
               disable=not (progress and dist.is_main), leave=False, dynamic_ncols=True)
    for step, (images, target) in enumerate(bar):
        images, target = images.to(device, non_blocking=True), target.to(device, non_blocking=True)
        forward_error = None
        try:
            output = model(images)
            loss = criterion(output, target)
            loss_value = loss.item()  # one device sync serves the finiteness check and the meter
        except NonFiniteError as err:  # a layer refused a NaN/inf activation (lib.cim integer codes)
            forward_error, loss_value = err, math.nan
        # the sum over ranks is non-finite when any rank's loss is: every rank stops at the same batch
        checked = all_reduce_sum([loss_value], dist)[0] if dist.distributed else loss_value
        if not math.isfinite(checked):
            if forward_error is not None:
                raise DivergedError(f"{desc}: {forward_error.subject} became non-finite at batch {step + 1}",
                                    step + 1, "activation", forward_error.subject)
            bad = loss_value if not math.isfinite(loss_value) else checked
            raise DivergedError(f"{desc}: loss became {bad} at batch {step + 1}", step + 1, "loss", loss=bad)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # gradients (all-reduced under DDP) and parameters are the same on every rank: all stop together
        check_gradients(named_params, step + 1, desc)
        optimizer.step()
        check_state(_unwrapped(model), step + 1, desc, dist)
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
