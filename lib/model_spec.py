"""What a trained model is (`ModelSpec`) and the one place that builds and rebuilds it.

A checkpoint's `args` (a plain dict, see lib.training.checkpoint) record the model description:
arch, num_classes, input_size, dataset, data_root, quant (none | uniform | mixed), the bits
(`w_bit`/`a_bit` for uniform, `policy` JSON for mixed) and the crossbar hardware
(`hardware` path, `hardware_config` fields). `ModelSpec` is the typed form of those keys;
`ModelSpec.from_args` reads every checkpoint pretrain.py and finetune.py have written, and
`to_args` writes the same keys back.

Builders: `build_model` (fresh, optionally from float weights), `model_from_checkpoint` (a
trained model with its bits), `model_at_policy` ("this start checkpoint, at that policy":
a quantized start on the same hardware is loaded whole and the policy applied in place;
any other start contributes only its float weights), `check_policy` (a policy fits the model:
length, names, bits; returns its price), `layer_order_of` (the .npy row order of a spec's model).
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

from torch import nn

from lib.cim import HardwareConfig, apply_policy, calibrate, quantize_model
from lib.data import default_input_size
from lib.errors import UserError
from lib.layer_trace import LayerOrder, layer_order
from lib.policy import Policy, PolicyError
from lib.simulator import CostModel
from lib.training import CheckpointError, load_checkpoint, load_model_state
from models import create_model, read_state_dict

log = logging.getLogger(__name__)

QUANT_MODES = ("none", "uniform", "mixed")
QUANTIZED = ("uniform", "mixed")
BASELINE_BITS = (8, 8)
DEFAULT_HARDWARE = Path(__file__).resolve().parent.parent / "run" / "hardware" / "default.yaml"


class ModelSpecError(UserError, ValueError):
    """A model description that is incomplete, contradictory or does not fit the model."""


@dataclass(frozen=True)
class ModelSpec:
    """A model as a checkpoint records it: architecture, data it was built for, quantization.

    quant: 'none' (FP32), 'uniform' (every layer at w_bit/a_bit) or 'mixed' (per-layer `policy`).
    hardware: the crossbar of a quantized model; hardware_path: where it was read from (if a file).
    """

    arch: str
    num_classes: Optional[int] = None
    input_size: Optional[int] = None
    dataset: str = "digits"
    data_root: Optional[str] = None
    quant: str = "none"
    w_bit: int = 8
    a_bit: int = 8
    policy: Optional[Policy] = dataclasses.field(default=None, compare=False)
    hardware: Optional[HardwareConfig] = None
    hardware_path: Optional[str] = None

    def __post_init__(self) -> None:
        if not self.arch:
            raise ModelSpecError("arch is required (a model name from models.list_models())")
        if self.quant not in QUANT_MODES:
            raise ModelSpecError(f"quant={self.quant!r} is not allowed: expected one of {list(QUANT_MODES)}")
        if self.quant in QUANTIZED and self.hardware is None:
            raise ModelSpecError(f"quant={self.quant!r} needs a hardware configuration")
        if self.quant == "mixed" and self.policy is None:
            raise ModelSpecError("quant='mixed' needs a policy")
        if self.num_classes is not None and (not isinstance(self.num_classes, int) or self.num_classes < 1):
            raise ModelSpecError(f"num_classes={self.num_classes!r} is not allowed: expected an integer >= 1")
        if self.input_size is None:
            object.__setattr__(self, "input_size", default_input_size(self.dataset))

    # ------------------------------------------------------------ conversions
    @classmethod
    def from_args(cls, args: Mapping[str, Any], source: str = "checkpoint args") -> "ModelSpec":
        """The spec recorded in a checkpoint's (or args.json's) plain `args` dict."""
        if not args.get("arch"):
            raise CheckpointError(f"{source} lack 'arch'; cannot rebuild the model")
        quant = args.get("quant") or "none"
        if quant not in QUANT_MODES:
            raise CheckpointError(f"{source}: quant={quant!r}: expected one of {list(QUANT_MODES)}")
        hardware = None
        if quant in QUANTIZED:
            if not args.get("hardware_config"):
                raise CheckpointError(f"{source} lack 'hardware_config' for a quantized model")
            hardware = HardwareConfig.from_dict(args["hardware_config"], source=source)
        policy = policy_from_args(args)
        if quant == "mixed" and policy is None:
            raise CheckpointError(f"{source}: quant='mixed' without a 'policy'")
        try:
            return cls(arch=args["arch"], num_classes=_int_or_none(args.get("num_classes")),
                       input_size=_int_or_none(args.get("input_size")), dataset=args.get("dataset") or "digits",
                       data_root=args.get("data_root"), quant=quant, w_bit=int(args.get("w_bit") or 8),
                       a_bit=int(args.get("a_bit") or 8), policy=policy, hardware=hardware,
                       hardware_path=args.get("hardware"))
        except ModelSpecError as err:
            raise CheckpointError(f"{source}: {err}") from None

    def to_args(self) -> dict:
        """The plain dict stored in checkpoints (the keys from_args reads)."""
        return {"arch": self.arch, "num_classes": self.num_classes, "input_size": self.input_size,
                "dataset": self.dataset, "data_root": self.data_root, "quant": self.quant,
                "w_bit": self.w_bit, "a_bit": self.a_bit,
                "policy": self.policy.to_json_dict() if self.policy is not None else None,
                "hardware": self.hardware_path,
                "hardware_config": self.hardware.to_dict() if self.hardware is not None else None}

    def replace(self, **changes: Any) -> "ModelSpec":
        return dataclasses.replace(self, **changes)

    def at_policy(self, policy: Policy, hardware: Optional[HardwareConfig] = None,
                  hardware_path: Optional[str] = None) -> "ModelSpec":
        """This model at a mixed-precision policy (optionally on other hardware)."""
        hw = hardware or self.hardware
        return self.replace(quant="mixed", policy=policy, hardware=hw,
                            hardware_path=hardware_path if hardware else self.hardware_path)

    def bits(self):
        """What quantize_model takes: the policy (mixed) or (w_bit, a_bit) (uniform)."""
        return self.policy if self.quant == "mixed" else (self.w_bit, self.a_bit)

    def require_classes(self) -> int:
        if self.num_classes is None:
            raise ModelSpecError(f"{self.arch}: num_classes is unknown (set it from the dataset first)")
        return self.num_classes


def _int_or_none(value) -> Optional[int]:
    return None if value is None else int(value)


def policy_from_args(args: Mapping[str, Any]) -> Optional[Policy]:
    """The policy recorded in checkpoint args (finetune: `policy` as policy JSON); None otherwise."""
    data = args.get("policy")
    if isinstance(data, Mapping) and "layers" in data:
        return Policy.from_json_dict(data, source="checkpoint policy")
    return None


def spec_from_flags(arch: Optional[str], dataset: Optional[str], data_root: Optional[str],
                    input_size: Optional[int], start: Optional[ModelSpec] = None,
                    start_name: str = "--init checkpoint") -> ModelSpec:
    """A float spec from CLI flags, unset ones filled from a starting checkpoint's spec.

    An explicit --arch that differs from the start's is an error, not a silently different model.
    """
    if arch and start is not None and arch != start.arch:
        raise ModelSpecError(f"--arch {arch} conflicts with the {start_name}'s arch={start.arch!r}")
    arch = arch or (start.arch if start else None)
    if not arch:
        raise ModelSpecError(f"--arch is required (or a {start_name} that records it)")
    dataset = dataset or (start.dataset if start else None) or "digits"
    return ModelSpec(arch=arch, dataset=dataset,
                     data_root=data_root if data_root is not None else (start.data_root if start else None),
                     input_size=input_size or (start.input_size if start else None),
                     num_classes=start.num_classes if start else None)


def hardware_for(path: Optional[str | Path], start: Optional[ModelSpec] = None,
                 default: Path = DEFAULT_HARDWARE) -> tuple[HardwareConfig, str]:
    """(hardware, its source): the given YAML, else the start's hardware, else the default YAML."""
    if path:
        return HardwareConfig.from_yaml(path), str(path)
    if start is not None and start.hardware is not None:
        return start.hardware, start.hardware_path or "--init checkpoint"
    return HardwareConfig.from_yaml(default), str(default)


