"""Where a stage CLI writes: checked before any work, and never over another run unless the user says so.

A folder "holds a run" when it has any of RUN_MARKERS. Such a folder is refused unless the user
continues it (--resume / --resume auto) or replaces it (--overwrite). Output paths are checked up
front: a folder that is a file, a file that is a folder, or a place the user cannot write to is an
error naming the path, raised before data, models or any file is touched.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

from lib.errors import UserError
from lib.fileio import remove_stale_temp_files

log = logging.getLogger(__name__)

RUN_MARKERS = ("checkpoint.pth.tar", "model_best.pth.tar", "args.json", "metrics.json", "report.json")


class OutputPathError(UserError, ValueError):
    """An output path that cannot be written, or that holds work the user did not ask to replace."""


def nearest_existing(path: Path) -> Path:
    """`path` itself or its closest existing ancestor."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_creatable(path: Path, flag: str) -> None:
    """Refuse a path to create whose closest existing ancestor is not a folder we may write into."""
    anchor = nearest_existing(path)
    if not anchor.is_dir():
        raise OutputPathError(f"{flag} {path}: {anchor} is a file, not a folder")
    if not os.access(anchor, os.W_OK | os.X_OK):
        raise OutputPathError(f"{flag} {path}: folder {anchor} is not writable")


def check_output_dir(path: str | Path, flag: str = "--output-dir") -> Path:
    """An output folder that exists as a writable folder or can be created; returns it."""
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise OutputPathError(f"{flag} {path} is a file, not a folder")
        if not os.access(path, os.W_OK | os.X_OK):
            raise OutputPathError(f"{flag} {path} is not writable")
        return path
    check_creatable(path, flag)
    return path


def check_output_file(path: str | Path, flag: str, overwrite: Optional[bool] = None) -> Path:
    """An output file path that is not a folder and can be written; with `overwrite` False, not an existing file."""
    path = Path(path)
    if path.is_dir():
        raise OutputPathError(f"{flag} {path} is a folder; give a file path")
    if path.exists():
        if overwrite is False:
            raise OutputPathError(f"{flag} {path} exists; pass --overwrite to replace it or choose another path")
        if not os.access(path, os.W_OK):
            raise OutputPathError(f"{flag} {path} is not writable")
        return path
    check_creatable(path, flag)
    return path


def run_markers(path: str | Path) -> list[str]:
    """The RUN_MARKERS present in folder `path`."""
    return [name for name in RUN_MARKERS if (Path(path) / name).exists()]


def check_run_dir(path: str | Path, *, resume: bool, overwrite: bool, flag: str = "--output-dir") -> Path:
    """A usable output folder that holds no other run, unless resuming it or told to overwrite it."""
    path = check_output_dir(path, flag)
    found = run_markers(path)
    if found and not (resume or overwrite):
        raise OutputPathError(
            f"{flag} {path} already holds a run ({', '.join(found)}); pass --resume auto to continue it, "
            f"--overwrite to replace it, or choose another {flag}")
    if found and overwrite and not resume:
        log.warning("--overwrite: replacing the run in %s", path)
    return path


def open_run_dir(path: str | Path) -> Path:
    """Create the (checked) run folder and remove temp files that killed writes left there."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for stale in remove_stale_temp_files(path):
        log.info("removed %s, left by an interrupted write", stale.name)
    return path


def add_overwrite_arg(parser, what: str = "the run in --output-dir") -> None:
    """The --overwrite flag of every stage CLI."""
    parser.add_argument("--overwrite", action="store_true",
                        help=f"replace {what} (without it, existing work is refused, never overwritten)")
