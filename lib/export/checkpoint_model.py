"""Rebuild a trained model from a cim-aq checkpoint's recorded args (pretrain.py or finetune.py).

The checkpoint's `args` name the architecture, class count, input size and quantization
(`quant`: none | uniform | mixed, with `w_bit`/`a_bit` or `policy`, and `hardware_config`).
create_model → quantize_model → strict load_state_dict; the CIM layers adopt the bits stored in
the state dict, so a mixed-precision checkpoint loads into a freshly converted model.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Optional

from torch import nn

from lib.policy import Policy, PolicyError
from lib.training import CheckpointError, load_checkpoint, load_model_state

log = logging.getLogger(__name__)

QUANTIZED = ("uniform", "mixed")


def policy_from_args(args: Mapping[str, Any]) -> Optional[Policy]:
    """The policy recorded in checkpoint args (finetune: `policy` as policy JSON; pretrain: uniform bits)."""
    data = args.get("policy")
    if isinstance(data, Mapping) and "layers" in data:
        return Policy.from_json_dict(data, source="checkpoint policy")
    return None


def model_from_args(args: Mapping[str, Any]) -> nn.Module:
    """An untrained model of the recorded architecture, converted to CIM layers when it was quantized."""
    from models import create_model

    for key in ("arch", "num_classes"):
        if args.get(key) is None:
            raise CheckpointError(f"checkpoint args lack {key!r}; cannot rebuild the model")
    model = create_model(args["arch"], int(args["num_classes"]))
    quant = args.get("quant", "none")
    if quant in (None, "none"):
        return model
    if quant not in QUANTIZED:
        raise CheckpointError(f"checkpoint args quant={quant!r}: expected one of none, {', '.join(QUANTIZED)}")
    from lib.cim import HardwareConfig, quantize_model

    if not args.get("hardware_config"):
        raise CheckpointError("checkpoint args lack 'hardware_config' for a quantized model")
    hw = HardwareConfig.from_dict(args["hardware_config"], source="checkpoint args")
    bits = policy_from_args(args) if quant == "mixed" else (int(args.get("w_bit", 8)), int(args.get("a_bit", 8)))
    if bits is None:
        raise CheckpointError("checkpoint args quant='mixed' without a 'policy'")
    try:
        return quantize_model(model, bits, hw, input_size=args.get("input_size") or 32)
    except PolicyError as err:
        raise CheckpointError(f"the checkpoint's policy does not fit {args['arch']}: {err}") from None


def model_from_checkpoint(path_or_state: str | Path | Mapping[str, Any]) -> tuple[nn.Module, dict]:
    """(model with the checkpoint's weights and bits, the checkpoint dict)."""
    if isinstance(path_or_state, Mapping):
        state, source = dict(path_or_state), "checkpoint"
    else:
        state, source = load_checkpoint(path_or_state), str(path_or_state)
    model = model_from_args(state["args"])
    load_model_state(model, state["state_dict"], source)
    return model, state
