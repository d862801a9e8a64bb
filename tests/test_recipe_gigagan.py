"""The gigagan-pytorch recipe in docs/recipes.md: `SelfAttention` (negative squared L2 distance scores, one
projection shared by queries and keys, a learned null key/value) and `TextAttention` (dot-product scores, a
null key/value, a key padding mask) written with `attend`, against a re-implementation of gigagan's own
einsum formulation.

Source: https://github.com/lucidrains/gigagan-pytorch/blob/0806433f1e8eadbe888162b5c5a5ab625ce4e0a5/gigagan_pytorch/gigagan_pytorch.py
(`SelfAttention` lines 513-594, `TextAttention` 659-722, `ChannelRMSNorm` / `RMSNorm` 224-242).

The classes between the RECIPE markers are the code block of the recipe, character for character
(`test_recipe_code_is_the_doc_block`). The `Reference*` classes keep gigagan's math as written: heads folded
into the batch, `(b h) i j` scores by einsum, the L2 distance as |q|^2 + |k|^2 - 2 q.k, masking by
`masked_fill(-finfo.max)`. Both load the same state dict (gigagan's parameter names).
"""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

import attend
from attend import Attend
from attend.testing import tolerance

from .helpers import CPU_BACKENDS

RECIPES = Path(__file__).resolve().parent.parent / "docs" / "recipes.md"
HEADING = "## GigaGAN's L2-distance self-attention and text attention"

# ----------------------------------------------------------------------------------------------------------
# RECIPE: the classes below appear verbatim in docs/recipes.md


class ChannelRMSNorm(nn.Module):  # gigagan's: (b, c, x, y), normalised over c
    def __init__(self, dim):
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1))

    def forward(self, x):
        return F.normalize(x, dim=1) * self.scale * self.gamma


class RMSNorm(nn.Module):  # gigagan's: (..., c), normalised over c
    def __init__(self, dim):
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.normalize(x, dim=-1) * self.scale * self.gamma


class SelfAttention(nn.Module):
    """(b, c, x, y) -> (b, c, x, y): every pixel attends every pixel and a learned null key/value.
    Default: scores -|q - k|^2 * dim_head ** -0.5 with keys = queries (one projection, `to_q`);
    dot_product=True: a separate `to_k` and q . k scores, as gigagan's Generator uses by default."""

    def __init__(self, dim, dim_head=64, heads=8, dot_product=False):
        super().__init__()
        self.heads = heads
        dim_inner = dim_head * heads
        self.norm = ChannelRMSNorm(dim)
        self.to_q = nn.Conv2d(dim, dim_inner, 1, bias=False)
        self.to_k = nn.Conv2d(dim, dim_inner, 1, bias=False) if dot_product else None
        self.to_v = nn.Conv2d(dim, dim_inner, 1, bias=False)
        self.null_kv = nn.Parameter(torch.randn(2, heads, dim_head))
        self.attend = Attend(score="dot" if dot_product else "l2")  # default scale: dim_head ** -0.5
        self.to_out = nn.Conv2d(dim_inner, dim, 1, bias=False)

    def forward(self, fmap):
        x, y = fmap.shape[-2:]
        fmap = self.norm(fmap)
        q, v = self.to_q(fmap), self.to_v(fmap)
        k = q if self.to_k is None else self.to_k(fmap)  # L2: a shared query / key space
        q, k, v = (rearrange(t, "b (h d) x y -> b h (x y) d", h=self.heads) for t in (q, k, v))
        nk, nv = (repeat(t, "h d -> b h 1 d", b=fmap.shape[0]) for t in self.null_kv)
        k, v = torch.cat((nk, k), dim=2), torch.cat((nv, v), dim=2)  # the null key/value comes first
        out = self.attend(q, k, v)
        return self.to_out(rearrange(out, "b h (x y) d -> b (h d) x y", x=x, y=y))


