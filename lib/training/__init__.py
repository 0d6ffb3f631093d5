"""Reusable training: epoch loop, evaluation, optimizer/schedule config, checkpoints, metric logging."""
from lib.training.checkpoint import (BEST_NAME, CHECKPOINT_FORMAT, CHECKPOINT_NAME, CheckpointError, load_checkpoint,
                                     load_model_state, make_checkpoint, repair_best, save_checkpoint)
from lib.training.loop import DivergedError, evaluate, train_one_epoch
from lib.training.metrics import RunningMeter, topk_correct
from lib.training.optim import OptimConfig, build_criterion, build_optimizer, build_scheduler, param_groups
from lib.training.resume import TrainingState, prepare_training
from lib.training.seeding import seed_epoch, seed_everything
from lib.training.tracking import Tracker
from lib.training.trainer import FitResult, fit

__all__ = [
    "BEST_NAME", "CHECKPOINT_FORMAT", "CHECKPOINT_NAME", "CheckpointError", "DivergedError", "FitResult",
    "OptimConfig", "RunningMeter", "Tracker", "TrainingState", "build_criterion", "build_optimizer",
    "build_scheduler", "evaluate", "fit", "load_checkpoint", "load_model_state", "make_checkpoint", "param_groups",
    "prepare_training", "repair_best", "save_checkpoint", "seed_epoch", "seed_everything", "topk_correct",
    "train_one_epoch",
]
