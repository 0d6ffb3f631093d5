"""Fused CPU kernels compiled by Inductor without TorchDynamo, and called without its guards.

A CIM layer calls several small fused kernels per forward and backward. Through `torch.compile`
each call first runs TorchDynamo's cache lookup, guard checks and wrappers: about 100 µs on this
project's CPUs, as long as the kernel itself on a ResNet-20 layer. A `DirectKernel` traces its
function once per argument signature (make_fx with symbolic sizes), compiles that graph with
Inductor (`torch._inductor.standalone_compile`) and then calls the compiled code straight.

Dynamo's guards are replaced by two checks. The signature picks the graphs traced for arguments
like these: every tensor's dtype, device, rank and memory layout, which sizes are 0 or 1 and
which sizes are equal (tracing specialises on those), and the value of every other argument.
Each graph then keeps the conditions its tracing assumed (the shape environment's guards, such
as a divisibility or a size the function's Python branched on), evaluated on every call; a call
none of the graphs admits traces a new one. The compiled code itself checks each input's sizes
and strides again before it runs; a call it refuses raises `Refused`, and the caller runs its
eager kernel. A float argument would be part of the signature (a graph per value, and a step
changes every training step), so a kernel given one stays with `torch.compile`.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.experimental.symbolic_shapes import SYMPY_INTERP

INT32_ELEMENTS = 2**31  # tensors past this many elements get kernels traced on such a tensor


def _layout(t: torch.Tensor):
    """A tensor's memory layout as the signature records it: dense row-major, channels-last, or
    its exact strides."""
    if t.is_contiguous():
        return "contiguous"
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return "channels_last"
    return tuple(t.stride())


def signature(args) -> tuple:
    """What a traced graph depends on in `args` (see the module docstring)."""
    symbols: dict = {}
    parts = []
    for a in args:
        if isinstance(a, torch.Tensor):
            sizes = tuple(d if d < 2 else symbols.setdefault(d, len(symbols) + 2) for d in a.shape)
            parts.append((a.dtype, a.device, sizes, _layout(a), a.numel() >= INT32_ELEMENTS))
        else:
            parts.append(("value", a))
    return tuple(parts)


def _example(t: torch.Tensor) -> torch.Tensor:
    """A fresh tensor of t's sizes, strides, dtype and device, made outside inference mode (tracing
    reads only its metadata)."""
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)


class Refused(Exception):
    """The compiled code refused a call: an input's sizes or strides differ from the traced ones."""


def takes_directly(args) -> bool:
    """Whether a `DirectKernel` serves these arguments: no Python float among them."""
    return not any(isinstance(a, float) for a in args)


def _assumptions(traced: torch.fx.GraphModule, examples: list):
    """The conditions a symbolic trace assumed of its inputs, compiled for `eval` with the inputs
    as L['t0'], L['t1'], ... (None: none): the shape environment's guards on the symbolic sizes,
    and every size the trace fixed to its example's value."""
    shape_env = traced.shape_env
    placeholders = [node.meta["val"] for node in traced.graph.nodes if node.op == "placeholder"]
    checks = []
    produced = shape_env.produce_guards_expression(placeholders, ignore_static=True)
    if produced:
        checks.append(produced)
    for i, (fake, example) in enumerate(zip(placeholders, examples)):
        for dim, (traced_size, size) in enumerate(zip(fake.shape, example.shape)):
            expr = traced_size.node.expr if isinstance(traced_size, torch.SymInt) else traced_size
            if size >= 2 and not shape_env.replace(expr).free_symbols:
                checks.append(f"L['t{i}'].size()[{dim}] == {size}")
    return compile(" and ".join(checks), "<traced shape assumptions>", "eval") if checks else None


class DirectKernel:
    """`fn` compiled by Inductor per argument signature and shape assumptions, called without
    TorchDynamo."""

    def __init__(self, name: str, fn: Callable):
        self.name, self.fn = name, fn
        self._variants: dict = {}  # signature -> [(assumptions or None, compiled graph)]
        self._untraceable: set = set()  # signatures whose trace did not admit its own arguments

    @property
    def variants(self) -> int:
        """How many graphs have been compiled."""
        return sum(len(graphs) for graphs in self._variants.values())

    def __call__(self, *args):
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        key = signature(args)
        if key in self._untraceable:
            raise Refused(f"kernel {self.name!r}: no graph for these arguments")
        graphs = self._variants.setdefault(key, [])
        inputs = {f"t{i}": t for i, t in enumerate(tensors)}
        for assumptions, compiled in graphs:
            if assumptions is None or eval(assumptions, SYMPY_INTERP, {"L": inputs}):
                break
        else:
            assumptions, compiled = self._compile(args)
            if assumptions is not None and not eval(assumptions, SYMPY_INTERP, {"L": inputs}):
                self._untraceable.add(key)
                raise Refused(f"kernel {self.name!r}: its trace does not admit the arguments it was traced on")
            graphs.append((assumptions, compiled))
        try:
            result = compiled(*tensors)
        except AssertionError as err:
            raise Refused(f"kernel {self.name!r}: {str(err).splitlines()[0] if str(err) else err!r}") from err
        return tuple(result) if isinstance(result, list) else result

    def _compile(self, args):
        positions = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
        template = [None if isinstance(a, torch.Tensor) else a for a in args]  # keeps no tensor alive
        fn = self.fn

        def graph(*tensors):
            full = list(template)
            for i, t in zip(positions, tensors):
                full[i] = t
            return fn(*full)
        with torch.inference_mode(False), torch.no_grad():
            examples = [_example(args[i]) for i in positions]
            traced = make_fx(graph, tracing_mode="symbolic")(*examples)
            compiled = torch._inductor.standalone_compile(traced, examples, dynamic_shapes="from_graph")
            return _assumptions(traced, examples), compiled  # after compiling: Inductor may assume more
