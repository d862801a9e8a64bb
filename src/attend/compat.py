"""Meeting other code where it is: a drop-in for `F.scaled_dot_product_attention`, and autocast.

Shape legend: b batch, h query heads, g key/value heads, i query positions, j key positions,
d head dim (q and k), e value head dim. PyTorch's own names for the same: N batch, Hq query heads,
H key/value heads, L query positions, S key positions, E head dim, Ev value head dim.

`scaled_dot_product_attention` keeps PyTorch's signature and semantics, including the two places
where they differ from `attention()`:

* `is_causal=True` is aligned to the UPPER-LEFT: query i may attend key j iff j <= i.
  `attention(causal=True)` is aligned to the bottom-right (j <= i + (j_len - i_len)). The two agree
  when i_len == j_len::

      upper-left (this function)        bottom-right (`attention`)
      i_len=2, j_len=4                  i_len=2, j_len=4
        k0 k1 k2 k3                       k0 k1 k2 k3
      q0 x  .  .  .                     q0 x  x  x  .
      q1 x  x  .  .                     q1 x  x  x  x

* `attn_mask` together with `is_causal=True` does what PyTorch's own SDPA does with the same arguments on
  the same device: where the kernel PyTorch would pick takes both (its CPU flash kernel; on CUDA
  memory-efficient and cuDNN), the mask AND the upper-left triangle; where it would pick its math kernel,
  which refuses the two (on CPU with torch 2.13: dropout, inputs that are not 4-D, Ev != E, a broadcast
  batch or k/v head, a mask that requires grad, the math kernel asked for), the same refusal. PyTorch's
  own choice of kernel (`torch._fused_sdp_choice`) decides.

* a float `attn_mask` is added to the logits, exactly as PyTorch adds it. A row masked with
  `-inf` everywhere gives 0 (our contract, and PyTorch's since pytorch#133882). A row masked with a
  large *finite* value such as `torch.finfo(torch.float32).min` is not masked at all as far as the
  softmax can tell: PyTorch gives the mean of `v` over the keys there, and so does this function,
  because a drop-in gives the same answer wherever PyTorch defines one. Use a bool mask or `-inf`
  for rows that must be zero.

One place where it is stricter than PyTorch: a NaN or inf in q, k or v reaches only the output rows
that see it (attend's contract). PyTorch's kernels add masks as `-inf`, so a NaN key they mask out
still turns other rows NaN; here those rows keep their values.
"""

from __future__ import annotations

import math
from typing import cast

import torch
from torch import Tensor

from ._helpers import autocast_inputs, fmt_dtype, fmt_shape
from .backends.sdpa import has_enable_gqa, takes_mask_with_causal
from .dispatch import call
from .inputs import Options, check_options

__all__ = ["scaled_dot_product_attention", "SdpaArgumentError", "upper_left_causal"]


class SdpaArgumentError(ValueError, RuntimeError):
    """Bad arguments to `scaled_dot_product_attention`. A ValueError like every input error of the library,
    and a RuntimeError like the one PyTorch raises for the same arguments, so a drop-in's callers that
    catch PyTorch's error keep working."""


# helpers

# PyTorch's SDPA kernels that take `attn_mask` with `is_causal=True` (SDPBackend values; the mask AND the upper-left
# triangle): CPU flash (1), CUDA memory-efficient (2) and cuDNN (3). Its math kernel (0) refuses the two together.
_TAKES_MASK_WITH_CAUSAL = frozenset({1, 2, 3})
_MATH = 0
_EMPTY = -2  # an empty query or key: PyTorch answers without a kernel


