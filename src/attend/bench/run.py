"""Run a suite: for every case and pass, time attend's auto choice against every backend that can run
the case, the seed's two behaviours and a same-size matmul, then measure peak memory.

Shape legend: b batch, h query heads, g key/value heads, i query positions, j key positions,
d head dim (q and k), e value head dim.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .._helpers import fmt_dtype
from ..dispatch import explain_inputs, get_backend, list_backends
from ..inputs import validate
from ..testing import Case
from . import contention, decode, structured
from .cases import CONTENTION_SUITES, DECODE_SUITES, STRUCTURED_SUITES, SUITE_SKIPS, SUITES, BenchCase
from .flops import attention_flops, matmul_flops
from .harness import (
    SCHEMA_VERSION,
    BenchConfig,
    available_bytes,
    default_dtype,
    environment,
    load_average,
    run_rows,
    timing_fields,
)
from .impls import MODULE, SEEDS, UNCHECKED, dense_bytes, holds_scores, make_call
from .memory import cpu_peak_bytes, cuda_peak_bytes
from .timer import time_interleaved

# BenchConfig, environment, load_average and SCHEMA_VERSION live in `harness`; re-exported here
__all__ = ["BenchConfig", "run_suite", "plan", "environment", "load_average", "SCHEMA_VERSION"]

MATMUL = "matmul"  # the ceiling, timed beside the candidates
MATMUL_BUDGET = 256 * 2**20  # bytes of the (n, i, j) product the matmul ceiling may hold


# helpers


def _matmul_call(shape: dict, dtype: torch.dtype, device: torch.device) -> tuple[Callable[[], object], float] | None:
    """(callable, FLOPs) of (n, i, d) @ (n, d, j) then (n, i, j) @ (n, j, e): the attention's two matmuls
    for n of the b * h heads (as many as fit MATMUL_BUDGET); its rate is the practical ceiling."""
    i, j, d, e = shape["i"], shape["j"], shape["d"], shape["e"]
    elem = torch.finfo(dtype).bits // 8
    n = max(1, min(shape["b"] * shape["h"], MATMUL_BUDGET // max(1, i * j * elem)))
    try:
        a = torch.randn(n, i, d, device=device, dtype=dtype)
        bt = torch.randn(n, d, j, device=device, dtype=dtype)
        p = torch.randn(n, i, j, device=device, dtype=dtype)
        v = torch.randn(n, j, e, device=device, dtype=dtype)
    except (RuntimeError, torch.OutOfMemoryError):
        return None

    def mm():
        torch.bmm(a, bt)
        torch.bmm(p, v)

    return mm, matmul_flops(n, i, j, d, e)


def default_backends(cfg: BenchConfig) -> list[str]:
    """The backends a run times besides auto: `cfg.backends`, else every registered one but the einsum
    reference and the suite's `SUITE_SKIPS`."""
    if cfg.backends is not None:
        return list(cfg.backends)
    return [n for n in list_backends() if n != "einsum" and n not in SUITE_SKIPS.get(cfg.suite, ())]


def _candidates(cfg: BenchConfig, inp) -> tuple[list[str], dict[str, str]]:
    """Backends to time for these inputs, and the reason each other one is left out."""
    names = default_backends(cfg)
    chosen, skipped = [], {}
    for name in names:
        reasons = get_backend(name).reasons_unsupported(inp)
        if reasons:
            skipped[name] = "; ".join(reasons)
        else:
            chosen.append(name)
    return chosen, skipped


def plan(cfg: BenchConfig) -> list[tuple[Any, str]]:
    """Every (case, mode) pair the run will measure, in order (a structured suite's rows are
    `StructuredCase`s, a decode suite's `DecodeCase`s, those whose needs do not import left out)."""
    if cfg.suite in STRUCTURED_SUITES:
        return list(structured.plan(cfg))
    if cfg.suite in DECODE_SUITES:
        return list(decode.plan(cfg))
    if cfg.suite in CONTENTION_SUITES:
        return list(contention.plan(cfg))
    pairs: list[tuple[Any, str]] = []
    for case in SUITES[cfg.suite]:
        for mode in cfg.modes or case.modes:
            pairs.append((case, mode))
    return pairs


