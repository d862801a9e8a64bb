"""The registry, the per-device priority, `select()` and `explain()`.

Auto = the first eligible backend in the device's priority order. A named backend runs or raises a
`ValueError` with its reasons: never a silent fallback. The dispatcher reads only each backend's declared
capabilities, `reasons_unsupported` and `intermediate_bytes`; it never looks inside a backend.

Memory budget: auto skips a backend whose largest (i, j)-sized intermediate (its `intermediate_bytes`)
exceeds `MEMORY_BUDGET_BYTES`, with the reason in `explain`; the memory-bounded `chunked` backend then
runs. Set `attend.dispatch.MEMORY_BUDGET_BYTES` to change it. A named backend ignores the budget.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import threading
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

import torch
from torch import Tensor

from . import features
from ._helpers import accum_dtype, any_autocast, functorch_wrapped, no_autocast
from .backends import REGISTERED
from .backends.base import Backend, fmt_bytes
from .inputs import AttnInputs, Options, validate
from .masks import dead_keys, lower, rows_that_see, zero_keys

__all__ = [
    "PRIORITY",
    "NoBackendError",
    "AttendFallbackWarning",
    "Report",
    "register_backend",
    "get_backend",
    "list_backends",
    "select",
    "fallbacks",
    "explain_inputs",
    "clear_cache",
    "call",
    "run",
    "CACHE_SIZE",
    "MEMORY_BUDGET_BYTES",
    "output_is_finite",
]

log = logging.getLogger("attend")

# what a backend's `run` and the run policy return: out (b, h, i, e), or (out, lse (b, h, i)) with `return_lse`
Result = Tensor | tuple[Tensor, Tensor]

# First eligible wins. Evidence for each order sits beside it; rerun `attend bench` to refresh it.
PRIORITY: dict[str, tuple[str, ...]] = {
    # CPU (2 vCPU AMD EPYC, AVX-512, torch 2.13.0+cpu, 2026-11-27, quiet machine), (1, 8, 4096, 64) float32
    # forward: sdpa:flash 219.5 ms; sdpa:math 3.40x that, the seed's einsum 4.20x; causal + key padding:
    # sdpa:flash (query blocks) 183.9 ms, SDPA with a dense mask 1.57x (benchmarks/results/cpu.json). Rerun
    # 2026-12-02 16:33 UTC on a 2-vCPU Intel Xeon (same torch, load 0.63): sdpa:flash still the fastest eligible
    # on Q1-Q2 and level on Q3 (direct SDPA 1.01x, 0.98x, 1.67x of attend's time; chunked 1.51x, 1.60x, 1.02x,
    # within this VM's run-to-run noise; 0.96x at 15:22; benchmarks/results/cpu-quick.json).
    # sdpa:math beats einsum where flash can't run (dropout, e != d, bias grad; ad hoc at
    # (1, 8, 1024-2048, 64) and (4, 8, 512, 64): 1.1-1.9x).
    # chunked (same machine, 2026-11-27; benchmarks/chunked.md): after sdpa:math by default, ahead of it
    # for large shapes (PROMOTE), and whenever math would exceed MEMORY_BUDGET_BYTES. Not ahead of
    # sdpa:flash for causal + key padding: 0.78x-0.95x its query-block path on a quiet machine.
    # return_lse and sinks (2026-12-07, 2-vCPU AMD EPYC, torch 2.13.0+cpu, `attend bench --suite vocabulary`):
    # sdpa:flash's lse path costs 1.00x / 0.94x of the plain call fwd / fwd+bwd at (4, 8, 1024, 64), where chunked
    # (the first that gave it) cost 2.1x / 1.7x (benchmarks/results/issue23-floors.txt): the order stands.
    "cpu": ("sdpa:flash", "sdpa:math", "chunked", "einsum"),
    # CUDA: NOT MEASURED yet (no GPU in the sessions so far). PyTorch's own default order, with cuDNN
    # after the two FlashAttention/CUTLASS kernels because of its open correctness bugs
    # (pytorch#196678 NaN grad_q, pytorch#193893 corrupted greedy decoding).
    # chunked: not measured on CUDA; after sdpa:math like on CPU, reached when math exceeds the budget.
    "cuda": ("sdpa:flash", "sdpa:efficient", "sdpa:cudnn", "sdpa:math", "chunked", "einsum"),
}
# Devices without their own list: the generic order.
DEFAULT_PRIORITY: tuple[str, ...] = ("sdpa:flash", "sdpa:efficient", "sdpa:math", "chunked", "einsum")

# Shape-dependent reorderings: (device, backend, moved ahead of, condition on the inputs). Each carries
# its one-line reason and evidence.
PROMOTE: list[tuple[str, str, str, Callable[[AttnInputs], bool]]] = [
    # CPU, quiet machine, (1, 8, n, 64) float32 with dropout 0.1 (no fused CPU kernel takes dropout):
    # chunked / sdpa:math = 1.07x at n=128, 1.24x at 256, 1.87x at 512, 3.5x at 2048 (0.79x at 64).
    # On a machine loaded by other processes math won at every size (chunked's per-tile ops suffer more).
    ("cpu", "chunked", "sdpa:math", lambda inp: inp.i * inp.j >= 256 * 256),
    # CPU training, causal with a mask, d >= 128, i >= 4096: sdpa:flash runs in query blocks there (causal and
    # a mask do not combine in one call), each block against its key prefix. Ad hoc, 2-vCPU Intel Xeon, torch
    # 2.13.0+cpu, 2026-12-02, interleaved, fwd+bwd, key padding of the last 20 %, chunked / sdpa:flash:
    # 14:48 UTC (load 0.8-1.5, the blocks' gradients added in place by _BlockGrads): 1.25x at (1, 16, 8192, 128),
    # 1.12x at (1, 16, 4096, 128), 1.03x at (1, 16, 2048, 128), 0.93x at (1, 8, 8192, 64). 14:05 UTC (load
    # 1.2-1.9, before _BlockGrads there): 1.32x, 1.22x, 1.07x, 1.05x; 0.77x at (4, 16, 1024, 128), 0.93x at
    # (1, 8, 4096, 64); forward only 0.94x and causal without a mask 0.78x at (1, 16, 8192, 128).
    ("cpu", "chunked", "sdpa:flash", lambda inp: (
        inp.needs_grad and inp.causal and inp.mask is not None and inp.bias is None and inp.d >= 128
        and inp.i >= 4096
    )),  # fmt: skip
]

# Auto skips a backend whose largest (i, j)-sized intermediate is above this many bytes (1 GiB): at
# (1, 8, 4096, 4096) float32 the scores alone are 0.5 GiB; at 16k tokens 8 GiB. `chunked` needs none.
MEMORY_BUDGET_BYTES: int = 2**30

# Auto landing here on these devices means a slow path: logged once with the reasons.
SLOW: dict[str, frozenset[str]] = {"cuda": frozenset({"einsum", "sdpa:math"})}

# Signatures whose validation and choice are kept (`call`), and signatures with backends that failed at run
# time (`_run`). Both bounded: a server decoding for days with a key length growing by one per step keeps at
# most this many of each (the oldest goes first).
CACHE_SIZE: int = 512


class _Cached(NamedTuple):
    value: Any  # _Entry
    generation: int


_registry: dict[str, Backend] = {b.name: b for b in REGISTERED}
_cache: dict[tuple, _Cached] = {}
# inp.signature() -> {backend name: (why it failed, out of memory?)}
_failed: dict[tuple, dict[str, tuple[str, bool]]] = {}
_logged: set[tuple] = set()
_lock = threading.Lock()
# bumped whenever the registry or the priority changes, so a choice computed before the change is never
# cached after it (threads may select while another registers a backend)
_generation = 0


class NoBackendError(RuntimeError):
    """No registered backend can run these inputs. The message lists every backend's reasons."""


