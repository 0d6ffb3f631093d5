"""Metric sinks: TensorBoard always, Weights & Biases optionally and never blocking.

W&B is off by default. When enabled and the W&B server is unreachable, WANDB_MODE=offline is
set before wandb starts (runs sync later with `wandb sync`); any W&B failure only disables it.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
from pathlib import Path
from typing import Any, Mapping, Optional

log = logging.getLogger(__name__)

WANDB_HOST = ("api.wandb.ai", 443)


def network_reachable(address: tuple[str, int] = WANDB_HOST, timeout: float = 2.0) -> bool:
    """Whether a TCP connection to `address` opens within `timeout` s (DNS included, via a thread)."""
    result = {"ok": False}

    def probe() -> None:
        try:
            with socket.create_connection(address, timeout=timeout):
                result["ok"] = True
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return result["ok"]


def start_wandb(project: str, name: Optional[str], config: Mapping[str, Any], out_dir: Path):
    """A wandb run (offline when the server is unreachable), or None if wandb cannot start."""
    if "WANDB_MODE" not in os.environ and not network_reachable():
        os.environ["WANDB_MODE"] = "offline"
        log.warning("W&B server unreachable: logging offline to %s (sync later with `wandb sync`)", out_dir)
    try:
        import wandb

        return wandb.init(project=project, name=name, config=dict(config), dir=str(out_dir),
                          settings=wandb.Settings(init_timeout=60, silent=True))
    except Exception as err:  # W&B must never stop training
        log.warning("W&B disabled: %s", err)
        return None


class Tracker:
    """Send scalar metrics to TensorBoard (`out_dir/tb`) and, if a W&B project is given, to W&B."""

    def __init__(self, out_dir: str | Path, tensorboard: bool = True, wandb_project: Optional[str] = None,
                 run_name: Optional[str] = None, config: Optional[Mapping[str, Any]] = None):
        self.out_dir = Path(out_dir)
        self.writer = None
        self.wandb_run = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(self.out_dir / "tb"))
        if wandb_project:
            self.wandb_run = start_wandb(wandb_project, run_name, config or {}, self.out_dir)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        if self.writer is not None:
            for key, value in metrics.items():
                self.writer.add_scalar(key, value, step)
            self.writer.flush()
        if self.wandb_run is not None:
            try:
                self.wandb_run.log(dict(metrics), step=step)
            except Exception as err:  # W&B must never stop training
                log.warning("W&B logging failed, disabling it: %s", err)
                self.wandb_run = None

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.wandb_run is not None:
            try:
                self.wandb_run.finish()
            except Exception as err:
                log.warning("W&B finish failed: %s", err)
            self.wandb_run = None