def _measure(case: BenchCase, mode: str, cfg: BenchConfig, status: Callable[[str], None]) -> dict:
    device = cfg.device
    dtype = cfg.dtype or case.dtype or default_dtype(device)
    shape = case.shape
    grad = mode != "fwd"
    tensors = case.case(dtype, device).inputs(grad=grad)
    q, k, v, mask, bias = tensors
    with torch.set_grad_enabled(grad):
        inp = validate(q, k, v, mask=mask, bias=bias, causal=case.causal)
        report = explain_inputs(inp)
        backends, skipped = _candidates(cfg, inp)
    names = ["attend", UNCHECKED] + ([MODULE] if cfg.suite == "small" else []) + [n for n in backends if n != "attend"]
    names += list(SEEDS)
    if device.type == "cuda":
        names.append("torch:sdpa")

    # anything that holds (b, h, i, j) logits and would not fit is left out, not run into the OOM killer
    room = available_bytes(device) * 0.6
    for n in list(names):
        if holds_scores(n, inp) and dense_bytes(shape, mode) > room:
            names.remove(n)
            skipped[n] = f"needs ~{dense_bytes(shape, mode) / 2**30:.1f} GiB for (b, h, i, j) logits"

    go = torch.randn(shape["b"], shape["h"], shape["i"], shape["e"], device=device, dtype=dtype) if grad else None
    calls = {n: make_call(n, tensors, case.causal, mode, go) for n in names}

    flops = attention_flops(shape, case.causal, mode)
    # the matmul ceiling is timed in the same rounds as the candidates, so it sees the same machine
    mm = _matmul_call(shape, dtype, device)
    timed_calls = dict(calls, **({MATMUL: mm[0]} if mm else {}))
    status(f"{case.name} {mode}: timing {len(calls)} candidates and a matmul")
    timings = time_interleaved(timed_calls, device, min_time=cfg.min_time, warmup=2 if device.type == "cuda" else 1)
    mm_time = timings.pop(MATMUL).median if mm else None
    mm_rate = None if not mm_time or mm is None else mm[1] / mm_time
    del timed_calls, mm

    peaks: dict[str, int | None] = dict.fromkeys(names)
    if cfg.memory != "none":
        status(f"{case.name} {mode}: peak memory")
        ok = [n for n in names if timings[n].error is None and (cfg.memory == "all" or n == "attend")]
        if device.type == "cuda":
            for n in ok:
                try:
                    peaks[n] = cuda_peak_bytes(calls[n], device)
                except RuntimeError:  # torch.OutOfMemoryError is one
                    torch.cuda.empty_cache()
        else:
            spec = {
                "shape": shape,
                "mask": case.mask,
                "pad": case.pad,
                "causal": case.causal,
                "dtype": fmt_dtype(dtype),
                "mode": mode,
                "threads": torch.get_num_threads(),
            }
            peaks.update(cpu_peak_bytes(spec, ok))
    del calls, tensors, q, k, v, mask, bias, inp, go
    if device.type == "cuda":
        torch.cuda.empty_cache()

    results: dict[str, dict[str, Any]] = {}
    for n in names:
        t = timings[n]
        results[n] = {
            **timing_fields(t),
            "gflops": None if t.median is None else flops / t.median / 1e9,
            "pct_matmul": None if t.median is None or mm_rate is None else 100 * flops / t.median / mm_rate,
            "peak_mb": None if (peak := peaks.get(n)) is None else peak / 2**20,
        }
    own = results["attend"]["median_ms"]
    speedup = {
        n: r["median_ms"] / own for n, r in results.items() if n != "attend" and own and r["median_ms"] is not None
    }
    # attend:unchecked (attend minus its NaN/inf check) and attend:module (attend through Attend) are not
    # kernels to pick: they compete for no star
    timed = {
        n: r["median_ms"] for n, r in results.items() if r["median_ms"] is not None and n not in (UNCHECKED, MODULE)
    }
    return {
        "case": case.name,
        "label": case.label(),
        "note": case.note,
        "mode": mode,
        "dtype": fmt_dtype(dtype),
        "shape": shape,
        "causal": case.causal,
        "mask": case.mask,
        "auto": report.backend,
        "flops": flops,
        "matmul_gflops": None if mm_rate is None else mm_rate / 1e9,
        "results": results,
        "speedup": speedup,
        "fastest": min(timed, key=lambda n: timed[n]) if timed else None,
        "skipped": skipped,
    }


def _warm_up(cfg: BenchConfig) -> None:
    """One tiny call of every candidate and a small matmul, so one-time set-up (thread pools, kernel
    selection, lazy CUDA init) lands in no row's warm-up budget."""
    device, dtype = cfg.device, cfg.dtype or default_dtype(cfg.device)
    case = Case(1, 2, 2, 16, 16, 16, 16, dtype=dtype, mask="padding", device=str(device), pad=0.25)
    shape = {x: getattr(case, x) for x in "bhgijde"}
    for mode in ("fwd", "fwdbwd"):
        tensors = case.inputs(grad=mode != "fwd")
        go = torch.randn(1, 2, 16, 16, device=device, dtype=dtype) if mode != "fwd" else None
        for name in ["attend", *SEEDS, *(cfg.backends or [])]:
            try:
                make_call(name, tensors, True, mode, go)()
            except (RuntimeError, ValueError):
                pass
    mm = _matmul_call(shape, dtype, device)
    if mm:
        mm[0]()


# main function


def run_suite(
    cfg: BenchConfig,
    *,
    on_status: Callable[[str], None] | None = None,
    on_row: Callable[[dict], None] | None = None,
    on_document: Callable[[dict], None] | None = None,
) -> dict:
    """Run `cfg.suite` and return the result document (what `--json` writes).

    Each row: the case, the backend auto picks, and per candidate the median time, GFLOP/s (flash-attention
    convention), % of a same-size matmul, peak memory; `speedup[name]` = that candidate's time / attend's
    (above 1: attend is faster); `fastest` names the quickest candidate (`attend:unchecked`, the cost of
    the NaN/inf check, is timed but never `fastest`). A structured suite (`cases.STRUCTURED_SUITES`) runs
    through `structured.run_structured` instead: its document has `kind: "structured"` and rows of its own;
    a decode suite (`cases.DECODE_SUITES`) through `decode.run_decode` (`kind: "decode"`); a contention suite
    (`cases.CONTENTION_SUITES`) through `contention.run_contention` (`kind: "contention"`).

    `cfg.load` busy processes run while the rows are measured (`load.busy`; a contention suite measures each
    row quiet first, then under them). `on_row` gets each row as it lands; `on_document` the document so far
    (`complete` False) after each row, so what was measured survives a later error or an interrupt.
    """
    for kinds, runner in (
        (STRUCTURED_SUITES, structured.run_structured),
        (DECODE_SUITES, decode.run_decode),
        (CONTENTION_SUITES, contention.run_contention),
    ):
        if cfg.suite in kinds:
            return runner(cfg, on_status=on_status, on_row=on_row, on_document=on_document)
    status = on_status or (lambda _msg: None)
    status("warming up")
    _warm_up(cfg)
    return run_rows(cfg, lambda pair: _measure(pair[0], pair[1], cfg, status), plan(cfg), on_row, on_document)
