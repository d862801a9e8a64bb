"""Logit soft-capping (issue 23): s = softcap * tanh((scale * q.k) / softcap) before bias and masks (Gemma 2's
eager formula and flash-attention's order), against a float64 formula, on every backend that declares it
(`Caps.softcap`), with gradients, second order, the log-sum-exp and sinks."""

from __future__ import annotations

import pytest
import torch

from attend import Attend, attention, explain, get_backend

from .helpers import CPU_BACKENDS, dense_formula, make_qkv

CAP_BACKENDS = [n for n in CPU_BACKENDS if get_backend(n).caps["cpu"].softcap]


def _formula(q, k, v, cap, **kw):
    """Gemma 2's eager formula in float64, dense (`tests.helpers.dense_formula`)."""
    return dense_formula(q, k, v, softcap=cap, **kw)


def _case(grad=False, small=False, **kw):
    if small:
        q, k, v = make_qkv(b=1, h=2, g=1, i=3, j=5, d=4, dtype=torch.float64)
    else:
        q, k, v = make_qkv(b=2, h=4, g=2, i=7, j=11, d=8, dtype=torch.float64)
    q = q * 4  # logits of several units: the cap bends them
    pad = torch.ones(q.shape[0], k.shape[2], dtype=torch.bool)
    pad[-1, -2:] = False
    if grad:
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    return q, k, v, pad


@pytest.mark.parametrize("cap", [2.0, 50.0])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("backend", [None, *CAP_BACKENDS], ids=str)
def test_softcap_matches_the_formula(backend, causal, cap):
    q, k, v, pad = _case()
    bias = torch.randn(1, 4, 7, 11, dtype=torch.float64)
    want_out, want_lse = _formula(q, k, v, cap, mask=pad, bias=bias, causal=causal)
    out, lse = attention(q, k, v, mask=pad, bias=bias, causal=causal, softcap=cap, backend=backend, return_lse=True)
    torch.testing.assert_close(out, want_out)
    torch.testing.assert_close(lse, want_lse)
    torch.testing.assert_close(Attend(causal=causal, softcap=cap, backend=backend)(q, k, v, mask=pad, bias=bias), want_out)


@pytest.mark.parametrize("backend", CAP_BACKENDS)
def test_softcap_gradients_and_second_order(backend):
    q, k, v, pad = _case(grad=True, small=True)
    bias = torch.randn(1, 2, 3, 5, dtype=torch.float64, requires_grad=True)

    def f(q, k, v, bias):
        return attention(q, k, v, mask=pad, bias=bias, causal=True, softcap=2.0, backend=backend, return_lse=True)

    assert torch.autograd.gradcheck(f, (q, k, v, bias))
    assert torch.autograd.gradgradcheck(f, (q, k, v, bias))


def test_softcap_with_sinks_and_garbage_behind_padding():
    q, k, v, pad = _case()
    sinks = torch.randn(4, dtype=torch.float64)
    want = attention(q, k, v, mask=pad, softcap=3.0, sinks=sinks, backend="einsum")
    k2, v2 = k.clone(), v.clone()
    k2[-1, :, -2:] = v2[-1, :, -2:] = float("nan")
    for backend in CAP_BACKENDS:
        torch.testing.assert_close(attention(q, k2, v2, mask=pad, softcap=3.0, sinks=sinks, backend=backend), want)


def test_l2_with_softcap_caps_the_l2_score():
    """score="l2" with softcap caps the l2 score itself; its dot-product lowering cannot (it shifts each row),
    so it runs where the l2 score is computed natively, and explain says why the others cannot."""
    q, k, v, pad = _case()
    want = _formula(q, k, v, 5.0, mask=pad, score="l2")[0]
    torch.testing.assert_close(attention(q, k, v, mask=pad, score="l2", softcap=5.0), want)
    report = explain(q, k, v, mask=pad, score="l2", softcap=5.0)
    assert report.backend == "einsum"
    assert any("score='l2' with softcap" in why for why in report.reasons["chunked"])


def test_explain_and_errors():
    q, k, v, _ = _case()
    report = explain(q, k, v, softcap=30.0)
    assert report.backend in CAP_BACKENDS
    assert "softcap=30.0 given; this backend cannot cap logits inside its kernel" in report.reasons["sdpa:flash"]
    assert "--softcap 30.0" in report.hint
    for bad, error in ((0.0, ValueError), (-1.0, ValueError), (float("inf"), ValueError), ("50", TypeError)):
        with pytest.raises(error, match="expected `softcap`"):
            attention(q, k, v, softcap=bad)


@pytest.mark.parametrize("layout", ["contiguous", "paged"])
def test_with_kvcache_softcap_matches_attention_per_row(layout):
    """Gemma 2's decoding: the decode kernel cannot cap, so the call takes the dispatch path, and says so."""
    from attend import explain_kvcache, with_kvcache

    from .test_kvcache import paged

    gen = torch.Generator().manual_seed(6)
    kc, vc = torch.randn(2, 2, 32, 8, generator=gen), torch.randn(2, 2, 32, 8, generator=gen)
    q = torch.randn(2, 4, 1, 8, generator=gen) * 4
    lens = torch.tensor([9, 30], dtype=torch.int32)
    args: dict = {"cache_seqlens": lens, "softcap": 2.0, "window": (4, 0)}
    caches = (kc, vc)
    if layout == "paged":
        pool_k, pool_v, table = paged(kc, vc, block_size=8)
        caches, args["block_table"] = (pool_k, pool_v), table
    plan = explain_kvcache(q, *caches, **args)
    assert plan.path == "dispatch" and any("cannot cap" in why for why in plan.reasons)
    with torch.no_grad():
        out = with_kvcache(q, *caches, **args)
    for row, n in enumerate(lens.tolist()):
        want = attention(q[row : row + 1], kc[row : row + 1, :, :n], vc[row : row + 1, :, :n], causal=True,
                         window=(4, 0), softcap=2.0, backend="einsum")  # fmt: skip
        torch.testing.assert_close(out[row : row + 1], want)


@pytest.mark.parametrize("backend", [None, *CAP_BACKENDS], ids=str)
def test_check_finite_with_softcap_and_sinks_marks_exactly_the_rows_that_see_a_nan(backend):
    """The non-finite rule holds with the new vocabulary: a NaN key makes NaN exactly the rows that see it
    (causal: the rows at or after it), in the output and the lse; every other row is the formula's."""
    q, k, v, _ = _case()
    k = k.clone()
    k[0, 1, 4] = float("nan")  # batch 0, kv head 1 (query heads 2, 3), key 4
    sinks = torch.randn(4, dtype=torch.float64)
    out, lse = attention(q, k, v, causal=True, softcap=3.0, sinks=sinks, check_finite=True, backend=backend,
                         return_lse=True)  # fmt: skip
    sees = torch.zeros(2, 4, 7, dtype=torch.bool)
    sees[0, 2:, 4 - (11 - 7) :] = True  # bottom-right causal: query x sees key 4 iff 4 <= x + 4
    assert torch.equal(torch.isnan(out).any(-1), sees) and torch.equal(torch.isnan(lse), sees)
    clean = k.clone()
    clean[0, 1, 4] = 0.0
    want_out, want_lse = dense_formula(q, clean, v, causal=True, softcap=3.0, sinks=sinks)
    torch.testing.assert_close(out[~sees], want_out[~sees])
    torch.testing.assert_close(lse[~sees], want_lse[~sees])
