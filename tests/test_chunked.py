"""The `chunked` backend beyond the shared grid: tile boundaries, causal skipping, gradcheck, dropout,
fully masked rows and tiles, garbage in padding and behind a -inf bias, torch.func transforms (vmap, grad,
vjp, jacrev, grad of grad), every dtype, and the memory bound itself. torch.compile: test_chunked_compile.py.

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
from attend.testing import DTYPES, assert_matches_reference, tolerance

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
    cand = run_with_grads(
        lambda inp: chunked_attention(inp, q_tile=q_tile, k_tile=k_tile), q, k, v, dtype, bias=bias, **kw
    )
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
    from attend.tiles import Plan

    q, k, v = make(i=64, j=64)
    plan = Plan(q, k, v, None, None, True, 1.0, 0.0, 0, 8, 8)
    tiles = [t for r0, r1 in plan.query_tiles() for t in plan.key_tiles(r0, r1)]
    assert len(tiles) == 8 * 9 // 2  # the lower triangle of an 8 x 8 grid of tiles, diagonal included
    assert sum(crosses for *_, crosses in tiles) == 8  # only the diagonal tiles build a causal mask
    full = Plan(q, k, v, None, None, False, 1.0, 0.0, 0, 8, 8)
    assert sum(1 for r0, r1 in full.query_tiles() for _ in full.key_tiles(r0, r1)) == 64


@pytest.mark.parametrize("k_tile", [4, 5, 16, 64])
def test_padding_tile_facts(k_tile):
    """Per key tile, read once per call: all keys visible (no mask applied) / no key visible in any batch
    element (tile skipped), the one-tile fast path and the general one alike; a bias's -inf is looked for."""
    from attend.tiles import read_facts

    pad = torch.ones(3, 16, dtype=torch.bool)
    pad[:, 4:8] = False  # every batch element: keys 4-7 are padding
    pad[1, 13:] = False
    mask4 = pad[:, None, None, :]
    facts = read_facts(mask4, None, 16, k_tile)
    tiles = [slice(c0, min(c0 + k_tile, 16)) for c0 in range(0, 16, k_tile)]
    assert facts.pad_all == tuple(bool(pad[:, t].all()) for t in tiles)
    assert facts.pad_none == tuple(not bool(pad[:, t].any()) for t in tiles)
    assert not facts.bias_inf
    bias = torch.zeros(1, 1, 1, 16)
    assert not read_facts(None, bias, 16, k_tile).bias_inf
    bias[..., 3] = float("-inf")
    assert read_facts(None, bias, 16, k_tile).bias_inf
    assert read_facts(None, None, 16, k_tile)[:3] == (None, None, False)


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

    assert torch.autograd.gradcheck(fn, (q, k, v, bias), eps=1e-6, **tolerance(torch.float64, "gradcheck"))


def test_gradcheck_float64_dropout():
    """With the seed fixed, dropout is a fixed function of the inputs: gradcheck sees the backward
    regenerate exactly the forward's keep-mask."""
    q, k, v = (t.double().requires_grad_() for t in make(h=2, g=1, i=5, j=6, d=3))

    def fn(q, k, v):
        inp = validate(q, k, v, causal=True, dropout_p=0.3)
        return chunked_attention(inp, q_tile=2, k_tile=4, seed=1234)

    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, **tolerance(torch.float64, "gradcheck"))


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
    """Forward and backward use the keep-mask `dropout_keep_mask` reports."""
    q, k, v = (t.requires_grad_() for t in make(b=2, h=4, g=2, i=11, j=13, dtype=torch.float64))
    inp = validate(q, k, v, causal=True, dropout_p=0.25)
    out = chunked_attention(inp, q_tile=4, k_tile=5, seed=99)
    keep = dropout_keep_mask(inp, 99)
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
    keep = dropout_keep_mask(inp, 7)
    n = keep.numel()
    assert abs(keep.float().mean().item() - (1 - p)) < 4 * (p * (1 - p) / n) ** 0.5
    out = chunked_attention(inp, q_tile=16, k_tile=32, seed=7)
    assert abs(out.mean().item() - 1.0) < 0.01
    # neighbouring tiles draw different masks
    assert not torch.equal(keep[..., :16, :32], keep[..., 16:32, :32])
    assert not torch.equal(keep[..., :16, :32], keep[..., :16, 32:64])


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


