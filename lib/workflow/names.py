"""CIM-AQ's model and dataset names mapped onto ours (or refused with the names that exist)."""
from __future__ import annotations

import difflib
import re

from lib.data.loaders import DATASETS

# CIM-AQ spells a torchvision model as q<name> (quantized) or custom_<name> (FP32); a few names
# differ from torchvision's beyond that prefix.
CIMAQ_MODEL_ALIASES = {"mobilenetv2": "mobilenet_v2", "mobilenet": "mobilenet_v2", "vitb32": "vit_b_32"}
# CIM-AQ's dataset names: ImageNet, its 100- and 10-class subsets and its synthetic test set are
# all ImageFolder trees (root/train/<class>, root/val/<class>).
CIMAQ_DATASETS = {"imagenet": "imagefolder", "imagenet100": "imagefolder", "imagenet10": "imagefolder",
                   "test": "imagefolder"}
BUILT_IN_DATASETS = ("digits", "digits-small")


def model_candidates(name: str) -> list[str]:
    """Our names that CIM-AQ's `name` may stand for, most specific first."""
    stripped = re.sub(r"^(custom_|q)", "", name)
    names = [name, stripped, CIMAQ_MODEL_ALIASES.get(stripped, stripped)]
    return list(dict.fromkeys(names))


def resolve_model(name: str, known: list[str]) -> str:
    """Our model name for `name` (ours or CIM-AQ's); ValueError listing close names otherwise."""
    for candidate in model_candidates(name):
        if candidate in known:
            return candidate
    close = difflib.get_close_matches(model_candidates(name)[-1], known, n=5, cutoff=0.5)
    raise ValueError(f"unknown model {name!r}: not one of ours nor a CIM-AQ name (q<model>/custom_<model>) "
                     f"of one of ours; close matches: {close or 'none'} (all: models.list_models())")


def resolve_dataset(name: str) -> str:
    """Our dataset kind for `name` (ours or CIM-AQ's); ValueError listing every allowed name otherwise."""
    key = name.lower()
    if key in CIMAQ_DATASETS:
        return CIMAQ_DATASETS[key]
    if key in DATASETS:
        return "imagefolder" if key in ("imagenet", "imagenet100") else key
    allowed = sorted(set(DATASETS) | set(CIMAQ_DATASETS))
    raise ValueError(f"unknown dataset {name!r}; allowed: {allowed}")


def main(argv=None) -> int:
    """`python -m lib.workflow.names --model NAME | --dataset NAME`: print our name (for the stage scripts)."""
    import argparse
    import sys

    from models import list_models

    p = argparse.ArgumentParser(description="Map a CIM-AQ model or dataset name onto ours.")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--model", help="e.g. qresnet18, custom_vgg16, resnet20")
    group.add_argument("--dataset", help="e.g. imagenet100, imagenet, test, digits")
    args = p.parse_args(argv)
    try:
        print(resolve_model(args.model, list_models()) if args.model else resolve_dataset(args.dataset))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
