"""CIFAR-10/100 from the standard python-pickle batches in a local folder (never downloaded).

Accepts the extracted folder itself (`cifar-10-batches-py`, `cifar-100-python`) or its parent.
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from lib.data.folder import DatasetError

LAYOUTS = {
    "cifar10": {
        "folder": "cifar-10-batches-py",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "val": ["test_batch"],
        "labels": "labels",
        "meta": ("batches.meta", "label_names"),
        "num_classes": 10,
    },
    "cifar100": {
        "folder": "cifar-100-python",
        "train": ["train"],
        "val": ["test"],
        "labels": "fine_labels",
        "meta": ("meta", "fine_label_names"),
        "num_classes": 100,
    },
}


def _locate(root: Path, name: str) -> Path:
    layout = LAYOUTS[name]
    if not root.is_dir():
        raise DatasetError(f"{name} root {root} does not exist or is not a folder")
    for candidate in (root, root / layout["folder"]):
        if all((candidate / f).is_file() for f in layout["train"] + layout["val"]):
            return candidate
    wanted = ", ".join(layout["train"] + layout["val"])
    raise DatasetError(
        f"{root} holds no {name} python batches: expected {wanted} in {root} or {root / layout['folder']} "
        f"(no download is attempted)")


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as handle:
            return pickle.load(handle, encoding="latin1")
    except Exception as err:
        raise DatasetError(f"cannot read CIFAR batch {path}: {err}") from None


class CifarDataset(Dataset):
    """One split of CIFAR-10/100 held in memory as uint8 HWC images."""

    def __init__(self, root: str | Path, name: str, train: bool, transform: Optional[Callable] = None):
        if name not in LAYOUTS:
            raise DatasetError(f"unknown CIFAR variant {name!r}; expected one of {list(LAYOUTS)}")
        layout = LAYOUTS[name]
        folder = _locate(Path(root), name)
        images, labels = [], []
        for fname in layout["train" if train else "val"]:
            batch = _unpickle(folder / fname)
            if "data" not in batch or layout["labels"] not in batch:
                raise DatasetError(f"{folder / fname} is not a {name} batch (keys: {sorted(batch)[:6]})")
            images.append(np.asarray(batch["data"], dtype=np.uint8))
            labels.extend(int(v) for v in batch[layout["labels"]])
        self.data = np.concatenate(images).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        self.targets = labels
        meta_file, meta_key = layout["meta"]
        meta_path = folder / meta_file
        if meta_path.is_file():
            self.classes = list(_unpickle(meta_path).get(meta_key, []))
        else:
            self.classes = [str(i) for i in range(layout["num_classes"])]
        self.root = folder
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        img = Image.fromarray(self.data[index])
        return (self.transform(img) if self.transform else img), self.targets[index]
