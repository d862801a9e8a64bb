"""Peak memory of one pass: CUDA `max_memory_allocated`, CPU peak RSS of a child process.

CPU: a fresh `python -m attend.bench.memory_child` child builds the inputs and the candidates
(`memory_child`: it imports the suites' builders, so this module imports none of them) and hands them to
`measure_peaks`, which runs each candidate once on a tiny shape (so one-time set-up, such as thread pools,
is not charged to the first candidate), and then per candidate: frees what it can (`gc`, `malloc_trim`),
resets the kernel's peak-RSS mark (`/proc/self/clear_refs`, Linux >= 4.0), runs one pass, and reads
`VmHWM`. The first candidate is measured twice (the smaller figure kept): the first full-size pass of a
process pays one-time buffers. The figure is the peak above the resident size just before the pass: the
working memory, inputs excluded. Where the mark cannot be reset, each candidate gets its own child instead.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["cuda_peak_bytes", "cpu_peak_bytes", "measure_peaks"]

_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# helpers


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# main functions


def cuda_peak_bytes(call, device: torch.device) -> int:
    """Peak bytes CUDA allocated during one `call()`, above what was allocated before it."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    call()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def cpu_peak_bytes(spec: dict, names: list[str], timeout: float = 600.0) -> dict[str, int | None]:
    """Peak RSS above the inputs for each candidate in `names`, measured in child processes.

    `spec`: shape (b, h, g, i, j, d, e), mask, pad, causal, dtype, mode, threads; or, for a structured
    suite's row, `structured` (the `StructuredCase` as a dict), dtype, mode, threads. Returns None for a
    candidate whose child failed.
    """
    out: dict[str, int | None] = dict.fromkeys(names)
    todo = [names]
    while todo:
        group = todo.pop()
        payload = json.dumps({**spec, "impls": group})
        # the child imports the very `attend` this process runs (a worktree on PYTHONPATH, say)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [_PACKAGE_ROOT, env.get("PYTHONPATH")]))
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "attend.bench.memory_child"],
                input=payload,
                capture_output=True,
                text=True,
                timeout=timeout,
                env=env,
                check=False,
            )
            result = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else {}
        except (subprocess.TimeoutExpired, json.JSONDecodeError, IndexError):
            result = {}
        if result.get("reset_ok", True) is False and len(group) > 1:
            todo.extend([[n] for n in group])  # one child per candidate
            continue
        for n in group:
            out[n] = result.get("peak", {}).get(n)
    return out


def measure_peaks(calls: Callable[[bool], dict[str, Callable[[], object]]]) -> dict[str, Any]:
    """In the child: `calls(tiny)` builds {name: one pass} (on a tiny shape, or the real one); each tiny call
    runs once, then each real one is measured. Returns {"peak": {name: bytes or None}, "reset_ok": bool},
    what the child prints for `cpu_peak_bytes`."""
    for call in calls(True).values():
        try:
            call()
        except Exception:  # noqa: BLE001 - the real run below reports it
            pass
    real = calls(False)
    peaks: dict[str, int | None] = {}
    reset_ok = True

    def measure(call) -> int | None:
        nonlocal reset_ok
        _trim()
        before = _status_kb("VmRSS")
        reset_ok = _reset_peak() and reset_ok
        try:
            call()
            return max(0, _status_kb("VmHWM") - before) * 1024
        except Exception:  # noqa: BLE001 - a failed candidate has no figure
            return None

    for name, call in real.items():
        peaks[name] = measure(call)
    # the first full-size pass also pays one-time allocations (about 2 MB of per-thread buffers measured
    # on CPU flash); measure the first candidate again and keep the smaller figure
    first = next(iter(real), None)
    before = peaks.get(first) if first is not None else None
    if first is not None and before is not None and len(real) > 1:
        again = measure(real[first])
        if again is not None:
            peaks[first] = min(before, again)
    return {"peak": peaks, "reset_ok": reset_ok}