@pytest.mark.parametrize("seed", [0, 1234, 2**31 - 1, 2**31, 2**32 - 1, -5, 2**40 + 7])
def test_seed_as_a_tensor_gives_the_same_keep_mask(seed):
    """Under torch.compile the drawn seed stays an int32 tensor (no host read): the row keys computed from it
    must equal the ones a Python-int seed gives (eager, and the backward regenerates them), bit for bit. Only
    seed mod 2**32 counts."""
    from attend.tiles import dropout_col_terms, dropout_keep, dropout_row_keys

    as_tensor = torch.tensor(seed % 2**32, dtype=torch.int64).to(torch.int32)  # two's complement bits
    cols = dropout_col_terms(torch.arange(300, 324))
    for b0, rows in [(0, torch.arange(40)), (3, torch.arange(256, 296)), (1, torch.arange(7, 87, 2))]:
        eager = dropout_keep(dropout_row_keys(seed, b0, b0 + 2, 3, rows)[..., None], cols, 0.3)
        traced = dropout_keep(dropout_row_keys(as_tensor, b0, b0 + 2, 3, rows)[..., None], cols, 0.3)
        assert torch.equal(eager, traced)
        assert torch.equal(eager, dropout_keep(dropout_row_keys(seed + 2**32, b0, b0 + 2, 3, rows)[..., None], cols, 0.3))


def test_dropout_keep_mask_does_not_depend_on_the_tiles():
    """The same seed drops the same entries with any tile sizes (and batch slices), forward and backward."""
    q, k, v = (t.requires_grad_() for t in make(b=3, h=4, g=2, i=37, j=45, dtype=torch.float64))
    inp = validate(q, k, v, causal=True, dropout_p=0.3)
    runs = [chunked_attention(inp, q_tile=qt, k_tile=kt, seed=5) for qt, kt in [(4, 5), (16, 32), (37, 45), (1, 7)]]
    dout = torch.randn_like(runs[0])
    grads = [torch.autograd.grad(out, (q, k, v), dout) for out in runs]
    for out, grad in zip(runs[1:], grads[1:]):
        torch.testing.assert_close(out, runs[0])
        for a, b in zip(grad, grads[0]):
            torch.testing.assert_close(a, b)


def test_dropout_positions_place_rows_in_the_whole_mask():
    """`positions` gives query rows their place in the keep-mask: a call on some rows of q, with those rows'
    positions, drops what the whole call drops on them (what context parallel attention relies on)."""
    q, k, v = make(b=2, h=4, g=2, i=30, j=30, dtype=torch.float64)
    whole = validate(q, k, v, dropout_p=0.4)
    keep = dropout_keep_mask(whole, 11)
    rows = torch.tensor([3, 4, 5, 17, 29])
    part = validate(q[:, :, rows], k, v, dropout_p=0.4)
    assert torch.equal(dropout_keep_mask(part, 11, positions=rows), keep[:, :, rows])
    out = chunked_attention(whole, seed=11, q_tile=8, k_tile=8)
    got = chunked_attention(part, seed=11, positions=rows, q_tile=2, k_tile=16)
    torch.testing.assert_close(got, out[:, :, rows])
    # second order: the recomputing backward (create_graph) rebuilds the same keep-mask, positions included
    qr = q[:, :, rows].clone().requires_grad_()
    leaves = (qr, k.clone().requires_grad_(), v.clone().requires_grad_())
    out = chunked_attention(validate(*leaves, dropout_p=0.4), seed=11, positions=rows)
    dout = torch.randn_like(out)
    first = torch.autograd.grad(out, leaves, dout, retain_graph=True)
    for a, b in zip(torch.autograd.grad(out, leaves, dout, create_graph=True), first):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match=r"expected `positions` to be an integer tensor of shape \(i,\) = \(5,\)"):
        chunked_attention(part, seed=11, positions=torch.arange(4))


