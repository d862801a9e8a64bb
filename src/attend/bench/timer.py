"""Median wall time after a warm-up, with the candidates interleaved.

Interleaving (one call of each candidate per round) keeps ratios honest on a shared machine: a burst
of load from elsewhere slows every candidate of the round, not one of them. On CUDA every call is
bracketed by `torch.cuda.synchronize()`, so the time is the kernels' time, not the launch's.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["Timing", "time_interleaved", "burst_calls", "samples_needed"]

# a candidate k times faster than the slowest makes about k / BURST_SHARE timed calls a round (at most 20): with
# 2, the quick suite's fast candidates spent three times the slowest's (the original einsum path's) time every
# round, and its rows 17-19 s each on 2 cores
BURST_SHARE = 4


def burst_calls(slowest: float, t: float) -> int:
    """Timed calls a round for a candidate of `t` seconds a call beside a slowest of `slowest` seconds."""
    return max(1, min(20, int(slowest / max(t, 1e-9) / BURST_SHARE)))


def samples_needed(t: float, min_time: float, min_runs: int) -> int:
    """Timed samples a candidate whose warm-up call took `t` seconds needs: `min_runs`; 2 for a call of 2 *
    `min_time` or more (a reference path at a long length); 1 for a call of 4 * `min_time` or more (the seed's
    einsum at (1, 8, 4096, 64) took 0.77 s a call on this project's 2-core VM, and 2.5 s in hours when the VM's
    fresh memory was slow: its second sample, and the rounds of bursts beside it, took the default bench from
    about 45 s to 67-74 s)."""
    if t >= 4 * min_time:
        return 1
    return min(min_runs, 2) if t >= 2 * min_time else min_runs


@dataclass
class Timing:
    """The median and every sample, in seconds; `error` when the candidate raised (OOM, kernel error)."""

    median: float | None
    samples: list[float]
    error: str | None = None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower():
        return "out of memory"
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first}"[:160]


def time_interleaved(
    fns: dict[str, Callable[[], object]],
    device: torch.device,
    *,
    min_time: float = 0.3,
    min_runs: int = 3,
    max_runs: int = 1000,
    warmup: int = 1,
    on_round: Callable[[], None] | None = None,
) -> dict[str, Timing]:
    """Time every callable: `warmup` calls each, then rounds of calls of each (the order shuffled from
    round to round) until every candidate has at least `min_runs` samples and `min_time` seconds of
    samples (or `max_runs` samples: a 100 us call reaches it after 0.1 s; with 200, the median of a small call
    moved by 5-10 % from run to run). A candidate whose warm-up call alone took 2 * `min_time` or more
    needs only 2 samples, 1 from 4 * `min_time` (`samples_needed`): the slow reference paths at long lengths would
    otherwise dominate a run.
    A candidate k times faster than the slowest makes about k / 4 calls per round (a burst, `burst_calls`) and goes on
    sampling until every candidate is done, so all medians cover the same stretch of time. A burst of two or
    more calls starts with one untimed call: quick candidates are timed with their own code and data in the
    caches, whatever their burst length (the slow ones, one call a round, pay the cold start, a few us of
    milliseconds).

    A candidate that raises is dropped with its error; the others go on.
    """
    samples: dict[str, list[float]] = {name: [] for name in fns}
    errors: dict[str, str] = {}

    def call(name: str) -> float | None:
        try:
            _sync(device)
            start = time.perf_counter()
            fns[name]()
            _sync(device)
            return time.perf_counter() - start
        except (RuntimeError, ValueError, torch.OutOfMemoryError) as exc:
            errors[name] = _error_text(exc)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            return None

    need = dict.fromkeys(fns, min_runs)
    first: dict[str, float] = {}
    for name in fns:
        for _ in range(warmup):
            if name not in errors:
                t = call(name)
                if t is not None:
                    first[name] = t
                if t is not None:  # a slow call (a reference path at a long length) needs fewer samples
                    need[name] = samples_needed(t, min_time, min_runs)

    # a quick candidate's first call may have paid one-time costs (attend validating and choosing for a new
    # signature, a lazy import): the quickest of three more calls gives the time its calls per round are sized
    # on until the first rounds have run (see `sized`).
    for name in fns:
        if name not in errors and first.get(name, min_time) < min_time:
            again = [t for t in (call(name) for _ in range(3)) if t is not None]
            if again:
                first[name] = min(again)

    # calls per round: a candidate k times faster than the slowest runs about k / 4 calls a round, so every
    # candidate gathers its samples over the same stretch of time (a burst of load from elsewhere then hits
    # all of them alike, not whichever happened to be sampling then)
    def sized(times: dict[str, float]) -> dict[str, int]:
        slowest = max(times.values(), default=0.0)
        return {n: burst_calls(slowest, times.get(n, slowest)) for n in fns}

    # The first call of a burst runs with another candidate's data in the caches: when its time was kept, two
    # candidates running the same code, one sized on a noisy first call to 2 calls a round and the other to 3,
    # had medians 9 us apart at (1, 8, 16, 64) fwd+bwd (100 us). So a burst of 2 or more calls starts with one
    # untimed call, and after a few rounds the bursts are sized again on the medians.
    reps = sized(first)
    resize_after = 3

    def done(name: str) -> bool:
        s = samples[name]
        return name in errors or len(s) >= max_runs or (len(s) >= need[name] and sum(s) >= min_time)

    names = list(fns)
    order = random.Random(0)  # seeded: a rerun makes the same calls in the same order
    while not all(done(n) for n in names):
        # a new order every round: no candidate always runs right after the same neighbour (a rotation would
        # keep the neighbours; what ran just before can cost the next call tens of microseconds)
        for name in order.sample(names, len(names)):
            # fast candidates (reps > 1) go on sampling until every candidate is done
            if name in errors or len(samples[name]) >= max_runs or (done(name) and reps[name] == 1):
                continue
            burst = reps[name]
            for n in range(burst + (burst > 1)):
                t = call(name)
                if t is None:
                    break
                if n or burst == 1:  # a burst's first call only warms up (with another candidate's data in the
                    samples[name].append(t)  # caches), so candidates of any burst length are timed alike
        if on_round is not None:
            on_round()
        resize_after -= 1
        if resize_after == 0:
            reps = sized({n: statistics.median(s) for n, s in samples.items() if s and n not in errors})
    return {
        name: Timing(
            median=statistics.median(s) if s and name not in errors else None,
            samples=s,
            error=errors.get(name),
        )
        for name, s in samples.items()
    }
