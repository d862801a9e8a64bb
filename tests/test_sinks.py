"""Attention sinks (issue 23): one logit per query head in every row's softmax denominator, with no value,
against gpt-oss's eager formula in float64, through `attention` and `Attend`, with gradients and second order.

    p = softmax([s_i1 .. s_ij, sink_h])[:j]        out_i = sum_j p_ij v_j        lse_i = logsumexp([s_i, sink_h])
"""

from __future__ import annotations

import pytest
import torch

from attend import Attend, attention, explain

from .helpers import dense_formula, make_qkv

BACKENDS = [None, "einsum", "chunked", "sdpa:flash"]  # auto, and every CPU backend that gives the log-sum-exp


def _formula(q, k, v, sinks, **kw):
    """gpt-oss's eager attention with sinks, float64, dense (`tests.helpers.dense_formula`)."""
    return dense_formula(q, k, v, sinks=sinks, **kw)


def _case(i=6, j=9, grad=False, per_batch=False):
    q, k, v = make_qkv(b=2, h=4, g=2, i=i, j=j, d=8, dtype=torch.float64)
    sinks = torch.randn(2, 4, dtype=torch.float64) if per_batch else torch.randn(4, dtype=torch.float64)
    pad = torch.ones(2, j, dtype=torch.bool)
    pad[1, j - 4 :] = False
    if grad:
        q, k, v, sinks = (t.requires_grad_() for t in (q, k, v, sinks))
    return q, k, v, sinks, pad


@pytest.mark.parametrize("per_batch", [False, True], ids=["(h,)", "(b, h)"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("backend", BACKENDS, ids=str)
def test_sinks_match_gpt_oss_eager(backend, causal, per_batch):
    q, k, v, sinks, pad = _case(per_batch=per_batch)
    want_out, want_lse = _formula(q, k, v, sinks, mask=pad, causal=causal)
    out, lse = attention(q, k, v, mask=pad, causal=causal, sinks=sinks, backend=backend, return_lse=True)
    torch.testing.assert_close(out, want_out)
    torch.testing.assert_close(lse, want_lse)
    torch.testing.assert_close(attention(q, k, v, mask=pad, causal=causal, sinks=sinks, backend=backend), want_out)
    module = Attend(causal=causal, backend=backend)
    torch.testing.assert_close(module(q, k, v, mask=pad, sinks=sinks), want_out)


def test_a_row_with_no_key_gives_zero_and_its_lse_is_the_sink():
    q, k, v, sinks, _ = _case(i=9, j=4)  # causal, i > j: the first 5 rows see no key
    out, lse = attention(q, k, v, causal=True, sinks=sinks, return_lse=True)
    assert (out[:, :, :5] == 0).all()
    torch.testing.assert_close(lse[:, :, :5], sinks[None, :, None].expand(2, 4, 5))
    out0, lse0 = attention(q, k[:, :, :0], v[:, :, :0], sinks=sinks, return_lse=True)  # no key at all
    assert (out0 == 0).all()
    torch.testing.assert_close(lse0, sinks[None, :, None].expand(2, 4, 9))


@pytest.mark.parametrize("backend", ["einsum", "chunked", "sdpa:flash"])
def test_sinks_gradients_and_second_order(backend):
    # small (h = 2, g = 1, d = 4): gradgradcheck's numerical Jacobians grow with the square of the inputs' size
    q, k, v = (t.requires_grad_() for t in make_qkv(b=2, h=2, g=1, i=3, j=5, d=4, dtype=torch.float64))
    sinks = torch.randn(2, dtype=torch.float64, requires_grad=True)
    pad = torch.tensor([[True] * 5, [True, True, True, False, False]])

    def f(q, k, v, sinks):
        return attention(q, k, v, mask=pad, sinks=sinks, backend=backend, return_lse=True)

    assert torch.autograd.gradcheck(f, (q, k, v, sinks))
    assert torch.autograd.gradgradcheck(f, (q, k, v, sinks))


def test_sinks_gradient_matches_the_formula():
    q, k, v, sinks, pad = _case(grad=True)
    out = attention(q, k, v, mask=pad, causal=True, sinks=sinks)
    want = _formula(q, k, v, sinks, mask=pad, causal=True)[0]
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v, sinks), dout)
    ref = torch.autograd.grad(want, (q, k, v, sinks), dout)
    for a, b, name in zip(got, ref, ("q", "k", "v", "sinks")):
        torch.testing.assert_close(a, b, msg=name)


def test_garbage_behind_padding_with_sinks():
    q, k, v, sinks, pad = _case()
    want = attention(q, k, v, mask=pad, sinks=sinks)
    k2, v2 = k.clone(), v.clone()
    k2[1, :, -4:] = v2[1, :, -4:] = float("nan")
    torch.testing.assert_close(attention(q, k2, v2, mask=pad, sinks=sinks), want)


def test_explain_says_how_sinks_run_and_why_sdpa_cannot():
    q, k, v, sinks, _ = _case()
    report = explain(q, k, v, sinks=sinks)
    assert report.backend == "sdpa:flash"  # PyTorch's CPU flash op gives the log-sum-exp the sinks need
    assert any("sinks run as a rescale" in note for note in report.lowering)
    assert any("log-sum-exp" in why for why in report.reasons["sdpa:math"])
    assert "sinks  : float64 (1, 4)" in report.inputs


