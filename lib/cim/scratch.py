"""Reused per-thread CPU memory for the full-size temporaries of a CIM layer's backward pass.

On CPU a fresh tensor of tens of MB is mapped anew and every page faults on first touch; for the
partial-sum gradient that costs about as much as computing it. A temporary that lives only
within one backward call can instead reuse one buffer per thread and slot. CUDA's caching
allocator already reuses memory, so on CUDA no scratch is handed out.

The buffers have an owner: `scratch_buffers()`, a context manager (or decorator) around a run
of training steps (lib.training.fit, lib.search.run_search), frees them when the run ends. Outside
one, no scratch is handed out and callers allocate as usual.
"""
from __future__ import annotations

import math
import threading
from contextlib import contextmanager
from typing import Optional

import torch


class _Scratch(threading.local):
    def __init__(self) -> None:
        self.buffers: dict = {}
        self.depth = 0  # open scratch_buffers() blocks on this thread

    def tensor(self, slot: str, shape, like: torch.Tensor,
               dtype: Optional[torch.dtype] = None) -> Optional[torch.Tensor]:
        """A contiguous tensor of `shape` (dtype: like's unless given) backed by this thread's buffer
        for `slot` (grown when too small), or None off CPU or outside `scratch_buffers()`. Its
        contents are undefined and valid until the next request for the same slot: callers use it
        within one backward call and never return it."""
        if like.device.type != "cpu" or self.depth == 0:
            return None
        dtype = like.dtype if dtype is None else dtype
        numel = math.prod(shape)
        key = (slot, dtype)
        buffer = self.buffers.get(key)
        if buffer is None or buffer.numel() < numel:
            self.buffers.pop(key, None)  # free the old one before making the larger one
            buffer = self.buffers[key] = torch.empty(numel, dtype=dtype)
        # a fresh contiguous tensor on the buffer's storage (set_, not a view): kernels see no view base
        return torch.empty(0, dtype=dtype).set_(buffer.untyped_storage(), 0, tuple(shape))

    def release(self) -> None:
        self.buffers.clear()


SCRATCH = _Scratch()


def release_scratch() -> None:
    """Free this thread's scratch buffers (they are otherwise kept for the next training step)."""
    SCRATCH.release()


@contextmanager
def scratch_buffers():
    """Hand out scratch buffers to the backward passes inside the block and free them when the
    outermost block on this thread ends, however it ends."""
    SCRATCH.depth += 1
    try:
        yield SCRATCH
    finally:
        SCRATCH.depth -= 1
        if SCRATCH.depth == 0:
            SCRATCH.release()
