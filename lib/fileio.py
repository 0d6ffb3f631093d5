"""Atomic file writes: temp file in the same folder, then rename, so a crash never leaves half a file."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, IO


def atomic_write(path: str | Path, write: Callable[[IO], Any], binary: bool = False) -> Path:
    """Call `write(handle)` on a temp file beside `path`, fsync it, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """torch.save through atomic_write."""
    import torch

    return atomic_write(path, lambda handle: torch.save(obj, handle), binary=True)


def atomic_write_json(path: str | Path, data: Any, **dump_kwargs: Any) -> Path:
    dump_kwargs.setdefault("indent", 2)
    return atomic_write(path, lambda handle: json.dump(data, handle, **dump_kwargs))
