"""One entry point for every stage: dataset name + root → train/val(/holdout) DataLoaders."""
from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from lib.data import transforms as tf
from lib.data.cifar import CifarDataset
from lib.data.digits import VARIANTS as DIGITS_VARIANTS, ensure_digits
from lib.data.folder import DatasetError, ImageFolderDataset, scan_image_folder
from lib.data.holdout import HoldoutSpec, holdout_split
from lib.distributed import SINGLE, DistContext, ShardSampler

log = logging.getLogger(__name__)

FOLDER_ALIASES = ("imagefolder", "imagenet", "imagenet100")
DATASETS = tuple(DIGITS_VARIANTS) + ("cifar10", "cifar100") + FOLDER_ALIASES
DEFAULT_INPUT_SIZE = {"digits": 32, "digits-small": 32, "cifar10": 32, "cifar100": 32}
FOLDER_INPUT_SIZE = 224


@dataclass
class DataBundle:
    """Loaders of one dataset; `holdout` (images held out of train, eval transform) only when asked."""

    train: DataLoader
    val: DataLoader
    holdout: Optional[DataLoader]
    num_classes: int
    classes: list[str]
    input_size: int
    dataset: str
    root: Optional[Path]


class TransformView(Dataset):
    """`base[indices]` (all of base when None) with `transform` applied to the image."""

    def __init__(self, base: Dataset, transform: Callable, indices: Optional[Sequence[int]] = None):
        self.base, self.transform = base, transform
        self.indices = list(range(len(base))) if indices is None else list(indices)
        base_targets = getattr(base, "targets", None)
        self.targets = [base_targets[i] for i in self.indices] if base_targets is not None else None

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        img, label = self.base[self.indices[i]]
        return self.transform(img), label


