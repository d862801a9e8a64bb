"""`attend bench --suite structured`: different formulations of the same attention, timed side by side.

Shape legend: b batch, h query heads, g key/value heads, i query positions, j key positions,
d head dim (q and k), e value head dim.

A row (`cases.StructuredCase`) names a subject and its baselines; every candidate is built here from
the same tokens (one seeded `Base` per row) into its own layout, outside the timed region:

documents / varlen (packed sequences, causal inside each one)
* `attend:documents`  `attention(q, k, v, causal=True, documents=ids)` on the packed (1, h, n, d)
* `attend:padded`     the sequences padded to the longest, (b, h, max, d), with a (b, max) key padding
                      mask: `attention(q, k, v, mask=keep, causal=True)`
* `sdpa:dense-mask`   `F.scaled_dot_product_attention` on the packed sequence with the (n, n)
                      block-diagonal causal bool mask, built once
* `varlen_attn`       `attend.varlen.varlen_attn` on (n, h, d) with cumulative lengths,
                      `window_size=(-1, 0)` (causal)
window
* `attend:window`     `attention(q, k, v, causal=True, window=(left, 0))`
* `attend:causal`     `attention(q, k, v, causal=True)`
l2
* `attend:l2`         `attention(q, k, v, score="l2")`
* `attend:dot`        `attention(q, k, v)`
* `gigagan:einsum`    gigagan-pytorch's own formula: |q|^2 + |k|^2 - 2 einsum(q, k), times -scale,
                      softmax, einsum with v

The rows are timed with the suites' interleaved timer (`timer.time_interleaved`) and the subject's peak
memory is measured as theirs (`memory.py`: a child process on CPU, `max_memory_allocated` on CUDA).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .._helpers import fmt_dtype
from ..functional import attention
from .cases import STRUCTURED_SUITES, StructuredCase
from .harness import (
    BenchConfig,
    Skip,
    available_bytes,
    default_dtype,
    guard,
    import_object,
    missing,
    run_rows,
    timed_pass,
    timing_fields,
    warm_up,
)
from .memory import cpu_peak_bytes, cuda_peak_bytes
from .timer import time_interleaved

__all__ = ["CANDIDATES", "Base", "Built", "Skip", "make_base", "build", "omitted", "plan", "run_structured"]

# helpers


@dataclass
class Base:
    """A row's tokens, once: q, k, v (and the gradient of the output) in the row's common layout, packed
    (1, h, n, d) for documents and varlen rows, (b, h, n, d) for window and l2 rows; `ids` (1, n) the
    packed tokens' document ids, sorted. Every candidate derives its own layout from these."""

    case: StructuredCase
    q: Tensor
    k: Tensor
    v: Tensor
    go: Tensor | None
    ids: Tensor | None
    grad: bool


@dataclass
class Built:
    """A candidate ready to time: `call` runs one pass (forward, or forward + the gradients of q, k, v);
    `forward()` returns its output in the row's common layout (to check the candidates agree); `note`:
    the work it does."""

    call: Callable[[], object]
    forward: Callable[[], Tensor]
    note: str


def _pass(fwd: Callable[[], Tensor], leaves: list[Tensor], go: Tensor | None, mode: str) -> Callable[[], object]:
    return timed_pass(fwd, leaves, None if mode == "fwd" else go)


def _leaf(t: Tensor, grad: bool) -> Tensor:
    return t.detach().contiguous().requires_grad_(grad)


def _pad(t: Tensor, lengths: tuple[int, ...]) -> Tensor:
    """Packed (1, h, n, x) -> (len(lengths), h, max(lengths), x), zeros after each sequence."""
    out = t.new_zeros(len(lengths), t.shape[1], max(lengths), t.shape[-1])
    start = 0
    for row, n in enumerate(lengths):
        out[row, :, :n] = t[0, :, start : start + n]
        start += n
    return out


def _unpad(t: Tensor, lengths: tuple[int, ...]) -> Tensor:
    return torch.cat([t[row : row + 1, :, :n] for row, n in enumerate(lengths)], dim=2)


def _causal_pairs(n: int) -> int:
    return n * (n + 1) // 2


