"""Multi-process runs under `torchrun`: one process group per run, set up from the environment.

`torchrun --nproc_per_node=N script.py ...` sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR for
each process; `init_distributed` turns them into a `DistContext` (NCCL on CUDA, Gloo on CPU). A
plain `python script.py` gets the single-process context, and every helper here is then a no-op,
so the stage code reads the same either way. Rank 0 alone writes files and logs results.
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Sampler

from lib.errors import UserError

log = logging.getLogger(__name__)


class DistributedSetupError(UserError, ValueError):
    """A multi-process setting this run cannot honour (e.g. --sync-bn without GPUs)."""


@dataclass(frozen=True)
class DistContext:
    """This process's place in the run: rank, world size, local rank and the device it uses."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes checkpoints, logs, reports and exports."""
        return self.rank == 0


SINGLE = DistContext()


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def free_port() -> int:
    """A TCP port no process on this machine listens on now (for a single-node torchrun's --master-port)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun_command(script: str | os.PathLike, args: list, nproc_per_node: int,
                     python: str = sys.executable) -> list[str]:
    """The command that runs `script args` in `nproc_per_node` processes on this node, with `python`'s torchrun."""
    torchrun = os.path.join(os.path.dirname(python), "torchrun")
    return [torchrun, f"--nproc_per_node={nproc_per_node}", "--master-port", str(free_port()), str(script),
            *map(str, args)]


def init_distributed(device: torch.device) -> DistContext:
    """The context of this process: a process group when torchrun started several, else one process.

    device: the device the user asked for ('cuda' becomes cuda:LOCAL_RANK under torchrun).
    Joining the group waits for every process, so it also orders the ranks' start-up checks
    before any rank writes.
    """
    if not launched_by_torchrun():
        return DistContext(device=device)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise DistributedSetupError(f"local rank {local_rank} has no GPU: this node has "
                                        f"{torch.cuda.device_count()}; lower --nproc_per_node")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    log.info("process %d of %d (local rank %d) on %s", rank, world, local_rank, device)
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, device=device)


def close() -> None:
    """Leave the process group, if this process joined one (at exit; no collective, so it never hangs)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    """Wait until every rank arrives (e.g. while rank 0 writes files the others read next)."""
    if ctx.distributed:
        dist.barrier()


def all_reduce_sum(values: list[float], ctx: DistContext) -> list[float]:
    """Element-wise sum of `values` over all ranks (float64, exact for sample counts)."""
    if not ctx.distributed:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=_comm_device(ctx))
    dist.all_reduce(tensor)
    return tensor.tolist()


def broadcast_object(obj: Any, ctx: DistContext) -> Any:
    """Rank 0's `obj` on every rank (e.g. the policy the agent chose)."""
    if not ctx.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=_comm_device(ctx) if ctx.device.type == "cuda" else None)
    return box[0]


@torch.no_grad()
def broadcast_module_state(module: nn.Module, ctx: DistContext) -> None:
    """Make every rank hold rank 0's parameters and buffers (after a per-rank calibration, say).

    In place, tensor by tensor. Python mirrors of buffers (a CIM layer's bit widths and
    'initialised' flags) are not touched: every rank sets them by running the same code.
    """
    if not ctx.distributed:
        return
    for tensor in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(tensor.data, src=0)


def _comm_device(ctx: DistContext) -> torch.device:
    return ctx.device if ctx.device.type == "cuda" else torch.device("cpu")


class ShardSampler(Sampler[int]):
    """This rank's share of a dataset, reshuffled per epoch from one seed shared by all ranks.

    shuffle=True (training): one permutation drawn from `seed` + the epoch, padded by wrapping so
    every rank gets the same number of samples (DDP steps in lockstep). shuffle=False
    (evaluation): indices rank, rank + N, ... with no padding, so all-reduced metrics count every
    sample exactly once.
    """

    def __init__(self, length: int, ctx: DistContext, shuffle: bool, seed: int = 0):
        self.length, self.ctx, self.shuffle, self.seed = length, ctx, shuffle, seed
        world = ctx.world_size
        self.per_rank = -(-length // world) if shuffle else len(range(ctx.rank, length, world))

    def set_epoch_seed(self, seed: int) -> None:
        """Permutation seed of the coming epoch (the training loop's per-epoch seed, equal on all ranks)."""
        self.seed = seed

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.ctx.rank, self.length, self.ctx.world_size))
        generator = torch.Generator()
        generator.manual_seed(self.seed)
        order = torch.randperm(self.length, generator=generator).tolist()
        total = self.per_rank * self.ctx.world_size
        while len(order) < total:  # wrap (more than once when there are fewer samples than ranks)
            order += order[:total - len(order)]
        return iter(order[self.ctx.rank:total:self.ctx.world_size])

    def __len__(self) -> int:
        return self.per_rank


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (checkpoints never carry `module.`)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def check_sync_bn(sync_bn: bool, ctx: DistContext) -> None:
    """Refuse --sync-bn where SyncBatchNorm cannot train (it synchronises on GPUs only)."""
    if sync_bn and ctx.distributed and ctx.device.type != "cuda":
        raise DistributedSetupError(f"--sync-bn needs CUDA devices (this run is on {ctx.device.type}); "
                                    f"drop --sync-bn to keep per-process BatchNorm statistics")


@contextlib.contextmanager
def ddp_model(model: nn.Module, ctx: DistContext, sync_bn: bool = False) -> Iterator[nn.Module]:
    """`model` for training on this rank: DDP when distributed, starting from rank 0's parameters and buffers.

    sync_bn: BatchNorm layers become SyncBatchNorm for the duration and are put back afterwards
    (they share parameters and statistics, so nothing is lost and `model` keeps its own classes).
    Parameters that receive no gradient (e.g. the step of a disabled ADC) are found in the first
    step: the graph is declared static, which CIM layers are once calibrated.
    """
    if not ctx.distributed:
        yield model
        return
    check_sync_bn(sync_bn, ctx)
    replaced = _to_sync_batchnorm(model) if sync_bn else {}
    try:
        ids: Optional[list[int]] = [ctx.device.index] if ctx.device.type == "cuda" else None
        yield nn.parallel.DistributedDataParallel(model, device_ids=ids, static_graph=True)
    finally:
        for name, original in replaced.items():
            model.set_submodule(name, original)


def _to_sync_batchnorm(model: nn.Module) -> dict[str, nn.Module]:
    """Swap every BatchNorm layer for a SyncBatchNorm sharing its tensors; returns {name: original layer}."""
    replaced = {}
    for name, module in list(model.named_modules()):
        if not name or not isinstance(module, nn.modules.batchnorm._BatchNorm) or isinstance(module, nn.SyncBatchNorm):
            continue
        sync = nn.SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                module.track_running_stats)
        if module.affine:
            sync.weight, sync.bias = module.weight, module.bias
        if module.track_running_stats:
            sync.running_mean, sync.running_var = module.running_mean, module.running_var
            sync.num_batches_tracked = module.num_batches_tracked
        sync.train(module.training)
        model.set_submodule(name, sync)
        replaced[name] = module
    return replaced
