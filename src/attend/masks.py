"""The mask vocabulary and its lowering to each backend's cheapest form.

Shape legend: b batch, h query heads, g key/value heads, i query positions, j key positions,
d head dim (q and k), e value head dim.

Vocabulary:

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

* `window` (left, right): key j is visible from query i iff p - left <= j <= p + right, p = i + (j_len - i_len)
  (bottom-right aligned, like causal; causal sets right = 0). Each side an int >= 0 or None (unbounded).
* `documents`: query i may attend key j only if both belong to the same document (ids per position);
  causal and window stay position-based, so causal holds inside each packed document.

Window and documents are lowered per block by `Structure`: each query row sees an interval of keys
[lo, hi) (exactly, when the key document ids are sorted, as packing makes them), so a backend visits only
the key blocks a query block can see and masks only the blocks that are partly visible. Nothing builds a
(b, h, i, j) tensor for them outside the `einsum` reference and a single-call path under torch.compile.

The lowering never builds a dense (b, h, i, j) tensor: the largest tensor it makes has the broadcast
shape of the user's own mask and bias, plus a shared (i, j) causal tile when causal must be combined
with them.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import NamedTuple, cast

import torch
from torch import Tensor

from .inputs import AttnInputs, sides

__all__ = [
    "Structure",
    "interval",
    "lower",
    "apply_sinks",
    "lower_score",
    "Lowered",
    "bias_as",
    "causal_keep",
    "combined_keep",
    "sdpa_attn_mask",
    "dead_rows",
    "dead_keys",
    "zero_keys",
    "visible",
    "rows_that_see",
]


def interval(pos: int, left: int | None, right: int | None, j: int) -> tuple[int, int]:
    """Keys [lo, hi) of [0, j) that a query whose diagonal is key `pos` sees through the sides (left, right)
    (`inputs.sides`; None unbounded): p - left <= key <= p + right. Every door's per-row bounds are this."""
    lo = 0 if left is None else min(max(pos - left, 0), j)
    hi = j if right is None else min(max(pos + right + 1, 0), j)
    return lo, hi


