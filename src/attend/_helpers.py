"""Small helpers shared by more than one module (house style: no `utils.py`)."""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import AbstractContextManager
from typing import Any, TypeVar

import torch

from . import features

T = TypeVar("T")

__all__ = [
    "exists", "default", "fmt_dtype", "fmt_dtypes", "fmt_shape", "accum_dtype", "functorch_wrapped", "DIM_LEGEND",
    "autocast_on", "any_autocast", "no_autocast", "autocast_inputs", "differentiable", "run_split", "split_threads",
    "one_op_thread", "per_thread_counts",
]

DIM_LEGEND = (
    "b batch, h query heads, g key/value heads, i query positions, j key positions, "
    "d head dim (q and k), e value head dim"
)


def exists(x: Any) -> bool:
    return x is not None


def default(x: T | None, d: T) -> T:
    return x if x is not None else d


def fmt_dtype(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def fmt_dtypes(dtypes) -> str:
    return ", ".join(sorted(fmt_dtype(t) for t in dtypes))


def fmt_shape(shape) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


def accum_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmax statistics are kept in float32, or float64 for float64 inputs (contract item 4)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


_is_wrapped = getattr(getattr(torch._C, "_functorch", None), "is_functorch_wrapped_tensor", None)
features.register(
    "functorch_wrapped_query",
    api="torch._C._functorch.is_functorch_wrapped_tensor",
    since="2.0",
    without="check_finite's guard cannot tell vmap's tensors (whose values Python cannot read) from others: under "
    "vmap it raises torch's error instead of skipping the guard, as it does under torch.compile",
    present=lambda: _is_wrapped is not None,
)


def functorch_wrapped(*tensors: torch.Tensor) -> bool:
    """Is any of `tensors` a torch.func transform's wrapper (vmap's batched tensor, grad's tracking tensor)?
    Checked by capability. Not traceable by dynamo: check `torch.compiler.is_compiling()` first."""
    if _is_wrapped is not None:
        for t in tensors:  # (a loop, not any(): this runs on every training call's fast path)
            if _is_wrapped(t):
                return True
    return False


def differentiable(t: torch.Tensor | None) -> bool:
    """Can a graph recorded now reach t? Not for a torch.func wrapper whose transform has exited: vjp_fn
    (torch.func.vjp, jacrev) runs the backward after vjp returned, and its saved inputs are such dead
    wrappers (functorch's maybe_get_level gives -2 for them); they still say requires_grad. A custom backward
    takes its second-order path (`grad2.recompute_grads`) only for inputs this says yes to."""
    if t is None or not t.requires_grad:
        return False
    functorch = getattr(torch._C, "_functorch", None)
    return functorch is None or torch.compiler.is_compiling() or functorch.maybe_get_level(t) != -2


@functools.lru_cache(maxsize=None)
def cuda_capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


# autocast: every door casts its inputs the same way (`autocast_inputs`) and every kernel runs with autocast off
# (`no_autocast`), owning its precision as `torch.amp.custom_fwd` does. Checked by capability on torch >= 2.4:
# `torch.amp.is_autocast_available` and `torch._C._is_any_autocast_enabled` may be missing.

_AUTOCAST_DEVICES = frozenset({"cpu", "cuda"})
_autocast_available = getattr(torch.amp, "is_autocast_available", lambda d: d in ("cpu", "cuda"))


def autocast_on(device_type: str) -> bool:
    """Is autocast enabled for `device_type`?"""
    if device_type in _AUTOCAST_DEVICES:  # the common devices: one C call (this runs three times per call)
        return torch.is_autocast_enabled(device_type)
    return _autocast_available(device_type) and torch.is_autocast_enabled(device_type)


# autocast on for any device? One C call where torch has it (a false "yes" only costs the slow path)
def any_autocast_by_device() -> bool:
    """`any_autocast` where torch has no `_is_any_autocast_enabled`: device by device."""
    return any(autocast_on(d) for d in _AUTOCAST_DEVICES)


any_autocast: Callable[[], bool] = getattr(torch._C, "_is_any_autocast_enabled", any_autocast_by_device)
features.register(
    "any_autocast_query",
    api="torch._C._is_any_autocast_enabled",
    since="2.4",
    without="autocast is checked device by device (CPU and CUDA), a few hundred ns more per call",
    present=lambda: getattr(torch._C, "_is_any_autocast_enabled", None) is not None,
)


def no_autocast(device_type: str) -> AbstractContextManager[Any]:
    """A context with autocast off for `device_type` (a no-op context when it is off already)."""
    return torch.autocast(device_type, enabled=False) if autocast_on(device_type) else contextlib.nullcontext()


def autocast_inputs(*tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """Cast float tensors to the autocast dtype when autocast is on for the first tensor's device.

    Attention is a lower-precision op under autocast, as `F.scaled_dot_product_attention` is: every
    floating input except float64 is cast (PyTorch's rule for such ops), so q, k, v that arrive in
    different dtypes (a float32 q from a LayerNorm, bfloat16 k, v from a Linear) meet in one dtype.
    The softmax statistics stay in float32 inside every backend (contract item 4).
    """
    if not any_autocast():  # one C call: autocast is off for every device (the common case)
        return tensors
    first = tensors[0] if tensors and isinstance(tensors[0], torch.Tensor) else next(
        (t for t in tensors if isinstance(t, torch.Tensor)), None
    )
    if first is None or not autocast_on(first.device.type):
        return tensors
    dtype = torch.get_autocast_dtype(first.device.type)
    return tuple(
        t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64 else t
        for t in tensors
    )


# Work split across threads (a busy CPU)
#
# Only while the CPU is contended (`cpu_contended`): on a quiet machine the split cost up to a third more
# (sdpa's query blocks, (1, 8, 2048, 64) causal + padding training: 150 ms against 113 ms, 2-vCPU EPYC,
# benchmarks/contention_ab.py), under two busy processes per core it gained 1.4-4x.
#
# A loop of independent units (chunked's query tiles, sdpa's query blocks) is dealt to `torch.get_num_threads()`
# threads, each running its ATen ops with ONE intra-op thread, instead of one thread whose every op is an OpenMP
# parallel region. A region ends in a barrier that waits for its slowest thread: when other processes hold the
# cores that is a descheduled thread, once per op (tens of ops per tile), and chunked fell to 0.16-0.27x direct
# SDPA under load (shared/research/contention.md: 655 ms with 2 threads against 415 ms with 1). Split, no op
# waits on another thread; the threads meet once, at the end. Needs per-thread intra-op thread counts (ATen's
# OpenMP backend: `PER_THREAD`). The units are dealt in a fixed snake order (0, 3, 4, 7 | 1, 2, 5, 6): the same
# thread adds the same units every call (deterministic sums), and units in order of cost balance.

_POOL: Any = None
_POOL_LOCK = threading.Lock()
_STATE: dict[str, bool] = {}


def _probe_per_thread() -> bool:
    """Does `torch.set_num_threads` in one thread leave another thread's count alone (ATen's OpenMP backend:
    omp_set_num_threads and MKL's local count are per thread)? Tried in a fresh thread, undone there."""
    before, seen = torch.get_num_threads(), {}

    def work() -> None:
        torch.set_num_threads(1)
        seen["here"] = torch.get_num_threads()

    t = threading.Thread(target=work, name="attend-probe", daemon=True)
    t.start()
    t.join()
    after = torch.get_num_threads()
    if after != before:  # a process-wide count: put it back
        torch.set_num_threads(before)
    return seen.get("here") == 1 and after == before


def per_thread_counts() -> bool:
    """`_probe_per_thread`, found once (at the first loop that could split)."""
    found = _STATE.get("per_thread")
    if found is None:
        found = _STATE["per_thread"] = _probe_per_thread()
    return found


PER_THREAD = features.register(
    "per_thread_intra_op",
    api="per-thread intra-op thread counts (torch.set_num_threads in ATen's OpenMP backend)",
    since="2.0",
    without="chunked's tiles and sdpa's query blocks run in the calling thread with torch's intra-op parallelism "
    "inside each op (several times slower when other processes hold the cores)",
    present=per_thread_counts,
)


# CPU pressure (Linux PSI): the share of time in which some runnable task waited for a CPU. A process that has
# the machine to itself (its intra-op threads <= cores) reads a few %; with two busy processes per core beside it,
# 60-80 % (2-vCPU VM). The share is taken over the interval since the previous read (PSI's cumulative `total`, in
# microseconds), read at most every half second: PSI's own 10-second average lagged 6-8 s behind busy processes
# that had just started (a loop timed in those seconds ran unsplit, at 0.12x SDPA instead of 0.7x). After a gap
# of more than `_FRESH_S` the interval would average over stale time, so the 10-second average decides that once.
# Without PSI, the 1-minute load average against the core count (it lags a minute behind).
_PRESSURE = "/proc/pressure/cpu"
_CONTENDED_PERCENT = 30.0
_CONTENDED_LOAD = 1.5  # load average per core
_FRESH_S = 2.0
_CONTENTION: list = [-1.0, False, None]  # (when read, contended, PSI's total then)


def _read_contention(since: float, total_then: int | None, now: float) -> tuple[bool, int | None]:
    """(contended, PSI's total now); `since`, `total_then`: the previous read's time and total."""
    try:
        with open(_PRESSURE) as f:
            some = dict(field.split("=") for field in f.readline().split()[1:])  # avg10=66.85 ... total=2121403533
        total = int(some["total"])
        if total_then is not None and 0 < now - since <= _FRESH_S:
            return (total - total_then) / 1e4 / (now - since) > _CONTENDED_PERCENT, total
        return float(some["avg10"]) > _CONTENDED_PERCENT, total
    except (OSError, KeyError, ValueError):
        pass
    try:
        return os.getloadavg()[0] > _CONTENDED_LOAD * (os.cpu_count() or 1), None
    except (AttributeError, OSError):  # no load average on this platform
        return False, None


def cpu_contended() -> bool:
    """Are other processes competing for this machine's cores now (`_PRESSURE`)? Cached for half a second."""
    now = time.monotonic()
    when, contended, total = _CONTENTION
    if now - when > 0.5:
        contended, total = _read_contention(when, total, now)
        _CONTENTION[:] = [now, contended, total]
    return contended


# below this many multiply-adds (b * h * i * j * d) a loop is not split: handing work to a thread that the busy
# machine has descheduled costs up to a time slice (milliseconds), more than a small call's whole run
SPLIT_MIN_WORK = 1 << 26


def split_threads(like: torch.Tensor, units: int, deterministic: bool = False, work: int = 0) -> int:
    """How many threads a loop of `units` independent CPU units on `like`'s device uses (1: no split). Only while
    `cpu_contended`, for a loop of at least `SPLIT_MIN_WORK` multiply-adds (`work`); never for a `deterministic`
    call or under torch.use_deterministic_algorithms (a split adds dk, dv in another order: the same values to
    rounding, not bit for bit)."""
    if units < 2 or work < SPLIT_MIN_WORK:
        return 1
    if torch.compiler.is_compiling() or like.device.type != "cpu" or functorch_wrapped(like):
        return 1
    if deterministic or torch.are_deterministic_algorithms_enabled():
        return 1
    threads = torch.get_num_threads()
    if threads < 2 or not cpu_contended() or not per_thread_counts():
        return 1
    return min(threads, units)


def one_op_thread(fn: Callable[[], T]) -> T:
    """fn(), its ATen ops single-threaded in the calling thread (torch's intra-op thread count is per thread in its
    OpenMP backend, `per_thread_intra_op`). For the serial steps of a split loop on a busy CPU (making and summing
    accumulators, concatenating blocks): each parallel op's barrier waited for a descheduled thread, which made
    those few memory-bound ops a quarter of a split call's time there. (A function, not a context manager: callers
    that torch.compile traces call it only when they split, which they never do while tracing, and dynamo 2.9
    refused a graph break inside any generator context manager, even one that did nothing.)"""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn()
    finally:
        torch.set_num_threads(threads)


def _single_threaded(fn: Callable, grad: bool, inference: bool, units: list, into: Any, zeroed: bool) -> Any:
    """Run `fn` over `units` with the caller's grad / inference mode and one intra-op thread; with `zeroed`, into
    zeroed copies of the accumulators `into` made here (in this thread), which it returns."""

    def run() -> Any:
        mine = tuple(None if t is None else torch.zeros_like(t) for t in into) if zeroed and into is not None else into
        with torch.inference_mode() if inference else torch.set_grad_enabled(grad):
            for unit in units:
                fn(*unit) if mine is None else fn(*unit, mine)
        return mine

    return one_op_thread(run)


def _pool(workers: int) -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL._max_workers < workers:
            _POOL = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="attend-split")
        return _POOL


def run_split(units: list, fn: Callable, ways: int, into: tuple | None = None) -> None:
    """fn(*unit[, into]) for every unit; with `ways` > 1 dealt to that many threads (the caller's one of them).
    `into`: accumulators the units add into (tensors or None); every thread but the caller's makes its own zeroed
    copies, added in at the end (in the caller's thread, its ops single-threaded: `one_op_thread`)."""
    if ways <= 1:
        for unit in units:
            fn(*unit) if into is None else fn(*unit, into)
        return
    shares: list[list] = [[] for _ in range(ways)]
    for n, unit in enumerate(units):
        turn, place = divmod(n, ways)
        shares[place if turn % 2 == 0 else ways - 1 - place].append(unit)
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()
    pool = _pool(ways - 1)
    futures = [pool.submit(_single_threaded, fn, grad, inference, share, into, True) for share in shares[1:]]
    try:
        _single_threaded(fn, grad, inference, shares[0], into, False)
    finally:
        wait(futures)  # every thread done before anything (a result, an error) leaves here
    privates = [future.result() for future in futures]  # (re-raises the first error)
    if into is None:
        return

    def add_in() -> None:
        for mine in privates:
            for total, part in zip(into, mine):
                if total is not None:
                    total.add_(part)

    one_op_thread(add_in)
