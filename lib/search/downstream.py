"""Re-running only what one changed layer reaches, for single-layer measurements.

Scoring a layer's candidate bits changes that layer alone, so on fixed batches every value the
forward computes before it, or beside it (a residual branch that does not read it), is the same
for every candidate. `DownstreamForward` traces the model once with torch.fx (its quantizable
layers as leaves), keeps every node's value on each fixed batch, and computes a forward after a
change to layer i by re-running only the nodes downstream of layer i's node on those kept values:
the same modules on the same tensors, so the same logits, for about half the work on average.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import fx, nn

log = logging.getLogger(__name__)

# Kept node values above this many bytes (all fixed batches together) are not worth the memory:
# the caller runs whole forwards instead.
MAX_KEPT_BYTES = 1 << 30


class _LayerLeafTracer(fx.Tracer):
    """torch.fx's tracer with the given layers kept whole (never traced into)."""

    def __init__(self, leaves: list) -> None:
        super().__init__()
        self._leaves = {id(m) for m in leaves}

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return id(m) in self._leaves or super().is_leaf_module(m, qualname)


class DownstreamForward:
    """Forwards of `model` on fixed `batches` after a change to one of `layers` (see module
    docstring); build with `DownstreamForward.build`, which returns None where it cannot apply."""

    def __init__(self, module: fx.GraphModule, layer_nodes: list, kept: list) -> None:
        self._module = module
        self._kept = kept  # per batch: {node: value} of the unchanged model
        nodes = list(module.graph.nodes)
        self._output = next(n for n in nodes if n.op == "output")
        self._downstream = [self._reached_from(node, nodes) for node in layer_nodes]

    @classmethod
    @torch.no_grad()
    def build(cls, model: nn.Module, layers: list, batches: list) -> Optional["DownstreamForward"]:
        """Trace `model` (in eval mode) and keep its node values on `batches`; None when torch.fx
        cannot trace it, a layer is called more than once, or the values exceed MAX_KEPT_BYTES."""
        try:
            graph = _LayerLeafTracer(layers).trace(model)
        except Exception as err:  # any model code torch.fx cannot follow: measure with whole forwards
            log.info("torch.fx could not trace the model (%s); single-layer scores use whole forwards", err)
            return None
        module = fx.GraphModule(model, graph)
        names = {id(m): name for name, m in model.named_modules()}
        by_target: dict = {}
        for node in graph.nodes:
            if node.op == "call_module":
                by_target.setdefault(node.target, []).append(node)
        layer_nodes = []
        for layer in layers:
            calls = by_target.get(names.get(id(layer)), [])
            if len(calls) != 1:
                log.info("a layer is called %d times in the traced graph; single-layer scores use whole forwards",
                         len(calls))
                return None
            layer_nodes.append(calls[0])
        kept, size = [], 0
        for x, _ in batches:
            values = _run(module, list(graph.nodes), {}, x)
            size += sum(v.numel() * v.element_size() for v in values.values() if isinstance(v, torch.Tensor))
            if size > MAX_KEPT_BYTES:
                log.info("keeping every intermediate value would take over %d MiB; single-layer scores use "
                         "whole forwards", MAX_KEPT_BYTES >> 20)
                return None
            kept.append(values)
        return cls(module, layer_nodes, kept)

    @staticmethod
    def _reached_from(start: fx.Node, nodes: list) -> list:
        """`start` and every node that reads it, directly or not, in graph (topological) order."""
        reached = {start}
        for node in nodes:
            if node is not start and any(arg in reached for arg in node.all_input_nodes):
                reached.add(node)
        return [n for n in nodes if n in reached]

    @torch.no_grad()
    def logits(self, layer: int, batch: int) -> torch.Tensor:
        """The model's output on fixed batch `batch` with layer `layer` as it is now and every
        other layer as it was when the values were kept."""
        values = dict(self._kept[batch])
        _run(self._module, self._downstream[layer], values, None)
        return values[self._output]


def _run(module: fx.GraphModule, nodes: list, values: dict, x: Optional[torch.Tensor]) -> dict:
    """Evaluate `nodes` in order into `values` (node → value), reading the others from it; the
    placeholder takes `x`; the output node's value is the model's output."""
    def read(arg):
        return fx.node.map_arg(arg, lambda n: values[n])
    for node in nodes:
        if node.op == "placeholder":
            values[node] = x
        elif node.op == "get_attr":
            values[node] = _attribute(module, node.target)
        elif node.op == "call_module":
            values[node] = module.get_submodule(node.target)(*read(node.args), **read(node.kwargs))
        elif node.op == "call_function":
            values[node] = node.target(*read(node.args), **read(node.kwargs))
        elif node.op == "call_method":
            self_arg, *rest = read(node.args)
            values[node] = getattr(self_arg, node.target)(*rest, **read(node.kwargs))
        elif node.op == "output":
            values[node] = read(node.args[0])
    return values


def _attribute(module: nn.Module, target: str):
    value = module
    for part in target.split("."):
        value = getattr(value, part)
    return value