# ------------------------------------------------------------------------------------------ builders
def build_model(spec: ModelSpec, weights: Optional[Mapping] = None, calibration: Optional[Iterable] = None,
                calibration_batches: int = 4, pretrained: Optional[str | Path] = None) -> nn.Module:
    """A fresh model of `spec`: create_model → (float weights) → CIM layers at spec's bits.

    weights: float state dict loaded strictly before conversion. calibration: training batches
    that initialise the quantizer steps of the fresh conversion (skip when a quantized state
    dict is loaded next).
    """
    model = create_model(spec.arch, spec.require_classes(), pretrained=pretrained)
    if weights is not None:
        load_model_state(model, weights, "the given float weights")
    if spec.quant == "none":
        return model
    try:
        return quantize_model(model, spec.bits(), spec.hardware, input_size=spec.input_size,
                              calibration_data=calibration, calibration_batches=calibration_batches)
    except PolicyError as err:
        raise ModelSpecError(f"the policy does not fit {spec.arch}: {err}") from None


def read_start(path: Optional[str | Path]) -> tuple[Optional[dict], Optional[dict]]:
    """(cim-aq checkpoint dict or None, plain state dict or None) of a starting-weights file."""
    if not path:
        return None, None
    try:
        return load_checkpoint(path), None
    except CheckpointError as err:
        if "not a cim-aq checkpoint" not in str(err):
            raise
    return None, read_state_dict(path)


