"""`chunked`: the online-softmax (FlashAttention-2) algorithm in pure PyTorch, memory bounded by the tile.

Shape legend: b batch, h query heads (= g * r), g key/value heads, r query heads per kv head,
i query positions, j key positions, d head dim (q and k), e value head dim.

Queries are cut into tiles of `q_tile` rows and keys into tiles of `k_tile` columns. For one query tile
the forward keeps a running row max `m`, a running row sum `l` and an unnormalised output `o`, all in
float32 (float64 for float64 inputs), and for every key tile it can see::

    s     = (q_t * scale) @ k_t^T + bias_t, masked to -inf     # (b*g, r*tq, tk): the only (i, j)-ish tensor
    m_new = max(m, rowmax(s))
    p     = exp(s - m_new)
    l     = l * exp(m - m_new) + rowsum(p)
    o     = o * exp(m - m_new) + dropout(p) @ v_t

and at the end `out = o / l` and `lse = m + log(l)` (saved for the backward). Where the matmuls run in
the accumulation dtype (CPU, float64) `m` is replaced by a lazily moved reference (see `_LAZY`), so most
tiles need neither the subtraction nor the rescale of `o`. The backward recomputes
`p = exp(s - lse)` tile by tile, so training memory is bounded as well. The grouped-query heads sharing one
kv head are folded into the rows of the tile, (b, h, i, d) -> (b*g, r*i, d), so k and v are never copied to
h heads and one `bmm` serves all r heads.

Every feature is applied per tile, from views: a key padding mask as (b, 1, 1, tk), a bool mask or bias
as its own broadcast slice, causal (bottom-right aligned) as a small (tq, tk) tile that is built only for
tiles crossing the diagonal; tiles entirely above it are never visited, tiles entirely below it are not
masked at all::

    i_len=5, j_len=7 (offset j - i = 2), tiles of 2 x 3:
            k0 k1 k2 | k3 k4 k5 | k6
        q0   x  x  x |  .  .  . |  .      tile (q0-1, k0-2): fully visible, no mask
        q1   x  x  x |  x  .  . |  .      tile (q0-1, k3-5): crosses the diagonal, masked
        q2   x  x  x |  x  x  . |  .      tile (q0-1, k6):   above the diagonal, skipped
        q3   x  x  x |  x  x  x |  .
        q4   x  x  x |  x  x  x |  x

A row with no key it may attend keeps `l = 0`: its output is exactly 0 and its `lse` is +inf, so the
backward's `p = exp(s - lse)` is 0 and its gradients are 0 (contract item 2). Masked logits are replaced,
never added to, so garbage in masked keys never reaches the softmax (contract item 3).

Dropout draws one seed per call from torch's default generator (so `torch.manual_seed` makes it
reproducible). Each tile's keep-mask is a counter-based hash of (seed, tile origin, position in the tile),
so the backward regenerates exactly the forward's mask without ever storing it; `dropout_keep_mask`
rebuilds it densely for tests. The mask depends on the tile sizes: the same seed with other tiles gives
another (equally valid) mask.

Example::

    >>> inp = validate(q, k, v, mask=pad, causal=True)       # q (b, h, i, d), k, v (b, g, j, d|e)
    >>> out = chunked_attention(inp, q_tile=128, k_tile=512)  # (b, h, i, e)
    >>> out = attention(q, k, v, mask=pad, causal=True, backend="chunked")
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._helpers import accum_dtype
from ..grad2 import recompute_grads, records_graph
from ..inputs import AttnInputs
from .base import Backend, Caps

__all__ = ["ChunkedBackend", "chunked_attention", "dropout_keep_mask", "TILES"]

# Default (q_tile, k_tile) per device type. CPU (2 vCPU AMD EPYC, 1 MiB L2 per core, torch 2.13.0+cpu,
# 2026-11-27), (1, 8, 4096, 64) float32 forward, measured with benchmarks/chunked_tiles.py: see
# benchmarks/chunked.md. CUDA: not measured (no GPU in this session); larger tiles keep the launches few.
TILES: dict[str, tuple[int, int]] = {"cpu": (256, 512), "cuda": (1024, 1024), "mps": (512, 1024)}
# Upper bound on one float32 score tile, (batch slice) * h * q_tile * k_tile * 4 bytes: a large b * h is
# processed a slice of the batch at a time so the tile, not the batch, bounds the memory.
MAX_TILE_BYTES = 64 * 2**20

# helpers

_NEG_INF = float("-inf")
# Lazy rescaling (as in FlashAttention-4), where the matmuls run in the accumulation dtype (CPU, float64):
# exp is taken against a per-row reference that starts at 0 and moves only when the row's running max
# leaves [ref - 60, ref + 8]. The largest term is then within [e^-60, e^8] (float32-safe, no underflow of
# the max, no overflow of l <= j * e^8), and most tiles skip the subtract and rescale passes. GPUs keep
# the exact running max: their half-precision p would underflow below e^-16.
_LAZY = (-60.0, 8.0)


def _tile_seed(seed: int, r0: int, c0: int) -> int:
    """A distinct, deterministic generator seed for the tile starting at query r0, key c0."""
    return (seed * 0x9E3779B1 + r0 * 0x85EBCA77 + c0 * 0xC2B2AE3D + 1) % (2**63 - 1)


def _i32(x: int) -> int:
    """An unsigned 32-bit constant as the signed int32 torch multiplies with (two's complement wrap)."""
    x &= 0xFFFFFFFF
    return x - 2**32 if x >= 2**31 else x


def _dropout_keep(index: Tensor, shape, p: float, seed: int, r0: int, c0: int, b0: int) -> Tensor:
    """Bool keep-mask of one tile, a pure function of (seed, tile origin, position in the tile).

    A counter-based hash (murmur3's 32-bit finaliser over the element index, keyed by the tile) in int32
    tensor ops: about 6x cheaper on CPU than drawing `torch.rand` from a freshly seeded generator per tile,
    and the backward regenerates it exactly. The low 24 bits are uniform: keep iff they are >= p * 2**24.
    """
    key = _i32(_tile_seed(seed, r0, c0) ^ (b0 * 0x27D4EB2F) ^ (_tile_seed(seed, r0, c0) >> 32))
    x = index.mul(_i32(0x9E3779B1)).bitwise_xor_(key)  # index: arange(numel) in int32, cached per shape
    # `>>` on int32 is arithmetic: mask the sign bits back out to get murmur3's logical shifts
    x.bitwise_xor_(x.bitwise_right_shift(16).bitwise_and_(0xFFFF)).mul_(_i32(0x85EBCA6B))
    x.bitwise_xor_(x.bitwise_right_shift(13).bitwise_and_(0x7FFFF)).mul_(_i32(0xC2B2AE35))
    x.bitwise_xor_(x.bitwise_right_shift(16).bitwise_and_(0xFFFF))
    return x.bitwise_and_(0xFFFFFF).ge(round(p * 2**24)).view(shape)


def _add_bmm(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc += a @ b, batched; a and b may be in a narrower matmul dtype than the accumulator (GPUs)."""
    # baddbmm_ into a strided slice (dk[:, c0:c1] with b*g > 1) falls back to one addmm_ per batch entry
    # (torch 2.13, CPU): b*g small matmuls instead of one; a bmm and an add are cheaper
    if a.dtype == acc.dtype and acc.is_contiguous():
        acc.baddbmm_(a, b)
    else:
        acc.add_(torch.bmm(a, b))


def _grouped(t: Tensor | None, g: int) -> Tensor | None:
    """(b|1, h|1, i|1, j|1) -> (b|1, g|1, r|1, i|1, j|1): lines masks and bias up with the folded heads."""
    if t is None:
        return None
    if t.shape[1] == 1:
        return t[:, :, None]
    return t.unflatten(1, (g, t.shape[1] // g))


def _tile_of(t5: Tensor, bs: slice, rows: slice, cols: slice) -> Tensor:
    """Slice a grouped mask or bias to one tile, leaving its broadcast (size-1) dims alone."""
    if t5.shape[0] != 1:
        t5 = t5[bs]
    if t5.shape[3] != 1:
        t5 = t5[:, :, :, rows]
    if t5.shape[4] != 1:
        t5 = t5[..., cols]
    return t5


class _Plan:
    """Everything the forward and the backward must agree on: tiles, skips, masks, seed."""

    def __init__(self, q, k, v, mask, bias, causal, scale, dropout_p, seed, q_tile, k_tile):
        self.b, self.h, self.i, self.d = q.shape
        self.g, self.j, self.e = k.shape[1], k.shape[2], v.shape[3]
        self.r = self.h // self.g
        self.causal, self.scale, self.dropout_p, self.seed = causal, scale, dropout_p, seed
        self.q_tile, self.k_tile = q_tile, k_tile
        self.offset = self.j - self.i  # causal: query x sees key y iff y <= x + offset
        self.device = q.device
        self.acc = accum_dtype(q.dtype)
        # CPU matmuls in half precision are slow and round the logits: run them in float32. On GPUs the
        # tensor cores take the input dtype and accumulate in float32 themselves.
        self.mm = self.acc if q.device.type == "cpu" or q.dtype == torch.float64 else q.dtype
        self.mask5 = _grouped(mask, self.g)
        self.bias5 = _grouped(bias, self.g)
        # can a row's running max be -inf (nothing visible in a tile)? Only with a mask, causal or a bias
        self.may_be_empty = mask is not None or bias is not None or causal
        self.lazy = self.mm == self.acc
        per_batch = self.h * q_tile * k_tile * 4
        self.batch_step = max(1, min(self.b, MAX_TILE_BYTES // max(per_batch, 1)))
        self._causal_tiles: dict[tuple[int, int, int], Tensor] = {}
        self._index: dict[int, Tensor] = {}  # dropout: arange(numel) per tile size
        # A key padding mask (b|1, 1, 1, j): decide once per key tile whether it is all True (no masking
        # needed) or all False for every batch element (the tile is skipped).
        self.pad_all = self.pad_none = None
        if mask is not None and mask.shape[1] == 1 and mask.shape[2] == 1 and mask.shape[3] != 1:
            keys = mask.reshape(-1, self.j)
            n_tiles = -(-self.j // k_tile)
            padded = keys.new_ones(keys.shape[0], n_tiles * k_tile)
            padded[:, : self.j] = keys
            per_tile = padded.view(keys.shape[0], n_tiles, k_tile)
            self.pad_all = per_tile.all(dim=2).all(dim=0).tolist()
            padded[:, self.j :] = False
            self.pad_none = (~per_tile.any(dim=2)).all(dim=0).tolist()

    def batches(self):
        for b0 in range(0, self.b, self.batch_step):
            yield slice(b0, min(b0 + self.batch_step, self.b))

    def query_tiles(self):
        for r0 in range(0, self.i, self.q_tile):
            yield r0, min(r0 + self.q_tile, self.i)

    def key_tiles(self, r0: int, r1: int):
        """Key tiles the query rows [r0, r1) can see: (c0, c1, causal tile crosses the diagonal)."""
        hi = self.j
        if self.causal:
            hi = max(0, min(self.j, r1 + self.offset))  # keys beyond the last row's diagonal: skipped
        for c0 in range(0, hi, self.k_tile):
            if self.pad_none is not None and self.pad_none[c0 // self.k_tile]:
                continue  # every key here is padding for every batch element
            c1 = min(c0 + self.k_tile, hi)
            crosses = self.causal and c1 - 1 > r0 + self.offset
            yield c0, c1, crosses

    def causal_drop(self, r0: int, r1: int, c0: int, c1: int) -> Tensor:
        """Bool (tq, tk), True where causality forbids; shared by all tiles with the same geometry."""
        key = (r1 - r0, c1 - c0, r0 + self.offset - c0)
        drop = self._causal_tiles.get(key)
        if drop is None:
            x = torch.arange(r1 - r0, device=self.device)[:, None]
            y = torch.arange(c1 - c0, device=self.device)[None, :]
            drop = self._causal_tiles[key] = y > x + key[2]
        return drop

    def scores(
        self, qt: Tensor, kk: Tensor, bs: slice, r0, r1, c0, c1, crosses, shift: Tensor | None = None
    ) -> tuple[Tensor, list[Tensor]]:
        """Logits of one tile in the accumulation dtype, minus `shift` (nb*g, r*tq, 1) if given, masked
        to -inf; and the drop masks applied.

        qt: (nb*g, r*tq, d) already scaled; kk: (nb*g, j, d). Returns s: (nb*g, r*tq, tk).
        """
        kt = kk[:, c0:c1].transpose(1, 2)
        if shift is not None and qt.dtype == self.acc:
            # the subtraction rides on the matmul's beta term: one pass over the tile fewer
            s = torch.baddbmm(shift.neg().expand(-1, -1, c1 - c0), qt, kt)
        else:
            s = torch.bmm(qt, kt)
            if s.dtype != self.acc:
                s = s.to(self.acc)
            if shift is not None:
                s.sub_(shift)
        nb = bs.stop - bs.start
        s5 = s.view(nb, self.g, self.r, r1 - r0, c1 - c0)
        rows, cols = slice(r0, r1), slice(c0, c1)
        if self.bias5 is not None:
            s5.add_(_tile_of(self.bias5, bs, rows, cols))
        drops = []
        if self.mask5 is not None and not (self.pad_all is not None and self.pad_all[c0 // self.k_tile]):
            drops.append(~_tile_of(self.mask5, bs, rows, cols))
        if crosses:
            drops.append(self.causal_drop(r0, r1, c0, c1))
        for drop in drops:
            # masked_fill, not an add: a garbage (even inf) logit at a masked key never reaches the softmax
            s5.masked_fill_(drop, _NEG_INF)
        return s, drops

    def keep(self, shape, bs: slice, r0: int, c0: int) -> Tensor:
        n = math.prod(shape)
        index = self._index.get(n)
        if index is None:
            index = self._index[n] = torch.arange(n, dtype=torch.int32, device=self.device)
        return _dropout_keep(index, shape, self.dropout_p, self.seed, r0, c0, bs.start)

    def split(self, q: Tensor, k: Tensor, v: Tensor):
        """Fold heads: q (b, h, i, d) -> (b*g, r, i, d); k (b*g, j, d); v (b*g, j, e), in the matmul dtype."""
        qg = q.reshape(self.b * self.g, self.r, self.i, self.d)
        kk = k.reshape(self.b * self.g, self.j, self.d).to(self.mm)
        vv = v.reshape(self.b * self.g, self.j, self.e).to(self.mm)
        return qg, kk, vv

    def q_tile_of(self, qg: Tensor, bs: slice, r0: int, r1: int) -> Tensor:
        """(nb*g, r*tq, d): the scaled query tile (scale folded in once per tile, in the accumulation dtype)."""
        gs = slice(bs.start * self.g, bs.stop * self.g)
        qt = qg[gs, :, r0:r1].to(self.acc) * self.scale
        return qt.to(self.mm).reshape(-1, self.r * (r1 - r0), self.d)


def _forward(plan: _Plan, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """out (b*g, r, i, e) and lse (b*g, r, i), both in the accumulation dtype (lse +inf: no key).

    `out` stays in the accumulation dtype because the backward's D = rowsum(dout * out) cancels heavily:
    from a float16/bfloat16-rounded out it put dk off by 12% in a bfloat16 property case (d=2, scale=1.5).
    """
    qg, kk, vv = plan.split(q, k, v)
    g, r, acc = plan.g, plan.r, plan.acc
    out = torch.empty(plan.b * g, r, plan.i, plan.e, dtype=acc, device=q.device)
    lse = torch.empty(plan.b * g, r, plan.i, dtype=acc, device=q.device)
    for bs in plan.batches():
        gs = slice(bs.start * g, bs.stop * g)
        kb, vb = kk[gs], vv[gs]
        for r0, r1 in plan.query_tiles():
            qt = plan.q_tile_of(qg, bs, r0, r1)
            rows = qt.shape[1]
            m = torch.full((qt.shape[0], rows), _NEG_INF, dtype=acc, device=q.device)
            l = torch.zeros_like(m)
            o = torch.zeros(qt.shape[0], rows, plan.e, dtype=acc, device=q.device)
            first = True
            ref, shifted = torch.zeros_like(m), False  # lazy path: exp is taken against `ref`, see _LAZY
            for c0, c1, crosses in plan.key_tiles(r0, r1):
                if plan.lazy:
                    s, _ = plan.scores(qt, kb, bs, r0, r1, c0, c1, crosses, shift=ref[..., None] if shifted else None)
                    t = s.amax(dim=-1) + ref  # the tile's row max, absolute
                    m = t if first else torch.maximum(m, t)
                    # move a row's reference only when its running max leaves [ref + LO, ref + HI]: usually
                    # never after the first tile, which saves the subtract pass and the rescale of o
                    move = torch.isfinite(m) & ((m > ref + _LAZY[1]) | (m < ref + _LAZY[0]))
                    if bool(move.any()):
                        new_ref = torch.where(move, m, ref)
                        delta = new_ref - ref
                        s.sub_(delta[..., None])
                        if not first:
                            factor = delta.neg_().exp_()
                            l.mul_(factor)
                            o.mul_(factor[..., None])
                        ref, shifted = new_ref, True
                    p = s.exp_()
                    alpha = None
                else:
                    s, _ = plan.scores(qt, kb, bs, r0, r1, c0, c1, crosses)
                    m_new = s.amax(dim=-1) if first else torch.maximum(m, s.amax(dim=-1))
                    # a row with nothing visible so far has max -inf: subtract 0 so exp gives 0, not NaN
                    m_safe = m_new.masked_fill(m_new == _NEG_INF, 0.0) if plan.may_be_empty else m_new
                    p = s.sub_(m_safe[..., None]).exp_()
                    alpha = None if first else (m - m_safe).exp_()
                    m, ref = m_new, m_safe
                if plan.dropout_p > 0:
                    keep = plan.keep(p.shape, bs, r0, c0)
                if first:
                    # nothing to rescale yet: write l and o instead of scaling zeros (two fewer passes)
                    l = p.sum(dim=-1)
                    if plan.dropout_p > 0:
                        p.mul_(keep)  # 1 / (1 - p) is applied once, at the end
                    o = torch.bmm(p.to(plan.mm), vb[:, c0:c1])
                    o = o if o.dtype == acc else o.to(acc)
                else:
                    if alpha is not None:
                        l.mul_(alpha)
                        o.mul_(alpha[..., None])
                    l.add_(p.sum(dim=-1))
                    if plan.dropout_p > 0:
                        p.mul_(keep)
                    _add_bmm(o, p.to(plan.mm), vb[:, c0:c1])
                first = False
            alive = l > 0
            o.div_(torch.where(alive, l, torch.ones_like(l))[..., None])
            if plan.dropout_p > 0:
                o.mul_(1.0 / (1.0 - plan.dropout_p))
            # p was exp(s - ref) with ref = the (lazy) reference or the running max: lse = ref + log(l)
            base = ref.masked_fill(~alive, 0.0)
            lse_t = torch.where(alive, base + torch.log(torch.where(alive, l, torch.ones_like(l))), math.inf)
            out[gs, :, r0:r1] = o.view(-1, r, r1 - r0, plan.e)
            lse[gs, :, r0:r1] = lse_t.view(-1, r, r1 - r0)
    return out, lse


def _backward(plan: _Plan, dout: Tensor, q, k, v, out: Tensor, lse: Tensor, bias_grad: bool):
    """dq (b*g, r, i, d), dk (b*g, j, d), dv (b*g, j, e) in the accumulation dtype, and dbias (bias's
    shape) or None. Recomputes p = exp(s - lse) tile by tile (FlashAttention-2)."""
    qg, kk, vv = plan.split(q, k, v)
    g, r, acc = plan.g, plan.r, plan.acc
    dog = dout.reshape(plan.b * g, r, plan.i, plan.e)
    # D = rowsum(dout * out) = rowsum(p * dp): the softmax backward's correction term, dropout included
    delta = (dog.to(acc) * out.reshape(dog.shape).to(acc)).sum(dim=-1)
    dq = torch.zeros(plan.b * g, r, plan.i, plan.d, dtype=acc, device=q.device)
    dk = torch.zeros(plan.b * g, plan.j, plan.d, dtype=acc, device=q.device)
    dv = torch.zeros(plan.b * g, plan.j, plan.e, dtype=acc, device=q.device)
    dbias = torch.zeros(plan.bias5.shape, dtype=acc, device=q.device) if bias_grad else None
    keep_scale = 1.0 / (1.0 - plan.dropout_p)
    for bs in plan.batches():
        gs = slice(bs.start * g, bs.stop * g)
        kb, vb, dkb, dvb = kk[gs], vv[gs], dk[gs], dv[gs]
        for r0, r1 in plan.query_tiles():
            n = r1 - r0
            qt = plan.q_tile_of(qg, bs, r0, r1)
            dot = dog[gs, :, r0:r1].to(plan.mm).reshape(-1, r * n, plan.e)
            lse_t = lse[gs, :, r0:r1].reshape(-1, r * n, 1)
            delta_t = delta[gs, :, r0:r1].reshape(-1, r * n, 1)
            dqt = torch.zeros(qt.shape[0], r * n, plan.d, dtype=acc, device=q.device)
            for c0, c1, crosses in plan.key_tiles(r0, r1):
                s, drops = plan.scores(qt, kb, bs, r0, r1, c0, c1, crosses, shift=lse_t)
                p = s.exp_()  # a row with no key has lse = +inf: p = 0, so its grads are 0
                vt = vb[:, c0:c1].transpose(1, 2)
                if plan.dropout_p > 0:
                    dp = torch.bmm(dot, vt).to(acc)
                    keep = plan.keep(p.shape, bs, r0, c0)
                    pd = p * keep * keep_scale
                    dp.mul_(keep).mul_(keep_scale).sub_(delta_t)
                elif dot.dtype == acc:
                    dp = torch.baddbmm(delta_t.neg().expand(-1, -1, c1 - c0), dot, vt)  # dp - D in one pass
                    pd = p
                else:
                    dp = torch.bmm(dot, vt).to(acc).sub_(delta_t)
                    pd = p
                _add_bmm(dvb[:, c0:c1], pd.transpose(1, 2).to(plan.mm), dot)
                ds = dp.mul_(p)
                ds5 = ds.view(-1, g, r, n, c1 - c0)
                for drop in drops:
                    # p is 0 there, but dp may hold inf from garbage in masked values: 0 * inf is NaN
                    ds5.masked_fill_(drop, 0.0)
                if dbias is not None:
                    _accumulate_bias_grad(dbias, ds5, bs, r0, r1, c0, c1)
                dsm = ds.to(plan.mm)
                _add_bmm(dqt, dsm, kb[:, c0:c1])
                _add_bmm(dkb[:, c0:c1], dsm.transpose(1, 2), qt)  # qt carries the scale already
            dq[gs, :, r0:r1] = dqt.view(-1, r, n, plan.d)
    dq.mul_(plan.scale)
    return dq, dk, dv, dbias


def _accumulate_bias_grad(dbias: Tensor, ds5: Tensor, bs: slice, r0, r1, c0, c1) -> None:
    """dbias (b|1, g|1, r|1, i|1, j|1) += ds summed over the dims the bias broadcasts along."""
    dims = [axis for axis in range(5) if dbias.shape[axis] == 1 and ds5.shape[axis] != 1]
    part = ds5.sum(dim=dims, keepdim=True) if dims else ds5
    _tile_of(dbias, bs, slice(r0, r1), slice(c0, c1)).add_(part)


class _ChunkedFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bias, mask, causal, scale, dropout_p, seed, q_tile, k_tile):
        plan = _Plan(q, k, v, mask, bias, causal, scale, dropout_p, seed, q_tile, k_tile)
        out_acc, lse = _forward(plan, q, k, v)
        out_acc = out_acc.view(plan.b, plan.h, plan.i, plan.e)
        ctx.plan = plan
        # the accumulation-precision output for the backward's D (see `_forward`): for float16/bfloat16
        # inputs it costs one (b, h, i, e) float32 tensor, the size of the output, not of the scores
        ctx.save_for_backward(q, k, v, bias, mask, out_acc, lse)
        return out_acc.to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, bias, mask, out, lse = ctx.saved_tensors
        plan = ctx.plan
        if records_graph():
            # create_graph: the tile loop below is first-order only; recompute through the reference with
            # this call's own dropout keep-mask, so the gradients are exact and differentiable again
            inp = AttnInputs(q, k, v, mask=mask, bias=bias, causal=plan.causal, scale=plan.scale,
                             dropout_p=plan.dropout_p)
            keep = _dense_keep(plan) if plan.dropout_p > 0 else None
            grads = recompute_grads(inp, dout, tuple(ctx.needs_input_grad[:4]), keep)
            return (*grads, None, None, None, None, None, None, None)
        # the plan holds views of mask and bias; rebind them to the saved tensors (same storage)
        plan.mask5, plan.bias5 = _grouped(mask, plan.g), _grouped(bias, plan.g)
        bias_grad = bias is not None and ctx.needs_input_grad[3]
        dq, dk, dv, dbias = _backward(plan, dout, q, k, v, out, lse, bias_grad)
        b, h, g = plan.b, plan.h, plan.g
        dq = dq.view(b, h, plan.i, plan.d).to(q.dtype)
        dk = dk.view(b, g, plan.j, plan.d).to(k.dtype)
        dv = dv.view(b, g, plan.j, plan.e).to(v.dtype)
        if dbias is not None:
            dbias = dbias.reshape(bias.shape).to(bias.dtype)
        return dq, dk, dv, dbias, None, None, None, None, None, None, None


# main functions


def chunked_attention(
    inp: AttnInputs, *, q_tile: int | None = None, k_tile: int | None = None, seed: int | None = None
) -> Tensor:
    """Attention by tiles with an online softmax; differentiable with a tile-recomputing backward.

    q (b, h, i, d), k (b, g, j, d), v (b, g, j, e) -> (b, h, i, e) in q's dtype. Never holds more than one
    (batch slice, h, q_tile, k_tile) score tile. `seed` fixes the dropout mask (default: drawn from torch's
    default generator); `dropout_keep_mask(inp, seed, ...)` rebuilds that mask densely, for tests.
    """
    default_q, default_k = TILES.get(inp.device.type, TILES["cpu"])
    q_tile, k_tile = q_tile or default_q, k_tile or default_k
    if inp.dropout_p > 0 and seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    return _ChunkedFn.apply(
        inp.q, inp.k, inp.v, inp.bias, inp.mask, inp.causal, inp.scale, inp.dropout_p, seed or 0, q_tile, k_tile
    )


def dropout_keep_mask(inp: AttnInputs, seed: int, *, q_tile: int | None = None, k_tile: int | None = None) -> Tensor:
    """The dense bool (b, h, i, j) keep-mask `chunked_attention(inp, seed=seed)` applies (True = kept).

    Testing only: it materialises the (i, j) tensor the backend itself never builds. Tiles the backend
    skips (above the causal diagonal, all padding) are True; their probabilities are 0 anyway.
    """
    default_q, default_k = TILES.get(inp.device.type, TILES["cpu"])
    q_tile, k_tile = q_tile or default_q, k_tile or default_k
    plan = _Plan(inp.q, inp.k, inp.v, inp.mask, inp.bias, inp.causal, inp.scale, inp.dropout_p, seed, q_tile, k_tile)
    return _dense_keep(plan)


def _dense_keep(plan: _Plan) -> Tensor:
    """The plan's dropout keep-mask as one bool (b, h, i, j) tensor (tiles never visited stay True)."""
    keep = torch.ones(plan.b, plan.g, plan.r, plan.i, plan.j, dtype=torch.bool, device=plan.device)
    for bs in plan.batches():
        for r0, r1 in plan.query_tiles():
            for c0, c1, _ in plan.key_tiles(r0, r1):
                nb = bs.stop - bs.start
                tile = plan.keep((nb * plan.g, plan.r * (r1 - r0), c1 - c0), bs, r0, c0)
                keep[bs, :, :, r0:r1, c0:c1] = tile.view(nb, plan.g, plan.r, r1 - r0, c1 - c0)
    return keep.view(plan.b, plan.h, plan.i, plan.j)


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
        "cpu": Caps(dense_scores=False),
        "cuda": Caps(dense_scores=False),
        "mps": Caps(dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}), dense_scores=False),
    }

    def __init__(self, q_tile: int | None = None, k_tile: int | None = None, *, name: str | None = None):
        for label, size in (("q_tile", q_tile), ("k_tile", k_tile)):
            if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
                raise ValueError(f"expected `{label}` to be a positive int or None, got {size!r}")
        self.q_tile, self.k_tile = q_tile, k_tile
        if name is not None:
            self.name = name

    def run(self, inp: AttnInputs) -> Tensor:
        return chunked_attention(inp, q_tile=self.q_tile, k_tile=self.k_tile)

    def __repr__(self) -> str:
        return f"<attend backend {self.name!r} q_tile={self.q_tile} k_tile={self.k_tile}>"
