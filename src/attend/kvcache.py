"""`with_kvcache`: attention over a KV cache for decoding, with in-place append (flash-attn's
`flash_attn_with_kvcache`, on every device), and `explain_kvcache`, which says how a call runs.

Shape legend: b batch, h query heads, g key/value heads, i query positions, j key positions, d head dim (q and
k), e value head dim; here also r = h // g (query heads per key/value head), cap the cache capacity (max_len,
or max_blocks * block_size for a paged cache), L_b the keys row b attends.

    q (b, h, i, d)   k_cache (b, g, cap, d)   v_cache (b, g, cap, e)   cache_seqlens (b,) int32
    paged:           k_cache (num_blocks, g, block_size, d)   v_cache (num_blocks, g, block_size, e)
                     block_table (b, max_blocks) int32: row b's logical key t is in page block_table[b, t // block_size]
    k, v (b, g, i, d|e): new keys/values, written in place at cache positions cache_seqlens[b] .. + i - 1

Two paths, one semantics (the `einsum` reference's, over each row's first L_b cache positions):

* the decode kernel (CPU, no grad, r * i <= `DECODE_ROWS`, d == e, no named backend): the r query heads that share
  a key/value head are folded into rows, q (b, g, r * i, d), so each cache head is read once (SDPA with
  enable_gqa reads it r times), by PyTorch's CPU flash kernel (float32 softmax statistics) on views of the cache:
  nothing is copied. Only the keys some query may see are read ([L_b - i - left, L_b) with a window). Rows of one
  length run as one call (rows x key/value heads as the kernel's head dim), ragged rows one call each on their
  own slices. Rows of 8k keys and more are split into chunks of about 4k keys, the chunks as the kernel's batch
  dim, merged by log-sum-exp in float32 (split-KV: the kernel streams a few shorter key ranges faster than one
  long one). A paged cache is read in place: the full pages in use, sorted by pool id and cut into at most 8
  spans of the pool, are the kernel's batch dim (one call per span; a page per batch element, each row's query
  repeated on its pages); partial pages (a row's last page, window edges) and shared pages go into one gathered,
  masked call; everything merges per row by log-sum-exp.
* the dispatch path (otherwise, or `backend="name"`): the same attention as attend inputs over the cache,
  keys k_cache[:, :, :max L_b] (pages gathered), each query's diagonal at q_pos = L_b - i + t (attend's
  `AttnInputs.q_pos`), a key padding mask for keys past L_b where causality does not already hide them, run by
  `attend.dispatch.run`: every backend, mask, bias, window and the NaN/inf guarantees.

The decode kernel checks its small output, not the cache: a NaN or inf there (garbage in a cache position no
row may see, e.g. an uninitialised cache, that reached a row through a masked product) reruns the call on the
dispatch path, which is exact. `explain_kvcache` says which path, how many kernel calls and how pages are read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor

from ._helpers import accum_dtype, fmt_dtype, fmt_shape, no_autocast
from .backends import sdpa as sdpa_backend
from .dispatch import Report, explain_inputs, get_backend, output_is_finite, run, select
from .inputs import (
    FLOAT_DTYPES,
    AttnInputs,
    Options,
    broadcast_4d,
    check_options,
    check_sinks,
    check_tensor,
    describe,
    pages_in_use,
    sides,
    validate,
)
from .masks import apply_sinks, bias_as, interval
from .merge import merge

__all__ = ["with_kvcache", "explain_kvcache", "KVCachePlan", "DECODE_ROWS"]

# The decode kernel runs when r * i (query rows per key/value head) is at most this: decoding (i = 1) and
# speculative decoding (a few tokens). Longer chunks (chunked prefill) take the dispatch path, whose backends
# skip the causal blocks instead of building a (r * i, L) mask.
DECODE_ROWS = 64
# Split-KV on a contiguous cache (`_split`): rows with at least 2 * _SPLIT_MIN keys go in chunks of about
# _SPLIT_KEYS keys.
_SPLIT_KEYS = 4096
_SPLIT_MIN = 4096
# A paged cache is read in place, in at most _MAX_SPANS spans of the pool (pages as the kernel's batch dim), cut at
# the gaps of unused pages worth more than one kernel call (_CALL_BYTES, ~30 us of reads); the unused pages left
# inside the spans are read and dropped, unless they outnumber the used ones _MAX_WASTE times: then the pages are
# gathered first (one `index_select`, a copy).
_MAX_SPANS = 64
_CALL_BYTES = 1 << 20
_MAX_WASTE = 4
# Bound once at import, as in backends/sdpa.py: a user who monkeypatches `F.scaled_dot_product_attention` with
# attend's drop-in must not send the kernel call back into attend.
_sdpa = F.scaled_dot_product_attention


# helpers


def _tensor(name: str, t: Any, want: str, dims: int) -> Tensor:
    check_tensor(name, t, want)
    if t.dim() != dims:
        raise ValueError(f"expected `{name}` of shape {want}, got {describe(t)}")
    return t


def _ints(name: str, t: Any, want: str, device: torch.device) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"expected `{name}` to be an int32 torch.Tensor of shape {want}, got {describe(t)}")
    if t.dtype not in (torch.int32, torch.int64):
        raise TypeError(
            f"expected `{name}` of dtype int32 (int64 accepted), got {fmt_dtype(t.dtype)}; "
            f"hint: `{name}.to(torch.int32)`"
        )
    if t.device != device and t.device.type != "cpu":
        raise ValueError(f"expected `{name}` on {device} like q (or on the CPU), got {t.device}")
    return t


def _fold(t: Tensor | None, g: int, r: int, i: int) -> Tensor | None:
    """(B|1, h|1, i|1, n) -> (B|1, g|1, r*i|1, n): the r query heads of each key/value head and the i positions
    folded into rows (row x * i + t is query head x of the group at position t). A view where it can be."""
    if t is None:
        return None
    bt, ht, it, n = t.shape
    if ht == 1 and it == 1:
        return t
    if ht == 1:
        return t[:, :, None].expand(bt, 1, r, i, n).reshape(bt, 1, r * i, n)
    return t.reshape(bt, g, r, it, n).expand(bt, g, r, i, n).reshape(bt, g, r * i, n)


@dataclass(frozen=True, eq=False)
class _Call:
    """One validated `with_kvcache` call: the tensors, and the lengths and pages read to the host."""

    q: Tensor
    k_cache: Tensor
    v_cache: Tensor
    k: Tensor | None
    v: Tensor | None
    seqlens: list[int]  # cache_seqlens, per row
    lengths: list[int]  # L_b: the keys row b attends (seqlens + i when k, v are appended)
    block_table: Tensor | None
    blocks: list[list[int]] | None  # the pages each row uses, in order (paged only)
    block_size: int
    cap: int
    mask: Tensor | None  # bool (b|1, h|1, i|1, cap)
    bias: Tensor | None  # float (b|1, h|1, i|1, cap)
    causal: bool
    window: tuple[int | None, int | None] | None  # attend's window, merged with causal (right <= 0)
    scale: float
    backend: str | None
    spans: list[tuple[int, int]] = field(default_factory=list)  # keys [a, z) some query of the row may see
    sinks: Tensor | None = None  # (b|1, h): attention sinks
    return_lse: bool = False
    softcap: float | None = None

    @property
    def need_lse(self) -> bool:
        """The kernels give each row's log-sum-exp: asked for, or for the sinks (`masks.apply_sinks`)."""
        return self.return_lse or self.sinks is not None

    @property
    def b(self) -> int:
        return self.q.shape[0]

    @property
    def h(self) -> int:
        return self.q.shape[1]

    @property
    def i(self) -> int:
        return self.q.shape[2]

    @property
    def g(self) -> int:
        return self.k_cache.shape[1]

    @property
    def e(self) -> int:
        return self.v_cache.shape[-1]

    @property
    def paged(self) -> bool:
        return self.block_table is not None

    def bounds(self, length: int) -> tuple[list[int], list[int]]:
        return _bounds(self.i, self.causal, self.window, length)


