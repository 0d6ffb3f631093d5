"""What the process does with memory that large tensors free: keep it for the next step to reuse
(`keep`, what the stage CLIs set) or hand it back to the system at once (`release`, glibc's own
behaviour).

A training step frees and allocates the same large tensors every step; a CIM conv's partial sums
alone are tens of MiB per layer. glibc serves every block above its mmap threshold (at most 32 MiB,
however it adapts) with a fresh mapping and unmaps it on free, so the next step faults the same
pages in again, 4 KiB at a time, each zero-filled by the kernel. On this project's CPUs that was a
fifth of a CIM conv's forward+backward. `keep` turns those mappings off and the heap's trimming
with it (glibc's mallopt): freed blocks stay in the heap, and the next step's tensors of the same
sizes take them over without a fault. Each process's resident memory then stays at its own peak
(every torchrun rank, every DataLoader worker forked after the set-up), as with a GPU's caching
allocator.

Set once per process by the CLIs' set-up from the runtime settings (lib.cim.runtime's
`freed_memory`, default keep), through `configure_heap`. A user who set
glibc's own variables for these knobs (`GLIBC_SETTINGS`, or their `GLIBC_TUNABLES` names) chose
the policy: it is left to them. Without glibc (musl, macOS, Windows) there is nothing to set and
`release` is what happens.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
from typing import Optional

from lib.errors import UserError

log = logging.getLogger(__name__)

POLICIES = ("keep", "release")
GLIBC_ENVIRONMENT = "glibc environment"  # what the policy reads where a user set glibc's own variables
# glibc's environment settings of the same knobs: a user who sets one has chosen the policy
GLIBC_SETTINGS = ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")
GLIBC_TUNABLE_SETTINGS = ("glibc.malloc.mmap_max", "glibc.malloc.mmap_threshold", "glibc.malloc.trim_threshold",
                          "glibc.malloc.top_pad")

# mallopt parameters and glibc's defaults for them
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
DEFAULT_TRIM_THRESHOLD, DEFAULT_MMAP_MAX = 128 * 1024, 65536
KEPT_TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: the heap top is trimmed only past 2 GiB free


class HeapPolicyError(UserError, ValueError):
    """A freed-memory policy other than keep or release."""


def _parse(value: str, source: str) -> str:
    name = str(value).strip().lower()
    if name not in POLICIES:
        raise HeapPolicyError(f"{source}={value!r} is not allowed: expected one of {list(POLICIES)}")
    return name


def _glibc() -> Optional[ctypes.CDLL]:
    """The C library when it is glibc (it has mallopt and malloc_trim), else None."""
    if os.name != "posix":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))  # None: the process's own symbols, libc's among them
    except (OSError, TypeError):
        return None
    if not all(hasattr(libc, symbol) for symbol in ("mallopt", "malloc_trim", "gnu_get_libc_version")):
        return None
    return libc


def _user_settings() -> list[str]:
    """glibc's own variables for the knobs `keep` sets, where a user set any."""
    chosen = [name for name in GLIBC_SETTINGS if name in os.environ]
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    chosen += [name for name in GLIBC_TUNABLE_SETTINGS if name + "=" in tunables]
    return chosen


def _mallopt_all(libc: ctypes.CDLL, settings: list[tuple[int, int, int]]) -> bool:
    """Apply (parameter, value, value to restore) in order; on a refusal, restore those applied
    already and return False."""
    for done, (parameter, value, _) in enumerate(settings):
        if not libc.mallopt(parameter, value):
            for earlier, _, restore in settings[:done]:
                libc.mallopt(earlier, restore)
            return False
    return True


class _Heap:
    """Owns this process's freed-memory policy: none set until `configure`."""

    def __init__(self) -> None:
        self._policy: Optional[str] = None

    @property
    def policy(self) -> str:
        """The policy in force: keep, release (glibc's behaviour, also where nothing was set) or
        the user's own glibc settings (`GLIBC_ENVIRONMENT`)."""
        return self._policy or "release"

    def configure(self, value: str) -> str:
        """Apply `value` (keep | release); returns the policy in force.
        `release` after `keep` in one process (tests, benchmarks) restores glibc's default values,
        which glibc then holds fixed rather than adapting them as it does before any mallopt."""
        wanted = _parse(value, "freed memory")
        chosen = _user_settings()
        if chosen:
            log.debug("freed memory left to glibc's own settings (%s)", ", ".join(chosen))
            self._policy = GLIBC_ENVIRONMENT
            return self._policy
        libc = _glibc()
        if libc is None:
            log.debug("no glibc here: freed memory goes back to the system")
            return self.policy
        if wanted == "keep":
            applied = _mallopt_all(libc, [(M_MMAP_MAX, 0, DEFAULT_MMAP_MAX),
                                          (M_TRIM_THRESHOLD, KEPT_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD)])
        elif self._policy != "keep":  # nothing kept before: glibc's behaviour is release
            applied = True
        else:  # glibc's default values again, and what the heap kept handed back
            applied = _mallopt_all(libc, [(M_MMAP_MAX, DEFAULT_MMAP_MAX, 0),
                                          (M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD, KEPT_TRIM_THRESHOLD)])
            if applied:
                trim_heap()
        if not applied:
            log.warning("glibc refused the %r freed-memory policy; the %r policy stays", wanted, self.policy)
            return self.policy
        self._policy = wanted
        return wanted


HEAP = _Heap()


def configure_heap(value: str) -> str:
    """Set this process's freed-memory policy (keep | release); returns the one in force."""
    return HEAP.configure(value)


def trim_heap() -> bool:
    """Hand the heap's free memory back to the system now (glibc's malloc_trim), so that resident
    memory counts live blocks only; False without glibc."""
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


def heap_policy() -> str:
    """The freed-memory policy in force: keep, release or `GLIBC_ENVIRONMENT`."""
    return HEAP.policy