def _fmt_count(x: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= div:
            return f"{x / div:.1f}{unit}"
    return str(int(x))


# candidates


def _attend_documents(base: Base, mode: str) -> Built:
    q, k, v, ids = base.q, base.k, base.v, base.ids
    pairs = sum(_causal_pairs(n) for n in base.case.lengths)

    def fwd():
        return attention(q, k, v, causal=True, documents=ids)

    note = f"{q.shape[2]} tokens packed, documents=ids: {_fmt_count(pairs)} visible pairs a head"
    return Built(_pass(fwd, [q, k, v], base.go, mode), fwd, note)


def _attend_padded(base: Base, mode: str) -> Built:
    lengths = base.case.lengths
    q, k, v = (_leaf(_pad(t, lengths), base.grad) for t in (base.q, base.k, base.v))
    go = None if base.go is None else _pad(base.go, lengths)
    longest = max(lengths)
    keep = torch.arange(longest, device=q.device)[None, :] < torch.tensor(lengths, device=q.device)[:, None]

    def fwd():
        return attention(q, k, v, mask=keep, causal=True)

    slots = len(lengths) * longest
    note = f"{len(lengths)} x {longest} = {slots} slots for {sum(lengths)} tokens, key padding mask"
    return Built(_pass(fwd, [q, k, v], go, mode), lambda: _unpad(fwd(), lengths), note)


def _sdpa_dense_mask(base: Base, mode: str) -> Built:
    q, k, v, ids = base.q, base.k, base.v, base.ids
    assert ids is not None
    n = q.shape[2]
    # the bool mask, and the float copy the CPU kernel may make of it, forward and backward
    need = 9 * n * n
    room = available_bytes(q.device) * 0.6
    if need > room:
        raise Skip(f"needs ~{need / 2**30:.1f} GiB for the ({n}, {n}) mask, {room / 2**30:.1f} GiB free")
    same = ids[0, :, None] == ids[0, None, :]
    mask = same & torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    del same

    def fwd():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    size = f"{n * n / 2**20:.0f} MiB"
    note = f"({n}, {n}) block-diagonal causal bool mask ({size}), built once: {_fmt_count(n * n)} pairs a head"
    return Built(_pass(fwd, [q, k, v], base.go, mode), fwd, note)


def _varlen(base: Base, mode: str) -> Built:
    varlen_attn = import_object(base.case.needs or "attend.varlen:varlen_attn")
    lengths = base.case.lengths
    q, k, v = (_leaf(t[0].transpose(0, 1), base.grad) for t in (base.q, base.k, base.v))  # (n, h, d)
    go = None if base.go is None else base.go[0].transpose(0, 1).contiguous()
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=q.device)
    longest = max(lengths)

    def fwd():
        return varlen_attn(q, k, v, cu, cu, longest, longest, window_size=(-1, 0))

    note = f"({q.shape[0]}, {q.shape[1]}, {q.shape[2]}) with cu_seq of {len(lengths)} sequences, window_size=(-1, 0)"
    return Built(guard(_pass(fwd, [q, k, v], go, mode)), lambda: fwd().transpose(0, 1)[None], note)


def _attend_window(base: Base, mode: str) -> Built:
    q, k, v, left = base.q, base.k, base.v, base.case.window
    n = q.shape[2]
    pairs = sum(min(r + 1, left + 1) for r in range(n))

    def fwd():
        return attention(q, k, v, causal=True, window=(left, 0))

    return Built(_pass(fwd, [q, k, v], base.go, mode), fwd, f"window=({left}, 0): {_fmt_count(pairs)} pairs a head")


def _attend_causal(base: Base, mode: str) -> Built:
    q, k, v = base.q, base.k, base.v

    def fwd():
        return attention(q, k, v, causal=True)

    note = f"causal: {_fmt_count(_causal_pairs(q.shape[2]))} pairs a head"
    return Built(_pass(fwd, [q, k, v], base.go, mode), fwd, note)


def _attend_l2(base: Base, mode: str) -> Built:
    q, k, v = base.q, base.k, base.v

    def fwd():
        return attention(q, k, v, score="l2")

    return Built(_pass(fwd, [q, k, v], base.go, mode), fwd, 'score="l2": a dot product with one more head dim')


