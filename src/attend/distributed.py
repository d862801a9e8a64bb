"""Context parallel attention: one sequence split across the processes of a `torch.distributed` group.

Shape legend: b batch, h query heads, g key/value heads, i query positions, j key positions, d head dim (q and
k), e value head dim.

Every rank holds a shard of the sequence (self-attention: the queries and the keys of the same positions) and
gets the output rows of its own queries::

    q (b, h, i_local, d)   k (b, g, j_local, d)   v (b, g, j_local, e)   ->   out (b, h, i_local, e)

    mask       bool (b, j_local): key padding of this rank's keys (gathered, or passed on with them); any other
               shape is passed as it is, broadcastable to (b, h, i_local, j) with j all keys in global order
    documents  int (b|1, j_local): document ids of this rank's positions (gathered, or passed on with them)
    bias       float, broadcastable to (b, h, i_local, j): this rank's query rows, every key in global order

Layouts (`shard` cuts a full tensor, `unshard` puts it back together; both agree with the attention):

    "contiguous"  rank r holds the r-th of W contiguous chunks; with n % W != 0 the first n % W ranks hold
                  one position more (`torch.tensor_split`'s rule). The attention itself accepts any lengths
                  here: the global positions are the prefix sums of the ranks' lengths, in rank order.
    "headtail"    the sequence in 2W chunks (the same rule); rank r holds chunks r and 2W-1-r, in that order,
                  so every rank gets the same causal work. The lengths must follow the rule (use `shard`).

Strategies:

    "allgather"   k and v (and the key padding mask / document ids) are all-gathered, and each rank runs
                  attend's dispatch (`attend.dispatch.run`) for its queries against every key, with its
                  queries' global positions as the causal / window diagonal (`AttnInputs.q_pos`). Any mask
                  attend supports works; memory per rank is O(n) for k and v. Collectives per call: forward
                  2 `all_gather` (the shapes, then k and v together), plus 1 when a key padding mask or
                  documents are given; backward 1 `all_reduce` (the gradient of the gathered k and v) when k
                  or v requires grad. Every rank must call backward (the all_reduce is collective).
    "ring"        (the default) k and v stay sharded: each rank's block (its k, v, key padding, document ids)
                  goes around the ring, W steps; at step s rank r holds the block of rank (r - s) % W and runs
                  chunked's tile kernel (`attend.tiles`) for its queries against it, with every mask:
                  the key padding of the block's owner, causal / window by global positions, documents, a bool
                  mask or bias sliced to the block's keys, GQA (k/v travel with g heads, never expanded). The
                  partial outputs are merged by their log-sum-exp in float32; a row that sees no key gets 0 (and
                  zero gradients). Blocks that no local query can see (all padding, after every local query
                  under causal, outside every window, no document in common) are not computed on but still
                  passed on, and only the query rows that can see a block are. A block travels in P = 8 pieces
                  of consecutive positions: while a rank computes on a piece, the next block's same piece is on
                  its way (`batch_isend_irecv`: gloo on CPU, coalesced on NCCL), so communication overlaps
                  compute. Backward (a torch.autograd.Function; first order only, create_graph=True raises):
                  the blocks go around again, and each piece's dk/dv accumulator follows it one exchange behind
                  (a rank adds its queries' part, from their global out and log-sum-exp); the W-th exchange brings
                  every accumulator home. Every rank must call backward.
                  Communication per call on a rank (W > 1; pieces of no position are not sent): forward 1
                  `all_gather` (the shapes and options, as above) and (W-1) * P `batch_isend_irecv`, each with one
                  isend and one irecv of a piece of k and of v, plus one of an int64 (b, piece, f) tensor of key
                  padding / document ids when given: W-1 blocks sent, no all_gather of k or v. Backward, no
                  collective: (W-1) * P exchanges of k and v again, and W * P of dk and dv (two isends each) when
                  k or v requires grad: W-1 blocks of k/v and W blocks of dk/dv sent. Memory per rank O(n / W):
                  its q, k, v, out and dq, plus (1 + 1/P) blocks of k/v and (1 + 1/P) of dk/dv in flight; at
                  (1, 16, 32768, 128) float32, causal + key padding, forward + backward, a rank of 4 peaks at
                  0.36x one process's RSS (benchmarks/results/cpu-context-parallel.md); at world 2 a call takes
                  1.1-1.3x one process's time on the same two cores (communication overlapped, not a speed-up).

Dropout (`dropout_p > 0`, both strategies): every rank draws a seed from its default generator, as one
process's call would, and all use rank 0's (it travels with the first all_gather, no extra collective). The
keep-mask is chunked's (`attend.tiles`), a hash of (seed, batch, head, query position, key position)
over global positions, so with the same generator state on rank 0 the ranks drop exactly the entries that
`attention(q_full, k_full, v_full, dropout_p=p, backend="chunked")` drops in one process, forward and backward.
"""

from __future__ import annotations

import bisect
import math
import struct
from dataclasses import dataclass, replace
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import Tensor

from . import tiles
from ._helpers import accum_dtype, autocast_inputs, fmt_dtype, fmt_shape
from .backends.chunked import TILES, chunked_attention
from .dispatch import run
from .grad2 import records_graph
from .inputs import Options, check_sinks, check_window, describe, sides, validate
from .masks import Structure, apply_sinks, lower, zero_keys
from .merge import merge_into

__all__ = ["context_parallel_attention", "shard", "unshard", "LAYOUTS", "STRATEGIES"]

LAYOUTS = ("contiguous", "headtail")
STRATEGIES = ("allgather", "ring")
# what every rank sends and checks (`_local_checks`): the local length first, the key axes of mask and bias last
_META = (
    "length", "b", "h", "g", "d", "e", "causal", "window left", "window right", "key padding mask given",
    "documents given", "k/v requires grad", "layout", "dtype", "dropout_p (in units of 2**-24)",
    "softcap (float64 bits; 0: none)", "sinks given", "return_lse", "mask key axis", "bias key axis",
)  # fmt: skip
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # checked to agree across ranks
_FAR = 2**62  # a window side at or past this is unbounded for any sequence a tensor can hold

# helpers


def _group_info(group: Any) -> tuple[Any, int, int]:
    """(group, rank, world size) of `group` (None: the default group); raises if none is initialised."""
    if not dist.is_available():
        raise RuntimeError(
            "expected torch.distributed to be available, got a PyTorch build without it; "
            "hint: context parallel attention needs a build with torch.distributed"
        )
    if not dist.is_initialized():
        raise RuntimeError(
            "expected an initialised torch.distributed process group, got none; hint: call "
            "torch.distributed.init_process_group('nccl' or 'gloo', ...) on every rank first"
        )
    group = dist.group.WORLD if group is None else group
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("expected `group` to contain this process, got a group it is not a member of")
    return group, rank, dist.get_world_size(group)


def _check_layout(layout: Any) -> str:
    if layout not in LAYOUTS:
        raise ValueError(
            f"expected `layout` to be one of {LAYOUTS}, got {describe(layout)}; hint: 'headtail' balances causal "
            "work across ranks, 'contiguous' is the plain split"
        )
    return str(layout)