def _bounds(
    i: int, causal: bool, window: tuple[int | None, int | None] | None, length: int
) -> tuple[list[int], list[int]]:
    """Keys [lo_t, hi_t) query t of a row with `length` keys may see (causal and window, bottom-right)."""
    left, right = sides(window, causal)
    bounds = [interval(length - i + t, left, right, length) for t in range(i)]
    return [lo for lo, _ in bounds], [hi for _, hi in bounds]


def _check_grad(tensors: dict[str, Tensor | None]) -> None:
    if not torch.is_grad_enabled():
        return
    wanting = [name for name, t in tensors.items() if t is not None and t.requires_grad]
    if wanting:
        raise RuntimeError(
            f"attend.with_kvcache: expected inputs that do not require grad (KV-cache decoding is inference-only), "
            f"got requires_grad=True on {', '.join(wanting)} with grad mode on; hint: run it under torch.no_grad() "
            "or torch.inference_mode(), or pass .detach()ed tensors"
        )


def _check_mask_like(name: str, t: Any, q: Tensor, target: tuple[int, int, int, int]) -> Tensor | None:
    """mask (bool) or bias (float): a (b, cap) key padding mask (mask only) or broadcastable to (b, h, i, cap).
    Returns the 4-D view."""
    if t is None:
        return None
    check_tensor(name, t)
    if name == "mask" and t.dtype != torch.bool:
        hint = "pass additive float masks as `bias=`" if t.is_floating_point() else "`mask.bool()` (True = may attend)"
        raise TypeError(f"expected `mask` of dtype bool (True = may attend), got {fmt_dtype(t.dtype)}; hint: {hint}")
    if name == "bias" and not t.is_floating_point():
        raise TypeError(
            f"expected `bias` of a floating dtype, got {fmt_dtype(t.dtype)}; hint: bool masks go in `mask=`"
        )
    if t.device != q.device:
        raise ValueError(f"expected `{name}` on {q.device} like q, got {t.device}")
    b, h, i, cap = target
    if name == "mask" and t.dim() == 2:
        if tuple(t.shape) != (b, cap):
            raise ValueError(
                f"expected a 2-D `mask` to be a key padding mask over the cache positions (b, cap) = "
                f"{fmt_shape((b, cap))}, got shape {fmt_shape(t.shape)}; hint: cap is the cache capacity (k_cache's "
                "max_len, or max_blocks * block_size when paged), whatever the number of keys in use"
            )
        return t[:, None, None, :]
    if t.dim() < 1:
        raise ValueError(f"expected `{name}` broadcastable to (b, h, i, cap) = {fmt_shape(target)}, got {describe(t)}")
    what = "hint: its last dim runs over the cache positions (capacity), not over the keys in use"
    return broadcast_4d(name, t, target, what, ("b", "h", "i", "cap"))