def test_dropout_keep_mask_rows_heads_batches_are_independent():
    """No two rows, heads or batch elements share a keep-mask: neighbours agree on about (1-p)^2 + p^2 of
    their entries, as independent draws do, and the keep rate is 1 - p in every (batch, head)."""
    p = 0.5
    q, k, v = make(b=4, h=8, i=64, j=512)
    keep = dropout_keep_mask(validate(q, k, v, dropout_p=p), 2024).float()  # (4, 8, 64, 512)
    agree = (1 - p) ** 2 + p**2
    for a, b in [(keep[:, :, 1:], keep[:, :, :-1]), (keep[:, 1:], keep[:, :-1]), (keep[1:], keep[:-1]),
                 (keep[..., 1:], keep[..., :-1])]:  # fmt: skip
        rate = (a == b).float().mean().item()
        assert abs(rate - agree) < 4 * (agree * (1 - agree) / a.numel()) ** 0.5, rate
    per_head = keep.mean(dim=(2, 3))
    assert (per_head - (1 - p)).abs().max() < 5 * (p * (1 - p) / (64 * 512)) ** 0.5


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
    clean = run_with_grads(
        lambda inp: chunked_attention(inp, q_tile=4, k_tile=5), q, k, v, torch.float32, mask=pad, causal=True
    )
    dirty = run_with_grads(
        lambda inp: chunked_attention(inp, q_tile=4, k_tile=5), q, k2, v2, torch.float32, mask=pad, causal=True
    )
    for name, a, c in zip(["out", "dq", "dk", "dv"], clean, dirty):
        assert torch.isfinite(c).all(), name
        keys = pad[:, None, :, None]
        if name in ("dk", "dv"):  # gradients at the padded keys are 0 in both; elsewhere identical
            torch.testing.assert_close(c * keys, a * keys)
            assert (c * ~keys == 0).all()
        else:
            torch.testing.assert_close(c, a)


@pytest.mark.parametrize("check_finite", [True, False])
def test_neg_inf_bias_masks_like_the_reference(check_finite):
    """A -inf bias entry is a mask (masked_fill, as in the einsum reference), not an add: a key whose logit
    overflows to inf (3e38 in k) behind it never gives inf + -inf = NaN, forward or backward."""
    q = torch.ones(1, 1, 2, 8)
    k, v = torch.randn(1, 1, 3, 8), torch.randn(1, 1, 3, 8)
    bias = torch.tensor([0.0, 0.0, float("-inf")])
    results = []
    for garbage in (0.0, 3e38):
        k_ = k.clone()
        k_[:, :, 2] = garbage
        leaves = [t.clone().requires_grad_() for t in (q, k_, v, bias)]
        out = attention(*leaves[:3], bias=leaves[3], backend="chunked", check_finite=check_finite)
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)))
        results.append([out.detach()] + [t.grad for t in leaves])
    clean, dirty = results
    for name, a, c in zip(["out", "dq", "dk", "dv", "dbias"], clean, dirty):
        assert torch.isfinite(c).all(), name
        torch.testing.assert_close(c, a, msg=name)
    assert (dirty[2][:, :, 2] == 0).all() and dirty[4][2] == 0  # nothing flows to or from the masked key


