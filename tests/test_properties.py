"""Property-based: random shapes, dtypes, masks, bias, causal and scale; every registered backend that
declares it can run the case, forward and dq, dk, dv (and dbias), against the float64 reference with the
earned tolerances (`attend.testing.check_backend`).

Registry-driven: a backend registered later (`chunked`) is covered without touching this file.

Profiles (tests/conftest.py): `ci` (default, 60 derandomized examples) and `thorough` (10,000):

    HYPOTHESIS_PROFILE=thorough ATTEND_PROPERTY_STATS=stats.json pytest tests/test_properties.py

ATTEND_PROPERTY_STATS: write the run's figures (examples, checks per backend, skips, mismatches; and
`nonfinite:*` for the NaN/inf property: examples, rows, rows that see a bad entry, checks) as JSON, every 50 examples and at the end. With it set, a mismatch is recorded there (case and report)
and the run goes on, so a long run counts every mismatch instead of stopping at the first; the test
still fails at the end if there was any. Without it (CI), the first mismatch fails the
example and hypothesis shrinks it.

Shape legend: b batch, h query heads, g key/value heads, i query positions, j key positions,
d head dim (q and k), e value head dim.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from attend import attention, get_backend, list_backends
from attend.inputs import validate
from attend.testing import DTYPES, check_backend

from .conftest import DEVICES

SIZES = [1, 2, 3, 5, 7, 8, 13, 16, 17, 31, 33]  # 1s, primes, around a power of two
HEAD_DIMS = [1, 2, 3, 4, 5, 8, 16, 40]

STATS: Counter = Counter()
MISMATCHES: list[dict] = []
COLLECT = bool(os.environ.get("ATTEND_PROPERTY_STATS"))

# helpers


@dataclass
class Case:
    b: int
    h: int
    g: int
    i: int
    j: int
    d: int
    e: int
    dtype: torch.dtype
    device: str
    causal: bool
    scale: float | None
    mask_shape: tuple | None  # None, or the shape of a bool mask; (b, j) is key padding
    mask_keep: float
    dead_row: bool  # one query row with no key to attend
    tile: bool  # one whole (rows x keys) tile masked out
    bias_shape: tuple | None
    bias_neg_inf: float  # fraction of bias entries that are -inf
    bias_grad: bool
    seed: int

    def tensors(self):
        gen = torch.Generator().manual_seed(self.seed)
        q = torch.randn(self.b, self.h, self.i, self.d, generator=gen)
        k = torch.randn(self.b, self.g, self.j, self.d, generator=gen)
        v = torch.randn(self.b, self.g, self.j, self.e, generator=gen)
        mask = bias = None
        if self.mask_shape is not None:
            mask = torch.rand(self.mask_shape, generator=gen) < self.mask_keep
            if mask.dim() >= 2 and mask.shape[-1] == self.j:
                if self.dead_row:
                    if mask.dim() == 2:  # key padding: a batch element with no key at all
                        mask[0] = False
                    else:
                        mask[..., mask.shape[-2] // 2, :] = False
                if self.tile and mask.dim() >= 3 and mask.shape[-2] == self.i:
                    r0 = int(torch.randint(0, self.i, (1,), generator=gen))
                    c0 = int(torch.randint(0, self.j, (1,), generator=gen))
                    mask[..., r0 : r0 + max(1, self.i // 2), c0 : c0 + max(1, self.j // 2)] = False
        if self.bias_shape is not None:
            bias = torch.randn(self.bias_shape, generator=gen)
            if self.bias_neg_inf > 0:
                bias = bias.masked_fill(torch.rand(self.bias_shape, generator=gen) < self.bias_neg_inf, float("-inf"))
        q, k, v = (t.to(self.device, self.dtype) for t in (q, k, v))
        mask = None if mask is None else mask.to(self.device)
        bias = None if bias is None else bias.to(self.device, self.dtype).requires_grad_(self.bias_grad)
        return q, k, v, mask, bias


def _broadcast_shape(draw, full: tuple[int, ...], rank: int) -> tuple[int, ...]:
    """The last `rank` dims of `full`, each kept or made 1."""
    return tuple(draw(st.sampled_from([1, n])) for n in full[len(full) - rank :])


@st.composite
def cases(draw) -> Case:
    b = draw(st.integers(1, 3))
    g = draw(st.sampled_from([1, 2, 3]))
    h = g * draw(st.sampled_from([1, 2, 3, 4]))
    i, j = draw(st.sampled_from(SIZES)), draw(st.sampled_from(SIZES))
    d = draw(st.sampled_from(HEAD_DIMS))
    e = draw(st.one_of(st.just(d), st.sampled_from(HEAD_DIMS)))
    full = (b, h, i, j)

    mask_kind = draw(st.sampled_from(["none", "key_padding", "bool"]))
    mask_shape, tile = None, False
    if mask_kind == "key_padding":
        mask_shape = (b, j)
    elif mask_kind == "bool":
        rank = draw(st.sampled_from([1, 3, 4]))  # a 2-D mask is key padding, covered above
        tile = rank >= 3 and draw(st.booleans())
        mask_shape = _broadcast_shape(draw, full, rank)
        if tile:  # a tile needs the query and key dims
            mask_shape = mask_shape[:-2] + (i, j)
    bias_shape = None
    if draw(st.booleans()):
        bias_shape = _broadcast_shape(draw, full, draw(st.integers(1, 4)))

    return Case(
        b=b, h=h, g=g, i=i, j=j, d=d, e=e,
        dtype=draw(st.sampled_from(DTYPES)),
        device=draw(st.sampled_from(DEVICES)),
        causal=draw(st.booleans()),
        scale=draw(st.one_of(st.none(), st.floats(0.05, 2.0))),
        mask_shape=mask_shape,
        mask_keep=draw(st.sampled_from([0.2, 0.5, 0.9])),
        dead_row=draw(st.booleans()),
        tile=tile,
        bias_shape=bias_shape,
        bias_neg_inf=draw(st.sampled_from([0.0, 0.0, 0.2, 0.6])) if bias_shape else 0.0,
        bias_grad=draw(st.booleans()) if bias_shape else False,
        seed=draw(st.integers(0, 2**31 - 1)),
    )  # fmt: skip


def _runnable(name: str, case: Case, q, k, v, mask, bias) -> list[str]:
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    inp = validate(*leaves, mask=mask, bias=bias, causal=case.causal, scale=case.scale)
    return get_backend(name).reasons_unsupported(inp)


def _dump_stats() -> None:
    path = os.environ.get("ATTEND_PROPERTY_STATS")
    if path:
        figures = {k: v for k, v in STATS.items() if k != "start"}
        figures["seconds"] = round(time.perf_counter() - STATS["start"], 1)
        figures["backends"] = list_backends()
        figures["profile"] = os.environ.get("HYPOTHESIS_PROFILE", "ci")
        figures["mismatch_details"] = MISMATCHES[:50]
        with open(path, "w") as f:
            json.dump(figures, f, indent=2, sort_keys=True)


@pytest.fixture(scope="module", autouse=True)
def _write_stats():
    STATS.clear()
    MISMATCHES.clear()
    STATS["start"] = time.perf_counter()
    yield
    _dump_stats()


# tests


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=cases())
def test_every_backend_matches_reference(case: Case):
    note(repr(case))
    STATS["examples"] += 1
    if STATS["examples"] % 50 == 0:
        _dump_stats()  # progress, for long `thorough` runs
    q, k, v, mask, bias = case.tensors()
    ran = 0
    for name in list_backends():
        reasons = _runnable(name, case, q, k, v, mask, bias)
        if reasons:
            STATS[f"skipped:{name}"] += 1
            continue
        STATS[f"checked:{name}"] += 1
        try:
            check_backend(name, q, k, v, mask=mask, bias=bias, causal=case.causal, scale=case.scale)
        except AssertionError as err:
            STATS[f"mismatch:{name}"] += 1
            if not COLLECT:
                raise
            MISMATCHES.append({"backend": name, "case": repr(case), "report": str(err).splitlines()})
        ran += 1
    assert ran >= 1, "no backend ran this case; the reference `einsum` runs everything"


def test_no_mismatch_was_collected():
    """Runs after the property test (file order): fails a collecting run that found mismatches."""
    assert not MISMATCHES, f"{len(MISMATCHES)} mismatches; first: {MISMATCHES[0]}"


@st.composite
def nonfinite_cases(draw) -> tuple[Case, int, int, int, float]:
    """A `cases()` case plus how many q, k and v entries to poison, and with what (NaN, +inf, -inf)."""
    case = draw(cases())
    counts = [draw(st.integers(0, 3)) for _ in range(3)]
    value = draw(st.sampled_from([float("nan"), float("nan"), float("inf"), float("-inf")]))
    return (case, *counts, value)


def _poison(t: torch.Tensor, count: int, value: float, gen: torch.Generator) -> torch.Tensor:
    t = t.clone()
    flat = t.view(-1)
    for index in torch.randint(0, flat.numel(), (count,), generator=gen).tolist():
        flat[index] = value
    return t


def _expected_rows(case: Case, mask, bias, q, k, v) -> torch.Tensor:
    """bool (b, h, i), from the dense definition: a row sees a bad key it may attend, or its own bad query
    when it may attend any key."""
    b, h, i, j = case.b, case.h, case.i, case.j
    allowed = torch.ones(b, h, i, j, dtype=torch.bool, device=q.device)
    if mask is not None:
        allowed = allowed & (mask[:, None, None, :] if mask.dim() == 2 else mask)
    if case.causal:
        allowed = allowed & torch.ones(i, j, dtype=torch.bool, device=q.device).tril(j - i)
    if bias is not None:
        allowed = allowed & (bias != float("-inf"))
    q_bad = ~torch.isfinite(q).all(-1)
    kv_bad = ~(torch.isfinite(k).all(-1) & torch.isfinite(v).all(-1)).repeat_interleave(h // case.g, dim=1)
    return (allowed & (q_bad[..., None] | kv_bad[:, :, None, :])).any(-1)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(spec=nonfinite_cases())
def test_nonfinite_reaches_exactly_the_rows_that_see_it(spec):
    """Random cases with NaN/inf entries in q, k, v: on every backend that runs the case (forward), with
    `check_finite=True` the NaN output rows are exactly the rows that see a bad entry, and every other row equals the same
    backend's output with those entries zeroed; with the default, those other rows are the same."""
    case, n_q, n_k, n_v, value = spec
    note(repr(spec))
    STATS["nonfinite:examples"] += 1
    q, k, v, mask, bias = case.tensors()
    bias = None if bias is None else bias.detach()
    gen = torch.Generator().manual_seed(case.seed + 1)
    q, k, v = (_poison(t, n, value, gen) for t, n in zip((q, k, v), (n_q, n_k, n_v)))
    sees = _expected_rows(case, mask, bias, q, k, v)
    STATS["nonfinite:rows"] += sees.numel()
    STATS["nonfinite:rows_that_see"] += int(sees.sum())
    kw = dict(mask=mask, bias=bias, causal=case.causal, scale=case.scale)
    zeroed = [t.nan_to_num(0.0, 0.0, 0.0) for t in (q, k, v)]
    for name in list_backends():
        if get_backend(name).reasons_unsupported(validate(q, k, v, **kw)):
            continue
        STATS[f"nonfinite:checked:{name}"] += 1
        out = attention(q, k, v, backend=name, check_finite=True, **kw)
        nan_rows = torch.isnan(out).any(-1)
        assert torch.equal(nan_rows, sees), f"{name}: NaN rows {nan_rows.nonzero().tolist()} != {sees.nonzero().tolist()}"
        assert torch.isnan(out[sees]).all(), f"{name}: a row that sees a bad entry is NaN in every column"
        want = attention(*zeroed, backend=name, **kw)
        torch.testing.assert_close(out[~sees], want[~sees], atol=0, rtol=0, msg=f"{name}: clean rows changed")
        # the default (the guard on CPU): nothing leaks into a row that does not see a bad entry
        guarded = attention(q, k, v, backend=name, **kw)
        assert torch.isfinite(guarded[~sees]).all(), f"{name}: a NaN/inf leaked under the default check"
        torch.testing.assert_close(guarded[~sees], want[~sees], atol=0, rtol=0, msg=f"{name}: default changed rows")
