"""Turn any model's Conv2d/Linear layers into CIM layers, list them in call order, set their bits.

Conversion is by module type (module_map), per instance name (instance_map overrides) and with
excluded names, in the spirit of aihwkit's QuantizationMap. An input quantizer is unsigned when
the layer's input provably comes out of a ReLU-like op (read from the torch.fx graph), signed
otherwise; models fx cannot trace fall back to checking the sign of real activations.
"""
from __future__ import annotations

import logging
import operator
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from lib.cim.hardware import HardwareConfig
from lib.cim.layers import CIMConv2d, CIMLayerMixin, CIMLinear
from lib.layer_trace import example_input_for, trace_layer_calls
from lib.policy import Policy, PolicyError
from lib.errors import UserError

log = logging.getLogger(__name__)

BitsSpec = Union[Policy, Sequence[int]]
DEFAULT_MODULE_MAP: dict = {nn.Conv2d: CIMConv2d, nn.Linear: CIMLinear}
LAYER_ORDER_ATTR = "_cim_layer_names"

_UNSIGNED_MODULES = (nn.ReLU, nn.ReLU6, nn.Sigmoid, nn.Softmax, nn.Softplus)
_UNSIGNED_FUNCTIONS = {F.relu, F.relu6, torch.relu, torch.sigmoid, F.sigmoid, F.softmax, torch.softmax, F.softplus}
_UNSIGNED_METHODS = {"relu", "relu_", "sigmoid", "softmax"}
_PASS_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d,
                 nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Dropout, nn.Dropout2d, nn.Identity,
                 nn.Flatten, nn.Upsample)
_PASS_FUNCTIONS = {torch.flatten, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d,
                   F.dropout, torch.reshape, torch.mean, F.interpolate, operator.getitem}
_PASS_METHODS = {"view", "reshape", "flatten", "mean", "permute", "contiguous", "transpose", "squeeze",
                 "unsqueeze", "clone", "detach"}
_ALL_INPUTS_FUNCTIONS = {torch.cat, operator.add, operator.iadd, torch.add, operator.mul, torch.mul}


class ConversionError(UserError, ValueError):
    """A model, map or bit specification that quantize_model cannot apply."""


def _policy_bits(spec: BitsSpec, count: int, names: list[str]) -> list[tuple[int, int, Optional[int]]]:
    if isinstance(spec, Policy):
        spec.check_matches(names) if spec.layer_names is not None else None
        if len(spec) != count:
            raise PolicyError(f"policy has {len(spec)} layers but the model has {count} quantizable layers")
        return [spec.layer(i) for i in range(count)]
    if isinstance(spec, (str, bytes)) or not all(isinstance(b, int) and not isinstance(b, bool) for b in spec):
        raise ConversionError(f"bits={spec!r} is not allowed: expected (w_bit, a_bit) or (w_bit, a_bit, adc_bits) "
                              f"as integers, or a Policy for per-layer bits (Policy(w_bits, a_bits, adc_bits))")
    bits = tuple(int(b) for b in spec)
    if len(bits) not in (2, 3):
        raise ConversionError(f"bits={spec!r} is not allowed: expected (w_bit, a_bit) or (w_bit, a_bit, adc_bits) or a Policy")
    return [(bits[0], bits[1], bits[2] if len(bits) == 3 else None)] * count


