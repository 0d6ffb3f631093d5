"""Policies with attention rows, as CIM-AQ lays them out for its ViTs.

CIM-AQ quantizes each multi-head attention as four policy rows, at the attention's place in
the model: the Q/K/V input projection (weight bits, input bits), Q·Kᵀ (bits of the stored K,
bits of the streamed Q), A·V (bits of the stored V, bits of the streamed attention weights)
and the output projection. `trace_layer_dims(..., include_attention=True)` yields the same
rows (`in_proj`, `qk_matmul`, `av_matmul`, `out_proj`; cross-attention has `q_proj`, `k_proj`,
`v_proj` instead of `in_proj`), so the cost model prices such a policy row by row. Our CIM
layers quantize only the Conv2d/Linear modules a forward pass calls, so finetuning refuses it.
"""
from __future__ import annotations

from typing import Sequence

from torch import nn

from lib.policy import Policy, PolicyError
from lib.simulator.layer_dims import LayerDims, trace_layer_dims


def attention_rows(dims: Sequence[LayerDims]) -> list[str]:
    """Names of the rows that are attention work, not Conv2d/Linear modules."""
    return [d.name for d in dims if not d.quantizable]


def has_attention_rows(policy: Policy, dims: Sequence[LayerDims]) -> bool:
    """Whether `policy` is laid out over `dims` including its attention rows (by names, else by length)."""
    extra = attention_rows(dims)
    if not extra:
        return False
    if policy.layer_names is not None:
        return bool(set(extra) & set(policy.layer_names))
    return len(policy) == len(dims)


def attention_rows_message(policy: Policy, dims: Sequence[LayerDims], source: str) -> str:
    """Why a policy with attention rows does not fit the model's Conv2d/Linear layers, naming the rows."""
    extra = attention_rows(dims)
    shown = ", ".join(extra[:4]) + (", ..." if len(extra) > 4 else "")
    return (f"{source} has {len(policy)} rows: the model's {len(dims) - len(extra)} Conv2d/Linear layers plus "
            f"{len(extra)} attention rows (the input projection, Q·Kᵀ, A·V and output projection of each "
            f"nn.MultiheadAttention, as in CIM-AQ's ViT policies: {shown})")


def refuse_attention_rows(policy: Policy, model: nn.Module, input_size, source: str = "policy") -> None:
    """Refuse a policy with attention rows for `model`: the CIM layers quantize only Conv2d/Linear modules.

    Cheap (one traced forward pass); a model without nn.MultiheadAttention passes unchecked.
    """
    if not any(isinstance(m, nn.MultiheadAttention) for m in model.modules()):
        return
    dims = trace_layer_dims(model, input_size, include_attention=True)
    if has_attention_rows(policy, dims):
        layers = len(dims) - len(attention_rows(dims))
        raise PolicyError(f"{attention_rows_message(policy, dims, source)}; finetuning quantizes only the "
                          f"Conv2d/Linear modules, so these rows cannot be applied: price this policy with "
                          f"`python -m lib.simulator.latency --include-attention`, finetune with a policy of "
                          f"{layers} rows")
