"""The mask vocabulary and its lowering to each backend's cheapest form.

Vocabulary (shape legend: b batch, h query heads, i query positions, j key positions):

* `mask`   bool, True = may attend, a 4-D view broadcastable to (b, h, i, j). A key padding mask is
  kept as a (b, 1, 1, j) view: it is never expanded.
* `bias`   float, added to the scaled logits, broadcastable to (b, h, i, j).
* `causal` query i may attend key j iff j <= i + (j_len - i_len): aligned to the bottom-right,
  as in flash-attn and KV-cache decoding. For i_len == j_len it is the usual lower triangle::

      i_len=2, j_len=5         i_len=5, j_len=2
        k0 k1 k2 k3 k4           k0 k1
      q0 x  x  x  x  .        q0 .  .     <- no key: the row's output is 0
      q1 x  x  x  x  x        q1 .  .
                              q2 .  .
                              q3 x  .
                              q4 x  x

The lowering never builds a dense (b, h, i, j) tensor: the largest tensor it makes has the broadcast
shape of the user's own mask and bias, plus a shared (i, j) causal tile when causal must be combined
with them.
"""

from __future__ import annotations

from dataclasses import replace
from typing import cast

import torch
from torch import Tensor

from .inputs import AttnInputs

__all__ = [
    "bias_as",
    "causal_keep",
    "combined_keep",
    "sdpa_attn_mask",
    "dead_rows",
    "dead_keys",
    "visible",
    "rows_that_see",
]


def causal_keep(i: int, j: int, device: torch.device, rows: slice | None = None, cols: int | None = None) -> Tensor:
    """Bool (i, j) tile, True where query may attend key under bottom-right aligned causality.

    `rows` selects a block of query rows and `cols` truncates the keys, so a caller working in query
    blocks builds only its own tile.
    """
    start, stop = (0, i) if rows is None else (rows.start, rows.stop)
    cols = j if cols is None else cols
    qi = torch.arange(start, stop, device=device)[:, None]
    kj = torch.arange(cols, device=device)[None, :]
    return kj <= qi + (j - i)


def _slice_rows(t: Tensor | None, rows: slice | None, cols: int | None) -> Tensor | None:
    if t is None:
        return None
    if rows is not None and t.shape[2] != 1:
        t = t[:, :, rows]
    if cols is not None and t.shape[3] != 1:
        t = t[..., :cols]
    return t


def combined_keep(inp: AttnInputs, rows: slice | None = None, cols: int | None = None) -> Tensor | None:
    """`mask` AND `causal` as one bool tensor (broadcast shape of the two), or None when neither is set."""
    keep = _slice_rows(inp.mask, rows, cols)
    if inp.causal:
        tri = causal_keep(inp.i, inp.j, inp.device, rows, cols)
        keep = tri if keep is None else keep & tri
    return keep


def bias_as(bias: Tensor, dtype: torch.dtype, *, grad: bool) -> Tensor:
    """The bias in `dtype` for a kernel's additive mask, by the one rule every backend keeps (contract
    item 4): a float32 kernel mask carries the bias at float32 precision; a kernel that takes the mask only
    in a narrower dtype gets it saturated to that dtype's finite range (a bias of 7e4 becomes 65504 in
    float16, not inf; -1e9 becomes -65504, not -inf), with +-inf kept as they are.

    `grad=False` detaches it, so a learned bias (an `nn.Parameter`) under `torch.no_grad()` reaches the
    kernel as the plain tensor it is there (PyTorch's CPU flash rejects a mask that requires grad)."""
    if not grad:
        bias = bias.detach()
    if bias.dtype == dtype:
        return bias
    if torch.finfo(dtype).max < torch.finfo(bias.dtype).max:
        limit = torch.finfo(dtype).max
        bias = torch.where(bias.isinf(), bias, bias.clamp(-limit, limit))
    return bias.to(dtype)


def sdpa_attn_mask(
    inp: AttnInputs, rows: slice | None = None, cols: int | None = None, bias_dtype: torch.dtype | None = None
) -> Tensor | None:
    """The `attn_mask` for `F.scaled_dot_product_attention`: bool when there is no bias (cheapest),
    else the bias in `bias_dtype` (default: q's dtype; see `bias_as`) with -inf where the mask or causality
    forbids.

    Callers use `is_causal=True` instead when causal is the only constraint and i == j.
    """
    keep = combined_keep(inp, rows, cols)
    bias = _slice_rows(inp.bias, rows, cols)
    if bias is None:
        return keep
    bias = bias_as(bias, bias_dtype or inp.dtype, grad=inp.bias_needs_grad)
    if keep is None:
        return bias
    return bias.masked_fill(~keep, float("-inf"))


