"""Per-layer matrix dimensions (m, n, invocations, repeat) traced from one forward pass.

The cost model needs, for every matrix-vector workload of a network, the stored matrix's
output dim m (columns before slicing), input dim n (rows), how many MVMs one input image
issues (invocations I) and how many copies of the matrix exist (repeat: conv groups, attention
heads). We read them off the model itself, in call order (lib.layer_trace), instead of asking
users to hand-write them.

Rows of the result:
- every Conv2d / Linear module that the forward pass calls (`quantizable=True`); these are the
  policy rows, in the same order as `lib.layer_trace.trace_layer_calls`;
- optionally (`include_attention=True`) the work of each `nn.MultiheadAttention`, whose
  projections are not called as modules: input projection(s), Q·Kᵀ and A·V (MatMul, repeat =
  heads, invocations = query length, as CIM-AQ counts them) and the output projection, inserted
  at the attention module's place in call order, with `quantizable=False`.
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Optional, Sequence

import torch
from torch import nn

from lib.layer_trace import example_input_for, trace_layer_calls
from lib.errors import UserError

logger = logging.getLogger(__name__)

LAYER_TYPES = ("Conv2D", "Dense", "MatMul")


class LayerDimsError(UserError, ValueError):
    """Layer dimensions that are missing, malformed or impossible."""


@dataclass(frozen=True)
class LayerDims:
    """One matrix workload of the network as the crossbar cost model sees it.

    m: output dim per matrix (out_channels/groups, out_features, ...) -> array columns.
    n: input dim per matrix (C_in/groups·k_h·k_w, in_features, ...) -> array rows.
    invocations: MVMs per input image (conv output pixels, tokens), times `calls` for a
        module called more than once (programmed once, executed on every call).
    repeat: independent copies of the matrix (conv groups, attention heads).
    quantizable: True for a Conv2d/Linear module (a policy row of the model); False for an
        attention-only entry (MHA projections, Q·Kᵀ, A·V) or a MatMul read from YAML.
    The remaining fields feed the search's state embedding; None where unknown (YAML input,
    or not meaningful: a Linear has no feature map).
    """

    name: str
    type: str
    m: int
    n: int
    invocations: int = 1
    repeat: int = 1
    quantizable: bool = True
    in_channels: Optional[int] = None
    out_channels: Optional[int] = None
    kernel_size: Optional[tuple] = None
    stride: Optional[tuple] = None
    groups: int = 1
    in_hw: Optional[tuple] = None
    out_hw: Optional[tuple] = None
    params: Optional[int] = None
    calls: int = 1

    def __post_init__(self) -> None:
        if self.type not in LAYER_TYPES:
            raise LayerDimsError(f"{self.name}: type={self.type!r} is not allowed: expected one of {list(LAYER_TYPES)}")
        for key in ("m", "n", "invocations", "repeat", "groups", "calls"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise LayerDimsError(f"{self.name}: {key}={value!r} is not allowed: expected an integer >= 1")

    @property
    def depthwise(self) -> bool:
        """A grouped conv with one input channel per group."""
        return self.type == "Conv2D" and self.groups > 1 and self.in_channels == self.groups

    @property
    def kernel_elems(self) -> Optional[int]:
        """k_h·k_w for a conv (rows one input channel occupies), None when unknown or not a conv."""
        if self.type != "Conv2D" or self.kernel_size is None:
            return None
        return int(self.kernel_size[0]) * int(self.kernel_size[1])

    def to_dict(self) -> dict:
        data = asdict(self)
        data["depthwise"] = self.depthwise
        return data


# --------------------------------------------------------------------------- tracing
def trace_layer_dims(
    model: nn.Module,
    input_size: int | Sequence[int] | None = None,
    *,
    example_input: Optional[torch.Tensor] = None,
    include_attention: bool = False,
    exclude: Iterable[str] = (),
) -> list[LayerDims]:
    """Dims of the model's Conv2d/Linear layers in call order (plus attention work if asked).

    Give either `input_size` (H for a square RGB image, or (C, H, W)) or `example_input`.
    Invocations are per image: the example batch size is divided out.
    """
    if example_input is None:
        if input_size is None:
            raise LayerDimsError("trace_layer_dims needs input_size or example_input")
        example_input = example_input_for(model, input_size, batch=1)
    batch = int(example_input.shape[0]) if example_input.dim() > 0 else 1

    attention_info: dict[int, dict] = {}
    handles = []
    for module in model.modules():
        if isinstance(module, nn.MultiheadAttention):
            handles.append(module.register_forward_hook(_attention_recorder(attention_info), with_kwargs=True))
    try:
        calls = trace_layer_calls(model, example_input,
                                  layer_types=(nn.Conv2d, nn.Linear, nn.MultiheadAttention), exclude=exclude)
    finally:
        for handle in handles:
            handle.remove()

    dims: list[LayerDims] = []
    skipped_attention = 0
    for call in calls:
        module = call.module
        if isinstance(module, nn.MultiheadAttention):
            if include_attention:
                dims.extend(_attention_dims(call.name, module, attention_info[id(module)], call.calls))
            else:
                skipped_attention += 1
        elif isinstance(module, nn.Conv2d):
            dims.append(_conv_dims(call, batch))
        else:
            dims.append(_linear_dims(call, batch))
    if skipped_attention:
        logger.info("%d nn.MultiheadAttention module(s) left out of the layer dims "
                    "(include_attention=True adds their projections and Q·Kᵀ / A·V matmuls)", skipped_attention)
    return dims


def quantizable_names(dims: Sequence[LayerDims]) -> list[str]:
    """Names of the rows that are Conv2d/Linear modules (the model's policy rows)."""
    return [d.name for d in dims if d.quantizable]


def _pair(value: Any) -> tuple:
    return tuple(int(v) for v in value) if isinstance(value, (tuple, list)) else (int(value), int(value))


def _conv_dims(call, batch: int) -> LayerDims:
    conv: nn.Conv2d = call.module
    kernel, stride, groups = _pair(conv.kernel_size), _pair(conv.stride), int(conv.groups)
    if len(call.output_shape) < 2:
        raise LayerDimsError(f"{call.name}: could not read the conv's output shape {call.output_shape}")
    out_hw = tuple(int(s) for s in call.output_shape[-2:])
    if len(call.input_shape) >= 3:
        in_hw = tuple(int(s) for s in call.input_shape[-2:])
    else:  # input was not a plain tensor (e.g. a QuantTensor): estimate from the output
        in_hw = (out_hw[0] * stride[0], out_hw[1] * stride[1])
        logger.debug("%s: input shape unknown, estimating in_hw=%s from the output", call.name, in_hw)
    return LayerDims(
        name=call.name, type="Conv2D",
        m=int(conv.out_channels) // groups,
        n=int(conv.in_channels) // groups * kernel[0] * kernel[1],
        invocations=out_hw[0] * out_hw[1] * call.calls,
        repeat=groups, quantizable=True,
        in_channels=int(conv.in_channels), out_channels=int(conv.out_channels),
        kernel_size=kernel, stride=stride, groups=groups, in_hw=in_hw, out_hw=out_hw,
        params=int(conv.weight.numel()), calls=call.calls)


def _linear_dims(call, batch: int) -> LayerDims:
    linear: nn.Linear = call.module
    shape = call.output_shape or call.input_shape
    if not shape:
        raise LayerDimsError(f"{call.name}: could not read the linear layer's input/output shape")
    tokens = max(1, math.prod(int(s) for s in shape[:-1]) // max(batch, 1))
    return LayerDims(
        name=call.name, type="Dense",
        m=int(linear.out_features), n=int(linear.in_features),
        invocations=tokens * call.calls, repeat=1, quantizable=True,
        in_channels=int(linear.in_features), out_channels=int(linear.out_features),
        kernel_size=(1, 1), stride=(1, 1), groups=1, in_hw=None, out_hw=None,
        params=int(linear.weight.numel()), calls=call.calls)


def _attention_recorder(store: dict):
    """A forward hook (with kwargs) recording the first call's q/k/v shapes of an nn.MultiheadAttention."""
    def hook(module: nn.MultiheadAttention, args, kwargs, output):
        if id(module) in store:
            return
        names = ("query", "key", "value")
        tensors = [args[i] if i < len(args) else kwargs.get(names[i]) for i in range(3)]
        store[id(module)] = {
            "shapes": [tuple(t.shape) for t in tensors],
            "self_attention": tensors[0] is tensors[1] and tensors[1] is tensors[2],
        }
    return hook


def _attention_dims(name: str, mha: nn.MultiheadAttention, info: dict, calls: int) -> list[LayerDims]:
    """Projection, Q·Kᵀ and A·V workloads of one nn.MultiheadAttention (per image).

    Q·Kᵀ stores K (S×d_head) and streams the L queries; A·V stores Vᵀ (d_head×S) and streams
    the L attention rows; both repeat once per head (CIM-AQ's counting).
    """
    q_shape, k_shape, _ = info["shapes"]
    seq_dim = 1 if (mha.batch_first and len(q_shape) == 3) else 0
    target_len = int(q_shape[seq_dim])
    key_len = int(k_shape[1 if (mha.batch_first and len(k_shape) == 3) else 0])
    source_len = key_len + int(mha.bias_k is not None) + int(bool(mha.add_zero_attn))
    embed, heads, head_dim = int(mha.embed_dim), int(mha.num_heads), int(mha.head_dim)

    def dense(suffix: str, m: int, n: int, tokens: int) -> LayerDims:
        return LayerDims(name=f"{name}.{suffix}", type="Dense", m=m, n=n, invocations=tokens * calls,
                         quantizable=False, in_channels=n, out_channels=m, kernel_size=(1, 1), stride=(1, 1),
                         params=m * n, calls=calls)

    def matmul(suffix: str, m: int, n: int) -> LayerDims:
        return LayerDims(name=f"{name}.{suffix}", type="MatMul", m=m, n=n, invocations=target_len * calls,
                         repeat=heads, quantizable=False, in_channels=n, out_channels=m,
                         kernel_size=(1, 1), stride=(1, 1), params=0, calls=calls)

    if info["self_attention"] and mha._qkv_same_embed_dim:
        entries = [dense("in_proj", 3 * embed, embed, target_len)]
    else:
        entries = [dense("q_proj", embed, embed, target_len),
                   dense("k_proj", embed, int(mha.kdim), key_len),
                   dense("v_proj", embed, int(mha.vdim), key_len)]
    entries += [matmul("qk_matmul", source_len, head_dim),
                matmul("av_matmul", head_dim, source_len),
                dense("out_proj", embed, embed, target_len)]
    return entries