class AttendFallbackWarning(RuntimeWarning):
    """Auto mode: the chosen backend failed at run time and the call was retried on another one."""


@dataclass(frozen=True)
class Report:
    """What `explain` returns.

    `backend`: the name auto picks (or the pinned one), None when nothing can run.
    `reasons`: for every registered backend, in priority order, the reasons it cannot run the inputs
    (an empty list when it can).
    """

    backend: str | None
    reasons: dict[str, list[str]]
    inputs: str = ""
    hint: str = ""
    candidates: tuple[str, ...] = field(default_factory=tuple)
    requested: str | None = None  # the backend the caller named, if any
    lowering: list[str] = field(default_factory=list)  # how the chosen backend runs l2, window, documents

    def __str__(self) -> str:
        width = max([len(n) for n in self.reasons] + [7])
        lines = ["inputs:", self.inputs, ""]
        lines.append(f"{'backend':<{width}}  status")
        lines.append(f"{'-' * width}  {'-' * 40}")
        for name, reasons in self.reasons.items():
            if name == self.backend:
                status = "SELECTED"
            elif not reasons:
                status = "eligible" if name in self.candidates else "eligible (not in this device's auto order)"
            else:
                status = "no: " + reasons[0]
            lines.append(f"{name:<{width}}  {status}")
            for extra in reasons[1:]:
                lines.append(f"{'':<{width}}      {extra}")
        if self.backend is None:
            lines.append("")
            if self.requested is not None:
                lines.append(f"the named backend {self.requested!r} cannot run these inputs (its reasons are above)")
            else:
                lines.append("no backend can run these inputs")
        if self.lowering:
            lines.append("")
            lines.extend(f"lowering: {note}" for note in self.lowering)
        return "\n".join(lines)


# helpers


