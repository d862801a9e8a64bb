"""Numerics at the edges, on every registered backend:

* large logits (scale * |q||k| in the hundreds and more) stay finite and match the float64 reference;
* float16 `q @ k` beyond 65504 does not overflow where the scaled logits fit (scale applied first);
* a NaN or inf in q, k or v reaches exactly the rows that see it, on every backend: it never vanishes,
  and it does not leak into rows that mask it (SDPA's additive masks would leak it: the guard in
  `functional.run_inputs` runs the finite part and marks the rows);
* huge finite garbage in masked-out keys and values never changes the output (contract item 3).

Shape legend: b batch, h query heads, g key/value heads, i query positions, j key positions,
d head dim (q and k), e value head dim.
"""

from __future__ import annotations

import pytest
import torch

from attend import Attend, attention, get_backend, list_backends
from attend.inputs import validate
from attend.testing import DTYPES, assert_matches_reference, check_backend, tolerance

from .helpers import CPU_BACKENDS, needs, skip_unless_runs

HALF = [torch.float16, torch.bfloat16]

# helpers


def _maybe_nonfinite(inp) -> bool:
    """The guard's verdict on the inputs alone (a finite output of the kernel): does the exact path run?"""
    from attend.dispatch import _all_finite, _checkable

    return _checkable(inp) and not _all_finite(inp, torch.zeros(()))


def _skip_unless_runs(name, q, k, v, grad=True, **kw):
    skip_unless_runs(name, validate(q.detach().requires_grad_(grad), k, v, **kw))


# large logits


