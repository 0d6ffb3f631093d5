"""Finiteness checks: find the first NaN or infinite tensor among many with one fused reduction.

Training checks every gradient before the optimizer step and every parameter after it; files
are checked when written and when read; integer conversions check what they convert. The fast
path is one `torch._foreach_norm` over all tensors and one device sync; only when it flags a
problem are the tensors inspected one by one to name the first bad one.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional, Sequence

import torch

from lib.errors import UserError


class NonFiniteError(UserError, FloatingPointError):
    """A tensor holds NaN or infinite values where only finite ones mean anything; the message names it.

    subject: what was checked, in words (e.g. "the input of conv1 to convert to integer codes")."""

    def __init__(self, message: str, subject: str = "") -> None:
        super().__init__(message)
        self.subject = subject


def _norms_finite(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether the 2-norms of same-dtype tensors are all finite: one fused pass, one sync.

    False for any NaN or infinite value, and also where the norm overflows (float32 values above
    ~1e19), which `first_nonfinite` then tells apart."""
    if tensors[0].dtype not in (torch.float32, torch.float64):  # half types overflow a norm early
        return all(bool(torch.isfinite(t).all()) for t in tensors)
    norms = torch._foreach_norm([t.detach() for t in tensors])
    return bool(torch.stack(norms).sum().isfinite())


def first_nonfinite(named: Iterable[tuple[str, Optional[torch.Tensor]]]) -> Optional[str]:
    """The name of the first floating-point tensor holding a NaN or infinite value, or None.

    Entries whose tensor is None (a parameter without gradient) or not floating point are skipped.
    """
    items = [(name, t) for name, t in named if t is not None and t.is_floating_point() and t.numel()]
    groups: dict[tuple, list] = {}
    for _, tensor in items:
        groups.setdefault((tensor.dtype, tensor.device), []).append(tensor)
    if all(_norms_finite(group) for group in groups.values()):
        return None
    for name, tensor in items:  # rare path: name the first one
        if not bool(torch.isfinite(tensor).all()):
            return name
    return None


def describe(tensor: torch.Tensor) -> str:
    """How many NaN and infinite values a tensor holds."""
    t = tensor.detach()
    nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
    parts = [f"{nan} NaN" if nan else "", f"{inf} infinite" if inf else ""]
    return f"{' and '.join(p for p in parts if p) or 'no non-finite'} of {t.numel()} values"


def nested_tensors(obj: Any, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    """(dotted path, tensor) for every tensor inside nested dicts / lists / tuples, in order."""
    found: list[tuple[str, torch.Tensor]] = []
    if isinstance(obj, torch.Tensor):
        found.append((prefix, obj))
    elif isinstance(obj, Mapping):
        for key, value in obj.items():
            found.extend(nested_tensors(value, f"{prefix}.{key}" if prefix else str(key)))
    elif isinstance(obj, (list, tuple)):
        for index, value in enumerate(obj):
            found.extend(nested_tensors(value, f"{prefix}[{index}]"))
    return found


def require_finite(obj: Any, what: str) -> None:
    """Raise NonFiniteError naming the first non-finite tensor in `obj` (a tensor or nested containers).

    what: the thing being checked, for the message ("checkpoint x.pth.tar", "the input of conv1")."""
    named = nested_tensors(obj)
    bad = first_nonfinite(named)
    if bad is not None:
        tensor = dict(named)[bad]
        where = f" tensor {bad!r}" if bad else ""
        raise NonFiniteError(f"{what}:{where} holds {describe(tensor)}", f"{what}{where}")