def _chunk_lengths(n: int, parts: int) -> list[int]:
    """`torch.tensor_split`'s rule: n in `parts` chunks, the first n % parts one longer."""
    base, extra = divmod(n, parts)
    return [base + (1 if c < extra else 0) for c in range(parts)]


def _rule_positions(n: int, world: int, rank: int, layout: str) -> list[tuple[int, int]]:
    """The (start, length) runs of global positions that `rank` holds under `layout`, in its local order."""
    parts = world if layout == "contiguous" else 2 * world
    lengths = _chunk_lengths(n, parts)
    starts = [sum(lengths[:c]) for c in range(parts)]
    chunks = [rank] if layout == "contiguous" else [rank, 2 * world - 1 - rank]
    return [(starts[c], lengths[c]) for c in chunks]


def _rank_runs(lengths: list[int], layout: str) -> list[list[tuple[int, int]]]:
    """Each rank's runs of global positions, given the ranks' local lengths. Contiguous: any lengths, in rank
    order. Headtail: the lengths must follow the rule (checked by the callers)."""
    world, n = len(lengths), sum(lengths)
    if layout == "contiguous":
        return [[(sum(lengths[:r]), lengths[r])] for r in range(world)]
    return [_rule_positions(n, world, r, layout) for r in range(world)]


def _check_rule(lengths: list[int], layout: str, what: str) -> None:
    if layout != "headtail":
        return
    world, n = len(lengths), sum(lengths)
    want = [sum(length for _, length in _rule_positions(n, world, r, layout)) for r in range(world)]
    if lengths != want:
        raise ValueError(
            f"expected the ranks' {what} lengths to follow the 'headtail' rule for n={n} over {world} ranks "
            f"(chunks r and 2W-1-r of 2W, the first n % 2W chunks one longer), i.e. {want}, got {lengths}; "
            "hint: cut the full sequence with attend.distributed.shard(x, dim, layout='headtail')"
        )


def _positions(runs: list[tuple[int, int]], device: torch.device) -> Tensor:
    parts = [torch.arange(start, start + length, device=device) for start, length in runs]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _to_global_order(lengths: list[int], layout: str, device: torch.device) -> Tensor | None:
    """Index that puts the rank-order concatenation of the shards into global order (None: already is)."""
    if layout == "contiguous":
        return None
    order = torch.cat([_positions(runs, device) for runs in _rank_runs(lengths, layout)])
    return torch.argsort(order)


def _gather_meta(values: list[int], group: Any, device: torch.device) -> list[list[int]]:
    """One small all_gather: every rank's list of ints (one length for all ranks)."""
    world = dist.get_world_size(group)
    mine = torch.tensor(values, dtype=torch.int64, device=device)
    bufs = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(bufs, mine, group=group)
    return [[int(x) for x in b.tolist()] for b in bufs]


def _gather_raw(x: Tensor, dim: int, lengths: list[int], group: Any) -> Tensor:
    """All ranks' `x` (each of length lengths[r] along `dim`, equal elsewhere), concatenated in rank order.
    One all_gather, padded to the longest shard."""
    longest = max(lengths)
    if longest == 0:
        shape = list(x.shape)
        shape[dim] = 0
        return x.new_empty(shape)
    x = x.contiguous()
    if x.shape[dim] != longest:
        shape = list(x.shape)
        shape[dim] = longest
        padded = x.new_zeros(shape)
        padded.narrow(dim, 0, x.shape[dim]).copy_(x)
        x = padded
    bufs = [torch.empty_like(x) for _ in lengths]
    dist.all_gather(bufs, x, group=group)
    return torch.cat([b.narrow(dim, 0, length) for b, length in zip(bufs, lengths)], dim=dim)