class TextAttention(nn.Module):
    """(b, n, dim) tokens -> (b, n, dim): q . k scores (not L2), a learned null key/value, and an optional
    (b, n) bool key padding mask, True = real token."""

    def __init__(self, dim, dim_head=64, heads=8):
        super().__init__()
        self.heads = heads
        dim_inner = dim_head * heads
        self.norm = RMSNorm(dim)
        self.to_qkv = nn.Linear(dim, dim_inner * 3, bias=False)
        self.null_kv = nn.Parameter(torch.randn(2, heads, dim_head))
        self.attend = Attend()
        self.to_out = nn.Linear(dim_inner, dim, bias=False)

    def forward(self, encodings, mask=None):
        encodings = self.norm(encodings)
        qkv = self.to_qkv(encodings).chunk(3, dim=-1)
        q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=self.heads) for t in qkv)
        nk, nv = (repeat(t, "h d -> b h 1 d", b=encodings.shape[0]) for t in self.null_kv)
        k, v = torch.cat((nk, k), dim=2), torch.cat((nv, v), dim=2)
        if mask is not None:
            mask = F.pad(mask, (1, 0), value=True)  # the null key is always visible
        out = self.attend(q, k, v, mask=mask)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


# END RECIPE
# ----------------------------------------------------------------------------------------------------------

RECIPE_CLASSES = (ChannelRMSNorm, RMSNorm, SelfAttention, TextAttention)


# gigagan's formulation, re-implemented: same parameters and names, heads folded into the batch, einsum scores


class ReferenceChannelRMSNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1))

    def forward(self, x):
        return x / x.norm(dim=1, keepdim=True).clamp(min=1e-12) * self.scale * self.gamma


class ReferenceRMSNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x / x.norm(dim=-1, keepdim=True).clamp(min=1e-12) * self.scale * self.gamma


class ReferenceSelfAttention(nn.Module):
    def __init__(self, dim, dim_head=64, heads=8, dot_product=False):
        super().__init__()
        self.heads, self.scale, self.dot_product = heads, dim_head**-0.5, dot_product
        dim_inner = dim_head * heads
        self.norm = ReferenceChannelRMSNorm(dim)
        self.to_q = nn.Conv2d(dim, dim_inner, 1, bias=False)
        self.to_k = nn.Conv2d(dim, dim_inner, 1, bias=False) if dot_product else None
        self.to_v = nn.Conv2d(dim, dim_inner, 1, bias=False)
        self.null_kv = nn.Parameter(torch.randn(2, heads, dim_head))
        self.to_out = nn.Conv2d(dim_inner, dim, 1, bias=False)

    def forward(self, fmap):
        batch, (x, y) = fmap.shape[0], fmap.shape[-2:]
        fmap = self.norm(fmap)
        q, v = self.to_q(fmap), self.to_v(fmap)
        k = q if self.to_k is None else self.to_k(fmap)
        q, k, v = (rearrange(t, "b (h d) x y -> (b h) (x y) d", h=self.heads) for t in (q, k, v))
        nk, nv = (repeat(t, "h d -> (b h) 1 d", b=batch) for t in self.null_kv)
        k, v = torch.cat((nk, k), dim=-2), torch.cat((nv, v), dim=-2)
        if self.dot_product:
            sim = torch.einsum("b i d, b j d -> b i j", q, k)
        else:
            q2 = (q * q).sum(dim=-1)[:, :, None]
            k2 = (k * k).sum(dim=-1)[:, None, :]
            sim = -(q2 + k2 - 2 * torch.einsum("b i d, b j d -> b i j", q, k))
        attn = (sim * self.scale).softmax(dim=-1)
        out = torch.einsum("b i j, b j d -> b i d", attn, v)
        return self.to_out(rearrange(out, "(b h) (x y) d -> b (h d) x y", h=self.heads, x=x, y=y))


class ReferenceTextAttention(nn.Module):
    def __init__(self, dim, dim_head=64, heads=8):
        super().__init__()
        self.heads, self.scale = heads, dim_head**-0.5
        dim_inner = dim_head * heads
        self.norm = ReferenceRMSNorm(dim)
        self.to_qkv = nn.Linear(dim, dim_inner * 3, bias=False)
        self.null_kv = nn.Parameter(torch.randn(2, heads, dim_head))
        self.to_out = nn.Linear(dim_inner, dim, bias=False)

    def forward(self, encodings, mask=None):
        batch, h = encodings.shape[0], self.heads
        encodings = self.norm(encodings)
        q, k, v = (rearrange(t, "b n (h d) -> (b h) n d", h=h) for t in self.to_qkv(encodings).chunk(3, dim=-1))
        nk, nv = (repeat(t, "h d -> (b h) 1 d", b=batch) for t in self.null_kv)
        k, v = torch.cat((nk, k), dim=-2), torch.cat((nv, v), dim=-2)
        sim = torch.einsum("b i d, b j d -> b i j", q, k) * self.scale
        if mask is not None:
            mask = repeat(F.pad(mask, (1, 0), value=True), "b n -> (b h) 1 n", h=h)
            sim = sim.masked_fill(~mask, -torch.finfo(sim.dtype).max)
        out = torch.einsum("b i j, b j d -> b i d", sim.softmax(dim=-1), v)
        return self.to_out(rearrange(out, "(b h) n d -> b n (h d)", h=h))


