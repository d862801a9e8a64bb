"""`attend.scaled_dot_product_attention` against `F.scaled_dot_product_attention`, on a grid of cases where
PyTorch's result is well-defined: same outputs, same gradients, same errors.

Shape legend (PyTorch's): N batch, Hq query heads, H key/value heads, L query positions, S key positions,
E head dim, Ev value head dim.
"""

from __future__ import annotations

import contextlib
import itertools

import pytest
import torch
import torch.nn.functional as F

import attend
from attend import features
from attend import scaled_dot_product_attention as sdpa
from attend.compat import SdpaArgumentError
from attend.testing import tolerance

from .helpers import fresh_dynamo, needs  # noqa: F401 (a fixture, used by name)

# (N, Hq, H, L, S, E, Ev, enable_gqa)
SHAPES = [
    (2, 4, 4, 7, 7, 16, 16, False),
    (2, 4, 2, 5, 9, 16, 16, True),  # grouped-query, L < S
    (2, 4, 2, 9, 5, 16, 16, True),  # grouped-query, L > S
    (1, 4, 1, 6, 6, 8, 8, False),  # one k/v head broadcasts, as in PyTorch
    (2, 2, 2, 1, 7, 8, 8, False),  # decoding step
    (1, 2, 2, 64, 129, 40, 40, False),
    (2, 2, 2, 7, 7, 16, 24, False),  # Ev != E
]
MASKS = ["none", "causal", "bool-2d", "bool-4d", "float", "float-inf", "float-finfo-min-row"]


def _id(shape) -> str:
    n, hq, h, L, S, E, Ev, gqa = shape
    return f"N{n}Hq{hq}H{h}-L{L}S{S}-E{E}Ev{Ev}" + ("-gqa" if gqa else "")


def _mask(kind: str, n: int, hq: int, L: int, S: int, dtype: torch.dtype, gen: torch.Generator):
    if kind in ("none", "causal"):
        return None
    if kind == "bool-2d":
        keep = torch.rand(L, S, generator=gen) > 0.4
        keep[:, 0] = True  # every row keeps a key: PyTorch and we agree on dead rows too, but see below
        return keep
    if kind == "bool-4d":
        keep = torch.rand(n, 1, L, S, generator=gen) > 0.4
        keep[..., 0] = True
        return keep
    bias = torch.randn(n, hq, L, S, generator=gen).to(dtype)
    if kind == "float-inf":
        bias = bias.masked_fill(torch.rand(n, hq, L, S, generator=gen) > 0.6, float("-inf"))
        bias[..., 0] = 0.0
    if kind == "float-finfo-min-row":
        # a row "masked" with a finite value: PyTorch averages v there (not 0); a drop-in does the same
        bias[:, :, 0] = torch.finfo(dtype).min
    return bias


def torch_sdpa(q, k, v, *, enable_gqa=False, **kwargs):
    """PyTorch's SDPA, the reference. On a torch without its `enable_gqa` keyword (< 2.5; attend's drop-in takes
    it on every torch), grouped-query heads are what the keyword means: k and v repeated to the query heads."""
    from attend.backends.sdpa import has_enable_gqa

    if enable_gqa and not has_enable_gqa():
        r = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(r, -3), v.repeat_interleave(r, -3)
    elif enable_gqa:
        kwargs["enable_gqa"] = True
    return F.scaled_dot_product_attention(q, k, v, **kwargs)


def _pair(shape, kind, dtype, grad=False, seed=0):
    n, hq, h, L, S, E, Ev, gqa = shape
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(n, hq, L, E, generator=gen).to(dtype)
    k = torch.randn(n, h, S, E, generator=gen).to(dtype)
    v = torch.randn(n, h, S, Ev, generator=gen).to(dtype)
    mask = _mask(kind, n, hq, L, S, dtype, gen)
    kwargs = dict(attn_mask=mask, is_causal=kind == "causal", enable_gqa=gqa)
    ours = [t.clone().requires_grad_(grad) for t in (q, k, v)]
    theirs = [t.clone().requires_grad_(grad) for t in (q, k, v)]
    return ours, theirs, kwargs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("kind", MASKS)
@pytest.mark.parametrize("shape", SHAPES, ids=_id)
def test_matches_torch_forward(shape, kind, dtype):
    ours, theirs, kwargs = _pair(shape, kind, dtype)
    out = sdpa(*ours, **kwargs)
    ref = torch_sdpa(*theirs, **kwargs)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, **tolerance(dtype))


