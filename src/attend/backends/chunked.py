"""`chunked`: the online-softmax (FlashAttention-2) algorithm in pure PyTorch, memory bounded by the tile.

Shape legend: b batch, h query heads, g key/value heads, i query positions, j key positions,
d head dim (q and k), e value head dim.

The backend over the tile engine, `attend.tiles` (the algorithm, the per-tile masks and skips, the empty
rows and the dropout hash are explained there): an autograd Function whose forward runs `tiles.forward`
and whose backward recomputes `p = exp(s - lse)` tile by tile (`tiles.backward`), so training memory is
bounded as well; the default tile sizes per device (`TILES`).

Dropout draws one seed per call from torch's default generator (so `torch.manual_seed` makes it
reproducible). Each keep-mask entry is a counter-based hash of (seed mod 2**32, batch, head, query position,
key position), so the backward regenerates exactly the forward's mask without ever storing it, any tile
sizes give the same mask, and the ranks of context parallel attention (which pass their global positions)
drop exactly what one process would; `dropout_keep_mask` rebuilds it densely for tests.

torch.compile (fullgraph=True, static or dynamic shapes) traces the same algorithm without a branch on
tensor values: the exact running max instead of the lazy reference, every key padding tile masked instead
of all-padding tiles skipped, the drawn seed kept as an int32 tensor. The results equal eager (the same
drawn seed and mask under aot_eager). With dynamic shapes a length guards only on its number of tiles, so
lengths with the same tile counts share one graph. torch.func: `vmap` folds the vmapped dim into the batch
(`_ChunkedFn.vmap`); `grad`, `vjp`, `jacrev` and higher orders run through the same backward; under
create_graph the backward recomputes through the reference with the call's own keep-mask (`attend.grad2`).

Example::

    >>> inp = validate(q, k, v, mask=pad, causal=True)       # q (b, h, i, d), k, v (b, g, j, d|e)
    >>> out = chunked_attention(inp, q_tile=128, k_tile=512)  # (b, h, i, e)
    >>> out = attention(q, k, v, mask=pad, causal=True, backend="chunked")
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor

from .. import tiles
from .._helpers import differentiable
from ..grad2 import recompute_grads, records_graph
from ..inputs import AttnInputs
from ..masks import Structure
from .base import NO_FLOAT64, Backend, Caps

__all__ = ["ChunkedBackend", "chunked_attention", "dropout_keep_mask", "TILES"]

# Default (q_tile, k_tile) per device type. CPU (2 vCPU AMD EPYC, 1 MiB L2 per core, torch 2.13.0+cpu,
# 2026-11-27), (1, 8, 4096, 64) float32 forward, measured with benchmarks/chunked_tiles.py: see
# benchmarks/chunked.md. CUDA: not measured (no GPU in this session); larger tiles keep the launches few.
TILES: dict[str, tuple[int, int]] = {"cpu": (256, 512), "cuda": (1024, 1024), "mps": (512, 1024)}

# helpers


def _fold_batch(t: Tensor | None, dim: int | None, size: int, b: int) -> Tensor | None:
    """vmap: (physical tensor, its vmapped dim) -> (size * b, ...), the vmapped dim folded into the batch.

    A mask or bias that broadcasts over the batch (size 1 in b) and is not vmapped stays as it is."""
    if t is None:
        return None
    if dim is None:
        if t.shape[0] == 1:
            return t
        t = t.unsqueeze(0).expand(size, *t.shape)
    else:
        t = t.movedim(dim, 0)
    return t.expand(size, b, *t.shape[2:]).flatten(0, 1)


def _nth(t: Tensor | None, n: int, b: int) -> Tensor | None:
    """The n-th vmapped element of a tensor folded by `_fold_batch` (a batch-broadcast one as it is)."""
    if t is None or t.shape[0] == 1:
        return t
    return t[n * b : (n + 1) * b]


class _ChunkedFn(torch.autograd.Function):
    """(q, k, v, bias, mask, ...) -> (out, lse[, out_acc]): out (b, h, i, e) in q's dtype; lse (b, h, i) and
    out_acc (b, h, i, e, in the accumulation dtype, only where that is not q's dtype) are for the backward.
    (No None output for out_acc: dynamo's traced backward calls `.contiguous()` on every output's grad.)

    In the `setup_context` form, with a `vmap` rule, so torch.func transforms (vmap, grad, jacrev) work."""

    @staticmethod
    def forward(q, k, v, bias, mask, causal, scale, dropout_p, seed, positions, q_tile, k_tile, facts):
        # (named parameters, not *inputs: dynamo's no-grad path counts them to tell the ctx-less form apart)
        plan = tiles.Plan(q, k, v, mask, bias, causal, scale, dropout_p, seed, q_tile, k_tile, facts, rows=positions)
        out_acc, lse = tiles.forward(plan, q, k, v)
        out_acc = out_acc.view(plan.b, plan.h, plan.i, plan.e)
        lse = lse.view(plan.b, plan.h, plan.i)
        if out_acc.dtype == q.dtype:
            return out_acc, lse
        # the accumulation-precision output for the backward's D (see `tiles.forward`): for float16/bfloat16
        # inputs it costs one (b, h, i, e) float32 tensor, the size of the output, not of the scores
        return out_acc.to(q.dtype), lse, out_acc

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, bias, mask, causal, scale, dropout_p, seed, positions, q_tile, k_tile, facts = inputs
        out, lse, *extra = output
        out_acc = extra[0] if extra else out
        ctx.mark_non_differentiable(*extra)  # lse is an output too (`return_lse`): its gradient is taken
        # an output the loss does not use gets None, not zeros: a plain call's backward pays nothing for the lse,
        # and a jacrev of the lse alone vmaps over dlse without an unbatched zeros dout in the way
        ctx.set_materialize_grads(False)
        seed_t = seed if isinstance(seed, Tensor) else None
        ctx.save_for_backward(q, k, v, bias, mask, out_acc, lse, seed_t, positions)
        ctx.args = (causal, scale, dropout_p, None if seed_t is not None else seed, q_tile, k_tile, facts)

    @staticmethod
    def backward(ctx, dout, dlse, *_):
        q, k, v, bias, mask, out, lse, seed_t, positions = ctx.saved_tensors
        if dout is None and dlse is None:  # neither output reaches the loss
            return (None,) * 13
        if dout is None:  # only the lse reaches the loss: zeros batched like dlse (under vmap over it)
            dout = dlse.new_zeros((*lse.shape, v.shape[-1]), dtype=q.dtype)
        causal, scale, dropout_p, seed, q_tile, k_tile, facts = ctx.args
        seed = seed_t if seed_t is not None else seed
        plan = tiles.Plan(q, k, v, mask, bias, causal, scale, dropout_p, seed, q_tile, k_tile, facts, rows=positions)
        if records_graph() and any(differentiable(t) for t in (q, k, v, bias)):
            # create_graph: the tile loop below is first-order only; recompute through the reference with
            # this call's own dropout keep-mask, so the gradients are exact and differentiable again.
            # (Where no saved input can be differentiated again, as in torch.func.vjp's vjp_fn and jacrev,
            # the tile loop runs: its result is still differentiable in dout.)
            inp = AttnInputs(
                q,
                k,
                v,
                mask=mask,
                bias=bias,
                causal=plan.causal,
                scale=plan.scale,
                dropout_p=plan.dropout_p,
                softcap=plan.softcap,
                **(plan.structure.fields if plan.structure else {}),
            )
            keep = tiles.dense_keep(plan) if plan.dropout_p > 0 else None
            grads = recompute_grads(inp, dout, tuple(ctx.needs_input_grad[:4]), keep, dlse)
            return (*grads, None, None, None, None, None, None, None, None, None)
        bias_grad = bias is not None and ctx.needs_input_grad[3]
        dq, dk, dv, dbias = tiles.backward(plan, dout, q, k, v, out, lse, bias_grad, dlse)
        b, h, g = plan.b, plan.h, plan.g
        dq = dq.view(b, h, plan.i, plan.d).to(q.dtype)
        dk = dk.view(b, g, plan.j, plan.d).to(k.dtype)
        dv = dv.view(b, g, plan.j, plan.e).to(v.dtype)
        if dbias is not None:
            dbias = dbias.reshape(bias.shape).to(bias.dtype)
        return dq, dk, dv, dbias, None, None, None, None, None, None, None, None, None

    @staticmethod
    def vmap(info, in_dims, q, k, v, bias, mask, causal, scale, dropout_p, seed, positions, q_tile, k_tile, facts):
        """Attention is independent per batch element: fold the vmapped dim into b, run once, unfold.

        (A tile then spans size * b batch entries; the memory bound per tile is unchanged, see `tiles.Plan.batches`.)"""
        size = info.batch_size
        bq, bk, bv, bb, bm = in_dims[:5]
        b = q.shape[0] if bq is None else q.movedim(bq, 0).shape[1]
        q, k, v = (_fold_batch(t, dim, size, b) for t, dim in ((q, bq), (k, bk), (v, bv)))
        bias, mask = _fold_batch(bias, bb, size, b), _fold_batch(mask, bm, size, b)
        if bm is not None:  # padding facts (if any) were read from one element's mask: not for the fold
            facts = facts._replace(pad_all=None, pad_none=None)
        if in_dims[9] is not None:
            raise ValueError(
                "expected the dropout `positions` of chunked_attention shared by every vmapped element, got them "
                "vmapped; hint: pass one (i,) tensor"
            )
        args = (causal, scale, dropout_p, seed, positions, q_tile, k_tile, facts)
        seed_dim = in_dims[8]
        if dropout_p > 0 and (info.randomness == "same" or seed_dim is not None):
            # randomness="same": one keep-mask for every vmapped element; "different" with a seed drawn under
            # vmap: one seed per element. Either way the elements run one by one, each with its own seed
            seeds = [seed] * size if seed_dim is None else list(seed.movedim(seed_dim, 0).unbind(0))
            each = [
                _ChunkedFn.apply(*(_nth(t, n, b) for t in (q, k, v, bias, mask)), *args[:3], seeds[n], *args[4:])
                for n in range(size)
            ]
            outs = tuple(torch.stack(ts) for ts in zip(*each))
        else:
            # otherwise each vmapped element is one more batch entry (with its own dropout mask, if any)
            flat = _ChunkedFn.apply(q, k, v, bias, mask, *args)
            outs = tuple(t.unflatten(0, (size, b)) for t in flat)
        return outs, (0,) * len(outs)


# `Function.apply` binds the forward's signature on every call in the setup_context form (torch 2.13,
# autograd/function.py: `inspect.signature(cls.forward).bind(...)`, 20 us for 12 parameters): a cached
# `__signature__` brings it to 7 us
_ChunkedFn.forward.__signature__ = inspect.signature(_ChunkedFn.forward)  # type: ignore[attr-defined]


# main functions


def chunked_attention(
    inp: AttnInputs,
    *,
    q_tile: int | None = None,
    k_tile: int | None = None,
    seed: int | None = None,
    positions: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Attention by tiles with an online softmax; differentiable with a tile-recomputing backward.

    q (b, h, i, d), k (b, g, j, d), v (b, g, j, e) -> (b, h, i, e) in q's dtype; with `inp.return_lse` also the
    log-sum-exp (b, h, i) in the accumulation dtype (-inf: no key), differentiable. Never holds more than one
    (batch slice, h, q_tile, k_tile) score tile. `seed` fixes the dropout mask (only its value modulo 2**32
    counts; default: drawn from torch's default generator); `dropout_keep_mask(inp, seed, ...)` rebuilds
    that mask densely, for tests. The mask does not depend on the tile sizes: each entry is a hash of (seed,
    batch, head, query position, key position). `positions` (i,) integers: the query rows' positions in it
    (default 0..i-1); context parallel attention passes each rank's global positions, so the ranks drop what
    one process would.

    torch.compile (fullgraph, dynamic shapes) traces it: there it keeps the exact running max instead of the
    lazy reference, masks every key padding tile instead of skipping all-padding ones, and keeps a drawn
    seed on the device side (same results, no host branch). torch.func.vmap folds the vmapped dim into b.
    """
    default_q, default_k = TILES.get(inp.device.type, TILES["cpu"])
    q_tile, k_tile = q_tile or default_q, k_tile or default_k
    drawn: int | Tensor = 0
    if inp.dropout_p > 0:
        drawn = tiles.draw_seed() if seed is None else seed
    facts = tiles.read_facts(inp.mask, inp.bias, inp.j, k_tile)
    if inp.structured:
        facts = facts._replace(structure=Structure(inp))
    if inp.softcap is not None:
        facts = facts._replace(softcap=inp.softcap)
    if inp.deterministic:
        facts = facts._replace(deterministic=True)
    if positions is not None and (
        not isinstance(positions, Tensor)
        or positions.shape != (inp.i,)
        or positions.is_floating_point()
        or positions.device != inp.device
    ):
        raise ValueError(
            f"expected `positions` to be an integer tensor of shape (i,) = ({inp.i},) on {inp.device}, the query "
            f"rows' positions in the dropout keep-mask, got {positions!r:.80}; hint: leave it None for 0..i-1"
        )
    out, lse, *_ = _ChunkedFn.apply(
        inp.q, inp.k, inp.v, inp.bias, inp.mask, inp.causal, inp.scale, inp.dropout_p, drawn, positions, q_tile,
        k_tile, facts,
    )  # fmt: skip
    if not inp.return_lse:
        return out
    return out, lse.masked_fill(lse == torch.inf, -torch.inf)  # the tiles mark a row with no key +inf


def dropout_keep_mask(inp: AttnInputs, seed: int, *, positions: Tensor | None = None) -> Tensor:
    """The dense bool (b, h, i, j) keep-mask `chunked_attention(inp, seed=seed, positions=positions)` applies
    (True = kept), with any tile sizes.

    Testing only: it materialises the (i, j) tensor the backend itself never builds (entries the backend never
    visits, above the causal diagonal or in all-padding tiles, have probability 0 anyway).
    """
    plan = tiles.Plan(inp.q, inp.k, inp.v, None, None, False, inp.scale, inp.dropout_p, seed, 1, 1, rows=positions)
    return tiles.dense_keep(plan)


# main class


class ChunkedBackend(Backend):
    """Online softmax in pure PyTorch (FlashAttention-2 forward and backward), every feature, every device.

    Memory: O(b * h * (i + j) * (d + e)) plus one score tile of (batch slice, h, q_tile, k_tile) floats,
    whatever i and j are; never an (i, j) tensor. Causal skips the tiles above the diagonal (about half
    the work). Tile sizes default to `TILES[device]`; pass `q_tile`, `k_tile` for another instance and
    register it under its own name::

        >>> from attend.dispatch import register_backend
        >>> tuned = ChunkedBackend(q_tile=128, k_tile=1024, name="chunked:128x1024")
        >>> register_backend(tuned)
        >>> out = attention(q, k, v, causal=True, backend="chunked:128x1024")
    """

    name = "chunked"
    # every feature on every device; memory bounded by the tile, so no (i, j) scores for the budget to count
    caps = {
        "cpu": Caps(dense_scores=False, lse=True, softcap=True),
        "cuda": Caps(dense_scores=False, lse=True, softcap=True),
        "mps": Caps(dtypes=NO_FLOAT64, dense_scores=False, lse=True, softcap=True),
    }

    def __init__(self, q_tile: int | None = None, k_tile: int | None = None, *, name: str | None = None):
        for label, size in (("q_tile", q_tile), ("k_tile", k_tile)):
            if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
                raise ValueError(f"expected `{label}` to be a positive int or None, got {size!r}")
        self.q_tile, self.k_tile = q_tile, k_tile
        if name is not None:
            self.name = name

    def run(self, inp: AttnInputs) -> Tensor | tuple[Tensor, Tensor]:
        return chunked_attention(inp, q_tile=self.q_tile, k_tile=self.k_tile)

    def lowering(self, inp: AttnInputs) -> str | None:
        if not inp.structured:
            return None
        q_tile, k_tile = TILES.get(inp.device.type, TILES["cpu"])
        q_tile, k_tile = self.q_tile or q_tile, self.k_tile or k_tile
        return Structure(inp).describe(q_tile) + f"; key tiles of {k_tile} outside every row's keys are skipped"

    def __repr__(self) -> str:
        return f"<attend backend {self.name!r} q_tile={self.q_tile} k_tile={self.k_tile}>"
