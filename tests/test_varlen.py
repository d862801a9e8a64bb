"""`attend.varlen.varlen_attn`: PyTorch 2.13's `torch.nn.attention.varlen.varlen_attn` on CPU, every backend.

Against a float64 per-sequence reference: each sequence alone through the `einsum` reference (attend's bottom-right
causal / window within the sequence), outputs and gradients of query, key and value; the log-sum-exp against plain
torch math. Plus a hand-drawn picture of the per-sequence bottom-right alignment, the signature against torch's,
batch invariance with num_splits=1, the input errors, and the KV-cache arguments (seqused_k, block_table) against
the reference on each sequence's used keys.
"""

from __future__ import annotations

import importlib
import inspect
import math

import pytest
import torch

from attend.backends.einsum import einsum_attention
from attend.dispatch import get_backend, run
from attend.inputs import validate
from attend.testing import tolerance
from attend.varlen import AuxRequest, _tokens_first, _varlen_inputs, varlen_attn

CPU_BACKENDS = ["einsum", "chunked", "sdpa:flash", "sdpa:math"]

# (query lengths, key lengths (None: the same), window_size, h, g)
CASES = {
    "self-packing": ([5, 1, 17, 9], None, (-1, -1), 2, 2),
    "self-packing-causal": ([5, 1, 17, 9], None, (-1, 0), 2, 2),
    "cross-causal": ([3, 1, 8], [7, 4, 8], (-1, 0), 2, 2),
    "cross-causal-more-queries": ([6, 2, 5], [2, 4, 1], (-1, 0), 2, 2),
    "window": ([5, 1, 17, 9], [9, 3, 11, 9], (4, 2), 2, 2),
    "window-left-only": ([12, 7], [12, 9], (3, -1), 2, 2),
    "gqa-causal": ([3, 1, 8], [7, 4, 8], (-1, 0), 4, 2),
    "length-1": ([1], [1], (-1, 0), 2, 2),
    "empty-sequences": ([4, 0, 3], [0, 5, 2], (-1, -1), 2, 2),
}


def cu(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def make(case: str, *, d: int = 8, e: int | None = None, dtype=torch.float32, seed: int = 0):
    lq, lk, window_size, h, g = CASES[case]
    lk = lq if lk is None else lk
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(lq), h, d, generator=gen).to(dtype)
    k = torch.randn(sum(lk), g, d, generator=gen).to(dtype)
    v = torch.randn(sum(lk), g, e or d, generator=gen).to(dtype)
    args = (q, k, v, cu(lq), cu(lk), max(lq), max(lk))
    kwargs = {"window_size": window_size, "enable_gqa": h != g}
    return args, kwargs


def reference(q, k, v, cu_q, cu_k, window_size, scale=None):
    """float64, sequence by sequence through the einsum reference: out (total_q, h, e)."""
    left, right = (None if w < 0 else w for w in window_size)
    window = None if left is None and right is None else (left, right)
    outs = []
    for s in range(len(cu_q) - 1):
        rows, cols = slice(int(cu_q[s]), int(cu_q[s + 1])), slice(int(cu_k[s]), int(cu_k[s + 1]))
        if rows.stop == rows.start:
            continue
        qs, ks, vs = (t.double().transpose(0, 1)[None] for t in (q[rows], k[cols], v[cols]))
        if ks.shape[2] == 0:  # no key: 0, as every backend gives (connected to the graph for the gradients)
            outs.append(qs.new_zeros(1, qs.shape[1], qs.shape[2], vs.shape[3]) + 0 * qs.sum() + 0 * vs.sum())
            continue
        outs.append(einsum_attention(validate(qs, ks, vs, window=window, scale=scale)))
    return torch.cat(outs, dim=2)[0].transpose(0, 1)


