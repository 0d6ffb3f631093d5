"""Top-k accuracy and running averages for training/eval loops."""
from __future__ import annotations

from typing import Sequence

import torch

from lib.distributed import DistContext, all_reduce_sum


def topk_correct(output: torch.Tensor, target: torch.Tensor, ks: Sequence[int] = (1, 5)) -> list[int]:
    """How many samples have the target among the top-k logits, for each k (k capped at the class count)."""
    kmax = min(max(ks), output.shape[1])
    pred = output.topk(kmax, dim=1).indices
    hits = pred.eq(target.view(-1, 1))
    return [int(hits[:, :min(k, kmax)].any(dim=1).sum()) for k in ks]


class RunningMeter:
    """Sample-weighted sums of loss and top-1/top-5 hits over a pass."""

    def __init__(self) -> None:
        self.samples = 0
        self.loss_sum = 0.0
        self.top1 = 0
        self.top5 = 0

    def update(self, loss: float, output: torch.Tensor, target: torch.Tensor) -> None:
        n = target.shape[0]
        c1, c5 = topk_correct(output, target, (1, 5))
        self.samples += n
        self.loss_sum += float(loss) * n
        self.top1 += c1
        self.top5 += c5

    def all_reduce(self, ctx: DistContext) -> "RunningMeter":
        """Sum the counts of every rank into this meter (exact: each rank saw disjoint samples)."""
        self.samples, self.loss_sum, self.top1, self.top5 = all_reduce_sum(
            [self.samples, self.loss_sum, self.top1, self.top5], ctx)
        self.samples, self.top1, self.top5 = int(self.samples), int(self.top1), int(self.top5)
        return self

    def summary(self) -> dict:
        """{'loss', 'top1', 'top5' (percent), 'samples'}."""
        n = max(self.samples, 1)
        return {"loss": self.loss_sum / n, "top1": 100.0 * self.top1 / n, "top5": 100.0 * self.top5 / n,
                "samples": self.samples}