class _AllGather(torch.autograd.Function):
    """Forward: all ranks' shards in rank order. Backward: every rank's loss depends on every shard, so this
    rank's gradient is the sum over ranks of their gradient at its slice: one all_reduce, then the slice."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, dim: int, lengths: list[int], rank: int, group: Any) -> Tensor:
        ctx.dim, ctx.lengths, ctx.rank, ctx.group = dim, lengths, rank, group
        return _gather_raw(x, dim, lengths, group)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None, None, None]:
        summed = grad.clone(memory_format=torch.contiguous_format)
        if summed.numel():
            dist.all_reduce(summed, group=ctx.group)
        start = sum(ctx.lengths[: ctx.rank])
        return summed.narrow(ctx.dim, start, ctx.lengths[ctx.rank]), None, None, None, None


def _gather(x: Tensor, dim: int, lengths: list[int], rank: int, group: Any) -> Tensor:
    if x.requires_grad and torch.is_grad_enabled():
        return _AllGather.apply(x, dim, lengths, rank, group)
    return _gather_raw(x, dim, lengths, group)


def _key_axis(name: str, t: Any, q: Tensor, target: tuple[int, int, int], kind: str) -> int:
    """A mask or bias given with this rank's query rows and every key: its type, dtype and device, and its
    (b, h, i_local) dims, checked before any collective (so no rank raises alone after one). Returns the size
    of its key axis (1 when it has none), which the caller checks against j on every rank."""
    if not isinstance(t, Tensor):
        raise TypeError(f"expected `{name}` to be a torch.Tensor, got {describe(t)}")
    if kind == "bool" and t.dtype != torch.bool:
        raise TypeError(f"expected `{name}` of dtype bool (True = may attend), got {fmt_dtype(t.dtype)}")
    if kind == "float" and not t.is_floating_point():
        raise TypeError(f"expected `{name}` of a floating dtype (added to the logits), got {fmt_dtype(t.dtype)}")
    if t.device != q.device:
        raise ValueError(f"expected `{name}` on {q.device} like q, got {t.device}")
    want = (*target, -1)
    t4 = tuple(t.shape) if t.dim() >= 4 else (1,) * (4 - t.dim()) + tuple(t.shape)
    if t.dim() > 4 or any(size not in (1, w) for size, w in zip(t4[:3], target)):
        raise ValueError(
            f"expected `{name}` broadcastable to (b, h, i_local, j) = {fmt_shape(want).replace('-1', 'j')}: this "
            f"rank's query rows and every key in global order, got shape {fmt_shape(t.shape)}"
        )
    return t4[3]


def _norm_dim(x: Any, dim: Any, name: str) -> int:
    if not isinstance(x, Tensor):
        raise TypeError(f"expected `{name}` to be a torch.Tensor, got {describe(x)}")
    if isinstance(dim, bool) or not isinstance(dim, int) or not -x.dim() <= dim < max(x.dim(), 1):
        raise ValueError(f"expected `dim` to be an int in [-{x.dim()}, {x.dim()}), got {dim!r} for {describe(x)}")
    return dim % x.dim()


def _local_checks(
    q: Any, k: Any, v: Any, mask: Any, bias: Any, documents: Any, options: Options, layout: str, sinks: Any = None
) -> tuple[list[int], Tensor | None, Tensor | None]:
    """Every check that needs only this rank's inputs. Returns the ints every rank must agree on (`_META`; the
    first is the local length), the key padding mask (b, j_local) or None, and the document ids or None."""
    # attend's own checks and messages, on this rank's shapes; the window is checked apart from them: its sides
    # saturate at the global length (`_window`), which this rank learns only from the collective
    local = validate(q, k, v, options=options._replace(window=None))
    causal = options.causal
    window = check_window(options.window, bool(causal))
    b, h, i_local, d, g, j_local, e = local.b, local.h, local.i, local.d, local.g, local.j, local.e
    if i_local != j_local:
        raise ValueError(
            f"expected q and k/v shards of the same positions (self-attention, i_local == j_local), got "
            f"q {fmt_shape(q.shape)}, k {fmt_shape(k.shape)}; hint: shard q, k and v with the same "
            "attend.distributed.shard(x, 2, layout)"
        )
    key_pad = None
    if mask is not None and isinstance(mask, Tensor) and mask.dim() == 2:
        if mask.dtype != torch.bool or tuple(mask.shape) != (b, j_local):
            raise ValueError(
                f"expected a 2-D `mask` to be this rank's key padding, bool (b, j_local) = "
                f"{fmt_shape((b, j_local))}, got {describe(mask)}"
            )
        if mask.device != q.device:
            raise ValueError(f"expected `mask` on {q.device} like q, got {mask.device}")
        key_pad = mask
    mask_j = -1 if mask is None or key_pad is not None else _key_axis("mask", mask, q, (b, h, i_local), "bool")
    bias_j = -1 if bias is None else _key_axis("bias", bias, q, (b, h, i_local), "float")
    docs = None
    if documents is not None:
        if not isinstance(documents, Tensor):
            raise TypeError(
                f"expected `documents` to be an integer tensor (b, j_local) of this rank's document ids, got "
                f"{describe(documents)}; hint: a (q_docs, k_docs) pair is not supported (self-attention only)"
            )
        if documents.is_floating_point() or documents.is_complex() or documents.dtype == torch.bool:
            raise TypeError(f"expected `documents` of an integer dtype, got {fmt_dtype(documents.dtype)}")
        if documents.dim() != 2 or documents.shape[0] not in (1, b) or documents.shape[1] != j_local:
            raise ValueError(
                f"expected `documents` of shape (b, j_local) = {fmt_shape((b, j_local))} (or (1, j_local)), this "
                f"rank's positions, got shape {fmt_shape(documents.shape)}"
            )
        if documents.device != q.device:
            raise ValueError(f"expected `documents` on {q.device} like q, got {documents.device}")
        docs = documents.long().expand(b, j_local)

    # sides travel as int64 (-1 unbounded), capped where no sequence reaches (a Python int of any size is valid)
    left, right = (-1 if w is None else min(w, _FAR) for w in sides(window, bool(causal)))
    meta = [
        i_local, b, h, g, d, e, int(bool(causal)), left, right,
        int(key_pad is not None), int(docs is not None),
        int(torch.is_grad_enabled() and (k.requires_grad or v.requires_grad)),
        LAYOUTS.index(layout), _DTYPES.index(q.dtype), round(local.dropout_p * 2**24),
        0 if local.softcap is None else struct.unpack("<q", struct.pack("<d", local.softcap))[0],
        int(check_sinks(sinks, q, b, h) is not None), int(local.return_lse), mask_j, bias_j,
    ]  # fmt: skip
    return meta, key_pad, docs


# the ring strategy

# P2POp accepts only torch.distributed's own isend / irecv (compared by identity): take them from c10d, so that a
# wrapper put on `dist.isend` (the tests count with one) cannot break the ops
_ISEND, _IRECV = dist.distributed_c10d.isend, dist.distributed_c10d.irecv
# message tags of one exchange (gloo matches a receive by peer and tag; NCCL by order, which is the same)
_TAG_K, _TAG_V, _TAG_META, _TAG_DK, _TAG_DV = range(5)
# each rank's block travels in this many pieces (runs of its local positions), one after the other: while a piece
# is computed on, the next block's same piece is on its way, so a rank holds the block it computes on plus one
# piece of the next, (1 + 1/P) blocks of k/v instead of a double buffer's 2, and (1 + 1/P) blocks of dk/dv. A rank's
# peak at (1, 16, 32768, 128) over 4 ranks was 0.47x one process's with whole blocks, 0.37x with P = 8 (and the
# pooled buffers and 256-key tiles below); more pieces cost more, smaller kernel calls
# (benchmarks/context_parallel.py)
_PIECES = 8
# (q_tile, k_tile) of the ring's kernel calls per device type: chunked's, with CPU key tiles of 256 instead of 512.
# The backward's per-tile temporaries (two score tiles and more) come and go in glibc's heap, and the small
# tensors a ring call keeps between them (plans, masks) stop the heap from shrinking: at (1, 16, 32768, 128) over
# 4 ranks the peak varied 790-890 MiB per rank with 512-key tiles, 760-790 MiB with 256 (one process: 2190 and
# 2145 MiB), for a few per cent more time (benchmarks/context_parallel.py)
_RING_TILES: dict[str, tuple[int, int]] = {**TILES, "cpu": (256, 256)}

_Part = tuple[int, int, int]  # (offset in its piece, global start, length): one run of consecutive positions
# a part some local query can see: (its plan, offset in the piece, global start, length, query rows r0, r1)
_Planned = tuple[tiles.Plan, int, int, int, int, int]


@dataclass
class _Ring:
    """One ring call: what its forward and backward share (no k/v data: the blocks travel)."""

    group: Any
    rank: int
    world: int
    # per rank, its block's pieces: (offset in the block, length, the runs of consecutive positions in it)
    pieces: list[list[tuple[int, int, list[_Part]]]]
    b: int
    h: int
    g: int
    scale: float | None
    window: tuple[int | None, int | None] | None  # causal merged in (right 0); None: no window, no causal
    q_pos: Tensor  # (i_local,) global positions of this rank's queries (ascending: both layouts keep the order)
    q_list: list[int]  # the same, for bisect
    q_docs: Tensor | None  # (b, i_local) int64 document ids of this rank's positions
    meta: Tensor | None  # (b, j_local, f) int64: this rank's key padding (as 0/1) and / or document ids
    pad_col: int | None  # the column of `meta` that holds the key padding
    doc_col: int | None  # the column of `meta` that holds the document ids
    mask4: Tensor | None  # a bool mask (b|1, h|1, i_local|1, n|1): this rank's rows, every key in global order
    q_tile: int
    k_tile: int
    dropout_p: float
    seed: int  # rank 0's dropout seed (every rank uses it: chunked's keep-mask over global positions)
    softcap: float | None = None  # logit soft-capping, inside every tile (`tiles.Facts.softcap`)
    # filled by the forward, reused by the backward: per (owner rank, piece), the plans of its runs that some
    # local query can see (a plan holds no k/v data)
    plans: dict[tuple[int, int], list[_Planned]] | None = None

    @property
    def next(self) -> int:
        return (self.rank + 1) % self.world

    @property
    def prev(self) -> int:
        return (self.rank - 1) % self.world

    def owner(self, step: int) -> int:
        """The rank whose block this rank holds at ring step `step` (its own at step 0 and at step W)."""
        return (self.rank - step) % self.world

    def length(self, owner: int, piece: int) -> int:
        return self.pieces[owner][piece][1]


def _cut_pieces(runs: list[tuple[int, int]]) -> list[tuple[int, int, list[_Part]]]:
    """A block's positions (its runs of global positions, in local order) in `_PIECES` pieces of consecutive
    local positions (`torch.tensor_split`'s rule): (offset, length, parts), a part per run the piece overlaps
    (a "headtail" block has two runs, so one piece may have two parts)."""
    pieces = []
    offset = 0
    for length in _chunk_lengths(sum(n for _, n in runs), _PIECES):
        parts, local = [], 0  # the runs' overlap with [offset, offset + length)
        for start, n in runs:
            lo, hi = max(offset, local), min(offset + length, local + n)
            if hi > lo:
                parts.append((lo - offset, start + lo - local, hi - lo))
            local += n
        pieces.append((offset, length, parts))
        offset += length
    return pieces


class _Exchange:
    """One exchange in flight: each (tag, tensor) of `send` to the next rank, each of `recv` from the previous
    one, in one `batch_isend_irecv` (NCCL coalesces it; gloo runs the ops side by side). Empty tensors are not
    sent: both ends know every piece's length. Holds the tensors until `wait` returns."""

    def __init__(self, ring: _Ring, send: list[tuple[int, Tensor]], recv: list[tuple[int, Tensor]]):
        group = ring.group
        # peers as global ranks (`peer=`): every torch >= 2.4 takes it; `group_peer=` came later
        nxt, prev = dist.get_global_rank(group, ring.next), dist.get_global_rank(group, ring.prev)
        ops = [dist.P2POp(_ISEND, t, nxt, group=group, tag=tag) for tag, t in send if t.numel()]
        ops += [dist.P2POp(_IRECV, t, prev, group=group, tag=tag) for tag, t in recv if t.numel()]
        self.requests = list(dist.batch_isend_irecv(ops)) if ops else []
        self.tensors: list[Tensor] = [t for _, t in send + recv]

    def wait(self) -> None:
        for request in self.requests:
            request.wait()
        self.requests, self.tensors = [], []


def _key_cols(t: Tensor | None, start: int, length: int) -> Tensor | None:
    """A mask or bias with every key in global order, sliced to the keys [start, start + length)."""
    if t is None or t.shape[3] == 1:
        return t
    return t[..., start : start + length]


def _rows(t: Tensor | None, r0: int, r1: int) -> Tensor | None:
    """A mask or bias with this rank's query rows, sliced to the rows [r0, r1)."""
    if t is None or t.shape[2] == 1:
        return t
    return t[:, :, r0:r1]


def _plan_part(
    ring: _Ring, q: Tensor, k: Tensor, v: Tensor, meta: Tensor | None, bias4: Tensor | None, part: _Part
) -> tuple[tiles.Plan, int, int] | None:
    """chunked's plan for the local queries that may see one run of keys (k, v and `meta`, the key padding /
    document ids, sliced to it): (plan, r0, r1) for the query rows [r0, r1) (local order: positions ascend), or
    None where no local query can see any of its keys (all padding, outside every query's causal / window
    range by global positions, no document in common). The rows outside [r0, r1) see none of them."""
    _, start, length = part
    r0, r1 = 0, q.shape[2]
    if length == 0 or r1 == 0:
        return None
    if ring.window is not None:  # query p sees [p - left, p + right]: rows whose range meets the run's keys
        left, right = ring.window
        if right is not None:
            r0 = bisect.bisect_left(ring.q_list, start - right)
        if left is not None:
            r1 = bisect.bisect_right(ring.q_list, start + length - 1 + left)
    if r0 >= r1:
        return None
    pad = k_docs = None
    if meta is not None and ring.pad_col is not None:
        pad = meta[..., ring.pad_col].bool()
        if not bool(pad.any()):
            return None  # every key of the run is padding
    if meta is not None and ring.doc_col is not None:
        assert ring.q_docs is not None
        k_docs = meta[..., ring.doc_col]
        q_docs = ring.q_docs[:, r0:r1]
        shared = ((q_docs >= k_docs.amin(1, keepdim=True)) & (q_docs <= k_docs.amax(1, keepdim=True))).any(0)
        rows = shared.nonzero()
        if not len(rows):
            return None  # no document in common with any local query
        r0, r1 = r0 + int(rows[0]), r0 + int(rows[-1]) + 1
    q_rows = q[:, :, r0:r1]
    mask = pad if pad is not None else _rows(_key_cols(ring.mask4, start, length), r0, r1)
    inp = validate(
        q_rows, k, v, mask=mask, bias=_rows(_key_cols(bias4, start, length), r0, r1),
        documents=None if k_docs is None or ring.q_docs is None else (ring.q_docs[:, r0:r1], k_docs),
        options=Options(scale=ring.scale),
    )  # fmt: skip
    if ring.window is not None:
        # causal and the window by global positions, in the run's key coordinates. Set here, not through
        # `validate`: it would saturate the sides at this run's own extent, which the queries' global positions
        # pass (the window was checked and saturated at the global length already)
        inp = replace(inp, window=ring.window, q_pos=(ring.q_pos[r0:r1] - start)[None])
    facts = tiles.read_facts(inp.mask, inp.bias, length, ring.k_tile)
    if inp.structured:
        structure = Structure(inp)
        if structure.lo is not None and structure.hi is not None and not bool((structure.hi > structure.lo).any()):
            return None  # no query sees a key of the run (documents)
        facts = facts._replace(structure=structure)
    if ring.softcap is not None:
        facts = facts._replace(softcap=ring.softcap)
    # dropout: the keep-mask at the rows' and the keys' global positions
    plan = tiles.Plan(
        q_rows, inp.k, inp.v, inp.mask, inp.bias, False, inp.scale, ring.dropout_p, ring.seed, ring.q_tile,
        ring.k_tile, facts, rows=ring.q_pos[r0:r1], col0=start,
    )  # fmt: skip
    return plan, r0, r1


def _merge(out: Tensor, lse: Tensor, out_s: Tensor, lse_s: Tensor) -> None:
    """out, lse (views, updated in place) and a partial result (out_s, lse_s) over more keys (`merge.merge_into`).
    lse -inf: the row has seen no key yet (out 0)."""
    merge_into(out, lse, out_s, lse_s.masked_fill_(lse_s == math.inf, -math.inf))  # chunked's mark of no key: +inf


class _Pool:
    """Buffers for the pieces in flight (k/v pieces, or dk/dv accumulators), reused from step to step: `slots`
    slots of `slot` bytes carved from one allocation, plus a standalone buffer if ever more are taken at once.

    One allocation, freed whole by `release`: pieces allocated one by one sit below glibc's dynamic mmap
    threshold (up to 32 MiB) and land in its heap, where the small tensors a call keeps (plans, masks) pin them;
    the RSS of a rank then kept growing from step to step (+300 MiB at (1, 16, 32768, 128) over 4 ranks)."""

    def __init__(self, slot: int, slots: int, device: torch.device):
        self.slot, self.slots, self.device = max(slot, 1), slots, device  # (>= 1 byte: addresses of their own)
        self.slab: Tensor | None = None  # allocated by the first `take` (at world 1 nothing is)
        self.free: list[Tensor] = []
        self.standalone: dict[int, Tensor] = {}  # by storage address

    def take(self, *specs: tuple[tuple[int, ...], torch.dtype]) -> tuple[Tensor, ...]:
        """Contiguous tensors of the given shapes and dtypes, one after the other in one slot (uninitialised)."""
        if self.slab is None:
            self.slab = torch.empty(self.slot * self.slots, dtype=torch.uint8, device=self.device)
            self.free = [self.slab[s * self.slot : (s + 1) * self.slot] for s in range(self.slots)][::-1]
        if self.free:
            flat = self.free.pop()
        else:
            flat = torch.empty(self.slot, dtype=torch.uint8, device=self.device)
            self.standalone[flat.untyped_storage().data_ptr()] = flat
        views, offset = [], 0
        for shape, dtype in specs:
            size = math.prod(shape) * dtype.itemsize
            views.append(flat[offset : offset + size].view(dtype).view(shape))
            offset += size
        return tuple(views)

    def give(self, t: Tensor) -> None:
        """Hand back the slot of the first tensor a `take` returned."""
        address = t.untyped_storage().data_ptr()
        if self.slab is not None and address == self.slab.untyped_storage().data_ptr():
            s = t.storage_offset() * t.element_size() // self.slot
            self.free.append(self.slab[s * self.slot : (s + 1) * self.slot])
        else:
            self.free.append(self.standalone.pop(address))

    def release(self) -> None:
        """Drop the pool's references: its memory goes once the tensors still in use from it do."""
        self.slab, self.free, self.standalone = None, [], {}


def _pool_for(ring: _Ring, k: Tensor, v: Tensor, dtype: torch.dtype) -> _Pool:
    """A pool whose slots hold the largest piece of k and v (or of dk and dv) in `dtype`, as many as a ring
    phase holds at once: the pieces of one block plus the one arriving (`_PIECES` + 1)."""
    longest = max(n for pieces in ring.pieces for _, n, _ in pieces)
    slot = ring.b * ring.g * longest * (k.shape[3] + v.shape[3]) * dtype.itemsize
    return _Pool(slot, _PIECES + 1, k.device)


_Piece = tuple[Tensor, Tensor, Tensor | None]  # k (b, g, n, d), v (b, g, n, e), meta (b, n, f) of one piece


def _own_pieces(ring: _Ring, k: Tensor, v: Tensor) -> list[_Piece | None]:
    """This rank's block in pieces: views of k and v (copied into a pool buffer only to be sent)."""
    meta = ring.meta
    return [
        (k.narrow(2, o, n), v.narrow(2, o, n), None if meta is None else meta.narrow(1, o, n))
        for o, n, _ in ring.pieces[ring.rank]
    ]


def _pass_on(
    ring: _Ring, pool: _Pool, piece: _Piece, step: int, p: int, with_meta: bool
) -> tuple[_Exchange, _Piece, Tensor | None]:
    """Send `piece` (piece p of the block held at `step`) to the next rank and receive piece p of the block
    held at step + 1 from the previous one. Returns the exchange in flight, the piece it fills (pool buffers)
    and the pool buffer of the copy sent (a non-contiguous piece of this rank's own k/v), if any."""
    k, v, meta = piece
    b, g, d, e = k.shape[0], k.shape[1], k.shape[3], v.shape[3]
    n = ring.length(ring.owner(step + 1), p)
    new_k, new_v = pool.take(((b, g, n, d), k.dtype), ((b, g, n, e), v.dtype))
    new_meta = meta.new_empty(b, n, meta.shape[2]) if with_meta and meta is not None else None
    copy = None
    if not (k.is_contiguous() and v.is_contiguous()):
        copy_k, copy_v = pool.take((tuple(k.shape), k.dtype), (tuple(v.shape), v.dtype))
        k, v, copy = copy_k.copy_(k), copy_v.copy_(v), copy_k
    send = [(_TAG_K, k), (_TAG_V, v)]
    recv = [(_TAG_K, new_k), (_TAG_V, new_v)]
    if new_meta is not None and meta is not None:
        send, recv = [*send, (_TAG_META, meta.contiguous())], [*recv, (_TAG_META, new_meta)]
    return _Exchange(ring, send, recv), (new_k, new_v, new_meta), copy


def _settle(pool: _Pool, exchange: _Exchange | None, copy: Tensor | None, piece: _Piece, step: int) -> None:
    """After a piece was computed on: wait for its exchange, then give back its send copy and (past the first
    step, where the block is the rank's own) its received slots."""
    if exchange is not None:
        exchange.wait()
    if copy is not None:  # sent and computed on: the slots are free
        pool.give(copy)
    if step > 0:
        pool.give(piece[0])


def _ring_forward(ring: _Ring, q: Tensor, k: Tensor, v: Tensor, bias4: Tensor | None) -> tuple[Tensor, Tensor]:
    """out (b*g, r, i_local, e) and lse (b*g, r, i_local) in the accumulation dtype (lse +inf on a row that sees
    no key, as chunked's). W steps of `_PIECES` phases: a phase sends this piece on and starts receiving the
    next block's same piece, computes on this piece, then waits for the exchange."""
    world, acc = ring.world, accum_dtype(q.dtype)
    b, g, i, e = ring.b, ring.g, q.shape[2], v.shape[3]
    plans: dict[tuple[int, int], list[_Planned]] = {}
    out = q.new_zeros(b * g, ring.h // g, i, e, dtype=acc)
    lse = q.new_full((b * g, ring.h // g, i), -math.inf, dtype=acc)
    # each part's result, written into one buffer per call (rows [0, r1 - r0)): parts of every size allocated
    # one by one fragmented glibc's heap, and a rank kept up to 200 MiB more after the forward
    out_s, lse_s = torch.empty_like(out), torch.empty_like(lse)
    pool = _pool_for(ring, k, v, k.dtype)
    cur = _own_pieces(ring, k, v)
    for step in range(world):
        owner = ring.owner(step)
        arriving: list[_Piece | None] = []
        for p, (_, _, parts) in enumerate(ring.pieces[owner]):
            piece, cur[p] = cur[p], None
            assert piece is not None
            exchange = copy = None
            if step < world - 1:
                exchange, arrived, copy = _pass_on(ring, pool, piece, step, p, with_meta=True)
                arriving.append(arrived)
                del arrived
            plans[(owner, p)] = []
            for part in parts:
                off, start, length = part
                k_r, v_r = piece[0].narrow(2, off, length), piece[1].narrow(2, off, length)
                meta_r = None if piece[2] is None else piece[2].narrow(1, off, length)
                planned = _plan_part(ring, q, k_r, v_r, meta_r, bias4, part)
                if planned is not None:
                    plan, r0, r1 = planned
                    plans[(owner, p)].append((plan, off, start, length, r0, r1))
                    rows = r1 - r0
                    tiles.forward(plan, q[:, :, r0:r1], k_r, v_r, out_s[:, :, :rows], lse_s[:, :, :rows])
                    _merge(out[:, :, r0:r1], lse[:, :, r0:r1], out_s[:, :, :rows], lse_s[:, :, :rows])
                del k_r, v_r
            _settle(pool, exchange, copy, piece, step)
            del piece, copy  # (no reference to a slot may outlive the pool's release)
        cur = arriving
    pool.release()
    del out_s, lse_s
    ring.plans = plans
    return out, lse.masked_fill_(lse == -math.inf, math.inf)  # +inf: a row that sees no key (chunked's mark)


def _ring_backward(
    ring: _Ring, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, bias4: Tensor | None, out: Tensor, lse: Tensor,
    kv_grad: bool, bias_grad: bool, dlse: Tensor | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:  # fmt: skip
    """dq, dk, dv (None unless kv_grad), dbias (None unless bias_grad), shaped like q, k, v, bias4.

    The k/v blocks go around the ring a second time, piece by piece as in the forward (the next block's piece
    arriving while this one is computed on). Each piece's dk/dv accumulator follows it: a rank adds its queries'
    part (chunked's tile backward, from the global out and lse of its queries) and passes it on right after,
    waiting for that exchange only after its next phase's compute; the W-th exchange brings every accumulator
    home to its owner."""
    assert ring.plans is not None
    b, g, world = ring.b, ring.g, ring.world
    r, i, d, e = ring.h // g, q.shape[2], k.shape[3], v.shape[3]
    bg, acc = b * g, accum_dtype(q.dtype)
    dog = dout.reshape(bg, r, i, e)
    lse3 = lse.view(bg, r, i)
    # D = rowsum(dout * out) of the whole attention, once for every block
    delta = (dog.to(acc) * out.view(bg, r, i, e)).sum(dim=-1)
    if dlse is not None:  # the log-sum-exp's gradient: d lse / d s = p, so ds = p * (dp - (D - dlse))
        delta = delta - dlse.reshape(delta.shape).to(acc)
    dq = q.new_zeros(bg, r, i, d, dtype=acc)  # unscaled until the end (`tiles.backward_into`)
    dbias4 = None if bias4 is None or not bias_grad else bias4.new_zeros(bias4.shape, dtype=acc)
    scale = 1.0
    pool, acc_pool = _pool_for(ring, k, v, k.dtype), _pool_for(ring, k, v, acc)  # k/v pieces; dk/dv

    def accumulator(n: int) -> tuple[Tensor, Tensor]:  # zeros: dk (b*g, n, d) and dv (b*g, n, e), pooled
        dk_p, dv_p = acc_pool.take(((bg, n, d), acc), ((bg, n, e), acc))
        return dk_p.zero_(), dv_p.zero_()

    own = ring.pieces[ring.rank]
    home: tuple[Tensor, Tensor] | None = None  # this rank's dk, dv (b*g, j_local, d|e)
    if world == 1 and kv_grad:  # nothing travels: the accumulators are views of it
        home = q.new_zeros(bg, k.shape[2], d, dtype=acc), q.new_zeros(bg, k.shape[2], e, dtype=acc)
        dkv: list[tuple[Tensor, Tensor] | None] = [(home[0][:, o : o + n], home[1][:, o : o + n]) for o, n, _ in own]
    else:
        dkv = [accumulator(n) for _, n, _ in own]
    finals: list[tuple[Tensor, Tensor] | None] = [None] * len(own)  # own pieces' accumulators, back home
    # the dk/dv exchange of the previous phase and the accumulator it sends: waited for after this phase's
    # compute, so that a rank whose phase ran longer does not hold its neighbour at every phase
    pending: tuple[_Exchange, Tensor] | None = None
    cur = _own_pieces(ring, k, v)
    for step in range(world):
        owner = ring.owner(step)
        arriving: list[_Piece | None] = []
        for p in range(len(ring.pieces[owner])):
            piece, cur[p] = cur[p], None
            accumulators, dkv[p] = dkv[p], None
            assert piece is not None and accumulators is not None
            exchange = copy = None
            if step < world - 1:
                exchange, arrived, copy = _pass_on(ring, pool, piece, step, p, with_meta=False)
                arriving.append(arrived)
                del arrived
            dk_p, dv_p = accumulators
            for plan, off, start, length, r0, r1 in ring.plans[(owner, p)]:
                k_r, v_r = piece[0].narrow(2, off, length), piece[1].narrow(2, off, length)
                qg, kk, vv = plan.split(q[:, :, r0:r1], k_r, v_r)
                dbias = None if dbias4 is None else tiles.grouped(_rows(_key_cols(dbias4, start, length), r0, r1), g, r)
                rows, hi = slice(r0, r1), off + length
                tiles.backward_into(
                    plan, dog[:, :, rows], qg, kk, vv, lse3[:, :, rows], delta[:, :, rows], dq[:, :, rows],
                    dk_p[:, off:hi], dv_p[:, off:hi], dbias,
                )  # fmt: skip
                scale = plan.scale
                del qg, kk, vv, k_r, v_r
            _settle(pool, exchange, copy, piece, step)
            del piece, copy  # (no reference to a slot may outlive the pool's release)
            if pending is not None:
                pending[0].wait()
                acc_pool.give(pending[1])
                pending = None
            if world == 1:
                continue
            n = ring.length(ring.owner(step + 1), p)  # piece p of the block held next (last step: this rank's)
            if kv_grad:
                new_dk, new_dv = acc_pool.take(((bg, n, d), acc), ((bg, n, e), acc))
                send, recv = [(_TAG_DK, dk_p), (_TAG_DV, dv_p)], [(_TAG_DK, new_dk), (_TAG_DV, new_dv)]
                pending = _Exchange(ring, send, recv), dk_p
                if step < world - 1:
                    dkv[p] = (new_dk, new_dv)
                else:
                    finals[p] = (new_dk, new_dv)
                del send, recv
            else:
                if step < world - 1:  # no k/v gradient wanted: fresh scratch for the next piece
                    dkv[p] = accumulator(n)
                acc_pool.give(dk_p)
            del dk_p, dv_p, accumulators
        cur = arriving
    if pending is not None:
        pending[0].wait()
        acc_pool.give(pending[1])
        pending = None
    pool.release()  # no k/v piece is in use any more: their memory goes before this rank's dk/dv is assembled
    if kv_grad and home is None:
        home = tuple(torch.cat([f[c] for f in finals if f is not None], dim=1) for c in (0, 1))  # type: ignore[assignment]
    del finals, dkv
    acc_pool.release()
    dq = dq.mul_(scale).view(b, ring.h, i, d).to(q.dtype)
    dbias_out = None if dbias4 is None or bias4 is None else dbias4.to(bias4.dtype)
    if home is None:
        return dq, None, None, dbias_out
    return dq, home[0].view(b, g, -1, d).to(k.dtype), home[1].view(b, g, -1, e).to(v.dtype), dbias_out


class _RingFn(torch.autograd.Function):
    """(q, k, v, bias4, ring) -> this rank's output (b, h, i_local, e) and log-sum-exp (b, h, i_local) in the
    accumulation dtype (+inf: a row with no key); first-order backward across ranks, the lse's gradient included
    (it enters as D - dlse, as in `tiles.backward`)."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, bias4: Tensor | None, ring: _Ring) -> tuple[Tensor, Tensor]:
        out, lse = _ring_forward(ring, q, k, v, bias4)
        out4 = out.view(ring.b, ring.h, q.shape[2], v.shape[3])
        result = out4 if out4.dtype == q.dtype else out4.to(q.dtype)
        # out in the accumulation dtype: the backward's D = rowsum(dout * out) cancels (see tiles.forward)
        ctx.save_for_backward(q, k, v, bias4, out4, lse)
        ctx.ring = ring
        ctx.set_materialize_grads(False)  # a loss without the lse passes no dlse (nothing to subtract)
        return result, lse.view(ring.b, ring.h, q.shape[2])

    @staticmethod
    def backward(ctx: Any, dout: Tensor | None, dlse: Tensor | None) -> tuple[Tensor | None, ...]:
        if records_graph():
            raise RuntimeError(
                "expected a first-order backward through context_parallel_attention(strategy='ring'), got "
                "create_graph=True (double backward); hint: strategy='allgather' is differentiable twice"
            )
        q, k, v, bias4, out, lse = ctx.saved_tensors
        if dout is None and dlse is None:  # (collective: every rank runs the same graph, so all return here)
            return None, None, None, None, None
        if dout is None:
            dout = torch.zeros_like(out, dtype=q.dtype)
        kv_grad = bool(ctx.needs_input_grad[1] or ctx.needs_input_grad[2])
        bias_grad = bias4 is not None and bool(ctx.needs_input_grad[3])
        dq, dk, dv, dbias = _ring_backward(ctx.ring, dout, q, k, v, bias4, out, lse, kv_grad, bias_grad, dlse)
        return dq, dk, dv, dbias, None


def _ring_attention(
    q: Tensor, k: Tensor, v: Tensor, *, group: Any, rank: int, lengths: list[int], layout: str,
    key_pad: Tensor | None, docs: Tensor | None, mask: Tensor | None, bias: Tensor | None, scale: float | None,
    left: int | None, right: int | None, dropout: tuple[float, int], softcap: float | None = None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """strategy="ring" once the inputs are checked on every rank (`context_parallel_attention`); `dropout`: the
    probability and rank 0's seed. Returns this rank's out and its log-sum-exp (b, h, i_local), -inf for a row
    with no key, both differentiable."""
    runs = _rank_runs(lengths, layout)
    q_pos = _positions(runs[rank], q.device)
    fields: list[Tensor] = []
    pad_col = doc_col = None
    if key_pad is not None:
        pad_col, fields = len(fields), [*fields, key_pad.long()]
    if docs is not None:
        doc_col, fields = len(fields), [*fields, docs]
    as4d = lambda t: t.reshape((1,) * (4 - t.dim()) + tuple(t.shape))  # noqa: E731
    q_tile, k_tile = _RING_TILES.get(q.device.type, _RING_TILES["cpu"])
    window = None if left is None and right is None else (left, right)
    ring = _Ring(
        group=group, rank=rank, world=len(lengths), pieces=[_cut_pieces(rank_runs) for rank_runs in runs],
        b=q.shape[0], h=q.shape[1], g=k.shape[1], scale=scale, window=window, q_pos=q_pos,
        q_list=q_pos.tolist(),
        q_docs=docs, meta=torch.stack(fields, dim=-1).contiguous() if fields else None, pad_col=pad_col,
        doc_col=doc_col, mask4=None if mask is None else as4d(mask), q_tile=q_tile, k_tile=k_tile,
        dropout_p=dropout[0], seed=dropout[1], softcap=softcap,
    )  # fmt: skip
    # contiguous once (the blocks are sent as they are, and every plan views q)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out, lse = _RingFn.apply(q, k, v, None if bias is None else as4d(bias), ring)
    return out, lse.masked_fill(lse == math.inf, -math.inf)  # the tiles mark a row with no key +inf


# public API


def shard(x: Tensor, dim: int, layout: str = "contiguous", group: Any = None) -> Tensor:
    """This rank's shard of the full tensor `x` along `dim` (no communication; differentiable).

    "contiguous": the rank-th of W contiguous chunks, the first n % W one longer. "headtail": chunks r and
    2W-1-r of 2W chunks (same rule), concatenated in that order. `unshard` is its inverse."""
    layout = _check_layout(layout)
    dim = _norm_dim(x, dim, "x")
    _, rank, world = _group_info(group)
    runs = _rule_positions(x.shape[dim], world, rank, layout)
    parts = [x.narrow(dim, start, length) for start, length in runs]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def unshard(x_local: Tensor, dim: int, layout: str = "contiguous", group: Any = None) -> Tensor:
    """The full tensor on every rank from each rank's shard along `dim` (the inverse of `shard`).

    Two all_gathers (the shapes, then the data). Differentiable: each rank's output is the full tensor and each
    rank computes its own loss, so the gradient of `x_local` is the sum over ranks of their gradient at this
    rank's positions (one all_reduce in backward; every rank must call backward). A loss that every rank
    computes identically on the full tensor thus gives W times its gradient."""
    layout = _check_layout(layout)
    dim = _norm_dim(x_local, dim, "x_local")
    group, rank, world = _group_info(group)
    shapes = _gather_meta(list(x_local.shape), group, x_local.device)
    for r, shape in enumerate(shapes):
        if len(shape) != x_local.dim() or any(a != b for d, (a, b) in enumerate(zip(shape, x_local.shape)) if d != dim):
            raise ValueError(
                f"expected every rank's `x_local` to have this rank's shape {fmt_shape(x_local.shape)} except along "
                f"dim {dim}, got {fmt_shape(shape)} on rank {r}"
            )
    lengths = [shape[dim] for shape in shapes]
    _check_rule(lengths, layout, "shard")
    full = _gather(x_local, dim, lengths, rank, group)
    order = _to_global_order(lengths, layout, x_local.device)
    return full if order is None else full.index_select(dim, order)


def context_parallel_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    group: Any = None,
    mask: Tensor | None = None,
    bias: Tensor | None = None,
    causal: bool = False,
    window: tuple[int | None, int | None] | None = None,
    documents: Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    layout: str = "contiguous",
    strategy: str = "ring",
    sinks: Tensor | None = None,
    softcap: float | None = None,
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Self-attention over a sequence sharded across the ranks of `group`; returns this rank's output rows.

    Args:
        q, k, v: this rank's shard: q (b, h, i_local, d), k (b, g, j_local, d), v (b, g, j_local, e),
            i_local == j_local (the same positions), h % g == 0. Every rank calls with the same b, h, g, d, e,
            dtype and options.
        group: the process group (None: the default group).
        mask: bool (b, j_local): key padding of this rank's keys (True = may attend); or any other shape,
            broadcastable to (b, h, i_local, j) with j every key in global order.
        bias: float, broadcastable to (b, h, i_local, j): this rank's query rows, every key in global order.
        causal: query at global position p sees keys at global positions <= p.
        window: (left, right): the query at global position p sees keys p - left .. p + right (None unbounded);
            with causal=True right is 0.
        documents: int (b|1, j_local): document ids of this rank's positions; a query sees only keys of its own
            document (packed sequences); causal and the window stay position-based.
        scale: logit scale, default d ** -0.5.
        dropout_p: dropout on the attention probabilities (applied whenever > 0; pass `p if training else 0.0`).
            The keep-mask is the one `attention(..., backend="chunked")` draws on the unsharded tensors after
            the same `torch.manual_seed` on rank 0 (module docstring).
        layout: "contiguous" or "headtail" (module docstring): how the positions are spread over the ranks;
            "headtail" gives every rank the same causal work.
        strategy: "ring" (k/v blocks passed around the ranks, memory O(n / W) per rank, first-order backward)
            or "allgather" (k and v all-gathered on every rank; differentiable twice); both take every mask.
        sinks: attention sinks (h,) or (b, h), as in `attention` (the same on every rank): applied once, to the
            merged result of every block. Each rank's gradient for them is its own rows' share (summed across
            ranks by DDP's all-reduce, as for any parameter).
        softcap: logit soft-capping, as in `attention`: inside every tile of the ring.
        return_lse: return `(out, lse)`, lse (b, h, i_local) this rank's rows' log-sum-exp over every key (the
            sinks included), differentiable (both strategies).

    Equals `attend.attention(q_full, k_full, v_full, ...)` on the unsharded tensors, at this rank's rows
    (`shard(out_full, 2, layout)`), and so do the gradients of q, k, v (and bias, at its rows); with dropout,
    `attention(..., backend="chunked")` under rank 0's generator state.

    Raises:
        RuntimeError: no initialised process group.
        TypeError, ValueError: bad input, or shapes / options that differ across ranks ("expected X, got Y").
        RuntimeError (in backward): create_graph=True through strategy="ring".
    """
    layout = _check_layout(layout)
    if strategy not in STRATEGIES:
        raise ValueError(
            f"expected `strategy` to be one of {STRATEGIES}, got {describe(strategy)}; hint: 'ring' passes "
            "k/v blocks around the ranks (memory O(n / W) per rank), 'allgather' gathers every key on every rank"
        )
    group, rank, world = _group_info(group)
    q, k, v, bias = autocast_inputs(q, k, v, bias)  # type: ignore[assignment]
    # local checks first, then one small collective: every rank's shapes and options, checked to agree. A rank
    # whose own checks fail still joins it (with a flag), so every rank raises and none waits on a collective.
    device = q.device if isinstance(q, Tensor) else torch.device("cpu")
    options = Options(
        causal=causal, scale=scale, window=window, dropout_p=dropout_p, softcap=softcap, return_lse=return_lse
    )
    try:
        meta, key_pad, docs = _local_checks(q, k, v, mask, bias, documents, options, layout, sinks)
    except (TypeError, ValueError):
        # re-raised from here, never kept in a local: an exception held by its own frame is a reference cycle
        # that keeps the process group alive past destroy_process_group (gloo then aborts at interpreter exit)
        _gather_meta([1, 0, *[0] * len(_META)], group, device)
        raise
    # dropout: every rank draws a seed from its default generator (as one process's `attention` would), and all
    # use rank 0's, which travels with the checks: the keep-mask is one hash of it over global positions
    seed = int(tiles.draw_seed()) if dropout_p > 0 else 0
    flagged = _gather_meta([0, seed, *meta], group, device)
    bad = [r for r, m in enumerate(flagged) if m[0]]
    if bad:
        raise ValueError(
            f"expected every rank of the group to pass its input checks, got errors on rank(s) {bad}; hint: see "
            "the error raised there (every rank raises, so none waits on a collective)"
        )
    metas = [m[2:] for m in flagged]
    seed = flagged[0][1]
    d = meta[_META.index("d")]
    window_sides = tuple(None if x < 0 else x for x in meta[7:9])  # causal merged in: right 0
    for r, other in enumerate(metas):
        for name, mine, theirs in zip(_META[1:-2], meta[1:-2], other[1:-2]):
            if mine != theirs:
                raise ValueError(
                    f"expected every rank of the group to call context_parallel_attention with the same {name}, "
                    f"got {mine} on rank {rank} and {theirs} on rank {r}; hint: all ranks pass their shard of the "
                    "same tensors with the same options"
                )
    lengths = [m[0] for m in metas]
    _check_rule(lengths, layout, "q/k/v")
    n = sum(lengths)
    # saturated at the global extent like every door's window (`inputs.check_window`): a side past it is None
    left, right = sides(check_window(window_sides, bool(causal), 2 * n), bool(causal))
    for r, other in enumerate(metas):  # every rank checks every rank's, so all raise together
        for name, size in (("mask", other[-2]), ("bias", other[-1])):
            if size not in (-1, 1, n):
                raise ValueError(
                    f"expected `{name}` on every rank broadcastable to (b, h, i_local, j) with j = {n}, all keys in "
                    f"global order, got a key axis of {size} on rank {r}; hint: a 2-D mask (b, j_local) is this "
                    "rank's key padding"
                )
    if strategy == "ring":
        if key_pad is not None and not bool(key_pad.all()):
            # the garbage rule (contract item 3) without a collective: a padded key is hidden from every query of
            # every rank, so its owner sends zeros (a tile's 0 probability times an inf value would be NaN)
            k, v = (zero_keys(t, ~key_pad) for t in (k, v))
        out, lse = _ring_attention(
            q, k, v, group=group, rank=rank, lengths=lengths, layout=layout, key_pad=key_pad, docs=docs,
            mask=None if key_pad is not None else mask, bias=bias, scale=scale, left=left, right=right,
            dropout=(float(dropout_p), seed), softcap=softcap,
        )  # fmt: skip
        if sinks is not None:  # once, on the merged result of every block (`masks.apply_sinks`, as every door)
            out, lse = apply_sinks(out, lse, cast(Tensor, check_sinks(sinks, q, q.shape[0], q.shape[1])))
        return (out, lse) if return_lse else out
    order = _to_global_order(lengths, layout, q.device)

    def global_order(t: Tensor, dim: int) -> Tensor:
        return t if order is None else t.index_select(dim, order)

    # k and v in one all_gather, into global order
    kv = _gather(torch.cat([k, v], dim=-1), 2, lengths, rank, group)
    kv = global_order(kv, 2)
    k_full, v_full = kv[..., :d], kv[..., d:]
    mask_full: Tensor | None = mask
    docs_full = None
    if key_pad is not None or docs is not None:
        fields = [t for t in (None if key_pad is None else key_pad.long(), docs) if t is not None]
        packed = global_order(_gather(torch.stack(fields, dim=-1), 1, lengths, rank, group), 1)
        if key_pad is not None:
            mask_full = packed[..., 0].bool()
        if docs is not None:
            docs_full = packed[..., -1]
    q_pos_local = _positions(_rank_runs(lengths, layout)[rank], q.device)
    documents_arg = None if docs is None else (docs, docs_full)
    options = Options(
        scale=scale, window=None if left is None and right is None else (left, right), dropout_p=dropout_p,
        softcap=softcap, return_lse=return_lse,
    )  # fmt: skip
    inp = validate(q, k_full, v_full, mask=mask_full, bias=bias, documents=documents_arg, sinks=sinks, options=options)
    if inp.window is not None:
        # causal and the window are about global positions: each query's diagonal is its own position
        inp = replace(inp, q_pos=q_pos_local[None])
    if inp.dropout_p > 0:  # chunked's keep-mask, hashed over global positions: the one a single process draws
        low = lower(inp)  # (sinks as the log-sum-exp's rescale, the l2 score as a dot product: as `run` does)
        return low.finish(chunked_attention(low.inp, seed=seed, positions=q_pos_local))
    return run(inp)