def reference_lse(q, k, cu_q, cu_k, window_size, scale=None):
    """Plain torch math in float64: (h, total_q), -inf for a query that sees no key."""
    h, g = q.shape[1], k.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    parts = []
    for s in range(len(cu_q) - 1):
        qs = q[int(cu_q[s]) : int(cu_q[s + 1])].double().transpose(0, 1)
        ks = k[int(cu_k[s]) : int(cu_k[s + 1])].double().transpose(0, 1).repeat_interleave(h // g, 0)
        lq, lk = qs.shape[1], ks.shape[1]
        diag = torch.arange(lq)[:, None] + (lk - lq)  # bottom-right, per sequence
        key = torch.arange(lk)[None]
        keep = torch.ones(lq, lk, dtype=torch.bool)
        if window_size[0] >= 0:
            keep &= key >= diag - window_size[0]
        if window_size[1] >= 0:
            keep &= key <= diag + window_size[1]
        sim = (qs @ ks.transpose(-1, -2) * scale).masked_fill(~keep, -math.inf)
        parts.append(sim.logsumexp(-1) if lk else qs.new_full((h, lq), -math.inf))
    return torch.cat(parts, dim=-1)


def with_grads(fn, q, k, v, cot):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = fn(q, k, v)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), cot.to(out.dtype))
    return out, dq, dk, dv