def test_neg_inf_bias_with_garbage_keys_and_values_in_small_tiles():
    """-inf bias entries scattered over many tiles (some tiles without any), with 1e30 in k and v behind
    them: same outputs and gradients as with zeros there, all finite, and equal to the reference."""
    q, k, v = make(b=2, h=4, g=2, i=11, j=14)
    gen = torch.Generator().manual_seed(4)
    bias = torch.randn(2, 4, 11, 14, generator=gen)
    dead = torch.zeros(2, 14, dtype=torch.bool)
    dead[0, [2, 9]] = True
    dead[1, 12] = True
    bias.masked_fill_(dead[:, None, None, :], float("-inf"))  # whole key columns ruled out by the bias
    bias[0, 1, 3, 5] = float("-inf")  # and a single entry
    k2, v2 = k.clone(), v.clone()
    k2[dead[:, None, :, None].expand_as(k2)] = 1e30
    v2[dead[:, None, :, None].expand_as(v2)] = -1e30
    fn = lambda inp: chunked_attention(inp, q_tile=4, k_tile=5)  # noqa: E731
    clean = run_with_grads(fn, q, k, v, torch.float32, bias=bias.requires_grad_(), causal=True)
    dirty = run_with_grads(fn, q, k2, v2, torch.float32, bias=bias, causal=True)
    keys = ~dead[:, None, :, None]
    for name, a, c in zip(["out", "dq", "dk", "dv", "dbias"], clean, dirty):
        assert torch.isfinite(c).all(), name
        if name in ("dk", "dv"):
            torch.testing.assert_close(c * keys, a * keys)
            assert (c * ~keys == 0).all()
        else:
            torch.testing.assert_close(c, a)
    check(q, k, v, q_tile=4, k_tile=5, bias=bias, causal=True)  # the clean case against the reference


# dtypes


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_dtype(dtype):
    q, k, v = make(b=2, h=4, g=2, i=21, j=18, d=16, dtype=dtype)
    pad = torch.ones(2, 18, dtype=torch.bool)
    pad[0, 11:] = False
    out = check(q, k, v, q_tile=8, k_tile=8, mask=pad, causal=True)[0]
    assert out.dtype == dtype


# torch.func transforms


def _vmap_inputs(n=3, b=2, h=4, g=2, i=6, j=9, d=8, dtype=torch.float64):
    gen = torch.Generator().manual_seed(11)
    q = torch.randn(n, b, h, i, d, generator=gen, dtype=dtype)
    k = torch.randn(n, b, g, j, d, generator=gen, dtype=dtype)
    v = torch.randn(n, b, g, j, d, generator=gen, dtype=dtype)
    pad = torch.ones(n, b, j, dtype=torch.bool)
    pad[1, 0, 5:] = False
    pad[2, 1, :3] = False
    bias = torch.randn(n, 1, h, i, j, generator=gen, dtype=dtype)
    return q, k, v, pad, bias


@pytest.mark.parametrize(
    "in_dims",
    [
        (0, 0, 0, 0, 0),
        (0, None, None, None, None),
        (None, 0, 0, None, 0),
        (0, 0, 0, None, None),
        (None, None, None, 0, None),
        (None, None, None, None, 0),
    ],
    ids=["all", "q-only", "kv-and-bias", "mask-and-bias-unbatched", "mask-only", "bias-only"],
)
@pytest.mark.parametrize("with_mask_bias", [True, False], ids=["mask+bias", "plain"])
def test_vmap_matches_a_loop(in_dims, with_mask_bias):
    if not with_mask_bias and in_dims[:3] == (None, None, None):
        pytest.skip("nothing vmapped that the call uses")
    """torch.func.vmap over a leading dim (grouped-query heads, causal, key padding, bias; each input batched
    or not, mask and bias possibly absent) equals a Python loop over that dim: straight into the backend,
    and through `attention` where q is batched (q unbatched: see test_vmap_attention_with_q_unbatched)."""
    q, k, v, pad, bias = _vmap_inputs()

    def direct(q, k, v, pad, bias):
        if not with_mask_bias:
            pad = bias = None
        return chunked_attention(validate(q, k, v, mask=pad, bias=bias, causal=True), q_tile=4, k_tile=5)

    def public(q, k, v, pad, bias):
        if not with_mask_bias:
            pad = bias = None
        return attention(q, k, v, mask=pad, bias=bias, causal=True, backend="chunked")

    args = [a if dim is not None else a[0] for a, dim in zip((q, k, v, pad, bias), in_dims)]
    for fn in (direct, public) if in_dims[0] is not None else (direct,):
        out = torch.func.vmap(fn, in_dims=in_dims)(*args)
        loop = torch.stack([fn(*(a if dim is None else a[n] for a, dim in zip(args, in_dims))) for n in range(3)])
        torch.testing.assert_close(out, loop)


