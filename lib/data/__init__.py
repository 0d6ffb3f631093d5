"""Datasets and loaders: ImageFolder trees, local CIFAR batches, built-in digits, train holdout."""
from lib.data.digits import default_cache_dir, digits_root, ensure_digits
from lib.data.folder import DatasetError, ImageFolderDataset, scan_image_folder
from lib.data.holdout import HoldoutSpec, holdout_split
from lib.data.loaders import DATASETS, DataBundle, build_loaders, default_input_size, first_images, resolve_dataset

__all__ = [
    "DATASETS", "DataBundle", "DatasetError", "HoldoutSpec", "ImageFolderDataset", "build_loaders",
    "default_cache_dir", "default_input_size", "first_images", "digits_root", "ensure_digits", "holdout_split",
    "resolve_dataset", "scan_image_folder",
]
