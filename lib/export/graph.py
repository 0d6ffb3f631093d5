"""ONNX graph hygiene and inspection: cleaning passes, metadata, and reading the Q/DQ nodes back.

Cleaning keeps semantics: it drops graph inputs that duplicate initializers, runs only
onnxoptimizer passes that never change numerics (no BN/bias fusion into convs, which would
rewrite quantized weights), and checks the result with `onnx.checker` (full check, i.e. with
shape inference).
"""
from __future__ import annotations

import json
import logging
import math
from collections import Counter
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import onnx
import onnxoptimizer
from onnx import numpy_helper

log = logging.getLogger(__name__)

# Passes that only remove dead/no-op structure or merge identical constants.
CLEAN_PASSES = (
    "extract_constant_to_initializer",
    "eliminate_deadend",
    "eliminate_identity",
    "eliminate_nop_dropout",
    "eliminate_nop_pad",
    "eliminate_nop_transpose",
    "eliminate_duplicate_initializer",
    "eliminate_unused_initializer",
)


def drop_initializer_inputs(model: onnx.ModelProto) -> int:
    """Remove graph inputs that are also initializers (old-style exports list weights as inputs)."""
    names = {init.name for init in model.graph.initializer}
    keep = [inp for inp in model.graph.input if inp.name not in names]
    dropped = len(model.graph.input) - len(keep)
    if dropped:
        del model.graph.input[:]
        model.graph.input.extend(keep)
    return dropped


def clean(model: onnx.ModelProto, passes=CLEAN_PASSES) -> onnx.ModelProto:
    """Semantics-preserving clean-up; returns the optimised model (checked by the caller)."""
    drop_initializer_inputs(model)
    model = onnxoptimizer.optimize(model, list(passes))
    drop_initializer_inputs(model)
    return model


def set_metadata(model: onnx.ModelProto, metadata: Mapping[str, Any]) -> None:
    """Write metadata_props; non-string values are stored as JSON."""
    existing = {prop.key: prop for prop in model.metadata_props}
    for key, value in metadata.items():
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
        if key in existing:
            existing[key].value = text
        else:
            prop = model.metadata_props.add()
            prop.key, prop.value = key, text


def metadata(model: onnx.ModelProto) -> dict[str, str]:
    return {prop.key: prop.value for prop in model.metadata_props}


def check(model: onnx.ModelProto) -> None:
    """onnx.checker with full shape inference; raises onnx.checker.ValidationError."""
    onnx.checker.check_model(model, full_check=True)


# ------------------------------------------------------------------------------------ reading
@dataclass(frozen=True)
class QDQNode:
    """One DequantizeLinear and the integer grid of what it dequantizes."""

    name: str
    lo: int
    hi: int
    kind: str  # 'activation' (a QuantizeLinear or Round feeds it) or 'constant' (an initializer feeds it)
    per_channel: bool

    @property
    def signed(self) -> bool:
        return self.lo < 0

    @property
    def bits(self) -> int:
        """Bit width of the grid: [-(2^(b-1)) (+1 narrow), 2^(b-1)-1] or [0, 2^b-1]."""
        if self.signed:
            return int(round(math.log2(self.hi + 1))) + 1
        return max(1, int(round(math.log2(self.hi + 1))))


_DTYPE_RANGE = {onnx.TensorProto.INT8: (-128, 127), onnx.TensorProto.UINT8: (0, 255),
                onnx.TensorProto.INT32: (-(2 ** 31), 2 ** 31 - 1), onnx.TensorProto.INT16: (-32768, 32767),
                onnx.TensorProto.UINT16: (0, 65535)}


def qdq_nodes(model: onnx.ModelProto) -> list[QDQNode]:
    """Every DequantizeLinear with its integer range, read from the Clip before it (or its zero point type)."""
    graph = model.graph
    values = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attr.t)
    producer = {out: node for node in graph.node for out in node.output}
    result = []
    for node in graph.node:
        if node.op_type != "DequantizeLinear":
            continue
        zero_name = node.input[2] if len(node.input) > 2 else None
        zero = values.get(zero_name) if zero_name else None
        dtype_range = _DTYPE_RANGE.get(onnx.helper.np_dtype_to_tensor_dtype(zero.dtype)) if zero is not None else None
        lo, hi = dtype_range if dtype_range else (-128, 127)
        source = producer.get(node.input[0])
        kind = "constant" if node.input[0] in values else "activation"
        if source is not None and source.op_type == "Clip":
            low = values.get(source.input[1]) if len(source.input) > 1 else None
            high = values.get(source.input[2]) if len(source.input) > 2 else None
            if low is not None and high is not None:
                lo, hi = int(low), int(high)
            clipped = producer.get(source.input[0])
            kind = "constant" if source.input[0] in values else "activation"
            if clipped is not None and clipped.op_type == "Cast":  # our int32 form: Round → Clip → Cast → DQ
                source = clipped
        if source is not None and source.op_type == "Cast":
            rounded = producer.get(source.input[0])
            if rounded is not None and rounded.op_type == "Clip":
                low, high = values.get(rounded.input[1]), values.get(rounded.input[2])
                if low is not None and high is not None:
                    lo, hi = int(low), int(high)
        axis = [a for a in node.attribute if a.name == "axis"]
        scale = values.get(node.input[1])
        per_channel = bool(axis) and scale is not None and np.size(scale) > 1
        result.append(QDQNode(node.name, lo, hi, kind, per_channel))
    return result


def qdq_summary(model: onnx.ModelProto) -> dict:
    """Counts of Q/DQ pairs by (kind, signed, bits), e.g. {'activation s8': 12, 'constant u4': 40}."""
    counts = Counter(f"{n.kind} {'s' if n.signed else 'u'}{n.bits}" for n in qdq_nodes(model))
    ops = Counter(node.op_type for node in model.graph.node)
    return {"qdq": dict(sorted(counts.items())), "ops": dict(sorted(ops.items())), "nodes": len(model.graph.node)}


def node_scope(module_name: str) -> str:
    """The prefix torch.onnx (TorchScript exporter) gives the names of nodes inside a module: one
    scope per ancestor, each its qualified name from the last non-numeric atom on
    ('layer1.0.conv1' → '/layer1/layer1.0/conv1/')."""
    atoms = module_name.split(".")
    scopes = []
    for end in range(1, len(atoms) + 1):
        prefix = atoms[:end]
        start = max((i for i, atom in enumerate(prefix) if not atom.isnumeric()), default=0)
        scopes.append(".".join(prefix[start:]))
    return "/" + "/".join(scopes) + "/"


def layer_qdq(model: onnx.ModelProto, layer_name: str) -> dict[str, list[QDQNode]]:
    """The Q/DQ nodes of one exported CIM layer by role: 'input', 'weight' (weights or cell values),
    'psum' (ADC), 'bias'. Read from the node names, which carry the export form's module paths."""
    marker = node_scope(layer_name)
    roles: dict[str, list[QDQNode]] = {"input": [], "weight": [], "psum": [], "bias": []}
    for node in qdq_nodes(model):
        if not node.name.startswith(marker):
            continue
        rest = node.name[len(marker):]
        if rest.startswith("input_quant"):
            roles["input"].append(node)
        elif rest.startswith("branches."):  # branches.N/{piece,adc}/...: one partial-sum branch
            roles["psum" if rest.split("/")[1] == "adc" else "weight"].append(node)
        elif "bias" in rest.split("/")[0] or "/bias_quant/" in rest:
            roles["bias"].append(node)
        elif rest.startswith("pieces"):
            roles["weight"].append(node)
    return roles