# helpers

BACKENDS = [None, *CPU_BACKENDS]  # None: auto, the recipe as written
DTYPES = [torch.float64, torch.float32]
DIM, DIM_HEAD, HEADS = 24, 8, 3


def _pair(ours_cls, ref_cls, dtype, backend, **kwargs):
    """The reference in float64 with random (not default) parameters, and the attend version in `dtype` holding the
    same values."""
    ref = ref_cls(DIM, dim_head=DIM_HEAD, heads=HEADS, **kwargs).double()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name == "norm.gamma":
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif name == "null_kv":
                p.copy_(torch.randn_like(p))
            else:  # projections: q, k of size ~1 per entry, so the L2 scores spread over a few units
                p.copy_(torch.randn_like(p) * p[0].numel() ** -0.5)
    ours = ours_cls(DIM, dim_head=DIM_HEAD, heads=HEADS, **kwargs).to(dtype)
    ours.load_state_dict(ref.state_dict())  # strict: gigagan's parameter names, nothing more, nothing less
    if backend is not None:
        _pin(ours, backend)
    return ours, ref


def _pin(model, backend):
    """Run `model.attend` on one named backend; skip (with that backend's own reasons) where it cannot run."""
    model.attend = Attend(score=model.attend.score, backend=backend)

    def hook(module, args, kwargs):
        reasons = module.explain(*args, **kwargs).reasons[backend]
        if reasons:
            pytest.skip(f"{backend}: {'; '.join(reasons)}")

    model.attend.register_forward_pre_hook(hook, with_kwargs=True)


def _run(model, inputs, cotangent):
    """Output, and the gradients of <output, cotangent> w.r.t. the float inputs and every parameter."""
    inputs = [t.detach().requires_grad_(t.is_floating_point()) if t is not None else None for t in inputs]
    out = model(*inputs)
    wrt = [t for t in inputs if t is not None and t.requires_grad] + list(model.parameters())
    grads = torch.autograd.grad((out * cotangent).sum(), wrt)
    names = [f"input{n}" for n, t in enumerate(inputs) if t is not None and t.requires_grad]
    names += [n for n, _ in model.named_parameters()]
    return out, dict(zip(names, grads))


def _close(actual, golden, dtype, what):
    """float64: 1e-10. float32: `tolerance(float32)` with its atol scaled by max(1, max|golden|), as
    `assert_matches_reference` scales its floor: a parameter's gradient sums over every pixel and head, and
    with score='l2' the lowered scores carry |k|^2 / 2 (a few units), so float32 rounding is relative to the
    tensor's size, not to each (possibly tiny) element."""
    if dtype == torch.float64:
        tol = {"atol": 1e-10, "rtol": 1e-10}
    else:
        tol = tolerance(dtype)
        tol["atol"] *= max(1.0, golden.abs().max().item())
    torch.testing.assert_close(actual.double(), golden, **tol, msg=lambda m: f"{what}: {m}")


def _assert_same(ours, ref, inputs, dtype):
    """ours in `dtype` against the reference in float64 (the golden): output and every gradient."""
    inputs64 = [t.double() if t is not None and t.is_floating_point() else t for t in inputs]
    cot = torch.randn(ref(*inputs64).shape, dtype=torch.float64)
    golden, golden_grads = _run(ref, inputs64, cot)
    cast = [t.to(dtype) if t is not None and t.is_floating_point() else t for t in inputs]
    out, grads = _run(ours, cast, cot.to(dtype))
    _close(out, golden, dtype, "output")
    assert grads.keys() == golden_grads.keys()
    for name, g in grads.items():
        _close(g, golden_grads[name], dtype, f"d{name}")