def _prepare(
    q: Any,
    k_cache: Any,
    v_cache: Any,
    k: Any,
    v: Any,
    cache_seqlens: Any,
    block_table: Any,
    mask: Any,
    bias: Any,
    causal: Any,
    window: Any,
    scale: Any,
    backend: Any,
    sinks: Any = None,
    return_lse: Any = False,
    softcap: Any = None,
) -> _Call:
    """Check everything and read the lengths (and the pages in use) to the host. Writes nothing."""
    paged = block_table is not None
    cache_shape = "(num_blocks, g, block_size, {})" if paged else "(b, g, max_len, {})"
    q = _tensor("q", q, "(b, h, i, d)", 4)
    k_cache = _tensor("k_cache", k_cache, cache_shape.format("d"), 4)
    v_cache = _tensor("v_cache", v_cache, cache_shape.format("e"), 4)
    if (k is None) != (v is None):
        raise ValueError(
            f"expected `k` and `v` both given (new keys and values to append) or both None, got k={describe(k)}, "
            f"v={describe(v)}"
        )
    if k is not None:
        k = _tensor("k", k, "(b, g, i, d)", 4)
        v = _tensor("v", v, "(b, g, i, e)", 4)
    named = {"q": q, "k_cache": k_cache, "v_cache": v_cache, "k": k, "v": v}
    for name, t in named.items():
        if t is not None and t.dtype not in FLOAT_DTYPES:
            raise TypeError(
                f"expected `{name}` of a floating dtype (float16, bfloat16, float32, float64), got {fmt_dtype(t.dtype)}"
            )
    dtypes = {name: t.dtype for name, t in named.items() if t is not None}
    if len(set(dtypes.values())) > 1:
        got = ", ".join(f"{n} {fmt_dtype(dt)}" for n, dt in dtypes.items())
        raise TypeError(f"expected q, the caches and k, v of one dtype, got {got}; hint: cast q to the cache's dtype")
    devices = {name: t.device for name, t in named.items() if t is not None}
    if len(set(devices.values())) > 1:
        got = ", ".join(f"{n} on {dev}" for n, dev in devices.items())
        raise ValueError(f"expected q, the caches and k, v on one device, got {got}")

    b, h, i, d = q.shape

    def shapes() -> str:  # formatted only for an error message
        text = f"q {fmt_shape(q.shape)}, k_cache {fmt_shape(k_cache.shape)}, v_cache {fmt_shape(v_cache.shape)}"
        return text if k is None else text + f", k {fmt_shape(k.shape)}, v {fmt_shape(v.shape)}"

    if tuple(k_cache.shape[:3]) != tuple(v_cache.shape[:3]):
        raise ValueError(f"expected k_cache and v_cache to agree on every dim but the last, got {shapes()}")
    nc, g, slots, dk = k_cache.shape
    e = v_cache.shape[3]
    if dk != d:
        raise ValueError(f"expected q and k_cache with the same head dim d, got {d} and {dk} ({shapes()})")
    if g == 0 or h % g != 0:
        raise ValueError(
            f"expected query heads h to be a multiple of the cache's key/value heads g (h % g == 0), got h={h}, "
            f"g={g} ({shapes()}); hint: grouped-query attention needs h = g * r"
        )
    if min(b, h, d, e) == 0:
        raise ValueError(f"expected non-zero b, h, d and e, got {shapes()}")
    if not paged and nc != b:
        raise ValueError(
            f"expected k_cache with one row per query row, batch {b}, got {nc} ({shapes()}); hint: slice the cache "
            "(k_cache[:b]) or pass block_table for a paged cache"
        )
    if k is not None:
        if tuple(k.shape) != (b, g, i, d) or tuple(v.shape) != (b, g, i, e):
            raise ValueError(
                f"expected k of shape (b, g, i, d) = {fmt_shape((b, g, i, d))} and v of shape (b, g, i, e) = "
                f"{fmt_shape((b, g, i, e))} (one new key/value per query position), got {shapes()}"
            )
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.is_inference() and not torch.is_inference_mode_enabled() and k is not None:
            raise RuntimeError(
                f"expected `{name}` that may be written in place, got an inference tensor outside inference mode; "
                "hint: call with_kvcache under torch.inference_mode() too, or allocate the cache outside it"
            )

    block_size = slots
    bt: Tensor | None = None
    if paged:
        bt = _ints("block_table", block_table, "(b, max_blocks)", q.device)
        if bt.dim() != 2 or bt.shape[0] != b:
            raise ValueError(f"expected `block_table` of shape (b, max_blocks) with b={b}, got {describe(bt)}")
        cap = bt.shape[1] * block_size
    else:
        cap = slots

    if isinstance(cache_seqlens, int) and not isinstance(cache_seqlens, bool):
        seqlens = [cache_seqlens] * b
    else:
        sl = _ints("cache_seqlens", cache_seqlens, "(b,)", q.device)
        if sl.dim() != 1 or sl.shape[0] != b:
            raise ValueError(f"expected `cache_seqlens` of shape (b,) = ({b},), got {describe(sl)}")
        seqlens = [int(x) for x in sl.tolist()]
    new = i if k is not None else 0
    for row, s in enumerate(seqlens):
        if s < 0:
            raise ValueError(f"expected `cache_seqlens` >= 0, got cache_seqlens[{row}] = {s}")
        if s + new > cap:
            what = "cache_seqlens + i (the appended tokens)" if new else "cache_seqlens"
            raise ValueError(
                f"expected {what} <= the cache capacity {cap}, got {s + new} for row {row} (cache_seqlens[{row}] = "
                f"{s}, i = {i}; {shapes()}); hint: grow the cache or evict tokens first (nothing was written)"
            )
    lengths = [s + new for s in seqlens]

    blocks: list[list[int]] | None = None
    if bt is not None:
        blocks = pages_in_use(bt, lengths, block_size, nc, pool_name="num_blocks", row_name="row")

    mask4 = _check_mask_like("mask", mask, q, (b, h, i, cap))
    bias4 = _check_mask_like("bias", bias, q, (b, h, i, cap))
    options = Options(causal=causal, scale=scale, window=window, return_lse=return_lse, softcap=softcap)
    resolved = check_options(options, d, i + cap)
    scale_f, win = resolved.scale, resolved.window
    sinks2 = check_sinks(sinks, q, b, h)
    _check_grad({**named, "bias": bias4, "sinks": sinks2})
    if backend is not None:
        get_backend(backend)  # an unknown name raises here, before any write

    spans = []
    for length in lengths:
        los, his = _bounds(i, bool(causal), win, length)
        spans.append((los[0], his[-1]) if i and his[-1] > los[0] else (0, 0))
    return _Call(
        q=q,
        k_cache=k_cache,
        v_cache=v_cache,
        k=k,
        v=v,
        seqlens=seqlens,
        lengths=lengths,
        block_table=bt,
        blocks=blocks,
        block_size=block_size,
        cap=cap,
        mask=mask4,
        bias=bias4,
        causal=bool(causal),
        window=win,
        scale=scale_f,
        backend=backend,
        spans=spans,
        sinks=sinks2,
        return_lse=resolved.return_lse,
        softcap=resolved.softcap,
    )


