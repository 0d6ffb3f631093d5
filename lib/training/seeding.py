"""One seed for everything: global RNGs at start, and a fresh derived seed at each epoch.

Reseeding per epoch (global RNGs and the train loader's shuffle generator) makes epoch e
identical whether the run went straight through or resumed from a checkpoint at e. Under
torchrun the shuffle seed is the same on every rank (one permutation, split into shards) and the
global RNGs get the rank added (each rank augments its own images differently); rank 0 of a
multi-process run and a single process therefore draw the same augmentation stream.
"""
from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed python, numpy and torch; with `deterministic`, pin cuDNN to deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch) % 2**63


def seed_epoch(seed: int, epoch: int, loader=None, rank: int = 0) -> None:
    """Reseed global RNGs (augmentation, dropout; offset by `rank`) and `loader`'s shuffle (generator or
    shard sampler) for `epoch`."""
    s = epoch_seed(seed, epoch)
    local = (s + rank) % 2**63
    random.seed(local)
    np.random.seed(local % 2**32)
    torch.manual_seed(local)
    generator = getattr(loader, "generator", None)
    if generator is not None:
        generator.manual_seed(s)
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch_seed"):
        sampler.set_epoch_seed(s)
