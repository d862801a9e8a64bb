"""`Attend` under `torch.autocast('cpu', dtype=torch.bfloat16)`: q, k, v (and a float bias) are cast to
the autocast dtype, as PyTorch casts them for `F.scaled_dot_product_attention`; the fused kernel runs in
bfloat16 with float32 softmax statistics; inside, the backend runs with autocast off."""

from __future__ import annotations

import pytest
import torch

from attend import Attend, attention, explain
from attend.backends.einsum import einsum_attention
from attend.inputs import validate
from attend.testing import assert_matches_reference, tolerance

from .helpers import needs, skip_unless_runs

BF16 = torch.bfloat16


def _qkv(i=33, j=65, dtype=torch.float32, grad=False):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, i, 32, generator=gen, dtype=dtype).requires_grad_(grad)
    k = torch.randn(2, 2, j, 32, generator=gen, dtype=dtype).requires_grad_(grad)
    v = torch.randn(2, 2, j, 32, generator=gen, dtype=dtype).requires_grad_(grad)
    return q, k, v


@needs("sdpa_cpu_half_exact")
def test_fused_path_runs_in_bf16():
    q, k, v = _qkv()
    pad = torch.ones(2, 65, dtype=torch.bool)
    pad[1, 40:] = False
    attn = Attend(causal=True)
    with torch.autocast("cpu", dtype=BF16):
        out = attn(q, k, v, mask=pad)
        report = attn.explain(q, k, v, mask=pad)
    assert out.dtype == BF16
    assert report.backend == "sdpa:flash"  # the fused CPU kernel, not a math fallback
    assert "dtype=bfloat16" in report.inputs
    # exactly what the same kernel gives on bf16 inputs without autocast: the cast is all autocast changes
    torch.testing.assert_close(out, attn(q.to(BF16), k.to(BF16), v.to(BF16), mask=pad), atol=0, rtol=0)


@pytest.mark.parametrize("backend", ["sdpa:flash", "einsum"])
def test_matches_float64_reference_within_bf16_budget(backend):
    """Float32 statistics: the result is as close to the float64 golden as the bf16 reference itself."""
    q, k, v = _qkv(i=7, j=1025)
    skip_unless_runs(backend, validate(*(t.to(BF16) for t in (q, k, v)), causal=True))
    with torch.autocast("cpu", dtype=BF16):
        out = attention(q, k, v, causal=True, backend=backend)
    assert out.dtype == BF16
    bf = [t.to(BF16) for t in (q, k, v)]
    golden = einsum_attention(validate(*(t.double() for t in bf), causal=True))
    baseline = einsum_attention(validate(*bf, causal=True))  # softmax in float32 by contract
    assert_matches_reference(out, golden, baseline)


def test_long_uniform_row_needs_float32_statistics():
    """4096 equal logits: a bfloat16 running sum stalls at 256, so the weights would be 16x too large.
    With float32 statistics every weight is 1/4096 and the output is the mean of v (here exactly 1)."""
    q = torch.zeros(1, 1, 2, 16)
    k = torch.zeros(1, 1, 4096, 16)
    v = torch.ones(1, 1, 4096, 16)
    with torch.autocast("cpu", dtype=BF16):
        out = Attend()(q, k, v)
    assert out.dtype == BF16
    # exactly 1 in float32 statistics: the only error left is bfloat16 rounding, an absolute one
    torch.testing.assert_close(out.float(), torch.ones(1, 1, 2, 16), atol=tolerance(BF16)["atol"], rtol=0)


@needs("sdpa_cpu_half_exact")  # (the check of which kernel ran; the cast itself holds everywhere)
def test_mixed_input_dtypes_meet_in_the_autocast_dtype():
    """A float32 q (after a LayerNorm, say) with bfloat16 k, v: autocast casts all three, as PyTorch does
    for SDPA. Outside autocast the same call is a TypeError with a hint."""
    q, k, v = _qkv()
    k, v = k.to(BF16), v.to(BF16)
    bias = torch.randn(1, 4, 33, 65)  # float32 bias: cast too
    with torch.autocast("cpu", dtype=BF16):
        out = Attend()(q, k, v, bias=bias)
        assert explain(q, k, v, bias=bias).backend == "sdpa:flash"
    assert out.dtype == BF16
    torch.testing.assert_close(out, Attend()(q.to(BF16), k, v, bias=bias.to(BF16)), atol=0, rtol=0)
    with pytest.raises(TypeError, match="torch.autocast"):
        Attend()(q, k, v)


def test_float64_is_left_alone():
    """PyTorch's autocast never casts float64 inputs of a lower-precision op; neither do we."""
    q, k, v = _qkv(dtype=torch.float64)
    with torch.autocast("cpu", dtype=BF16):
        out = Attend()(q, k, v)
    assert out.dtype == torch.float64


def test_gradients_flow_back_in_the_leaf_dtype():
    q, k, v = _qkv(grad=True)
    with torch.autocast("cpu", dtype=BF16):
        out = Attend(causal=True)(q, k, v)
    out.float().sum().backward()
    for t in (q, k, v):
        assert t.grad is not None and t.grad.dtype == torch.float32 and torch.isfinite(t.grad).all()


def test_autocast_for_another_device_changes_nothing():
    q, k, v = _qkv()
    with torch.autocast("cuda", dtype=torch.float16, enabled=torch.cuda.is_available()):
        out = Attend()(q, k, v)
    assert out.dtype == torch.float32


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_cuda_autocast_runs_a_fused_kernel(dtype):
    q, k, v = (t.cuda() for t in _qkv())
    with torch.autocast("cuda", dtype=dtype):
        out = Attend(causal=True)(q, k, v)
        report = explain(q, k, v, causal=True)
    assert out.dtype == dtype
    assert report.backend is not None and report.backend.startswith("sdpa:") and report.backend != "sdpa:math"
