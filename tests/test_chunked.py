"""The `chunked` backend beyond the shared grid: tile boundaries, causal skipping, gradcheck, dropout,
fully masked rows and tiles, garbage in padding, every dtype, and the memory bound itself.

Shape legend: b batch, h query heads, g key/value heads, i query positions, j key positions,
d head dim (q and k), e value head dim.

Small custom tiles force many tiles (and ragged last tiles) on small inputs, so every path runs fast.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from attend import attention
from attend.backends.chunked import ChunkedBackend, chunked_attention, dropout_keep_mask
from attend.backends.einsum import einsum_attention
from attend.inputs import validate
from attend.testing import assert_matches_reference

# helpers


def make(b=1, h=2, g=1, i=13, j=17, d=8, e=None, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    e = e or d
    q = torch.randn(b, h, i, d, generator=gen).to(dtype)
    k = torch.randn(b, g, j, d, generator=gen).to(dtype)
    v = torch.randn(b, g, j, e, generator=gen).to(dtype)
    return q, k, v


def run_with_grads(fn, q, k, v, dtype, *, bias=None, dout_seed=1, **kw):
    """fn's output and (dq, dk, dv[, dbias]) for inputs cast to `dtype`, under one fixed upstream gradient."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    b_ = None if bias is None else bias.detach().to(dtype).requires_grad_(bias.requires_grad)
    if b_ is not None and b_.requires_grad:
        leaves.append(b_)
    inp = validate(*leaves[:3], bias=b_, **kw)
    out = fn(inp)
    gen = torch.Generator().manual_seed(dout_seed)
    dout = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(dtype)
    grads = torch.autograd.grad(out, leaves, dout)
    return [out.detach(), *grads]


def check(q, k, v, *, q_tile, k_tile, bias=None, **kw):
    """Chunked (custom tiles) vs the float64 golden, within the budget the same-dtype einsum earns."""
    dtype = q.dtype
    golden = run_with_grads(einsum_attention, q, k, v, torch.float64, bias=bias, **kw)
    baseline = run_with_grads(einsum_attention, q, k, v, dtype, bias=bias, **kw)
    cand = run_with_grads(lambda inp: chunked_attention(inp, q_tile=q_tile, k_tile=k_tile), q, k, v, dtype, bias=bias, **kw)
    for name, c, gd, bl in zip(["out", "dq", "dk", "dv", "dbias"], cand, golden, baseline):
        assert torch.isfinite(c).all(), name
        assert_matches_reference(c, gd, bl, name=name)
    return cand


# tile boundaries and causal alignment


@pytest.mark.parametrize(
    "i, j, q_tile, k_tile",
    [
        (13, 17, 4, 5),  # neither length a multiple of either tile
        (1, 17, 4, 5),  # a single query (decoding)
        (13, 1, 4, 5),  # a single key
        (1, 1, 4, 5),
        (16, 16, 4, 4),  # exact multiples
        (29, 11, 8, 3),  # i > j: causal leaves the first 18 rows with no key
        (11, 29, 3, 8),  # i < j: KV-cache alignment
        (9, 9, 64, 64),  # one tile bigger than the input
    ],
)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_tile_boundaries(i, j, q_tile, k_tile, causal):
    q, k, v = make(i=i, j=j, h=4, g=2)
    check(q, k, v, q_tile=q_tile, k_tile=k_tile, causal=causal)


@pytest.mark.parametrize("mask_kind", ["padding", "bool", "bias-grad", "bias+padding"])
def test_masks_with_small_tiles(mask_kind):
    b, h, g, i, j = 2, 4, 2, 19, 23
    q, k, v = make(b=b, h=h, g=g, i=i, j=j, e=6)
    gen = torch.Generator().manual_seed(3)
    mask = bias = None
    if "padding" in mask_kind:
        mask = torch.ones(b, j, dtype=torch.bool)
        mask[1, 9:] = False
    if mask_kind == "bool":
        mask = torch.rand(b, 1, i, j, generator=gen) > 0.4
    if "bias" in mask_kind:
        bias = torch.randn(1, h, i, j, generator=gen).requires_grad_(mask_kind == "bias-grad")
    for causal in (False, True):
        check(q, k, v, q_tile=4, k_tile=5, mask=mask, bias=bias, causal=causal)


def test_causal_skips_tiles_above_the_diagonal():
    """Causal visits about half the tiles, and only the diagonal ones are masked."""
    from attend.backends.chunked import _Plan

    q, k, v = make(i=64, j=64)
    plan = _Plan(q, k, v, None, None, True, 1.0, 0.0, 0, 8, 8)
    tiles = [t for r0, r1 in plan.query_tiles() for t in plan.key_tiles(r0, r1)]
    assert len(tiles) == 8 * 9 // 2  # the lower triangle of an 8 x 8 grid of tiles, diagonal included
    assert sum(crosses for *_, crosses in tiles) == 8  # only the diagonal tiles build a causal mask
    full = _Plan(q, k, v, None, None, False, 1.0, 0.0, 0, 8, 8)
    assert sum(1 for r0, r1 in full.query_tiles() for _ in full.key_tiles(r0, r1)) == 64


