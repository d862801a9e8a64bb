"""`return_lse=True`: the log-sum-exp of each row's softmax normaliser, against a float64 formula written from the
semantics (issue 23's first item), on every backend that declares it (`Caps.lse`), with gradients and second order.

    lse[b, h, i] = log sum_{j visible} exp(scale * q_i . k_j + bias[b, h, i, j])      (-inf: no visible key)
"""

from __future__ import annotations

import math

import pytest
import torch

from attend import attention, explain, get_backend
from attend.inputs import validate

from .helpers import CPU_BACKENDS, dense_formula, make_qkv, skip_unless_runs

LSE_BACKENDS = [n for n in CPU_BACKENDS if get_backend(n).caps["cpu"].lse]


def _formula(q, k, v, **kw):
    """The lse of the semantics' float64 formula (`tests.helpers.dense_formula`)."""
    return dense_formula(q, k, v, **kw)[1]


CASES = {
    "plain": {},
    "causal-i<j": {"causal": True},
    "padding": {"mask": "pad"},
    "bias": {"bias": True},
    "causal-i>j": {"causal": True, "swap": True},  # rows with no key: -inf
    "l2": {"score": "l2", "mask": "pad"},
}


def _inputs(case, dtype=torch.float64, grad=False, small=False):
    spec = dict(CASES[case])
    i, j = (9, 5) if spec.pop("swap", False) else (5, 9)
    if small:  # gradgradcheck's numerical Jacobians grow with the square of the inputs' size
        q, k, v = make_qkv(b=2, h=2, g=1, i=i - 2, j=j - 4, d=4, dtype=dtype)
        i, j = i - 2, j - 4
    else:
        q, k, v = make_qkv(b=2, h=4, g=2, i=i, j=j, d=8, dtype=dtype)
    kw: dict = {}
    if spec.pop("mask", None):
        pad = torch.ones(2, j, dtype=torch.bool)
        pad[1, j - 3 :] = False
        kw["mask"] = pad
    if spec.pop("bias", None):
        kw["bias"] = torch.randn(1, q.shape[1], i, j, dtype=dtype)
    kw.update(spec)
    if grad:
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        if "bias" in kw:
            kw["bias"].requires_grad_()
    return q, k, v, kw


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("name", LSE_BACKENDS)
def test_lse_matches_the_formula(name, case):
    q, k, v, kw = _inputs(case)
    skip_unless_runs(name, validate(q, k, v, return_lse=True, **kw))
    out, lse = attention(q, k, v, backend=name, return_lse=True, **kw)
    want = _formula(q, k, v, **kw)
    assert lse.shape == want.shape and lse.dtype == torch.float64
    torch.testing.assert_close(lse, want)
    torch.testing.assert_close(out, attention(q, k, v, backend=name, **kw))  # the output is the plain call's


@pytest.mark.parametrize("name", LSE_BACKENDS)
def test_lse_is_float32_for_half_inputs(name):
    q, k, v, kw = _inputs("padding", dtype=torch.bfloat16)
    skip_unless_runs(name, validate(q, k, v, return_lse=True, **kw))
    _, lse = attention(q, k, v, backend=name, return_lse=True, **kw)
    assert lse.dtype == torch.float32
    torch.testing.assert_close(lse.double(), _formula(q, k, v, **kw), atol=0.1, rtol=0.02)


@pytest.mark.parametrize("case", ["plain", "padding", "bias", "causal-i>j", "l2"])
@pytest.mark.parametrize("name", LSE_BACKENDS)
def test_lse_gradients_and_second_order(name, case):
    """gradcheck and gradgradcheck of (out, lse) in q, k, v (and bias): the lse's gradient flows into q, k, bias."""
    q, k, v, kw = _inputs(case, grad=True, small=True)
    skip_unless_runs(name, validate(q, k, v, return_lse=True, **kw))
    leaves = [q, k, v] + ([kw.pop("bias")] if "bias" in kw else [])

    def f(*xs):
        extra = {"bias": xs[3]} if len(xs) > 3 else {}
        out, lse = attention(*xs[:3], backend=name, return_lse=True, **kw, **extra)
        return out, lse.masked_fill(torch.isinf(lse), 0.0)  # a dead row's -inf is a constant

    assert torch.autograd.gradcheck(f, leaves)
    assert torch.autograd.gradgradcheck(f, leaves)


def test_lse_gradient_is_the_softmax():
    """d lse_i / d bias_ij = p_ij: the lse's gradient alone (no output gradient)."""
    q, k, v, kw = _inputs("bias", grad=True)
    for name in LSE_BACKENDS:
        bias = kw["bias"].detach().clone().requires_grad_()
        if get_backend(name).reasons_unsupported(validate(q, k, v, bias=bias, return_lse=True)):
            continue  # (sdpa:flash gives no bias gradient)
        _, lse = attention(q, k, v, bias=bias, backend=name, return_lse=True)
        (grad,) = torch.autograd.grad(lse.sum(), bias)
        p = torch.softmax(
            q.double() @ k.double().repeat_interleave(2, 1).transpose(-1, -2) * 8**-0.5 + bias.double(), -1
        )
        torch.testing.assert_close(grad, p.sum(0, keepdim=True), msg=name)


