"""The bad-input catalogue: one table, `ROWS`, is both the tests and `docs/errors.md`.

Each row is one class of bad (or awkward) input, the call that makes it, and the exact error type and
message it gets (the first line, for multi-line messages), or, for inputs that must work, what they
give. `test_docs_match_catalogue` fails when docs/errors.md drifts from the table; regenerate it with

    PYTHONPATH=src python -m tests.test_errors > docs/errors.md

Shapes used throughout: q (2, 4, 5, 8), k and v (2, 2, 6, 8): b=2, h=4, g=2, i=5, j=6, d=e=8.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import attend
from attend import Attend, NoBackendError, attention, get_backend, list_backends
from attend.inputs import validate
from attend.testing import tolerance

from .helpers import CPU_BACKENDS, skip_unless_runs

DOC = Path(__file__).resolve().parents[1] / "docs" / "errors.md"

# helpers


def q_(*shape, dtype=torch.float32):
    return torch.randn(*(shape or (2, 4, 5, 8)), dtype=dtype)


def kv_(*shape, dtype=torch.float32):
    return torch.randn(*(shape or (2, 2, 6, 8)), dtype=dtype)


def call(**kw):
    """attention(q, k, v, **kw) on the standard shapes, with any of q, k, v overridden."""
    q = kw.pop("q", None)
    k = kw.pop("k", None)
    v = kw.pop("v", None)
    return lambda: attention(q_() if q is None else q, kv_() if k is None else k, kv_() if v is None else v, **kw)


def mask_(*shape, dtype=torch.bool):
    return torch.ones(*shape, dtype=dtype)


@dataclass(frozen=True)
class Row:
    id: str
    what: str  # the class of input, for the docs
    make: Callable[[], object]  # the call; built lazily so collection stays cheap
    error: type | None  # None: the call must work
    message: str  # exact first line of the error, or what a working call gives


SHAPES = "q (2, 4, 5, 8), k (2, 2, 6, 8), v (2, 2, 6, 8)"
EXPECT_4D = "expected `{n}` of shape {want}, got a {r}-D tensor of shape {s}, dtype float32"
FLOAT = "(float16, bfloat16, float32, float64)"

ROWS: list[Row] = [
    # --- shapes -------------------------------------------------------------------------------------
    Row("q-3d", "q is 3-D (b, n, h*d activations)", call(q=q_(2, 5, 32)), ValueError,
        EXPECT_4D.format(n="q", want="(b, h, i, d)", r=3, s="(2, 5, 32)")
        + "; hint: for (b, n, h*d) activations split heads first: `rearrange(t, 'b n (h d) -> b h n d', h=heads)`"),
    Row("k-5d", "k is 5-D", call(k=kv_(2, 2, 1, 6, 8)), ValueError,
        EXPECT_4D.format(n="k", want="(b, g, j, d)", r=5, s="(2, 2, 1, 6, 8)")),
    Row("v-2d", "v is 2-D", call(v=kv_(6, 8)), ValueError, EXPECT_4D.format(n="v", want="(b, g, j, e)", r=2, s="(6, 8)")),
    Row("batch", "batch sizes differ", call(k=kv_(3, 2, 6, 8), v=kv_(3, 2, 6, 8)), ValueError,
        "expected one batch size `b` for q, k, v, got 2, 3, 3 (q (2, 4, 5, 8), k (3, 2, 6, 8), v (3, 2, 6, 8))"),
    Row("kv-heads", "k and v head counts differ", call(v=kv_(2, 1, 6, 8)), ValueError,
        "expected k and v with the same number of heads `g`, got 2 and 1 (q (2, 4, 5, 8), k (2, 2, 6, 8), v (2, 1, 6, 8))"),
    Row("kv-length", "k and v lengths differ", call(v=kv_(2, 2, 7, 8)), ValueError,
        "expected k and v with the same length `j`, got 6 and 7 (q (2, 4, 5, 8), k (2, 2, 6, 8), v (2, 2, 7, 8))"),
    Row("head-dim", "q and k head dims differ", call(k=kv_(2, 2, 6, 4)), ValueError,
        "expected q and k with the same head dim `d`, got 8 and 4 (q (2, 4, 5, 8), k (2, 2, 6, 4), v (2, 2, 6, 8))"),
    Row("h-mod-g", "h % g != 0", call(q=q_(2, 3, 5, 8)), ValueError,
        "expected query heads `h` to be a multiple of key/value heads `g` (h % g == 0), got h=3, g=2 "
        "(q (2, 3, 5, 8), k (2, 2, 6, 8), v (2, 2, 6, 8)); hint: grouped-query attention needs h = g * r"),
    Row("g-zero", "no key/value heads (g = 0)", call(k=kv_(2, 0, 6, 8), v=kv_(2, 0, 6, 8)), ValueError,
        "expected query heads `h` to be a multiple of key/value heads `g` (h % g == 0), got h=4, g=0 "
        "(q (2, 4, 5, 8), k (2, 0, 6, 8), v (2, 0, 6, 8)); hint: grouped-query attention needs h = g * r"),
    Row("b-zero", "empty batch (b = 0); also h, d or e = 0",
        call(q=q_(0, 4, 5, 8), k=kv_(0, 2, 6, 8), v=kv_(0, 2, 6, 8)), ValueError,
        "expected non-zero b, h, d and e, got q (0, 4, 5, 8), k (0, 2, 6, 8), v (0, 2, 6, 8)"),
    # --- masks --------------------------------------------------------------------------------------
    Row("mask-float", "float tensor passed as `mask`", call(mask=mask_(2, 6, dtype=torch.float32)), TypeError,
        "expected `mask` of dtype bool (True = may attend), got float32; hint: pass additive float masks as `bias=` instead"),
    Row("mask-int", "integer mask (0/1 as int64)", call(mask=mask_(2, 6, dtype=torch.int64)), TypeError,
        "expected `mask` of dtype bool (True = may attend), got int64; hint: convert it with `mask.bool()` (True = may attend)"),
    Row("mask-uint8", "uint8 mask (old PyTorch style)", call(mask=mask_(2, 6, dtype=torch.uint8)), TypeError,
        "expected `mask` of dtype bool (True = may attend), got uint8; hint: convert it with `mask.bool()` (True = may attend)"),
    Row("mask-2d", "2-D mask that is not key padding (b, j)", call(mask=mask_(5, 6)), ValueError,
        "expected a 2-D `mask` to be a key padding mask (b, j) = (2, 6), got shape (5, 6) "
        f"({SHAPES}); hint: for an (i, j) mask pass `mask[None, None]`"),
    Row("mask-2d-length", "key padding mask (b, j) of the wrong length", call(mask=mask_(2, 5)), ValueError,
        "expected a 2-D `mask` to be a key padding mask (b, j) = (2, 6), got shape (2, 5) "
        f"({SHAPES}); hint: it looks like a key padding mask of the wrong length: j = 6 keys, got 5; "
        "give it one entry per key of k (True = may attend)"),
    Row("mask-1d", "1-D mask that does not broadcast to j", call(mask=mask_(5)), ValueError,
        "expected `mask` broadcastable to (b, h, i, j) = (2, 4, 5, 6), got shape (5) (dim `j` is 5, must be 1 or 6); "
        "hint: True = may attend, one entry per (b, h, i, j)"),
    Row("mask-3d", "3-D mask that does not broadcast (read right-aligned: h, i, j)", call(mask=mask_(2, 5, 6)), ValueError,
        "expected `mask` broadcastable to (b, h, i, j) = (2, 4, 5, 6), got shape (2, 5, 6) (dim `h` is 2, must be 1 or 4); "
        "hint: True = may attend, one entry per (b, h, i, j)"),
    Row("mask-4d", "4-D mask with the wrong query length", call(mask=mask_(2, 1, 4, 6)), ValueError,
        "expected `mask` broadcastable to (b, h, i, j) = (2, 4, 5, 6), got shape (2, 1, 4, 6) (dim `i` is 4, must be 1 or 5); "
        "hint: True = may attend, one entry per (b, h, i, j)"),
    Row("mask-5d", "mask with more than 4 dims", call(mask=mask_(1, 2, 4, 5, 6)), ValueError,
        "expected `mask` with at most 4 dims, broadcastable to (b, h, i, j) = (2, 4, 5, 6), got 5-D shape (1, 2, 4, 5, 6)"),
    Row("mask-requires-grad", "mask that requires grad: a bool tensor cannot (torch refuses in "
        "`requires_grad_`, before attend sees it); a float one is not a mask (row mask-float). Learnable "
        "masks go in `bias=`", lambda: mask_(2, 6).requires_grad_(), RuntimeError,
        "only Tensors of floating point dtype can require gradients"),
    # --- bias ---------------------------------------------------------------------------------------
    Row("bias-bool", "bool tensor passed as `bias`", call(bias=mask_(5, 6)), TypeError,
        "expected `bias` of a floating dtype (added to the logits), got bool; hint: boolean masks go in `mask=`"),
    Row("bias-int", "integer bias", call(bias=mask_(5, 6, dtype=torch.int32)), TypeError,
        "expected `bias` of a floating dtype (added to the logits), got int32; hint: boolean masks go in `mask=`"),
    Row("bias-shape", "bias that does not broadcast", call(bias=torch.randn(4, 6, 6)), ValueError,
        "expected `bias` broadcastable to (b, h, i, j) = (2, 4, 5, 6), got shape (4, 6, 6) (dim `i` is 6, must be 1 or 5); "
        "hint: one additive logit per (b, h, i, j)"),
    Row("bias-5d", "bias with more than 4 dims", call(bias=torch.randn(1, 2, 4, 5, 6)), ValueError,
        "expected `bias` with at most 4 dims, broadcastable to (b, h, i, j) = (2, 4, 5, 6), got 5-D shape (1, 2, 4, 5, 6)"),
    Row("bias-dtype", "bias in another float dtype than q (float64 bias, float32 q)",
        call(bias=torch.randn(5, 6, dtype=torch.float64)), None,
        "works: the bias is added at the softmax's precision (float32; float64 for float64 q) on every backend; "
        "a kernel that takes it only in q's dtype gets it saturated to that dtype's range, +-inf kept"),
    Row("bias-requires-grad", "bias that requires grad (learned relative position bias, ALiBi slopes)",
        call(bias=torch.randn(4, 5, 6, requires_grad=True)), None,
        "works on every backend declaring `bias_grad` (gradient checked against the reference); "
        "auto skips the others, and naming one raises (row bias-grad-named)"),
    Row("bias-grad-named", "bias that requires grad, on a named backend without bias gradients",
        call(bias=torch.randn(4, 5, 6, requires_grad=True), backend="sdpa:flash"), ValueError,
        "backend='sdpa:flash' cannot run these inputs:"),
    # --- dtypes and devices -------------------------------------------------------------------------
    Row("dtype-mix", "q, k, v of different dtypes", call(q=q_(dtype=torch.float64)), TypeError,
        "expected q, k, v of one dtype, got q float64, k float32, v float32; hint: cast them to one dtype, "
        "or run under `torch.autocast`"),
    Row("device-mix", "q, k, v on different devices (simulated with `meta`)", call(q=q_().to("meta")), ValueError,
        "expected q, k, v on one device, got q on meta, k on cpu, v on cpu; hint: move them with `.to(q.device)`"),
    Row("mask-device", "mask on another device than q", call(mask=mask_(2, 6).to("meta")), ValueError,
        "expected `mask` on cpu like q, got meta"),
    Row("bias-device", "bias on another device than q", call(bias=torch.randn(5, 6, device="meta")), ValueError,
        "expected `bias` on cpu like q, got meta"),
    Row("device-none", "a device no backend supports (all on `meta`)",
        call(q=q_().to("meta"), k=kv_().to("meta"), v=kv_().to("meta")), NoBackendError,
        "No attention backend can run these inputs:"),
    # --- tensor kinds -------------------------------------------------------------------------------
    Row("q-int", "integer q, k, v", call(q=q_().long(), k=kv_().long(), v=kv_().long()), TypeError,
        f"expected `q` of a floating dtype {FLOAT}, got integer or bool dtype int64; hint: `q.float()`"),
    Row("q-bool", "bool q", call(q=q_() > 0), TypeError,
        f"expected `q` of a floating dtype {FLOAT}, got integer or bool dtype bool; hint: `q.float()`"),
    Row("q-complex", "complex q", call(q=q_().to(torch.complex64)), TypeError,
        f"expected `q` of a floating dtype {FLOAT}, got complex dtype complex64; hint: `q.float()`"),
    Row("q-fp8", "float8 q (no backend here takes fp8)", call(q=q_().to(torch.float8_e4m3fn)), TypeError,
        f"expected `q` of a floating dtype {FLOAT}, got unsupported float dtype float8_e4m3fn; hint: `q.float()`"),
    Row("q-sparse", "sparse q", call(q=q_().to_sparse()), TypeError,
        "expected `q` to be a dense (strided) tensor, got layout torch.sparse_coo; hint: call `q.to_dense()` first"),
    Row("q-nested", "nested (jagged) q",
        call(q=torch.nested.nested_tensor([torch.randn(5, 4, 8), torch.randn(3, 4, 8)], layout=torch.jagged)), TypeError,
        "expected `q` to be a dense (strided) tensor, got layout torch.jagged; hint: call `q.to_dense()` first"),
    Row("q-list", "q that is not a tensor", call(q=[[1.0]]), TypeError,
        "expected `q` to be a torch.Tensor, got list [[1.0]]"),
    # --- scalars ------------------------------------------------------------------------------------
    Row("dropout-one", "dropout_p = 1", call(dropout_p=1.0), ValueError, "expected `dropout_p` in [0, 1), got 1.0"),
    Row("dropout-negative", "dropout_p < 0", call(dropout_p=-0.1), ValueError, "expected `dropout_p` in [0, 1), got -0.1"),
    Row("dropout-nan", "dropout_p = NaN", call(dropout_p=float("nan")), ValueError, "expected `dropout_p` in [0, 1), got nan"),
    Row("dropout-str", "dropout_p not a number", call(dropout_p="0.1"), TypeError,
        "expected `dropout_p` to be a Python float in [0, 1), got str '0.1'"),
    Row("scale-nan", "scale = NaN", call(scale=float("nan")), ValueError,
        "expected a finite `scale`, got nan; hint: leave it None for d ** -0.5 = 0.353553"),
    Row("scale-inf", "scale = inf (or -inf)", call(scale=float("inf")), ValueError,
        "expected a finite `scale`, got inf; hint: leave it None for d ** -0.5 = 0.353553"),
    Row("scale-tensor", "scale given as a tensor", call(scale=torch.tensor(0.5)), TypeError,
        "expected `scale` to be a Python float, got a 0-D tensor of shape (), dtype float32"),
    Row("causal-type", "causal not a bool", call(causal="yes"), TypeError, "expected `causal` to be a bool, got str 'yes'"),
    Row("scale-list", "scale given as a list", call(scale=[0.5]), TypeError,
        "expected `scale` to be a Python float, got list [0.5]"),
    Row("causal-int", "causal an int other than 0 or 1", call(causal=2), TypeError, "expected `causal` to be a bool, got int 2"),
    Row("deterministic-type", "deterministic not a bool", call(deterministic=None), TypeError,
        "expected `deterministic` to be a bool, got NoneType None"),
    Row("check-finite-type", "check_finite not a bool", call(check_finite="no"), TypeError,
        "expected `check_finite` to be a bool or None, got str 'no'"),
    # --- window, documents, score ------------------------------------------------------------------
    Row("window-int", "window not a pair", call(window=4), TypeError,
        "expected `window` to be a pair (left, right) of ints >= 0 or None, got int 4; "
        "hint: window=(128, 0) lets each query see itself and the 128 keys before it"),
    Row("window-negative", "window side < 0 (flash-attn's -1 = unbounded is None here)", call(window=(-1, 0)),
        ValueError, "expected `window` left to be an int >= 0 or None (unbounded), got -1 in window=(-1, 0)"),
    Row("score-unknown", "unknown score", call(score="cosine"), ValueError,
        "expected `score` to be 'dot' (q . k) or 'l2' (-|q - k|^2, GigaGAN's), got str 'cosine'"),
    Row("documents-float", "documents of a float dtype", call(q=q_(2, 4, 6, 8), documents=torch.zeros(2, 6)),
        TypeError, "expected `documents` of an integer dtype (document ids), got float32; hint: `.long()`"),
    Row("documents-shape", "documents not (b, j)", call(q=q_(2, 4, 6, 8), documents=torch.zeros(6, dtype=torch.long)),
        ValueError, "expected `documents` of shape (b, j) = (2, 6) (or (1, j)), got shape (6)"),
    Row("documents-i-ne-j", "one documents tensor when i != j", call(documents=torch.zeros(2, 6, dtype=torch.long)),
        ValueError, "expected a pair (q_docs (b, i), k_docs (b, j)) for `documents` when i != j, got one tensor of "
        "shape (2, 6) with i=5, j=6; hint: documents=(q_docs, k_docs)"),
    Row("module-window", "Attend(window=...) not a pair (fails at construction)", lambda: Attend(window=3), TypeError,
        "expected `window` to be a pair (left, right) of ints >= 0 or None, got int 3; "
        "hint: window=(128, 0) lets each query see itself and the 128 keys before it"),
    # --- empty sequences ----------------------------------------------------------------------------
    Row("i-zero", "no queries (i = 0)", call(q=q_(2, 4, 0, 8)), None, "works: an empty (b, h, 0, e) output"),
    Row("j-zero", "no keys (j = 0)", call(k=kv_(2, 2, 0, 8), v=kv_(2, 2, 0, 8)), None,
        "works: zeros (b, h, i, e), as \"no key to attend\" (contract item 2), with zero gradients"),
    # --- views --------------------------------------------------------------------------------------
    Row("view-transposed", "transposed views (last dim not unit-stride), e.g. `x.transpose(-1, -2)`",
        call(q=q_(2, 4, 8, 5).transpose(-1, -2), v=kv_(2, 6, 2, 8).transpose(1, 2)), None,
        "works on every backend, matching the reference (copied once in `validate`: fused kernels need stride 1)"),
    Row("view-expanded", "expanded (stride-0) k, v and mask", call(k=kv_(1, 2, 6, 8).expand(2, 2, 6, 8),
        v=kv_(1, 1, 6, 8).expand(2, 2, 6, 8), mask=mask_(6).expand(2, 4, 5, 6)), None,
        "works on every backend, matching the reference (no copy)"),
    Row("view-sliced", "non-contiguous slices, e.g. every other query", call(q=q_(2, 4, 10, 8)[:, :, ::2]), None,
        "works on every backend, matching the reference"),
    # --- backend names ------------------------------------------------------------------------------
    Row("backend-unknown", "unknown backend name", call(backend="flash"), ValueError,
        "expected a backend name among: {names}; got 'flash'"),
    Row("backend-type", "backend that is not a string", call(backend=3), ValueError,
        "expected a backend name among: {names}; got 3"),
    Row("backend-cannot", "a named backend that cannot run the inputs (sdpa:flash has no dropout on CPU)",
        call(dropout_p=0.1, backend="sdpa:flash"), ValueError, "backend='sdpa:flash' cannot run these inputs:"),
    Row("module-backend", "Attend with an unknown backend (fails at construction)", lambda: Attend(backend="nope"),
        ValueError, "expected a backend name among: {names}; got 'nope'"),
    Row("module-dropout", "Attend(dropout=1.0)", lambda: Attend(dropout=1.0), ValueError, "expected `dropout` in [0, 1), got 1.0"),
    Row("module-flash", "Attend(flash=...) not a bool or None", lambda: Attend(flash="yes"), TypeError,
        "expected `flash` to be True, False or None, got 'yes'"),
    Row("module-flash-false-backend", "Attend(flash=False) with another backend than einsum",
        lambda: Attend(flash=False, backend="sdpa:flash"), ValueError,
        "expected either flash=False (the einsum backend) or backend=..., got flash=False and backend='sdpa:flash'; "
        "hint: drop `flash` when you name a backend"),
    Row("module-flash-true-backend", "Attend(flash=True) with a backend that is not a fused kernel",
        lambda: Attend(flash=True, backend="einsum"), ValueError,
        "expected a fused backend with flash=True, got backend='einsum' (not a fused kernel); "
        "hint: drop `flash` when you name a backend"),
    Row("module-deterministic", "Attend(deterministic=...) not a bool", lambda: Attend(deterministic=1), TypeError,
        "expected `deterministic` to be True or False, got 1"),
    Row("module-check-finite", "Attend(check_finite=...) not a bool", lambda: Attend(check_finite=0), TypeError,
        "expected `check_finite` to be True, False or None, got 0"),
]  # fmt: skip

def _expected(row: Row) -> str:
    # backend names come from the registry, so a newly merged backend does not break this table
    return row.message.replace("{names}", ", ".join(list_backends()))


def _esc(text: str) -> str:
    return text.replace("|", "\\|")


def render() -> str:
    """docs/errors.md, from `ROWS`."""
    lines = [
        "# Bad inputs and what they get",
        "",
        "Every class of bad (or awkward) input and the exact error `attend` raises for it, checked before any",
        "kernel runs. Never an `AssertionError`, never a raw error from deep inside torch. The table is",
        "generated from `tests/test_errors.py::ROWS`, which also tests every row (one test per row), so the",
        "two cannot drift: regenerate with `PYTHONPATH=src python -m tests.test_errors > docs/errors.md`.",
        "",
        "Shapes in the examples: q `(2, 4, 5, 8)`, k and v `(2, 2, 6, 8)`: b=2, h=4, g=2, i=5, j=6, d=e=8.",
        "Multi-line messages (the named-backend and no-backend errors) show their first line; the rest lists",
        "each backend's reasons, then the `attend explain ...` command that reproduces the inputs.",
        "`{names}` stands for the registered backend names, in registration order.",
        "",
        "| id | input | error | message, or what it gives |",
        "|---|---|---|---|",
    ]
    for row in ROWS:
        error = f"`{row.error.__name__}`" if row.error else "works"
        message = f"`` {_esc(row.message)} ``" if row.error else _esc(row.message)  # spaces: messages may end in a backtick
        lines.append(f"| {row.id} | {_esc(row.what)} | {error} | {message} |")
    lines += [
        "",
        "## Notes",
        "",
        "* A backend that fails *at run time* in auto mode (kernel error, out of memory) is retried on the next",
        "  eligible one with one `attend.AttendFallbackWarning`; a named backend re-raises as",
        "  `RuntimeError(\"backend 'name' failed: ...\")` (see `docs/reliability.md`).",
        "* `NoBackendError` is a `RuntimeError`: the inputs are valid, but nothing registered runs them here.",
        "* A 2-D mask is always a key padding mask `(b, j)`; when `b == i` an `(i, j)` mask would be",
        "  silently read as key padding, so pass `(i, j)` masks as `mask[None, None]`.",
        "",
    ]
    return "\n".join(lines)


# tests


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_catalogue_row(row: Row):
    if row.error is not None:
        with pytest.raises(Exception) as info:
            row.make()
        err = info.value
        assert type(err) is row.error, f"{row.id}: expected {row.error.__name__}, got {type(err).__name__}: {err}"
        assert not isinstance(err, AssertionError)
        assert str(err).splitlines()[0] == _expected(row)
        return
    out = row.make()
    assert isinstance(out, torch.Tensor)
    assert torch.isfinite(out).all()


def test_docs_match_catalogue():
    assert DOC.exists(), "docs/errors.md is missing; generate it with `python -m tests.test_errors`"
    assert DOC.read_text() == render() + "\n", "docs/errors.md drifted from ROWS; regenerate it"


def test_every_error_row_is_user_facing():
    """Our own rows raise ValueError/TypeError (NoBackendError for an unsupported device); the only other
    type is torch's own refusal to make a bool tensor require grad, which happens before attend runs."""
    for row in ROWS:
        assert row.error in (None, ValueError, TypeError, NoBackendError) or row.id == "mask-requires-grad"