@pytest.mark.parametrize("vmapped", ["kv", "mask", "bias"])
def test_vmap_attention_with_q_unbatched(vmapped):
    """attention() vmapped over k/v, the mask or the bias alone: the NaN/inf check (which reads values)
    finds the vmapped tensor among all of them and steps aside, as under compile."""
    q, k, v, pad, bias = _vmap_inputs()
    names = {"kv": ("k", "v"), "mask": ("mask",), "bias": ("bias",)}[vmapped]
    args = [{"k": k, "v": v, "mask": pad, "bias": bias}[name] for name in names]

    def fn(*args):
        parts = {"k": k[0], "v": v[0], "mask": None, "bias": None, **dict(zip(names, args))}
        return attention(q[0], parts["k"], parts["v"], mask=parts["mask"], bias=parts["bias"], backend="chunked")

    out = torch.func.vmap(fn)(*args)
    torch.testing.assert_close(out, torch.stack([fn(*(a[n] for a in args)) for n in range(3)]))


def test_func_grad_vjp_and_jacrev_match_autograd():
    """torch.func.grad (every input, bias included), vjp and jacrev give autograd's gradients."""
    q, k, v, pad, bias = (t[0] for t in _vmap_inputs())

    def loss(q, k, v, bias):
        return attention(q, k, v, mask=pad, bias=bias, causal=True, backend="chunked").square().sum()

    got = torch.func.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, bias)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, bias)]
    want = torch.autograd.grad(loss(*leaves), leaves)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)

    def fn(q):
        return attention(q, k, v, mask=pad, bias=bias, causal=True, backend="chunked")

    out, vjp_fn = torch.func.vjp(fn, q)
    dout = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(2))
    leaf = q.clone().requires_grad_()
    torch.testing.assert_close(vjp_fn(dout)[0], torch.autograd.grad(fn(leaf), leaf, dout)[0])
    small = q[:1, :2, :3]  # jacrev: one vjp per output element, kept small
    jac = torch.func.jacrev(lambda q: attention(q, k[:1, :1], v[:1, :1], backend="chunked"))(small)
    ref = torch.autograd.functional.jacobian(lambda q: attention(q, k[:1, :1], v[:1, :1], backend="chunked"), small)
    torch.testing.assert_close(jac, ref)


def test_func_grad_of_grad_and_vmap_of_grad():
    """Second order through torch.func (the backward is recorded, so it runs the differentiable recompute)
    and vmap composed with grad."""
    q, k, v, pad, bias = _vmap_inputs()

    def loss(q, k, v):
        return attention(q, k, v, bias=bias[0], causal=True, backend="chunked").square().sum()

    gg = torch.func.grad(lambda q: torch.func.grad(loss)(q, k[0], v[0]).sum())(q[0])
    leaf = q[0].clone().requires_grad_()
    (g1,) = torch.autograd.grad(loss(leaf, k[0], v[0]), leaf, create_graph=True)
    (g2,) = torch.autograd.grad(g1.sum(), leaf)
    torch.testing.assert_close(gg, g2)
    per_example = torch.func.vmap(torch.func.grad(loss))(q, k, v)
    loop = torch.stack([torch.func.grad(loss)(q[n], k[n], v[n]) for n in range(3)])
    torch.testing.assert_close(per_example, loop)


def test_vmap_with_dropout_follows_the_randomness_flag():
    """randomness="same": every vmapped element gets the unvmapped call's mask (same generator state);
    "different": each its own; "error" (vmap's default): dropout raises, as any random op does."""
    q, k, v, _, _ = _vmap_inputs(dtype=torch.float32)
    q = q[:1].expand(3, -1, -1, -1, -1)  # identical elements: only the masks can tell them apart

    def fn(q):
        return attention(q, k[0], v[0], dropout_p=0.4, backend="chunked")

    torch.manual_seed(3)
    same = torch.func.vmap(fn, randomness="same")(q)
    torch.manual_seed(3)
    single = fn(q[0])
    for n in range(3):
        torch.testing.assert_close(same[n], single)
    different = torch.func.vmap(fn, randomness="different")(q)
    assert torch.isfinite(different).all() and not torch.equal(different[0], different[1])
    with pytest.raises(RuntimeError, match="randomness"):
        torch.func.vmap(fn)(q)


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
    torch.testing.assert_close(
        tuned.run(validate(q, k, v, causal=True)), einsum_attention(validate(q, k, v, causal=True))
    )
    with pytest.raises(ValueError, match="expected `q_tile` to be a positive int"):
        ChunkedBackend(q_tile=0)