def _attend_dot(base: Base, mode: str) -> Built:
    q, k, v = base.q, base.k, base.v

    def fwd():
        return attention(q, k, v)

    return Built(_pass(fwd, [q, k, v], base.go, mode), fwd, "score='dot', nothing else: the plain call")


def _gigagan_einsum(base: Base, mode: str) -> Built:
    q, k, v = base.q, base.k, base.v
    scale = q.shape[-1] ** -0.5

    def fwd():
        # gigagan-pytorch: "using pytorch cdist leads to nans in lightweight gan training framework"
        q_sq = (q * q).sum(dim=-1)
        k_sq = (k * k).sum(dim=-1)
        l2dist_sq = q_sq[..., :, None] + k_sq[..., None, :] - 2 * torch.einsum("bhid,bhjd->bhij", q, k)
        attn = (-l2dist_sq * scale).softmax(dim=-1)
        return torch.einsum("bhij,bhjd->bhid", attn, v)

    note = "|q|^2 + |k|^2 - 2 einsum(q, k), * -scale, softmax, einsum with v: holds the (b, h, i, j) logits"
    return Built(_pass(fwd, [q, k, v], base.go, mode), fwd, note)


def _attend_lse(base: Base, mode: str) -> Built:
    q, k, v = base.q, base.k, base.v

    def fwd():
        return attention(q, k, v, return_lse=True)[0]  # the loss on the output alone: the lse's own cost

    return Built(_pass(fwd, [q, k, v], base.go, mode), fwd, "return_lse=True: (out, lse), lse (b, h, i)")


def _attend_sinks(base: Base, mode: str) -> Built:
    q, k, v = base.q, base.k, base.v
    sinks = _leaf(torch.randn(q.shape[1], generator=torch.Generator().manual_seed(1)).to(q), base.grad)

    def fwd():
        return attention(q, k, v, causal=True, sinks=sinks)

    leaves = [q, k, v, sinks] if base.grad else [q, k, v]
    return Built(_pass(fwd, leaves, base.go, mode), fwd, "causal, sinks (h,): gpt-oss's, differentiable")


def _attend_softcap(base: Base, mode: str) -> Built:
    q, k, v = base.q, base.k, base.v

    def fwd():
        return attention(q, k, v, causal=True, softcap=50.0)

    return Built(_pass(fwd, [q, k, v], base.go, mode), fwd, "causal, softcap=50.0 (Gemma 2's)")


def _gemma2_eager(base: Base, mode: str) -> Built:
    q, k, v = base.q, base.k, base.v
    scale = q.shape[-1] ** -0.5

    def fwd():
        # transformers' Gemma 2 eager_attention_forward: scaled logits, tanh soft-capping, an additive causal
        # mask, softmax in float32, the (b, h, i, j) weights times v
        s = torch.matmul(q, k.transpose(2, 3)) * scale
        s = torch.tanh(s / 50.0) * 50.0
        n = s.shape[-1]
        s = s + torch.full((n, n), torch.finfo(s.dtype).min, device=s.device, dtype=s.dtype).triu(1)
        return torch.matmul(s.softmax(dim=-1, dtype=torch.float32).to(q.dtype), v)

    note = "transformers' Gemma 2 eager formula: holds the (b, h, i, j) capped logits and weights"
    return Built(_pass(fwd, [q, k, v], base.go, mode), fwd, note)


Builder = Callable[[Base, str], Built]
CANDIDATES: dict[str, dict[str, Builder]] = {
    "documents": {
        "attend:documents": _attend_documents,
        "attend:padded": _attend_padded,
        "sdpa:dense-mask": _sdpa_dense_mask,
        "varlen_attn": _varlen,
    },
    "window": {"attend:window": _attend_window, "attend:causal": _attend_causal},
    "l2": {"attend:l2": _attend_l2, "attend:dot": _attend_dot, "gigagan:einsum": _gigagan_einsum},
    "lse": {"attend:lse": _attend_lse, "attend:dot": _attend_dot},
    "sinks": {"attend:sinks": _attend_sinks, "attend:causal": _attend_causal},
    "softcap": {"attend:softcap": _attend_softcap, "gemma2:eager": _gemma2_eager, "attend:causal": _attend_causal},
}
CANDIDATES["varlen"] = CANDIDATES["documents"]


