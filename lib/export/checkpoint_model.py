"""Rebuild a trained model from a cim-aq checkpoint: the export's view of lib.model_spec.

The model description and every builder live in lib.model_spec; these names stay for callers
that import them from here.
"""
from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from lib.model_spec import ModelSpec, ModelSpecError, build_model, model_from_checkpoint, policy_from_args
from lib.training import CheckpointError

__all__ = ["model_from_args", "model_from_checkpoint", "policy_from_args"]


def model_from_args(args: Mapping[str, Any]) -> nn.Module:
    """An untrained model of the recorded architecture, converted to CIM layers when it was quantized."""
    spec = ModelSpec.from_args(args)
    if spec.num_classes is None:
        raise CheckpointError("checkpoint args lack 'num_classes'; cannot rebuild the model")
    try:
        return build_model(spec)
    except ModelSpecError as err:
        raise CheckpointError(str(err)) from None
