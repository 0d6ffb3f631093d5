"""Deterministic, class-balanced held-out split of the *training* images.

The search measures accuracy on images held out of the training set, so the real val set
stays untouched for final reporting. Same targets + same spec → same split, always.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np

Size = Union[int, float]


@dataclass(frozen=True)
class HoldoutSpec:
    """size: images held out (int) or a fraction of the training set (float in (0, 1)).
    train_size: cap on the remaining training images (int or fraction of the set; None = all).
    seed: fixes which images are chosen.
    """

    size: Size
    train_size: Optional[Size] = None
    seed: int = 0


def _count(value: Size, total: int, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"holdout {key}={value!r} is not allowed: expected an int count or a fraction in (0, 1)")
    if isinstance(value, float):
        if not 0.0 < value < 1.0:
            raise ValueError(f"holdout {key}={value!r} is not allowed: a fraction must lie in (0, 1)")
        return max(1, int(round(value * total)))
    if value < 1:
        raise ValueError(f"holdout {key}={value!r} is not allowed: expected a count >= 1")
    return int(value)


def holdout_split(targets: Sequence[int], spec: HoldoutSpec) -> tuple[list[int], list[int]]:
    """(train indices, held-out indices) into `targets`, drawn round-robin over classes."""
    targets = np.asarray(targets)
    total = len(targets)
    n_hold = _count(spec.size, total, "size")
    if n_hold >= total:
        raise ValueError(f"holdout size={spec.size!r} leaves no training images: the training set has {total}")
    rng = np.random.RandomState(spec.seed)
    ranked = []  # (rank within class, class tie-break, index): round-robin over shuffled classes
    for tie, label in enumerate(rng.permutation(np.unique(targets))):
        members = rng.permutation(np.flatnonzero(targets == label))
        ranked += [(rank, tie, int(i)) for rank, i in enumerate(members)]
    order = [i for _, _, i in sorted(ranked)]
    hold, rest = order[:n_hold], order[n_hold:]
    if spec.train_size is not None:
        n_train = _count(spec.train_size, total, "train_size")
        if n_train > len(rest):
            raise ValueError(f"holdout train_size={spec.train_size!r} exceeds the {len(rest)} images left "
                             f"after holding out {n_hold}")
        rest = rest[:n_train]
    return sorted(rest), sorted(hold)
