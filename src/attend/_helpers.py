"""Small helpers shared by more than one module (house style: no `utils.py`)."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, TypeVar

import torch

from . import features

T = TypeVar("T")

__all__ = [
    "exists", "default", "fmt_dtype", "fmt_dtypes", "fmt_shape", "accum_dtype", "functorch_wrapped", "DIM_LEGEND",
    "autocast_on", "any_autocast", "no_autocast", "autocast_inputs", "differentiable",
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
features.register(
    "functorch_wrapped_query",
    api="torch._C._functorch.is_functorch_wrapped_tensor",
    since="2.0",
    without="check_finite's guard cannot tell vmap's tensors (whose values Python cannot read) from others: under "
    "vmap it raises torch's error instead of skipping the guard, as it does under torch.compile",
    present=lambda: _is_wrapped is not None,
)


def functorch_wrapped(*tensors: torch.Tensor) -> bool:
    """Is any of `tensors` a torch.func transform's wrapper (vmap's batched tensor, grad's tracking tensor)?
    Checked by capability. Not traceable by dynamo: check `torch.compiler.is_compiling()` first."""
    if _is_wrapped is not None:
        for t in tensors:  # (a loop, not any(): this runs on every training call's fast path)
            if _is_wrapped(t):
                return True
    return False


def differentiable(t: torch.Tensor | None) -> bool:
    """Can a graph recorded now reach t? Not for a torch.func wrapper whose transform has exited: vjp_fn
    (torch.func.vjp, jacrev) runs the backward after vjp returned, and its saved inputs are such dead
    wrappers (functorch's maybe_get_level gives -2 for them); they still say requires_grad. A custom backward
    takes its second-order path (`grad2.recompute_grads`) only for inputs this says yes to."""
    if t is None or not t.requires_grad:
        return False
    functorch = getattr(torch._C, "_functorch", None)
    return functorch is None or torch.compiler.is_compiling() or functorch.maybe_get_level(t) != -2


@functools.lru_cache(maxsize=None)
def cuda_capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


# autocast: every door casts its inputs the same way (`autocast_inputs`) and every kernel runs with autocast off
# (`no_autocast`), owning its precision as `torch.amp.custom_fwd` does. Checked by capability on torch >= 2.4:
# `torch.amp.is_autocast_available` and `torch._C._is_any_autocast_enabled` may be missing.

_AUTOCAST_DEVICES = frozenset({"cpu", "cuda"})
_autocast_available = getattr(torch.amp, "is_autocast_available", lambda d: d in ("cpu", "cuda"))


def autocast_on(device_type: str) -> bool:
    """Is autocast enabled for `device_type`?"""
    if device_type in _AUTOCAST_DEVICES:  # the common devices: one C call (this runs three times per call)
        return torch.is_autocast_enabled(device_type)
    return _autocast_available(device_type) and torch.is_autocast_enabled(device_type)


# autocast on for any device? One C call where torch has it (a false "yes" only costs the slow path)
def any_autocast_by_device() -> bool:
    """`any_autocast` where torch has no `_is_any_autocast_enabled`: device by device."""
    return any(autocast_on(d) for d in _AUTOCAST_DEVICES)


any_autocast: Callable[[], bool] = getattr(torch._C, "_is_any_autocast_enabled", any_autocast_by_device)
features.register(
    "any_autocast_query",
    api="torch._C._is_any_autocast_enabled",
    since="2.4",
    without="autocast is checked device by device (CPU and CUDA), a few hundred ns more per call",
    present=lambda: getattr(torch._C, "_is_any_autocast_enabled", None) is not None,
)


def no_autocast(device_type: str) -> AbstractContextManager[Any]:
    """A context with autocast off for `device_type` (a no-op context when it is off already)."""
    return torch.autocast(device_type, enabled=False) if autocast_on(device_type) else contextlib.nullcontext()


def autocast_inputs(*tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """Cast float tensors to the autocast dtype when autocast is on for the first tensor's device.

    Attention is a lower-precision op under autocast, as `F.scaled_dot_product_attention` is: every
    floating input except float64 is cast (PyTorch's rule for such ops), so q, k, v that arrive in
    different dtypes (a float32 q from a LayerNorm, bfloat16 k, v from a Linear) meet in one dtype.
    The softmax statistics stay in float32 inside every backend (contract item 4).
    """
    if not any_autocast():  # one C call: autocast is off for every device (the common case)
        return tensors
    first = tensors[0] if tensors and isinstance(tensors[0], torch.Tensor) else next(
        (t for t in tensors if isinstance(t, torch.Tensor)), None
    )
    if first is None or not autocast_on(first.device.type):
        return tensors
    dtype = torch.get_autocast_dtype(first.device.type)
    return tuple(
        t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64 else t
        for t in tensors
    )
