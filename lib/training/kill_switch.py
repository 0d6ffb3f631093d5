"""Testing hook: a training process that SIGKILLs itself at a chosen point, for real crash tests.

Set CIM_AQ_KILL_AT=<epoch>:<point> in the environment of a training run; when epoch <epoch>
(1-based) reaches <point> the process sends itself SIGKILL — no cleanup, no flush, exactly like an
out-of-memory kill or a pulled plug. Points:
  best        after model_best.pth.tar is written, before checkpoint.pth.tar
  checkpoint  after checkpoint.pth.tar is written
Unset (the normal case), it does nothing.
"""
from __future__ import annotations

import os
import signal

ENV_VAR = "CIM_AQ_KILL_AT"
POINTS = ("best", "checkpoint")


def kill_point(epoch: int, point: str) -> None:
    """SIGKILL this process if CIM_AQ_KILL_AT names this epoch and point."""
    wanted = os.environ.get(ENV_VAR)
    if wanted and wanted == f"{epoch}:{point}":
        os.kill(os.getpid(), signal.SIGKILL)
