"""What every stage CLI does around its work: logging, torch threads, and user errors as one line
on stderr with exit status 2 (tracebacks are for bugs, not for bad input)."""
from __future__ import annotations

import atexit
import logging
import os
import sys
from typing import Callable, Mapping

from lib.errors import UserError
from lib.heap import configure_heap

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup(log_level: str = "info", threads: int = 0) -> None:
    """Configure logging, the CIM kernels' compile mode ($CIM_AQ_COMPILE), gradient-product
    format ($CIM_AQ_GRADIENT_PRODUCTS) and what happens to freed memory ($CIM_AQ_FREED_MEMORY,
    lib.heap), each pinned once per process (a bad value exits 2), and, when threads > 0, the
    number of torch CPU threads."""
    logging.basicConfig(level=log_level.upper(), format=LOG_FORMAT)
    # lazy: these load torch, which --help never needs
    from lib.cim.adc_kernels import configure_compile
    from lib.cim.gradient_products import configure_gradient_products
    if run(configure_heap) or run(configure_compile) or run(configure_gradient_products):
        raise SystemExit(2)
    if threads > 0:
        import torch

        torch.set_num_threads(threads)


class FlagError(UserError, ValueError):
    """A command-line value outside what the flag allows."""


def check_minimums(args, minimums: Mapping[str, int]) -> None:
    """Refuse integer flags below their minimum ({dest: minimum}); a flag left at None is not checked."""
    for dest, minimum in minimums.items():
        value = getattr(args, dest, None)
        if value is not None and value < minimum:
            raise FlagError(f"--{dest.replace('_', '-')}={value} is not allowed: expected an integer >= {minimum}")


def run(job: Callable[[], object], user_errors: tuple = (UserError,)) -> int:
    """Run `job`; a user error (bad value, missing file, mismatched policy...) prints `error: ...`
    and returns 2, Ctrl-C returns 130 without a traceback, anything else propagates."""
    try:
        job()
    except user_errors as err:
        rank = os.environ.get("RANK", "0") if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "0"
        print(f"error: {err}" if rank == "0" else f"error (rank {rank}): {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: files written so far are kept (a training run continues with --resume auto)",
              file=sys.stderr)
        return 130
    return 0


def pick_device(name: str):
    """'auto' → CUDA when available, else CPU; otherwise the named torch device."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise FlagError(f"--device {name!r} is not a torch device (auto, cpu, cuda, cuda:N): {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FlagError(f"--device {name!r}: CUDA is not available on this machine; use --device cpu or auto")
    return device


def init_context(device_name: str, sync_bn: bool = False):
    """This process's device and place in the run: a torchrun process group, else one process.

    Ranks other than 0 log warnings and errors only (rank 0 reports the run); the group is left at
    exit. sync_bn (--sync-bn) is checked here, before any work.
    """
    from lib.distributed import check_sync_bn, close, init_distributed  # torch: imported with the first device

    ctx = init_distributed(pick_device(device_name))
    if ctx.distributed:
        atexit.register(close)
    if not ctx.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    check_sync_bn(sync_bn, ctx)
    return ctx


def add_distributed_args(group) -> None:
    """--sync-bn, for the training CLIs (meaningful under torchrun on GPUs)."""
    group.add_argument("--sync-bn", action="store_true",
                       help="under torchrun on GPUs: synchronise BatchNorm statistics across processes while training")