def resolve_dataset(name: str) -> str:
    """Canonical dataset name; unknown names raise with the close matches."""
    key = name.lower()
    if key in DATASETS:
        return "imagefolder" if key in FOLDER_ALIASES else key
    close = difflib.get_close_matches(key, DATASETS, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise DatasetError(f"unknown dataset {name!r}; expected one of {list(DATASETS)}.{hint}")


def default_input_size(dataset: str) -> int:
    return DEFAULT_INPUT_SIZE.get(resolve_dataset(dataset), FOLDER_INPUT_SIZE)


def _base_datasets(dataset: str, root: Optional[str | Path], input_size: int):
    """(train base, val base, classes, root, norm stats, flip?) with no transform attached."""
    if dataset in DIGITS_VARIANTS:
        root = ensure_digits(dataset, input_size, cache_dir=root)
        train, val = scan_image_folder(root)
        return (ImageFolderDataset(train), ImageFolderDataset(val), train.classes, root,
                (tf.DIGITS_MEAN, tf.DIGITS_STD), False)
    if root is None:
        raise DatasetError(f"dataset {dataset!r} needs a root folder (--data-root)")
    root = Path(root)
    if dataset in ("cifar10", "cifar100"):
        train, val = CifarDataset(root, dataset, train=True), CifarDataset(root, dataset, train=False)
        stats = (tf.CIFAR10_MEAN, tf.CIFAR10_STD) if dataset == "cifar10" else (tf.CIFAR100_MEAN, tf.CIFAR100_STD)
        return train, val, train.classes, root, stats, True
    train_split, val_split = scan_image_folder(root)
    return (ImageFolderDataset(train_split), ImageFolderDataset(val_split), train_split.classes, root,
            (tf.IMAGENET_MEAN, tf.IMAGENET_STD), True)


def build_loaders(dataset: str, root: Optional[str | Path] = None, input_size: Optional[int] = None,
                  batch_size: int = 128, workers: int = 2, holdout: Optional[HoldoutSpec] = None, *,
                  transform_style: str = "auto", seed: int = 0, val_batch_size: Optional[int] = None,
                  dist: DistContext = SINGLE) -> DataBundle:
    """Train/val(/holdout) loaders for `dataset` (digits, digits-small, cifar10, cifar100, imagefolder).

    root: the ImageFolder / CIFAR folder; for digits, the cache folder (default: data_cache/ or
    $CIM_AQ_DATA_CACHE) where the PNG tree is built at `input_size`.
    transform_style: 'imagenet', 'cifar', or 'auto' (cifar-style up to 64 px, else imagenet-style).
    holdout: when given, that many training images move to `holdout` (eval transform) and leave `train`.
    The train loader shuffles with its own generator seeded by `seed` (reseed it per epoch for exact resume).
    dist: under torchrun every loader reads this rank's shard (`ShardSampler`): training shards are
    reshuffled per epoch from the shared seed, evaluation shards are disjoint and unpadded.
    """
    dataset = resolve_dataset(dataset)
    input_size = int(input_size or default_input_size(dataset))
    if batch_size < 1 or workers < 0:
        raise ValueError(f"batch_size={batch_size} / workers={workers} not allowed: need batch_size >= 1, workers >= 0")
    train_base, val_base, classes, root, (mean, std), hflip = _base_datasets(dataset, root, input_size)
    style = transform_style if transform_style != "auto" else ("cifar" if input_size <= 64 else "imagenet")
    train_tf = tf.build_transform(style, input_size, train=True, mean=mean, std=std, hflip=hflip)
    eval_tf = tf.build_transform(style, input_size, train=False, mean=mean, std=std)

    train_idx, hold_idx = None, None
    if holdout is not None:
        train_idx, hold_idx = holdout_split(train_base.targets, holdout)
    train_ds = TransformView(train_base, train_tf, train_idx)
    val_ds = TransformView(val_base, eval_tf)
    generator = torch.Generator()
    generator.manual_seed(seed)
    common = dict(num_workers=workers, pin_memory=torch.cuda.is_available())
    eval_bs = val_batch_size or batch_size
    if dist.distributed:
        train_loader = DataLoader(train_ds, batch_size=batch_size,
                                  sampler=ShardSampler(len(train_ds), dist, shuffle=True, seed=seed), **common)
    else:
        train_loader = DataLoader(train_ds, batch_size=batch_size, shuffle=True, generator=generator, **common)
    val_loader = _eval_loader(val_ds, eval_bs, dist, common)
    hold_loader = None
    if hold_idx is not None:
        hold_loader = _eval_loader(TransformView(train_base, eval_tf, hold_idx), eval_bs, dist, common)
    log.info("%s: %d train / %d val%s images, %d classes, %dpx (%s transforms)", dataset, len(train_ds), len(val_ds),
             f" / {len(hold_idx)} holdout" if hold_idx is not None else "", len(classes), input_size, style)
    return DataBundle(train_loader, val_loader, hold_loader, len(classes), list(classes), input_size, dataset,
                      Path(root) if root is not None else None)


def _eval_loader(dataset: Dataset, batch_size: int, dist: DistContext, common: dict) -> DataLoader:
    sampler = ShardSampler(len(dataset), dist, shuffle=False) if dist.distributed else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, sampler=sampler, **common)


def first_images(loader, count: int) -> torch.Tensor:
    """The first `count` images a loader yields (e.g. real validation images for an export check).

    An evaluation loader of one rank's shard yields the first images of the whole set instead, so
    a check reads the same images however many processes the run has.
    """
    if count < 1:
        raise DatasetError(f"count={count} is not allowed: expected an integer >= 1")
    if isinstance(getattr(loader, "sampler", None), ShardSampler) and not loader.sampler.shuffle:
        loader = DataLoader(loader.dataset, batch_size=loader.batch_size, shuffle=False)
    chunks, seen = [], 0
    for images, _ in loader:
        chunks.append(images)
        seen += images.shape[0]
        if seen >= count:
            break
    if not chunks:
        raise DatasetError("the loader yielded no images")
    return torch.cat(chunks)[:count]
