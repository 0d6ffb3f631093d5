"""Find a model's Conv2d/Linear layers in the order a forward pass calls them, and the order
its constructor built them.

Module registration order is not call order (torchvision's ResNet registers `downsample`
after the block's convs but calls it first or in between); the search, the cost model and our
policies index layers by call order, so everything goes through this one tracer. CIM-AQ's
`.npy` policies list layers in *construction* order instead (a ResNet block builds `downsample`
before its two convs); `layer_order` records both so policy files can be translated.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Optional, Sequence

import torch
from torch import nn

DEFAULT_LAYER_TYPES = (nn.Conv2d, nn.Linear)
# Constructors recorded for the .npy row order: the policy layers, and attention modules whose
# Q·Kᵀ / A·V rows CIM-AQ's ViT policies carry (see lib.simulator.attention).
ORDER_TYPES = DEFAULT_LAYER_TYPES + (nn.MultiheadAttention,)


@dataclass
class LayerCall:
    """One traced layer: its first call's shapes and how many times the pass called it."""

    name: str
    module: nn.Module
    input_shape: tuple
    output_shape: tuple
    calls: int = 1
    extra: dict = field(default_factory=dict)


def example_input_for(model: nn.Module, input_size: int | Sequence[int], batch: int = 1) -> torch.Tensor:
    """A zero image batch (batch, C, H, W) on the model's device; input_size is H (square) or (C, H, W)."""
    if isinstance(input_size, int):
        shape = (3, input_size, input_size)
    else:
        shape = tuple(int(s) for s in input_size)
        if len(shape) == 2:
            shape = (3,) + shape
    try:
        param = next(model.parameters())
        device, dtype = param.device, param.dtype
    except StopIteration:
        device, dtype = torch.device("cpu"), torch.float32
    if device.type == "meta":
        device = torch.device("cpu")
    return torch.zeros((batch,) + shape, device=device, dtype=dtype)


def trace_layer_calls(
    model: nn.Module,
    example_input: torch.Tensor,
    layer_types: tuple = DEFAULT_LAYER_TYPES,
    exclude: Iterable[str] = (),
) -> list[LayerCall]:
    """Run one eval-mode forward pass under no_grad and return the hooked layers in call order.

    A layer called several times (shared weights) appears once, at its first call, with
    `calls` counting the calls. Layers never called (e.g. the projection inside
    nn.MultiheadAttention, which uses the weight directly) do not appear. The model's
    train/eval mode is restored afterwards.
    """
    excluded = set(exclude)
    order: dict[int, LayerCall] = {}
    handles = []

    def make_hook(name: str):
        def hook(module, inputs, output):
            key = id(module)
            if key in order:
                order[key].calls += 1
                return
            first = inputs[0] if inputs else None
            in_shape = tuple(first.shape) if isinstance(first, torch.Tensor) else ()
            out = output.value if hasattr(output, "value") else output
            out_shape = tuple(out.shape) if isinstance(out, torch.Tensor) else ()
            order[key] = LayerCall(name, module, in_shape, out_shape)
        return hook

    for name, module in model.named_modules():
        if isinstance(module, layer_types) and name not in excluded:
            handles.append(module.register_forward_hook(make_hook(name)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return list(order.values())


def called_layer_names(model: nn.Module, example_input: Optional[torch.Tensor] = None,
                       input_size: int | Sequence[int] = 32) -> list[str]:
    """Names of the Conv2d/Linear layers in call order (convenience wrapper)."""
    if example_input is None:
        example_input = example_input_for(model, input_size)
    return [call.name for call in trace_layer_calls(model, example_input)]


@dataclass(frozen=True)
class LayerOrder:
    """The same policy rows (Conv2d/Linear layers, and attention rows where priced) listed in call order
    (ours) and construction order (CIM-AQ's .npy rows)."""

    call: tuple[str, ...]
    construction: tuple[str, ...]

    def construction_index(self) -> list[int]:
        """For each layer in call order, its row in a construction-ordered policy."""
        position = {name: i for i, name in enumerate(self.construction)}
        return [position[name] for name in self.call]


@contextmanager
def recording_construction(layer_types: tuple = ORDER_TYPES) -> Iterator[list[nn.Module]]:
    """Inside the block, every constructed instance of `layer_types` (subclasses included) is appended
    to the yielded list as its constructor starts; the constructors are restored afterwards."""
    built: list[nn.Module] = []
    seen: set[int] = set()
    originals = {cls: cls.__init__ for cls in layer_types}

    def wrap(original):
        def init(self, *args, **kwargs):
            if id(self) not in seen:
                seen.add(id(self))
                built.append(self)
            original(self, *args, **kwargs)
        return init

    for cls, original in originals.items():
        cls.__init__ = wrap(original)
    try:
        yield built
    finally:
        for cls, original in originals.items():
            cls.__init__ = original


def build_recording_order(build: Callable[[], nn.Module]) -> tuple[nn.Module, dict[str, int]]:
    """Build a model with `build()`; return it and, per recorded submodule name, its construction rank."""
    with recording_construction() as built:
        model = build()
    rank = {id(module): i for i, module in enumerate(built)}
    return model, {name: rank[id(module)] for name, module in model.named_modules() if id(module) in rank}


def construction_order(call_rows: Sequence[str], ranks: dict[str, int]) -> LayerOrder:
    """The rows (module names, or `<module>.<part>` for the parts of one module such as an attention's
    Q·Kᵀ) sorted by when their module was constructed; parts of one module keep their call order.

    A row belongs to its longest dotted prefix that `ranks` knows (so `attn.out_proj`, a Linear built
    inside the attention, ranks as itself, and `attn.qk_matmul` as the attention).
    """
    def owner_rank(row: str) -> int:
        parts = row.split(".")
        for end in range(len(parts), 0, -1):
            prefix = ".".join(parts[:end])
            if prefix in ranks:
                return ranks[prefix]
        raise ValueError(f"layer {row!r} was not constructed inside build(); cannot order it")

    keyed = sorted(enumerate(call_rows), key=lambda item: (owner_rank(item[1]), item[0]))
    return LayerOrder(tuple(call_rows), tuple(row for _, row in keyed))


def layer_order(build: Callable[[], nn.Module], input_size: int | Sequence[int] = 32
                ) -> tuple[nn.Module, LayerOrder]:
    """Build a model with `build()` while recording constructor calls; return it and its LayerOrder.

    Only layers a forward pass calls count (as in trace_layer_calls); layers replaced after
    construction (e.g. a resized head) rank by when their replacement was built.
    """
    model, ranks = build_recording_order(build)
    return model, construction_order(called_layer_names(model, input_size=input_size), ranks)