def _append(call: _Call) -> None:
    """Write k, v (b, g, i, d|e) in place at positions cache_seqlens[b] .. + i - 1 of each row (through the
    pages when paged): slice copies for a few tokens (per row and page), else one indexed copy per cache."""
    k, v = call.k, call.v
    assert k is not None and v is not None
    if call.i == 0:
        return
    device = call.q.device
    if call.b * call.i <= 64:  # a few tokens: slice copies (per row, per page) are cheaper than indexing
        bs = call.block_size
        for row, start in enumerate(call.seqlens):
            if call.blocks is None:
                call.k_cache[row, :, start : start + call.i].copy_(k[row])
                call.v_cache[row, :, start : start + call.i].copy_(v[row])
                continue
            t = 0
            while t < call.i:  # the part of the new tokens that lands in one page
                page, off = call.blocks[row][(start + t) // bs], (start + t) % bs
                n = min(bs - off, call.i - t)
                call.k_cache[page, :, off : off + n].copy_(k[row, :, t : t + n])
                call.v_cache[page, :, off : off + n].copy_(v[row, :, t : t + n])
                t += n
        return
    pos = torch.tensor(call.seqlens, device=device)[:, None] + torch.arange(call.i, device=device)  # (b, i)
    if call.block_table is None:
        rows = torch.arange(call.b, device=device)[:, None]
        call.k_cache[rows, :, pos] = k.transpose(1, 2)  # (b, i, g, d): the index dims come first
        call.v_cache[rows, :, pos] = v.transpose(1, 2)
    else:
        table = call.block_table.to(device=device, dtype=torch.long)
        pages = torch.gather(table, 1, pos // call.block_size)
        offsets = pos % call.block_size
        call.k_cache[pages, :, offsets] = k.transpose(1, 2)
        call.v_cache[pages, :, offsets] = v.transpose(1, 2)


# the plan


@dataclass(frozen=True)
class KVCachePlan:
    """How `with_kvcache` runs a call (`explain_kvcache` returns one; `str(plan)` reads it).

    `path`: "decode" (the folded-heads decode kernel) or "dispatch" (attend's dispatcher).
    `backend`: the attend backend the dispatch path runs (None on the decode path).
    `paged`: None (contiguous cache), "in place" (the kernel reads the pages where they are, a call per run of
    pages, merged by log-sum-exp) or "gather" (the pages in use copied out first).
    `rows`: "batched" (one kernel call for every row: all rows see the same keys) or "per row".
    `calls`: kernel calls per `with_kvcache` call (decode path). `lengths`: L_b, the keys each row attends.
    `reasons`: why the decode kernel does not run (dispatch path). `report`: dispatch's `explain` report.
    """

    path: str
    backend: str | None
    paged: str | None
    rows: str
    calls: int
    lengths: tuple[int, ...]
    reasons: tuple[str, ...] = ()
    report: Report | None = field(default=None, repr=False)

    def __str__(self) -> str:
        lines = [f"with_kvcache: keys per row L_b = {list(self.lengths)}"]
        if self.path == "decode":
            line = (
                "decode kernel: query heads folded onto their key/value head (q as (b, g, r * i, d)), PyTorch's CPU "
                f"flash kernel on views of the cache, {self.rows}, {self.calls} kernel call(s)"
            )
            lines.append(line)
            if self.paged == "in place":
                lines.append(
                    "paged: full pages read in place (pages as the kernel's batch dim, spans of the pool), partial "
                    "pages gathered and masked, merged per row by log-sum-exp (split-KV)"
                )
            elif self.paged == "gather":
                lines.append(
                    f"paged: pages gathered first (used pages spread over more than {_MAX_SPANS} spans of the pool)"
                )
        else:
            lines.append(f"dispatch path: attend backend {self.backend!r} over keys [0, max L_b)")
            if self.paged:
                lines.append("paged: pages in use gathered into a contiguous (b, g, max L_b, d) copy")
            lines.extend(f"not the decode kernel: {why}" for why in self.reasons)
            if self.report is not None:
                lines += ["", str(self.report)]
        return "\n".join(lines)


def _decode_reasons(call: _Call) -> list[str]:
    reasons = []
    if call.backend is not None:
        reasons.append(f"backend={call.backend!r} names a dispatch backend")
    if call.q.device.type != "cpu":
        reasons.append(f"the decode kernel is CPU-only, got {call.q.device.type}")
    r = call.h // call.g
    if r * call.i > DECODE_ROWS:
        reasons.append(f"r * i = {r} * {call.i} = {r * call.i} > DECODE_ROWS = {DECODE_ROWS} rows per key/value head")
    if call.q.shape[3] != call.e:
        reasons.append(f"d = {call.q.shape[3]} != e = {call.e}: PyTorch's CPU flash kernel needs one head dim")
    if call.softcap is not None:
        reasons.append(f"softcap={call.softcap}: PyTorch's CPU flash kernel cannot cap logits")
    if call.k_cache.stride(-1) != 1 or call.v_cache.stride(-1) != 1:
        reasons.append("a cache whose last dim is not contiguous")
    if (call.paged or call.need_lse) and not sdpa_backend.FLASH_LSE.present():
        what = "a paged cache in place" if call.paged else "the log-sum-exp for return_lse or sinks"
        reasons.append(f"{what}: {sdpa_backend.FLASH_LSE.reason()}")
    return reasons


@dataclass(frozen=True)
class _Batch:
    """One kernel call of a paged cache: pages as the batch dim, either a span [start, stop) of the pool read in
    place (`pages` None; pool pages in the span that no slot uses are computed and dropped) or the pool pages
    `pages` gathered first. `slots`: (index in the batch, row, logical page, first key, stop key) for each page
    a row uses (keys [first, stop) of the page are the row's)."""

    start: int
    stop: int
    pages: list[int] | None
    slots: list[tuple[int, int, int, int, int]]
    rows: tuple[int, ...]  # the rows with a slot here, sorted
    partial: bool  # some slot holds only part of its page


def _paged_batches(call: _Call) -> tuple[list[_Batch], bool]:
    """The kernel calls of a paged cache, and whether the full pages had to be gathered (too many spans).

    Full pages (every key of the page visible to its row, first use of that pool page) are read in place, in
    spans of the pool: the used pool ids sorted, cut at the largest gaps (those worth more than a kernel call, at
    most `_MAX_SPANS` spans); the unused pages left inside are computed and dropped, unless they outnumber the
    used ones `_MAX_WASTE` times: then the full pages are gathered too.
    Partial pages (the last page of a row, the edges of a window) and pages a second row shares are gathered
    into one more call, masked to their keys."""
    bs = call.block_size
    full: dict[int, tuple[int, int]] = {}
    edges: list[tuple[int, int, int, int, int]] = []  # (pool id, row, logical page, first key, stop key)
    for row, (a, z) in enumerate(call.spans):
        ids = _blocks(call)[row]
        for lp in range(a // bs, -(-z // bs) if z > a else 0):
            pid, lo, hi = ids[lp], max(a - lp * bs, 0), min(z - lp * bs, bs)
            if lo == 0 and hi == bs and pid not in full:
                full[pid] = (row, lp)
            else:
                edges.append((pid, row, lp, lo, hi))
    batches: list[_Batch] = []
    gathered = False
    if full:
        used = sorted(full)
        gaps = sorted(((used[x + 1] - used[x] - 1, x) for x in range(len(used) - 1)), reverse=True)
        waste = sum(gap for gap, _ in gaps)
        page_bytes = call.g * bs * (call.q.shape[3] + call.e) * call.q.element_size()
        cuts: list[int] = []
        for gap, x in gaps:  # a gap costs its pages' reads; a cut costs one more kernel call
            if len(cuts) + 1 >= _MAX_SPANS or gap * page_bytes < _CALL_BYTES:
                break
            cuts.append(x)
            waste -= gap
        if waste > _MAX_WASTE * len(used):
            gathered = True
            edges = [(pid, *full[pid], 0, bs) for pid in used] + edges
        else:
            bounds = [0] + sorted(x + 1 for x in cuts) + [len(used)]
            for lo_x, hi_x in zip(bounds, bounds[1:]):
                start, stop = used[lo_x], used[hi_x - 1] + 1
                slots = [(pid - start, *full[pid], 0, bs) for pid in used[lo_x:hi_x]]
                rows = tuple(sorted({full[pid][0] for pid in used[lo_x:hi_x]}))
                batches.append(_Batch(start, stop, None, slots, rows, False))
    if edges:
        slots = [(n, *x[1:]) for n, x in enumerate(edges)]
        rows = tuple(sorted({x[1] for x in edges}))
        partial = any(lo > 0 or hi < bs for *_, lo, hi in edges)
        batches.append(_Batch(0, len(edges), [x[0] for x in edges], slots, rows, partial))
    return batches, gathered


def _blocks(call: _Call) -> list[list[int]]:
    assert call.blocks is not None
    return call.blocks


def _groups(call: _Call) -> list[tuple[slice, int, int]]:
    """The kernel calls of a contiguous cache: (rows, a, z), keys [a, z) for those rows. Every row at once when
    they all see the same keys (the common decode batch), else row by row (each on its own slice)."""
    spans = call.spans
    evenly = all(t.stride(0) == t.shape[1] * t.stride(1) for t in (call.k_cache, call.v_cache))
    if len(set(call.lengths)) == 1 and (evenly or call.b == 1):
        return [(slice(0, call.b), *spans[0])]
    return [(slice(row, row + 1), *spans[row]) for row in range(call.b)]


def _plan(call: _Call, *, explain: bool = False) -> tuple[KVCachePlan, list[_Batch] | None]:
    """The plan, and for a paged cache on the decode path its kernel calls (computed once)."""
    lengths = tuple(call.lengths)
    reasons = _decode_reasons(call)
    if not reasons:
        if not call.paged:
            groups = _groups(call)
            rows = "batched" if len(groups) == 1 else "per row"
            return KVCachePlan("decode", None, None, rows, len(groups), lengths), None
        batches, gathered = _paged_batches(call)
        plan = KVCachePlan("decode", None, "gather" if gathered else "in place", "batched", len(batches), lengths)
        return plan, batches
    report = None
    backend = call.backend
    if explain or backend is None:
        inp = _dispatch_inputs(call, stand_in=True)
        report = explain_inputs(inp, call.backend) if explain else None
        backend = report.backend if report is not None else select(inp).name
    paged = "gather" if call.paged else None
    return KVCachePlan("dispatch", backend, paged, "batched", 1, lengths, tuple(reasons), report), None


# the dispatch path


def _keys(call: _Call, n: int, stand_in: bool) -> tuple[Tensor, Tensor]:
    """k, v over cache positions [0, n) of every row: views of a contiguous cache; for a paged one the pages in
    use gathered (a stand-in of the right shape, no copy, when only the shapes are wanted)."""
    b, g, d, e = call.b, call.g, call.q.shape[3], call.e
    if not call.paged:
        return call.k_cache[:, :, :n], call.v_cache[:, :, :n]
    if stand_in:
        return call.k_cache.new_zeros(d).expand(b, g, n, d), call.v_cache.new_zeros(e).expand(b, g, n, e)
    bs = call.block_size
    pages = -(-n // bs)
    ids = [(row + [0] * pages)[:pages] for row in _blocks(call)]  # unused entries: any page (masked)
    index = torch.tensor(ids, device=call.q.device, dtype=torch.long).flatten()

    def gather(cache: Tensor) -> Tensor:
        got = cache.index_select(0, index)  # (b * pages, g, bs, .)
        return got.view(b, pages, g, bs, -1).transpose(1, 2).reshape(b, g, pages * bs, -1)[:, :, :n]

    return gather(call.k_cache), gather(call.v_cache)


def _dispatch_inputs(call: _Call, stand_in: bool = False) -> AttnInputs:
    n = max(call.lengths, default=0)
    k, v = _keys(call, n, stand_in)
    mask = None if call.mask is None else call.mask[..., :n]
    bias = None if call.bias is None else call.bias[..., :n]
    ragged = any(length != n for length in call.lengths)
    window = call.window
    left, right = sides(window, call.causal)
    if ragged and (right is None or right > 0):  # keys past L_b are not hidden by causality: mask them
        device = call.q.device
        valid = torch.arange(n, device=device) < torch.tensor(call.lengths, device=device)[:, None]
        mask = valid[:, None, None] if mask is None else mask & valid[:, None, None]
    q_pos = None
    if ragged and (left is not None or right is not None):
        window = (left, right)
        device = call.q.device
        q_pos = torch.tensor(call.lengths, device=device)[:, None] - call.i + torch.arange(call.i, device=device)
    options = Options(
        causal=call.causal, scale=call.scale, window=window, return_lse=call.return_lse, softcap=call.softcap
    )
    inp = validate(call.q, k, v, mask=mask, bias=bias, sinks=call.sinks, options=options)
    if q_pos is not None:
        inp = replace(inp, q_pos=q_pos)
    return inp


def _dispatch(call: _Call, backend: str | None) -> Tensor | tuple[Tensor, Tensor]:
    if max(call.lengths, default=0) == 0 or call.i == 0:
        return _finish(call, call.q.new_zeros(call.b, call.h, call.i, call.e), _no_keys(call))
    return run(_dispatch_inputs(call), backend)


# the decode kernel


def _keep_and_bias(call: _Call, rows: slice, a: int, z: int, length: int) -> tuple[Tensor | None, Tensor | None]:
    """For rows `rows` (all of length `length`) over keys [a, z): bool keep (B|1, g|1, r*i, z-a) where causal,
    the window or the mask hide a key inside [a, z) (None if none does), and the folded bias (B|1, g|1, r*i, z-a)
    or None."""
    g, r, i = call.g, call.h // call.g, call.i
    keep = None
    los, his = call.bounds(length)
    if any(lo > a for lo in los) or any(hi < z for hi in his):
        cols = torch.arange(a, z, device=call.q.device)
        lo_t = torch.tensor(los, device=call.q.device)[:, None]
        hi_t = torch.tensor(his, device=call.q.device)[:, None]
        keep = _fold(((cols >= lo_t) & (cols < hi_t))[None, None], g, r, i)
    mask, bias = (_window_of(t, rows, a, z, g, r, i) for t in (call.mask, call.bias))
    if mask is not None:
        keep = mask if keep is None else keep & mask
    return keep, bias


def _window_of(t: Tensor | None, rows: slice, a: int, z: int, g: int, r: int, i: int) -> Tensor | None:
    """A (b|1, h|1, i|1, cap|1) mask or bias for rows `rows` and cache positions [a, z), folded."""
    if t is None:
        return None
    t = t[rows] if t.shape[0] != 1 else t
    t = t[..., a:z] if t.shape[-1] != 1 else t
    return _fold(t, g, r, i)


def _kernel_mask(keep: Tensor | None, bias: Tensor | None, dtype: torch.dtype, lse: bool) -> Tensor | None:
    """The kernel's attn_mask: bool keep alone (the public entry point takes it), else an additive mask in the
    kernel's dtype (the bias saturated to it, attend's rule `masks.bias_as`), -inf where keep is False."""
    if bias is None:
        if keep is None or not lse:
            return keep
        return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill_(~keep, -math.inf)
    add = bias_as(bias, dtype, grad=False)
    return add if keep is None else add.masked_fill(~keep, -math.inf)


def _dead(keep: Tensor | None, bias: Tensor | None) -> Tensor | None:
    """Bool (B|1, g|1, rows): rows that may attend no key (their output is 0), or None."""
    if bias is not None:
        finite = bias != -math.inf
        keep = finite if keep is None else keep & finite
    return None if keep is None else ~keep.any(-1)


def _split(n: int) -> tuple[int, int, int]:
    """(chunks, stride, size) for n keys of one row: split-KV. Chunk c covers keys [c * stride, c * stride + size)
    of the n: they cover every key, consecutive chunks overlapping by size - stride = n % chunks keys (< chunks;
    masked in the later chunk), so any n splits evenly without a remainder call.

    Why: PyTorch's CPU flash kernel streams a long key range per (batch, head) work item more slowly than a few
    shorter ones, merged by log-sum-exp (b = 1, h = 32, g = 8, d = 128 on 2 cores, warm threads: float32 16k
    keys 20 -> 29 GB/s, 32k 19 -> 22 GB/s, 8k 34 -> 40 GB/s; bfloat16 32k 12 -> 16 GB/s; below 8k one call is
    as fast or faster). (1, n, n): no split (fewer than 2 * `_SPLIT_MIN` keys)."""
    if n < 2 * _SPLIT_MIN:
        return 1, n, n
    chunks = max(2, -(-n // _SPLIT_KEYS))
    stride = n // chunks
    return chunks, stride, n - (chunks - 1) * stride


def _windows(t: Tensor, chunks: int, stride: int, size: int) -> Tensor:
    """(H, n, x) -> (chunks, H, size, x): the chunks of `_split` as a strided view (nothing copied)."""
    sh, sn, sx = t.stride()
    return t.as_strided((chunks, t.shape[0], size, t.shape[2]), (stride * sn, sh, sn, sx), t.storage_offset())


def _chunk_mask(
    mask: Tensor | None, chunks: int, stride: int, size: int, nb: int, g: int, like: Tensor
) -> Tensor | None:
    """The kernel mask of each chunk, (chunks, nb * g|1, rows|1, size), from the folded additive mask
    (nb|1, g|1, rows, n) or None, with -inf on the keys a chunk shares with the one before it (counted once)."""
    overlap = size - stride
    if mask is None:
        if not overlap:
            return None
        out = like.new_zeros(chunks, 1, 1, size)
    else:
        if mask.shape[0] * mask.shape[1] != 1:
            mask = mask.expand(nb, g, *mask.shape[2:]).reshape(1, nb * g, *mask.shape[2:])
        out = mask[0].unfold(-1, size, stride).permute(2, 0, 1, 3).contiguous()  # (chunks, H|1, rows, size)
    if overlap:
        out[1:, ..., :overlap] = -math.inf
    return out


def _partial(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, masked: bool) -> tuple[Tensor, Tensor]:
    """Output and log-sum-exp of one kernel call. `masked`: a row may have every key masked (a user mask, bias,
    causal or window inside the keys): it gets 0 and -inf (the kernel gives it lse 0)."""
    op = sdpa_backend.flash_lse_op  # (read at the call: one binding, which the tests can switch off)
    assert op is not None
    out, lse = op.default(q, k, v, attn_mask=mask, scale=scale)
    if masked and mask is not None:
        dead = (mask == -math.inf).all(-1)
        if bool(dead.any()):
            out, lse = out.masked_fill(dead[..., None], 0.0), lse.masked_fill(dead, -math.inf)
    return out, lse


def _decode_contiguous(call: _Call) -> tuple[Tensor, Tensor | None]:
    g, r, i, d, e = call.g, call.h // call.g, call.i, call.q.shape[3], call.e
    outs, lses = [], []
    acc = accum_dtype(call.q.dtype)
    for rows, a, z in _groups(call):
        q = call.q[rows]
        nb = q.shape[0]
        if z <= a:
            outs.append(q.new_zeros(nb, call.h, i, e))
            lses.append(q.new_full((nb, call.h, i), -math.inf, dtype=acc))
            continue
        keep, bias = _keep_and_bias(call, rows, a, z, call.lengths[rows.start])
        chunks, stride, size = _split(z - a)
        if chunks == 1:
            qf = q.reshape(nb, g, r * i, d)
            kk, vv = call.k_cache[rows, :, a:z], call.v_cache[rows, :, a:z]
            if call.need_lse:  # PyTorch's CPU flash op itself: it returns the log-sum-exp beside the output
                masked = keep is not None or bias is not None
                out, lse = _partial(qf, kk, vv, _kernel_mask(keep, bias, q.dtype, True), call.scale, masked)
                outs.append(out.reshape(nb, call.h, i, e))
                lses.append(lse.reshape(nb, call.h, i))
                continue
            out = _sdpa(qf, kk, vv, attn_mask=_kernel_mask(keep, bias, q.dtype, False), scale=call.scale)
            dead = _dead(keep, bias)
            if dead is not None:
                out = out.masked_fill(dead[..., None], 0.0)
            outs.append(out.reshape(nb, call.h, i, e))
            continue
        # split-KV: the chunks of `_split` as the kernel's batch dim; its head dim is (row, key/value head), so a
        # batch of rows is one call (the cache's rows are evenly strided, `_groups`)
        heads = nb * g
        qf = q.reshape(1, heads, r * i, d)
        masked = keep is not None or bias is not None
        mask = _chunk_mask(_kernel_mask(keep, bias, q.dtype, True), chunks, stride, size, nb, g, q)
        kk = _windows(call.k_cache[rows, :, a:z].flatten(0, 1), chunks, stride, size)
        vv = _windows(call.v_cache[rows, :, a:z].flatten(0, 1), chunks, stride, size)
        part, lse = _partial(qf.expand(chunks, heads, r * i, d), kk, vv, mask, call.scale, masked)
        merged, total = merge(part, lse, with_lse=call.need_lse)
        outs.append(merged.to(q.dtype).reshape(nb, call.h, i, e))
        if total is not None:
            lses.append(total.reshape(nb, call.h, i))
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    return out, (None if not call.need_lse else lses[0] if len(lses) == 1 else torch.cat(lses))


def _decode_paged(call: _Call, batches: list[_Batch]) -> tuple[Tensor, Tensor | None]:
    """A paged cache: each kernel call takes pages as its batch dim (q repeated per page from its row) and gives
    each page's output and log-sum-exp, merged per row in float32 (split-KV, the split being the pages)."""
    g, r, i, d, e, bs, b = call.g, call.h // call.g, call.i, call.q.shape[3], call.e, call.block_size, call.b
    device, dtype = call.q.device, call.q.dtype
    qf = call.q.reshape(b, g, r * i, d)
    spans, per_row = call.spans, {}
    outs: list[Tensor] = []
    lses: list[Tensor] = []
    owners: list[int] = []
    # causal with i > 1, a window, a mask or a bias may hide keys inside a full page
    structured = i > 1 or call.window is not None or call.mask is not None or call.bias is not None
    for batch in batches:
        n = batch.stop - batch.start
        if batch.pages is None:
            kk, vv = call.k_cache[batch.start : batch.stop], call.v_cache[batch.start : batch.stop]
        else:
            index = torch.tensor(batch.pages, device=device)
            kk, vv = call.k_cache.index_select(0, index), call.v_cache.index_select(0, index)
        mask = None
        rows = batch.rows
        if structured:
            for row in rows:
                if row not in per_row:
                    a, z = spans[row]
                    per_row[row] = _keep_and_bias(call, slice(row, row + 1), a, z, call.lengths[row])
        if batch.partial or (structured and any(x is not None for row in rows for x in per_row[row])):
            ts = [t for row in rows for t in per_row.get(row, (None, None))]
            heads = g if any(t is not None and t.shape[1] != 1 for t in ts) else 1
            mask = torch.zeros(n, heads, r * i, bs, dtype=dtype, device=device)
            for row in rows:
                mine = [slot for slot in batch.slots if slot[1] == row]
                at = torch.tensor([slot[0] for slot in mine], device=device)
                first = torch.tensor([slot[2] * bs for slot in mine], device=device)[:, None]  # the pages' first keys
                pos = first + torch.arange(bs, device=device)
                lo = torch.tensor([slot[3] for slot in mine], device=device)[:, None]
                hi = torch.tensor([slot[4] for slot in mine], device=device)[:, None]
                inside = (pos >= first + lo) & (pos < first + hi)
                a, z = spans[row]
                cols = (pos - a).clamp_(0, z - a - 1)
                keep, bias = (_columns(t, cols) for t in per_row.get(row, (None, None)))
                keep = inside[:, None, None] if keep is None else keep & inside[:, None, None]
                mask[at] = cast(Tensor, _kernel_mask(keep, bias, dtype, True))
        if len(rows) == 1:  # one row's pages: its queries, repeated without a copy
            qb = qf[rows[0] : rows[0] + 1].expand(n, *qf.shape[1:])
        else:
            owner = [0] * n
            for x, row, *_ in batch.slots:
                owner[x] = row
            qb = qf.index_select(0, torch.tensor(owner, device=device))
        op = sdpa_backend.flash_lse_op
        assert op is not None
        out, lse = op.default(qb, kk, vv, attn_mask=mask, scale=call.scale)
        if len(batch.slots) != n:  # pool pages inside a span that no row uses: dropped
            at = torch.tensor([slot[0] for slot in batch.slots], device=device)
            out, lse = out.index_select(0, at), lse.index_select(0, at)
            mask = None if mask is None else mask.index_select(0, at)
        if mask is not None:
            dead = (mask == -math.inf).all(-1)  # the kernel gives these rows lse 0, not -inf
            out, lse = out.masked_fill(dead[..., None], 0.0), lse.masked_fill(dead, -math.inf)
        outs.append(out)
        lses.append(lse)
        owners.extend(slot[1] for slot in batch.slots)
    if not outs:
        return call.q.new_zeros(b, call.h, i, e), _no_keys(call)
    out, lse = (outs[0], lses[0]) if len(outs) == 1 else (torch.cat(outs), torch.cat(lses))
    if b == 1:  # every page is row 0's
        res, total = merge(out, lse, with_lse=call.need_lse)
        res = res[None]
    else:
        res, total = merge(out, lse, torch.tensor(owners, device=device), b, with_lse=call.need_lse)
    return res.to(dtype).reshape(b, call.h, i, e), (None if total is None else total.reshape(b, call.h, i))


def _columns(t: Tensor | None, cols: Tensor) -> Tensor | None:
    """(1, g|1, rows, n_all) -> (pages, g|1, rows, n): the columns `cols` (pages, n) of a row's folded mask or
    bias, one page per batch element."""
    if t is None:
        return None
    pages = cols.shape[0]
    if t.shape[-1] == 1:
        return t.expand(pages, *t.shape[1:])
    got = t[0].index_select(-1, cols.flatten())  # (g|1, rows, pages * n)
    gt, rows = got.shape[:2]
    return got.view(gt, rows, pages, -1).permute(2, 0, 1, 3)


def _no_keys(call: _Call) -> Tensor | None:
    """The log-sum-exp of rows that see no key (-inf), where the call needs it."""
    if not call.need_lse:
        return None
    return call.q.new_full((call.b, call.h, call.i), -math.inf, dtype=accum_dtype(call.q.dtype))


def _decode(call: _Call, batches: list[_Batch] | None) -> tuple[Tensor, Tensor | None]:
    """out (b, h, i, e) and, where the call needs it, the log-sum-exp (b, h, i) in float32 (float64)."""
    with torch.no_grad(), no_autocast(call.q.device.type):
        if call.i == 0 or max(call.lengths, default=0) == 0:
            return call.q.new_zeros(call.b, call.h, call.i, call.e), _no_keys(call)
        if not call.paged:
            return _decode_contiguous(call)
        assert batches is not None
        return _decode_paged(call, batches)


def _finish(call: _Call, out: Tensor, lse: Tensor | None) -> Tensor | tuple[Tensor, Tensor]:
    """The decode kernel's result in the caller's terms: the sinks applied (`masks.apply_sinks`, as every door
    does), and the log-sum-exp returned where asked."""
    if call.sinks is not None:
        assert lse is not None
        out, lse = apply_sinks(out, lse, call.sinks)
    return (out, lse) if call.return_lse and lse is not None else out


# main functions


def with_kvcache(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    k: Tensor | None = None,
    v: Tensor | None = None,
    *,
    cache_seqlens: Tensor | int,
    block_table: Tensor | None = None,
    mask: Tensor | None = None,
    bias: Tensor | None = None,
    causal: bool = True,
    window: tuple[int | None, int | None] | None = None,
    scale: float | None = None,
    backend: str | None = None,
    sinks: Tensor | None = None,
    return_lse: bool = False,
    softcap: float | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Attention of new queries over a KV cache, appending their keys and values in place first: flash-attn's
    `flash_attn_with_kvcache` (no rotary, no cache_batch_idx), on every device. Inference only.

    Shapes (legend: b batch, h query heads, g key/value heads, i query positions, j key positions, d head dim of
    q and k, e value head dim; cap the cache capacity)::

        q (b, h, i, d), h % g == 0                       ->  out (b, h, i, e), q's dtype
        k_cache (b, g, cap, d), v_cache (b, g, cap, e)   (cap = max_len)
        paged: k_cache (num_blocks, g, block_size, d), v_cache (num_blocks, g, block_size, e),
               block_table (b, max_blocks) int32, cap = max_blocks * block_size
        k (b, g, i, d), v (b, g, i, e): optional, appended
        cache_seqlens (b,) int32 (or a Python int for every row): tokens already in each row's cache

    With k, v: they are written into the cache at positions cache_seqlens[b] .. cache_seqlens[b] + i - 1 of row b
    (through block_table when paged; no reallocation, the caches keep their storage), and row b attends its first
    L_b = cache_seqlens[b] + i cache positions. Without k, v: L_b = cache_seqlens[b] (the new tokens are in the
    cache already). Either way query t of row b sits at position p = L_b - i + t (causal aligned to the
    bottom-right, as in flash-attn) and sees keys j < L_b with j <= p (causal), p - left <= j <= p + right
    (window); a query that sees no key gives 0. Keys of a row past L_b are never read by any row.

    Args:
        q, k_cache, v_cache, k, v: as above; one floating dtype, one device.
        cache_seqlens: (b,) int32 (int64 accepted) or an int. Read to the host once per call.
        block_table: (b, max_blocks) int32: row b's cache position t lives in page block_table[b, t // block_size]
            at offset t % block_size. Only the entries a row uses (its first ceil(L_b / block_size)) are read; they
            must be in [0, num_blocks). Pages may be shared between rows for reading (a common prefix).
        mask: bool, True = may attend, over the cache positions: a (b, cap) key padding mask, or broadcastable to
            (b, h, i, cap). Its last dim is the capacity (one mask buffer serves a whole generation); positions
            past L_b are ignored. The appended positions are cache positions like any other.
        bias: float, added to the scaled logits, broadcastable to (b, h, i, cap) (same indexing as mask).
        causal: bottom-right causal masking (default True, as for decoding).
        window: (left, right), attend's sliding window relative to each query's position p (each an int >= 0
            or None, unbounded; causal sets right = 0). Only the keys in the window are read.
        scale: logit scale, default d ** -0.5.
        backend: None (auto: the decode kernel where it applies, else attend's dispatcher) or the name of an
            attend backend (`attend.list_backends()`), which then runs the call through the dispatcher.
        sinks: attention sinks, float (h,) or (b, h), as in `attention` (gpt-oss's decoding): one logit per
            query head in every row's softmax denominator, with no value. The decode kernel takes each row's
            log-sum-exp from PyTorch's CPU flash op and rescales (`masks.apply_sinks`, as every door).
        return_lse: return `(out, lse)`, lse (b, h, i) float32 (float64 for float64 inputs), the log of each
            row's softmax normaliser over the keys it attends (with the sinks, if any); -inf for a row with no key.
        softcap: logit soft-capping (Gemma 2), as in `attention`. PyTorch's flash kernel cannot cap, so such a
            call takes the dispatch path (a backend that caps inside its tiles; `explain_kvcache` says so).

    The decode kernel (CPU, r * i <= DECODE_ROWS = 64 with r = h // g, d == e) folds the r query heads that share a
    key/value head into rows and reads each cache head once with PyTorch's CPU flash kernel (float32 softmax
    statistics), on views of the cache (long rows split into chunks merged by log-sum-exp); paged caches are read
    in place, pages as the kernel's batch dim, merged by log-sum-exp. Otherwise attend's dispatcher runs the call.
    `explain_kvcache(...)` (same arguments) says which path a call takes, without writing anything.

    Raises:
        TypeError, ValueError: bad input ("expected X, got Y"), including cache_seqlens + i > capacity and pages
            out of range, before anything is written to the cache.
        RuntimeError: an input requires grad under grad mode (this is inference only).

    Example::

        >>> k_cache = torch.zeros(2, 8, 4096, 128); v_cache = torch.zeros(2, 8, 4096, 128)
        >>> lens = torch.tensor([17, 300], dtype=torch.int32)
        >>> q = torch.randn(2, 32, 1, 128); k = v = torch.randn(2, 8, 1, 128)
        >>> with torch.no_grad():
        ...     out = with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=lens)   # (2, 32, 1, 128)
        >>> lens += 1
    """
    call = _prepare(
        q, k_cache, v_cache, k, v, cache_seqlens, block_table, mask, bias, causal, window, scale, backend, sinks,
        return_lse, softcap,
    )  # fmt: skip
    if backend is not None:
        select(_dispatch_inputs(call, stand_in=True), backend)  # a named backend that cannot run raises here
    if call.k is not None:
        _append(call)
    plan, batches = _plan(call)
    if plan.path == "decode":
        out, lse = _decode(call, batches)
        if output_is_finite(out):
            return _finish(call, out, lse)
        # a NaN or inf reached the output: rerun exactly (garbage a row may not see never reaches it there)
    with torch.no_grad():
        return _dispatch(call, backend)


def explain_kvcache(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    k: Tensor | None = None,
    v: Tensor | None = None,
    *,
    cache_seqlens: Tensor | int,
    block_table: Tensor | None = None,
    mask: Tensor | None = None,
    bias: Tensor | None = None,
    causal: bool = True,
    window: tuple[int | None, int | None] | None = None,
    scale: float | None = None,
    backend: str | None = None,
    sinks: Tensor | None = None,
    return_lse: bool = False,
    softcap: float | None = None,
) -> KVCachePlan:
    """How `with_kvcache(...)` with these arguments would run: a `KVCachePlan` (`str(plan)` is readable).

    Takes the same arguments and runs the same checks (so it raises the same errors), but writes nothing to the
    cache and runs no kernel. `plan.path` is "decode" (the folded-heads decode kernel; `plan.paged` says whether
    pages are read in place or gathered, `plan.rows` whether rows run batched or one by one) or "dispatch"
    (`plan.backend` the attend backend, `plan.reasons` why the decode kernel does not apply, `plan.report` the
    dispatcher's own `explain` report for the (b, h, i, max L_b) inputs).

    Example::

        >>> print(explain_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=lens))
        with_kvcache: keys per row L_b = [18, 301]
        decode kernel: query heads folded onto their key/value head (q as (b, g, r * i, d)), ...
    """
    call = _prepare(
        q, k_cache, v_cache, k, v, cache_seqlens, block_table, mask, bias, causal, window, scale, backend, sinks,
        return_lse, softcap,
    )  # fmt: skip
    return _plan(call, explain=True)[0]
