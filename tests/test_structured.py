"""Structured attention: `window`, `documents` and `score="l2"` on every backend, forward and backward,
against the float64 reference, and lowered without a (b, h, i, j) tensor.

Shape legend: b batch, h query heads, g key/value heads, i query positions, j key positions,
d head dim (q and k), e value head dim.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attend.backends.sdpa as sdpa_mod
from attend import Attend, attention, explain
from attend.dispatch import get_backend
from attend.masks import Structure
from attend.testing import check_backend, checkable, tolerance

from .helpers import CPU_BACKENDS, fresh_dynamo, needs, skip_unless_runs  # noqa: F401  (a fixture)

BLOCK = 8  # small query / key blocks, so every lowering skips and masks blocks at these sizes


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """Blocks of 8 queries (sdpa) and 8 x 8 tiles (chunked): the shapes below span many blocks."""
    for name in CPU_BACKENDS:
        impl = get_backend(name)
        if hasattr(impl, "query_block"):
            monkeypatch.setattr(impl, "query_block", BLOCK)
        if name == "chunked":
            monkeypatch.setattr(impl, "q_tile", BLOCK)
            monkeypatch.setattr(impl, "k_tile", BLOCK)


def _ids(lengths: list[int], b: int = 2) -> torch.Tensor:
    """Sorted document ids (b, sum(lengths)); the second row packs the documents in reverse order."""
    rows = [torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))]
    rev = list(reversed(lengths))
    rows.append(torch.repeat_interleave(torch.arange(len(rev)), torch.tensor(rev)))
    return torch.stack(rows[:b])


def _inputs(b=2, h=4, g=2, i=45, j=45, d=16, e=16, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, i, d, generator=gen, dtype=dtype)
    k = torch.randn(b, g, j, d, generator=gen, dtype=dtype)
    v = torch.randn(b, g, j, e, generator=gen, dtype=dtype)
    return q, k, v


LENGTHS = [1, 9, 20, 7, 8]  # 45 tokens: a document of length 1, documents across block edges
CASES = {
    "window": dict(window=(7, 3)),
    "window-left-only": dict(window=(5, None)),
    "window-0": dict(window=(0, 0)),
    "window+causal": dict(window=(6, None), causal=True),
    "docs+causal": dict(documents=_ids(LENGTHS), causal=True),
    "docs": dict(documents=_ids(LENGTHS)),
    "docs-unsorted": dict(documents=torch.arange(45).remainder(3)[None].expand(2, 45)),
    "docs+window": dict(documents=_ids(LENGTHS), window=(4, 4)),
    "l2": dict(score="l2"),
    "l2+docs+causal": dict(score="l2", documents=_ids(LENGTHS), causal=True),
}
EXTRAS = {
    "plain": {},
    "padding": "padding",
    "bias": "bias",
    "gqa-off": "mha",
}


def _extra(kind: str, b: int, h: int, i: int, j: int):
    gen = torch.Generator().manual_seed(1)
    if kind == "padding":
        pad = torch.ones(b, j, dtype=torch.bool)
        pad[1, j - 11 :] = False
        return {"mask": pad}
    if kind == "bias":
        return {"bias": torch.randn(1, h, i, j, generator=gen, dtype=torch.float64).requires_grad_(True)}
    return {}


def _check(name: str, q, k, v, **kw):
    can, reasons = checkable(name, q, k, v, **{x: y for x, y in kw.items() if x in ("mask", "bias", "causal")})
    if reasons:
        pytest.skip(f"{name}: {'; '.join(reasons)}")
    check_backend(name, q, k, v, grad=can, **kw)


@pytest.mark.parametrize("extra", ["plain", "padding", "bias", "mha"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_structure_matches_reference(name, case, extra):
    """Every CPU backend x window / documents / l2 x padding / bias / GQA: outputs and dq, dk, dv (dbias)."""
    g = 4 if extra == "mha" else 2
    q, k, v = _inputs(g=g)
    kw = dict(CASES[case]) | _extra(extra, 2, 4, 45, 45)
    for dtype in (torch.float64, torch.float32):
        cast = [t.to(dtype) for t in (q, k, v)]
        if "bias" in kw:
            kw["bias"] = kw["bias"].detach().to(dtype).requires_grad_(True)
        skip_unless_runs(name, _validated(*cast, **kw))
        _check(name, *cast, **kw)


def _validated(q, k, v, **kw):
    from attend.inputs import validate
    from attend.masks import lower_score

    with torch.enable_grad():
        return lower_score(validate(q.requires_grad_(False), k, v, **kw))[0]


@pytest.mark.parametrize("case", ["window", "window+causal", "docs-pair", "docs-pair+causal", "l2+causal"])
@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_structure_i_ne_j(name, case):
    """i != j: the window and causal are bottom-right aligned; documents come as a pair."""
    q, k, v = _inputs(i=33, j=50, g=4)
    q_docs = _ids([10, 3, 20])
    k_docs = _ids([15, 10, 25])
    kw = {
        "window": dict(window=(6, 2)),
        "window+causal": dict(window=(9, None), causal=True),
        "docs-pair": dict(documents=(q_docs, k_docs)),
        "docs-pair+causal": dict(documents=(q_docs, k_docs), causal=True),
        "l2+causal": dict(score="l2", causal=True),
    }[case]
    _check(name, q, k, v, **kw)


@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_rows_with_no_visible_key_are_zero(name):
    """A query whose document has no key (documents as a pair) and a window that leaves a row nothing
    (i > j, causal): output exactly 0 and finite (zero) gradients (contract item 2)."""
    q, k, v = (t.float().requires_grad_(True) for t in _inputs(i=20, j=20))
    q_docs = torch.tensor([[0] * 10 + [5] * 10] * 2)  # document 5 has no key
    k_docs = torch.tensor([[0] * 10 + [1] * 10] * 2)
    out = attention(q, k, v, documents=(q_docs, k_docs), backend=name)
    assert torch.equal(out[:, :, 10:], torch.zeros_like(out[:, :, 10:]))
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    q2, k2, v2 = _inputs(i=30, j=10, dtype=torch.float32)
    out2 = attention(q2, k2, v2, causal=True, window=(3, 0), backend=name)
    assert torch.equal(out2[:, :, :20], torch.zeros_like(out2[:, :, :20]))  # rows before the first key


@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_garbage_outside_window_and_documents_never_reaches_a_row(name):
    """Contract item 3 with the new vocabulary: NaN in keys outside a row's window or document changes
    nothing in that row, and exactly the rows that see it are NaN."""
    q, k, v = _inputs(dtype=torch.float32, i=40, j=40)
    docs = _ids([20, 20])
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 25] = float("nan")  # in the second document (of row 0), seen from row 25 on under causal
    clean = attention(q, k, v, documents=docs, causal=True, backend=name)
    dirty = attention(q, k2, v2, documents=docs, causal=True, backend=name)
    sees = torch.zeros(2, 4, 40, dtype=torch.bool)
    sees[0, :, 25:] = True  # row 0: document 1 is tokens 20..39
    sees[1, :, 25:] = True  # row 1: the same split (lengths 20, 20)
    assert torch.equal(dirty.isnan().any(-1), sees)
    assert torch.equal(dirty[~sees], clean[~sees])
    w = attention(q, k2, v2, window=(3, 3), backend=name)
    seen = torch.zeros(40, dtype=torch.bool)
    seen[22:29] = True  # rows 22..28 have key 25 within 3 positions
    assert torch.equal(w.isnan().any(-1), seen.expand(2, 4, 40))


def test_lowering_never_builds_an_i_by_j_tensor(monkeypatch):
    """Structure masks are built per block (rows x keys of one block), for sdpa and chunked, and a query
    block only meets the keys it can see."""
    sizes = []
    keep = Structure.keep

    def spy(self, rows, cols):
        sizes.append((rows.stop - rows.start, cols.stop - cols.start))
        return keep(self, rows, cols)

    monkeypatch.setattr(Structure, "keep", spy)
    calls = []
    real = sdpa_mod._sdpa

    def sdpa_spy(q, k, v, **kw):
        calls.append(k.shape[2])
        return real(q, k, v, **kw)

    monkeypatch.setattr(sdpa_mod, "_sdpa", sdpa_spy)
    q, k, v = _inputs(dtype=torch.float32, i=128, j=128)
    for name in ("sdpa:flash", "sdpa:math", "chunked"):
        sizes.clear()
        attention(q, k, v, causal=True, window=(5, 0), backend=name)
        assert sizes and max(r * c for r, c in sizes) <= BLOCK * 2 * BLOCK, (name, sizes)
    calls.clear()
    attention(q, k, v, causal=True, window=(5, 0), backend="sdpa:flash")
    assert len(calls) == 128 // BLOCK and max(calls) <= BLOCK + 5  # each block: its own rows and 5 keys back
    docs = _ids([64, 64])
    calls.clear()
    attention(q, k, v, causal=True, documents=docs, backend="sdpa:flash")
    assert max(calls) <= 64  # a block never reaches into the other document


def test_fully_visible_blocks_are_not_masked(monkeypatch):
    """A block every row of which sees every key gets no mask at all (the kernel's unmasked path)."""
    masks = []
    real = sdpa_mod._sdpa

    def sdpa_spy(q, k, v, attn_mask=None, **kw):
        masks.append(attn_mask)
        return real(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(sdpa_mod, "_sdpa", sdpa_spy)
    q, k, v = _inputs(dtype=torch.float32, i=32, j=32, b=1)
    attention(q, k, v, documents=torch.tensor([[0] * 8 + [1] * 8 + [2] * 16]), backend="sdpa:flash")
    assert masks and all(m is None for m in masks)  # documents on block edges: every block fully visible


def test_explain_names_the_lowering():
    q, k, v = _inputs(dtype=torch.float32)
    report = explain(q, k, v, window=(8, 0), causal=True, score="l2", backend="chunked")
    text = str(report)
    assert "score='l2' runs as a dot product" in text
    assert "chunked: causal" in text or "chunked: window" in text
    # the chosen backend's note first (after the l2 one), then every other backend that can run the inputs
    assert report.lowering[1].startswith("chunked:") and "per block" in report.lowering[1]
    assert any(note.startswith("einsum: the reference") for note in report.lowering)
    report = explain(q, k, v, documents=_ids(LENGTHS))
    assert report.lowering[0].startswith(f"{report.backend}:") and "documents" in report.lowering[0]


def test_attend_module_takes_window_score_and_documents():
    q, k, v = _inputs(dtype=torch.float32)
    docs = _ids(LENGTHS)
    m = Attend(window=(4, 0), score="l2", causal=True)
    assert "window=(4, 0)" in repr(m) and "score='l2'" in repr(m)
    out = m(q, k, v, documents=docs)
    ref = attention(q, k, v, window=(4, 0), score="l2", causal=True, documents=docs, backend="einsum")
    torch.testing.assert_close(out, ref, **tolerance(torch.float32))
    assert "per block" in str(m.explain(q, k, v, documents=docs))
    wide = attention(q, k, v, window=(9, 0), score="l2", causal=True, documents=docs, backend="einsum")
    torch.testing.assert_close(m(q, k, v, documents=docs, window=(9, 0)), wide, **tolerance(torch.float32))
    assert "window (9, 0)" in str(m.explain(q, k, v, window=(9, 0)))


@pytest.mark.parametrize(
    ("kw", "exc", "text"),
    [
        (dict(window=5), TypeError, "expected `window` to be a pair (left, right)"),
        (dict(window=(-1, 0)), ValueError, "expected `window` left to be an int >= 0 or None"),
        (dict(window=(1, True)), ValueError, "expected `window` right"),
        (dict(score="cos"), ValueError, "expected `score` to be 'dot'"),
        (dict(documents=torch.zeros(2, 45)), TypeError, "expected `documents` of an integer dtype"),
        (dict(documents=torch.zeros(2, 44, dtype=torch.long)), ValueError, "expected `documents` of shape (b, j)"),
        (dict(documents=(torch.zeros(2, 45, dtype=torch.long),)), ValueError, "as a pair"),
    ],
)
def test_bad_structure_arguments(kw, exc, text):
    q, k, v = _inputs(dtype=torch.float32)
    with pytest.raises(exc, match="expected") as info:
        attention(q, k, v, **kw)
    assert text in str(info.value)


def test_one_documents_tensor_needs_i_equal_j():
    q, k, v = _inputs(dtype=torch.float32, i=10, j=12)
    with pytest.raises(ValueError, match=r"expected a pair \(q_docs \(b, i\), k_docs \(b, j\)\)"):
        attention(q, k, v, documents=torch.zeros(2, 12, dtype=torch.long))


@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.parametrize("name", ["sdpa:flash", "chunked"])
@needs("dynamo_traces_attend")
def test_window_and_documents_compile_fullgraph(name):
    """torch.compile(fullgraph=True) gives the eager result (sdpa: one masked call while tracing)."""
    q, k, v = _inputs(dtype=torch.float32)
    docs = _ids(LENGTHS)

    def f(q, k, v, docs):
        return attention(q, k, v, causal=True, window=(6, 0), documents=docs, backend=name)

    compiled = torch.compile(f, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(q, k, v, docs), f(q, k, v, docs), **tolerance(torch.float32))


def test_l2_second_order_gradients_are_exact():
    """The l2 lowering is plain autograd (a concatenation): gradgradcheck holds through a fused backend."""
    q, k, v = (t[:1, :2, :20, :4].clone().requires_grad_(True) for t in _inputs())
    for name in ("chunked", "sdpa:math", "einsum", "sdpa:flash"):
        # 20 queries in blocks of 8 with a window: sdpa runs its per-block graphs (first order) behind the
        # create_graph gate
        assert torch.autograd.gradgradcheck(
            lambda q, k, v, name=name: attention(q, k, v, score="l2", causal=True, window=(5, 0), backend=name),
            (q, k, v),
        )


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 12), min_size=1, max_size=5),
    left=st.one_of(st.none(), st.integers(0, 10)),
    right=st.one_of(st.none(), st.integers(0, 10)),
    causal=st.booleans(),
    use_docs=st.booleans(),
    score=st.sampled_from(["dot", "l2"]),
    name=st.sampled_from(CPU_BACKENDS),
)
def test_structure_property(lengths, left, right, causal, use_docs, score, name):
    """Random documents, windows, causal and scores on a random backend equal the reference."""
    n = sum(lengths)
    q, k, v = _inputs(b=1, h=2, g=1, i=n, j=n, d=8, e=8, dtype=torch.float32, seed=n)
    docs = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None] if use_docs else None
    window = None if left is None and right is None else (left, right)
    kw = dict(window=window, documents=docs, causal=causal, score=score)
    if get_backend(name).reasons_unsupported(_validated(q, k, v, **kw)):
        return
    check_backend(name, q, k, v, grad=name != "sdpa:flash", **kw)


@pytest.mark.parametrize(
    "kw", [dict(window=(5, 2)), dict(documents=_ids([7, 13, 20]), causal=True)], ids=["window", "docs"]
)
def test_chunked_dropout_with_structure_uses_its_reported_keep_mask(kw):
    """Dropout with a window or documents: chunked's forward and backward apply the keep-mask
    `dropout_keep_mask` reports (its entries in skipped tiles included), as the reference does with it."""
    from attend.backends.chunked import chunked_attention, dropout_keep_mask
    from attend.backends.einsum import einsum_attention
    from attend.inputs import validate

    q, k, v = (t.requires_grad_() for t in _inputs(i=40, j=40))
    inp = validate(q, k, v, dropout_p=0.25, **kw)
    out = chunked_attention(inp, q_tile=4, k_tile=5, seed=3)
    keep = dropout_keep_mask(inp, 3)
    ref = einsum_attention(inp, dropout_keep=keep)
    torch.testing.assert_close(out, ref)
    dout = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), dout), torch.autograd.grad(ref, (q, k, v), dout)):
        torch.testing.assert_close(a, b)
