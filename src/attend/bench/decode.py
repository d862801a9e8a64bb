"""`attend bench --suite decode`: one decoding step against a KV cache, measured as bandwidth.

Shape legend: b batch, h query heads, g key/value heads, i query positions, j key positions,
d head dim (q and k), e value head dim; here also j = the cache's length, the keys one step attends.

A row (`cases.DecodeCase`) is one step of greedy decoding: q (b, h, 1, d) and the step's key and value
(b, g, 1, d) against caches that hold j - 1 tokens. Every candidate appends the step's key and value at slot
j - 1, in place, and attends all j keys (no grad). The fill (`cache_seqlens` = j - 1) is not advanced, so
every timed call is the same step and writes the same slot; the append is b * g * d elements, the read
2 * b * g * j * d: the step is the cache read.

As in a model with many layers, each call reads the next of `layers` caches (copies of one another), enough
of them that together they are at least twice the last-level cache (the CPU's L3, read from sysfs; a GPU's
L2): no call finds its cache still in the CPU's cache from its previous call, which would report the cache's
bandwidth, not the memory's (a 480 MiB L3 holds a whole 8k-key cache). The copy is sized alike (src at
least the last-level cache). A row with `beyond_llc=False` (the tiny suite) reads one cache again and again.

* `attend:with_kvcache`  `with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=j - 1)`, caches (b, g, j, d)
* `attend:paged`         the same with `block_table=` (b, j / block_size) int32 into a page pool
                         (b * j / block_size, g, block_size, d), the pages shuffled (no row's pages are
                         adjacent or in order)
* `sdpa:gqa`             `k_cache[:, :, j-1:j] = k` (the same append), then
                         `F.scaled_dot_product_attention(q, k_cache[:, :, :j], v_cache[:, :, :j], enable_gqa=True)`
* `copy`                 `dst.copy_(src)`, `copy_mb` MiB of float32 (or the last-level cache's size, if larger):
                         the machine's memory bandwidth, timed in the same interleaved rounds as the
                         candidates (so under the same load)

GB/s: the cache bytes a step reads (2 * b * g * j * d * itemsize) over the median time; the copy's: the bytes
it reads (src; it writes as many) over its time. % copy: a candidate's GB/s over the copy's. The subject and
the paged candidate need `attend.kvcache` (the row's `needs`): without it the row is left out, with the reason.
Each row also records every candidate's largest difference from `sdpa:gqa`'s output (one extra call each).
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .._helpers import fmt_dtype
from ..backends.sdpa import has_enable_gqa
from .cases import DECODE_SUITES, DecodeCase
from .harness import (
    BenchConfig,
    Skip,
    available_bytes,
    guard,
    import_object,
    missing,
    run_rows,
    timing_fields,
    warm_up,
)
from .timer import time_interleaved

__all__ = [
    "CANDIDATES",
    "SUBJECT",
    "COPY",
    "DecodeBase",
    "Built",
    "llc_bytes",
    "layer_count",
    "make_base",
    "build",
    "plan",
    "run_decode",
]

SUBJECT = "attend:with_kvcache"
PAGED = "attend:paged"
SINKS = "attend:sinks"
SDPA = "sdpa:gqa"
COPY = "copy"
ROOM = 0.6  # the share of available memory a row's tensors may take
MAX_LAYERS = 256  # the most caches a row rotates through


@dataclass
class DecodeBase:
    """A row's tensors, once: q (b, h, 1, d), the step's k and v (b, g, 1, d), the contiguous caches
    (b, g, j, d) holding j - 1 tokens (every slot random; slot j - 1 is the step's), and cache_seqlens (b,)
    int32 = j - 1; `k_caches`, `v_caches`: the layers' caches, copies of `k_cache`, `v_cache` (the first).
    The paged candidate copies the caches into its page pools."""

    case: DecodeCase
    q: Tensor
    k: Tensor
    v: Tensor
    k_caches: list[Tensor]
    v_caches: list[Tensor]
    seqlens: Tensor

    @property
    def k_cache(self) -> Tensor:
        return self.k_caches[0]

    @property
    def v_cache(self) -> Tensor:
        return self.v_caches[0]


@dataclass
class Built:
    """A candidate ready to time: `call` runs one step and returns its output (b, h, 1, e) (the copy probe:
    None); `note`: the work it does; `expect`: its expected output from sdpa's on the same step, where it
    computes something else (the sinks' rescale), else None (sdpa's itself)."""

    call: Callable[[], Any]
    note: str
    expect: Callable[[Tensor], Tensor] | None = None


# helpers


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _fits(need: int, what: str, device: torch.device) -> str | None:
    """None when `need` bytes fit in ROOM of the available memory, else why not."""
    room = available_bytes(device) * ROOM
    if need > room:
        return f"needs ~{_gib(need)} for {what}, {_gib(room)} free here ({ROOM:.0%} of available memory)"
    return None


def _rand(gen: torch.Generator, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    out = torch.empty(shape, dtype=dtype, device=device)
    # in slices along dim 0 or 1: no float32 temporary the size of a 2 GiB cache
    for part in out.flatten(0, 1):
        part.copy_(torch.randn(part.shape, generator=gen, dtype=torch.float32))
    return out


def _kvcache(base: DecodeBase) -> Callable[..., Tensor]:
    return import_object(base.case.needs)


def _rotating(n: int) -> Callable[[], int]:
    """0, 1, ..., n - 1, 0, 1, ...: the layer each call reads."""
    state = [n - 1]

    def nxt() -> int:
        state[0] = (state[0] + 1) % n
        return state[0]

    return nxt


def _size(text: str) -> int:
    """'491520K' -> bytes."""
    text = text.strip().upper()
    scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
    return int(text.rstrip("KMG") or 0) * scale


def llc_bytes(device: torch.device) -> int:
    """The last-level cache's size: a GPU's L2, the CPU's highest data cache level (sysfs); 0 if unknown."""
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0))
    best = (0, 0)
    try:
        for index in sorted(glob.glob("/sys/devices/system/cpu/cpu0/cache/index*")):
            with open(os.path.join(index, "type")) as f:
                if f.read().strip() == "Instruction":
                    continue
            with open(os.path.join(index, "level")) as f, open(os.path.join(index, "size")) as g:
                best = max(best, (int(f.read()), _size(g.read())))
    except (OSError, ValueError):
        return 0
    return best[1]


