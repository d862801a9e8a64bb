"""What a run will cost, said before it starts: an estimate of `attend bench`'s wall time from its cases.

Shape legend: b batch, h query heads, g key/value heads, i query positions, j key positions,
d head dim (q and k), e value head dim.

The machine is measured first, in a fraction of a second: `calibrate` times a direct SDPA call at a middle
size (its FLOP/s) and a copy (its bytes/s). Each planned row then gets a time per call for each of its
candidates (its FLOPs, by the flash-attention convention, over that rate; a candidate that holds the whole
(i, j) score matrix is counted slower; a decode row's cache bytes over the copy's rate), and `timer_seconds`
replays what `timer.time_interleaved` does with such calls: the warm-up calls, then rounds of bursts until
every candidate has `min_time` seconds (and its 2 or 3 samples). Peak memory on CPU adds a child process per
row (its start, torch's import and one call per measured candidate). The result is an estimate, good to a
factor of about two: enough to tell a one-minute run from a half-hour one.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .flops import attended_pairs, attention_flops
from .harness import BenchConfig, default_dtype
from .timer import burst_calls, samples_needed

__all__ = ["Machine", "calibrate", "timer_seconds", "estimate_seconds", "fmt_duration"]

CHILD_S = 3.0  # a peak-memory child process: interpreter start, torch's import, a tiny warm-up
ROW_S = 0.1  # building a row's inputs and its bookkeeping
WARM_UP_S = 1.0  # a suite's warm-up (tiny calls of every candidate)
CALL_S = 30e-6  # the least a call costs (validation, dispatch, a small kernel)
# a candidate that materialises the (b, h, i, j) scores pays, besides the fused kernel's time, this many
# seconds per byte of scores a forward pass (fresh pages, written and read a few times; fitted on 2 CPU cores:
# the seed's einsum 2 ns, SDPA's math path 1.2 ns); forward + backward 2.5 times as much
DENSE_S_PER_BYTE = {"cpu": 2e-9}
DENSE_COPIES = 6  # elsewhere (CUDA): the scores written and read this many times at the copy's rate
CHUNKED_SLOWDOWN = 1.5  # the chunked backend against the fused kernel (CPU, 1k-4k positions)
# structured candidates that do more than the plain call (CPU: soft-capping and sinks run the chunked path)
EXTRA = {"attend:softcap": 2.0, "attend:sinks": 1.5, "attend:lse": 1.2, "attend:l2": 1.3}
MAX_ROUNDS = 20000


@dataclass(frozen=True)
class Machine:
    """What `calibrate` measured: attention FLOP/s of a direct SDPA call, a copy's bytes/s, and the bytes/s
    `torch.randn` fills (a decode row's caches)."""

    flops_per_s: float
    bytes_per_s: float
    randn_bytes_per_s: float = 1e9


def _best(call: Callable[[], object], device: torch.device, n: int = 3) -> float:
    call()
    best = math.inf
    for _ in range(n):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return max(best, 1e-9)


def calibrate(device: torch.device, dtype: torch.dtype | None = None) -> Machine:
    """Measure this machine now (about 0.2 s on 2 quiet CPU cores): SDPA's FLOP/s at (1, 8, 1024, 64) on CPU,
    (4, 16, 2048, 128) on CUDA, a 64 MiB copy's bytes/s and a 16 MiB `torch.randn`'s."""
    dtype = dtype or default_dtype(device)
    b, h, n, d = (1, 8, 1024, 64) if device.type != "cuda" else (4, 16, 2048, 128)
    with torch.no_grad():
        q = torch.randn(b, h, n, d, device=device, dtype=dtype)
        seconds = _best(lambda: F.scaled_dot_product_attention(q, q, q), device)
        src = torch.ones(16 * 2**20, device=device)
        dst = torch.empty_like(src)
        copy_s = _best(lambda: dst.copy_(src), device)
        randn_s = _best(lambda: torch.randn(4 * 2**20, device=device), device, n=2)
    flops = attention_flops({"b": b, "h": h, "i": n, "j": n, "d": d, "e": d}, False, "fwd")
    return Machine(flops / seconds, src.nbytes / copy_s, 16 * 2**20 / randn_s)


def _fused_s(flops: float, pairs: float, mode: str, m: Machine) -> float:
    """Seconds of a fused kernel's call: `flops` at the calibrated rate, scaled by the work per head (`pairs`,
    (query, key) pairs a (batch, head)): larger calls run nearer the peak (fitted on 2 CPU cores: 1.5x the
    (1, 8, 1024, 64) rate at 2k positions, 2-2.8x at 4k-16k), and a backward pass more efficiently."""
    scale = min(2.5, max(0.5, (pairs / 2**20) ** 0.25)) * (1.3 if mode == "fwdbwd" else 1.0)
    return CALL_S + flops / (m.flops_per_s * scale)


def _dense_s(score_bytes: float, mode: str, device: torch.device, m: Machine) -> float:
    per_byte = DENSE_S_PER_BYTE.get(device.type, DENSE_COPIES / m.bytes_per_s)
    return score_bytes * per_byte * (2.5 if mode == "fwdbwd" else 1.0)


def timer_seconds(calls: list[float], min_time: float, min_runs: int = 3, max_runs: int = 1000) -> float:
    """Wall seconds `time_interleaved` spends on candidates whose calls take `calls` seconds each: one warm-up
    call each (three more for a quick one), then rounds (a candidate k times faster than the slowest makes
    about k / 4 timed calls a round, after one untimed call) until each has `min_time` seconds of samples and
    `min_runs` of them (fewer for slow calls: `timer.samples_needed`), or `max_runs`."""
    if not calls:
        return 0.0
    clock = sum(t + (3 * t if t < min_time else 0.0) for t in calls)
    slowest = max(calls)
    reps = [burst_calls(slowest, t) for t in calls]
    need = [samples_needed(t, min_time, min_runs) for t in calls]
    have = [0] * len(calls)

    def done(k: int) -> bool:
        return have[k] >= max_runs or (have[k] >= need[k] and have[k] * calls[k] >= min_time)

    for _ in range(MAX_ROUNDS):
        if all(done(k) for k in range(len(calls))):
            break
        for k, t in enumerate(calls):
            if have[k] >= max_runs or (done(k) and reps[k] == 1):
                continue
            clock += (reps[k] + (reps[k] > 1)) * t
            have[k] += reps[k]
    return clock


def fmt_duration(seconds: float) -> str:
    """`45 s`, `3 min`, `1 h 20 min`: the size of a wait, not a stopwatch."""
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    minutes = seconds / 60
    if minutes < 90:
        return f"{round(minutes)} min"
    return f"{int(minutes // 60)} h {round(minutes % 60)} min"


# each suite kind: (candidates' seconds a call, candidates whose peak memory is measured) per planned row


def _attention_row(case, mode: str, cfg: BenchConfig, m: Machine) -> tuple[list[float], list[float]]:
    from ..dispatch import get_backend
    from .run import default_backends

    s = case.shape
    pairs = s["b"] * attended_pairs(s["i"], s["j"], case.causal)
    fused = _fused_s(attention_flops(s, case.causal, mode), pairs, mode, m) * (1.3 if case.mask != "none" else 1.0)
    dtype = cfg.dtype or case.dtype or default_dtype(cfg.device)
    scores = s["b"] * s["h"] * s["i"] * s["j"] * max(4, torch.finfo(dtype).bits // 8)
    dense = fused + _dense_s(scores, mode, cfg.device, m)
    backends = [n for n in default_backends(cfg) if cfg.device.type in get_backend(n).caps]
    slow = {"sdpa:math": dense, "einsum": dense, "chunked": fused * CHUNKED_SLOWDOWN}
    calls = [fused, fused] + ([fused] if cfg.suite == "small" else [])  # attend, attend:unchecked, attend:module
    calls += [slow.get(n, fused) for n in backends]
    calls += [dense, fused]  # seed:einsum, seed:sdpa
    calls += [fused] if cfg.device.type == "cuda" else []  # torch:sdpa
    calls += [fused / 2]  # the matmul ceiling
    measured = {"none": [], "attend": [fused]}.get(cfg.memory, calls[:-1])
    return calls, measured


def _structured_row(case, mode: str, cfg: BenchConfig, m: Machine) -> tuple[list[float], list[float]]:
    b, n = (1, case.tokens) if case.kind in ("documents", "varlen") else (len(case.lengths), case.lengths[0])
    per_pair = 2.0 * case.h * 2 * case.d * (3.5 if mode == "fwdbwd" else 1.0)

    def seconds(name: str) -> float:
        if name in ("attend:documents", "varlen_attn"):
            pairs = sum(attended_pairs(x, x, True) for x in case.lengths)
        elif name == "attend:padded":
            pairs = len(case.lengths) * attended_pairs(max(case.lengths), max(case.lengths), True)
        elif name == "sdpa:dense-mask":  # the full (n, n), masked, not skipped
            pairs = n * n
        elif name == "attend:window":
            pairs = b * n * (case.window + 1)
        elif name in ("gigagan:einsum", "gemma2:eager"):
            fused = _fused_s(b * n * n * per_pair, b * n * n, mode, m)
            return fused + _dense_s(b * case.h * n * n * 4, mode, cfg.device, m)
        else:
            pairs = b * attended_pairs(n, n, case.kind != "l2" and name != "attend:dot")
        return _fused_s(pairs * per_pair, pairs, mode, m)

    calls = [seconds(name) * EXTRA.get(name, 1.0) for name in (case.subject, *case.baselines)]
    measured = {"none": [], "attend": calls[:1]}.get(cfg.memory, calls)
    return calls, measured


def _decode_row(case, cfg: BenchConfig, m: Machine) -> tuple[list[float], float]:
    from .decode import copy_mb, layer_count, llc_bytes

    llc = llc_bytes(cfg.device)
    layers = layer_count(case, llc)
    step = CALL_S + case.cache_bytes / m.bytes_per_s
    copy = copy_mb(case, llc) * 2**20 / m.bytes_per_s
    # random caches, their copies for the layers and the paged pools: about 4 randn fills' worth (fitted)
    build = 4 * layers * case.cache_bytes / m.randn_bytes_per_s
    return [step] * 4 + [copy], build


def estimate_seconds(cfg: BenchConfig, machine: Machine | None = None) -> tuple[int, float]:
    """(rows, estimated wall seconds) of `run_suite(cfg)` here; `machine`: `calibrate(cfg.device)` if None."""
    from .cases import CONTENTION_SUITES, DECODE_SUITES, STRUCTURED_SUITES
    from .run import plan

    m = machine or calibrate(cfg.device, cfg.dtype)
    pairs = plan(cfg)
    cpu_child = cfg.device.type != "cuda"
    total = WARM_UP_S
    for case, mode in pairs:
        total += ROW_S
        if cfg.suite in DECODE_SUITES:
            calls, build = _decode_row(case, cfg, m)
            total += build + timer_seconds(calls, cfg.min_time)
            continue
        if cfg.suite in CONTENTION_SUITES:
            per_head = case.b * attended_pairs(case.i, case.i, case.causal)
            t = _fused_s(attention_flops(case.shape, case.causal, case.mode), per_head, case.mode, m)
            t *= 1.3 if case.causal else 1.0
            if mode == "loaded":  # the cores shared with the busy processes: every call slower
                t *= 1 + cfg.load / max(1, torch.get_num_threads())
            total += timer_seconds([t, t], cfg.min_time)
            continue
        if cfg.suite in STRUCTURED_SUITES:
            calls, measured = _structured_row(case, mode, cfg, m)
        else:
            calls, measured = _attention_row(case, mode, cfg, m)
        total += timer_seconds(calls, cfg.min_time)
        if measured:  # peak memory: a child process on CPU (each measured call once, the first twice)
            total += (CHILD_S if cpu_child else 0.0) + sum(measured) + measured[0]
    if cfg.suite in CONTENTION_SUITES:
        from .contention import SETTLE_S

        total += SETTLE_S
    return len(pairs), total
