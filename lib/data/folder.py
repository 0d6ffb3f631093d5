"""ImageFolder datasets (`root/train/<class>/*`, `root/val/<class>/*`) with checks that name the path.

Our own small scanner instead of torchvision's ImageFolder so that bad input (missing folders,
empty classes, unreadable files, train/val class mismatch) gives an error or warning that says
exactly which path is wrong, before any training starts.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from PIL import Image
from torch.utils.data import Dataset
from lib.errors import UserError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# Up to this many files per split are opened and verified at scan time; larger splits are
# checked lazily when a sample is read (see ImageFolderDataset.__getitem__).
VERIFY_LIMIT = 20_000
# More unreadable files than this in one split is an error rather than a warning.
MAX_BAD_FILES = 5


class DatasetError(UserError, ValueError):
    """A dataset directory or file that cannot be used as given; the message names the path."""


@dataclass
class ScannedSplit:
    """One split (train or val) of an ImageFolder tree: class names and (path, label) samples."""

    root: Path
    classes: list[str]
    samples: list[tuple[str, int]]
    skipped: list[str]


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _readable(path: str) -> bool:
    try:
        with Image.open(path) as img:
            img.verify()
        return True
    except Exception:  # PIL raises many types for broken files
        return False


def _drop_unreadable(split_root: Path, samples: list, max_bad: int) -> tuple[list, list[str]]:
    bad = [path for path, _ in samples if not _readable(path)]
    if not bad:
        return samples, []
    if len(bad) > max_bad:
        raise DatasetError(
            f"{split_root}: {len(bad)} image files cannot be read (more than {max_bad}), e.g. "
            f"{', '.join(bad[:3])}")
    for path in bad:
        log.warning("skipping unreadable image file %s", path)
    log.warning("%s: skipped %d unreadable image file(s)", split_root, len(bad))
    bad_set = set(bad)
    return [s for s in samples if s[0] not in bad_set], bad


def scan_split(split_root: str | Path, classes: Optional[Sequence[str]] = None,
               verify: Optional[bool] = None, max_bad: int = MAX_BAD_FILES) -> ScannedSplit:
    """List `split_root/<class>/<image>` files; `classes` fixes the label order (else sorted folder names).

    verify=None opens every file when the split has at most VERIFY_LIMIT files.
    """
    split_root = Path(split_root)
    if not split_root.is_dir():
        raise DatasetError(f"dataset split folder {split_root} does not exist")
    found = sorted(entry.name for entry in os.scandir(split_root) if entry.is_dir() and not entry.name.startswith("."))
    if not found:
        raise DatasetError(f"{split_root} has no class sub-folders (expected {split_root}/<class>/<image files>)")
    if classes is None:
        classes = found
    index = {name: i for i, name in enumerate(classes)}
    samples: list[tuple[str, int]] = []
    for name in found:
        if name not in index:
            continue
        folder = split_root / name
        files = sorted(f.name for f in os.scandir(folder) if f.is_file() and _is_image(f.name))
        if not files:
            raise DatasetError(f"class folder {folder} has no image files (extensions: {', '.join(IMAGE_EXTENSIONS)})")
        samples.extend((str(folder / f), index[name]) for f in files)
    if verify is None:
        verify = len(samples) <= VERIFY_LIMIT
    skipped: list[str] = []
    if verify:
        samples, skipped = _drop_unreadable(split_root, samples, max_bad)
    return ScannedSplit(split_root, list(classes), samples, skipped)


def scan_image_folder(root: str | Path, verify: Optional[bool] = None,
                      max_bad: int = MAX_BAD_FILES) -> tuple[ScannedSplit, ScannedSplit]:
    """Scan `root/train` and `root/val`; val labels follow train's class order.

    A val class missing from train is an error (no label for it); a train class without val
    images is only a warning (its accuracy is simply not measured).
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset root {root} does not exist or is not a folder")
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise DatasetError(f"dataset root {root} has no '{split}' folder: expected {root / split}/<class>/<images>")
    train = scan_split(root / "train", verify=verify, max_bad=max_bad)
    val_classes = sorted(e.name for e in os.scandir(root / "val") if e.is_dir() and not e.name.startswith("."))
    extra = sorted(set(val_classes) - set(train.classes))
    if extra:
        raise DatasetError(
            f"{root / 'val'} has class folder(s) {extra[:5]} that {root / 'train'} lacks; "
            f"train and val must use the same class names")
    missing = sorted(set(train.classes) - set(val_classes))
    if missing:
        log.warning("%s lacks class folder(s) %s present in %s; their accuracy is not measured",
                    root / "val", missing[:5], root / "train")
    val = scan_split(root / "val", classes=train.classes, verify=verify, max_bad=max_bad)
    return train, val


class ImageFolderDataset(Dataset):
    """Images from a scanned split as RGB PIL images through `transform`.

    A file that fails to decode at read time (splits too large to verify up front) is logged,
    counted, and replaced by the next sample; more than `max_bad` such files is an error.
    """

    def __init__(self, split: ScannedSplit, transform: Optional[Callable] = None, max_bad: int = MAX_BAD_FILES):
        self.root = split.root
        self.classes = split.classes
        self.samples = split.samples
        self.targets = [label for _, label in split.samples]
        self.transform = transform
        self.max_bad = max_bad
        self.bad_files: set[str] = set()

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, path: str) -> Image.Image:
        with Image.open(path) as img:
            return img.convert("RGB")

    def __getitem__(self, index: int):
        for attempt in range(len(self.samples)):
            path, label = self.samples[(index + attempt) % len(self.samples)]
            try:
                img = self._load(path)
            except Exception as err:  # PIL raises many types for broken files
                self._record_bad(path, err)
                continue
            return (self.transform(img) if self.transform else img), label
        raise DatasetError(f"{self.root}: no readable image files")

    def _record_bad(self, path: str, err: Exception) -> None:
        if path not in self.bad_files:
            self.bad_files.add(path)
            log.warning("skipping unreadable image file %s (%s)", path, err)
        if len(self.bad_files) > self.max_bad:
            raise DatasetError(
                f"{self.root}: {len(self.bad_files)} image files cannot be read (more than {self.max_bad}), "
                f"e.g. {', '.join(sorted(self.bad_files)[:3])}")