def layer_count(case: DecodeCase, llc: int) -> int:
    """How many layers' caches a row rotates through: together at least twice the last-level cache (at most
    MAX_LAYERS); 1 for a row with `beyond_llc=False` or an unknown cache size."""
    if not case.beyond_llc or llc <= 0:
        return 1
    return max(1, min(MAX_LAYERS, -(-2 * llc // case.cache_bytes)))


def copy_mb(case: DecodeCase, llc: int) -> int:
    return max(case.copy_mb, -(-llc // 2**20)) if case.beyond_llc else case.copy_mb


def _keep_fill(call: Callable[[], Any], seqlens: Tensor) -> tuple[Callable[[], Any], bool]:
    """One call; if it advanced `cache_seqlens` in place, (a call that resets it first, True)."""
    start = seqlens.clone()
    call()
    if torch.equal(seqlens, start):
        return call, False
    seqlens.copy_(start)

    def reset_then_call() -> Any:
        seqlens.copy_(start)
        return call()

    return reset_then_call, True


# candidates


def _layers_note(base: DecodeBase) -> str:
    n = len(base.k_caches)
    return "" if n == 1 else f", one of {n} layers' caches a call"


def _attend_contiguous(base: DecodeBase) -> Built:
    with_kvcache = _kvcache(base)
    q, k, v, kcs, vcs, seqlens = base.q, base.k, base.v, base.k_caches, base.v_caches, base.seqlens
    layer = _rotating(len(kcs))

    def call() -> Tensor:
        n = layer()
        return with_kvcache(q, kcs[n], vcs[n], k, v, cache_seqlens=seqlens)

    call, reset = _keep_fill(guard(call), seqlens)
    b, g, j, d = kcs[0].shape
    note = f"({b}, {g}, {j}, {d}) caches, cache_seqlens={j - 1}, appends k, v in place" + _layers_note(base)
    return Built(call, note + (" (fill reset each call)" if reset else ""))


def _attend_sinks(base: DecodeBase) -> Built:
    """The subject's call with gpt-oss's attention sinks, one logit per query head (issue 23: >= 90 % of its
    speed)."""
    with_kvcache = _kvcache(base)
    q, k, v, kcs, vcs, seqlens = base.q, base.k, base.v, base.k_caches, base.v_caches, base.seqlens
    sinks = torch.randn(q.shape[1], generator=torch.Generator().manual_seed(2)).to(q)
    layer = _rotating(len(kcs))

    def call() -> Tensor:
        n = layer()
        return with_kvcache(q, kcs[n], vcs[n], k, v, cache_seqlens=seqlens, sinks=sinks)

    def expect(want: Tensor) -> Tensor:
        # sdpa's output rescaled by sigmoid(lse - sink), the lse over the step's j keys in float32 (float64)
        acc = torch.float64 if want.dtype == torch.float64 else torch.float32
        h, g = q.shape[1], kcs[0].shape[1]
        keys = kcs[0][:, :, : int(seqlens.max()) + 1].to(acc).repeat_interleave(h // g, dim=1)
        lse = (q.to(acc) @ keys.transpose(-1, -2) * q.shape[-1] ** -0.5).logsumexp(-1)  # (b, h, 1)
        return (want.to(acc) * torch.sigmoid(lse - sinks.to(acc)[:, None])[..., None]).to(want.dtype)

    call, reset = _keep_fill(guard(call), seqlens)
    note = f"the same call with sinks ({q.shape[1]},), as gpt-oss decodes" + _layers_note(base)
    return Built(call, note + (" (fill reset each call)" if reset else ""), expect)


def _attend_paged(base: DecodeBase) -> Built:
    with_kvcache = _kvcache(base)
    case = base.case
    bs = case.block_size
    kc, vc = base.k_cache, base.v_cache
    b, g, j, d = kc.shape
    pages = j // bs
    layers = len(base.k_caches)
    why = _fits(layers * case.cache_bytes, "its page pools", kc.device)
    if why:
        raise Skip(why)
    gen = torch.Generator().manual_seed(1)
    table = torch.randperm(b * pages, generator=gen).view(b, pages).to(device=kc.device, dtype=torch.int32)

    def pool(cache: Tensor) -> Tensor:
        out = torch.empty(b * pages, g, bs, cache.shape[-1], dtype=cache.dtype, device=cache.device)
        # page p of row r (tokens p * bs ... p * bs + bs - 1) goes to the pool's page table[r, p]; a row at a
        # time, so no temporary holds more than one row's cache
        for r in range(b):
            out[table[r].long()] = cache[r].view(g, pages, bs, -1).transpose(0, 1)
        return out

    k_pool, v_pool = pool(kc), pool(vc)
    k_pools = [k_pool] + [k_pool.clone() for _ in range(layers - 1)]
    v_pools = [v_pool] + [v_pool.clone() for _ in range(layers - 1)]
    q, k, v, seqlens = base.q, base.k, base.v, base.seqlens
    layer = _rotating(layers)

    def call() -> Tensor:
        n = layer()
        return with_kvcache(q, k_pools[n], v_pools[n], k, v, cache_seqlens=seqlens, block_table=table)

    call, reset = _keep_fill(guard(call), seqlens)
    note = f"{b * pages} pages of {bs} tokens, ({b * pages}, {g}, {bs}, {d}) pool, shuffled block_table ({b}, {pages})"
    return Built(call, note + _layers_note(base) + (" (fill reset each call)" if reset else ""))


def _sdpa_gqa(base: DecodeBase) -> Built:
    q, k, v, kcs, vcs = base.q, base.k, base.v, base.k_caches, base.v_caches
    j = kcs[0].shape[2]
    layer = _rotating(len(kcs))
    r = q.shape[1] // kcs[0].shape[1]
    # a torch without SDPA's enable_gqa (< 2.5): what its users write, k and v repeated to the query heads
    gqa: dict[str, Any] = {"enable_gqa": True} if r > 1 and has_enable_gqa() else {}
    repeat = r > 1 and not gqa

    def call() -> Tensor:
        n = layer()
        kc, vc = kcs[n], vcs[n]
        kc[:, :, j - 1 : j] = k
        vc[:, :, j - 1 : j] = v
        kj, vj = kc[:, :, :j], vc[:, :, :j]
        if repeat:
            kj, vj = kj.repeat_interleave(r, 1), vj.repeat_interleave(r, 1)
        return F.scaled_dot_product_attention(q, kj, vj, **gqa)

    how = f"k and v repeated {r}x (this torch's SDPA has no enable_gqa)" if repeat else "enable_gqa=True"
    note = f"the same append by slice assignment, then SDPA on k_cache[:, :, :{j}], {how}"
    return Built(call, note + _layers_note(base))


def copy_probe(mb: int, device: torch.device) -> tuple[Callable[[], None], int, str]:
    """(call, bytes read per call, note): `dst.copy_(src)` of `mb` MiB of float32."""
    n = mb * 2**20 // 4
    src = torch.full((n,), 1.0, device=device)
    dst = torch.empty_like(src)

    def call() -> None:
        dst.copy_(src)

    return call, src.nbytes, f"dst.copy_(src), {mb} MiB float32: GB/s = bytes read (src) / time"


Builder = Callable[[DecodeBase], Built]
CANDIDATES: dict[str, Builder] = {
    SUBJECT: _attend_contiguous, PAGED: _attend_paged, SDPA: _sdpa_gqa, SINKS: _attend_sinks
}


# building blocks


def make_base(case: DecodeCase, device: torch.device | str, seed: int = 0, layers: int = 1) -> DecodeBase:
    """The row's tensors, seeded: every candidate sees the same q, k, v and cache contents (in each of
    `layers` copies of the caches)."""
    device = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    b, h, g, j, d, dtype = case.b, case.h, case.g, case.j, case.d, case.dtype
    q = _rand(gen, (b, h, 1, d), dtype, device)
    k, v = (_rand(gen, (b, g, 1, d), dtype, device) for _ in range(2))
    k_cache, v_cache = (_rand(gen, (b, g, j, d), dtype, device) for _ in range(2))
    k_caches = [k_cache] + [k_cache.clone() for _ in range(layers - 1)]
    v_caches = [v_cache] + [v_cache.clone() for _ in range(layers - 1)]
    seqlens = torch.full((b,), j - 1, dtype=torch.int32, device=device)
    return DecodeBase(case, q, k, v, k_caches, v_caches, seqlens)


def build(
    case: DecodeCase, device: torch.device | str, names: list[str] | None = None, layers: int = 1
) -> tuple[dict[str, Built], dict[str, str]]:
    """({name: Built}, {name: why it was left out}) for the row's candidates (or `names`), each reading the
    next of `layers` caches a call; the copy probe not among them."""
    base = make_base(case, device, layers=layers)
    built: dict[str, Built] = {}
    skipped: dict[str, str] = {}
    for name in names if names is not None else list(CANDIDATES):
        try:
            built[name] = CANDIDATES[name](base)
        except Skip as exc:
            skipped[name] = str(exc)
        except (ImportError, AttributeError, RuntimeError, ValueError, TypeError) as exc:
            first = (str(exc).strip().splitlines() or [""])[0]
            skipped[name] = f"{type(exc).__name__}: {first}"[:200]
    return built, skipped


def _cases(cfg: BenchConfig) -> list[DecodeCase]:
    """The suite's rows; with `cfg.dtype`, each (b, j) once in that dtype (floors kept)."""
    cases = DECODE_SUITES[cfg.suite]
    if cfg.dtype is None:
        return list(cases)
    out: dict[str, DecodeCase] = {}
    for c in cases:
        out.setdefault(c.name, replace(c, dtype=cfg.dtype))
    return list(out.values())


def omitted(cfg: BenchConfig) -> dict[str, str]:
    """The rows left out at run time, with the reason: the subject does not import, or the caches would not
    fit in memory here. Keyed by "case dtype"."""
    out = {}
    llc = llc_bytes(cfg.device)
    for case in _cases(cfg):
        need = layer_count(case, llc) * case.cache_bytes + 2 * copy_mb(case, llc) * 2**20
        reason = missing(case.needs) or _fits(need, "its caches and the copy probe", cfg.device)
        if reason:
            out[f"{case.name} {fmt_dtype(case.dtype)}"] = reason
    return out


def plan(cfg: BenchConfig, gone: dict[str, str] | None = None) -> list[tuple[DecodeCase, str]]:
    """Every (row, "fwd") pair the run will measure, in order (`gone`: `omitted(cfg)`, computed if None)."""
    gone = omitted(cfg) if gone is None else gone
    return [(c, "fwd") for c in _cases(cfg) if f"{c.name} {fmt_dtype(c.dtype)}" not in gone]


def _max_diff(out: Any, want: Any) -> float | None:
    if not isinstance(out, Tensor) or not isinstance(want, Tensor) or out.shape != want.shape:
        return None
    return float((out.float() - want.float()).abs().max())


def _floor_value(what: str, results: dict[str, dict], speedup: dict[str, float]) -> float | None:
    if what == COPY:
        pct = results.get(SUBJECT, {}).get("pct_copy")
        return None if pct is None else pct / 100
    if what in (PAGED, SINKS):  # its speed as a fraction of the subject's: subject's time / its time
        x = speedup.get(what)
        return None if not x else 1 / x
    return speedup.get(what)


def _measure(case: DecodeCase, cfg: BenchConfig, status: Callable[[str], None]) -> dict:
    device = cfg.device
    dtype = fmt_dtype(case.dtype)
    llc = llc_bytes(device)
    layers = layer_count(case, llc)
    status(f"{case.name} {dtype}: building the caches ({layers} x {_gib(case.cache_bytes)})")
    built, skipped = build(case, device, layers=layers)
    probe, copy_bytes, copy_note = copy_probe(copy_mb(case, llc), device)
    calls: dict[str, Callable[[], object]] = {n: b.call for n, b in built.items()}
    calls[COPY] = probe
    count = len(calls)
    rounds = 0

    def on_round():
        nonlocal rounds
        rounds += 1
        status(f"{case.name} {dtype}: timing {count} candidates, round {rounds}")

    status(f"{case.name} {dtype}: timing {count} candidates (warm-up)")
    with torch.no_grad():
        timings = time_interleaved(
            calls, device, min_time=cfg.min_time, warmup=2 if device.type == "cuda" else 1, on_round=on_round
        )
        # every candidate's output against sdpa's, on the same step (one more call each)
        outs: dict[str, Any] = {}
        for n, b in built.items():
            if timings[n].error is None:
                try:
                    outs[n] = b.call()
                except (RuntimeError, ValueError):
                    pass
    want = outs.get(SDPA)
    wants = {n: b.expect(want) if b.expect is not None and isinstance(want, Tensor) else want for n, b in built.items()}
    notes = {n: b.note for n, b in built.items()}
    notes[COPY] = copy_note
    del built, calls, probe
    if device.type == "cuda":
        torch.cuda.empty_cache()

    copy_s = timings[COPY].median
    copy_gbs = None if not copy_s else copy_bytes / copy_s / 1e9
    results: dict[str, dict[str, Any]] = {}
    for n, t in timings.items():
        moved = copy_bytes if n == COPY else case.cache_bytes
        gbs = None if not t.median else moved / t.median / 1e9
        results[n] = {
            **timing_fields(t),
            "gb_s": gbs,
            "pct_copy": None if gbs is None or not copy_gbs else 100 * gbs / copy_gbs,
            "max_abs_diff": None if n == COPY else _max_diff(outs.get(n), wants.get(n)),
            "note": notes[n],
        }
    order = [n for n in [SUBJECT, PAGED, SDPA, SINKS, COPY] if n in results]
    results = {n: results[n] for n in order}
    own = results.get(SUBJECT, {}).get("median_ms")
    speedup = {
        n: r["median_ms"] / own
        for n, r in results.items()
        if n not in (SUBJECT, COPY) and own and r["median_ms"] is not None
    }
    floors = []
    for what, least in case.floors:
        value = _floor_value(what, results, speedup)
        floors.append(
            {
                "what": what,
                "candidate": SUBJECT if what == COPY else what,
                "min": least,
                "value": value,
                "pass": None if value is None else value >= least,
            }
        )
    verdicts = [f["pass"] for f in floors]
    return {
        "case": case.name,
        "label": case.label(),
        "note": case.note,
        "kind": "decode",
        "mode": "fwd",
        "dtype": dtype,
        "shape": case.shape,
        "causal": True,
        "mask": "none",
        "block_size": case.block_size,
        "cache_bytes": case.cache_bytes,
        "layers": layers,
        "llc_bytes": llc,
        "copy_bytes": copy_bytes,
        "copy_gb_s": copy_gbs,
        "subject": SUBJECT,
        "results": results,
        "speedup": speedup,
        "floors": floors,
        # True: every floor held; False: one failed; None: one could not be measured (or the row has none)
        "pass": None if not verdicts or None in verdicts else all(verdicts),
        "skipped": skipped,
    }


def _warm_up(cases: list[DecodeCase], device: torch.device) -> None:
    """One call of every candidate on two pages of cache per dtype, so one-time set-up (thread pools, kernel
    selection) lands in no row's warm-up budget."""
    seen = set()
    for case in cases:
        if case.dtype in seen:
            continue
        seen.add(case.dtype)
        built, _ = build(case.tiny(), device)
        with torch.no_grad():
            warm_up(built.values())


# main function


def run_decode(
    cfg: BenchConfig,
    *,
    on_status: Callable[[str], None] | None = None,
    on_row: Callable[[dict], None] | None = None,
    on_document: Callable[[dict], None] | None = None,
) -> dict:
    """Run a decode suite and return the result document (what `--json` writes).

    Each row: per candidate (the subject `attend:with_kvcache`, `attend:paged`, `sdpa:gqa`, and the `copy`
    probe) its median time, samples, GB/s of cache read, % of the copy's GB/s and largest difference from
    `sdpa:gqa`'s output; `speedup[name]` = that candidate's time / the subject's (above 1: the subject is
    faster); `floors`: each floor's value, minimum and verdict (`what`: "copy", the subject's fraction of the
    copy's bandwidth; "sdpa:gqa", its time over the subject's; "attend:paged", the paged speed as a fraction
    of the contiguous); `pass`: every floor held. Rows that cannot run here (no `attend.kvcache`, or caches
    that would not fit) are left out, their reasons in the document's `omitted`.
    """
    status = on_status or (lambda _msg: None)
    gone = omitted(cfg)
    pairs = plan(cfg, gone)
    status("warming up")
    _warm_up([c for c, _ in pairs], cfg.device)
    return run_rows(
        cfg, lambda pair: _measure(pair[0], cfg, status), pairs, on_row, on_document,
        kind="decode", memory="none", omitted=gone,
    )  # fmt: skip
