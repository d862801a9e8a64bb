"""The harness every suite runs in: the run's configuration (`BenchConfig`), the result document
(`run_rows`: schema, environment, rows), a candidate's timing as result files store it (`timing_fields`),
and what the suites' candidates share: `Skip`, `guard`, `import_object`, `missing`, `available_bytes`,
`default_dtype`. One module per suite kind builds on it (`run`: the attention suites, `structured`,
`decode`); none of them imports another's internals.

Shape legend: b batch, h query heads, g key/value heads, i query positions, j key positions,
d head dim (q and k), e value head dim.
"""

from __future__ import annotations

import datetime as dt
import importlib
import os
import platform
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import __version__

__all__ = [
    "SCHEMA_VERSION",
    "BenchConfig",
    "Skip",
    "available_bytes",
    "default_dtype",
    "environment",
    "guard",
    "import_object",
    "load_average",
    "missing",
    "run_rows",
    "document",
    "spread",
    "timing_fields",
]

SCHEMA_VERSION = 1


@dataclass
class BenchConfig:
    """What `attend bench` runs. dtype None: each case's own, else float32 on CPU, bfloat16 on CUDA.
    backends None: every registered backend except the `einsum` reference. modes None: each case's own."""

    suite: str = "quick"
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype | None = None
    backends: list[str] | None = None
    modes: tuple[str, ...] | None = None
    min_time: float = 0.3
    # peak memory: "all" candidates, "attend" alone (what the table shows; each CPU measurement reruns every
    # candidate it covers once, in a child process), or "none"
    memory: str = "all"
    # busy processes (`load.busy`) running while the cases are measured: `attend bench --load N`
    load: int = 0


# helpers


class Skip(Exception):
    """A candidate that cannot run here (it would not fit, say): left out of the row with this reason."""


def available_bytes(device: torch.device) -> int:
    """Bytes free for a case's tensors: CUDA's free memory, else `MemAvailable` (Linux), else unbounded."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return name


def default_dtype(device: torch.device) -> torch.dtype:
    """The dtype of a run that names none: bfloat16 on CUDA, float32 elsewhere."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def guard(call: Callable[[], object]) -> Callable[[], object]:
    """A candidate whose code is still changing (varlen) may raise TypeError: the timer records a
    RuntimeError as that candidate's error and goes on with the others."""

    def run():
        try:
            return call()
        except (TypeError, NotImplementedError, AssertionError) as exc:
            raise RuntimeError(f"{type(exc).__name__}: {exc}") from exc

    return run


def timed_pass(fwd: Callable[[], Any], leaves: list, go: Any = None) -> Callable[[], object]:
    """What a row times: the forward under no_grad (`go` None), else the forward and the gradients of `leaves`
    for the output gradient `go`."""
    if go is None:

        def run():
            with torch.no_grad():
                return fwd()

        return run

    def run_bwd():
        return torch.autograd.grad(fwd(), leaves, go)

    return run_bwd


def warm_up(built: Any) -> None:
    """One call of each built candidate (`.call()`), so one-time set-up (kernel selection, caches) lands in no
    row's timing; a candidate that cannot run the tiny case is left to its row to report."""
    for b in built:
        try:
            b.call()
        except (RuntimeError, ValueError):
            pass


def import_object(spec: str) -> Any:
    """`"module:attr"` (a row's `needs`) -> that attribute, imported."""
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)


def missing(needs: str) -> str | None:
    """Why `needs` (`"module:attr"`) does not import here, in one line; None when it does."""
    try:
        import_object(needs)
    except Exception as exc:  # noqa: BLE001 - a module another change is still writing may fail in any way
        first = (str(exc).strip().splitlines() or [""])[0]
        return f"{needs.replace(':', '.')} is not importable here ({type(exc).__name__}: {first})"[:200]
    return None


# main functions


def load_average() -> float | None:
    """The 1-minute load average (None where the platform has none)."""
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def environment(device: torch.device) -> dict:
    """The facts every result file records: device, versions, threads, date."""
    env = {
        "device": device.type,
        "device_name": _device_name(device),
        "torch": torch.__version__,
        "attend": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        # the 1-minute load average when the run started: a busy machine makes every figure noisier
        "load_average": load_average(),
    }
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version()
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    return env


def spread(samples: list[float]) -> float | None:
    """The run-to-run spread of a candidate's samples: (p75 - p25) / median, the interquartile range relative
    to the median (0.05: the middle half of the samples lies within 5 % of the median's size); None with
    fewer than 2 samples or no positive median."""
    if len(samples) < 2:
        return None
    median = statistics.median(samples)
    if not median > 0:
        return None
    p25, _, p75 = statistics.quantiles(samples, n=4, method="inclusive")
    return (p75 - p25) / median


def timing_fields(t: Any) -> dict[str, Any]:
    """A candidate's timing as result files store it: median and samples in ms, runs, spread, error."""
    x = spread(t.samples) if t.error is None else None
    return {
        "median_ms": None if t.median is None else t.median * 1e3,
        "samples_ms": [round(s * 1e3, 5) for s in t.samples],  # to 10 ns: a small call keeps up to 1000
        "runs": len(t.samples),
        # (p75 - p25) / median of the samples: `--compare` calls a change a regression only beyond it
        "spread": None if x is None else round(x, 5),
        "error": t.error,
    }


def document(cfg: BenchConfig, env: dict, rows: list[dict], complete: bool, **extra: Any) -> dict:
    """The result document: schema, suite, `extra` (kind, ...), the environment at the start, the load
    (`load`: the busy processes `--load` started; `load_average`, `load_average_end`: the 1-minute load
    average at the start, before they started, and at the end, while they still ran; `cpu_count`), the rows,
    and `complete`: False while the run is still going (or was cut short: the rows measured so far)."""
    return {
        "schema": SCHEMA_VERSION,
        "suite": cfg.suite,
        **extra,
        **env,
        "load": cfg.load,
        "load_average_end": load_average(),
        "min_time_s": cfg.min_time,
        "complete": complete,
        "rows": list(rows),
    }


def run_rows(
    cfg: BenchConfig,
    measure: Callable[[Any], dict],
    items: list,
    on_row: Callable[[dict], None] | None,
    on_document: Callable[[dict], None] | None = None,
    **extra: Any,
) -> dict:
    """Measure every item (`measure(item)` -> row) in order, report each row as it lands, and return the
    result document (`document`: schema, suite, the environment at the start, the load, `extra`'s fields, the
    rows). `environment` is read before the first row, and then `cfg.load` busy processes start (`load.busy`);
    they stop when the last row is measured, or when a row raises. After each row, `on_document` gets the
    document so far (`complete` False), so a caller can save what was measured before a later row fails."""
    from .load import busy

    env = environment(cfg.device)
    rows: list[dict] = []
    with busy(cfg.load):
        for item in items:
            row = measure(item)
            rows.append(row)
            if on_row is not None:
                on_row(row)
            if on_document is not None:
                on_document(document(cfg, env, rows, False, **extra))
        return document(cfg, env, rows, True, **extra)