class Structure:
    """Window, documents and causal as per-row key intervals: query row x may see keys [lo[x], hi[x]).

    Built once per call (`Structure(inp)`, only when `inp.structured`). With a window alone the bounds are
    Python ints of the row index (nothing is read from tensors, so it traces under torch.compile). With
    documents the bounds come from the ids (`searchsorted` when each row's key ids are sorted, then the
    interval is exact; otherwise it is the window's and `keep` also compares ids), and the per-block
    summaries are read to the host once per block size.
    """

    def __init__(self, inp: AttnInputs):
        self.i, self.j, self.device = inp.i, inp.j, inp.device
        # the AttnInputs fields it came from (a backward that recomputes through the reference rebuilds them)
        self.fields = {"window": inp.window, "q_docs": inp.q_docs, "k_docs": inp.k_docs, "q_pos": inp.q_pos}
        left, right = sides(inp.window, inp.causal)
        self.left, self.right = left, right
        self.q_docs, self.k_docs = inp.q_docs, inp.k_docs
        self.tracing = torch.compiler.is_compiling()
        self.exact = True  # [lo, hi) is exactly the visible set of each row
        self.lo: Tensor | None = None  # (b|1, i) int64, when bounds depend on tensors
        self.hi: Tensor | None = None
        self._stats: dict[int, list[tuple[int, int, int, int]]] = {}
        self._step = 0  # the block size of the last blocked walk (`rows`)
        if inp.q_docs is None and inp.q_pos is None:
            return
        pos = inp.q_pos if inp.q_pos is not None else torch.arange(inp.i, device=inp.device)[None] + (inp.j - inp.i)
        pos = pos.long()
        lo = pos - left if left is not None else torch.zeros_like(pos)
        hi = pos + right + 1 if right is not None else torch.full_like(pos, inp.j)
        if inp.q_docs is not None:
            k_docs = inp.k_docs
            assert k_docs is not None
            sorted_ids = self.tracing or bool((k_docs[:, 1:] >= k_docs[:, :-1]).all()) if inp.j > 1 else True
            if sorted_ids and not self.tracing:
                q_docs = inp.q_docs.expand(max(inp.q_docs.shape[0], k_docs.shape[0]), inp.i).contiguous()
                kd = k_docs.expand(q_docs.shape[0], inp.j).contiguous()
                lo = torch.maximum(lo, torch.searchsorted(kd, q_docs, side="left"))
                hi = torch.minimum(hi, torch.searchsorted(kd, q_docs, side="right"))
            else:
                self.exact = False
        self.lo, self.hi = lo.clamp(0, inp.j), hi.clamp(0, inp.j)

    def rows(self, r0: int, r1: int) -> tuple[int, int, int, int]:
        """For query rows [r0, r1): (lo, hi, full_lo, full_hi): keys [lo, hi) hold every key some row may see;
        every row sees every key of [full_lo, full_hi) (empty when full_lo >= full_hi)."""
        if self.lo is None:  # a window (and causal) alone: bounds of the row index
            off = self.j - self.i
            first, last = (interval(p, self.left, self.right, self.j) for p in (r0 + off, r1 - 1 + off))
            (lo, full_hi), (full_lo, hi) = first, last
            return lo, hi, full_lo, full_hi
        if self.tracing:
            return 0, self.j, 0, 0
        # blocked callers walk rows [0, s), [s, 2s), ... (the last one short): one host read per block size
        step = r1 - r0 if r0 == 0 else self._step
        if step and r0 % step == 0 and r1 == min(r0 + step, self.i):
            self._step = step
            stats = self._stats.get(step)
            if stats is None:
                stats = self._stats[step] = self._block_stats(step)
            lo, hi, full_lo, full_hi = stats[r0 // step]
        else:
            lo_t, hi_t = self.lo[:, r0:r1], self.hi[:, r0:r1]  # type: ignore[index]
            lo, hi, full_lo, full_hi = (int(x) for x in (lo_t.min(), hi_t.max(), lo_t.max(), hi_t.min()))
        if not self.exact:
            full_lo, full_hi = 0, 0
        return lo, max(hi, lo), full_lo, full_hi

    def _block_stats(self, step: int) -> list[tuple[int, int, int, int]]:
        """(lo, hi, full_lo, full_hi) of every block of `step` rows, read to the host in one transfer."""
        lo, hi = self.lo, self.hi
        assert lo is not None and hi is not None
        pad = (-self.i) % step
        if pad:  # the last block is short: pad it with its own last row (changes no min or max)
            lo = torch.cat([lo, lo[:, -1:].expand(-1, pad)], 1)
            hi = torch.cat([hi, hi[:, -1:].expand(-1, pad)], 1)
        lo = lo.reshape(lo.shape[0], -1, step).transpose(0, 1).reshape(-1, lo.shape[0] * step)
        hi = hi.reshape(hi.shape[0], -1, step).transpose(0, 1).reshape(-1, hi.shape[0] * step)
        table = torch.stack([lo.amin(1), hi.amax(1), lo.amax(1), hi.amin(1)], 1)
        return [tuple(row) for row in table.tolist()]

    def keep(self, rows: slice, cols: slice) -> Tensor:
        """Bool (b|1, 1, rows, cols), True where the structure lets a query row see a key."""
        kp = torch.arange(cols.start, cols.stop, device=self.device)
        if self.lo is None:
            off = self.j - self.i
            qp = torch.arange(rows.start, rows.stop, device=self.device)[:, None] + off
            keep = torch.ones(rows.stop - rows.start, cols.stop - cols.start, dtype=torch.bool, device=self.device)
            if self.left is not None:
                keep = keep & (kp[None] >= qp - self.left)
            if self.right is not None:
                keep = keep & (kp[None] <= qp + self.right)
            return keep[None, None]
        assert self.hi is not None
        keep = (kp >= self.lo[:, rows, None]) & (kp < self.hi[:, rows, None])
        if not self.exact:
            assert self.q_docs is not None and self.k_docs is not None
            keep = keep & (self.q_docs[:, rows, None] == self.k_docs[:, None, cols])
        return keep[:, None]

    def seen_keys(self) -> Tensor | None:
        """Bool (b|1, j): True for the keys some query row may see; None when a window alone hides no key, or
        while tracing (the bounds cannot be read). The union of the rows' intervals: O(b (i + j)); for unsorted
        document ids a blocked scan of `keep`, never (i, j) at once."""
        if self.lo is None:  # a window alone: consecutive rows' intervals overlap, so the union is one interval
            lo, hi = self.rows(0, self.i)[:2] if self.i else (0, 0)
            if lo == 0 and hi == self.j:
                return None
            keys = torch.arange(self.j, device=self.device)
            return ((keys >= lo) & (keys < hi))[None]
        if self.tracing:
            return None
        assert self.hi is not None
        ones = (self.hi > self.lo).long()  # an empty interval covers nothing
        edges = torch.zeros(self.lo.shape[0], self.j + 1, dtype=torch.long, device=self.device)
        edges.scatter_add_(1, self.lo, ones).scatter_add_(1, self.hi, -ones)
        seen = edges.cumsum(1)[:, : self.j] > 0
        if not self.exact:
            # unsorted ids: the intervals are the window's alone and ids are compared per key, so the union above
            # over-counts (a key of a document whose queries all sit past it); exact by a scan of `keep` a block of
            # rows at a time, never (i, j) at once. Rare: packing sorts the ids.
            step = max(1, _SEE_BLOCK // max(1, seen.shape[0] * self.j))
            seen = torch.zeros_like(seen)
            for r0 in range(0, self.i, step):
                rows = slice(r0, min(self.i, r0 + step))
                seen = seen | self.keep(rows, slice(0, self.j))[:, 0].any(1)
        return seen

    def describe(self, block: int) -> str:
        """How a blocked backend lowers this structure: what it skips and what it masks."""
        what = []
        if self.left is not None or (self.right is not None and self.right != 0):
            what.append(f"window ({self.left}, {self.right})")
        elif self.right == 0:
            what.append("causal")
        if self.q_docs is not None:
            what.append("documents" + ("" if self.exact else " (unsorted ids: compared per block)"))
        return (
            f"{' + '.join(what) or 'per-sequence positions'} lowered per block of {block} queries: only the keys "
            "the block can see, a mask only where a block is partly visible"
        )


def _with_column(t: Tensor, column: Tensor | float) -> Tensor:
    """t (..., x) -> (..., x + 1) with `column` last; differentiable. Two copies into one new tensor: about
    twice as fast as `torch.cat` or `F.pad` at (4, 8, 1024, 64) on CPU (cat takes a slow path for a last dim
    of x + 1)."""
    out = t.new_empty(*t.shape[:-1], t.shape[-1] + 1)
    out[..., :-1] = t
    out[..., -1:] = column
    return out


class Lowered(NamedTuple):
    """What `lower` and `lower_score` return: the inputs every kernel runs, the value width to slice the output
    back to (or None), what to add to the lowered call's log-sum-exp to get the caller's (or None), the sinks to
    apply to the result (or None), and whether the caller asked for the log-sum-exp. `finish` turns the
    kernel's result into the caller's."""

    inp: AttnInputs
    e: int | None
    lse_shift: Tensor | None
    sinks: Tensor | None = None
    want_lse: bool = False

    def finish(self, result: Tensor | tuple[Tensor, Tensor]) -> Tensor | tuple[Tensor, Tensor]:
        """The lowered call's out (or (out, lse)) back in the caller's terms: v's width, the l2 score's lse, and
        the sinks (`apply_sinks`)."""
        if self.e is None and self.lse_shift is None and self.sinks is None:
            return result
        out, lse = result if isinstance(result, tuple) else (result, None)
        if self.e is not None:
            out = out[..., : self.e]
        if lse is not None and self.lse_shift is not None:
            lse = lse + self.lse_shift
        if self.sinks is not None:
            assert lse is not None  # `lower` asked the kernel for it
            out, lse = apply_sinks(out, lse, self.sinks)
        return (out, lse) if self.want_lse and lse is not None else out


def apply_sinks(out: Tensor, lse: Tensor, sinks: Tensor) -> tuple[Tensor, Tensor]:
    """Attention sinks on a result computed without them: out (b, h, i, e), lse (b, h, i), sinks (b|1, h).
    p = softmax([s_1 .. s_j, sink])[:j] is the plain softmax times Z / (Z + e^sink), Z = e^lse, so the output is
    out * sigmoid(lse - sink) and the normaliser logaddexp(lse, sink) (a row with no key: 0 and the sink).
    Differentiable in out, lse and sinks. Every door applies sinks with this function."""
    sink = sinks.to(lse.dtype)[..., None]  # (b|1, h, 1)
    out = (out.to(lse.dtype) * torch.sigmoid(lse - sink)[..., None]).to(out.dtype)
    return out, torch.logaddexp(lse, sink)


def lower(inp: AttnInputs) -> Lowered:
    """Everything the pipeline rewrites before a kernel runs, and how to undo it (`Lowered.finish`): the l2 score
    as a dot product (`lower_score`), and sinks as the call's log-sum-exp (the kernel runs without them, with
    `return_lse`, and `finish` rescales; any backend that gives the log-sum-exp runs sinks)."""
    low = lower_score(inp)
    if inp.sinks is None:
        return low
    return Lowered(replace(low.inp, sinks=None, return_lse=True), low.e, low.lse_shift, inp.sinks, inp.return_lse)


def lower_score(inp: AttnInputs) -> Lowered:
    """`score="l2"` as a dot product that every kernel runs, and the value width to slice the output back to.

    -(|q|^2 + |k|^2 - 2 q.k) * scale = 2 scale (q.k - |k|^2 / 2) - scale |q|^2, and the last term is constant
    per row, so softmax drops it: q' = [q, 1], k' = [k, -(|k|^2 - c) / 2] (one more head dim; |k|^2 summed in
    float32; c the median of |k|^2 over the keys of each (b, g) that some query may see, also constant per row)
    and scale' = 2 scale.
    Autograd differentiates the concatenation, so every gradient (second order too) is exact. Kernels that need
    d == e get v padded with a zero column; returns e to slice the output to, or None. With `return_lse` the
    lowered logits are the caller's plus scale (|q|^2 + c), so `lse_shift` = -scale (|q|^2 + c), (b, h, i).
    """
    if inp.score != "l2" or inp.softcap is not None:
        # (with soft-capping the lowering's per-row shift of the logits would move them under the cap: the l2
        # score then runs where a backend computes it natively, `Caps.l2`)
        return Lowered(inp, None, None, None, inp.return_lse)
    acc = torch.float64 if inp.dtype == torch.float64 else torch.float32
    # |k|^2 accumulated in acc without a widened copy of k; (b, g, j, 1)
    sq = torch.linalg.vector_norm(inp.k, dim=-1, keepdim=True, dtype=acc).square()
    with torch.no_grad():
        # minus a constant per (b, g): softmax does not see it (every row of the group gets it on every key),
        # and the column then holds |k|^2's spread, not its size, so it rounds far less in the input dtype
        # (float16: dq 3x the reference's error without it). The median of the finite values of the keys some
        # query may see: garbage behind padding, a window or another document (NaN, inf, 1e30) cannot move it.
        # Detached: the true gradient of a constant is zero.
        usable = torch.isfinite(sq)
        dead = dead_keys(inp)
        if dead is not None:  # keys no query may see hold whatever the caller left there: not theirs to move it
            usable = usable & ~dead[:, None, :, None]
        center = torch.nanmedian(torch.where(usable, sq, math.nan), dim=-2, keepdim=True).values
        center = center.nan_to_num(0.0)
    pad_v = inp.e == inp.d
    q, k, v = _L2Columns.apply(inp.q, inp.k, inp.v, sq, center, pad_v)
    shift = None
    if inp.return_lse:
        q_sq = torch.linalg.vector_norm(inp.q, dim=-1, dtype=acc).square()  # (b, h, i), differentiable in q
        shift = -inp.scale * (q_sq + center[..., 0].repeat_interleave(inp.h // inp.g, dim=1))
    lowered = replace(inp, q=q, k=k, v=v, scale=2 * inp.scale, score="dot")
    return Lowered(lowered, inp.e if pad_v else None, shift, None, inp.return_lse)


class _L2Columns(torch.autograd.Function):
    """(q, k, v, |k|^2, c, pad_v) -> ([q, 1], [k, -(|k|^2 - c) / 2], [v, 0] or v), with a backward that slices
    the wide gradients back (views) and adds the column's chain rule, -k * dk'[..., -1], to dk: about a third
    of the copies autograd makes through `_with_column`'s slice writes. Built of differentiable ops, so a
    recorded backward (create_graph) differentiates again exactly. |k|^2 enters as computed by the caller, so
    its gradient flows through the caller's graph."""

    @staticmethod
    def forward(ctx, q, k, v, sq, center, pad_v):
        ctx.pad_v = pad_v
        ctx.dims = (q.shape[-1], v.shape[-1])
        column = ((sq - center) * -0.5).to(k.dtype)
        return _with_column(q, 1.0), _with_column(k, column), _with_column(v, 0.0) if pad_v else v

    @staticmethod
    def backward(ctx, dq, dk, dv):
        d, e = ctx.dims
        dsq = None
        if dk is not None and ctx.needs_input_grad[3]:
            dsq = dk[..., d:].to(torch.float64 if dk.dtype == torch.float64 else torch.float32) * -0.5
        return (
            None if dq is None else dq[..., :d],
            None if dk is None else dk[..., :d],
            None if dv is None else (dv[..., :e] if ctx.pad_v else dv),
            dsq,
            None,
            None,
        )


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


Cols = int | slice | None  # a key prefix [0, cols) or a key block


def _slice_rows(t: Tensor | None, rows: slice | None, cols: Cols) -> Tensor | None:
    if t is None:
        return None
    if rows is not None and t.shape[2] != 1:
        t = t[:, :, rows]
    if cols is not None and t.shape[3] != 1:
        t = t[..., cols] if isinstance(cols, slice) else t[..., :cols]
    return t


def combined_keep(
    inp: AttnInputs, rows: slice | None = None, cols: Cols = None, structure: Structure | None = None
) -> Tensor | None:
    """`mask` AND `causal` (AND window and documents) as one bool tensor (broadcast shape of them), or None
    when none is set. `structure`: the call's `Structure`, if the caller built it already."""
    keep = _slice_rows(inp.mask, rows, cols)
    if inp.structured:
        structure = structure or Structure(inp)
        r = rows if rows is not None else slice(0, inp.i)
        c = cols if isinstance(cols, slice) else slice(0, inp.j if cols is None else cols)
        tile = structure.keep(r, c)
        keep = tile if keep is None else keep & tile
    elif inp.causal:
        if isinstance(cols, slice):
            r = rows if rows is not None else slice(0, inp.i)
            tri = causal_keep(inp.i, inp.j, inp.device, r, cols.stop)[:, cols.start :]
        else:
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
    inp: AttnInputs,
    rows: slice | None = None,
    cols: Cols = None,
    bias_dtype: torch.dtype | None = None,
    structure: Structure | None = None,
) -> Tensor | None:
    """The `attn_mask` for `F.scaled_dot_product_attention`: bool when there is no bias (cheapest),
    else the bias in `bias_dtype` (default: q's dtype; see `bias_as`) with -inf where the mask or causality
    forbids.

    Callers use `is_causal=True` instead when causal is the only constraint and i == j.
    """
    keep = combined_keep(inp, rows, cols, structure)
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
    if inp.structured:  # a block of rows at a time: never a (.., i, j) tensor for window or documents
        step = max(1, _SEE_BLOCK // max(1, inp.b * inp.h * inp.j))
        parts = [cast(Tensor, visible(inp, slice(r, min(inp.i, r + step)))) for r in range(0, inp.i, step)]
        return torch.cat([~p.any(dim=-1, keepdim=True) for p in parts], dim=2)
    keep = visible(inp)
    if keep is None:
        if inp.j == 0:
            return torch.ones(1, 1, inp.i, 1, dtype=torch.bool, device=inp.device)
        return None
    if keep.dim() == 2:
        keep = keep[None, None]
    return ~keep.any(dim=-1, keepdim=True)


def dead_keys(inp: AttnInputs, structure: Structure | None = None) -> Tensor | None:
    """Bool (b|1, j): True for keys that no query of that batch element may attend in any head, whatever hides
    them: `mask` False for every row and head, `bias` -inf for every row and head, or the structure (a window,
    another document, a cache or sequence length behind `q_pos`: `Structure.seen_keys`); None when nothing can.
    Every rule about such keys (the garbage rule, the l2 stabiliser) reads this one function.
    Cost: one reduction over the mask and one over the bias, and O(b (i + j)) for the structure."""
    dead = None
    if inp.mask is not None:
        dead = ~inp.mask.any(dim=2).any(dim=1)  # (b|1, j|1)
    if inp.bias is not None:
        gone = (inp.bias == float("-inf")).all(dim=2).all(dim=1)
        dead = gone if dead is None else dead | gone
    if inp.structured:
        seen = (structure or Structure(inp)).seen_keys()
        if seen is not None:
            dead = ~seen if dead is None else dead | ~seen
    if dead is None:
        return None
    return dead.expand(dead.shape[0], inp.j)


def zero_keys(t: Tensor, dead: Tensor) -> Tensor:
    """k or v (b, g, j, d|e) with the keys `dead` (bool (b|1, j), `dead_keys`) set to 0: what a kernel then reads
    there reaches no row, and (unlike garbage up to inf, where 0 * inf = NaN) cannot poison one."""
    return t.masked_fill(dead[:, None, :, None], 0)


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
    if per_row or inp.structured:
        # a mask or bias that differs per query row: look at (b, h, rows, j) a block of rows at a time
        step = max(1, _SEE_BLOCK // max(1, b * h * j))
        parts = []
        for start in range(0, i, step):
            rows = slice(start, min(i, start + step))
            keep = cast(Tensor, visible(inp, rows))  # 4-D: mask or bias is set
            sees = (keep & kv_bad[:, :, None, :]).any(-1) | (q_bad[:, :, rows] & keep.any(-1))
            parts.append(sees.expand(b, h, rows.stop - rows.start).reshape(b, h, rows.stop - rows.start))
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