@pytest.mark.parametrize("kind", ["none", "causal", "bool-4d", "float", "float-inf"])
@pytest.mark.parametrize("shape", SHAPES[:4], ids=_id)
def test_matches_torch_backward(shape, kind):
    ours, theirs, kwargs = _pair(shape, kind, torch.float32, grad=True)
    out = sdpa(*ours, **kwargs)
    ref = torch_sdpa(*theirs, **kwargs)
    d_out = torch.randn_like(ref)
    out.backward(d_out)
    ref.backward(d_out)
    for a, b, name in zip(ours, theirs, "qkv"):
        torch.testing.assert_close(a.grad, b.grad, **tolerance(a.dtype), msg=lambda m, n=name: f"d{n}: {m}")


def test_float_mask_gradient_matches_torch():
    (q, k, v), _, _ = _pair(SHAPES[0], "none", torch.float32)
    bias = torch.randn(2, 4, 7, 7)
    b1, b2 = bias.clone().requires_grad_(), bias.clone().requires_grad_()
    sdpa(q, k, v, attn_mask=b1).sum().backward()
    F.scaled_dot_product_attention(q, k, v, attn_mask=b2).sum().backward()
    torch.testing.assert_close(b1.grad, b2.grad, **tolerance(b1.dtype))


def test_upper_left_causal_differs_from_bottom_right():
    """`is_causal` is upper-left (PyTorch); `attention(causal=True)` is bottom-right: for L != S they differ."""
    q, k, v = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    upper_left = sdpa(q, k, v, is_causal=True)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(3, 6, dtype=torch.bool).tril())
    torch.testing.assert_close(upper_left, expected)
    bottom_right = attend.attention(q, k, v, causal=True)
    assert (upper_left - bottom_right).abs().max() > 1e-3
    # the last query row sees keys 0..2 under upper-left only
    last = F.scaled_dot_product_attention(q[:, :, -1:], k[:, :, :3], v[:, :, :3])
    torch.testing.assert_close(upper_left[:, :, -1:], last)


def test_finfo_min_row_averages_v_like_torch():
    q, k, v = torch.randn(1, 1, 3, 8), torch.randn(1, 1, 5, 8), torch.randn(1, 1, 5, 8)
    bias = torch.zeros(3, 5)
    bias[0] = torch.finfo(torch.float32).min
    out = sdpa(q, k, v, attn_mask=bias)
    torch.testing.assert_close(out[0, 0, 0], v[0, 0].mean(0))  # documented: not 0
    bias[0] = float("-inf")
    assert (sdpa(q, k, v, attn_mask=bias)[0, 0, 0] == 0).all()  # contract: -inf rows are 0
    keep = torch.ones(3, 5, dtype=torch.bool)
    keep[0] = False
    assert (sdpa(q, k, v, attn_mask=keep)[0, 0, 0] == 0).all()


@needs("sdpa_zero_dead_rows")  # torch without it gives NaN there; attend gives 0
def test_dead_rows_zero_and_finite_grads_like_torch():
    ours, theirs, _ = _pair(SHAPES[0], "none", torch.float32, grad=True)
    keep = torch.rand(2, 1, 7, 7) > 0.5
    keep[0, 0, 3] = False
    out = sdpa(*ours, attn_mask=keep)
    ref = F.scaled_dot_product_attention(*theirs, attn_mask=keep)
    torch.testing.assert_close(out, ref, **tolerance(out.dtype))
    assert (out[0, :, 3] == 0).all()
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in ours)


