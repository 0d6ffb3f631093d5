"""Models by name: every torchvision classification model, CIFAR ResNets and tiny test nets.

The head is built at `num_classes`; pretrained weights come only from a local file (a state
dict, a torchvision checkpoint or one of ours), never from the network. A head whose shape
differs from the file's stays freshly initialised.
"""
from __future__ import annotations

import difflib
import functools
import logging
from pathlib import Path
from typing import Callable, Optional

import torch
import torchvision
from torch import nn

from models.cifar_resnet import CifarResNet
from models.tiny import TinyCNN
from lib.errors import UserError
from lib.finite import NonFiniteError, require_finite

log = logging.getLogger(__name__)

LOCAL_MODELS: dict[str, Callable[[int], nn.Module]] = {
    **{f"resnet{d}": functools.partial(CifarResNet, d) for d in (20, 32, 44, 56, 110)},
    "tiny_cnn": TinyCNN,
}
# torchvision models whose defaults return auxiliary outputs in training mode or warn about init.
TORCHVISION_KWARGS = {
    "googlenet": {"aux_logits": False, "init_weights": True},
    "inception_v3": {"aux_logits": False, "init_weights": True},
}
AUX_PREFIXES = ("AuxLogits.", "aux1.", "aux2.")
STATE_DICT_KEYS = ("state_dict", "model", "model_state_dict")


class ModelError(UserError, ValueError):
    """A model name, weights file or checkpoint that cannot be used; the message says which."""


@functools.lru_cache(maxsize=1)
def _torchvision_names() -> tuple[str, ...]:
    return tuple(torchvision.models.list_models(module=torchvision.models))


def list_models() -> list[str]:
    """Every name create_model accepts."""
    return sorted(set(LOCAL_MODELS) | set(_torchvision_names()))


def classifier_name(model: nn.Module) -> str:
    """Qualified name of the model's head: its last Linear (or 1x1-conv head, as in SqueezeNet)."""
    name = None
    for qualname, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            name = qualname
    if name is None:
        raise ModelError(f"{type(model).__name__} has no Linear or Conv2d layer to act as a classifier head")
    return name


def create_model(name: str, num_classes: int = 1000, pretrained: Optional[str | Path] = None) -> nn.Module:
    """Build model `name` with a `num_classes`-way head; `pretrained` is a local weights file or None."""
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ModelError(f"num_classes={num_classes!r} is not allowed: expected an integer >= 1")
    if name in LOCAL_MODELS:
        model = LOCAL_MODELS[name](num_classes=num_classes)
    elif name in _torchvision_names():
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes,
                                             **TORCHVISION_KWARGS.get(name, {}))
    else:
        close = difflib.get_close_matches(name, list_models(), n=5, cutoff=0.6)
        hint = f"; close matches: {', '.join(close)}" if close else "; see models.list_models()"
        raise ModelError(f"unknown model {name!r}{hint}")
    if pretrained is not None:
        load_pretrained(model, pretrained)
    return model


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a local weights file: a bare state dict or one under state_dict/model keys."""
    text = str(path)
    if "://" in text:
        raise ModelError(f"pretrained={text!r}: weights load only from a local file, never from the network")
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"pretrained weights file {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ModelError(f"cannot read weights file {path} (truncated or not a torch file?): {err}") from None
    for key in STATE_DICT_KEYS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelError(f"{path} holds no state dict (expected tensors, or a dict with one of {STATE_DICT_KEYS})")
    try:
        require_finite(obj, f"weights file {path}")
    except NonFiniteError as err:
        raise ModelError(f"{err}; weights holding them give no usable start") from None
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items()}


def load_pretrained(model: nn.Module, path: str | Path) -> None:
    """Load a local weights file into `model`; only the head may differ in shape (it is then kept fresh)."""
    state = read_state_dict(path)
    own = model.state_dict()
    head = classifier_name(model) + "."
    kept, fresh_head = {}, []
    for key, value in state.items():
        if key.startswith(AUX_PREFIXES) and key not in own:
            continue
        if key in own and key.startswith(head) and own[key].shape != value.shape:
            fresh_head.append(key)
            continue
        kept[key] = value
    mismatched = [k for k, v in kept.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in kept and k not in fresh_head and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in kept if k not in own]
    if mismatched or missing or unexpected:
        parts = [f"{label} {keys[:5]}" for label, keys in
                 (("shape mismatch", mismatched), ("missing", missing), ("unexpected", unexpected)) if keys]
        raise ModelError(f"{path} does not fit {type(model).__name__}: " + "; ".join(parts))
    model.load_state_dict(kept, strict=False)
    if fresh_head:
        log.info("%s: head %s re-initialised for a different number of classes", path, head.rstrip("."))
    log.info("loaded pretrained weights from %s", path)