def _unsigned_inputs_from_graph(model: nn.Module, names: Iterable[str]) -> Optional[dict[str, bool]]:
    """Per layer name: True when its input is the output of a ReLU-like op (possibly through pooling,
    reshapes and dropout). None when torch.fx cannot trace the model."""
    try:
        graph_module = torch.fx.symbolic_trace(model)
    except Exception as err:  # noqa: BLE001 - any tracing failure means: use the fallback
        log.info("torch.fx could not trace %s (%s); deciding input signs from activations",
                 type(model).__name__, str(err).splitlines()[0][:120])
        return None
    modules = dict(graph_module.named_modules())
    memo: dict = {}

    def unsigned(node) -> bool:
        if node in memo:
            return memo[node]
        memo[node] = False  # cycles cannot happen in fx graphs, but guard recursion anyway
        result = False
        if node.op == "call_module":
            module = modules.get(node.target)
            if isinstance(module, _UNSIGNED_MODULES):
                result = True
            elif isinstance(module, nn.Hardtanh):
                result = module.min_val >= 0
            elif isinstance(module, _PASS_MODULES) or (isinstance(module, nn.Sequential) and len(module) == 0):
                result = unsigned(node.args[0])
        elif node.op == "call_function":
            if node.target in _UNSIGNED_FUNCTIONS:
                result = True
            elif node.target is F.hardtanh:
                result = (node.kwargs.get("min_val", node.args[1] if len(node.args) > 1 else -1.0)) >= 0
            elif node.target in _PASS_FUNCTIONS:
                result = bool(node.args) and hasattr(node.args[0], "op") and unsigned(node.args[0])
            elif node.target in _ALL_INPUTS_FUNCTIONS:
                inputs = node.args[0] if node.target is torch.cat else node.args[:2]
                nodes = [a for a in inputs if hasattr(a, "op")]
                result = bool(nodes) and all(unsigned(a) for a in nodes) and all(
                    hasattr(a, "op") or (isinstance(a, (int, float)) and a >= 0) for a in inputs)
        elif node.op == "call_method":
            if node.target in _UNSIGNED_METHODS:
                result = True
            elif node.target in _PASS_METHODS:
                result = unsigned(node.args[0])
        memo[node] = result
        return result

    wanted = set(names)
    found: dict[str, bool] = {}
    for node in graph_module.graph.nodes:
        if node.op == "call_module" and node.target in wanted and node.target not in found:
            found[node.target] = bool(node.args) and hasattr(node.args[0], "op") and unsigned(node.args[0])
    if set(found) != wanted:
        return None
    return found


def _unsigned_inputs_from_activations(model: nn.Module, names: list[str], example: torch.Tensor) -> dict[str, bool]:
    """Fallback: a layer's input is unsigned when a random batch never makes it negative."""
    seen: dict[str, bool] = {}
    handles = []
    modules = dict(model.named_modules())
    for name in names:
        def hook(module, inputs, name=name):
            value = inputs[0]
            value = value.value if hasattr(value, "value") else value
            seen[name] = seen.get(name, True) and bool((value >= 0).all())
        handles.append(modules[name].register_forward_pre_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.randn_like(example))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return {name: seen.get(name, False) for name in names}


def quantize_model(model: nn.Module, policy_or_bits: BitsSpec, hw: HardwareConfig,
                   module_map: Optional[Mapping[type, Callable]] = None,
                   instance_map: Optional[Mapping[str, Mapping[str, Any]]] = None,
                   exclude: Iterable[str] = (), input_size: int | Sequence[int] = 32,
                   calibration_data: Optional[Iterable] = None, calibration_batches: int = 4) -> nn.Module:
    """Replace every Conv2d/Linear that a forward pass calls by a CIM layer (in place; returns model).

    policy_or_bits: a Policy (one entry per converted layer, call order) or (w_bit, a_bit[, adc_bits]).
    module_map: {float type: CIM class with `from_float`}, default Conv2d→CIMConv2d, Linear→CIMLinear.
    instance_map: {layer name: overrides of from_float's keywords (w_bit, a_bit, adc_bits, hw,
        input_signed)}. exclude: names kept in floating point.
    input_size: H (square) or (C, H, W) of one example image, used to trace call order.
    calibration_data: optional batches (tensors or (input, target) pairs) to initialise steps;
        at most `calibration_batches` of them are used.
    """
    if not isinstance(hw, HardwareConfig):
        raise ConversionError(f"hw must be a HardwareConfig, got {type(hw).__name__}")
    module_map = dict(DEFAULT_MODULE_MAP if module_map is None else module_map)
    instance_map = dict(instance_map or {})
    excluded = set(exclude)
    all_names = {name for name, _ in model.named_modules()}
    unknown = sorted((set(instance_map) | excluded) - all_names)
    if unknown:
        raise ConversionError(f"unknown layer name(s) {unknown} in instance_map/exclude; the model has e.g. "
                              f"{sorted(n for n in all_names if n)[:5]}")
    example = example_input_for(model, input_size)
    float_types = tuple(module_map)
    try:
        traced = trace_layer_calls(model, example, layer_types=float_types, exclude=excluded)
    except (RuntimeError, ValueError) as err:  # shape errors of a too small / malformed example input
        raise ConversionError(f"input_size={input_size!r} cannot be traced through {type(model).__name__}: "
                              f"{str(err).splitlines()[0][:200]}; give the (C, H, W) or H the model was "
                              f"built for") from None
    calls = [c for c in traced if not isinstance(c.module, CIMLayerMixin) and type(c.module) in module_map]
    names = [c.name for c in calls]
    if not names:
        raise ConversionError(f"{type(model).__name__} calls no layer of the types {[t.__name__ for t in float_types]}")
    bits = _policy_bits(policy_or_bits, len(names), names)
    unsigned = _unsigned_inputs_from_graph(model, names)
    if unsigned is None:
        unsigned = _unsigned_inputs_from_activations(model, names, example)
    for call, (w_bit, a_bit, adc_bits) in zip(calls, bits):
        options = dict(hw=hw, w_bit=w_bit, a_bit=a_bit, adc_bits=adc_bits,
                       input_signed=not unsigned[call.name], name=call.name)
        overrides = dict(instance_map.get(call.name, {}))
        factory = overrides.pop("cls", module_map[type(call.module)])
        options.update(overrides)
        set_submodule(model, call.name, factory.from_float(call.module, **options))
    setattr(model, LAYER_ORDER_ATTR, names)
    log.info("converted %d layers to CIM layers (%d with unsigned inputs)", len(names),
             sum(unsigned[n] for n in names))
    if calibration_data is not None:
        calibrate(model, calibration_data, max_batches=calibration_batches)
    return model


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the module at dotted path `name`."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def quantizable_layers(model: nn.Module, input_size: Optional[int | Sequence[int]] = None) -> list[tuple[str, CIMLayerMixin]]:
    """The CIM layers as (name, module) in forward-call order (the order of policies and cost tables).

    Uses the order recorded by quantize_model; re-traces (at `input_size`, default 32) when the
    model was built otherwise.
    """
    modules = dict(model.named_modules())
    names = getattr(model, LAYER_ORDER_ATTR, None)
    if names is None or any(not isinstance(modules.get(n), CIMLayerMixin) for n in names):
        example = example_input_for(model, 32 if input_size is None else input_size)
        names = [c.name for c in trace_layer_calls(model, example, layer_types=(CIMLayerMixin,))]
        setattr(model, LAYER_ORDER_ATTR, names)
    return [(name, modules[name]) for name in names]


