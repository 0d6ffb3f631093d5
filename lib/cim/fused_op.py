"""One contract for the CIM layers' fused kernels: `FusedOp(name, functional, eager)`.

`op(*args)` runs `functional` compiled (on CPU a `DirectKernel`, called without TorchDynamo; else
`torch.compile`) where the runtime settings (lib.cim.runtime) and the device allow it and it
compiles, else `eager(*args)`: the same values either way. `op.into(out, *args)` runs the op's
`into` form, which writes its result into `out` (a block of a larger output, or a reused buffer),
and returns what that form returns; it returns None where no compiled form runs here, and the
caller then takes its own eager way (which may write elsewhere: a copy into `out` would cost a pass).
A failed compile logs once and that op runs eagerly from then on; the others stay fused.
"""
from __future__ import annotations

import functools
import logging
import shutil
from typing import Callable, Optional

import torch

from lib.cim.direct_kernels import DirectKernel, Refused, takes_directly
from lib.cim.runtime import RUNTIME, Runtime

log = logging.getLogger(__name__)

EXECUTORS = ("direct", "compiled", "eager")


@functools.lru_cache(maxsize=None)
def has_cxx() -> bool:
    """Whether a C++ compiler (which Inductor's CPU kernels need) is on PATH: looked up once per
    process, not on every kernel call."""
    return bool(shutil.which("c++") or shutil.which("g++"))


def executor_for(device_type: str, runtime: Runtime) -> str:
    """How fused kernels run on a device under `runtime`: direct (CPU, no TorchDynamo), compiled
    (torch.compile) or eager. `auto` runs eagerly on a CPU without a C++ compiler."""
    if runtime.compile == "0" or device_type not in ("cpu", "cuda"):
        return "eager"
    if runtime.compile == "auto" and device_type == "cpu" and not has_cxx():
        return "eager"
    return "direct" if device_type == "cpu" and runtime.direct_kernels else "compiled"


def _plain(a):
    """A kernel argument detached and dense: no autograd state or overlapping layout to guard on
    (tensors already so pass as they are)."""
    if not isinstance(a, torch.Tensor):
        return a
    if a.requires_grad:
        a = a.detach()
    if a.is_contiguous():
        return a
    if a.dim() == 4 and a.is_contiguous(memory_format=torch.channels_last):
        return a
    return a.contiguous()


def _device_type(args) -> str:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device.type
    return "cpu"


class _Compiled:
    """The compiled forms made so far, per op name: DirectKernels and torch.compile'd functions."""

    def __init__(self) -> None:
        self._kernels: dict = {}

    def get(self, name: str, fn: Callable, executor: str):
        key = (name, executor)
        kernel = self._kernels.get(key)
        if kernel is None:
            kernel = DirectKernel(name, fn) if executor == "direct" else torch.compile(fn, dynamic=True)
            self._kernels[key] = kernel
        return kernel

    @property
    def direct_variants(self) -> int:
        """Graphs compiled so far for the DirectKernels (TorchDynamo counts torch.compile's)."""
        return sum(k.variants for k in self._kernels.values() if isinstance(k, DirectKernel))


COMPILED = _Compiled()
_NOT_RUN = object()


def _call_compiled(name: str, fn: Callable, args: tuple, static: tuple, keep_first: bool):
    """fn(*args, *static) compiled as op `name`, or _NOT_RUN where it does not run compiled here."""
    runtime = RUNTIME.current
    executor = executor_for(_device_type(args), runtime)
    if executor == "eager" or name in RUNTIME.failed:
        return _NOT_RUN
    plain = [_plain(a) for a in args]
    if keep_first:  # an into form writes its first argument: keep it as given
        plain[0] = args[0]
    plain += static
    if executor == "direct" and not takes_directly(plain):
        executor = "compiled"  # a float argument would make a graph per value
    try:
        kernel = COMPILED.get(name, fn, executor)
        if executor == "direct":
            return kernel(*plain)
        config = torch._dynamo.config
        limit = config.recompile_limit
        config.recompile_limit = runtime.recompile_limit  # for this op's calls only
        try:
            return kernel(*plain)
        finally:
            config.recompile_limit = limit
    except Refused as err:  # this call's layout is not the traced one: eagerly, same values
        log.debug("%s; running it eagerly", err)
    except Exception as err:  # noqa: BLE001 - any compiler failure: same maths, eagerly
        if runtime.compile == "1":
            raise
        RUNTIME.mark_failed(name)
        log.warning("fused kernel %r unavailable (%s: %s); running it eagerly", name, type(err).__name__,
                    str(err).splitlines()[0][:200] if str(err) else "")
    return _NOT_RUN


class FusedOp:
    """A kernel with a fused (compiled) form and an eager form of the same values; optionally an
    `into` form writing its result into a given tensor (see the module docstring)."""

    def __init__(self, name: str, functional: Callable, eager: Callable, into: Optional[Callable] = None) -> None:
        self.name, self.functional, self.eager, self.into_functional = name, functional, eager, into

    def __call__(self, *args, static: tuple = ()):
        """functional(*args, *static) compiled, else eager(*args); `static`: arguments only the
        compiled form takes (a block count its reduction is written for)."""
        result = _call_compiled(self.name, self.functional, args, static, keep_first=False)
        return self.eager(*args) if result is _NOT_RUN else result

    def into(self, out: torch.Tensor, *args, static: tuple = ()):
        """into(out, *args, *static) compiled: what it returns (`out`, or the sums it computes
        besides); None where no compiled form runs here."""
        if self.into_functional is None:
            raise TypeError(f"fused op {self.name!r} has no into form")
        result = _call_compiled(self.name + "_into", self.into_functional, (out,) + args, static, keep_first=True)
        return None if result is _NOT_RUN else result

    def __repr__(self) -> str:
        return f"FusedOp({self.name!r})"