def test_gqa_does_not_copy_kv():
    """h/g = 4, multi-query: grads for k, v are summed over the r query heads that share them."""
    for g in (2, 1):
        q, k, v = make(h=8, g=g, i=10, j=12)
        check(q, k, v, q_tile=3, k_tile=4, causal=True)


def test_custom_scale_and_value_dim():
    q, k, v = make(h=2, g=2, i=9, j=14, d=8, e=20)
    check(q, k, v, q_tile=4, k_tile=5, scale=0.37)


# gradcheck


def test_gradcheck_float64():
    q, k, v = (t.double().requires_grad_() for t in make(b=2, h=4, g=2, i=6, j=7, d=3, e=2))
    gen = torch.Generator().manual_seed(5)
    bias = torch.randn(2, 1, 6, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[0, 2:4] = False  # a fully masked key tile in the middle of every row of batch 0

    def fn(q, k, v, bias):
        inp = validate(q, k, v, mask=mask, bias=bias, causal=True)
        return chunked_attention(inp, q_tile=2, k_tile=2)

    assert torch.autograd.gradcheck(fn, (q, k, v, bias), eps=1e-6, atol=1e-6)


def test_gradcheck_float64_dropout():
    """With the seed fixed, dropout is a fixed function of the inputs: gradcheck sees the backward
    regenerate exactly the forward's keep-mask."""
    q, k, v = (t.double().requires_grad_() for t in make(h=2, g=1, i=5, j=6, d=3))

    def fn(q, k, v):
        inp = validate(q, k, v, causal=True, dropout_p=0.3)
        return chunked_attention(inp, q_tile=2, k_tile=4, seed=1234)

    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-6)


# dropout


def _masked_reference(inp, keep):
    """Float64 einsum attention with a given dense (b, h, i, j) dropout keep-mask."""
    q, k, v = (t.double() for t in (inp.q, inp.k, inp.v))
    r = inp.h // inp.g
    k, v = k.repeat_interleave(r, dim=1), v.repeat_interleave(r, dim=1)
    sim = torch.einsum("b h i d, b h j d -> b h i j", q, k) * inp.scale
    sim = sim.masked_fill(~torch.ones(inp.i, inp.j, dtype=torch.bool).tril(inp.j - inp.i), float("-inf"))
    attn = torch.nan_to_num(sim.softmax(dim=-1)) * keep / (1 - inp.dropout_p)
    return torch.einsum("b h i j, b h j e -> b h i e", attn, v)


def test_dropout_matches_reference_with_the_same_keep_mask():
    """Forward and backward use the keep-mask `dropout_keep_mask` reports, tile for tile."""
    q, k, v = (t.requires_grad_() for t in make(b=2, h=4, g=2, i=11, j=13, dtype=torch.float64))
    inp = validate(q, k, v, causal=True, dropout_p=0.25)
    out = chunked_attention(inp, q_tile=4, k_tile=5, seed=99)
    keep = dropout_keep_mask(inp, 99, q_tile=4, k_tile=5)
    ref = _masked_reference(inp, keep)
    torch.testing.assert_close(out, ref)
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), dout)
    want = torch.autograd.grad(ref, (q, k, v), dout)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_dropout_statistics():
    """Keep rate is 1 - p, and with v = 1 each output is an unbiased estimate of 1."""
    p = 0.3
    q, k, _ = make(b=2, h=4, i=64, j=96)
    v = torch.ones(2, 1, 96, 5)
    inp = validate(q, k, v, dropout_p=p)
    keep = dropout_keep_mask(inp, 7, q_tile=16, k_tile=32)
    n = keep.numel()
    assert abs(keep.float().mean().item() - (1 - p)) < 4 * (p * (1 - p) / n) ** 0.5
    out = chunked_attention(inp, q_tile=16, k_tile=32, seed=7)
    assert abs(out.mean().item() - 1.0) < 0.01
    # neighbouring tiles draw different masks
    assert not torch.equal(keep[..., :16, :32], keep[..., 16:32, :32])