def _priority(device_type: str) -> tuple[str, ...]:
    order = PRIORITY.get(device_type, DEFAULT_PRIORITY)
    return tuple(n for n in order if n in _registry)


def _promotions(inp: AttnInputs, name: str, order: tuple[str, ...]) -> list[str]:
    """Backends that PROMOTE moves ahead of `name` for these inputs (each listed after `name` in `order`)."""
    return [
        promoted
        for device, promoted, ahead_of, applies in PROMOTE
        if ahead_of == name
        and device == inp.device.type
        and promoted in order
        and order.index(promoted) > order.index(name)
        and applies(inp)
    ]


def _auto_order(inp: AttnInputs) -> tuple[str, ...]:
    """The device's priority with the shape-dependent moves of PROMOTE applied."""
    order = list(_priority(inp.device.type))
    for device, name, ahead_of, applies in PROMOTE:
        applicable = device == inp.device.type and name in order and ahead_of in order
        if applicable and order.index(name) > order.index(ahead_of) and applies(inp):
            order.remove(name)
            order.insert(order.index(ahead_of), name)
    return tuple(order)


def _budget_reasons(backend: Backend, inp: AttnInputs) -> list[str]:
    """Why auto skips `backend` on memory grounds (empty when it fits MEMORY_BUDGET_BYTES): the intermediate the
    backend says it would hold for `inp` (`Backend.intermediate`: the (b, h, i, j) scores, or `sdpa:math`'s query
    blocks), in its own words."""
    need = backend.intermediate_bytes(inp)
    if need <= MEMORY_BUDGET_BYTES:
        return []
    held = backend.intermediate(inp)
    # (a backend that overrides only `intermediate_bytes` has no words for its figure)
    what = held.what if held is not None and held.nbytes == need else f"{fmt_bytes(need)} of intermediates"
    return [f"needs {what} > budget {fmt_bytes(MEMORY_BUDGET_BYTES)} (attend.dispatch.MEMORY_BUDGET_BYTES; auto only)"]


def _format_failure(inp: AttnInputs, blocks: dict[str, list[str]], head: str, backend: str | None = None) -> str:
    lines = [head, inp.describe()]
    for name, reasons in blocks.items():
        lines.append(f"`{name}` cannot run because:")
        lines.extend(f"    {r}" for r in reasons)
    lines.append(f"Hint: `{inp.cli_hint(backend)}`")
    return "\n".join(lines)


# main functions


def register_backend(backend: Backend, *, priority: dict[str, int] | None = None) -> None:
    """Register a backend instance under `backend.name` (replacing one of the same name).

    `priority`: optional {device_type: position} to insert it into that device's auto order.
    """
    global _generation
    if not isinstance(backend, Backend) or not backend.name:
        raise TypeError(f"expected an attend Backend instance with a `name`, got {backend!r}")
    with _lock:
        _generation += 1
        _registry[backend.name] = backend
        for device, pos in (priority or {}).items():
            order = [n for n in PRIORITY.get(device, DEFAULT_PRIORITY) if n != backend.name]
            order.insert(pos, backend.name)
            PRIORITY[device] = tuple(order)
        _cache.clear()


def get_backend(name: str) -> Backend:
    """The registered backend called `name`, or a ValueError listing the known names."""
    try:
        return _registry[name]
    except (KeyError, TypeError):
        known = ", ".join(_registry)
        raise ValueError(f"expected a backend name among: {known}; got {name!r}") from None


def list_backends() -> list[str]:
    """Names of all registered backends, in registration order (stable strings used everywhere)."""
    return list(_registry)


def clear_cache() -> None:
    """Forget cached choices and remembered run-time failures (after changing global torch flags, say)."""
    global _generation
    with _lock:
        _generation += 1
        _cache.clear()
        _failed.clear()


def _remember_failure(inp: AttnInputs, name: str, why: str, oom: bool) -> None:
    """Auto mode: `name` failed at run time for these inputs; select() skips it for this signature from now
    on (with the failure as its reason, which `explain` shows) and cached choices are dropped."""
    global _generation
    signature = inp.signature()
    with _lock:
        _generation += 1
        _cache.clear()
        _failed.setdefault(signature, {})[name] = (why, oom)
        while len(_failed) > CACHE_SIZE:
            _failed.pop(next(iter(_failed)))


def _failure_reasons(inp: AttnInputs) -> dict[str, tuple[str, bool]]:
    return _failed.get(inp.signature(), {}) if _failed else {}


