"""The number format of a CIM layer's gradient products: float32 (the default) or bfloat16.

A layer's backward forms two large products from the partial sums' gradient: the input gradient
(a transposed grouped conv, or a matmul per row-tile) and the weight gradient. They dominate a
training step on CPU. With the runtime's `gradient_products=bfloat16` (lib.cim.runtime), on a CPU
whose oneDNN runs bfloat16 natively (AMX or AVX512-BF16), they take bfloat16 operands and accumulate in float32:
about 4x faster for the convs on AMX. The cell values are small integers, exact in bfloat16; the
gradients and inputs are rounded to 8 significant bits, as in any bfloat16 mixed-precision
training, and the two products' results once more. The forward (partial sums, ADC, outputs) is
untouched and stays exact; so does everything outside the CIM layers' products. Elsewhere (CUDA,
CPUs without native bfloat16) the products stay float32.
"""
from __future__ import annotations

import functools

import torch

from lib.cim.runtime import RUNTIME, Runtime

FORMATS = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@functools.lru_cache(maxsize=None)
def native_bfloat16() -> bool:
    """Whether oneDNN runs bfloat16 natively on this CPU (looked up once per process)."""
    is_supported = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(torch.backends.mkldnn.is_available() and is_supported is not None and is_supported())


def gradient_dtype(like: torch.Tensor, runtime: Runtime | None = None) -> torch.dtype:
    """The dtype a CIM layer's gradient products take for a backward on `like` under `runtime`
    (default: the one in force): bfloat16 only for float32 CPU tensors where it is native."""
    runtime = RUNTIME.current if runtime is None else runtime
    if (runtime.gradient_products == "bfloat16" and like.dtype == torch.float32 and like.device.type == "cpu"
            and native_bfloat16()):
        return torch.bfloat16
    return like.dtype