def model_from_checkpoint(path_or_state: str | Path | Mapping[str, Any]) -> tuple[nn.Module, dict]:
    """(model with the checkpoint's weights and bits, the checkpoint dict)."""
    if isinstance(path_or_state, Mapping):
        state, source = dict(path_or_state), "checkpoint"
    else:
        state, source = load_checkpoint(path_or_state), str(path_or_state)
    spec = ModelSpec.from_args(state["args"], source=f"{source} args")
    if spec.num_classes is None:
        raise CheckpointError(f"{source} args lack 'num_classes'; cannot rebuild the model")
    try:
        model = build_model(spec)
    except ModelSpecError as err:
        raise CheckpointError(f"{source}: {err}") from None
    load_model_state(model, state["state_dict"], source)
    return model, state


def model_at_policy(spec: ModelSpec, policy: Policy, hw: HardwareConfig, start_state: Optional[Mapping] = None,
                    start_plain: Optional[Mapping] = None, calibration: Optional[Iterable] = None,
                    calibration_batches: int = 4) -> nn.Module:
    """The model at `policy` on CIM layers, starting from a checkpoint (or plain weights, or nothing).

    A quantized start on the same hardware is loaded whole (steps included), the policy applied in
    place (steps whose bits changed re-initialise) and calibrated. Any other start contributes its
    float weights, and the model is converted and calibrated from them.
    """
    start_spec = ModelSpec.from_args(start_state["args"]) if start_state is not None else None
    num_classes = spec.num_classes or (start_spec.num_classes if start_spec else None)
    spec = spec.replace(num_classes=num_classes)
    if start_spec is not None and start_spec.quant in QUANTIZED and start_spec.hardware == hw:
        model = build_model(start_spec)
        load_model_state(model, start_state["state_dict"], "the starting checkpoint")
        apply_policy(model, policy)
        if calibration is not None:
            calibrate(model, calibration, max_batches=calibration_batches)
        log.info("started from the quantized checkpoint and applied the policy")
        return model
    weights = start_plain if start_plain is not None else (start_state["state_dict"] if start_state else None)
    float_model = create_model(spec.arch, spec.require_classes())
    if weights is not None:
        if start_spec is not None and start_spec.quant in QUANTIZED:
            log.info("the start was quantized on other hardware: starting from its float weights only")
        float_keys = set(float_model.state_dict())
        weights = {k: v for k, v in weights.items() if k in float_keys}
    else:
        log.warning("no starting weights: the model starts from random weights")
    return build_model(spec.at_policy(policy, hw), weights=weights, calibration=calibration,
                       calibration_batches=calibration_batches)


def cost_model_for(spec: ModelSpec, hw: HardwareConfig, max_bit: int = 8, layer_dims: Optional[str | Path] = None):
    """The cost model of spec's float architecture at its input size (or of a CIM-AQ dims YAML).

    A dims table must have one row per quantizable layer of the model (call order).
    """
    float_model = create_model(spec.arch, spec.require_classes())
    traced = CostModel.from_model(float_model, hw, spec.input_size, max_bit=max_bit, baseline_bits=BASELINE_BITS)
    if layer_dims is None:
        return traced
    table = CostModel.from_dims_yaml(layer_dims, hw, max_bit=max_bit, baseline_bits=BASELINE_BITS)
    if len(table) != len(traced):
        raise ModelSpecError(f"layer dims table {str(layer_dims)!r} has {len(table)} rows but {spec.arch} has "
                             f"{len(traced)} quantizable layers at input size {spec.input_size}; expected "
                             f"{len(traced)}")
    return table


def layer_order_of(spec: ModelSpec) -> LayerOrder:
    """The float architecture's layers in call order and in construction order (the .npy row order)."""
    return layer_order(lambda: create_model(spec.arch, spec.require_classes()), spec.input_size)[1]


def check_policy(policy: Policy, spec: ModelSpec, hw: HardwareConfig):
    """Refuse a policy that does not fit the model (length, layer names, bit range); returns its cost.

    The policy's rows follow the model's Conv2d/Linear layers in call order (the cost model's order).
    Fills in the layer names of a policy read without them.
    """
    max_bit = max([8] + policy.w_bits + policy.a_bits)
    cost_model = cost_model_for(spec, hw, max_bit=max_bit)
    policy.check_matches(cost_model.layer_names)
    if policy.layer_names is None:
        policy.layer_names = list(cost_model.layer_names)
    return cost_model.policy_cost(policy)
