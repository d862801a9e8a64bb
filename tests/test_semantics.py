"""Semantics every backend passes: causal alignment with i != j, fully masked rows, garbage in masked
positions, grouped-query heads, dropout statistics, determinism, and proof the pinned path ran."""

from __future__ import annotations

import pytest
import torch

import attend
from attend import attention, get_backend
from attend.backends.einsum import einsum_attention
from attend.inputs import FLOAT_DTYPES, validate
from attend.testing import tolerance

from .helpers import CPU_BACKENDS, make_qkv, needs, skip_unless_runs, spy_sdpa


def runnable(name, q, k, v, **kw):
    skip_unless_runs(name, validate(q, k, v, **kw))


@pytest.mark.parametrize("name", CPU_BACKENDS)
@pytest.mark.parametrize("i, j", [(2, 5), (5, 2), (7, 64), (64, 7), (129, 129)])
def test_causal_is_bottom_right_aligned(name, i, j):
    q, k, v = make_qkv(b=1, h=2, g=2, i=i, j=j, d=16, dtype=torch.float64)
    runnable(name, q, k, v, causal=True)
    out = attention(q, k, v, causal=True, backend=name)
    tril = torch.ones(i, j, dtype=torch.bool).tril(diagonal=j - i)  # bottom-right aligned, by hand
    expected = attention(q, k, v, mask=tril[None, None], backend="einsum")
    torch.testing.assert_close(out, expected)


def test_causal_by_hand_for_kv_cache_shape():
    """i=2, j=5: q0 sees k0..k3, q1 sees k0..k4 (computed without the library's mask code)."""
    q, k, v = make_qkv(b=1, h=1, g=1, i=2, j=5, d=8, dtype=torch.float64)
    out = attention(q, k, v, causal=True, backend="einsum")
    for row, visible in ((0, 4), (1, 5)):
        w = (q[0, 0, row] @ k[0, 0, :visible].T * 8**-0.5).softmax(-1)
        torch.testing.assert_close(out[0, 0, row], w @ v[0, 0, :visible])


def _dead_row_cases():
    i, j = 9, 12
    mask = torch.ones(2, 1, i, j, dtype=torch.bool)
    mask[0, 0, 3] = False  # one row with no key, via mask
    pad = torch.ones(2, j, dtype=torch.bool)
    pad[1] = False  # a whole batch element padded away
    bias = torch.zeros(1, 1, i, j)
    bias[..., 5, :] = float("-inf")  # a row killed by bias = -inf
    return {
        "mask": (dict(mask=mask), (slice(0, 1), slice(None), slice(3, 4))),
        "padding": (dict(mask=pad), (slice(1, 2), slice(None), slice(None))),
        "causal-i>j": (dict(causal=True), (slice(None), slice(None), slice(0, 0))),
        "bias-inf": (dict(bias=bias), (slice(None), slice(None), slice(5, 6))),
    }