def select(
    inp: AttnInputs, backend: str | None = None, *, fused_only: bool = False, shown: AttnInputs | None = None
) -> Backend:
    """The backend that runs `inp`.

    backend=None: the first eligible backend in the device's priority order (cached per input
    signature). backend="name": that backend, or a ValueError listing its reasons.
    fused_only: restrict auto to fused kernels (`Attend(flash=True)`).
    shown: the inputs as the caller gave them, for the messages, where `inp` is their lowering (`score="l2"`
    runs as a wider dot product: an error describes the caller's call and its `attend explain` hint, not that).

    Raises:
        ValueError: unknown name, or the named backend cannot run `inp`.
        NoBackendError: auto found no eligible backend.
    """
    if backend is not None:
        chosen = get_backend(backend)
        reasons = chosen.reasons_unsupported(inp)
        if reasons:
            head = f"backend={backend!r} cannot run these inputs:"
            raise ValueError(_format_failure(shown or inp, {chosen.name: reasons}, head, backend))
        return chosen

    # torch.compile: the choice is made once, while tracing, and baked into the graph; dynamo's guards on the
    # inputs (shape, dtype, stride, requires_grad, grad mode, determinism) re-trace when it could change.
    # No logging while compiling (a graph break). Eager calls cache the choice per call signature (`call`).
    compiling = torch.compiler.is_compiling()
    failed = {} if compiling else _failure_reasons(inp)
    rejected: dict[str, list[str]] = {}

    def eligible(name: str) -> bool:
        candidate = _registry[name]
        if fused_only and not candidate.fused:
            rejected[name] = ["not a fused kernel (Attend(flash=True) asks for one)"]
            return False
        reasons = candidate.reasons_unsupported(inp) + _budget_reasons(candidate, inp)
        if name in failed:
            reasons.append(f"failed at run time for these inputs (remembered): {failed[name][0]}")
        if reasons:
            rejected[name] = reasons
        return not reasons

    order = _priority(inp.device.type)
    if any(oom for _, oom in failed.values()):
        # this signature ran out of memory once: backends holding no (i, j) intermediate go first from now on
        lean = [b.name for b in fallbacks(inp, set(failed), oom=True) if b.intermediate_bytes(inp) == 0]
        order = tuple(lean) + tuple(n for n in order if n not in lean)
    picked: str | None = None
    for name in order:
        # a shape-dependent PROMOTE rule is looked at only when the backend it overtakes is reached: its
        # condition then decides something. (Under torch.compile every condition read becomes a guard on the
        # sizes; reading one that cannot change the answer would recompile for nothing.)
        for promoted in _promotions(inp, name, order):
            if promoted not in rejected and eligible(promoted):
                picked = promoted
                break
        if picked is None and name not in rejected and eligible(name):
            picked = name
        if picked is not None:
            break
    if picked is None:
        raise NoBackendError(_format_failure(shown or inp, rejected, "No attention backend can run these inputs:"))
    if not compiling:
        _log_slow(inp, picked, rejected)
    return _registry[picked]


def fallbacks(inp: AttnInputs, failed: set[str], *, oom: bool = False) -> list[Backend]:
    """Auto mode, after backends in `failed` raised at run time: the eligible others, in priority order.

    `oom`: the failure was out of memory, so backends that hold no (i, j)-sized intermediate
    (`Backend.intermediate_bytes(inp) == 0`, declared by `Caps.dense_scores`) go first: on CPU that is the
    memory-bounded `chunked`; on CUDA the other fused kernels, then `chunked`.
    """
    names = [n for n in _auto_order(inp) if n not in failed]
    remembered = _failure_reasons(inp)
    out = [_registry[n] for n in names if n not in remembered and not _registry[n].reasons_unsupported(inp)]
    if oom:
        out.sort(key=lambda b: b.intermediate_bytes(inp) > 0)  # stable: priority order within each group
    return out


def explain_inputs(inp: AttnInputs, backend: str | None = None, *, fused_only: bool = False) -> Report:
    """Every registered backend with its reasons, and the one that runs `inp`."""
    shown, inp = inp, lower(inp).inp
    auto = _auto_order(inp)
    order = list(auto) + [n for n in _registry if n not in auto]
    reasons = {n: _registry[n].reasons_unsupported(inp) for n in order}
    if backend is None:
        failed = _failure_reasons(inp)
        for n in auto:
            reasons[n] = reasons[n] + _budget_reasons(_registry[n], inp)
            if n in failed:
                reasons[n].append(f"failed at run time for these inputs (remembered): {failed[n][0]}")
    if fused_only:
        for n in order:
            if not _registry[n].fused:
                reasons[n] = ["not a fused kernel (Attend(flash=True) asks for one)"] + reasons[n]
    try:
        chosen = select(inp, backend, fused_only=fused_only).name
    except (NoBackendError, ValueError):
        chosen = None
    return Report(
        backend=chosen,
        reasons=reasons,
        inputs=shown.describe(),
        hint=shown.cli_hint(backend),
        candidates=auto,
        requested=backend,
        lowering=_lowering(inp, reasons, chosen, l2=shown.score == "l2", sinks=shown.sinks is not None),
    )