# the rows that must work, checked in depth on every backend


def _views():
    gen = torch.Generator().manual_seed(0)
    base_q = torch.randn(2, 4, 8, 10, generator=gen)
    q = base_q.transpose(-1, -2)[:, :, ::2]  # (2, 4, 5, 8): transposed and sliced
    k = torch.randn(1, 2, 6, 8, generator=gen).expand(2, 2, 6, 8)  # stride 0 in b
    v = torch.randn(2, 6, 2, 8, generator=gen).transpose(1, 2)  # (b, j, g, e) -> (b, g, j, e)
    mask = (torch.rand(6, generator=gen) > 0.3).expand(2, 4, 5, 6)
    return q, k, v, mask


@pytest.mark.parametrize("name", CPU_BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
def test_views_work_on_every_backend(name, causal):
    q, k, v, mask = _views()
    inp = validate(q.detach().requires_grad_(), k, v, mask=mask, causal=causal)
    skip_unless_runs(name, inp)
    from attend.testing import check_backend

    check_backend(name, q, k, v, mask=mask, causal=causal)
    # and through the public path, with gradients reaching the original (non-contiguous) leaves
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = attention(*leaves, mask=mask, causal=causal, backend=name)
    ref = attention(*(t.double() for t in (q, k, v)), mask=mask, causal=causal, backend="einsum")
    torch.testing.assert_close(out.double(), ref, **tolerance(out.dtype))
    out.sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in leaves)


