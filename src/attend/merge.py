"""The log-sum-exp merge: partial attention results over disjoint key sets combined into the result over all of them.

Shape legend: b batch, h query heads, g key/value heads, i query positions, j key positions, d head dim (q and k),
e value head dim. A partial result over keys K_p is `out_p (..., e)`, the softmax-weighted values over K_p, and
`lse_p (...)`, the log of its softmax normaliser over K_p, in the accumulation dtype (float32; float64 for float64
inputs). Over the union::

    lse = log(sum_p exp(lse_p))        out = sum_p exp(lse_p - lse) * out_p

One convention everywhere: `lse_p = -inf` means the part saw no key (its `out_p` is 0 and weighs nothing); a row
that sees no key in any part gets 0 and lse -inf (contract item 2); a NaN (a NaN key a row sees) stays NaN.
Split-KV decoding (`with_kvcache`: key chunks, pages) and the ring (`attend.distributed`) merge with these two
functions, nothing else.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["merge", "merge_into"]


def merge(
    out: Tensor, lse: Tensor, owner: Tensor | None = None, rows: int = 1, *, with_lse: bool = False
) -> tuple[Tensor, Tensor | None]:
    """Merge P partial results stacked on dim 0: `out (P, ..., e)`, `lse (P, ...)`.

    `owner`: None, every part is one row's (returns `out (..., e)`); or an int64 `(P,)` tensor, the row in
    [0, rows) each part belongs to (returns `out (rows, ..., e)`; a row with no part gets 0). In lse's dtype.
    `with_lse`: also the merged log-sum-exp (-inf where a row saw no key), else None (decoding skips it).
    """
    if owner is None:
        w = lse.softmax(0).nan_to_num_(0.0)  # a row no part saw: 0 / 0 -> 0 (a NaN value still gives NaN)
        return (out.to(w.dtype) * w[..., None]).sum(0), torch.logsumexp(lse, 0) if with_lse else None
    shape = (rows, *lse.shape[1:])
    top = torch.full(shape, -math.inf, dtype=lse.dtype, device=lse.device)
    top = top.scatter_reduce_(0, owner.view(-1, *[1] * (lse.dim() - 1)).expand_as(lse), lse, "amax")
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    w = (lse - top.index_select(0, owner)).exp()  # (P, ...), 0 for a part that saw no key
    den = torch.zeros_like(top).index_add_(0, owner, w)
    num = torch.zeros(*shape, out.shape[-1], dtype=lse.dtype, device=lse.device)
    num = num.index_add_(0, owner, out.to(lse.dtype) * w[..., None])
    seen = den > 0
    safe = torch.where(seen, den, torch.ones_like(den))
    res = num / safe[..., None]
    if not with_lse:
        return res, None
    total = torch.where(seen, top + safe.log(), -math.inf)
    return res, total.where(~den.isnan(), den)


def merge_into(out: Tensor, lse: Tensor, out_s: Tensor, lse_s: Tensor) -> None:
    """Merge one partial result `(out_s, lse_s)` into the running `(out, lse)` in place (views are updated; out_s
    is consumed): the ring's per-step merge, which keeps one accumulator instead of a stack of parts."""
    new = torch.logaddexp(lse, lse_s)
    ref = new.masked_fill(new == -math.inf, 0.0)  # rows with nothing seen: exp(-inf - 0) = 0, no NaN
    out.mul_((lse - ref).exp_().unsqueeze(-1))
    out.add_(out_s.mul_((lse_s - ref).exp_().unsqueeze(-1)))
    lse.copy_(new)