@pytest.mark.parametrize(
    "sinks, error, text",
    [
        (torch.randn(3), ValueError, "expected `sinks` of shape (h,) = (4,) or (b, h) = (2, 4)"),
        (torch.ones(4, dtype=torch.long), TypeError, "expected `sinks` of a floating dtype"),
        ([0.0] * 4, TypeError, "expected `sinks` to be a torch.Tensor of shape (h,) or (b, h)"),
    ],
    ids=["shape", "dtype", "list"],
)
def test_bad_sinks(sinks, error, text):
    q, k, v, _, _ = _case()
    with pytest.raises(error) as info:
        attention(q, k, v, sinks=sinks)
    assert text in str(info.value)


# with_kvcache: gpt-oss's decoding path (sinks, a sliding window, GQA), contiguous and paged


def _cache_case(dtype=torch.float32, cap=64):
    gen = torch.Generator().manual_seed(3)
    kc = torch.randn(3, 2, cap, 16, generator=gen).to(dtype)
    vc = torch.randn(3, 2, cap, 16, generator=gen).to(dtype)
    lens = torch.tensor([5, 40, 17], dtype=torch.int32)
    sinks = torch.randn(8, generator=gen)
    return kc, vc, lens, sinks


@pytest.mark.parametrize("i", [1, 3])
@pytest.mark.parametrize("window", [None, (8, 0)], ids=["full", "window"])
@pytest.mark.parametrize("layout", ["contiguous", "paged"])
@pytest.mark.parametrize("backend", [None, "chunked", "einsum"], ids=str)
def test_with_kvcache_sinks_and_lse_match_attention_per_row(backend, layout, window, i):
    from attend import with_kvcache

    from .test_kvcache import paged

    kc, vc, lens, sinks = _cache_case()
    q = torch.randn(3, 8, i, 16, generator=torch.Generator().manual_seed(4))
    args: dict = {"cache_seqlens": lens, "window": window, "sinks": sinks, "backend": backend}
    if layout == "paged":
        pool_k, pool_v, table = paged(kc, vc, block_size=16)
        caches, args["block_table"] = (pool_k, pool_v), table
    else:
        caches = (kc, vc)
    with torch.no_grad():
        out, lse = with_kvcache(q, *caches, return_lse=True, **args)
        plain = with_kvcache(q, *caches, **args)
    for row, n in enumerate(lens.tolist()):
        want_out, want_lse = attention(
            q[row : row + 1], kc[row : row + 1, :, :n], vc[row : row + 1, :, :n], causal=True, window=window,
            sinks=sinks, return_lse=True, backend="einsum",
        )  # fmt: skip
        torch.testing.assert_close(out[row : row + 1], want_out, msg=lambda m, r=row: f"row {r} out: {m}")
        torch.testing.assert_close(lse[row : row + 1], want_lse, msg=lambda m, r=row: f"row {r} lse: {m}")
    torch.testing.assert_close(plain, out)


def test_with_kvcache_split_kv_long_rows_with_sinks():
    """Rows of 8k keys and more run split-KV (chunks merged by log-sum-exp): sinks apply once, after the merge."""
    from attend import with_kvcache

    kc, vc, _, sinks = _cache_case(cap=9000)
    lens = torch.tensor([8999, 9000, 8500], dtype=torch.int32)
    q = torch.randn(3, 8, 1, 16)
    with torch.no_grad():
        out, lse = with_kvcache(q, kc, vc, cache_seqlens=lens, sinks=sinks, return_lse=True)
    for row, n in enumerate(lens.tolist()):
        want_out, want_lse = attention(
            q[row : row + 1], kc[row : row + 1, :, :n], vc[row : row + 1, :, :n], causal=True, sinks=sinks,
            return_lse=True, backend="chunked",
        )  # fmt: skip
        torch.testing.assert_close(out[row : row + 1], want_out)
        torch.testing.assert_close(lse[row : row + 1], want_lse)


def test_varlen_attn_takes_sinks_and_softcap_like_attention():
    """varlen_attn's keyword extensions: each packed sequence equals attention on that sequence alone."""
    from attend import varlen_attn
    from attend.varlen import AuxRequest

    lengths = [5, 1, 7]
    cu = torch.tensor([0, 5, 6, 13], dtype=torch.int32)
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(13, h, 8, generator=gen, dtype=torch.float64) for h in (4, 2, 2))
    sinks = torch.randn(4, dtype=torch.float64)
    out, lse = varlen_attn(
        q, k, v, cu, cu, 7, 7, window_size=(-1, 0), enable_gqa=True, sinks=sinks, softcap=3.0,
        return_aux=AuxRequest(lse=True),
    )  # fmt: skip
    start = 0
    for n in lengths:
        rows = slice(start, start + n)
        qs, ks, vs = (t[rows].transpose(0, 1)[None] for t in (q, k, v))
        want_out, want_lse = attention(qs, ks, vs, causal=True, sinks=sinks, softcap=3.0, return_lse=True)
        torch.testing.assert_close(out[rows], want_out[0].transpose(0, 1))
        torch.testing.assert_close(lse[:, rows], want_lse[0])
        start += n
