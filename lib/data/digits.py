"""Built-in real dataset: scikit-learn's handwritten digits written once as an ImageFolder tree.

1,797 8x8 grayscale digits (10 classes) become RGB PNGs upscaled to `image_size`, split
80/20 per class with a fixed seed, under `<cache>/<variant>-<size>px/{train,val}/<digit>/`.
The tree is built in a temp folder and renamed into place, so an interrupted or concurrent
build never leaves a half tree; `meta.json` marks a finished one, which later calls reuse.
`digits-small` keeps a few images per class of the same splits (the stage-1 "small" dataset).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

CACHE_ENV = "CIM_AQ_DATA_CACHE"
CACHE_VERSION = 1
SPLIT_SEED = 0
VAL_FRACTION = 0.2
# per-class caps (train, val) of each variant; None = every image of the split
VARIANTS = {"digits": (None, None), "digits-small": (50, 20)}
REPO_ROOT = Path(__file__).resolve().parents[2]


def default_cache_dir() -> Path:
    """$CIM_AQ_DATA_CACHE if set, else `data_cache/` in the repository (git-ignored)."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else REPO_ROOT / "data_cache"


def digits_root(variant: str = "digits", image_size: int = 32, cache_dir: Optional[str | Path] = None) -> Path:
    """Where the ImageFolder tree of `variant` at `image_size` lives (built or not)."""
    _check(variant, image_size)
    return Path(cache_dir or default_cache_dir()) / f"{variant}-{image_size}px"


def _check(variant: str, image_size: int) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"digits variant {variant!r} is not allowed: expected one of {list(VARIANTS)}")
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 8:
        raise ValueError(f"digits image_size={image_size!r} is not allowed: expected an integer >= 8")


def split_indices(targets: np.ndarray, variant: str) -> dict[str, list[int]]:
    """Fixed stratified train/val split of the sklearn indices, capped per class for small variants."""
    rng = np.random.RandomState(SPLIT_SEED)
    train_cap, val_cap = VARIANTS[variant]
    split: dict[str, list[int]] = {"train": [], "val": []}
    for label in np.unique(targets):
        idx = rng.permutation(np.flatnonzero(targets == label))
        n_val = int(round(len(idx) * VAL_FRACTION))
        split["val"] += sorted(idx[:n_val][:val_cap].tolist())
        split["train"] += sorted(idx[n_val:][:train_cap].tolist())
    return split


def _write_tree(dest: Path, variant: str, image_size: int) -> dict:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.clip(np.round(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    targets = digits.target
    split = split_indices(targets, variant)
    for name, indices in split.items():
        for i in indices:
            folder = dest / name / str(int(targets[i]))
            folder.mkdir(parents=True, exist_ok=True)
            img = Image.fromarray(images[i]).resize((image_size, image_size), Image.BICUBIC)
            img.convert("RGB").save(folder / f"{i:04d}.png")
    meta = {"version": CACHE_VERSION, "variant": variant, "image_size": image_size,
            "split_seed": SPLIT_SEED, "val_fraction": VAL_FRACTION,
            "train": len(split["train"]), "val": len(split["val"]), "classes": 10}
    (dest / "meta.json").write_text(json.dumps(meta, indent=2))
    return meta


def _is_complete(root: Path) -> bool:
    try:
        meta = json.loads((root / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    return meta.get("version") == CACHE_VERSION


def ensure_digits(variant: str = "digits", image_size: int = 32, cache_dir: Optional[str | Path] = None) -> Path:
    """The ImageFolder root of the digits tree, building it on first use; later calls reuse it."""
    root = digits_root(variant, image_size, cache_dir)
    if _is_complete(root):
        log.debug("reusing digits tree %s", root)
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}."))
    try:
        meta = _write_tree(tmp, variant, image_size)
        if root.exists() and not _is_complete(root):
            log.warning("replacing incomplete digits tree %s", root)
            shutil.rmtree(root, ignore_errors=True)
        try:
            os.rename(tmp, root)
        except OSError:
            if not _is_complete(root):  # not a concurrent builder that won the race
                raise
            log.debug("another process built %s first", root)
        else:
            log.info("built %s tree at %s (%d train / %d val images)", variant, root, meta["train"], meta["val"])
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root
