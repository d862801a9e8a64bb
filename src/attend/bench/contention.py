"""`attend bench --suite contention`: attend against a direct SDPA call, on a quiet machine and then beside
busy processes (issue 25: speed that survives a busy CPU).

Shape legend: b batch, h query heads, g key/value heads, i query positions, j key positions,
d head dim (q and k), e value head dim.

A row (`cases.ContentionCase`) is timed twice in one run, its subject and its baseline interleaved each time
(`timer.time_interleaved`): first every row on the machine as it is (quiet), then every row again while
`cfg.load` busy processes spin (`load.busy`, `attend bench --load N`, default two per core). Its ratio is the
baseline's time over the subject's (above 1: attend is faster); the floor is on the loaded ratio over the quiet
ratio: how much of its standing against SDPA attend keeps when the cores are shared.

kind "chunked" (plain forward, no grad)
* `attend:chunked`  `attention(q, k, v, backend="chunked")`
* `sdpa`            `F.scaled_dot_product_attention(q, k, v)`
kind "auto-train" (forward, then the gradients of q, k, v)
* `attend:auto`     `attention(q, k, v, mask=keep, causal=True)`, keep (b, j) False on the last `pad` of keys
* `sdpa:mask`       `F.scaled_dot_product_attention(q, k, v, attn_mask=m)` with m (b, 1, i, j) = keep AND
                    bottom-right causal, built once outside the timed region (i == j here: the same as top-left)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .._helpers import fmt_dtype
from ..functional import attention
from .cases import CONTENTION_SUITES, ContentionCase
from .harness import BenchConfig, document, environment, load_average, timed_pass, timing_fields, warm_up
from .load import busy
from .timer import time_interleaved

__all__ = ["Built", "build", "plan", "keep_mask", "dense_mask", "run_contention", "PHASES"]

PHASES = ("quiet", "loaded")
SETTLE_S = 1.0  # after the busy processes start, before the first loaded row: let the scheduler spread them


@dataclass
class Built:
    """A candidate ready to time: `call` runs one pass; `forward()` its output (to check the pair agrees)."""

    call: Callable[[], object]
    forward: Callable[[], Tensor]
    note: str


# helpers


def keep_mask(case: ContentionCase, device: torch.device | str) -> Tensor:
    """(b, j) bool: True for the keys every query may see, False for the last `case.pad` of them (padding)."""
    j = case.shape["j"]
    kept = j - max(1, round(case.pad * j))
    return (torch.arange(j, device=device) < kept)[None].expand(case.b, j)


def dense_mask(keep: Tensor, i: int) -> Tensor:
    """keep (b, j) and bottom-right causal as one (b, 1, i, j) bool attn_mask (what attend's causal means)."""
    j = keep.shape[-1]
    causal = torch.ones(i, j, dtype=torch.bool, device=keep.device).tril(j - i)
    return keep[:, None, None, :] & causal


def _pass(fwd: Callable[[], Tensor], leaves: list[Tensor], go: Tensor | None) -> Callable[[], object]:
    return timed_pass(fwd, leaves, go)


def build(case: ContentionCase, device: torch.device | str, dtype: torch.dtype, seed: int = 0) -> dict[str, Built]:
    """{subject: Built, baseline: Built} on the same seeded q, k, v (and the gradient of the output)."""
    gen = torch.Generator().manual_seed(seed)
    grad = case.mode != "fwd"
    s = case.shape

    def rand(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)

    q, k, v = (rand(s["b"], s["h"], n, s["d"]).requires_grad_(grad) for n in (s["i"], s["j"], s["j"]))
    go = rand(s["b"], s["h"], s["i"], s["e"]) if grad else None
    leaves = [q, k, v]
    if case.kind == "chunked":

        def subject():
            return attention(q, k, v, backend="chunked")

        def baseline():
            return F.scaled_dot_product_attention(q, k, v)

        notes = ('attention(q, k, v, backend="chunked")', "F.scaled_dot_product_attention(q, k, v)")
    else:
        keep = keep_mask(case, device)
        m = dense_mask(keep, s["i"])

        def subject():
            return attention(q, k, v, mask=keep, causal=True)

        def baseline():
            return F.scaled_dot_product_attention(q, k, v, attn_mask=m)

        notes = (
            "attention(q, k, v, mask=keep (b, j), causal=True), auto's pick",
            "F.scaled_dot_product_attention(q, k, v, attn_mask=keep & causal (b, 1, i, j)), the mask built once",
        )
    return {
        case.subject: Built(_pass(subject, leaves, go), subject, notes[0]),
        case.baseline: Built(_pass(baseline, leaves, go), baseline, notes[1]),
    }


def plan(cfg: BenchConfig) -> list[tuple[ContentionCase, str]]:
    """Every (row, phase) the run measures, in order: each row quiet, then each row loaded."""
    return [(case, phase) for phase in PHASES for case in CONTENTION_SUITES[cfg.suite]]


def _timings(case: ContentionCase, cfg: BenchConfig, status: Callable[[str], None], phase: str) -> dict[str, dict]:
    dtype = cfg.dtype or torch.float32
    built = build(case, cfg.device, dtype)
    rounds = 0

    def on_round():
        nonlocal rounds
        rounds += 1
        status(f"{case.name} {phase}: timing {len(built)} candidates, round {rounds}")

    status(f"{case.name} {phase}: timing {len(built)} candidates (warm-up)")
    timings = time_interleaved(
        {n: b.call for n, b in built.items()},
        cfg.device,
        min_time=cfg.min_time,
        warmup=2 if cfg.device.type == "cuda" else 1,
        on_round=on_round,
    )
    return {n: {**timing_fields(timings[n]), "note": built[n].note} for n in built}


def _ratio(results: dict[str, dict] | None, case: ContentionCase) -> float | None:
    if results is None:
        return None
    own, other = results[case.subject]["median_ms"], results[case.baseline]["median_ms"]
    return None if not own or other is None else other / own


def _row(case: ContentionCase, cfg: BenchConfig, quiet: dict, loaded: dict | None) -> dict:
    ratio_quiet, ratio_loaded = _ratio(quiet, case), _ratio(loaded, case)
    kept = None if not ratio_quiet or ratio_loaded is None else ratio_loaded / ratio_quiet
    held = None if kept is None else kept >= case.floor
    return {
        "case": case.name,
        "label": case.label(),
        "note": case.note,
        "kind": "contention",
        "contention": case.kind,
        "mode": case.mode,
        "dtype": fmt_dtype(cfg.dtype or torch.float32),
        "shape": case.shape,
        "causal": case.causal,
        "mask": case.mask,
        "subject": case.subject,
        "baseline": case.baseline,
        # the quiet pass: what `--compare` matches (a loaded time says more about the load than about attend)
        "results": quiet,
        "loaded": loaded,
        "speedup": {} if ratio_quiet is None else {case.baseline: ratio_quiet},
        "ratio_quiet": ratio_quiet,
        "ratio_loaded": ratio_loaded,
        "retained": kept,
        "floor": {"min": case.floor, "value": kept, "pass": held},
        # True: the loaded ratio kept the floor's share of the quiet one; False: it did not; None: not measured
        "pass": held,
    }


def _warm_up(cfg: BenchConfig) -> None:
    """One call of every candidate at 32 positions, so one-time set-up lands in no row's timing."""
    for case in CONTENTION_SUITES[cfg.suite]:
        warm_up(build(case.tiny(), cfg.device, cfg.dtype or torch.float32).values())


# main function


def run_contention(
    cfg: BenchConfig,
    *,
    on_status: Callable[[str], None] | None = None,
    on_row: Callable[[dict], None] | None = None,
    on_document: Callable[[dict], None] | None = None,
) -> dict:
    """Run a contention suite and return the result document (what `--json` writes, `kind: "contention"`).

    Every row is measured quiet, then `cfg.load` busy processes start and every row is measured again; they
    stop when the last row is done (or a row raises). Each row: per candidate its quiet timing (`results`)
    and its loaded one (`loaded`), `ratio_quiet` and `ratio_loaded` (the baseline's time / the subject's),
    `retained` = ratio_loaded / ratio_quiet, and `floor`/`pass`: retained >= the row's floor (0.8). `on_row`
    gets the row after each pass of it; `on_document` the document so far (`complete` False).
    """
    status = on_status or (lambda _msg: None)
    cases = CONTENTION_SUITES[cfg.suite]
    status("warming up")
    _warm_up(cfg)
    env = environment(cfg.device)
    quiet: dict[str, dict] = {}
    loaded: dict[str, dict] = {}
    extra: dict[str, Any] = {"kind": "contention", "memory": "none"}

    def rows() -> list[dict]:
        return [_row(c, cfg, quiet[c.name], loaded.get(c.name)) for c in cases if c.name in quiet]

    def landed(case: ContentionCase) -> None:
        row = next(r for r in rows() if r["case"] == case.name)
        if on_row is not None:
            on_row(row)
        if on_document is not None:
            on_document(document(cfg, env, rows(), False, **extra))

    for case in cases:
        quiet[case.name] = _timings(case, cfg, status, "quiet")
        landed(case)
    extra["load_average_quiet_end"] = load_average()  # the quiet pass's end, before the busy processes start
    with busy(cfg.load):
        status(f"starting {cfg.load} busy processes")
        time.sleep(SETTLE_S)
        for case in cases:
            loaded[case.name] = _timings(case, cfg, status, "loaded")
            landed(case)
        return document(cfg, env, rows(), True, **extra)