def assert_close_all(got, want):
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a, b.to(a.dtype), **tolerance(a.dtype), msg=lambda m, n=name: f"{n}: {m}")


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of a few rows everywhere, so the packed sequences straddle query and key blocks."""

    monkeypatch.setattr(get_backend("chunked"), "q_tile", 4)
    monkeypatch.setattr(get_backend("chunked"), "k_tile", 8)
    for name in ("sdpa:flash", "sdpa:math"):
        monkeypatch.setattr(get_backend(name), "query_block", 8)


# forward and gradients


@pytest.mark.parametrize("blocks", ["default", "small"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_backend_matches_per_sequence_reference(case, backend, blocks, request):
    if blocks == "small":
        request.getfixturevalue("small_blocks")
    (q, k, v, cu_q, cu_k, max_q, max_k), kw = make(case)
    cot = torch.randn(q.shape[0], q.shape[1], v.shape[2], dtype=torch.float64)

    def candidate(q, k, v):
        return _tokens_first(run(_varlen_inputs(q, k, v, cu_q, cu_k, max_q, max_k, **kw), backend=backend))

    got = with_grads(candidate, q, k, v, cot)
    want = with_grads(lambda q, k, v: reference(q, k, v, cu_q, cu_k, kw["window_size"]), q, k, v, cot)
    assert got[0].shape == (q.shape[0], q.shape[1], v.shape[2])
    assert_close_all(got, want)


@pytest.mark.parametrize("case", list(CASES))
def test_auto_matches_reference(case):
    (q, k, v, cu_q, cu_k, max_q, max_k), kw = make(case, e=6)  # e != d: not every kernel takes it
    cot = torch.randn(q.shape[0], q.shape[1], 6, dtype=torch.float64)
    got = with_grads(lambda q, k, v: varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, **kw), q, k, v, cot)
    want = with_grads(lambda q, k, v: reference(q, k, v, cu_q, cu_k, kw["window_size"]), q, k, v, cot)
    assert got[0].is_contiguous() and got[0].dtype == q.dtype
    assert_close_all(got, want)


def test_scale_and_float64():
    (q, k, v, cu_q, cu_k, max_q, max_k), kw = make("window", dtype=torch.float64)
    cot = torch.randn(q.shape[0], q.shape[1], v.shape[2], dtype=torch.float64)
    fn = lambda q, k, v: varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, scale=0.3, **kw)  # noqa: E731
    got = with_grads(fn, q, k, v, cot)
    want = with_grads(lambda q, k, v: reference(q, k, v, cu_q, cu_k, kw["window_size"], scale=0.3), q, k, v, cot)
    assert_close_all(got, want)


def test_bottom_right_alignment_per_sequence():
    """q = 0: each query averages v over the keys it sees; v = the local key index. Drawn by hand:

    sequence 0: Lq=2, Lk=4, causal      sequence 1: Lq=3, Lk=1, causal
        k0 k1 k2 k3                          k0
      q0 x  x  x  .   -> mean 1.0          q0 .   -> 0 (sees nothing)
      q1 x  x  x  x   -> mean 1.5          q1 .   -> 0
                                           q2 x   -> 0.0 (k0's index)
    """
    q = torch.zeros(5, 1, 4)
    k = torch.zeros(5, 1, 4)
    v = torch.tensor([0.0, 1.0, 2.0, 3.0, 7.0]).reshape(5, 1, 1)  # sequence 1's only key carries 7
    out, lse = varlen_attn(q, k, v, cu([2, 3]), cu([4, 1]), 3, 4, window_size=(-1, 0), return_aux=AuxRequest(lse=True))
    torch.testing.assert_close(out[:, 0, 0], torch.tensor([1.0, 1.5, 0.0, 0.0, 7.0]))
    want_lse = torch.tensor([math.log(3), math.log(4), -math.inf, -math.inf, 0.0])
    torch.testing.assert_close(lse[0], want_lse)
    # window (1, 0): the diagonal and one key before it
    out = varlen_attn(q, k, v, cu([2, 3]), cu([4, 1]), 3, 4, window_size=(1, 0))
    torch.testing.assert_close(out[:, 0, 0], torch.tensor([1.5, 2.5, 0.0, 0.0, 7.0]))


# the log-sum-exp (return_aux)


@pytest.mark.parametrize("blocks", ["default", "small"])
@pytest.mark.parametrize("case", ["self-packing-causal", "cross-causal-more-queries", "window", "gqa-causal"])
def test_lse_matches_reference(case, blocks, request):
    if blocks == "small":
        request.getfixturevalue("small_blocks")
    (q, k, v, cu_q, cu_k, max_q, max_k), kw = make(case)
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    out, lse = varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, return_aux=AuxRequest(lse=True), **kw)
    want = reference_lse(q, k, cu_q, cu_k, kw["window_size"])
    assert lse.shape == (q.shape[1], q.shape[0]) and lse.dtype == torch.float32
    torch.testing.assert_close(lse, want.float(), **tolerance(torch.float32))
    # its gradient is the exact one (where it is finite; rows with no key get none)
    seen = want.isfinite()
    cot = torch.randn(lse.shape, dtype=torch.float64)
    got = torch.autograd.grad(torch.where(seen, lse, 0).mul(cot).sum(), (q, k))
    ref = torch.autograd.grad(torch.where(seen, want, 0).mul(cot).sum(), (q, k))
    for a, b in zip(got, ref):
        assert a.isfinite().all()
        torch.testing.assert_close(a, b.float(), **tolerance(torch.float32))


@pytest.mark.parametrize("lq, lk", [([0, 0], [3, 2]), ([2, 3], [0, 0])])
def test_no_query_or_no_key_tokens(lq, lk):
    """total_q = 0: empty results; total_k = 0: every query sees nothing, so 0 and lse -inf (gradients 0)."""
    q, k, v = torch.randn(sum(lq), 2, 4), torch.randn(sum(lk), 2, 4), torch.randn(sum(lk), 2, 4)
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    out, lse = varlen_attn(q, k, v, cu(lq), cu(lk), max(lq), max(lk), window_size=(-1, 0), return_aux=AuxRequest(True))
    assert out.shape == (sum(lq), 2, 4) and lse.shape == (2, sum(lq))
    assert (out == 0).all() and (lse == -math.inf).all()
    grads = torch.autograd.grad(out.sum(), (q, k, v), allow_unused=True)
    assert all(g is None or (g == 0).all() for g in grads)


def test_nan_reaches_only_the_rows_that_see_it():
    """attend's contract through the packing: a NaN key of sequence 0 reaches only sequence 0's queries that see
    it (causal: the ones at or after it), in the output and in the log-sum-exp."""
    (q, k, v, cu_q, cu_k, max_q, max_k), kw = make("self-packing-causal")
    k[3, 0, 0] = float("nan")  # sequence 0 = tokens 0..4
    out, lse = varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, return_aux=AuxRequest(lse=True), **kw)
    want = torch.zeros(q.shape[0], dtype=torch.bool)
    want[3:5] = True
    assert torch.equal(out.isnan().any(-1).any(-1), want)
    assert torch.equal(lse.isnan().any(0), want)


def test_torch_aux_request_is_accepted():
    varlen = pytest.importorskip("torch.nn.attention.varlen", reason="this torch has no torch.nn.attention.varlen")
    (q, k, v, cu_q, cu_k, max_q, max_k), kw = make("cross-causal")
    out, lse = varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, return_aux=varlen.AuxRequest(lse=True), **kw)
    assert lse.shape == (q.shape[1], q.shape[0])
    only = varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, return_aux=AuxRequest(lse=False), **kw)
    assert isinstance(only, torch.Tensor)
    # the lse comes from the kernel that gives the output (a backend that gives both), so the two calls may run
    # on different backends: equal within the dtype's tolerance, not bit for bit
    torch.testing.assert_close(only, out)


# num_splits=1: batch invariance


def test_num_splits_1_is_batch_invariant():
    (q, k, v, cu_q, cu_k, max_q, max_k), kw = make("window")
    out, lse = varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, num_splits=1, return_aux=AuxRequest(lse=True), **kw)
    packed = varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, **kw)
    torch.testing.assert_close(out, packed, **tolerance(torch.float32))
    # sequence 2 alone gives the same bits
    rows, cols = slice(int(cu_q[2]), int(cu_q[3])), slice(int(cu_k[2]), int(cu_k[3]))
    n_q, n_k = rows.stop - rows.start, cols.stop - cols.start
    one, one_lse = varlen_attn(
        q[rows], k[cols], v[cols], cu([n_q]), cu([n_k]), n_q, n_k, num_splits=1, return_aux=AuxRequest(lse=True), **kw
    )
    assert torch.equal(one, out[rows])
    assert torch.equal(one_lse, lse[:, rows])


# signature


def test_signature_matches_torch():
    try:
        theirs = importlib.import_module("torch.nn.attention.varlen").varlen_attn
    except (ImportError, AttributeError):
        pytest.skip("this torch has no torch.nn.attention.varlen.varlen_attn to compare with")
    ours, want = inspect.signature(varlen_attn).parameters, inspect.signature(theirs).parameters
    # PyTorch's parameters, in its order, then attend's keyword-only extensions (issue 23)
    extensions = ["sinks", "softcap"]
    assert list(ours) == list(want) + extensions
    assert all(ours[name].kind is inspect.Parameter.KEYWORD_ONLY and ours[name].default is None for name in extensions)
    for name, p in want.items():
        assert (ours[name].kind, ours[name].default) == (p.kind, p.default), name


# errors


def _call(**override):
    (q, k, v, cu_q, cu_k, max_q, max_k), kw = make("cross-causal")
    args = {"query": q, "key": k, "value": v, "cu_seq_q": cu_q, "cu_seq_k": cu_k, "max_q": max_q, "max_k": max_k}
    args.update(kw)
    args.update(override)
    return varlen_attn(**args)


@pytest.mark.parametrize(
    "override, error, words",
    [
        ({"cu_seq_q": torch.tensor([0, 3, 4, 11], dtype=torch.int32)}, ValueError, "cu_seq_q[-1]"),
        ({"cu_seq_k": torch.tensor([0, 7, 5, 19], dtype=torch.int32)}, ValueError, "non-decreasing"),
        ({"cu_seq_q": torch.tensor([1, 3, 4, 12], dtype=torch.int32)}, ValueError, "start at 0"),
        ({"cu_seq_q": torch.tensor([0, 3, 4, 12])}, TypeError, "int32"),
        ({"cu_seq_q": torch.tensor([[0, 3, 4, 12]], dtype=torch.int32)}, ValueError, "(n + 1,)"),
        ({"cu_seq_q": torch.tensor([0, 12], dtype=torch.int32), "max_q": 12}, ValueError, "same length"),
        ({"cu_seq_k": None}, ValueError, "cu_seq_k"),
        ({"max_q": 7}, ValueError, "longest"),
        ({"max_k": 8.0}, TypeError, "max_k"),
        ({"query": torch.randn(12, 4, 8)}, ValueError, "enable_gqa=True"),
        ({"query": torch.randn(12, 3, 8), "enable_gqa": True}, ValueError, "multiple"),
        ({"query": torch.randn(12, 2, 6)}, ValueError, "head dim"),
        ({"value": torch.randn(18, 2, 8)}, ValueError, "total_k"),
        ({"query": torch.randn(1, 12, 2, 8)}, ValueError, "packed"),
        ({"window_size": (1, 2, 3)}, ValueError, "length 2"),
        ({"window_size": (1.5, 0)}, TypeError, "window_size"),
        ({"return_aux": True}, TypeError, "AuxRequest"),
        ({"num_splits": 0}, ValueError, "num_splits"),
    ],
)
def test_bad_inputs_raise_before_any_kernel(override, error, words, monkeypatch):
    import attend.varlen as varlen

    def no_kernel(*a, **kw):
        raise AssertionError("a kernel ran before the error")

    monkeypatch.setattr(varlen, "run", no_kernel)
    with pytest.raises(error) as info:
        _call(**override)
    assert "expected" in str(info.value) and words in str(info.value)


# the KV cache: seqused_k and block_table (inference only)

# 3 sequences: query lengths, key segment lengths, keys used of each segment
KV_Q, KV_K, KV_USED = [2, 1, 3], [9, 4, 12], [6, 0, 12]


def kv_case(window_size=(-1, 0), dtype=torch.float64, h=4, g=2, d=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(KV_Q), h, d, generator=gen).to(dtype)
    k = torch.randn(sum(KV_K), g, d, generator=gen).to(dtype)
    v = torch.randn(sum(KV_K), g, d, generator=gen).to(dtype)
    used = torch.tensor(KV_USED, dtype=torch.int32)
    # the reference: each segment cut to its used keys, packed
    starts = cu(KV_K)[:-1].tolist()
    index = torch.cat([torch.arange(a, a + n) for a, n in zip(starts, KV_USED)])
    want = reference(q, k[index], v[index], cu(KV_Q), cu(KV_USED), window_size)
    return q, k, v, used, want


def pages_of(k, v, page_size=4, spare=3, seed=0):
    """The used keys of each segment as a shuffled page pool: (key_pool, value_pool, block_table int32)."""
    gen = torch.Generator().manual_seed(seed)
    starts = cu(KV_K)[:-1].tolist()
    per_seq = max(-(-n // page_size) for n in KV_USED) + 1
    total = len(KV_USED) * per_seq + spare
    ids = torch.randperm(total, generator=gen)[: len(KV_USED) * per_seq].view(len(KV_USED), per_seq)
    kp = torch.randn(total, page_size, *k.shape[1:], generator=gen).to(k.dtype)
    vp = torch.randn(total, page_size, *v.shape[1:], generator=gen).to(v.dtype)
    for s, (a, n) in enumerate(zip(starts, KV_USED)):
        for t in range(n):
            kp[ids[s, t // page_size], t % page_size] = k[a + t]
            vp[ids[s, t // page_size], t % page_size] = v[a + t]
    return kp, vp, ids.to(torch.int32)


@pytest.mark.parametrize("window_size", [(-1, 0), (-1, -1), (2, 1)])
def test_seqused_k_uses_the_first_keys_of_each_segment(window_size):
    """Causal and the window align to the used length (flash-attn's actual_seqlen_k = seqused_k)."""
    q, k, v, used, want = kv_case(window_size)
    out = varlen_attn(q, k, v, cu(KV_Q), cu(KV_K), 3, 12, window_size=window_size, enable_gqa=True, seqused_k=used)
    torch.testing.assert_close(out, want, **tolerance(torch.float64))
    assert (out[2] == 0).all()  # sequence 1 uses no key


@pytest.mark.parametrize("window_size", [(-1, 0), (2, 1)])
@pytest.mark.parametrize("cu_k", ["none", "given"])
def test_block_table_reads_the_pages(window_size, cu_k):
    q, k, v, used, want = kv_case(window_size)
    kp, vp, table = pages_of(k, v)
    cu_seq_k = None if cu_k == "none" else cu(KV_USED)
    out = varlen_attn(
        q, kp, vp, cu(KV_Q), cu_seq_k, 3, 12, window_size=window_size, enable_gqa=True, seqused_k=used,
        block_table=table,
    )  # fmt: skip
    torch.testing.assert_close(out, want, **tolerance(torch.float64))


def test_kv_cache_with_lse_and_num_splits_1():
    q, k, v, used, want = kv_case()
    kp, vp, table = pages_of(k, v)
    kw = {"window_size": (-1, 0), "enable_gqa": True, "seqused_k": used, "block_table": table}
    out, lse = varlen_attn(q, kp, vp, cu(KV_Q), None, 3, 12, return_aux=AuxRequest(lse=True), num_splits=1, **kw)
    torch.testing.assert_close(out, want, **tolerance(torch.float64))
    starts = cu(KV_K)[:-1].tolist()
    index = torch.cat([torch.arange(a, a + n) for a, n in zip(starts, KV_USED)])
    want_lse = reference_lse(q, k[index], cu(KV_Q), cu(KV_USED), (-1, 0))
    torch.testing.assert_close(lse, want_lse, **tolerance(torch.float64))


def test_kv_cache_is_inference_only():
    q, k, v, used, _ = kv_case()
    with pytest.raises(RuntimeError, match="inference-only"):
        varlen_attn(q.requires_grad_(True), k, v, cu(KV_Q), cu(KV_K), 3, 12, enable_gqa=True, seqused_k=used)
    with torch.no_grad():
        varlen_attn(q, k, v, cu(KV_Q), cu(KV_K), 3, 12, enable_gqa=True, seqused_k=used)


@pytest.mark.parametrize(
    "override, error, words",
    [
        ({"seqused_k": None}, ValueError, "seqused_k"),  # block_table without seqused_k
        ({"seqused_k": torch.tensor([6, 0, 12])}, TypeError, "int32"),
        ({"seqused_k": torch.tensor([6, 0], dtype=torch.int32)}, ValueError, "(n,)"),
        ({"seqused_k": torch.tensor([6, -1, 12], dtype=torch.int32)}, ValueError, ">= 0"),
        ({"seqused_k": torch.tensor([6, 0, 40], dtype=torch.int32)}, ValueError, "max_pages * page_size"),
        ({"block_table": "pages"}, TypeError, "int32"),
        ({"block_table": torch.zeros(2, 4, dtype=torch.int32)}, ValueError, "(n, max_pages)"),
        ({"block_table": torch.full((3, 4), 99, dtype=torch.int32)}, ValueError, "[0, total_pages)"),
        ({"cu_seq_k": torch.tensor([0, 1], dtype=torch.int32)}, ValueError, "not read"),
        ({"max_k": 5}, ValueError, "max_k"),
        ({"key": torch.randn(20, 2, 8, dtype=torch.float64)}, ValueError, "page pool"),
    ],
)
def test_kv_cache_bad_inputs(override, error, words):
    q, k, v, used, _ = kv_case()
    kp, vp, table = pages_of(k, v)
    args = {"query": q, "key": kp, "value": vp, "cu_seq_q": cu(KV_Q), "cu_seq_k": None, "max_q": 3, "max_k": 12}
    args.update({"enable_gqa": True, "seqused_k": used, "block_table": table})
    args.update(override)
    with pytest.raises(error) as info:
        varlen_attn(**args)
    assert "expected" in str(info.value) and words in str(info.value)


def test_seqused_k_longer_than_its_segment():
    q, k, v, _, _ = kv_case()
    with pytest.raises(ValueError, match=r"expected seqused_k\[1\] <= the length of sequence 1's keys"):
        varlen_attn(q, k, v, cu(KV_Q), cu(KV_K), 3, 12, enable_gqa=True, seqused_k=torch.tensor([6, 5, 12]).int())


# heads-first input and window_size sides (issue 25)


@pytest.mark.parametrize("case", ["self-packing", "cross-causal"])
def test_heads_first_query_gets_a_layout_hint(case):
    """query (h, total_q, d) instead of (total_q, h, d): the error names the layout and the transpose, before
    any head-count check can misread total_q as the number of heads."""
    (q, k, v, cu_q, cu_k, max_q, max_k), kw = make(case)
    total_q, h, d = q.shape
    with pytest.raises(ValueError) as info:
        varlen_attn(q.transpose(0, 1), k, v, cu_q, cu_k, max_q, max_k, **kw)
    assert str(info.value) == (
        f"expected `query` of shape (total_q, h, d) with total_q = cu_seq_q[-1] = {total_q}, got shape "
        f"({h}, {total_q}, {d}); hint: `query` looks heads-first (h, total_q, d): pass `query.transpose(0, 1)`"
    )
    # tokens-first with a token too few: no dim holds total_q, so the message stays about cu_seq_q
    with pytest.raises(ValueError) as info:
        varlen_attn(q[:-1], k, v, cu_q, cu_k, max_q, max_k, **kw)
    assert str(info.value) == (
        f"expected `cu_seq_q[-1]` to equal the number of query tokens, {total_q - 1}, got {total_q} (shape "
        f"({cu_q.shape[0]})); hint: cu_seq_q = pad(lengths.cumsum(0), (1, 0)).to(torch.int32)"
    )


def test_heads_first_key_and_value_get_a_layout_hint():
    (q, k, v, cu_q, cu_k, max_q, max_k), kw = make("cross-causal")
    total_k, g, d = k.shape
    with pytest.raises(ValueError) as info:
        varlen_attn(q, k.transpose(0, 1), v.transpose(0, 1), cu_q, cu_k, max_q, max_k, **kw)
    assert str(info.value) == (
        f"expected `key` of shape (total_k, g, d) with total_k = cu_seq_k[-1] = {total_k}, got shape "
        f"({g}, {total_k}, {d}); hint: `key` looks heads-first (g, total_k, d): pass `key.transpose(0, 1)` "
        "(and `value.transpose(0, 1)`)"
    )


def test_heads_first_with_seqused_k_gets_a_layout_hint():
    q, k, v, used, _ = kv_case()
    with pytest.raises(ValueError) as info:
        with torch.no_grad():
            varlen_attn(q, k.transpose(0, 1), v.transpose(0, 1), cu(KV_Q), cu(KV_K), 3, 12, enable_gqa=True,
                        seqused_k=used)  # fmt: skip
    assert str(info.value) == (
        "expected `key` of shape (total_k, g, d) with total_k = cu_seq_k[-1] = 25, got shape (2, 25, 8); "
        "hint: `key` looks heads-first (g, total_k, d): pass `key.transpose(0, 1)` (and `value.transpose(0, 1)`)"
    )


@pytest.mark.parametrize("window_size", [(-2, 0), (4, -3)], ids=["left", "right"])
def test_window_side_below_minus_one_raises(window_size):
    """In PyTorch's varlen_attn only -1 means unbounded; another negative side is a bug, not a window."""
    side, w = ("left", -2) if window_size[0] < -1 else ("right", -3)
    with pytest.raises(ValueError) as info:
        _call(window_size=window_size)
    assert str(info.value) == (
        f"expected `window_size` {side} to be an int >= 0, or -1 for unbounded, got {w} in "
        f"window_size={window_size}; hint: (-1, 0) is causal, (128, 0) causal with a window of 128"
    )
