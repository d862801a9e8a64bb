"""Small helpers shared by more than one module (house style: no `utils.py`)."""

from __future__ import annotations

import functools
from typing import Any, TypeVar

import torch

T = TypeVar("T")

__all__ = [
    "exists", "default", "fmt_dtype", "fmt_dtypes", "fmt_shape", "accum_dtype", "functorch_wrapped", "DIM_LEGEND"
]

DIM_LEGEND = (
    "b batch, h query heads, g key/value heads, i query positions, j key positions, "
    "d head dim (q and k), e value head dim"
)


def exists(x: Any) -> bool:
    return x is not None


def default(x: T | None, d: T) -> T:
    return x if x is not None else d


def fmt_dtype(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def fmt_dtypes(dtypes) -> str:
    return ", ".join(sorted(fmt_dtype(t) for t in dtypes))


def fmt_shape(shape) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


def accum_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmax statistics are kept in float32, or float64 for float64 inputs (contract item 4)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


_is_wrapped = getattr(getattr(torch._C, "_functorch", None), "is_functorch_wrapped_tensor", None)


def functorch_wrapped(*tensors: torch.Tensor) -> bool:
    """Is any of `tensors` a torch.func transform's wrapper (vmap's batched tensor, grad's tracking tensor)?
    Checked by capability. Not traceable by dynamo: check `torch.compiler.is_compiling()` first."""
    if _is_wrapped is not None:
        for t in tensors:  # (a loop, not any(): this runs on every training call's fast path)
            if _is_wrapped(t):
                return True
    return False


@functools.lru_cache(maxsize=None)
def cuda_capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)
