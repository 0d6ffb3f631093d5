"""Shared fixtures: a per-session digits cache (never the repo's data_cache/) and tiny image trees."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lib.cim.runtime import RUNTIME


@pytest.fixture(scope="session", autouse=True)
def digits_cache(tmp_path_factory) -> Path:
    """Folder where every test (and CLI subprocess) builds the built-in digits trees, once per session."""
    cache = tmp_path_factory.mktemp("digits_cache")
    previous = os.environ.get("CIM_AQ_DATA_CACHE")
    os.environ["CIM_AQ_DATA_CACHE"] = str(cache)
    yield cache
    if previous is None:
        os.environ.pop("CIM_AQ_DATA_CACHE", None)
    else:
        os.environ["CIM_AQ_DATA_CACHE"] = previous


@pytest.fixture(scope="session", autouse=True)
def freed_memory_released():
    """CLIs run in-process (and their subprocesses) leave this test process's heap as glibc runs it:
    the freed-memory policy is process-wide, and tests/test_heap.py checks `keep` in fresh
    interpreters of its own."""
    previous = os.environ.get("CIM_AQ_FREED_MEMORY")
    os.environ["CIM_AQ_FREED_MEMORY"] = "release"
    yield
    if previous is None:
        os.environ.pop("CIM_AQ_FREED_MEMORY", None)
    else:
        os.environ["CIM_AQ_FREED_MEMORY"] = previous


def write_image_tree(root: Path, classes=("cat", "dog", "eel"), per_class=(4, 2), size=12, seed=0) -> Path:
    """A real ImageFolder tree root/{train,val}/<class>/<i>.png of random RGB images."""
    rng = np.random.RandomState(seed)
    for split, count in zip(("train", "val"), per_class):
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.randint(0, 256, size=(size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


@pytest.fixture
def make_image_tree():
    """write_image_tree(root, classes, per_class=(train, val), size, seed) for custom trees."""
    return write_image_tree


@pytest.fixture
def image_tree(tmp_path) -> Path:
    """A small three-class ImageFolder tree (4 train / 2 val images per class, 12x12 RGB)."""
    return write_image_tree(tmp_path / "imgs")


@pytest.fixture
def eager_single_thread(monkeypatch):
    """Eager ADC kernels (no compile time for tiny nets; also for CLIs run in-process or as
    subprocesses) and one torch thread for the test."""
    monkeypatch.setenv("CIM_AQ_COMPILE", "0")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with RUNTIME.use(compile="0"):
        yield
    torch.set_num_threads(before)