def _lowering(
    inp: AttnInputs, reasons: dict[str, list[str]], chosen: str | None, *, l2: bool, sinks: bool = False
) -> list[str]:
    """How each backend that can run `inp` (the chosen one first) runs what no kernel takes directly: the l2
    score, window and documents (each backend says it: `Backend.lowering`)."""
    notes = []
    if l2:
        notes.append(
            "score='l2' runs as a dot product: q' = [q, 1], k' = [k, -(|k|^2 - c) / 2], scale' = 2 * scale "
            "(|q|^2 and c, a median per (b, g), are constant per row and cancel in softmax)"
        )
    if sinks:
        notes.append(
            "sinks run as a rescale of the call's log-sum-exp: out * sigmoid(lse - sink), lse' = logaddexp(lse, "
            "sink) (so only backends that give the log-sum-exp can run them)"
        )
    if inp.structured:
        names = [n for n, why in reasons.items() if not why]
        names.sort(key=lambda n: n != chosen)
        for name in names:
            how = _registry[name].lowering(inp)
            if how:
                notes.append(f"{name}: {how}")
    return notes


def _log_slow(inp: AttnInputs, name: str, rejected: dict[str, list[str]]) -> None:
    if name not in SLOW.get(inp.device.type, ()):
        return
    key = (inp.device.type, name, tuple((n, tuple(r)) for n, r in rejected.items()))
    with _lock:
        if key in _logged:
            return
        _logged.add(key)
    why = "; ".join(f"{n}: {', '.join(r)}" for n, r in rejected.items())
    log.warning("attend: auto picked the slow `%s` backend on %s because %s", name, inp.device.type, why)


# the run policy


# torch >= 2.4 everywhere, but checked by capability: `torch.OutOfMemoryError` arrived after 2.4 (before,
# only `torch.cuda.OutOfMemoryError`)
_OOM_ERRORS: tuple[type[BaseException], ...] = tuple(
    err
    for err in (getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None), MemoryError)
    if isinstance(err, type)
)


def _failure(name: str, err: BaseException) -> str:
    first = (str(err).splitlines() or [""])[0]
    return f"backend {name!r} failed with {type(err).__name__}: {first}"


def _finite_sum(t: Tensor) -> Tensor:
    # float32, bfloat16, float64 sums accumulate in float32 or wider and have its range; a float16 sum
    # would overflow 65504 on ordinary activations, but its mean (accumulated in float32) cannot
    return t.mean() if t.dtype == torch.float16 else t.sum()


def output_is_finite(out: Tensor) -> bool:
    """The guard's test (contract item 3): no NaN or inf in `out`, by one sum read to the host. A door that runs
    a kernel of its own (`with_kvcache`'s decode kernel) reruns the call through `run` when it is False."""
    return math.isfinite(_finite_sum(out).item())


