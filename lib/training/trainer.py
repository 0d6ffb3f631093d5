"""`fit`: the epoch loop shared by FP32 pretraining, INT8 QAT and mixed-precision finetuning.

Each epoch: reseed (so a resumed run matches an uninterrupted one), train, step the LR
schedule, validate, write `checkpoint.pth.tar` (and `model_best.pth.tar` on a new best top-1)
atomically (best first: see save_checkpoint), log metrics. Resuming restores model, then the
optimizer over the loaded model's parameters, scheduler, epoch and best accuracy; the base LR
stays the checkpoint's, and a longer `cfg.epochs` stretches the schedule from there.

Under torchrun every rank calls fit with the same arguments and its own data shard: the model
trains inside DistributedDataParallel, starts from rank 0's state (so per-rank calibration
cannot make ranks differ), and after each epoch takes rank 0's buffers again (the last batch
updated each rank's statistics from its own images); validation metrics are summed over ranks;
rank 0 alone writes checkpoints (of the unwrapped model: no `module.` prefix) and logs metrics.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch import nn

from lib.cim.scratch import scratch_buffers
from lib.distributed import SINGLE, DistContext, broadcast_module_state, broadcast_object, ddp_model
from lib.training.checkpoint import (BEST_NAME, CHECKPOINT_NAME, load_checkpoint, make_checkpoint, plain, repair_best,
                                     save_checkpoint)
from lib.training.kill_switch import kill_point
from lib.training.loop import DivergedError, evaluate, train_one_epoch
from lib.training.optim import OptimConfig, build_criterion
from lib.training.resume import ParamsFactory, prepare_training
from lib.training.seeding import seed_epoch
from lib.training.tracking import Tracker

log = logging.getLogger(__name__)


@dataclass
class FitResult:
    """Outcome of fit: best and last validation metrics, per-epoch history and checkpoint paths."""

    best_acc1: float
    best_epoch: int
    last: dict
    history: list = field(default_factory=list)
    epochs_run: int = 0
    seconds: float = 0.0
    checkpoint: Optional[Path] = None
    best_checkpoint: Optional[Path] = None


def divergence_advice(err: DivergedError, first_update: bool) -> str:
    """What to change, from what went non-finite and when."""
    if first_update:
        return ("that is before any weight update, so the learning rate is not the cause: the starting weights "
                "(or their quantization) give it")
    if err.kind == "parameter":
        return "the optimizer step made it: lower the learning rate (--lr)"
    return "lower the learning rate (--lr)"


@scratch_buffers()
def fit(model: nn.Module, train_loader, val_loader, cfg: OptimConfig, out_dir: str | Path, *,
        args: Optional[Mapping[str, Any]] = None, device: torch.device | str = "cpu", seed: int = 0,
        resume: Optional[str | Path | dict] = None, tracker: Optional[Tracker] = None,
        extra: Optional[Mapping[str, Any]] = None, max_batches: Optional[int] = None,
        params: Optional[ParamsFactory] = None, progress: bool = True, dist: DistContext = SINGLE,
        sync_bn: bool = False) -> FitResult:
    """Train `model` for cfg.epochs epochs (continuing from `resume`), checkpointing into `out_dir`.

    args: plain description saved in every checkpoint so the model can be rebuilt (arch,
    num_classes, quant, bits, hardware...). extra: further caller data saved as checkpoint['extra'].
    params: parameter groups of the (loaded) model for the optimizer (default: optim.param_groups).
    max_batches: cap on training batches per epoch (quick runs, tests).
    dist: this process's place in a torchrun run (default: one process); sync_bn: SyncBatchNorm
    while training under DDP (GPUs only). The result is the same on every rank; it returns once
    rank 0's files are written.
    A NaN/infinite loss, gradient or parameter raises DivergedError naming the epoch, the batch
    and the first bad tensor; the last checkpoint stays, and none is written holding such a value.
    """
    out_dir = Path(out_dir)
    if dist.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    else:
        tracker = None
    model.to(device)
    criterion = build_criterion(cfg)
    state = None
    source = "the given checkpoint state"
    if resume is not None:
        state = resume if isinstance(resume, dict) else load_checkpoint(resume)
        source = source if isinstance(resume, dict) else str(resume)
    run = prepare_training(model, cfg, state, source, params)
    optimizer, scheduler, best_acc1, best_epoch = run.optimizer, run.scheduler, run.best_acc1, run.best_epoch
    start_epoch, history = run.start_epoch, run.history
    broadcast_module_state(model, dist)
    if state is not None and dist.is_main:
        repair_best(state, out_dir)
        log.info("resumed at epoch %d (best top-1 %.2f%%) from %s", start_epoch, best_acc1, source)
    if start_epoch >= cfg.epochs:
        log.info("already trained %d of %d epochs; nothing to do", start_epoch, cfg.epochs)

    started = time.time()
    last: dict = history[-1]["val"] if history else {}
    ckpt_path = out_dir / CHECKPOINT_NAME
    with ddp_model(model, dist, sync_bn) as train_model:
        for epoch in range(start_epoch, cfg.epochs):
            seed_epoch(seed, epoch, train_loader, dist.rank)
            lr = optimizer.param_groups[0]["lr"]
            try:
                train_stats = train_one_epoch(train_model, train_loader, criterion, optimizer, device,
                                              max_batches=max_batches, progress=progress,
                                              desc=f"epoch {epoch + 1}/{cfg.epochs}", dist=dist)
            except DivergedError as err:
                kept = f"{ckpt_path} (epoch {epoch}) is kept" if ckpt_path.exists() else "no checkpoint was written"
                first_update = epoch == 0 and err.step == 1 and err.kind != "parameter"
                raise DivergedError(f"training diverged in epoch {epoch + 1}/{cfg.epochs} at batch {err.step}: "
                                    f"{err.what()} became non-finite (learning rate {lr:.4g}); "
                                    f"{divergence_advice(err, first_update)}; {kept}",
                                    err.step, err.kind, err.tensor, err.loss) from None
            broadcast_module_state(model, dist)
            scheduler.step()
            last = evaluate(model, val_loader, criterion, device, dist=dist)
            is_best = last["top1"] > best_acc1
            if is_best:
                best_acc1, best_epoch = last["top1"], epoch + 1
            history.append({"epoch": epoch + 1, "lr": lr, "train": train_stats, "val": last})
            if not dist.is_main:
                continue
            log.info("epoch %d/%d lr %.4g | train loss %.4f top-1 %.2f%% | val loss %.4f top-1 %.2f%% top-5 %.2f%%%s",
                     epoch + 1, cfg.epochs, lr, train_stats["loss"], train_stats["top1"], last["loss"], last["top1"],
                     last["top5"], " (best)" if is_best else "")
            state = make_checkpoint(
                epoch=epoch + 1, state_dict=model.state_dict(), optimizer=optimizer.state_dict(),
                scheduler=scheduler.state_dict(), best_acc1=best_acc1, best_epoch=best_epoch, metrics=last,
                history=history, args=dict(args or {}), optim=plain(cfg), extra=plain(dict(extra or {})))
            save_checkpoint(state, out_dir, is_best=is_best, between=lambda: kill_point(epoch + 1, "best"))
            kill_point(epoch + 1, "checkpoint")
            if tracker is not None:
                tracker.log({"train/loss": train_stats["loss"], "train/top1": train_stats["top1"], "lr": lr,
                             "val/loss": last["loss"], "val/top1": last["top1"], "val/top5": last["top5"]}, epoch + 1)
    best_path = out_dir / BEST_NAME
    # rank 0 sends after its last write: no rank goes on before the checkpoints are on disk
    written = broadcast_object((ckpt_path.exists(), best_path.exists()), dist)
    return FitResult(best_acc1=best_acc1, best_epoch=best_epoch, last=last, history=history,
                     epochs_run=max(0, cfg.epochs - start_epoch), seconds=time.time() - started,
                     checkpoint=ckpt_path if written[0] else None, best_checkpoint=best_path if written[1] else None)