def _torch_choice(
    query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor, dropout_p: float, scale: float | None, gqa: bool
) -> int | None:
    """The kernel (an SDPBackend value) PyTorch's own SDPA would run these arguments with `is_causal=True` on, here
    and now (its kernel switches included), as `torch._fused_sdp_choice` says; `_EMPTY` for an empty query or key,
    which it answers without a kernel; None where this torch cannot say (no such function, or one without
    the arguments). Only a call with both `attn_mask` and `is_causal` asks: a C call, no kernel runs."""
    if query.numel() == 0 or key.numel() == 0:
        return _EMPTY
    choice = getattr(torch, "_fused_sdp_choice", None)
    if choice is None:
        return None
    extra: dict = {}
    if gqa and has_enable_gqa():
        extra["enable_gqa"] = True
    elif gqa and key.shape[-3] != query.shape[-3]:
        # a torch without the keyword (< 2.5): what it would run with k and v repeated to the query heads, which
        # is what enable_gqa means (the drop-in takes it on every torch)
        r = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(r, -3), value.repeat_interleave(r, -3)
    try:
        return int(choice(query, key, value, attn_mask, dropout_p, True, scale=scale, **extra))
    except (TypeError, RuntimeError):
        return None


# what `torch.compiler.assume_constant_result` does (without importing dynamo, a second, at import): under
# torch.compile the choice is made once, at trace time, on the example inputs, and the graph keeps it
_torch_choice._dynamo_marked_constant = True  # type: ignore[attr-defined]


def _check_mask_with_causal(
    query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor, dropout_p: float, scale: float | None, gqa: bool
) -> None:
    """Raises where PyTorch's own SDPA refuses `attn_mask` with `is_causal=True` for these arguments (its math
    kernel would run them), or cannot be asked (then as PyTorch documents: an error)."""
    check_options(Options(scale=scale, dropout_p=dropout_p), query.shape[-1])  # a bad option's own error first
    choice = _torch_choice(query, key, value, attn_mask, dropout_p, scale, gqa)
    if choice == _EMPTY or (choice in _TAKES_MASK_WITH_CAUSAL and takes_mask_with_causal()):
        return
    if not takes_mask_with_causal():
        why = f"which this torch's scaled_dot_product_attention ({torch.__version__}) refuses for every kernel"
    elif choice == _MATH:
        why = ("which PyTorch's own scaled_dot_product_attention refuses for these arguments (it runs them on its "
               "math kernel)")  # fmt: skip
    else:
        why = "which PyTorch documents as an error (this torch does not say which kernel would run them)"
    raise SdpaArgumentError(
        f"expected either `attn_mask` or `is_causal=True`, got both, {why}; hint: fold the causal triangle into "
        "the mask (`attn_mask & torch.ones(L, S, dtype=torch.bool).tril()`), or use "
        "`attend.attention(q, k, v, mask=..., causal=True)` (bottom-right aligned)"
    )


def _check(name: str, t: object) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"expected `{name}` to be a torch.Tensor, got {type(t).__name__}")
    if t.dim() < 2:
        raise SdpaArgumentError(
            f"expected `{name}` of shape (..., L, E) with at least 2 dims, got shape {fmt_shape(t.shape)}"
        )
    return t


def _as_4d(t: Tensor, batch: tuple[int, ...]) -> Tensor:
    """(*t_batch, H, L, E) with t_batch broadcastable to `batch` -> (prod(batch), H, L, E).

    Broadcasting a size-1 batch is a view; only several broadcast leading dims need a copy.
    """
    t = t.reshape((1,) * (len(batch) + 3 - t.dim()) + tuple(t.shape))
    t = t.expand(batch + tuple(t.shape[-3:]))
    return t.reshape((math.prod(batch),) + tuple(t.shape[-3:]))