def _checkable(inp: AttnInputs) -> bool:
    """Can Python read values here? Not while tracing (torch.compile, torch.export), capturing a CUDA graph,
    or on meta tensors (vmap and fake tensors are found out when the read fails, `_all_finite`)."""
    if inp.device.type == "meta" or torch.compiler.is_compiling():
        return False
    return not (inp.device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def _all_finite(inp: AttnInputs, out: Tensor, mode: str = "exact") -> bool:
    """False when the check `mode` finds a possible NaN or inf. "exact": in q, k or v, or in the output of a
    call that has a mask or bias (a garbage key that every row masks out can overflow to inf inside a kernel
    that adds its mask as -inf, SDPA's, and inf + -inf = NaN; so can a huge bias or visible logit, a false
    alarm). "guard": in the output only (whatever a kernel leaks from a position a row may not see shows up
    there as NaN or inf: -inf plus a NaN or inf score, or a 0 probability times a NaN or inf value).

    Cost: one sum per tensor read and, on CUDA, one host sync, after the kernel ran. A false alarm (a sum
    of finite values that overflows) only costs the exact path. True (no check) where values cannot be
    read: vmap and fake tensors."""
    parts = [out] if mode == "guard" else [inp.q, inp.k, inp.v]
    if mode != "guard" and (inp.mask is not None or inp.bias is not None):
        parts.append(out)
    with torch.no_grad():
        try:
            if inp.device.type == "cpu":  # a read per sum is free on CPU, and cheaper than stacking them
                return all(output_is_finite(t) for t in parts)
            return bool(torch.stack([_finite_sum(t).float() for t in parts]).sum().isfinite())  # one sync
        except RuntimeError:
            # vmap (over any input: q, k, v, the mask, the bias) and fake tensors: skipped, as under compile
            if any(_no_data_branch(t) for t in (*parts, inp.q, inp.k, inp.v, inp.mask, inp.bias) if t is not None):
                return True
            raise


def _no_data_branch(t: Tensor) -> bool:
    """True for tensors whose values Python cannot read: functorch-wrapped (`torch.func.vmap`) or fake
    (`FakeTensorMode`, shape propagation). Checked by capability: both helpers exist on torch >= 2.0."""
    if functorch_wrapped(t):
        return True
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


def _finite_part(inp: AttnInputs) -> tuple[AttnInputs, Tensor, Tensor]:
    """The inputs with every non-finite entry of q, k, v set to 0 and the keys no query may attend
    (`masks.dead_keys`) zeroed in k and v, and which rows (bool (b, h, i)) and keys (bool (b, g, j), k or
    v) held a non-finite entry, so the output rows that see them can be set to NaN."""
    finite = [torch.isfinite(t) for t in (inp.q, inp.k, inp.v)]
    q_bad = ~finite[0].all(-1)
    kv_bad = ~(finite[1].all(-1) & finite[2].all(-1))
    q, k, v = (t.masked_fill(~ok, 0) for t, ok in zip((inp.q, inp.k, inp.v), finite))
    dead = dead_keys(inp)
    if dead is not None:
        # whatever sits there (garbage up to the dtype's max) can reach no output, but in a kernel that
        # adds its mask a huge logit would meet the mask's -inf; zeros reach nothing either
        k, v = zero_keys(k, dead), zero_keys(v, dead)
    return replace(inp, q=q, k=k, v=v), q_bad, kv_bad


def _cannot_run(err: BaseException) -> tuple[bool, bool]:
    """(retryable, out of memory) for a run-time failure. Retried: out of memory, and a kernel saying it
    cannot run these inputs (PyTorch's "No available kernel", "not implemented for"/"not supported" errors).
    Anything else (a plain bug, an illegal memory access, a shape error) is not a reason to try another
    backend: it propagates untouched."""
    text = str(err).lower()
    oom = isinstance(err, _OOM_ERRORS) or any(sign in text for sign in _OOM_SIGNS)
    return oom or any(sign in text for sign in _NO_KERNEL_SIGNS), oom


_OOM_SIGNS = ("out of memory", "can't allocate memory")  # CUDA, CPU allocator
_NO_KERNEL_SIGNS = ("no available kernel", "not implemented for", "is not supported", "not supported on")


def _run(inp: AttnInputs, chosen: Backend, backend: str | None) -> Result:
    """Run `chosen` on `inp`; in auto mode a backend that cannot run the inputs after all is remembered for
    this signature and the next eligible one runs (one AttendFallbackWarning, pointing at the caller)."""
    # under autocast the inputs were cast by `autocast_inputs`; inside, the backend owns its precision
    # (float32 softmax statistics, float32 matmuls where it wants them), as `torch.amp.custom_fwd` does
    off = no_autocast(inp.device.type)
    failures: list[str] = []
    tried: set[str] = set()
    while True:
        try:
            with off:
                result = chosen.run(inp)
        except (RuntimeError, MemoryError) as err:
            if backend is not None:  # a named backend runs or raises: never a silent fallback
                raise RuntimeError(f"backend {backend!r} failed: {type(err).__name__}: {err}") from err
            retryable, oom = _cannot_run(err)
            if not retryable or torch.compiler.is_compiling():
                raise
            if oom:
                # the failed attempt's intermediates live on in its traceback's frames: free them first
                traceback.clear_frames(err.__traceback__)
            failures.append(_failure(chosen.name, err))
            _remember_failure(inp, chosen.name, failures[-1], oom)
            tried.add(chosen.name)
            others = fallbacks(inp, tried, oom=oom)
            if not others:
                if len(failures) == 1:
                    raise  # nothing else could run these inputs: the original error, untouched
                raise RuntimeError(f"attend: every eligible backend failed: {'; '.join(failures)}") from err
            chosen = others[0]
            continue
        if failures:
            warnings.warn(
                f"attend: {'; '.join(failures)}; retried on {chosen.name!r} (remembered for these inputs: "
                "`explain` names it)",
                AttendFallbackWarning,
                stacklevel=_caller_stacklevel(),
            )
        return result


def _caller_stacklevel() -> int:
    """The `stacklevel` that makes a warning point at the first frame outside attend and torch (the user's
    line calling `attention`, `Attend` or the drop-in, whatever the depth of the calls in between)."""
    frame: Any = sys._getframe(1)  # the function calling warnings.warn: stacklevel 1
    level = 1
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL_DIRS):
        frame = frame.f_back
        level += 1
    return level


_INTERNAL_DIRS = (os.path.dirname(os.path.abspath(__file__)) + os.sep, os.path.dirname(torch.__file__) + os.sep)


_TRACES: dict[str, bool] = {}


