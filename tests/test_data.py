"""Data: built-in digits tree, ImageFolder / CIFAR loading, train holdout, bad-input errors."""
from __future__ import annotations

import logging
import pickle
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lib.data import (DatasetError, HoldoutSpec, ImageFolderDataset, build_loaders, digits_root, ensure_digits,
                      holdout_split, scan_image_folder)
from lib.data.cifar import CifarDataset


def _pngs(root: Path) -> list[Path]:
    return sorted(root.rglob("*.png"))


def test_digits_tree_is_built_once_and_reused(tmp_path):
    root = ensure_digits("digits", 8, cache_dir=tmp_path)
    assert root == digits_root("digits", 8, cache_dir=tmp_path)
    files = _pngs(root)
    assert len(files) == 1797
    stamps = {p: p.stat().st_mtime_ns for p in files}
    img = Image.open(files[0])
    assert img.mode == "RGB" and img.size == (8, 8)

    assert ensure_digits("digits", 8, cache_dir=tmp_path) == root
    assert {p: p.stat().st_mtime_ns for p in _pngs(root)} == stamps  # nothing rewritten
    assert [p.name for p in tmp_path.iterdir()] == [root.name]  # no temp folders left behind

    big = ensure_digits("digits", 12, cache_dir=tmp_path)  # another size is its own tree
    assert big != root and Image.open(_pngs(big)[0]).size == (12, 12)


def test_digits_split_is_stratified_and_small_variant_is_a_subset(tmp_path):
    full = ensure_digits("digits", 8, cache_dir=tmp_path)
    small = ensure_digits("digits-small", 8, cache_dir=tmp_path)
    for split in ("train", "val"):
        per_class = Counter(p.parent.name for p in _pngs(full / split))
        assert sorted(per_class) == [str(d) for d in range(10)]
        small_per_class = Counter(p.parent.name for p in _pngs(small / split))
        assert set(small_per_class.values()) == {50 if split == "train" else 20}
        # the small variant draws from the same split: no image crosses train/val
        full_names = {p.relative_to(full / split) for p in _pngs(full / split)}
        assert {p.relative_to(small / split) for p in _pngs(small / split)} <= full_names
    val = Counter(p.parent.name for p in _pngs(full / "val"))
    train = Counter(p.parent.name for p in _pngs(full / "train"))
    for digit in val:
        assert abs(val[digit] / (val[digit] + train[digit]) - 0.2) < 0.01


def test_incomplete_digits_tree_is_rebuilt(tmp_path):
    root = digits_root("digits-small", 8, cache_dir=tmp_path)
    (root / "train" / "3").mkdir(parents=True)  # a crashed manual copy: no meta.json
    rebuilt = ensure_digits("digits-small", 8, cache_dir=tmp_path)
    assert (rebuilt / "meta.json").is_file() and len(_pngs(rebuilt)) == 700


def test_digits_loaders_shapes_and_classes(digits_cache):
    data = build_loaders("digits", input_size=16, batch_size=32, workers=0)
    assert data.num_classes == 10 and data.classes == [str(d) for d in range(10)]
    assert data.root.parent == digits_cache
    images, labels = next(iter(data.train))
    assert images.shape == (32, 3, 16, 16) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and 0 <= labels.min() and labels.max() < 10
    assert len(data.train.dataset) + len(data.val.dataset) == 1797
    assert data.holdout is None
    first = torch.cat([y for _, y in data.val])
    again = torch.cat([y for _, y in data.val])
    assert torch.equal(first, again) and len(first) == len(data.val.dataset)  # val is not shuffled


def test_holdout_split_is_deterministic_balanced_and_disjoint():
    targets = np.repeat(np.arange(10), 30)
    spec = HoldoutSpec(size=50, train_size=100, seed=3)
    train, hold = holdout_split(targets, spec)
    assert (train, hold) == holdout_split(targets, spec)
    assert len(hold) == 50 and len(train) == 100 and not set(train) & set(hold)
    assert set(Counter(targets[hold]).values()) == {5}
    assert set(Counter(targets[train]).values()) == {10}
    assert holdout_split(targets, HoldoutSpec(size=50, seed=4))[1] != hold
    assert len(holdout_split(targets, HoldoutSpec(size=0.1))[1]) == 30
    with pytest.raises(ValueError, match="leaves no training images"):
        holdout_split(targets, HoldoutSpec(size=300))
    with pytest.raises(ValueError, match="fraction"):
        holdout_split(targets, HoldoutSpec(size=1.5))


def test_holdout_loader_comes_from_training_images_with_eval_transform():
    data = build_loaders("digits-small", input_size=8, batch_size=64, workers=0, holdout=HoldoutSpec(size=40, seed=1))
    assert len(data.holdout.dataset) == 40 and len(data.train.dataset) == 500 - 40
    hold_files = {data.holdout.dataset.base.samples[i][0] for i in data.holdout.dataset.indices}
    assert all("/train/" in f for f in hold_files)
    train_files = {data.train.dataset.base.samples[i][0] for i in data.train.dataset.indices}
    assert not hold_files & train_files
    a = torch.cat([x for x, _ in data.holdout])
    b = torch.cat([x for x, _ in data.holdout])
    assert torch.equal(a, b)  # eval transform: no random augmentation