def visible(inp: AttnInputs, rows: slice | None = None) -> Tensor | None:
    """Bool, True where a query may attend a key: `mask` AND `causal` AND `bias != -inf`, with the
    broadcast shape of those three (2-D (i, j) for causal alone, else 4-D), or None when nothing
    constrains attention. `rows` selects a block of query rows."""
    keep = combined_keep(inp, rows)
    bias = _slice_rows(inp.bias, rows, None)
    if bias is not None:
        finite = bias != float("-inf")
        keep = finite if keep is None else keep & finite
    return keep


def dead_rows(inp: AttnInputs) -> Tensor | None:
    """Bool (b|1, h|1, i, 1): True for query rows with no key they may attend, or None if there are none
    possible. Used only where a kernel does not zero such rows itself (contract item 2)."""
    keep = visible(inp)
    if keep is None:
        if inp.j == 0:
            return torch.ones(1, 1, inp.i, 1, dtype=torch.bool, device=inp.device)
        return None
    if keep.dim() == 2:
        keep = keep[None, None]
    return ~keep.any(dim=-1, keepdim=True)


def dead_keys(inp: AttnInputs) -> Tensor | None:
    """Bool (b|1, j): True for keys that no query of that batch element may attend in any head (`mask`
    False for every row and head, or `bias` -inf for every row and head); None when neither is set.
    (Causality alone hides no key from every row.) Cost: one reduction over the mask and one over the bias.
    """
    dead = None
    if inp.mask is not None:
        dead = ~inp.mask.any(dim=2).any(dim=1)  # (b|1, j|1)
    if inp.bias is not None:
        gone = (inp.bias == float("-inf")).all(dim=2).all(dim=1)
        dead = gone if dead is None else dead | gone
    if dead is None:
        return None
    return dead.expand(dead.shape[0], inp.j)


# bools per block when `rows_that_see` must look at (b, h, rows, j) at once: 16 MiB
_SEE_BLOCK = 1 << 24


def rows_that_see(inp: AttnInputs, q_bad: Tensor, kv_bad: Tensor) -> Tensor:
    """Bool (b, h, i): True for the query rows that attend something marked bad.

    `q_bad` (b, h, i) marks query rows, `kv_bad` (b, g, j) marks keys (k or v). A row sees a bad key
    it may attend (mask, causal, `-inf` bias), and its own bad query unless it may attend no key at all
    (such a row's output is 0 by contract item 2). Memory: mask/bias with a query axis are looked at in
    blocks of rows; key padding and causal alone cost O(b h j).
    """
    b, h, g, i, j = inp.b, inp.h, inp.g, inp.i, inp.j
    kv_bad = kv_bad.repeat_interleave(h // g, dim=1) if g != h else kv_bad  # (b, h, j)
    per_row = [t for t in (inp.mask, inp.bias) if t is not None and t.shape[2] != 1]
    if per_row:
        # a mask or bias that differs per query row: look at (b, h, rows, j) a block of rows at a time
        step = max(1, _SEE_BLOCK // max(1, b * h * j))
        parts = []
        for start in range(0, i, step):
            rows = slice(start, min(i, start + step))
            keep = cast(Tensor, visible(inp, rows))  # 4-D: mask or bias is set
            sees = (keep & kv_bad[:, :, None, :]).any(-1) | (q_bad[:, :, rows] & keep.any(-1))
            parts.append(sees.expand(b, h, rows.stop - rows.start))
        return torch.cat(parts, dim=2)
    # every constraint is per key (key padding, a (.., 1, j) bias), plus perhaps causal
    cols = visible(replace(inp, causal=False))  # (b|1, h|1, 1, j) or None
    if cols is not None:
        kv_bad = kv_bad & cols[:, :, 0]
    if not inp.causal:
        alive = cols.any(-1) if cols is not None else torch.ones((), dtype=torch.bool, device=inp.device)
        return (kv_bad.any(-1, keepdim=True) | (q_bad & alive)).expand(b, h, i)
    # causal: row r sees key c iff c <= r + (j - i), so row r sees a bad key iff the first one is that early
    last = torch.arange(i, device=inp.device) + (j - i)  # the last key each row may attend
    positions = torch.arange(j, device=inp.device)

    def first(flags: Tensor) -> Tensor:  # index of the first True along j, j when there is none
        return torch.where(flags, positions, j).amin(-1, keepdim=True)

    alive_cols = cols[:, :, 0] if cols is not None else torch.ones(1, 1, j, dtype=torch.bool, device=inp.device)
    sees_kv = first(kv_bad) <= last
    alive = first(alive_cols) <= last
    return (sees_kv | (q_bad & alive)).expand(b, h, i)