def test_dropout_reproducible_and_only_when_asked():
    q, k, v = make(i=20, j=20)
    inp = validate(q, k, v, dropout_p=0.2)
    torch.manual_seed(0)
    a = chunked_attention(inp, q_tile=8, k_tile=8)
    torch.manual_seed(0)
    b = chunked_attention(inp, q_tile=8, k_tile=8)
    c = chunked_attention(inp, q_tile=8, k_tile=8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    plain = validate(q, k, v)
    torch.testing.assert_close(chunked_attention(plain, q_tile=8, k_tile=8), einsum_attention(plain))
    # through the public API, with the module in training mode
    assert attention(q, k, v, dropout_p=0.2, backend="chunked").shape == (1, 2, 20, 8)


# contract items 2 and 3


def test_fully_masked_rows_and_tiles_give_zero_and_finite_grads():
    b, h, i, j = 2, 2, 12, 15
    q, k, v = make(b=b, h=h, i=i, j=j)
    mask = torch.ones(b, 1, i, j, dtype=torch.bool)
    mask[:, :, 3] = False  # a fully masked row
    mask[:, :, :, 5:10] = False  # key tile [5, 10) masked for every row: a dead tile in the middle
    bias = torch.zeros(1, 1, i, j)
    bias[..., 7, :] = float("-inf")  # a row killed by the bias
    out, dq, dk, dv = check(q, k, v, q_tile=4, k_tile=5, mask=mask, bias=bias)
    assert (out[:, :, 3] == 0).all() and (out[:, :, 7] == 0).all()
    assert (dq[:, :, 3] == 0).all() and (dq[:, :, 7] == 0).all()
    assert (dk[:, :, 5:10] == 0).all() and (dv[:, :, 5:10] == 0).all()
    # causal with i > j: the first i - j rows see nothing
    q, k, v = make(i=9, j=4)
    out, dq, *_ = check(q, k, v, q_tile=2, k_tile=3, causal=True)
    assert (out[:, :, :5] == 0).all() and (dq[:, :, :5] == 0).all()


@pytest.mark.parametrize("garbage", [1e4, 1e30])
def test_garbage_in_padding_never_leaks(garbage):
    b, j = 2, 20
    q, k, v = make(b=b, h=4, g=2, i=9, j=j)
    pad = torch.ones(b, j, dtype=torch.bool)
    pad[:, 5:10] = False  # a padded tile in the middle of the row
    pad[1, 14:] = False
    k2, v2 = k.clone(), v.clone()
    k2[~pad[:, None, :, None].expand_as(k2)] = garbage
    v2[~pad[:, None, :, None].expand_as(v2)] = -garbage
    clean = run_with_grads(lambda inp: chunked_attention(inp, q_tile=4, k_tile=5), q, k, v, torch.float32, mask=pad, causal=True)
    dirty = run_with_grads(lambda inp: chunked_attention(inp, q_tile=4, k_tile=5), q, k2, v2, torch.float32, mask=pad, causal=True)
    for name, a, c in zip(["out", "dq", "dk", "dv"], clean, dirty):
        assert torch.isfinite(c).all(), name
        keys = pad[:, None, :, None]
        if name in ("dk", "dv"):  # gradients at the padded keys are 0 in both; elsewhere identical
            torch.testing.assert_close(c * keys, a * keys)
            assert (c * ~keys == 0).all()
        else:
            torch.testing.assert_close(c, a)


# dtypes


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_every_dtype(dtype):
    q, k, v = make(b=2, h=4, g=2, i=21, j=18, d=16, dtype=dtype)
    pad = torch.ones(2, 18, dtype=torch.bool)
    pad[0, 11:] = False
    out = check(q, k, v, q_tile=8, k_tile=8, mask=pad, causal=True)[0]
    assert out.dtype == dtype


# the memory bound


class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an aten op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_no_ij_tensor_is_ever_allocated(dropout_p):
    """Forward and backward with every feature on: nothing bigger than a tile or the inputs is created."""
    b, h, g, i, j, d = 1, 4, 2, 256, 320, 8
    q, k, v = (t.requires_grad_() for t in make(b=b, h=h, g=g, i=i, j=j, d=d))
    pad = torch.ones(b, j, dtype=torch.bool)
    pad[:, 300:] = False
    bias = torch.randn(1, h, 1, j, requires_grad=True)  # per-key bias: its own size is (h, j), not (i, j)
    tile = b * h * 32 * 64
    with _LargestTensor() as probe:
        inp = validate(q, k, v, mask=pad, bias=bias, causal=True, dropout_p=dropout_p)
        out = chunked_attention(inp, q_tile=32, k_tile=64)
        out.sum().backward()
    inputs = max(q.numel(), k.numel(), v.numel())
    assert probe.largest <= max(tile, inputs), (probe.largest, tile, inputs)
    assert probe.largest < b * h * i * j // 16
    assert torch.isfinite(bias.grad).all()


def test_instance_tiles_and_name():
    tuned = ChunkedBackend(q_tile=3, k_tile=4, name="chunked:3x4")
    assert tuned.name == "chunked:3x4" and ChunkedBackend().name == "chunked"
    q, k, v = make(i=7, j=9)
    torch.testing.assert_close(tuned.run(validate(q, k, v, causal=True)), einsum_attention(validate(q, k, v, causal=True)))
    with pytest.raises(ValueError, match="expected `q_tile` to be a positive int"):
        ChunkedBackend(q_tile=0)