def dynamo_traces_attend() -> bool:
    """Can this torch's dynamo trace attend's dispatch into a graph? Told by the first thing attend's traced path
    needs that older dynamo lacks: tracing `sdpa_kernel` (a variable type of its own, torch >= 2.5). Found at the
    first compiled call (importing torch._dynamo is too slow for `import attend`); stored only outside a trace
    (a dict written while tracing changes the graph's guards: one recompile)."""
    found = _TRACES.get("dynamo")
    if found is None:
        from torch._dynamo import variables

        found = hasattr(variables, "SDPAKernelVariable")
        if not torch.compiler.is_compiling():
            _TRACES["dynamo"] = found
    return found


TRACED = features.register(
    "dynamo_traces_attend",
    api="dynamo support for what attend's dispatch does under torch.compile (sdpa_kernel, NamedTuple._replace, ...)",
    since="2.5",
    without="under torch.compile each attend call runs eagerly between graphs (one graph break per call; "
    "fullgraph=True raises dynamo's error for it)",
    present=dynamo_traces_attend,
)


def run(inp: AttnInputs, backend: str | None = None, *, fused_only: bool = False) -> Result:
    """The run policy for validated inputs: empty inputs, the choice (auto or named), the kernel, the
    narrow fallback, and the NaN/inf exact path (contract items 2 and 3). `call` is the same with the
    validation and the choice cached per call signature. Returns out (b, h, i, e), or (out, lse) with
    `inp.return_lse`."""
    if torch.compiler.is_compiling() and not dynamo_traces_attend():
        return _eager_run(inp, backend, fused_only=fused_only)
    if inp.i == 0 or inp.j == 0:
        return _empty(inp, backend)
    low = lower(inp)
    return low.finish(_execute(low.inp, select(low.inp, backend, fused_only=fused_only, shown=inp), backend))


def _empty(inp: AttnInputs, backend: str | None) -> Result:
    # empty queries: empty output. No keys: every row has nothing to attend, so 0 (contract item 2).
    # The zero terms keep the graph connected so gradients are zeros, not None.
    if backend is not None:
        select(inp, backend)  # a named backend still has to exist and accept the inputs
    # (nan_to_num: a NaN in q still has no key to reach, so the row stays 0)
    zero = ((inp.q.sum() + inp.k.sum() + inp.v.sum()) * 0).nan_to_num(0.0, 0.0, 0.0)
    out = inp.q.new_zeros(inp.b, inp.h, inp.i, inp.e) + zero
    if not inp.return_lse:
        return out
    lse = inp.q.new_full((inp.b, inp.h, inp.i), -math.inf, dtype=accum_dtype(inp.dtype)) + zero
    if inp.sinks is not None:  # the normaliser of a row with no key is its sink's alone
        lse = torch.logaddexp(lse, inp.sinks.to(lse.dtype)[..., None])
    return out, lse


def _execute(inp: AttnInputs, chosen: Backend, backend: str | None) -> Result:
    result = _run(inp, chosen, backend)
    mode = inp.finite_check
    out = result[0] if isinstance(result, tuple) else result
    if mode is None or not _checkable(inp) or _all_finite(inp, out, mode):
        return result
    # rare: run the finite part (non-finite entries and keys no query may attend set to 0), then mark the
    # rows that see a NaN/inf: no kernel's masking can leak it
    clean, q_bad, kv_bad = _finite_part(inp)
    result = _run(clean, chosen, backend)
    rows = rows_that_see(inp, q_bad, kv_bad)
    if isinstance(result, tuple):
        return result[0].masked_fill(rows[..., None], math.nan), result[1].masked_fill(rows, math.nan)
    return result.masked_fill(rows[..., None], math.nan)


@dataclass(frozen=True)
class _Entry:
    """What a call signature resolved to: the backend, and how to rebuild `AttnInputs` from new tensors of
    the same signature without validating again. Holds no tensor (a cache entry must not keep the first
    call's activations alive)."""

    backend: Backend
    auto: bool  # chosen by auto (not a named backend, not restricted to fused kernels)
    mask_2d: bool  # a 2-D key padding mask, viewed as (b, 1, 1, j)
    mask_shape: tuple[int, ...] | None  # the 4-D views' shapes
    bias_shape: tuple[int, ...] | None
    options: tuple  # AttnInputs' non-tensor fields, resolved: causal, scale, dropout_p, deterministic, ...
    # the backend's runner for this signature (`Backend.plan`): calls with nothing to mask, lower or check
    fast: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None

    @classmethod
    def of(cls, backend: Backend, inp: AttnInputs, auto: bool, mask_2d: bool) -> _Entry:
        mask_shape = None if inp.mask is None else tuple(inp.mask.shape)
        bias_shape = None if inp.bias is None else tuple(inp.bias.shape)
        options = (
            inp.causal, inp.scale, inp.dropout_p, inp.deterministic, inp.mask_kind, inp.check_finite, inp.window,
            None, None, None, inp.score, inp.return_lse, None, inp.softcap,
        )  # fmt: skip  (AttnInputs' fields after bias, in order; documents and sinks never take the cached path)
        plain = inp.mask is None and inp.bias is None and inp.score == "dot" and inp.finite_check is None
        plain = plain and not inp.return_lse and inp.softcap is None
        fast = backend.plan(inp) if plain and not inp.structured else None
        return cls(backend, auto, mask_2d, mask_shape, bias_shape, options, fast)

    def inputs(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, bias: Tensor | None) -> AttnInputs:
        if mask is not None:
            mask = mask[:, None, None, :] if self.mask_2d else mask.reshape(self.mask_shape)  # type: ignore[arg-type]
        if bias is not None:
            bias = bias.reshape(self.bias_shape)  # type: ignore[arg-type]
        return AttnInputs(q, k, v, mask, bias, *self.options)


