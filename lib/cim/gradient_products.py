"""The number format of a CIM layer's gradient products: float32 (the default) or bfloat16.

A layer's backward forms two large products from the partial sums' gradient: the input gradient
(a transposed grouped conv, or a matmul per row-tile) and the weight gradient. They dominate a
training step on CPU. With `CIM_AQ_GRADIENT_PRODUCTS=bfloat16`, on a CPU whose oneDNN runs
bfloat16 natively (AMX or AVX512-BF16), they take bfloat16 operands and accumulate in float32:
about 4x faster for the convs on AMX. The cell values are small integers, exact in bfloat16; the
gradients and inputs are rounded to 8 significant bits, as in any bfloat16 mixed-precision
training, and the two products' results once more. The forward (partial sums, ADC, outputs) is
untouched and stays exact; so does everything outside the CIM layers' products. Elsewhere (CUDA,
CPUs without native bfloat16) the products stay float32. The CLIs pin the setting once per
process (`configure_gradient_products`); a library used without them reads the variable once.
"""
from __future__ import annotations

import functools
import logging
import os
from contextlib import contextmanager

import torch

from lib.errors import UserError

log = logging.getLogger(__name__)

GRADIENT_PRODUCTS_ENV = "CIM_AQ_GRADIENT_PRODUCTS"
FORMATS = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class GradientProductsError(UserError, ValueError):
    """A gradient-product format other than float32 or bfloat16."""


@functools.lru_cache(maxsize=None)
def native_bfloat16() -> bool:
    """Whether oneDNN runs bfloat16 natively on this CPU (looked up once per process)."""
    is_supported = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(torch.backends.mkldnn.is_available() and is_supported is not None and is_supported())


def _parse(value: str, source: str) -> str:
    name = str(value).strip().lower()
    if name not in FORMATS:
        raise GradientProductsError(f"{source}={value!r} is not allowed: expected one of {list(FORMATS)}")
    return name


class _GradientProducts:
    """Owns the format of this process's CIM gradient products: pinned by `configure`, else read
    from the environment on first use; `use` sets it inside a block (tests, benchmarks)."""

    def __init__(self) -> None:
        self._format: str | None = None

    def configure(self, value: str | None = None) -> str:
        """Pin the format (None: from $CIM_AQ_GRADIENT_PRODUCTS, default float32); returns it."""
        if value is None:
            value, source = os.environ.get(GRADIENT_PRODUCTS_ENV) or "float32", GRADIENT_PRODUCTS_ENV
        else:
            source = "gradient products"
        self._format = _parse(value, source)
        if self._format == "bfloat16" and not native_bfloat16():
            log.info("bfloat16 gradient products asked for, but this CPU has no native bfloat16: float32 kept")
        return self._format

    @property
    def format(self) -> str:
        if self._format is None:
            self.configure()
        return self._format

    @contextmanager
    def use(self, value: str):
        """Gradient products in `value` (float32 | bfloat16) inside the block."""
        previous = self.format
        self._format = _parse(value, "gradient products")
        try:
            yield
        finally:
            self._format = previous

    def dtype_for(self, like: torch.Tensor) -> torch.dtype:
        """The dtype of the gradient products of a backward on `like` (float32 CPU tensors only
        ever change, and only where bfloat16 is native)."""
        if (self.format == "bfloat16" and like.dtype == torch.float32 and like.device.type == "cpu"
                and native_bfloat16()):
            return torch.bfloat16
        return like.dtype


GRADIENT_PRODUCTS = _GradientProducts()


def gradient_dtype(like: torch.Tensor) -> torch.dtype:
    """The dtype a CIM layer's gradient products take for a backward on `like`."""
    return GRADIENT_PRODUCTS.dtype_for(like)


def configure_gradient_products(value: str | None = None) -> str:
    """Set this process's gradient-product format (None: from $CIM_AQ_GRADIENT_PRODUCTS); returns it."""
    return GRADIENT_PRODUCTS.configure(value)