def test_nan_in_a_masked_key_stays_out_of_other_rows():
    """Stricter than PyTorch, which adds the mask as -inf (NaN + -inf = NaN) and spreads a masked NaN key."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 4, 8, generator=gen) for _ in range(3))
    k[0, 0, 3, 0] = float("nan")
    keep = torch.ones(4, 4, dtype=torch.bool)
    keep[:2, 3] = False  # rows 0, 1 mask key 3; rows 2, 3 see it
    out = sdpa(q, k, v, attn_mask=keep)
    assert torch.isnan(out[0, 0, 2:]).all() and not torch.isnan(out[0, 0, :2]).any()
    assert not torch.isnan(out[0, 1]).any()  # the other head has no NaN key
    clean = k.nan_to_num(0.0)
    torch.testing.assert_close(out[0, 0, :2], F.scaled_dot_product_attention(q, clean, v, attn_mask=keep)[0, 0, :2])


@pytest.mark.parametrize(
    "q_shape, kv_shape",
    [((5, 8), (7, 8)), ((3, 5, 8), (3, 7, 8)), ((2, 3, 4, 5, 8), (2, 3, 4, 7, 8)), ((1, 4, 5, 8), (3, 4, 7, 8))],
    ids=["2d", "3d", "5d", "batch-broadcast"],
)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_layouts(q_shape, kv_shape, causal):
    q, k, v = torch.randn(q_shape), torch.randn(kv_shape), torch.randn(kv_shape)
    out = sdpa(q, k, v, is_causal=causal)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, **tolerance(out.dtype))


def test_layout_5d_with_mask():
    q, k, v = torch.randn(2, 3, 2, 5, 8), torch.randn(2, 3, 2, 7, 8), torch.randn(2, 3, 2, 7, 8)
    keep = torch.rand(3, 1, 5, 7) > 0.3
    keep[..., 0] = True
    torch.testing.assert_close(sdpa(q, k, v, attn_mask=keep), F.scaled_dot_product_attention(q, k, v, attn_mask=keep))


def test_scale_and_dropout_zero():
    q, k, v = torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    for scale in (0.1, 1.0, 3.0):
        torch.testing.assert_close(sdpa(q, k, v, scale=scale), F.scaled_dot_product_attention(q, k, v, scale=scale))


def test_dropout_is_applied_whenever_p_positive():
    """As in PyTorch, dropout_p > 0 drops (there is no training flag); surviving weights are rescaled."""
    q, k = torch.randn(4, 4, 64, 16), torch.randn(4, 4, 64, 16)
    v = torch.ones(4, 4, 64, 8)
    out = sdpa(q, k, v, dropout_p=0.3)
    assert out.std() > 0.05  # rows lost different weights
    assert abs(out.mean().item() - 1.0) < 0.05  # E[out] = 1: rescaled by 1 / (1 - p)


def test_autocast_like_torch():
    q, k, v = torch.randn(2, 4, 9, 16), torch.randn(2, 4, 9, 16), torch.randn(2, 4, 9, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sdpa(q, k.bfloat16(), v, is_causal=True)
        ref = F.scaled_dot_product_attention(q, k.bfloat16(), v, is_causal=True)
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref, **tolerance(out.dtype))


# errors: same arguments PyTorch rejects, rejected before any kernel runs


def _mask_and_causal(case: str):
    """Arguments with both `attn_mask` and `is_causal=True`, and the context to call them in. PyTorch runs such a
    call on a kernel that takes both (CPU flash; CUDA memory-efficient or cuDNN), with the mask AND the upper-left
    triangle, and raises where it picks its math kernel, which refuses them ("Explicit attn_mask should not be set
    when is_causal=True"): on CPU for dropout, inputs that are not 4-D, Ev != E, a broadcast batch or k/v head, a
    mask that requires grad, or the math kernel asked for."""
    gen = torch.Generator().manual_seed(0)
    shape = {"3-d": (4, 5, 8), "Ev-ne-E": (1, 4, 5, 8)}.get(case, (2, 4, 5, 8))
    q, k = torch.randn(shape, generator=gen), torch.randn(shape[:-2] + (7, 8), generator=gen)
    v = torch.randn(shape[:-2] + (7, 16 if case == "Ev-ne-E" else 8), generator=gen)
    if case == "batch-broadcast":
        q = q[:1]
    keep = torch.rand(5, 7, generator=gen) > 0.3
    keep[:, 0] = True
    mask = torch.randn(5, 7, generator=gen, requires_grad=True) if case == "float-mask-grad" else keep
    kwargs = {"attn_mask": mask, "is_causal": True, "dropout_p": 0.3 if case == "dropout" else 0.0}
    context = contextlib.nullcontext()
    if case == "math-kernel":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        context = sdpa_kernel([SDPBackend.MATH])
    return (q, k, v), kwargs, context


@pytest.mark.parametrize(
    "case", ["4-d", "3-d", "Ev-ne-E", "batch-broadcast", "dropout", "float-mask-grad", "math-kernel"]
)
def test_mask_with_is_causal_does_what_torch_does(case):
    """A drop-in does what the torch it runs on does with the same arguments on the same device: it computes
    where PyTorch computes (the mask AND the upper-left triangle) and raises where PyTorch raises."""
    (q, k, v), kwargs, context = _mask_and_causal(case)
    with context:
        try:
            ref, refused = F.scaled_dot_product_attention(q, k, v, **kwargs), None
        except RuntimeError as exc:
            ref, refused = None, exc
        if refused is not None:
            assert "attn_mask" in str(refused)
            with pytest.raises(RuntimeError) as info:  # what PyTorch's callers catch
                sdpa(q, k, v, **kwargs)
            assert isinstance(info.value, SdpaArgumentError) and isinstance(info.value, ValueError)
            why = (
                "PyTorch's own scaled_dot_product_attention refuses for these arguments (it runs them on its math "
                "kernel)"
                if features.get("sdpa_mask_with_causal").present()
                else f"this torch's scaled_dot_product_attention ({torch.__version__}) refuses for every kernel"
            )
            assert str(info.value) == (
                f"expected either `attn_mask` or `is_causal=True`, got both, which {why}; "
                "hint: fold the causal triangle into the mask (`attn_mask & torch.ones(L, S, "
                "dtype=torch.bool).tril()`), or use `attend.attention(q, k, v, mask=..., causal=True)` "
                "(bottom-right aligned)"
            )
            return
        out = sdpa(q, k, v, **kwargs)
    assert out.shape == ref.shape
    if kwargs["dropout_p"] == 0:
        torch.testing.assert_close(out, ref, **tolerance(out.dtype))


BOTH_SHAPES = [SHAPES[0], SHAPES[1], SHAPES[2], SHAPES[5]]  # square, L < S and L > S with GQA, L=64 S=129


def _torch_with_both(q, k, v, **kwargs):
    try:
        return torch_sdpa(q, k, v, is_causal=True, **kwargs)
    except RuntimeError as exc:
        pytest.skip(f"this torch's SDPA refuses attn_mask with is_causal here ({exc}); mirrored by the test above")


@needs("sdpa_mask_with_causal")  # where torch refuses the two, so does the drop-in (test above)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("kind", ["bool-2d", "bool-4d", "float", "float-inf"])
@pytest.mark.parametrize("shape", BOTH_SHAPES, ids=_id)
def test_mask_with_is_causal_matches_torch_forward(shape, kind, dtype):
    ours, theirs, kwargs = _pair(shape, kind, dtype)
    mask, gqa = kwargs["attn_mask"], kwargs["enable_gqa"]
    ref = _torch_with_both(*theirs, attn_mask=mask, enable_gqa=gqa)
    out = sdpa(*ours, attn_mask=mask, is_causal=True, enable_gqa=gqa)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, **tolerance(dtype))
    # what that is: the mask AND the upper-left triangle (a float mask gets -inf above it)
    L, S = shape[3], shape[4]
    above = ~torch.ones(L, S, dtype=torch.bool).tril()
    folded = mask & ~above if mask.dtype == torch.bool else mask.masked_fill(above, float("-inf"))
    torch.testing.assert_close(out, sdpa(*ours, attn_mask=folded, enable_gqa=gqa), **tolerance(dtype))


@needs("sdpa_mask_with_causal")  # where torch refuses the two, so does the drop-in (test above)
@pytest.mark.parametrize("kind", ["bool-2d", "bool-4d", "float", "float-inf"])
@pytest.mark.parametrize("shape", BOTH_SHAPES[:3], ids=_id)
def test_mask_with_is_causal_matches_torch_backward(shape, kind):
    ours, theirs, kwargs = _pair(shape, kind, torch.float32, grad=True)
    mask, gqa = kwargs["attn_mask"], kwargs["enable_gqa"]
    ref = _torch_with_both(*theirs, attn_mask=mask, enable_gqa=gqa)
    out = sdpa(*ours, attn_mask=mask, is_causal=True, enable_gqa=gqa)
    d_out = torch.randn_like(ref)
    out.backward(d_out)
    ref.backward(d_out)
    for a, b, name in zip(ours, theirs, "qkv"):
        torch.testing.assert_close(a.grad, b.grad, **tolerance(a.dtype), msg=lambda m, n=name: f"d{n}: {m}")


@needs("sdpa_mask_with_causal")  # where torch refuses the two, so does the drop-in (test above)
@pytest.mark.usefixtures("fresh_dynamo")  # reset dynamo around it
@needs("dynamo_traces_attend")
def test_mask_with_is_causal_compiles():
    """Under torch.compile the same decision is taken (once per compiled graph) and traced without a break."""
    ours, theirs, kwargs = _pair(SHAPES[1], "bool-4d", torch.float32)
    mask = kwargs["attn_mask"]
    ref = _torch_with_both(*theirs, attn_mask=mask, enable_gqa=True)
    compiled = torch.compile(lambda q, k, v, m: sdpa(q, k, v, attn_mask=m, is_causal=True, enable_gqa=True),
                             fullgraph=True, backend="aot_eager")  # fmt: skip
    torch.testing.assert_close(compiled(*ours, mask), ref, **tolerance(torch.float32, "compiled"))
    (q, k, v), kw, _ = _mask_and_causal("3-d")
    with pytest.raises(RuntimeError):  # refused like PyTorch's own call (compiled or not) with these arguments
        torch.compile(lambda q, k, v, m: sdpa(q, k, v, attn_mask=m, is_causal=True), fullgraph=True,
                      backend="aot_eager")(q, k, v, kw["attn_mask"])  # fmt: skip


def test_heads_differ_without_enable_gqa_raises_like_torch():
    q, k = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 5, 8)
    with pytest.raises(RuntimeError):
        F.scaled_dot_product_attention(q, k, k)
    with pytest.raises(SdpaArgumentError, match="enable_gqa=True"):
        sdpa(q, k, k)
    with pytest.raises(ValueError, match=r"h % g == 0"):
        sdpa(torch.randn(1, 3, 3, 8), k, k, enable_gqa=True)


@pytest.mark.parametrize(
    "kwargs, exc",
    [
        (dict(attn_mask=torch.ones(4, 4, dtype=torch.int64)), TypeError),
        (dict(attn_mask=torch.ones(3, 4, dtype=torch.bool)), SdpaArgumentError),
        (dict(is_causal=1), TypeError),
    ],
    ids=["int-mask", "mask-shape", "is_causal-int"],
)
def test_bad_arguments(kwargs, exc):
    q = k = v = torch.randn(1, 2, 4, 8)
    with pytest.raises(exc, match="expected"):
        sdpa(q, k, v, **kwargs)


@pytest.mark.parametrize(
    "mask_shape", [(3, 1, 4, 4), (2, 5, 4, 4), (4, 5), (1, 1, 1, 2, 4, 4)], ids=["batch", "heads", "LS", "5-d"]
)
def test_mask_that_does_not_broadcast_raises_what_torch_callers_catch(mask_shape):
    """PyTorch raises a RuntimeError here; so does the drop-in (a ValueError too), naming attn_mask."""
    q = k = v = torch.randn(2, 2, 4, 8)
    keep = torch.ones(mask_shape, dtype=torch.bool)
    with pytest.raises(RuntimeError):
        F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
    with pytest.raises(RuntimeError, match=r"expected `attn_mask` broadcastable to \(N, \.\.\., Hq, L, S\) = \(2, 2, 4, 4\)"):
        sdpa(q, k, v, attn_mask=keep)


@pytest.mark.parametrize(
    "shape, mask", [((0, 4, 5, 8), None), ((0, 4, 5, 8), (5, 5)), ((0, 5, 8), None), ((2, 0, 5, 8), None)],
    ids=["N0", "N0-mask", "N0-3d", "H0"],
)
def test_empty_batch_returns_empty_like_torch(shape, mask):
    """An empty batch or no heads: an empty output shaped like torch's. Torch's own call runs in a child process
    first: torch 2.9.1's CPU SDPA dies of SIGFPE on zero heads; where it does, attend still gives the empty
    output torch documents, (N, ..., Hq, L, Ev)."""
    import subprocess
    import sys

    q = torch.randn(shape, requires_grad=True)
    keep = None if mask is None else torch.ones(mask, dtype=torch.bool)
    out = sdpa(q, q, q, attn_mask=keep)
    probe = (f"import torch, torch.nn.functional as F; q = torch.randn({shape}); keep = None if {mask!r} is None "
             f"else torch.ones({mask!r}, dtype=torch.bool); F.scaled_dot_product_attention(q, q, q, attn_mask=keep)")
    if subprocess.run([sys.executable, "-c", probe], capture_output=True, timeout=120).returncode == 0:
        ref = F.scaled_dot_product_attention(q, q, q, attn_mask=keep)
        assert out.shape == ref.shape and out.dtype == ref.dtype
    assert out.shape == shape and out.dtype == q.dtype  # e == d here
    out.sum().backward()
    assert q.grad is not None and q.grad.shape == q.shape


def test_mixed_dtypes_outside_autocast_raise():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(TypeError, match="one dtype"):
        sdpa(q, q.bfloat16(), q)


def test_runs_through_the_dispatcher(monkeypatch):
    """The drop-in goes through attend's dispatcher, so a pinned/registered backend is what runs."""
    from attend import dispatch

    seen = []
    real = dispatch.select

    def spy(inp, backend=None, **kw):
        chosen = real(inp, backend, **kw)
        seen.append(chosen.name)
        return chosen

    monkeypatch.setattr("attend.dispatch.select", spy)
    dispatch.clear_cache()  # the first call of a signature chooses; later ones reuse the choice
    q = k = v = torch.randn(1, 2, 4, 8)
    sdpa(q, k, v, is_causal=True)
    ran = list(seen)
    assert ran == [attend.explain(q, k, v, causal=True).backend]


def test_grid_is_big_enough():
    assert len(list(itertools.product(SHAPES, MASKS))) >= 40