@pytest.mark.parametrize("name", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
def test_large_logits_stay_finite_and_match(name, dtype, causal):
    """scale * |q||k| in the hundreds: softmax is nearly one-hot, nothing overflows."""
    gen = torch.Generator().manual_seed(0)
    q = (torch.randn(2, 4, 17, 16, generator=gen) * 6).to(dtype)
    k = (torch.randn(2, 2, 23, 16, generator=gen) * 6).to(dtype)
    v = torch.randn(2, 2, 23, 16, generator=gen).to(dtype)
    logits = (q.double() @ k.double().repeat_interleave(2, 1).transpose(-1, -2)).abs().max()
    assert logits > 300, f"the case should have logits in the hundreds, got {float(logits):.0f}"
    _skip_unless_runs(name, q, k, v, causal=causal, scale=1.0)
    check_backend(name, q, k, v, causal=causal, scale=1.0)


@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_float16_qk_beyond_65504_does_not_overflow(name):
    """|q . k| = 102400 > float16 max (65504), but scale * q . k = 102.4: every backend scales before (or
    accumulates in float32 during) the matmul, so the output is finite and matches the reference."""
    q = torch.full((1, 2, 3, 64), 40.0, dtype=torch.float16)
    k = torch.full((1, 2, 4, 64), 40.0, dtype=torch.float16)
    k[:, :, 1] *= -1
    v = torch.randn(1, 2, 4, 64, generator=torch.Generator().manual_seed(0)).half()
    _skip_unless_runs(name, q, k, v, scale=1e-3)
    out = attention(q, k, v, scale=1e-3, backend=name)
    assert torch.isfinite(out).all(), f"{name}: float16 q @ k overflowed"
    check_backend(name, q, k, v, scale=1e-3)


# NaN propagation

WHERES = ["q", "q-dead-row", "k-causal", "v-causal", "k-causal-i<j", "k-padding", "v-padding", "k-bool",
          "v-bool", "k-bias-inf", "inf-k-padding", "k-padding-causal"]  # fmt: skip


def _nan_case(where: str, dtype):
    """Inputs with NaN (or inf) entries, and `sees`: bool (b, h, i), True for the rows that attend one."""
    gen = torch.Generator().manual_seed(0)
    b, h, g, i, j, d = 2, 4, 2, 6, 6, 8
    if where == "k-causal-i<j":
        i = 4
    elif where == "q-dead-row":
        i = 8  # causal with i = 8 > j = 6: rows 0 and 1 may attend no key
    q = torch.randn(b, h, i, d, generator=gen).to(dtype)
    k = torch.randn(b, g, j, d, generator=gen).to(dtype)
    v = torch.randn(b, g, j, d, generator=gen).to(dtype)
    kw: dict = {}
    sees = torch.zeros(b, h, i, dtype=torch.bool)
    g0 = slice(0, h // g)  # query heads that share kv head 0
    nan = float("inf") if where.startswith("inf") else float("nan")
    kv = v if where.startswith("v") else k
    if where == "q":
        q[1, 2, 3, 0] = nan
        sees[1, 2, 3] = True
    elif where == "q-dead-row":  # a row that may attend nothing is 0 (contract item 2), NaN query or not
        q[1, 2, 0, 0] = q[1, 2, 3, 0] = nan
        kw["causal"] = True
        sees[1, 2, 3] = True
    elif where in ("k-causal", "v-causal"):
        kv[0, 0, 3, 1] = nan
        kw["causal"] = True
        sees[0, g0, 3:] = True  # rows i >= 3 see key 3
    elif where == "k-causal-i<j":  # bottom-right: row r sees keys <= r + 2
        k[0, 0, 3, 1] = nan
        kw["causal"] = True
        sees[0, g0, 1:] = True
    elif where in ("k-padding", "v-padding", "inf-k-padding", "k-padding-causal"):
        kv[0, 0, 3, 1] = nan
        mask = torch.ones(b, j, dtype=torch.bool)
        mask[0, 3] = False  # batch 0 pads key 3 out: nobody sees it
        kw["mask"] = mask
        kv[1, 1, 2, 0] = nan  # batch 1 keeps key 2: all rows of kv head 1 see it (causal: rows >= 2)
        if where == "k-padding-causal":
            kw["causal"] = True
            sees[1, h // g :, 2:] = True
        else:
            sees[1, h // g :] = True
    elif where in ("k-bool", "v-bool"):
        kv[0, 0, 3, 1] = nan
        mask = torch.ones(1, 1, i, j, dtype=torch.bool)
        mask[..., :4, 3] = False  # rows 0..3 may not attend key 3
        kw["mask"] = mask
        sees[0, g0, 4:] = True
    elif where == "k-bias-inf":
        k[0, 0, 3, 1] = nan
        bias = torch.randn(1, h, i, j, generator=gen).to(dtype)
        bias[:, :, :4, 3] = float("-inf")  # a -inf bias is a mask: rows 0..3 do not attend key 3
        kw["bias"] = bias
        sees[0, g0, 4:] = True
    return q, k, v, kw, sees


@pytest.mark.parametrize("where", WHERES)
@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_nonfinite_reaches_exactly_the_rows_that_see_it(name, where):
    """`check_finite=True`, every backend, whatever its masking does inside: NaN rows are exactly the rows that attend a NaN/inf
    (never vanishing, never leaking), and every other row is what it would be with those entries at 0."""
    q, k, v, kw, sees = _nan_case(where, torch.float32)
    _skip_unless_runs(name, q, k, v, **kw)
    out = attention(q, k, v, backend=name, check_finite=True, **kw)
    nan_rows = torch.isnan(out).any(dim=-1)
    assert nan_rows[sees].all(), f"{name}: the NaN vanished from rows that attend to it"
    assert torch.isnan(out[sees]).all(), f"{name}: a row that sees a NaN is NaN in every column"
    assert not nan_rows[~sees].any(), f"{name}: the NaN leaked into rows that do not attend to it"
    clean = [t.nan_to_num(0.0, 0.0, 0.0) for t in (q, k, v)]
    ref = attention(*(t.double() for t in clean), backend="einsum", **kw)
    torch.testing.assert_close(out[~sees].double(), ref[~sees], **tolerance(out.dtype))


@pytest.mark.parametrize("where", WHERES)
@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_default_guard_never_leaks(name, where):
    """The default (`check_finite=None`, CPU): nothing reaches a row from a position it may not see, on every
    backend, and every row that sees no NaN/inf is exactly the kernel's output for the same inputs with those
    entries at 0. (What a row that does see one gets is the kernel's own: see the next test.)"""
    q, k, v, kw, sees = _nan_case(where, torch.float32)
    _skip_unless_runs(name, q, k, v, **kw)
    out = attention(q, k, v, backend=name, **kw)
    assert torch.isfinite(out[~sees]).all(), f"{name}: a NaN/inf leaked into rows that do not attend to it"
    clean = attention(*(t.nan_to_num(0.0, 0.0, 0.0) for t in (q, k, v)), backend=name, check_finite=False, **kw)
    torch.testing.assert_close(out[~sees], clean[~sees], atol=0, rtol=0)


def test_default_leaves_visible_nonfinite_to_the_kernel_and_true_makes_it_exact():
    """Why `check_finite=True` exists: CPU flash turns a NaN query row into a row of zeros, and an inf key
    whose every score is -inf acts as a masked key. The default (no mask here: no check at all) returns the
    kernel's output; True reads q, k, v and makes exactly the rows that see them NaN."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 4, 8, generator=gen) for _ in range(3))
    q[0, 1, 2, 0] = float("nan")
    q[0, 0, :, 0] = q[0, 0, :, 0].abs() + 0.1  # head 0: every query positive in column 0 ...
    k[0, 0, 1] = 0.0
    k[0, 0, 1, 0] = float("-inf")  # ... so every score with key 1 is -inf
    sees = torch.zeros(1, 2, 4, dtype=torch.bool)
    sees[0, 0] = True  # head 0 sees the inf key
    sees[0, 1, 2] = True  # head 1's row 2 is the NaN query
    exact = attention(q, k, v, check_finite=True)
    assert torch.equal(torch.isnan(exact).all(-1), sees)
    if "sdpa:flash" not in list_backends() or get_backend("sdpa:flash").reasons_unsupported(
        validate(q, k, v)
    ):
        pytest.skip("sdpa:flash (the kernel whose own behaviour this shows) cannot run here")
    kernel = attention(q, k, v, backend="sdpa:flash")
    # rows that see no non-finite value agree; the others are the kernel's own (torch 2.13's CPU flash gives
    # finite garbage there, torch 2.4's NaN: docs/reliability.md)
    torch.testing.assert_close(kernel[~sees], exact[~sees])


@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_nonfinite_clean_rows_train(name):
    """Garbage NaN in padded keys (torch.empty padding) costs nothing in training: the loss and the
    gradients are finite and equal those of the same batch with the padding zeroed."""
    q, k, v, kw, _ = _nan_case("k-padding", torch.float32)
    k[1, 1, 2, 0] = 0.0  # only the padded NaN is left
    v[0, 1, 3] = float("nan")
    _skip_unless_runs(name, q, k, v, **kw)

    def grads(k, v):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        attention(*leaves, backend=name, **kw).square().sum().backward()
        return [t.grad for t in leaves]

    dirty = grads(k, v)
    clean = grads(k.nan_to_num(0.0), v.nan_to_num(0.0))
    for got, want in zip(dirty, clean):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.parametrize("where", ["q", "k-causal", "v-bool"])
@needs("dynamo_traces_attend")
def test_nonfinite_guard_is_off_under_compile(where):
    """torch.compile traces no data-dependent branch: the guard is skipped and the kernel's own
    behaviour applies (documented); finite inputs compile to one graph as before."""
    q, k, v, kw, _ = _nan_case(where, torch.float32)
    inp = validate(q, k, v, **kw)
    assert _maybe_nonfinite(inp)
    assert torch.compile(lambda: _maybe_nonfinite(inp), fullgraph=True, backend="eager")() is False


def test_empty_keys_with_nan_query_give_zeros():
    """j = 0: no key to attend, so 0 even for a NaN query (contract item 2)."""
    q = torch.full((1, 2, 3, 4), float("nan"), requires_grad=True)
    k = v = torch.zeros(1, 2, 0, 4)
    out = attention(q, k, v)
    assert torch.equal(out, torch.zeros(1, 2, 3, 4))
    out.sum().backward()
    assert torch.equal(q.grad, torch.zeros_like(q))


def test_overflowing_finite_sum_is_only_a_false_alarm():
    """The cheap check sums each input in float32: huge finite values overflow it, the exact path runs,
    and the output is the same as the plain kernel's."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 5, 8, generator=gen)
    k = torch.randn(1, 2, 5, 8, generator=gen)
    v = (torch.rand(1, 2, 5, 8, generator=gen) + 1) * 1e37  # the sum of 80 entries > 8e38 overflows
    assert _maybe_nonfinite(validate(q, k, v))
    out = attention(q, k, v, backend="einsum")
    ref = attention(q.double(), k.double(), v.double(), backend="einsum")
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, rtol=tolerance(out.dtype)["rtol"], atol=0)  # values ~1e37


# garbage in masked-out positions


GARBAGE = ["huge", "max", "inf", "-inf", "nan"]


@pytest.mark.parametrize("name", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=lambda t: str(t)[6:])
@pytest.mark.parametrize("masking", ["padding", "causal", "bool", "bias-inf"])
@pytest.mark.parametrize("garbage", GARBAGE)
def test_garbage_in_masked_positions_changes_nothing(name, dtype, masking, garbage):
    """Contract item 3: whatever sits in keys that no query may attend (key padding, a key masked for every
    row, a -inf bias column) changes no output: finite up to the dtype's max (where the logit overflows to
    inf and an additive -inf mask would make NaN), +-inf and NaN. Causal hides keys from some rows only;
    there huge finite garbage is checked (the dtype's max there is the residual noted in docs/reliability.md)."""
    if masking == "causal" and garbage != "huge":
        pytest.skip("causal hides keys from some rows only: checked with huge finite garbage")
    gen = torch.Generator().manual_seed(0)
    b, h, g, i, j, d = 2, 4, 2, 7, 9, 8
    q = torch.randn(b, h, i, d, generator=gen).to(dtype)
    k = torch.randn(b, g, j, d, generator=gen).to(dtype)
    v = torch.randn(b, g, j, d, generator=gen).to(dtype)
    huge = {
        "huge": 6e4 if dtype == torch.float16 else 1e30,
        "max": torch.finfo(dtype).max,
        "inf": float("inf"),
        "-inf": float("-inf"),
        "nan": float("nan"),
    }[garbage]
    kw: dict = {}
    rows = slice(None)  # the output rows that must not change
    if masking == "padding":
        mask = torch.ones(b, j, dtype=torch.bool)
        mask[:, 6:] = False
        kw["mask"] = mask
        dirty = (slice(None), slice(None), slice(6, None))
    elif masking == "causal":
        # bottom-right aligned: row r sees keys <= r + (j - i), so keys 6.. are unseen by rows r < 6 - (j - i)
        kw["causal"] = True
        dirty, rows = (slice(None), slice(None), slice(6, None)), slice(0, 6 - (j - i))
    elif masking == "bool":
        mask = torch.ones(1, 1, i, j, dtype=torch.bool)
        mask[..., 7:] = False
        kw["mask"] = mask
        dirty = (slice(None), slice(None), slice(7, None))
    else:  # a -inf bias is a mask too
        bias = torch.zeros(i, j, dtype=dtype)
        bias[:, 7:] = float("-inf")
        kw["bias"] = bias
        dirty = (slice(None), slice(None), slice(7, None))
    _skip_unless_runs(name, q, k, v, grad=False, **kw)
    clean = attention(q, k, v, backend=name, **kw)
    k2, v2 = k.clone(), v.clone()
    k2[dirty], v2[dirty] = huge, -huge
    out = attention(q, k2, v2, backend=name, **kw)
    assert torch.isfinite(out[:, :, rows]).all()
    torch.testing.assert_close(out[:, :, rows], clean[:, :, rows], atol=0, rtol=0)


def test_check_finite_false_is_the_kernel_alone():
    """`check_finite=False` (the bench's `attend:unchecked`) runs the kernel without the guard: SDPA's
    additive mask then leaks a masked NaN key, which is what the guard exists for."""
    q, k, v, kw, sees = _nan_case("k-padding", torch.float32)
    leaky = attention(q, k, v, backend="sdpa:math", check_finite=False, **kw)
    assert torch.isnan(leaky[~sees]).any()
    leaky = Attend(backend="sdpa:math", check_finite=False)(q, k, v, **kw)
    assert torch.isnan(leaky[~sees]).any()
    for guarded in (attention(q, k, v, backend="sdpa:math", **kw), Attend(backend="sdpa:math")(q, k, v, **kw)):
        assert not torch.isnan(guarded[~sees]).any()


def test_float16_check_does_not_overflow_on_ordinary_activations():
    """A float16 sum of 4096 entries of 60000 is inf; the check uses the mean, so no false alarm."""
    x = torch.full((1, 2, 32, 64), 60000.0, dtype=torch.float16)
    assert not _maybe_nonfinite(validate(x, x, x))
    x[0, 1, 5, 7] = float("-inf")
    assert _maybe_nonfinite(validate(x, x.clone().fill_(1), x.clone().fill_(1)))


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")  # PyTorch's: no vmap rule for CPU flash
def test_guard_skips_under_vmap_and_fake_tensors():
    """vmap and FakeTensorMode cannot branch on values: the check is skipped there (as under compile),
    so both keep working as they did before the guard."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(3, 2, 4, 5, 8, generator=gen)
    k, v = torch.randn(3, 2, 2, 6, 8, generator=gen), torch.randn(3, 2, 2, 6, 8, generator=gen)
    out = torch.func.vmap(lambda a, b, c: attention(a, b, c))(q, k, v)
    want = torch.stack([attention(a, b, c) for a, b, c in zip(q, k, v)])
    torch.testing.assert_close(out, want)
    real = q[0], k[0], v[0]
    with FakeTensorMode() as mode:
        fake = attention(*(mode.from_tensor(t) for t in real))
    assert fake.shape == (2, 4, 5, 8)


# one bias rule on every backend (contract item 4)


@pytest.mark.parametrize("name", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=lambda t: str(t)[6:])
@pytest.mark.parametrize(
    "kind", ["beyond-float16", "row-of-minus-1e9", "fine-grained"], ids=lambda s: s
)
def test_float32_bias_on_half_inputs_gives_one_answer(name, dtype, kind):
    """A float32 bias with float16/bfloat16 q, k, v is added at float32 precision on every backend: 7e4
    (beyond float16's range) is not inf, a row of -1e9 is a finite bias (mean of v, as in float32), and
    100.3 vs 100.0 is not rounded away. Before, the SDPA kernels cast it to q's dtype first: NaN, 0, and
    a rounded bias."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 3, 8, generator=gen).to(dtype) for _ in range(3))
    bias = torch.zeros(1, 1, 3, 3)
    if kind == "beyond-float16":
        bias[..., 0, 1] = 7e4
    elif kind == "row-of-minus-1e9":
        bias[..., 1, :] = -1e9
    else:
        bias[..., 2, :] = torch.tensor([100.0, 100.3, 99.8])
    _skip_unless_runs(name, q, k, v, grad=False, bias=bias)
    out = attention(q, k, v, bias=bias, backend=name)
    golden = attention(q.double(), k.double(), v.double(), bias=bias.double(), backend="einsum")
    baseline = attention(q, k, v, bias=bias, backend="einsum")
    assert torch.isfinite(out).all()
    assert_matches_reference(out, golden, baseline)