# building blocks


def make_base(case: StructuredCase, device: torch.device | str, dtype: torch.dtype, grad: bool, seed: int = 0) -> Base:
    """The row's tokens, seeded: every candidate of the row sees the same q, k, v."""
    gen = torch.Generator().manual_seed(seed)
    packed = case.kind in ("documents", "varlen")
    b, n = (1, case.tokens) if packed else (len(case.lengths), case.lengths[0])

    def rand() -> Tensor:
        return torch.randn(b, case.h, n, case.d, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)

    q, k, v = (_leaf(rand(), grad) for _ in range(3))
    go = rand() if grad else None
    ids = None
    if packed:
        ids = torch.cat([torch.full((m,), doc, dtype=torch.long) for doc, m in enumerate(case.lengths)])
        ids = ids[None].to(device)
    return Base(case, q, k, v, go, ids, grad)


def build(
    case: StructuredCase, mode: str, device: torch.device | str, dtype: torch.dtype, names: list[str] | None = None
) -> tuple[dict[str, Built], dict[str, str]]:
    """({name: Built}, {name: why it was left out}) for the row's subject and baselines (or `names`)."""
    base = make_base(case, device, dtype, grad=mode != "fwd")
    built: dict[str, Built] = {}
    skipped: dict[str, str] = {}
    for name in names if names is not None else [case.subject, *case.baselines]:
        try:
            built[name] = CANDIDATES[case.kind][name](base, mode)
        except Skip as exc:
            skipped[name] = str(exc)
        except (ImportError, AttributeError, RuntimeError, ValueError, TypeError) as exc:
            skipped[name] = f"{type(exc).__name__}: {exc}"
    return built, skipped


def omitted(suite: str) -> dict[str, str]:
    """The suite's rows left out at run time, with the reason: what they need does not import."""
    out = {}
    for case in STRUCTURED_SUITES[suite]:
        reason = missing(case.needs) if case.needs else None
        if reason:
            out[case.name] = reason
    return out


def plan(cfg: BenchConfig) -> list[tuple[StructuredCase, str]]:
    """Every (row, mode) pair the run will measure, in order (rows whose needs do not import left out)."""
    gone = omitted(cfg.suite)
    return [(c, m) for c in STRUCTURED_SUITES[cfg.suite] if c.name not in gone for m in cfg.modes or c.modes]


def _case_json(case: StructuredCase) -> dict:
    return dataclasses.asdict(case)


def case_from_json(d: dict) -> StructuredCase:
    """The inverse of `dataclasses.asdict` through JSON (the memory child gets its row this way)."""
    d = dict(d)
    for key in ("lengths", "baselines", "modes"):
        d[key] = tuple(d[key])
    d["floors"] = tuple((name, x) for name, x in d["floors"])
    return StructuredCase(**d)