def apply_policy(model: nn.Module, policy: BitsSpec) -> None:
    """Set every CIM layer's bits in place; refuses a policy whose length or layer names differ."""
    layers = quantizable_layers(model)
    names = [name for name, _ in layers]
    if isinstance(policy, Policy):
        policy.check_matches(names)
    for (_, layer), (w_bit, a_bit, adc_bits) in zip(layers, _policy_bits(policy, len(layers), names)):
        layer.set_bits(w_bit, a_bit, adc_bits)


def current_policy(model: nn.Module) -> Policy:
    """The bits the model's CIM layers hold now, with their names."""
    layers = quantizable_layers(model)
    return Policy([l.w_bit for _, l in layers], [l.a_bit for _, l in layers],
                  [l.adc_bits for _, l in layers], [n for n, _ in layers])


BATCH_NORM_STATISTICS = ("batch", "running")


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable, max_batches: int = 4, batch_norm: str = "batch") -> None:
    """Initialise input/ADC steps and running statistics from a few training batches.

    Runs in train mode so quantizers take their statistics; BatchNorm running statistics stay
    untouched. batch_norm: which activations the steps are fitted to. "batch" (for training
    next): BatchNorm layers normalise each batch by its own statistics, as the training forward
    does; "running" (for evaluating next): by their running statistics, as evaluation does. The
    two differ much for a badly trained start, and steps fitted to the other mode's activations
    can round whole channels to zero, whose BatchNorm backward then multiplies the gradient by
    1/sqrt(eps). A batch of one image has no batch statistics and is run with the running ones.
    Restores every module's mode afterwards.
    """
    if batch_norm not in BATCH_NORM_STATISTICS:
        raise ValueError(f"batch_norm={batch_norm!r}: expected one of {BATCH_NORM_STATISTICS}")
    modes = {m: m.training for m in model.modules()}
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    tracking = {m: m.track_running_stats for m in norms}
    model.train()
    device = next(model.parameters()).device
    try:
        for index, batch in enumerate(batches):
            if index >= max_batches:
                break
            inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
            per_batch = batch_norm == "batch" and inputs.shape[0] > 1  # one image has no batch statistics
            for module in norms:  # batch statistics: running buffers neither read nor updated
                module.train(per_batch)
                module.track_running_stats = tracking[module] and not per_batch
            model(inputs.to(device))
    finally:
        for module, training in modes.items():
            module.training = training
        for module, track in tracking.items():
            module.track_running_stats = track
