"""Atomic file writes: temp file in the same folder, then rename, so a crash never leaves half a file.

Written files get the permissions a plain `open` would give (0666 less the umask), not mkstemp's
0600. A temp file is named `.<target>.<pid>.<random>.tmp`; one left by a killed process is removed
by `remove_stale_temp_files` on the next run in that folder.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, IO

TEMP_PATTERN = re.compile(r"^\..+\.(?P<pid>\d+)\.[^.]+\.tmp$")


def current_umask() -> int:
    """The process umask: from /proc on Linux (no race with other threads), else by setting and restoring it."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[IO], Any], binary: bool = False) -> Path:
    """Call `write(handle)` on a temp file beside `path`, fsync it, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
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


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (ours or another user's)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temp_files(folder: str | Path) -> list[Path]:
    """Delete the temp files of atomic writes whose process is gone (killed mid-write); returns them."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        match = TEMP_PATTERN.match(entry.name)
        if match and entry.is_file() and int(match["pid"]) != os.getpid() and not pid_alive(int(match["pid"])):
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """torch.save through atomic_write."""
    import torch  # lazy: this module serves torch-free tools too

    return atomic_write(path, lambda handle: torch.save(obj, handle), binary=True)


def atomic_write_json(path: str | Path, data: Any, **dump_kwargs: Any) -> Path:
    dump_kwargs.setdefault("indent", 2)
    return atomic_write(path, lambda handle: json.dump(data, handle, **dump_kwargs))