def test_auto_picks_a_backend_that_gives_it_and_explain_says_why_not_the_others():
    q, k, v = make_qkv(b=1, h=2, g=2, i=16, j=16, d=16)
    report = explain(q, k, v, return_lse=True)
    assert report.backend == "sdpa:flash"  # PyTorch's CPU flash op returns the lse (`_FlashLse`)
    assert "needs each row's log-sum-exp (return_lse=True, or sinks); this backend gives none" in report.reasons[
        "sdpa:math"
    ]
    with pytest.raises(ValueError, match="this backend gives none"):
        attention(q, k, v, backend="sdpa:math", return_lse=True)
    assert "--return-lse" in report.hint
    windowed = explain(q, k, v, return_lse=True, window=(4, 0))
    assert windowed.backend == "chunked"
    assert any("the lse path is one kernel call" in why for why in windowed.reasons["sdpa:flash"])


def test_lse_with_dropout_is_the_undropped_normaliser():
    q, k, v, kw = _inputs("padding")
    torch.manual_seed(1)
    _, lse = attention(q, k, v, dropout_p=0.5, return_lse=True, **kw)
    torch.testing.assert_close(lse, _formula(q, k, v, **kw))


def test_garbage_and_empty_inputs_keep_the_lse():
    """Garbage behind padding changes no lse; no keys at all: every lse is -inf."""
    q, k, v, kw = _inputs("padding")
    want = attention(q, k, v, return_lse=True, **kw)[1]
    k2, v2 = k.clone(), v.clone()
    k2[1, :, -3:] = v2[1, :, -3:] = float("nan")
    torch.testing.assert_close(attention(q, k2, v2, return_lse=True, **kw)[1], want)
    out, lse = attention(q, k[:, :, :0], v[:, :, :0], return_lse=True)
    assert (out == 0).all() and (lse == -math.inf).all() and lse.shape == (2, 4, 5)


def test_check_finite_marks_the_lse_of_rows_that_see_a_nan():
    q, k, v, _ = _inputs("plain")
    k = k.clone()
    k[0, 0, 2] = float("nan")
    out, lse = attention(q, k, v, return_lse=True, check_finite=True)
    assert torch.isnan(lse[0, :2]).all() and torch.isfinite(lse[1]).all()
    assert torch.equal(torch.isnan(out).any(-1), torch.isnan(lse))


def test_jacobians_of_the_lse_alone_and_of_both():
    """torch.func.jacrev of the lse alone (the output unused) and of (out, lse): vmapped over dlse only, the
    chunked backward's accumulators must be batched like it."""
    from torch.func import jacrev

    q, k, v = make_qkv(b=1, h=2, g=1, i=3, j=4, d=4, dtype=torch.float64)
    for name in LSE_BACKENDS:
        got = jacrev(lambda x, n=name: attention(x, k, v, backend=n, return_lse=True)[1])(q)
        want = jacrev(lambda x: _formula(x, k, v))(q)
        torch.testing.assert_close(got, want, msg=name)
        both = jacrev(lambda x, n=name: attention(x, k, v, backend=n, return_lse=True))(q)
        torch.testing.assert_close(both[1], want, msg=name)


def test_a_plain_call_pays_nothing_for_the_lse_in_backward(monkeypatch):
    """The chunked backward gets no dlse when the loss does not use the lse (no subtraction, no zeros)."""
    import attend.tiles as tiles

    seen = []
    original = tiles.backward

    def spy(*args, **kwargs):
        seen.append(args[8] if len(args) > 8 else kwargs.get("dlse"))
        return original(*args, **kwargs)

    monkeypatch.setattr(tiles, "backward", spy)
    q, k, v, kw = _inputs("padding", grad=True)
    attention(q, k, v, backend="chunked", **kw).sum().backward()
    out, lse = attention(q, k, v, backend="chunked", return_lse=True, **kw)
    out.sum().backward()
    assert seen == [None, None]
    attention(q, k, v, backend="chunked", return_lse=True, **kw)[1].sum().backward()
    assert seen[-1] is not None


def test_flash_lse_backward_both_ways():
    """sdpa:flash's lse gradient: through the corrected output (dout != 0 on every row) and through the widened
    call (a loss on the lse alone, dout = 0), against the reference, with GQA and a padding mask."""
    q, k, v, kw = _inputs("padding", dtype=torch.float32, grad=True)
    ro, rl = attention(*(t.double() for t in (q, k, v)), backend="einsum", return_lse=True, **kw)
    out, lse = attention(q, k, v, backend="sdpa:flash", return_lse=True, **kw)
    dout, dlse = torch.randn_like(out), torch.randn_like(lse)
    for loss, ref in (
        ((out * dout).sum() + (lse * dlse).sum(), (ro * dout.double()).sum() + (rl * dlse.double()).sum()),
        ((lse * dlse).sum(), (rl * dlse.double()).sum()),
    ):
        got = torch.autograd.grad(loss, (q, k, v), retain_graph=True, allow_unused=True)
        want = torch.autograd.grad(ref, (q, k, v), retain_graph=True, allow_unused=True)
        for a, b, x in zip(got, want, (q, k, v)):
            a = torch.zeros_like(x) if a is None else a
            b = torch.zeros_like(x) if b is None else b.float()
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