_STRIDED = torch.strided


def _call_key(q, k, v, mask, bias, options: tuple) -> tuple | None:
    """Everything validation and eligibility read from a call (with the tensor types: a subclass may dispatch
    elsewhere), or None when the call takes the slow path
    (torch.compile tracing; a non-tensor, sparse or nested input; a last dim that is not contiguous, which
    validation copies; autocast, which casts). An unhashable option (a list for `scale`) makes the key
    unhashable: `call` then takes the slow path, where validate() rejects it by name."""
    if torch.compiler.is_compiling() or any_autocast():
        return None
    try:
        # strided q, k, v (sparse, nested, mkldnn: the slow path) whose last dim is contiguous (not
        # is_contiguous(), which ignores the stride of a dim of size 1: SDPA's kernels do not)
        if q.layout is not _STRIDED or k.layout is not _STRIDED or v.layout is not _STRIDED:
            return None
        if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
            return None
        return (
            q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, q.device, k.device, v.device,
            q.requires_grad, k.requires_grad, v.requires_grad, type(q), type(k), type(v),
            None if mask is None else (mask.shape, mask.dtype, mask.device, mask.layout),
            None if bias is None else (bias.shape, bias.dtype, bias.device, bias.layout, bias.requires_grad),
            options, torch.is_grad_enabled(), torch.are_deterministic_algorithms_enabled(), MEMORY_BUDGET_BYTES,
        )  # fmt: skip
    except (AttributeError, TypeError, RuntimeError, NotImplementedError):
        return None


_NO_OPTIONS = Options()


def call(
    q: Any,
    k: Any,
    v: Any,
    mask: Any = None,
    bias: Any = None,
    documents: Any = None,
    sinks: Any = None,
    *,
    options: Options = _NO_OPTIONS,
    backend: str | None = None,
    fused_only: bool = False,
) -> Result:
    """Validate, choose and run: what `attention` and `Attend` do per call. The first call of a signature
    (shapes, dtypes, devices, grad state, options) validates and chooses; later ones rebuild the inputs
    from the cached entry and run (`CACHE_SIZE` signatures are kept, the oldest first out).
    Calls with `documents` or `sinks` always validate (the ids are data; sinks are rare enough to skip the cache)."""
    if torch.compiler.is_compiling() and not dynamo_traces_attend():  # (inline: every call passes here)
        return _eager_call(q, k, v, mask, bias, documents, sinks, options=options, backend=backend,
                           fused_only=fused_only)  # fmt: skip
    generation = _generation  # read first: a registry change during this call must not be cached after it
    cacheable = documents is None and sinks is None
    key = _call_key(q, k, v, mask, bias, (options, backend, fused_only)) if cacheable else None
    try:
        entry = None if key is None else _cache.get(key)
    except TypeError:  # an unhashable option
        key = entry = None
    if entry is not None and entry.generation == generation:
        value = entry.value
        if value.fast is not None:
            try:
                return value.fast(q, k, v)
            except (RuntimeError, MemoryError):
                pass  # the full path below runs it again, with the run policy's narrow fallback
        low = lower(value.inputs(q, k, v, mask, bias))
        return low.finish(_execute(low.inp, value.backend, backend))
    inp = validate(q, k, v, mask=mask, bias=bias, documents=documents, sinks=sinks, options=options)
    if inp.i == 0 or inp.j == 0:
        return _empty(inp, backend)
    raw, low = inp, lower(inp)
    chosen = select(low.inp, backend, fused_only=fused_only, shown=raw)
    if key is not None:
        value = _Entry.of(chosen, raw, backend is None and not fused_only, mask is not None and mask.dim() == 2)
        with _lock:
            if generation == _generation:
                _cache[key] = _Cached(value, generation)
                while len(_cache) > CACHE_SIZE:
                    _cache.pop(next(iter(_cache)))
    return low.finish(_execute(low.inp, chosen, backend))


# `run` and `call` run eagerly between graphs where dynamo cannot trace them (`TRACED`): a call to a function
# torch.compiler.disable wraps is a graph break
_eager_run = torch.compiler.disable(run)
_eager_call = torch.compiler.disable(call)