@pytest.mark.parametrize("kw", [{}, {"causal": True, "dropout_p": 0.3}, {"bias": True}, {"window": (40, 5)}],
                         ids=["plain", "causal+dropout", "bias", "window"])  # fmt: skip
def test_split_tile_loop_equals_the_single_thread_loop(kw, monkeypatch):
    """The tile loop split across threads (`tiles._each`) gives the single-thread loop's out and gradients
    (dq, dk, dv, dbias: the backward's per-thread accumulators summed), with dropout's keep-mask the same."""
    from attend import _helpers, tiles
    from attend._helpers import per_thread_counts

    if torch.get_num_threads() < 2 or not per_thread_counts():
        pytest.skip(f"no split here: {torch.get_num_threads()} intra-op thread(s), per-thread counts "
                    f"{per_thread_counts()}")  # fmt: skip
    monkeypatch.setattr(_helpers, "cpu_contended", lambda: True)  # the split runs only on a busy CPU,
    monkeypatch.setattr(_helpers, "SPLIT_MIN_WORK", 0)  # and for calls larger than this one
    kw = dict(kw)
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 300, 16, dtype=torch.float64, requires_grad=True) for _ in range(3))
    bias = torch.randn(1, 4, 300, 300, dtype=torch.float64, requires_grad=True) if kw.pop("bias", False) else None
    leaves = [t for t in (q, k, v, bias) if t is not None]

    def run(split: bool):
        monkeypatch.setattr(tiles, "_SPLIT_MIN_UNITS", 2 if split else 10**9)
        torch.manual_seed(1)
        out = attention(q, k, v, bias=bias, backend="chunked", **kw)
        return out, torch.autograd.grad(out, leaves, torch.ones_like(out))

    seen = []  # the threads of every tile loop run: the forward's, then the backward's
    real = tiles.run_split
    monkeypatch.setattr(tiles, "run_split", lambda units, fn, ways, into=None: seen.append(ways)
                        or real(units, fn, ways, into))  # fmt: skip
    split_out, split_grads = run(True)
    assert seen == [2, 2], f"the forward's and the backward's loops were not both split: {seen}"
    one_out, one_grads = run(False)
    torch.testing.assert_close(split_out, one_out, atol=1e-12, rtol=1e-12)
    for a, b in zip(split_grads, one_grads):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_no_split_on_a_quiet_cpu_or_for_a_deterministic_call(monkeypatch, tmp_path):
    """The split engages only while the CPU is contended (PSI's stall share over 30 %: since the previous read when
    that was at most 2 s ago, else its 10-second average; without PSI the load average), and never for
    deterministic=True or torch.use_deterministic_algorithms (bit-for-bit repeatable sums)."""
    from attend import _helpers

    if torch.get_num_threads() < 2 or not _helpers.per_thread_counts():
        pytest.skip(f"no split here: {torch.get_num_threads()} intra-op thread(s)")
    x = torch.zeros(1)
    pressure = tmp_path / "cpu"
    monkeypatch.setattr(_helpers, "_PRESSURE", str(pressure))
    clock = [100.0]
    monkeypatch.setattr(_helpers.time, "monotonic", lambda: clock[0])

    def psi(avg10: str, total: int) -> None:
        pressure.write_text(f"some avg10={avg10} avg60=1.00 avg300=1.00 total={total}\nfull avg10=0.00\n")

    for avg10, busy in (("4.10", False), ("66.85", True)):  # a first read: the 10-second average decides
        psi(avg10, 1)
        monkeypatch.setattr(_helpers, "_CONTENTION", [-1.0, False, None])  # (not the cached answer)
        assert _helpers.cpu_contended() is busy
        assert _helpers.split_threads(x, 4, work=1 << 30) == (2 if busy else 1)
        assert _helpers.split_threads(x, 4, work=1 << 20) == 1  # too little work to hand out
    assert _helpers.split_threads(x, 4, deterministic=True, work=1 << 30) == 1
    torch.use_deterministic_algorithms(True)
    try:
        assert _helpers.split_threads(x, 4, work=1 << 30) == 1
    finally:
        torch.use_deterministic_algorithms(False)

    # busy processes that have just started: the 10-second average still reads 2 %, the last second 70 % stalled
    monkeypatch.setattr(_helpers, "_CONTENTION", [-1.0, False, None])
    psi("2.00", 10_000_000)
    assert _helpers.cpu_contended() is False  # the first read: nothing to take an interval from
    clock[0] += 0.3
    psi("2.00", 10_210_000)
    assert _helpers.cpu_contended() is False  # cached for half a second
    clock[0] += 0.7  # one second after the first read: 700 ms stalled in it
    psi("2.00", 10_700_000)
    assert _helpers.cpu_contended() is True
    clock[0] += 1.0  # they stopped: 50 ms stalled in the last second, while the average still lags at 60 %
    psi("60.00", 10_750_000)
    assert _helpers.cpu_contended() is False
    clock[0] += 30.0  # a long gap: the interval would be stale, the 10-second average decides
    psi("60.00", 10_760_000)
    assert _helpers.cpu_contended() is True

    monkeypatch.setattr(_helpers, "_PRESSURE", str(tmp_path / "absent"))  # no PSI: the load average decides
    monkeypatch.setattr(_helpers, "_CONTENTION", [-1.0, False, None])
    monkeypatch.setattr(_helpers.os, "getloadavg", lambda: (99.0, 0.0, 0.0))
    assert _helpers.cpu_contended() is True


