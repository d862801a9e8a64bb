"""The tile engine: the online-softmax (FlashAttention-2) forward and backward in pure PyTorch, memory
bounded by the tile. Shared by the `chunked` backend (`attend.backends.chunked`: one call, its autograd
Function) and context parallel attention (`attend.distributed`: one plan per block of keys in the ring).

Shape legend: b batch, h query heads, g key/value heads, i query positions, j key positions,
d head dim (q and k), e value head dim; here also r = h // g, the query heads per kv head.

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
never added to, so garbage in masked keys never reaches the softmax (contract item 3); a -inf bias entry
masks too, as in the reference (a key whose logit overflowed to inf must not give inf + -inf = NaN), and
the backward zeroes ds wherever the forward masked.

Dropout: `draw_seed` draws one seed per call from torch's default generator (so `torch.manual_seed` makes
it reproducible). Each keep-mask entry is a counter-based hash of (seed mod 2**32, batch, head, query
position, key position) (`dropout_row_keys`, `dropout_col_terms`, `dropout_keep`), so the backward
regenerates exactly the forward's mask without ever storing it, any tile sizes give the same mask, and the
ranks of context parallel attention (which pass their global positions) drop exactly what one process
would; `dense_keep` rebuilds it densely.

Under torch.compile the plan takes no branch on tensor values: the exact running max instead of the lazy
reference, every key padding tile masked instead of all-padding tiles skipped, the drawn seed kept as an
int32 tensor. With dynamic shapes a length guards only on its number of tiles (`_cuts`).

The pieces: `read_facts` (what a call may skip, read from tensor values once per call), `Plan` (what the
forward and the backward must agree on: tiles, skips, masks, seed), `forward`, `backward` and its tile loop
`backward_into` (adding into given accumulators: one block of keys' part of the gradients), `grouped` (a
mask or bias lined up with the folded heads).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ._helpers import accum_dtype, functorch_wrapped, one_op_thread, run_split, split_threads
from .masks import Structure

__all__ = [
    "MAX_TILE_BYTES",
    "NO_FACTS",
    "Facts",
    "Plan",
    "backward",
    "backward_into",
    "dense_keep",
    "draw_seed",
    "dropout_col_terms",
    "dropout_keep",
    "dropout_row_keys",
    "forward",
    "grouped",
    "read_facts",
]

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


_M32 = 0xFFFFFFFF


def _i32(x: int) -> int:
    """An unsigned 32-bit constant as the signed int32 torch multiplies with (two's complement wrap)."""
    x &= _M32
    return x - 2**32 if x >= 2**31 else x


def _fmix32(x: Tensor) -> Tensor:
    """murmur3's 32-bit finaliser of an int32 tensor (the bits of unsigned 32-bit ints)."""
    # `>>` on int32 is arithmetic: mask the sign bits back out to get murmur3's logical shifts
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * _i32(0x85EBCA6B)
    x = x ^ ((x >> 13) & 0x7FFFF)
    x = x * _i32(0xC2B2AE35)
    return x ^ ((x >> 16) & 0xFFFF)


def dropout_row_keys(seed: int | Tensor, b0: int, b1: int, h: int, rows: Tensor) -> Tensor:
    """The 32-bit key of each (batch, head, query position) row of the dropout keep-mask: (b1 - b0, h, n) int32,
    a chain of murmur3 finalisers over the seed (only its value mod 2**32 counts), the batch index in [b0, b1),
    the head in [0, h) and the row's position (`rows`, (n,) integers). A tensor seed (torch.compile: no host
    read) gives the same bits."""
    dev = rows.device
    if isinstance(seed, Tensor):
        s: int | Tensor = seed * _i32(0x9E3779B1)  # int32 arithmetic wraps like `& _M32`
    else:
        s = _i32(seed * 0x9E3779B1)
    x = _fmix32(torch.arange(b0, b1, dtype=torch.int32, device=dev) * _i32(0x27D4EB2F) + s)
    x = _fmix32(x[:, None] + torch.arange(h, dtype=torch.int32, device=dev) * _i32(0xC2B2AE3D))
    return _fmix32(x[..., None] + rows.to(torch.int32) * _i32(0x85EBCA77))


def dropout_col_terms(cols: Tensor) -> Tensor:
    """(n,) int32: what each key position adds to its row's key before the last finaliser."""
    return cols.to(torch.int32) * _i32(0x9E3779B1)


def dropout_keep(row_keys: Tensor, col_terms: Tensor, p: float) -> Tensor:
    """Bool keep-mask: row_keys (..., n, 1) int32 (`dropout_row_keys`) and col_terms (c,) (`dropout_col_terms`)
    -> (..., n, c).

    Each entry is a pure function of (seed mod 2**32, batch, head, query position, key position), whatever
    tiles the backend cuts: the same mask with any tile sizes, in the backward (regenerated, never stored) and
    across the ranks of context parallel attention. A counter-based hash in int32 tensor ops (murmur3's
    finaliser of row key + key term): about 6x cheaper on CPU than drawing `torch.rand` from a freshly seeded
    generator per tile. The low 24 bits are uniform: keep iff they are >= p * 2**24.
    """
    x = row_keys + col_terms
    # `>>` on int32 is arithmetic: mask the sign bits back out to get murmur3's logical shifts
    x.bitwise_xor_(x.bitwise_right_shift(16).bitwise_and_(0xFFFF)).mul_(_i32(0x85EBCA6B))
    x.bitwise_xor_(x.bitwise_right_shift(13).bitwise_and_(0x7FFFF)).mul_(_i32(0xC2B2AE35))
    x.bitwise_xor_(x.bitwise_right_shift(16).bitwise_and_(0xFFFF))
    return x.bitwise_and_(0xFFFFFF).ge(round(p * 2**24))


def draw_seed() -> int | Tensor:
    """A dropout seed from torch's default generator: a Python int in eager; an int32 tensor where its value
    cannot be read (while torch.compile traces: no host read, so no graph break; under torch.func.vmap with
    randomness="different": one seed per vmapped element). All come from the same draw, so with the same
    generator state (`torch.manual_seed`; aot_eager) eager and compiled calls drop the same entries."""
    drawn = torch.randint(-(2**31), 2**31, (), dtype=torch.int64)
    return int(drawn) if _values_readable(drawn) else drawn.to(torch.int32)


def _values_readable(t: Tensor) -> bool:
    """Can Python read t's values here (a host branch)? Not while torch.compile traces, nor through a
    torch.func wrapper (vmap's batched tensors), nor for fake and meta tensors."""
    if torch.compiler.is_compiling() or t.device.type == "meta" or functorch_wrapped(t):
        return False
    from torch._subclasses.fake_tensor import FakeTensor

    return not isinstance(t, FakeTensor)


class Facts(NamedTuple):
    """What a call may skip, read from tensor values once per call (`read_facts`) and shared by its forward
    and backward. The defaults skip nothing: that is what runs where values cannot be read."""

    pad_all: tuple[bool, ...] | None = None  # per key tile: the key padding mask is all True (not applied)
    pad_none: tuple[bool, ...] | None = None  # per key tile: all padding for every batch element (skipped)
    bias_inf: bool = True  # the bias may hold -inf: each tile masks those entries
    structure: Any = None  # masks.Structure: window / documents; the key tiles each query tile visits
    softcap: float | None = None  # logit soft-capping: s = c * tanh(s / c) on the scaled logits, before the bias
    deterministic: bool = False  # bit-for-bit repeatable: the loop is never split across threads (`_each`)


NO_FACTS = Facts()


def read_facts(mask: Tensor | None, bias: Tensor | None, j: int, k_tile: int) -> Facts:
    """The skips of one call. Key padding (b|1, 1, 1, j), per key tile: all True, or all False for every
    batch element. Bias: does it hold a -inf at all (one min, and only on CPU, where the host read is free;
    elsewhere every tile masks its -inf entries, one compare each)? Nothing is read while torch.compile
    traces, through torch.func wrappers, or from fake tensors: the defaults give the same result."""
    pad_all = pad_none = None
    if mask is not None and mask.shape[1] == 1 and mask.shape[2] == 1 and mask.shape[3] != 1 and _values_readable(mask):
        keys = mask.reshape(-1, j)
        if j <= k_tile:  # one key tile (short sequences, decoding): two reductions and one read
            every, some = torch.stack((keys.all(), keys.any())).tolist()
            pad_all, pad_none = (every,), (not some,)
        else:
            n_tiles = -(-j // k_tile)
            padded = keys.new_ones(keys.shape[0], n_tiles * k_tile)
            padded[:, :j] = keys
            per_tile = padded.view(keys.shape[0], n_tiles, k_tile)
            pad_all = tuple(per_tile.all(dim=2).all(dim=0).tolist())
            padded[:, j:] = False
            pad_none = tuple((~per_tile.any(dim=2)).all(dim=0).tolist())
    bias_inf = bias is not None
    if bias is not None and bias.device.type == "cpu" and bias.numel() > 0 and _values_readable(bias):
        bias_inf = bool(bias.amin() == _NEG_INF)
    return Facts(pad_all, pad_none, bias_inf)


def _add_bmm(acc: Tensor, a: Tensor, b: Tensor, fused: bool = True) -> None:
    """acc += a @ b, batched; a and b may be in a narrower matmul dtype than the accumulator (GPUs).
    `fused=False`: never `baddbmm_` (torch.func.vmap has no batching rule for it and loops, torch 2.13)."""
    # baddbmm_ into a strided slice (dk[:, c0:c1] with b*g > 1) falls back to one addmm_ per batch entry
    # (torch 2.13, CPU): b*g small matmuls instead of one; a bmm and an add are cheaper
    if fused and a.dtype == acc.dtype and acc.is_contiguous():
        acc.baddbmm_(a, b)
    else:
        acc.add_(torch.bmm(a, b))


def _cuts(n: int, step: int) -> list[tuple[int, int]]:
    """[start, stop) tiles of range(n), `step` long but the last. Under torch.compile with dynamic shapes n
    is symbolic: the count guards on n's number of tiles, not on its value (no recompile per length), and
    no min() enters the tile sizes (linear expressions keep the symbolic shape reasoning cheap)."""
    count = (n + step - 1) // step
    return [(t * step, n if t == count - 1 else (t + 1) * step) for t in range(count)]


def grouped(t: Tensor | None, g: int, r: int) -> Tensor | None:
    """(b|1, h|1, i|1, j|1) -> (b|1, g|1, r|1, i|1, j|1): lines masks and bias up with the folded heads."""
    if t is None:
        return None
    if t.shape[1] == 1:
        return t[:, :, None]
    return t.unflatten(1, (g, r))


def _tile_of(t5: Tensor, bs: slice, rows: slice, cols: slice) -> Tensor:
    """Slice a grouped mask or bias to one tile, leaving its broadcast (size-1) dims alone."""
    if t5.shape[0] != 1:
        t5 = t5[bs]
    if t5.shape[3] != 1:
        t5 = t5[:, :, :, rows]
    if t5.shape[4] != 1:
        t5 = t5[..., cols]
    return t5


class Plan:
    """Everything the forward and the backward must agree on: tiles, skips, masks, seed.

    `facts` (`read_facts`) is read once per call by the caller and shared by forward and backward. While
    torch.compile traces, the plan takes no branch on tensor values (exact running max instead of the lazy
    reference, every tile masked, the seed as a tensor) and keeps no per-shape caches (sizes are symbolic).
    """

    def __init__(
        self, q, k, v, mask, bias, causal, scale, dropout_p, seed, q_tile, k_tile, facts=NO_FACTS, rows=None, col0=0
    ):
        self.b, self.h, self.i, self.d = q.shape
        self.g, self.j, self.e = k.shape[1], k.shape[2], v.shape[3]
        self.r = self.h // self.g
        self.tracing = torch.compiler.is_compiling()
        if self.tracing:
            # dynamic shapes: a symbolic h // g in every folded view made tracing about 3x slower (torch 2.13).
            # Count r up instead: the guard h == g * r that ends the loop becomes the substitution h -> g * r,
            # so every shape below is a product of symbols (r, the heads per kv head, recompiles if it changes)
            r = 1
            while r < self.h and self.h != self.g * r:
                r += 1
            self.r = r
        self.causal, self.scale, self.dropout_p, self.seed = causal, scale, dropout_p, seed
        self.q_tile, self.k_tile = q_tile, k_tile
        self.offset = self.j - self.i  # causal: query x sees key y iff y <= x + offset
        self.device = q.device
        self.acc = accum_dtype(q.dtype)
        # CPU matmuls in half precision are slow and round the logits: run them in float32. On GPUs the
        # tensor cores take the input dtype and accumulate in float32 themselves.
        self.mm = self.acc if q.device.type == "cpu" or q.dtype == torch.float64 else q.dtype
        self.mask5 = grouped(mask, self.g, self.r)
        self.bias5 = grouped(bias, self.g, self.r)
        # can a row's running max be -inf (nothing visible in a tile)? Only with a mask, causal or a bias
        self.may_be_empty = mask is not None or bias is not None or causal
        # the lazy reference moves on a host branch (`bool(move.any())`): traced code keeps the exact max
        self.lazy = self.mm == self.acc and not self.tracing
        step = MAX_TILE_BYTES // (self.h * q_tile * k_tile * 4)
        self.batch_step = self.b if step >= self.b else max(step, 1)
        self._causal_tiles: dict[tuple[int, int, int], Tensor] = {}
        # dropout: the keep-mask's coordinates of the query rows ((i,) integers; None: 0..i-1) and of key 0
        # (context parallel: global positions), and the last tile's row keys and the key tiles' terms
        self.drop_rows: Tensor | None = rows
        self.drop_col0 = col0
        self._row_keys: tuple[tuple[int, int, int], Tensor] | None = None
        self._col_terms: dict[tuple[int, int], Tensor] = {}
        self.pad_all, self.pad_none = facts.pad_all, facts.pad_none
        self.bias_inf = facts.bias_inf and bias is not None
        self.structure: Structure | None = facts.structure
        self.softcap = facts.softcap
        self.deterministic = facts.deterministic
        if self.structure is not None:
            self.may_be_empty = True

    def batches(self):
        for b0, b1 in _cuts(self.b, self.batch_step):
            yield slice(b0, b1)

    def query_tiles(self):
        yield from _cuts(self.i, self.q_tile)

    def key_tiles(self, r0: int, r1: int):
        """Key tiles the query rows [r0, r1) can see: (c0, c1, the tile needs its causal or structure mask)."""
        if self.structure is not None:
            # window / documents: only the tiles between the first and last key a row here may see, on the
            # key-tile grid (the padding facts are per grid tile); masked unless every row sees every key
            lo, hi, full_lo, full_hi = self.structure.rows(r0, r1)
            start = (lo // self.k_tile) * self.k_tile
            for c0 in range(start, hi, self.k_tile):
                c1 = min(c0 + self.k_tile, self.j)
                if self.pad_none is not None and self.pad_none[c0 // self.k_tile]:
                    continue
                yield c0, c1, self.tracing or not (full_lo <= c0 and c1 <= full_hi)
            return
        hi = self.j
        if self.causal:
            hi = r1 + self.offset  # keys beyond the last row's diagonal: skipped
            hi = self.j if hi > self.j else (0 if hi < 0 else hi)
        for t, (c0, c1) in enumerate(_cuts(hi, self.k_tile)):
            if self.pad_none is not None and self.pad_none[t]:
                continue  # every key here is padding for every batch element
            # traced: mask every causal tile rather than branch on symbolic sizes (a guard each)
            crosses = self.causal and (self.tracing or c1 - 1 > r0 + self.offset)
            yield c0, c1, crosses

    def causal_drop(self, r0: int, r1: int, c0: int, c1: int) -> Tensor:
        """Bool (tq, tk), True where causality forbids; shared by all tiles with the same geometry."""
        key = (r1 - r0, c1 - c0, r0 + self.offset - c0)
        drop = None if self.tracing else self._causal_tiles.get(key)
        if drop is None:
            # key y is dropped for query x iff y > x + key[2]: the part above diagonal key[2] + 1
            drop = torch.ones(r1 - r0, c1 - c0, dtype=torch.bool, device=self.device).triu_(key[2] + 1)
            if not self.tracing:
                self._causal_tiles[key] = drop
        return drop

    def scores(
        self, qt: Tensor, kk: Tensor, bs: slice, r0, r1, c0, c1, crosses, shift: Tensor | None = None
    ) -> tuple[Tensor, list[Tensor], Tensor | None]:
        """Logits of one tile in the accumulation dtype, minus `shift` (nb*g, r*tq, 1) if given, masked
        to -inf; the drop masks applied; and with soft-capping tanh(raw / softcap) (the backward's derivative
        1 - tanh^2 comes from it without a second matmul), else None.

        qt: (nb*g, r*tq, d) already scaled; kk: (nb*g, j, d). Returns s: (nb*g, r*tq, tk).
        """
        kt = kk[:, c0:c1].transpose(1, 2)
        tanh = None
        if self.softcap is not None:
            # capped before the shift, the bias and the masks: the shift cannot ride on the matmul here
            raw = torch.bmm(qt, kt)
            tanh = (raw.to(self.acc) if raw.dtype != self.acc else raw).div_(self.softcap).tanh_()
            s = tanh * self.softcap
            if shift is not None:
                s.sub_(shift)
        elif shift is not None and qt.dtype == self.acc:
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
        drops = []
        if self.bias5 is not None:
            bias_t = _tile_of(self.bias5, bs, rows, cols)
            s5.add_(bias_t)
            if self.bias_inf:
                # a -inf bias is a mask, as in the reference: a logit that overflowed to inf at such a key
                # would otherwise give inf + -inf = NaN. One compare on the bias tile (often smaller than
                # the scores); skipped on CPU when the bias holds no -inf at all (see `read_facts`)
                drops.append(bias_t == _NEG_INF)
        if self.mask5 is not None and not (self.pad_all is not None and self.pad_all[c0 // self.k_tile]):
            drops.append(~_tile_of(self.mask5, bs, rows, cols))
        if crosses and self.structure is not None:
            keep = self.structure.keep(rows, cols)  # (b|1, 1, tq, tk)
            if keep.shape[0] != 1:
                keep = keep[bs]
            drops.append(~keep[:, :, None])
        elif crosses:
            drops.append(self.causal_drop(r0, r1, c0, c1))
        for drop in drops:
            # masked_fill, not an add: a garbage (even inf) logit at a masked key never reaches the softmax
            s5.masked_fill_(drop, _NEG_INF)
        return s, drops, tanh

    def keep_rows(self, bs: slice, r0: int, r1: int) -> Tensor:
        """Row keys of the dropout keep-mask (nb, h, r1 - r0) for the batch slice and query rows [r0, r1)."""
        if self.drop_rows is not None:
            rows = self.drop_rows[r0:r1]
        else:
            rows = torch.arange(r0, r1, dtype=torch.int32, device=self.device)
        return dropout_row_keys(self.seed, bs.start, bs.stop, self.h, rows)

    def keep_cols(self, c0: int, c1: int) -> Tensor:
        """Key terms of the dropout keep-mask (c1 - c0,) for the keys [c0, c1)."""
        start = self.drop_col0 + c0
        return dropout_col_terms(torch.arange(start, start + (c1 - c0), dtype=torch.int32, device=self.device))

    def keep(self, bs: slice, r0: int, r1: int, c0: int, c1: int) -> Tensor:
        """Bool (nb*g, r*(r1 - r0), c1 - c0): the dropout keep-mask of one tile (True = kept), see `dropout_keep`."""
        nbg, rows = (bs.stop - bs.start) * self.g, self.r * (r1 - r0)
        if self.tracing:
            row_keys, col_terms = self.keep_rows(bs, r0, r1), self.keep_cols(c0, c1)
        else:  # the row keys are reused across a query tile's key tiles, the key terms across query tiles
            where = (bs.start, r0, r1)
            held = self._row_keys  # read once: another thread of the split (`_each`) may replace it
            if held is None or held[0] != where:
                held = self._row_keys = (where, self.keep_rows(bs, r0, r1))
            row_keys = held[1]
            cached = self._col_terms.get((c0, c1))
            col_terms = cached if cached is not None else self._col_terms.setdefault((c0, c1), self.keep_cols(c0, c1))
        return dropout_keep(row_keys.view(nbg, rows, 1), col_terms, self.dropout_p)

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
        # explicit sizes, no -1: under dynamic shapes an inferred size is a symbolic division
        return qt.to(self.mm).reshape((bs.stop - bs.start) * self.g, self.r * (r1 - r0), self.d)


def forward(
    plan: Plan, q: Tensor, k: Tensor, v: Tensor, out: Tensor | None = None, lse: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """out (b*g, r, i, e) and lse (b*g, r, i), both in the accumulation dtype (lse +inf: no key); written into
    `out` and `lse` when given (views of the caller's buffers: context parallel's ring reuses one per call).

    `out` stays in the accumulation dtype because the backward's D = rowsum(dout * out) cancels heavily:
    from a float16/bfloat16-rounded out it put dk off by 12% in a bfloat16 property case (d=2, scale=1.5).
    """
    qg, kk, vv = plan.split(q, k, v)
    g, r, acc = plan.g, plan.r, plan.acc
    if out is None:
        out = torch.empty(plan.b * g, r, plan.i, plan.e, dtype=acc, device=q.device)
    if lse is None:
        lse = torch.empty(plan.b * g, r, plan.i, dtype=acc, device=q.device)

    def one(bs: slice, r0: int, r1: int) -> None:
        gs = slice(bs.start * g, bs.stop * g)
        kb, vb = kk[gs], vv[gs]
        nbg = (bs.stop - bs.start) * g
        qt = plan.q_tile_of(qg, bs, r0, r1)
        rows = qt.shape[1]
        # m, l, o are written by the first key tile (a row range that sees no key tile at all keeps l = 0)
        m = l = o = torch.zeros(nbg, rows, dtype=acc, device=q.device)  # noqa: E741 - l: the papers' running row sum
        first = True
        ref, shifted = m, False  # lazy path: exp is taken against `ref`, see _LAZY
        for c0, c1, crosses in plan.key_tiles(r0, r1):
            if plan.lazy:
                shift = ref[..., None] if shifted else None
                s, _, _ = plan.scores(qt, kb, bs, r0, r1, c0, c1, crosses, shift=shift)
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
                s, _, _ = plan.scores(qt, kb, bs, r0, r1, c0, c1, crosses)
                m_new = s.amax(dim=-1) if first else torch.maximum(m, s.amax(dim=-1))
                # a row with nothing visible so far has max -inf: subtract 0 so exp gives 0, not NaN
                m_safe = m_new.masked_fill(m_new == _NEG_INF, 0.0) if plan.may_be_empty else m_new
                p = s.sub_(m_safe[..., None]).exp_()
                alpha = None if first else (m - m_safe).exp_()
                m, ref = m_new, m_safe
            if plan.dropout_p > 0:
                keep = plan.keep(bs, r0, r1, c0, c1)
            if first:
                # nothing to rescale yet: write l and o instead of scaling zeros (two fewer passes)
                l = p.sum(dim=-1)  # noqa: E741
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
        if first:  # no key tile visible to these rows (causal, i > j): output 0
            o = torch.zeros(nbg, rows, plan.e, dtype=acc, device=q.device)
        alive = l > 0
        l_safe = torch.where(alive, l, 1.0)
        o.div_(l_safe[..., None])
        if plan.dropout_p > 0:
            o.mul_(1.0 / (1.0 - plan.dropout_p))
        # p was exp(s - ref) with ref = the (lazy) reference or the running max, finite on every row
        # (0 where nothing was visible): lse = ref + log(l), +inf on a row with no key
        lse_t = torch.where(alive, ref + l_safe.log_(), math.inf)
        out[gs, :, r0:r1] = o.view(nbg, r, r1 - r0, plan.e)
        lse[gs, :, r0:r1] = lse_t.view(nbg, r, r1 - r0)

    _each(plan, q, one)
    return out, lse


def backward(
    plan: Plan, dout: Tensor, q, k, v, out: Tensor, lse: Tensor, bias_grad: bool, dlse: Tensor | None = None
):
    """dq (b*g, r, i, d), dk (b*g, j, d), dv (b*g, j, e) in the accumulation dtype, and dbias (bias's
    shape) or None. Recomputes p = exp(s - lse) tile by tile (FlashAttention-2). `dlse` (b, h, i): the gradient
    of the log-sum-exp output, where the caller returned it: d lse_i / d s_ij = p_ij, so it enters as
    ds = p * (dp - (D - dlse)), one subtraction from D."""
    qg, kk, vv = plan.split(q, k, v)
    g, r, acc = plan.g, plan.r, plan.acc
    dog = dout.reshape(plan.b * g, r, plan.i, plan.e)
    lse = lse.reshape(plan.b * g, r, plan.i)
    ways = _loop_ways(plan, dout)  # (read here: inside one_op_thread the thread count is 1)

    def run() -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        # D = rowsum(dout * out) = rowsum(p * dp): the softmax backward's correction term, dropout included
        delta = (dog.to(acc) * out.reshape(dog.shape).to(acc)).sum(dim=-1)
        if dlse is not None:
            delta = delta - dlse.reshape(delta.shape).to(acc)
        # accumulators from dout: under torch.func.vmap over the cotangent (jacrev) they are batched like it,
        # so the in-place accumulation below stays legal (a plain zeros tensor cannot take a batched add)
        dq = dout.new_zeros(plan.b * g, r, plan.i, plan.d, dtype=acc)
        dk = dout.new_zeros(plan.b * g, plan.j, plan.d, dtype=acc)
        dv = dout.new_zeros(plan.b * g, plan.j, plan.e, dtype=acc)
        dbias = dout.new_zeros(plan.bias5.shape, dtype=acc) if bias_grad else None
        backward_into(plan, dog, qg, kk, vv, lse, delta, dq, dk, dv, dbias, accumulate_dq=False, ways=ways)
        return dq.mul_(plan.scale), dk, dv, dbias

    # the loop split on a busy CPU: its serial steps single-threaded too (never while tracing: ways is 1 there)
    return one_op_thread(run) if ways > 1 else run()


def backward_into(
    plan: Plan,
    dog: Tensor,
    qg: Tensor,
    kk: Tensor,
    vv: Tensor,
    lse: Tensor,
    delta: Tensor,
    dq: Tensor,
    dk: Tensor,
    dv: Tensor,
    dbias: Tensor | None,
    accumulate_dq: bool = True,
    ways: int | None = None,
) -> None:
    """The tile loop of `backward`, adding into given accumulators (in the accumulation dtype): dk (b*g, j, d),
    dv (b*g, j, e), dbias (the plan's grouped bias shape) always add; dq (b*g, r, i, d) adds too, *unscaled*
    (the caller multiplies by `plan.scale` once), or is overwritten with `accumulate_dq=False` (`backward`).

    dog (b*g, r, i, e), lse and delta (b*g, r, i): the output gradient, the log-sum-exp and D = rowsum(dout *
    out) of the *whole* attention, so a plan over one block of keys gives exactly that block's part of the
    gradients (context parallel's ring backward runs one plan per key block); qg, kk, vv from `plan.split`.
    `ways`: the threads the loop runs on (None: as `split_ways` says for it)."""
    g, r, acc = plan.g, plan.r, plan.acc
    fused = plan.tracing or not functorch_wrapped(dog)  # vmapped cotangent (jacrev): no baddbmm_, see _add_bmm
    keep_scale = 1.0 / (1.0 - plan.dropout_p)

    def one(bs: slice, r0: int, r1: int, into: tuple[Tensor, Tensor, Tensor | None]) -> None:
        dk_, dv_, dbias_ = into  # this thread's accumulators (`_each`)
        gs = slice(bs.start * g, bs.stop * g)
        kb, vb, dkb, dvb = kk[gs], vv[gs], dk_[gs], dv_[gs]
        nbg = (bs.stop - bs.start) * g
        n = r1 - r0
        qt = plan.q_tile_of(qg, bs, r0, r1)
        dot = dog[gs, :, r0:r1].to(plan.mm).reshape(nbg, r * n, plan.e)
        lse_t = lse[gs, :, r0:r1].reshape(nbg, r * n, 1)
        delta_t = delta[gs, :, r0:r1].reshape(nbg, r * n, 1)
        dqt = dog.new_zeros(nbg, r * n, plan.d, dtype=acc)
        for c0, c1, crosses in plan.key_tiles(r0, r1):
            s, drops, tanh = plan.scores(qt, kb, bs, r0, r1, c0, c1, crosses, shift=lse_t)
            p = s.exp_()  # a row with no key has lse = +inf: p = 0, so its grads are 0
            vt = vb[:, c0:c1].transpose(1, 2)
            if plan.dropout_p > 0:
                dp = torch.bmm(dot, vt).to(acc)
                keep = plan.keep(bs, r0, r1, c0, c1)
                pd = p * keep * keep_scale
                dp.mul_(keep).mul_(keep_scale).sub_(delta_t)
            elif dot.dtype == acc:
                dp = torch.baddbmm(delta_t.neg().expand(-1, -1, c1 - c0), dot, vt)  # dp - D in one pass
                pd = p
            else:
                dp = torch.bmm(dot, vt).to(acc).sub_(delta_t)
                pd = p
            _add_bmm(dvb[:, c0:c1], pd.transpose(1, 2).to(plan.mm), dot, fused)
            ds = dp.mul_(p)
            ds5 = ds.view(bs.stop - bs.start, g, r, n, c1 - c0)
            for drop in drops:
                # p is 0 there, but dp may hold inf from garbage in masked values: 0 * inf is NaN
                ds5.masked_fill_(drop, 0.0)
            if dbias_ is not None:
                _accumulate_bias_grad(dbias_, ds5, bs, r0, r1, c0, c1)
            if tanh is not None:
                # through the cap: d(c tanh(x / c)) / dx = 1 - tanh(x / c)^2 (masked keys again after: garbage
                # there may make it NaN, and ds is 0 there)
                ds = ds.mul_(tanh.square_().neg_().add_(1.0))
                for drop in drops:
                    ds.view(ds5.shape).masked_fill_(drop, 0.0)
            dsm = ds.to(plan.mm)
            _add_bmm(dqt, dsm, kb[:, c0:c1], fused)
            _add_bmm(dkb[:, c0:c1], dsm.transpose(1, 2), qt, fused)  # qt carries the scale already
        if accumulate_dq:
            dq[gs, :, r0:r1] += dqt.view(nbg, r, n, plan.d)
        else:
            dq[gs, :, r0:r1] = dqt.view(nbg, r, n, plan.d)

    _each(plan, dog, one, (dk, dv, dbias), ways)


# The split of a tile loop across threads (a busy CPU): each (batch slice, query tile) of a loop is independent
# (its rows of out / lse / dq are its own; the backward's dk, dv, dbias are sums), so `_helpers.run_split` deals
# the units to `torch.get_num_threads()` threads, each running its ops with one intra-op thread (why:
# `_helpers.run_split`). Causal: later query tiles see more keys, so the units go in order of cost.

_SPLIT_MIN_UNITS = 2


def split_ways(plan: Plan, like: Tensor, units: int) -> int:
    """How many threads a loop of `units` units runs on (1: in the caller's thread, ops parallel inside)."""
    if plan.tracing or units < _SPLIT_MIN_UNITS or plan.device.type != "cpu":
        return 1
    return split_threads(like, units, plan.deterministic, plan.b * plan.h * plan.i * plan.j * plan.d)


def _units(plan: Plan) -> list[tuple[slice, int, int]]:
    return [(bs, r0, r1) for bs in plan.batches() for r0, r1 in plan.query_tiles()]


def _loop_ways(plan: Plan, like: Tensor) -> int:
    """How many threads the plan's tile loop runs on (`split_ways` for its units)."""
    return split_ways(plan, like, len(_units(plan)))


def _each(plan: Plan, like: Tensor, fn, into: tuple | None = None, ways: int | None = None) -> None:
    """fn(bs, r0, r1[, into]) for every (batch slice, query tile) of the plan, split across `ways` threads (None:
    as `split_ways` says; `into`: the accumulators the units add into: dk, dv, dbias or None)."""
    units = _units(plan)
    run_split(units, fn, split_ways(plan, like, len(units)) if ways is None else ways, into)


def _accumulate_bias_grad(dbias: Tensor, ds5: Tensor, bs: slice, r0, r1, c0, c1) -> None:
    """dbias (b|1, g|1, r|1, i|1, j|1) += ds summed over the dims the bias broadcasts along."""
    dims = [axis for axis in range(5) if dbias.shape[axis] == 1 and ds5.shape[axis] != 1]
    part = ds5.sum(dim=dims, keepdim=True) if dims else ds5
    _tile_of(dbias, bs, slice(r0, r1), slice(c0, c1)).add_(part)


def dense_keep(plan: Plan) -> Tensor:
    """The plan's dropout keep-mask as one bool (b, h, i, j) tensor."""
    whole = slice(0, plan.b)
    row_keys = plan.keep_rows(whole, 0, plan.i)  # (b, h, i)
    return dropout_keep(row_keys[..., None], plan.keep_cols(0, plan.j), plan.dropout_p)
