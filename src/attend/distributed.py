"""Context parallel attention: one sequence split across the processes of a `torch.distributed` group.

Shape legend: b batch, h query heads, g key/value heads, i query positions, j key positions, d head dim (q and
k), e value head dim.

Every rank holds a shard of the sequence (self-attention: the queries and the keys of the same positions) and
gets the output rows of its own queries::

    q (b, h, i_local, d)   k (b, g, j_local, d)   v (b, g, j_local, e)   ->   out (b, h, i_local, e)

    mask       bool (b, j_local): key padding of this rank's keys (gathered); any other shape is passed as it
               is, broadcastable to (b, h, i_local, j) with j all keys in global order
    documents  int (b|1, j_local): document ids of this rank's positions (gathered)
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
    "ring"        not built yet: raises NotImplementedError.

Dropout (`dropout_p > 0`) is not supported yet (NotImplementedError).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ._helpers import fmt_dtype, fmt_shape
from .dispatch import run
from .functional import autocast_inputs
from .inputs import Options, validate

__all__ = ["context_parallel_attention", "shard", "unshard", "LAYOUTS", "STRATEGIES"]

LAYOUTS = ("contiguous", "headtail")
STRATEGIES = ("allgather", "ring")
# what every rank sends and checks (`_local_checks`): the local length first, the key axes of mask and bias last
_META = (
    "length", "b", "h", "g", "d", "e", "causal", "window left", "window right", "key padding mask given",
    "documents given", "k/v requires grad", "layout", "dtype", "mask key axis", "bias key axis",
)  # fmt: skip
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # checked to agree across ranks

# helpers


def _describe(t: Any) -> str:
    if isinstance(t, Tensor):
        return f"a {t.dim()}-D tensor of shape {fmt_shape(t.shape)}, dtype {fmt_dtype(t.dtype)}"
    return f"{type(t).__name__} {t!r}"[:120]


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
            f"expected `layout` to be one of {LAYOUTS}, got {_describe(layout)}; hint: 'headtail' balances causal "
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
        raise TypeError(f"expected `{name}` to be a torch.Tensor, got {_describe(t)}")
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
        raise TypeError(f"expected `{name}` to be a torch.Tensor, got {_describe(x)}")
    if isinstance(dim, bool) or not isinstance(dim, int) or not -x.dim() <= dim < max(x.dim(), 1):
        raise ValueError(f"expected `dim` to be an int in [-{x.dim()}, {x.dim()}), got {dim!r} for {_describe(x)}")
    return dim % x.dim()


def _local_checks(
    q: Any, k: Any, v: Any, mask: Any, bias: Any, documents: Any, causal: Any, scale: Any, window: Any, layout: str
) -> tuple[list[int], Tensor | None, Tensor | None]:
    """Every check that needs only this rank's inputs. Returns the ints every rank must agree on (`_META`; the
    first is the local length), the key padding mask (b, j_local) or None, and the document ids or None."""
    # attend's own checks and messages, on this rank's shapes
    local = validate(q, k, v, options=Options(causal=causal, scale=scale, window=window))
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
                f"{fmt_shape((b, j_local))}, got {_describe(mask)}"
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
                f"{_describe(documents)}; hint: a (q_docs, k_docs) pair is not supported (self-attention only)"
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

    left, right = local.window if local.window is not None else (None, 0 if causal else None)
    meta = [
        i_local, b, h, g, d, e, int(bool(causal)), -1 if left is None else left, -1 if right is None else right,
        int(key_pad is not None), int(docs is not None),
        int(torch.is_grad_enabled() and (k.requires_grad or v.requires_grad)),
        LAYOUTS.index(layout), _DTYPES.index(q.dtype), mask_j, bias_j,
    ]  # fmt: skip
    return meta, key_pad, docs


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
) -> Tensor:
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
        dropout_p: must be 0 (dropout is not supported yet).
        layout: "contiguous" or "headtail" (module docstring): how the positions are spread over the ranks.
        strategy: "allgather" (k and v all-gathered; every mask works) or "ring" (not built yet).

    Equals `attend.attention(q_full, k_full, v_full, ...)` on the unsharded tensors, at this rank's rows
    (`shard(out_full, 2, layout)`), and so do the gradients of q, k, v (and bias, at its rows).

    Raises:
        RuntimeError: no initialised process group.
        TypeError, ValueError: bad input, or shapes / options that differ across ranks ("expected X, got Y").
        NotImplementedError: strategy="ring", or dropout_p > 0.
    """
    layout = _check_layout(layout)
    if strategy not in STRATEGIES:
        raise ValueError(
            f"expected `strategy` to be one of {STRATEGIES}, got {_describe(strategy)}; "
            "hint: 'allgather' is the one built"
        )
    if strategy == "ring":
        raise NotImplementedError(
            "context_parallel_attention: the 'ring' strategy is not built yet (k/v passed around the ring with "
            "log-sum-exp merging); hint: pass strategy='allgather', which all-gathers k and v and supports "
            "every mask"
        )
    if not isinstance(dropout_p, (int, float)) or isinstance(dropout_p, bool) or dropout_p != 0:
        raise NotImplementedError(
            f"context_parallel_attention: dropout is not supported yet, got dropout_p={dropout_p!r}; "
            "hint: pass dropout_p=0.0"
        )
    group, rank, world = _group_info(group)
    q, k, v, bias = autocast_inputs(q, k, v, bias)  # type: ignore[assignment]
    # local checks first, then one small collective: every rank's shapes and options, checked to agree. A rank
    # whose own checks fail still joins it (with a flag), so every rank raises and none waits on a collective.
    device = q.device if isinstance(q, Tensor) else torch.device("cpu")
    failure: Exception | None = None
    try:
        meta, key_pad, docs = _local_checks(q, k, v, mask, bias, documents, causal, scale, window, layout)
    except (TypeError, ValueError) as err:
        failure, meta, key_pad, docs = err, [0] * len(_META), None, None
    flagged = _gather_meta([int(failure is not None), *meta], group, device)
    if failure is not None:
        raise failure
    bad = [r for r, m in enumerate(flagged) if m[0]]
    if bad:
        raise ValueError(
            f"expected every rank of the group to pass its input checks, got errors on rank(s) {bad}; hint: see "
            "the error raised there (every rank raises, so none waits on a collective)"
        )
    metas = [m[1:] for m in flagged]
    d = meta[_META.index("d")]
    left, right = (None if x < 0 else x for x in meta[7:9])  # causal merged in: right 0
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
    for r, other in enumerate(metas):  # every rank checks every rank's, so all raise together
        for name, size in (("mask", other[-2]), ("bias", other[-1])):
            if size not in (-1, 1, n):
                raise ValueError(
                    f"expected `{name}` on every rank broadcastable to (b, h, i_local, j) with j = {n}, all keys in "
                    f"global order, got a key axis of {size} on rank {r}; hint: a 2-D mask (b, j_local) is this "
                    "rank's key padding"
                )
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
    options = Options(scale=scale, window=None if left is None and right is None else (left, right))
    inp = validate(q, k_full, v_full, mask=mask_full, bias=bias, documents=documents_arg, options=options)
    if inp.window is not None:
        # causal and the window are about global positions: each query's diagonal is its own position
        inp = replace(inp, q_pos=q_pos_local[None])
    return run(inp)