@pytest.mark.parametrize("name", CPU_BACKENDS)
@pytest.mark.parametrize("kind", list(_dead_row_cases()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_with_no_key_gives_zero_and_finite_grads(name, kind, dtype):
    kw, rows = _dead_row_cases()[kind]
    i, j = (20, 12) if kind == "causal-i>j" else (9, 12)
    if kind == "causal-i>j":
        rows = (slice(None), slice(None), slice(0, i - j))  # rows 0..7 come before every key
    q, k, v = make_qkv(b=2, h=4, g=2, i=i, j=j, d=16, dtype=dtype, grad=True)
    kw = {key: (t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t) for key, t in kw.items()}
    runnable(name, q, k, v, **kw)
    out = attention(q, k, v, backend=name, **kw)
    assert (out[rows] == 0).all(), f"{name}: rows with no key must be exactly 0"
    out.float().square().sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all(), f"{name}: non-finite gradient"
    assert (q.grad[rows] == 0).all()


@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_old_kernel_dead_row_fixup(name, monkeypatch):
    """Kernels older than torch 2.5 give NaN for rows with no key; the fix-up path must give 0 too."""
    if not name.startswith("sdpa:"):
        pytest.skip(f"{name}: no fix-up path (not an SDPA kernel)")
    from attend.backends import sdpa

    monkeypatch.setattr(sdpa, "zeroes_dead_rows", lambda variant, device: False)
    q, k, v = make_qkv(b=2, h=2, g=2, i=20, j=12, d=16, grad=True)
    pad = torch.ones(2, 12, dtype=torch.bool)
    pad[1] = False
    runnable(name, q, k, v, mask=pad, causal=True)
    out = attention(q, k, v, mask=pad, causal=True, backend=name)
    ref = attention(q, k, v, mask=pad, causal=True, backend="einsum")
    torch.testing.assert_close(out, ref, **tolerance(out.dtype))
    out.sum().backward()
    assert torch.isfinite(q.grad).all()


@pytest.mark.parametrize("name", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_garbage_in_masked_positions_never_leaks(name, dtype):
    q, k, v = make_qkv(b=2, h=4, g=2, i=33, j=40, d=16, dtype=dtype)
    pad = torch.ones(2, 40, dtype=torch.bool)
    pad[0, 25:] = False
    runnable(name, q, k, v, mask=pad, causal=True)
    clean = attention(q, k, v, mask=pad, causal=True, backend=name)
    huge = 1e4 if dtype != torch.float16 else 60.0  # large, finite, and q @ k stays finite in the dtype
    k2, v2 = k.clone(), v.clone()
    k2[0, :, 25:] = huge
    v2[0, :, 25:] = -huge
    dirty = attention(q, k2, v2, mask=pad, causal=True, backend=name)
    assert torch.equal(clean, dirty) or torch.allclose(clean.float(), dirty.float(), **tolerance(torch.float32, "reordered"))


@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_grouped_query_heads_match_repeated_kv(name):
    q, k, v = make_qkv(b=2, h=8, g=2, i=17, j=31, d=16, dtype=torch.float64)
    runnable(name, q, k, v, causal=True)
    out = attention(q, k, v, causal=True, backend=name)
    def rep(t):  # query head n uses kv head n // (h / g)
        return t.repeat_interleave(4, dim=1)

    torch.testing.assert_close(out, attention(q, rep(k), rep(v), causal=True, backend="einsum"))


@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_dropout_statistics(name):
    p = 0.3
    # q = 0: uniform attention; v = one-hot per key: every output entry is 1/j * keep / (1 - p)
    b, h, i, j = 2, 4, 256, 64
    q = torch.zeros(b, h, i, j)
    k = torch.randn(b, h, j, j)
    v = torch.eye(j).expand(b, h, j, j).contiguous()
    runnable(name, q, k, v, dropout_p=p)
    torch.manual_seed(1)
    out = attention(q, k, v, dropout_p=p, backend=name)
    dropped = (out == 0).float().mean().item()
    assert abs(dropped - p) < 0.01, f"{name}: dropped {dropped:.4f}, expected {p}"
    kept = out[out != 0]
    torch.testing.assert_close(kept, torch.full_like(kept, 1 / j / (1 - p)))
    torch.manual_seed(1)
    again = attention(q, k, v, dropout_p=p, backend=name)
    assert torch.equal(out, again), "same seed, same dropout"


@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_declared_deterministic_is_bitwise_repeatable(name):
    backend = get_backend(name)
    if not backend.caps["cpu"].deterministic:
        pytest.skip(f"{name}: declared non-deterministic on cpu")
    q, k, v = make_qkv(b=2, h=4, g=2, i=65, j=65, d=32, grad=True)
    runnable(name, q, k, v, causal=True)
    results = []
    for _ in range(2):
        out = attention(q, k, v, causal=True, backend=name)
        grads = torch.autograd.grad(out.sum(), (q, k, v))
        results.append((out, *grads))
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", [n for n in CPU_BACKENDS if n.startswith("sdpa:")])
def test_pinned_sdpa_backend_runs_only_its_kernel(name, monkeypatch):
    """A pinned SDPA variant runs under sdpa_kernel([variant]): PyTorch can't fall back to another kernel."""
    q, k, v = make_qkv()
    runnable(name, q, k, v)
    with spy_sdpa(monkeypatch) as calls:
        attention(q, k, v, backend=name)
    variant = name.split(":")[1]
    assert calls and all(c["flags"] == {n: n == variant for n in c["flags"]} for c in calls)


def test_pinned_backend_never_falls_back():
    q, k, v = make_qkv()
    with pytest.raises(ValueError, match="sdpa:flash.*cannot run"):
        attention(q, k, v, dropout_p=0.1, backend="sdpa:flash")


def test_value_head_dim_differs():
    q, k, v = make_qkv(d=32, e=12, dtype=torch.float64)
    out = attention(q, k, v)
    assert out.shape == (2, 4, 16, 12)
    torch.testing.assert_close(out, einsum_attention(validate(q, k, v)))


def test_output_dtype_is_query_dtype():
    for dtype in FLOAT_DTYPES:
        q, k, v = make_qkv(dtype=dtype)
        assert attend.attention(q, k, v).dtype == dtype


@needs("sdpa_zero_dead_rows")  # the probe must find it where torch has it
@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_dead_row_probe_is_right_when_first_called_without_grad(context):
    """The once-per-process probe must not cache a wrong answer when its first caller disables grad."""
    from torch.nn.attention import SDPBackend

    from attend.backends import sdpa

    sdpa._PROBED.pop(("dead_rows", SDPBackend.FLASH_ATTENTION.name, "cpu"))
    try:
        with context():
            assert sdpa.zeroes_dead_rows(SDPBackend.FLASH_ATTENTION, "cpu") is True
    finally:
        sdpa.clear_probes()


def test_learned_bias_under_no_grad_runs_where_explain_says(recwarn):
    """A bias that is an nn.Parameter, at inference under torch.no_grad(): PyTorch's CPU flash kernel rejects
    any mask with requires_grad=True, so the bias must reach it detached. explain names sdpa:flash, auto runs
    it without a fallback warning, and pinned it runs too (before: "No available kernel")."""
    q, k, v = make_qkv(b=2, h=4, g=2, i=9, j=11, d=16)
    bias = torch.nn.Parameter(torch.randn(1, 4, 9, 11))
    with torch.no_grad():
        assert attend.explain(q, k, v, bias=bias).backend == "sdpa:flash"
        auto = attention(q, k, v, bias=bias)
        pinned = attention(q, k, v, bias=bias, backend="sdpa:flash")
        ref = attention(q, k, v, bias=bias, backend="einsum")
    assert not [w for w in recwarn if issubclass(w.category, attend.AttendFallbackWarning)]
    torch.testing.assert_close(auto, ref)
    torch.testing.assert_close(pinned, ref)
