"""Train/eval image transforms at a configurable input size.

'imagenet': random-resized crop for training, resize to size/0.875 + center crop for eval.
'cifar': pad-and-random-crop for training (small images), plain resize for eval.
"""
from __future__ import annotations

from typing import Sequence

from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
# sklearn digits scaled to [0, 1] (measured on the 8x8 originals; upscaling barely moves them).
DIGITS_MEAN = (0.305, 0.305, 0.305)
DIGITS_STD = (0.376, 0.376, 0.376)

STYLES = ("imagenet", "cifar")


def build_transform(style: str, input_size: int, train: bool, mean: Sequence[float] = IMAGENET_MEAN,
                    std: Sequence[float] = IMAGENET_STD, hflip: bool = True):
    """A torchvision transform producing normalized (3, input_size, input_size) tensors."""
    if style not in STYLES:
        raise ValueError(f"transform style {style!r} is not allowed: expected one of {list(STYLES)}")
    if not isinstance(input_size, int) or input_size < 4:
        raise ValueError(f"input_size={input_size!r} is not allowed: expected an integer >= 4")
    ops: list = []
    if style == "imagenet":
        if train:
            ops.append(T.RandomResizedCrop(input_size, antialias=True))
        else:
            ops += [T.Resize(int(round(input_size / 0.875)), antialias=True), T.CenterCrop(input_size)]
    else:
        ops.append(T.Resize((input_size, input_size), antialias=True))
        if train:
            ops.append(T.RandomCrop(input_size, padding=max(1, input_size // 8)))
    if train and hflip:
        ops.append(T.RandomHorizontalFlip())
    ops += [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(ops)
