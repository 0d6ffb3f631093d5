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
    """The same Conv2d/Linear layers listed in call order (ours) and construction order (CIM-AQ's rows)."""

    call: tuple[str, ...]
    construction: tuple[str, ...]

    def construction_index(self) -> list[int]:
        """For each layer in call order, its row in a construction-ordered policy."""
        position = {name: i for i, name in enumerate(self.construction)}
        return [position[name] for name in self.call]


@contextmanager
def recording_construction(layer_types: tuple = DEFAULT_LAYER_TYPES) -> Iterator[list[nn.Module]]:
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


def layer_order(build: Callable[[], nn.Module], input_size: int | Sequence[int] = 32
                ) -> tuple[nn.Module, LayerOrder]:
    """Build a model with `build()` while recording constructor calls; return it and its LayerOrder.

    Only layers a forward pass calls count (as in trace_layer_calls); layers replaced after
    construction (e.g. a resized head) rank by when their replacement was built.
    """
    with recording_construction() as built:
        model = build()
    call = tuple(called_layer_names(model, input_size=input_size))
    rank = {id(module): i for i, module in enumerate(built)}
    modules = dict(model.named_modules())
    unknown = [name for name in call if id(modules[name]) not in rank]
    if unknown:
        raise ValueError(f"layers {unknown} were not constructed inside build(); cannot order them")
    construction = tuple(sorted(call, key=lambda name: rank[id(modules[name])]))
    return model, LayerOrder(call, construction)