def _broadcasts(shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
    """Does `shape` broadcast to exactly `target` (right-aligned, sizes 1 or equal)?"""
    return all(size in (1, want) for size, want in zip(reversed(shape), reversed(target)))


# main function


def upper_left_causal(k: Tensor, v: Tensor, i: int) -> tuple[Tensor, Tensor, bool, Tensor | None]:
    """PyTorch's `is_causal` (UPPER-LEFT: query x sees key y iff y <= x) in attend's terms, for k (b, g, j, d),
    v (b, g, j, e) and i queries: (k, v, causal, mask). With i <= j the keys past i are never visible, so they
    are dropped, and on the i x i square upper-left and attend's bottom-right causal are the same triangle
    (the kernels skip its upper half); with i > j the rows past j see every key: one shared (1, 1, i, j) bool
    tile, never (b, h, i, j)."""
    j = k.shape[2]
    if i <= j:
        return k[:, :, :i], v[:, :, :i], True, None
    return k, v, False, torch.ones(i, j, dtype=torch.bool, device=k.device).tril()[None, None]


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> Tensor:
    """`torch.nn.functional.scaled_dot_product_attention`, through attend's dispatcher and contract.

    Same signature, same semantics: swap the import and nothing else changes. The backend is chosen
    (and can be explained) by attend; use `attention()` for bottom-right causal, key padding masks
    and a named backend.

    Shapes (PyTorch's): query (N, ..., Hq, L, E), key (N, ..., H, S, E), value (N, ..., H, S, Ev)
    -> (N, ..., Hq, L, Ev) in query's dtype. 2-D and 3-D inputs work as in PyTorch (the missing
    leading dims are added and removed again); leading dims broadcast.

    Args:
        attn_mask: bool, True = takes part in attention; or float, added to the logits. Broadcastable
            to (N, ..., Hq, L, S). A 2-D mask is (L, S), as in PyTorch (not a key padding mask).
        dropout_p: dropout on the attention probabilities, applied whenever > 0 (as PyTorch does;
            pass `dropout_p if self.training else 0.0`).
        is_causal: UPPER-LEFT aligned causal mask: query i may attend key j iff j <= i (picture in
            the module docstring). With `attn_mask`: what PyTorch does with both here (module docstring).
        scale: logit scale, default E ** -0.5.
        enable_gqa: allow H < Hq with Hq % H == 0 (grouped-query); k and v are never copied to Hq heads
            by the backends that have a native grouped-query path. Taken on every torch attend supports,
            also where torch's own SDPA has no such keyword (torch < 2.5): there the SDPA kernels get k and
            v repeated to Hq heads (`attend info`: feature `sdpa_enable_gqa`), and the result is the same.

    Equivalent to::

        sim = query @ key.transpose(-2, -1) * scale               # (N, Hq, L, S), k shared by Hq // H heads
        sim = sim + attn_mask                                      # float mask; a bool mask: -inf where False
        sim = sim.masked_fill(~ones(L, S).tril(), -inf)            # is_causal: upper-left
        attn = dropout(sim.softmax(dim=-1), dropout_p)             # a row of only -inf/False gives 0
        out = attn @ value

    A row masked by a large finite float (`finfo.min`) is not masked for the softmax: it averages
    `value`, as in PyTorch. A row masked by `False` or `-inf` everywhere gives 0.

    Raises:
        TypeError: non-tensor inputs, q, k, v of different dtypes (outside autocast), an integer mask.
        SdpaArgumentError (a ValueError and a RuntimeError, as PyTorch raises): attn_mask together
            with is_causal where PyTorch's own SDPA refuses them (its math kernel would run them), head
            counts that differ without enable_gqa, shapes that do not broadcast.
        NoBackendError: no registered backend can run the inputs.

    Example::

        >>> from attend import scaled_dot_product_attention as sdpa   # was: F.scaled_dot_product_attention
        >>> q = torch.randn(2, 8, 128, 64); k = v = torch.randn(2, 2, 128, 64)
        >>> out = sdpa(q, k, v, is_causal=True, enable_gqa=True)      # (2, 8, 128, 64)
    """
    q, k, v = _check("query", query), _check("key", key), _check("value", value)
    if attn_mask is not None and not isinstance(attn_mask, Tensor):
        raise TypeError(f"expected `attn_mask` to be a torch.Tensor or None, got {type(attn_mask).__name__}")
    if not isinstance(is_causal, bool):
        raise TypeError(f"expected `is_causal` to be a bool, got {type(is_causal).__name__}")
    if not isinstance(enable_gqa, bool):
        raise TypeError(f"expected `enable_gqa` to be a bool, got {type(enable_gqa).__name__}")
    q, k, v, attn_mask = autocast_inputs(q, k, v, attn_mask)  # type: ignore[assignment]
    if attn_mask is not None and attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
        raise TypeError(
            f"expected `attn_mask` of dtype bool (True = takes part) or a float dtype (added to the logits), "
            f"got {fmt_dtype(attn_mask.dtype)}"
        )

    n = max(q.dim(), k.dim(), v.dim())

    def shapes() -> str:  # only on error: symbolic sizes under torch.compile cannot be formatted
        return f"query {fmt_shape(q.shape)}, key {fmt_shape(k.shape)}, value {fmt_shape(v.shape)}"

    try:
        batch = tuple(torch.broadcast_shapes(*(t.shape[:-3] for t in (q, k, v)), (1,) * max(1, n - 3)))
    except RuntimeError:
        raise SdpaArgumentError(
            f"expected query, key and value with broadcastable leading dims, got {shapes()}"
        ) from None
    q4, k4, v4 = (_as_4d(t, batch) for t in (q, k, v))
    hq, hk, hv = q4.shape[1], k4.shape[1], v4.shape[1]
    if hk != hv:
        raise SdpaArgumentError(f"expected key and value with the same number of heads, got {hk} and {hv} ({shapes()})")
    if hq != hk and not enable_gqa and hk != 1:  # one k/v head broadcasts, as in PyTorch
        raise SdpaArgumentError(
            f"expected as many key/value heads as query heads when enable_gqa=False, got Hq={hq}, H={hk} "
            f"({shapes()}); hint: pass enable_gqa=True for grouped-query attention"
        )
    L, S = q4.shape[2], k4.shape[2]

    out_shape = batch + (hq, L, v4.shape[-1])
    mask = bias = None
    if attn_mask is not None:
        target = batch + (hq, L, S)
        if attn_mask.dim() > len(target) or not _broadcasts(tuple(attn_mask.shape), target):
            # SdpaArgumentError is a RuntimeError too: code that catches PyTorch's error for this keeps working
            raise SdpaArgumentError(
                f"expected `attn_mask` broadcastable to (N, ..., Hq, L, S) = {fmt_shape(target)}, got shape "
                f"{fmt_shape(attn_mask.shape)} ({shapes()}); hint: a key padding mask (N, S) goes in as "
                "`attn_mask[:, None, None, :]`"
            )
        m = attn_mask.reshape((1,) * (len(batch) + 3 - attn_mask.dim()) + tuple(attn_mask.shape))
        if len(batch) > 1:  # several leading dims: broadcast them, then flatten like q, k, v
            m = m.expand(batch + tuple(m.shape[-3:]))
            m = m.reshape((-1,) + tuple(m.shape[-3:]))
        if m.dtype == torch.bool:
            mask = m
        else:
            bias = m
        if is_causal:
            _check_mask_with_causal(q, k, v, attn_mask, dropout_p, scale, enable_gqa)
    if math.prod(batch) == 0 or hq == 0:
        # an empty batch (or no heads): an empty output, as PyTorch gives; the zero term keeps the graph
        zero = (q4.sum() + k4.sum() + v4.sum()) * 0
        return (q4.new_zeros(out_shape) + zero).reshape(out_shape[len(out_shape) - n :] if n < 4 else out_shape)

    causal = False
    if is_causal:
        k4, v4, causal, tile = upper_left_causal(k4, v4, L)
        if causal:  # L <= S: the keys past L are never visible, nor the mask's columns for them
            mask = None if mask is None else mask[..., :L]
            bias = None if bias is None else bias[..., :L]
        else:  # the (1, 1, L, S) upper-left triangle, AND the mask (a float mask stays the bias)
            mask = tile if mask is None else mask & cast(Tensor, tile)

    out = cast(Tensor, call(q4, k4, v4, mask, bias, options=Options(causal=causal, scale=scale, dropout_p=dropout_p)))
    return out.reshape(out_shape[len(out_shape) - n :] if n < 4 else out_shape)