def _measure(case: StructuredCase, mode: str, cfg: BenchConfig, status: Callable[[str], None]) -> dict:
    device = cfg.device
    dtype = cfg.dtype or default_dtype(device)
    status(f"{case.name} {mode}: building {1 + len(case.baselines)} candidates")
    built, skipped = build(case, mode, device, dtype)
    names = [n for n in [case.subject, *case.baselines] if n in built]
    rounds = 0

    def on_round():
        nonlocal rounds
        rounds += 1
        status(f"{case.name} {mode}: timing {len(names)} candidates, round {rounds}")

    status(f"{case.name} {mode}: timing {len(names)} candidates (warm-up)")
    timings = time_interleaved(
        {n: built[n].call for n in names},
        device,
        min_time=cfg.min_time,
        warmup=2 if device.type == "cuda" else 1,
        on_round=on_round,
    )

    peaks: dict[str, int | None] = dict.fromkeys(names)
    if cfg.memory != "none":
        ok = [n for n in names if timings[n].error is None and (cfg.memory == "all" or n == case.subject)]
        status(f"{case.name} {mode}: peak memory of {', '.join(ok) or 'nothing'}")
        if device.type == "cuda":
            for n in ok:
                try:
                    peaks[n] = cuda_peak_bytes(built[n].call, device)
                except RuntimeError:  # torch.OutOfMemoryError is one
                    torch.cuda.empty_cache()
        elif ok:
            spec = {
                "structured": _case_json(case),
                "dtype": fmt_dtype(dtype),
                "mode": mode,
                "threads": torch.get_num_threads(),
            }
            peaks.update(cpu_peak_bytes(spec, ok))
    notes = {n: b.note for n, b in built.items()}
    del built
    if device.type == "cuda":
        torch.cuda.empty_cache()

    results: dict[str, dict[str, Any]] = {}
    for n in names:
        t = timings[n]
        results[n] = {
            **timing_fields(t),
            "peak_mb": None if (peak := peaks.get(n)) is None else peak / 2**20,
            "note": notes[n],
        }
    own = results.get(case.subject, {}).get("median_ms")
    speedup = {
        n: r["median_ms"] / own for n, r in results.items() if n != case.subject and own and r["median_ms"] is not None
    }
    floors = []
    for name, least in case.floors:
        ratio = speedup.get(name)
        held = None if ratio is None else ratio >= least
        floors.append({"baseline": name, "min": least, "ratio": ratio, "pass": held})
    memory = None
    if case.memory_floor_mb is not None:
        peak_mb = results.get(case.subject, {}).get("peak_mb")
        memory = {
            "max_mb": case.memory_floor_mb,
            "peak_mb": peak_mb,
            "pass": None if peak_mb is None else peak_mb < case.memory_floor_mb,
        }
    verdicts = [f["pass"] for f in floors] + ([memory["pass"]] if memory else [])
    packed = case.kind in ("documents", "varlen")
    b, i = (1, case.tokens) if packed else (len(case.lengths), case.lengths[0])
    return {
        "case": case.name,
        "label": case.label(),
        "note": case.note,
        "kind": case.kind,
        "mode": mode,
        "dtype": fmt_dtype(dtype),
        "shape": {"b": b, "h": case.h, "g": case.h, "i": i, "j": i, "d": case.d, "e": case.d},
        "lengths": list(case.lengths),
        "causal": case.kind != "l2",
        "mask": case.kind,
        "subject": case.subject,
        "results": results,
        "speedup": speedup,
        "floors": floors,
        "memory_floor": memory,
        # True: every floor held; False: one failed; None: one could not be measured
        "pass": None if None in verdicts else all(verdicts),
        "skipped": skipped,
    }


def _warm_up(cfg: BenchConfig, pairs: list[tuple[StructuredCase, str]]) -> None:
    """One call of every candidate at a few tokens, so one-time set-up lands in no row's warm-up budget."""
    dtype = cfg.dtype or default_dtype(cfg.device)
    for case, mode in pairs:
        built, _ = build(case.tiny(), mode, cfg.device, dtype)
        warm_up(built.values())


# main function


def run_structured(
    cfg: BenchConfig,
    *,
    on_status: Callable[[str], None] | None = None,
    on_row: Callable[[dict], None] | None = None,
    on_document: Callable[[dict], None] | None = None,
) -> dict:
    """Run a structured suite and return the result document (what `--json` writes).

    Each row: the subject, and per candidate its median time, samples, peak memory (the subject's alone
    unless `cfg.memory == "all"`), error and a note on the work it does; `speedup[name]` = that baseline's
    time / the subject's (above 1: the subject is faster); `floors`: each floor's ratio, minimum and
    verdict; `memory_floor`: the subject's peak against its maximum; `pass`: every verdict held. Rows whose
    needs do not import are left out, their reasons in the document's `omitted`.
    """
    status = on_status or (lambda _msg: None)
    pairs = plan(cfg)
    status("warming up")
    _warm_up(cfg, pairs)
    return run_rows(
        cfg, lambda pair: _measure(pair[0], pair[1], cfg, status), pairs, on_row, on_document,
        kind="structured", memory=cfg.memory, omitted=omitted(cfg.suite),
    )  # fmt: skip