@pytest.mark.parametrize("name", list_backends())
def test_bias_requires_grad(name):
    q, k, v = q_(), kv_(), kv_()
    bias = torch.randn(4, 5, 6, requires_grad=True)
    inp = validate(q.requires_grad_(), k, v, bias=bias)
    reasons = get_backend(name).reasons_unsupported(inp)
    if not get_backend(name).caps_for(q.device) or not get_backend(name).caps_for(q.device).bias_grad:
        assert reasons, f"{name} declares no bias gradient but does not exclude the case"
        if get_backend(name).caps_for(q.device):
            assert "bias requires grad; this backend gives no gradient for bias" in reasons
        return
    from attend.testing import check_backend

    checks = check_backend(name, q, k, v, bias=bias)
    assert checks[-1].name == "dbias"


def test_auto_with_bias_grad_picks_a_bias_grad_backend():
    bias = torch.randn(4, 5, 6, requires_grad=True)
    report = attend.explain(q_().requires_grad_(), kv_(), kv_(), bias=bias)
    assert get_backend(report.backend).caps_for(torch.device("cpu")).bias_grad
    for name, reasons in report.reasons.items():
        caps = get_backend(name).caps_for(torch.device("cpu"))
        if caps is not None and not caps.bias_grad:
            assert "bias requires grad; this backend gives no gradient for bias" in reasons


@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_empty_sequences(name):
    """i = 0: empty output; j = 0: zeros with zero gradients, on every backend (short-circuited before
    any kernel, so no backend sees an empty tensor)."""
    q = q_(2, 4, 0, 8)
    skip_unless_runs(name, validate(q, kv_(), kv_()))
    out = attention(q, kv_(), kv_(), backend=name, causal=True)
    assert out.shape == (2, 4, 0, 8)
    q, k, v = q_().requires_grad_(), kv_(2, 2, 0, 8).requires_grad_(), kv_(2, 2, 0, 8).requires_grad_()
    out = attention(q, k, v, backend=name, mask=mask_(2, 0))
    assert out.shape == (2, 4, 5, 8) and (out == 0).all()
    out.sum().backward()
    assert (q.grad == 0).all() and k.grad.shape == k.shape


if __name__ == "__main__":
    print(render())