# tests


def test_recipe_code_is_the_doc_block():
    """The recipe's classes are, character for character, the ones this file tests, and the block defines no
    others: the doc and the tests cannot drift apart."""
    text = RECIPES.read_text()
    assert HEADING in text, f"docs/recipes.md lost its section {HEADING!r}"
    section = text[text.index(HEADING) :]
    block = re.search(r"^```python\n(.*?)^```", section, re.S | re.M)
    assert block is not None
    code = block.group(1)
    for cls in RECIPE_CLASSES:
        assert inspect.getsource(cls) in code, f"class {cls.__name__} differs between this file and the recipe"
    defined = {node.name for node in ast.parse(code).body if isinstance(node, ast.ClassDef)}
    assert defined == {cls.__name__ for cls in RECIPE_CLASSES}, f"the recipe defines {sorted(defined)}"
    # the table of contents links the section
    slug = re.sub(r"[^a-z0-9 _-]", "", HEADING[3:].lower()).replace(" ", "-")  # GitHub's anchors
    assert f"](#{slug})" in text, f"no table-of-contents link to #{slug}"


@pytest.mark.parametrize("dot_product", [False, True], ids=["l2-shared-qk", "dot"])
@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b or "auto")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_self_attention_matches_gigagan(dtype, backend, dot_product):
    ours, ref = _pair(SelfAttention, ReferenceSelfAttention, dtype, backend, dot_product=dot_product)
    fmap = torch.randn(2, DIM, 5, 3, dtype=torch.float64)  # 15 pixels + the null key: 16 keys
    _assert_same(ours, ref, [fmap], dtype)


@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "padded"])
@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b or "auto")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_text_attention_matches_gigagan(dtype, backend, masked):
    ours, ref = _pair(TextAttention, ReferenceTextAttention, dtype, backend)
    tokens = torch.randn(3, 7, DIM, dtype=torch.float64)
    mask = None
    if masked:
        mask = torch.ones(3, 7, dtype=torch.bool)
        mask[1, 4:] = False  # 4 real tokens
        mask[2, :] = False  # no real token: every row attends the null key alone
    _assert_same(ours, ref, [tokens, mask], dtype)


def test_text_padding_never_reaches_real_tokens():
    ours, _ = _pair(TextAttention, ReferenceTextAttention, torch.float64, None)
    tokens = torch.randn(2, 7, DIM, dtype=torch.float64)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 4:] = False
    garbage = tokens.clone()
    garbage[1, 4:] = torch.randn(3, DIM, dtype=torch.float64) * 100
    torch.testing.assert_close(ours(garbage, mask)[:, :4], ours(tokens, mask)[:, :4], atol=1e-12, rtol=0)
    torch.testing.assert_close(ours(garbage, mask)[0], ours(tokens, mask)[0], atol=1e-12, rtol=0)


def test_l2_is_not_the_dot_product():
    """The comparison above is not vacuous: the same weights with q . k scores give another output."""
    ours, ref = _pair(SelfAttention, ReferenceSelfAttention, torch.float64, None)
    fmap = torch.randn(2, DIM, 5, 3, dtype=torch.float64)
    l2 = ours(fmap)
    ours.attend = Attend()
    assert not torch.allclose(ours(fmap), l2, atol=1e-3)
    torch.testing.assert_close(l2, ref(fmap), atol=1e-10, rtol=1e-10)


def test_auto_runs_a_fused_kernel_on_the_lowered_l2():
    """score='l2' needs no dense-score backend: auto picks the same kernel as for a plain dot product with one
    more head dim, and explain says how it lowered the score."""
    ours, _ = _pair(SelfAttention, ReferenceSelfAttention, torch.float32, None)
    b, n, d = 2, 15, DIM_HEAD
    q, k, v = torch.randn(b, HEADS, n, d), torch.randn(b, HEADS, n + 1, d), torch.randn(b, HEADS, n + 1, d)
    report = ours.attend.explain(q, k, v)
    plain = attend.explain(
        torch.randn(b, HEADS, n, d + 1), torch.randn(b, HEADS, n + 1, d + 1), torch.randn(b, HEADS, n + 1, d + 1)
    )
    assert report.backend == plain.backend
    assert any("score='l2' runs as a dot product" in line for line in report.lowering)
