"""A tiny FP32 checkpoint on digits at 8 px (2 epochs of tiny_cnn), the start of the crossbar-sweep
and noise-aware training tests: `from tiny_fp32 import DATA, fp32` makes the module-scoped fixture."""
from __future__ import annotations

from pathlib import Path

import pytest

import pretrain

DATA = ["--dataset", "digits", "--input-size", "8", "--batch-size", "64", "--workers", "0", "--seed", "1",
        "--no-progress"]


@pytest.fixture(scope="module")
def fp32(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fp32")
    assert pretrain.main(DATA + ["--arch", "tiny_cnn", "--epochs", "2", "--lr", "0.1", "--no-tensorboard",
                                 "--output-dir", str(root)]) == 0
    return root / "model_best.pth.tar"