def test_image_folder_loaders(image_tree):
    data = build_loaders("imagefolder", image_tree, input_size=24, batch_size=5, workers=0, transform_style="imagenet")
    assert data.classes == ["cat", "dog", "eel"] and data.num_classes == 3
    images, labels = next(iter(data.train))
    assert images.shape == (5, 3, 24, 24)
    val = torch.cat([y for _, y in data.val])
    assert val.tolist() == [0, 0, 1, 1, 2, 2]


def test_cifar_from_local_pickle_batches(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.RandomState(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.randint(0, 256, (4, 3072), dtype=np.uint8), "labels": [0, 3, 9, 3]}
        with open(folder / name, "wb") as handle:
            pickle.dump(batch, handle)
    with open(folder / "batches.meta", "wb") as handle:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, handle)
    data = build_loaders("cifar10", tmp_path, batch_size=8, workers=0)  # the parent folder is accepted too
    assert data.num_classes == 10 and data.classes[9] == "c9"
    images, labels = next(iter(data.train))
    assert images.shape == (8, 3, 32, 32) and len(data.train.dataset) == 20 and len(data.val.dataset) == 4
    raw = CifarDataset(folder, "cifar10", train=False)
    assert np.array_equal(np.asarray(raw[1][0]), _first_test_image(folder, 1))
    (folder / "test_batch").unlink()
    with pytest.raises(DatasetError, match="test_batch"):
        build_loaders("cifar10", folder, workers=0)


def _first_test_image(folder: Path, index: int) -> np.ndarray:
    with open(folder / "test_batch", "rb") as handle:
        row = pickle.load(handle)["data"][index]
    return row.reshape(3, 32, 32).transpose(1, 2, 0)


# ---------------------------------------------------------------- bad input


def test_missing_root_and_split_folders_name_the_path(tmp_path, image_tree):
    with pytest.raises(DatasetError, match=str(tmp_path / "nowhere")):
        build_loaders("imagefolder", tmp_path / "nowhere", workers=0)
    shutil.rmtree(image_tree / "val")
    with pytest.raises(DatasetError, match="no 'val' folder"):
        build_loaders("imagefolder", image_tree, workers=0)
    with pytest.raises(DatasetError, match="needs a root"):
        build_loaders("imagenet", None, workers=0)


def test_empty_class_folder_is_an_error(image_tree):
    (image_tree / "train" / "fox").mkdir()
    with pytest.raises(DatasetError, match=r"train/fox has no image files"):
        scan_image_folder(image_tree)


def test_unreadable_images_are_skipped_with_a_warning_then_an_error(image_tree, caplog):
    broken = image_tree / "train" / "dog" / "broken.png"
    broken.write_bytes(b"not a png at all")
    with caplog.at_level(logging.WARNING):
        train, _ = scan_image_folder(image_tree)
    assert train.skipped == [str(broken)] and len(train.samples) == 12
    assert str(broken) in caplog.text
    for i in range(5):
        (image_tree / "train" / "cat" / f"bad{i}.jpg").write_bytes(b"\x00" * 10)
    with pytest.raises(DatasetError, match="6 image files cannot be read"):
        scan_image_folder(image_tree)


def test_unreadable_image_found_while_loading_is_skipped(image_tree, caplog):
    broken = image_tree / "train" / "cat" / "0.png"
    broken.write_bytes(b"truncated")
    train, _ = scan_image_folder(image_tree, verify=False)  # as for splits too large to verify up front
    dataset = ImageFolderDataset(train)
    with caplog.at_level(logging.WARNING):
        img, label = dataset[0]
    assert img.size == (12, 12) and label == 0  # the next file of the class stands in
    assert dataset.bad_files == {str(broken)} and str(broken) in caplog.text


def test_class_sets_that_differ_between_train_and_val(image_tree, caplog):
    (image_tree / "val" / "yak").mkdir()
    shutil.copy(image_tree / "val" / "cat" / "0.png", image_tree / "val" / "yak" / "0.png")
    with pytest.raises(DatasetError, match="yak"):
        scan_image_folder(image_tree)
    shutil.rmtree(image_tree / "val" / "yak")
    shutil.rmtree(image_tree / "val" / "eel")
    with caplog.at_level(logging.WARNING):
        train, val = scan_image_folder(image_tree)
    assert "eel" in caplog.text and str(image_tree / "val") in caplog.text
    assert train.classes == val.classes == ["cat", "dog", "eel"]


def test_unknown_dataset_name_suggests_close_matches():
    with pytest.raises(DatasetError, match="digits-small"):
        build_loaders("digits_small")
