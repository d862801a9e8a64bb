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
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ._helpers import fmt_shape
from .backends import REGISTERED
from .backends.base import Backend
from .inputs import AttnInputs

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
    "MEMORY_BUDGET_BYTES",
]

log = logging.getLogger("attend")

# First eligible wins. Evidence for each order sits beside it; rerun `attend bench` to refresh it.
PRIORITY: dict[str, tuple[str, ...]] = {
    # CPU (2 vCPU AMD EPYC, AVX-512, torch 2.13.0+cpu, 2026-11-27, quiet machine), (1, 8, 4096, 64) float32
    # forward: sdpa:flash 219.5 ms; sdpa:math 3.40x that, the seed's einsum 4.20x; causal + key padding:
    # sdpa:flash (query blocks) 183.9 ms, SDPA with a dense mask 1.57x. Evidence: benchmarks/results/cpu-quick.json,
    # cpu.json. sdpa:math beats einsum where flash can't run (dropout, e != d, bias grad; ad hoc at
    # (1, 8, 1024-2048, 64) and (4, 8, 512, 64): 1.1-1.9x).
    # chunked (same machine, 2026-11-27; benchmarks/chunked.md): after sdpa:math by default, ahead of it
    # for large shapes (PROMOTE), and whenever math would exceed MEMORY_BUDGET_BYTES. Not ahead of
    # sdpa:flash for causal + key padding: 0.78x-0.95x its query-block path on a quiet machine.
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
]

# Auto skips a backend whose largest (i, j)-sized intermediate is above this many bytes (1 GiB): at
# (1, 8, 4096, 4096) float32 the scores alone are 0.5 GiB; at 16k tokens 8 GiB. `chunked` needs none.
MEMORY_BUDGET_BYTES: int = 2**30

# Auto landing here on these devices means a slow path: logged once with the reasons.
SLOW: dict[str, frozenset[str]] = {"cuda": frozenset({"einsum", "sdpa:math"})}

_registry: dict[str, Backend] = {b.name: b for b in REGISTERED}
_cache: dict[tuple, str] = {}
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
            lines.append("no backend can run these inputs")
        return "\n".join(lines)


# helpers


def cache_key(inp: AttnInputs, fused_only: bool = False) -> tuple:
    """What an auto choice is cached under: the inputs' signature, the fused-only flag and the budget."""
    return (inp.signature(), fused_only, MEMORY_BUDGET_BYTES)


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


def _fmt_bytes(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**27 else f"{n / 2**20:.1f} MiB"


def _budget_reasons(backend: Backend, inp: AttnInputs) -> list[str]:
    """Why auto skips `backend` on memory grounds (empty when it fits MEMORY_BUDGET_BYTES)."""
    need = backend.intermediate_bytes(inp)
    if need <= MEMORY_BUDGET_BYTES:
        return []
    shape = fmt_shape((inp.b, inp.h, inp.i, inp.j))
    return [
        (
            f"needs a {_fmt_bytes(need)} (b, h, i, j) = {shape} intermediate > budget "
            f"{_fmt_bytes(MEMORY_BUDGET_BYTES)} (attend.dispatch.MEMORY_BUDGET_BYTES; auto only)"
        )
    ]


def _format_failure(inp: AttnInputs, blocks: dict[str, list[str]], head: str) -> str:
    lines = [head, inp.describe()]
    for name, reasons in blocks.items():
        lines.append(f"`{name}` cannot run because:")
        lines.extend(f"    {r}" for r in reasons)
    lines.append(f"Hint: `{inp.cli_hint()}`")
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
    """Forget cached auto choices (after changing global torch flags, for instance)."""
    global _generation
    with _lock:
        _generation += 1
        _cache.clear()


def select(inp: AttnInputs, backend: str | None = None, *, fused_only: bool = False) -> Backend:
    """The backend that runs `inp`.

    backend=None: the first eligible backend in the device's priority order (cached per input
    signature). backend="name": that backend, or a ValueError listing its reasons.
    fused_only: restrict auto to fused kernels (`Attend(flash=True)`).

    Raises:
        ValueError: unknown name, or the named backend cannot run `inp`.
        NoBackendError: auto found no eligible backend.
    """
    if backend is not None:
        chosen = get_backend(backend)
        reasons = chosen.reasons_unsupported(inp)
        if reasons:
            head = f"backend={backend!r} cannot run these inputs:"
            raise ValueError(_format_failure(inp, {chosen.name: reasons}, head))
        return chosen

    # torch.compile: the choice is made once, while tracing, and baked into the graph; dynamo's guards on the
    # inputs (shape, dtype, stride, requires_grad, grad mode, determinism) re-trace when it could change.
    # So no cache (reading it would guard on the dict and recompile whenever eager code adds an entry;
    # its lock is a context manager dynamo cannot enter) and no logging (a graph break) while compiling.
    compiling = torch.compiler.is_compiling()
    key = cache_key(inp, fused_only)
    generation = _generation
    name = None if compiling else _cache.get(key)
    if name is not None:
        return _registry[name]

    rejected: dict[str, list[str]] = {}

    def eligible(name: str) -> bool:
        candidate = _registry[name]
        if fused_only and not candidate.fused:
            rejected[name] = ["not a fused kernel (Attend(flash=True) asks for one)"]
            return False
        reasons = candidate.reasons_unsupported(inp) + _budget_reasons(candidate, inp)
        if reasons:
            rejected[name] = reasons
        return not reasons

    order = _priority(inp.device.type)
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
        raise NoBackendError(_format_failure(inp, rejected, "No attention backend can run these inputs:"))
    if not compiling:
        with _lock:
            if generation == _generation:
                _cache[key] = picked
        _log_slow(inp, picked, rejected)
    return _registry[picked]


def fallbacks(inp: AttnInputs, failed: set[str], *, oom: bool = False) -> list[Backend]:
    """Auto mode, after backends in `failed` raised at run time: the eligible others, in priority order.

    `oom`: the failure was out of memory, so the memory-bounded `chunked` backend (when registered and
    eligible) goes first, even if this device's auto order does not list it.
    """
    names = [n for n in _auto_order(inp) if n not in failed]
    if oom and "chunked" in _registry and "chunked" not in failed:
        names = ["chunked"] + [n for n in names if n != "chunked"]
    out = []
    for name in names:
        candidate = _registry[name]
        if not candidate.reasons_unsupported(inp):
            out.append(candidate)
    return out


def explain_inputs(inp: AttnInputs, backend: str | None = None, *, fused_only: bool = False) -> Report:
    """Every registered backend with its reasons, and the one that runs `inp`."""
    auto = _auto_order(inp)
    order = list(auto) + [n for n in _registry if n not in auto]
    reasons = {n: _registry[n].reasons_unsupported(inp) for n in order}
    if backend is None:
        for n in auto:
            reasons[n] = reasons[n] + _budget_reasons(_registry[n], inp)
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
        inputs=inp.describe(),
        hint=inp.cli_hint(),
        candidates=auto,
    )


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
