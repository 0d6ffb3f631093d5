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
    """Configure logging; read the CIM runtime settings from the environment (lib.cim.runtime:
    compile mode, integer and gradient products, freed memory...; a bad value exits 2) and apply
    the freed-memory policy to this process's heap; and, when threads > 0, set the number of torch
    CPU threads. `run` then runs the job under those settings."""
    logging.basicConfig(level=log_level.upper(), format=LOG_FORMAT)
    # lazy: these load torch, which --help never needs
    from lib.cim.gradient_products import native_bfloat16
    from lib.cim.runtime import Runtime

    read: list = []
    if run(lambda: read.append(Runtime.from_environment())):
        raise SystemExit(2)
    runtime = read[0]
    configure_heap(runtime.freed_memory)
    if runtime.gradient_products == "bfloat16" and not native_bfloat16():
        logging.getLogger(__name__).info("bfloat16 gradient products asked for, but this CPU has no native "
                                         "bfloat16: float32 kept")
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
        _under_environment_runtime(job)
    except user_errors as err:
        rank = os.environ.get("RANK", "0") if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "0"
        print(f"error: {err}" if rank == "0" else f"error (rank {rank}): {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: files written so far are kept (a training run continues with --resume auto)",
              file=sys.stderr)
        return 130
    return 0


def _under_environment_runtime(job: Callable[[], object]) -> None:
    """job() under the runtime settings the environment asks for (lib.cim.runtime), restored after:
    a stage run in-process leaves the process's settings as it found them. Jobs that never touch
    the CIM layers (--help, config checks) do not import them."""
    runtime = sys.modules.get("lib.cim.runtime")
    if runtime is None:
        job()
        return
    with runtime.RUNTIME.use(runtime.Runtime.from_environment()):
        job()


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