@pytest.mark.parametrize(("backend", "loops"), [("sdpa:math", [2]), ("sdpa:flash", [2, 2])])
def test_split_query_blocks_equal_the_single_thread_blocks(monkeypatch, backend, loops):
    """sdpa's query blocks (causal + key padding, i > query_block) split across threads give the single-thread
    path's out and gradients. sdpa:math's blocks are twice differentiable, so autograd runs their backward (one
    split loop); sdpa:flash's run in `_BlockGrads`, whose backward loop splits as its forward did."""
    from attend import _helpers

    if torch.get_num_threads() < 2 or not _helpers.per_thread_counts():
        pytest.skip(f"no split here: {torch.get_num_threads()} intra-op thread(s)")
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 1100, 16, dtype=torch.float64, requires_grad=True) for _ in range(3))
    pad = torch.ones(1, 1100, dtype=torch.bool)
    pad[:, 1000:] = False

    monkeypatch.setattr(_helpers, "SPLIT_MIN_WORK", 0)  # (a call this small is not split otherwise)

    def run(busy: bool):
        monkeypatch.setattr(_helpers, "cpu_contended", lambda: busy)
        out = attention(q, k, v, mask=pad, causal=True, backend=backend)
        return out, torch.autograd.grad(out, (q, k, v), torch.ones_like(out))

    seen = []
    real = _helpers.run_split
    monkeypatch.setattr(_helpers, "run_split", lambda units, fn, ways, into=None: seen.append(ways)
                        or real(units, fn, ways, into))  # fmt: skip
    from attend.backends import sdpa

    monkeypatch.setattr(sdpa, "run_split", _helpers.run_split)
    split_out, split_grads = run(True)
    assert seen == loops, f"the forward's and the backward's blocks were not both split: {seen}"
    one_out, one_grads = run(False)
    torch.testing.assert_close(split_out, one_out, atol=1e-12, rtol=1e-12)
    for a, b in zip(split_grads, one_grads):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)

