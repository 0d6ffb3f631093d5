"""The process's CIM runtime settings, one frozen value with one owner.

How the CIM layers' kernels run is a handful of process-wide choices: whether the elementwise
kernels are fused (`compile`), whether CPU kernels skip TorchDynamo (`direct_kernels`), whether
partial sums are integer products where the CPU has exact int8 kernels (`integer_products`), the
dtype of the training step's gradient products, what the heap does with freed memory, and how
many graph variants a compiled kernel may keep. They are read from the environment once (the
first time anything asks, or by the CLIs' set-up, which refuses a bad value with exit status 2),
changed only inside `RUNTIME.use(**changes)` and written into every report (`RUNTIME.report()`).
This is the only module that reads these variables; docs/environment.md lists every variable the
project reads.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass
from typing import Iterator, Mapping, Optional

from lib.errors import UserError
from lib.heap import POLICIES as HEAP_POLICIES, configure_heap, heap_policy

COMPILE_MODES = ("auto", "0", "1")
GRADIENT_PRODUCT_DTYPES = ("float32", "bfloat16")
SWITCHES = ("on", "off")
DEFAULT_RECOMPILE_LIMIT = 64  # a model's layers differ in groups/tiles/slices and batch sizes

# field -> (environment variable, default as written there)
ENVIRONMENT = {
    "compile": ("CIM_AQ_COMPILE", "auto"),
    "direct_kernels": ("CIM_AQ_DIRECT_KERNELS", "on"),
    "integer_products": ("CIM_AQ_INTEGER_PRODUCTS", "on"),
    "gradient_products": ("CIM_AQ_GRADIENT_PRODUCTS", "float32"),
    "freed_memory": ("CIM_AQ_FREED_MEMORY", "keep"),
    "recompile_limit": ("CIM_AQ_RECOMPILE_LIMIT", str(DEFAULT_RECOMPILE_LIMIT)),
}


def environment_variable(field: str) -> str:
    """The environment variable a runtime setting is read from (for a parent setting a child's)."""
    return ENVIRONMENT[field][0]


class RuntimeSettingError(UserError, ValueError):
    """A runtime setting outside what it allows."""


@dataclass(frozen=True)
class Runtime:
    """How the CIM kernels run (see the module docstring). `integer_products` and
    `gradient_products` say what is asked for: a CPU without exact int8 kernels or native
    bfloat16 runs float32 products whatever they say (lib.cim.route decides per layer)."""

    compile: str = "auto"  # auto: fused where a compiler works, eager elsewhere; 1: fused or fail; 0: eager
    direct_kernels: bool = True  # CPU fused kernels called without TorchDynamo (lib.cim.direct_kernels)
    integer_products: bool = True
    gradient_products: str = "float32"
    freed_memory: str = "keep"  # lib.heap: applied by the CLIs' set-up
    recompile_limit: int = DEFAULT_RECOMPILE_LIMIT  # graph variants per torch.compile'd kernel

    def __post_init__(self) -> None:
        _allowed("compile", self.compile, COMPILE_MODES)
        _allowed("gradient_products", self.gradient_products, GRADIENT_PRODUCT_DTYPES)
        _allowed("freed_memory", self.freed_memory, HEAP_POLICIES)
        for name in ("direct_kernels", "integer_products"):
            if not isinstance(getattr(self, name), bool):
                raise RuntimeSettingError(f"{name}={getattr(self, name)!r} is not allowed: expected True or False")
        if isinstance(self.recompile_limit, bool) or not isinstance(self.recompile_limit, int) \
                or self.recompile_limit < 1:
            raise RuntimeSettingError(f"recompile_limit={self.recompile_limit!r} is not allowed: "
                                      "expected an integer >= 1")

    @classmethod
    def from_environment(cls, environ: Optional[Mapping[str, str]] = None) -> "Runtime":
        """The settings the environment asks for (unset variables: the defaults); a bad value is
        refused naming the variable and what it allows."""
        environ = os.environ if environ is None else environ
        values = {}
        for field, (variable, default) in ENVIRONMENT.items():
            raw = environ.get(variable) or default
            values[field] = _parse(field, variable, raw)
        return cls(**values)


def _allowed(name: str, value, allowed) -> None:
    if value not in allowed:
        raise RuntimeSettingError(f"{name}={value!r} is not allowed: expected one of {list(allowed)}")


def _parse(field: str, variable: str, raw: str):
    value = str(raw).strip().lower()
    if field in ("direct_kernels", "integer_products"):
        if value not in SWITCHES:
            raise RuntimeSettingError(f"{variable}={raw!r} is not allowed: expected one of {list(SWITCHES)}")
        return value == "on"
    if field == "recompile_limit":
        if not value.isdigit() or int(value) < 1:
            raise RuntimeSettingError(f"{variable}={raw!r} is not allowed: expected an integer >= 1")
        return int(value)
    allowed = {"compile": COMPILE_MODES, "gradient_products": GRADIENT_PRODUCT_DTYPES,
               "freed_memory": HEAP_POLICIES}[field]
    if value not in allowed:
        raise RuntimeSettingError(f"{variable}={raw!r} is not allowed: expected one of {list(allowed)}")
    return value


class _Switchboard:
    """Owns the `Runtime` in force: the environment's until `use` changes it inside a block."""

    def __init__(self) -> None:
        self._current: Optional[Runtime] = None
        self._failed: set[str] = set()  # fused kernels whose compile failed under the settings in force

    @property
    def current(self) -> Runtime:
        if self._current is None:
            self._current = Runtime.from_environment()
        return self._current

    @contextlib.contextmanager
    def use(self, runtime: Optional[Runtime] = None, **changes) -> Iterator[Runtime]:
        """Inside the block, `runtime` (default: the one in force) with `changes`; restored after."""
        base = self.current if runtime is None else runtime
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(Runtime)})
        if unknown:
            raise RuntimeSettingError(f"unknown runtime setting(s) {unknown}: allowed are "
                                      f"{[f.name for f in dataclasses.fields(Runtime)]}")
        previous = self._current
        self._set(dataclasses.replace(base, **changes))
        try:
            yield self._current
        finally:
            self._set(previous)

    def _set(self, runtime: Optional[Runtime]) -> None:
        self._current = runtime
        self._failed = set()  # other settings: a kernel that failed may compile now

    def configure_from_environment(self) -> Runtime:
        """Read the environment again (the CLIs' set-up: a bad value is refused here, before any
        work) and make it the runtime in force; returns it."""
        self._set(Runtime.from_environment())
        return self._current

    def mark_failed(self, kernel: str) -> None:
        """Record that fused kernel `kernel` failed to compile: it runs eagerly from now on."""
        self._failed.add(kernel)

    @property
    def failed(self) -> frozenset:
        """Fused kernels that failed to compile under the settings in force, now run eagerly."""
        return frozenset(self._failed)

    def apply_heap(self) -> str:
        """Apply the freed-memory policy in force to this process's heap (lib.heap); returns the
        policy then in force."""
        return configure_heap(self.current.freed_memory)

    def report(self) -> dict:
        """What a run's report records about how its kernels ran: the settings in force, the
        freed-memory policy the heap actually has, and the kernels that fell back to eager after a
        failed compile."""
        return {**dataclasses.asdict(self.current), "freed_memory_in_force": heap_policy(),
                "eager_after_failed_compile": sorted(self._failed)}


RUNTIME = _Switchboard()
