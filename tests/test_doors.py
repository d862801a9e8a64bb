"""One contract through every door: `attention`, `Attend`, `varlen_attn`, `with_kvcache` and
`context_parallel_attention` (a one-process gloo group here; tests/test_distributed.py spawns real worlds).

Each door is run on the same padded batch, rows of `lengths` valid keys, against itself: what sits behind a
row's length (garbage up to the dtype's max, inf, NaN) never changes an output, and a window side of any Python
int at or past the sequence equals an unbounded one. The l2 score, documents and the messages have their own
repros (issue 22), each of which failed before the doors shared the core's inputs, lowering and guard.
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Callable, Iterator

import pytest
import torch
import torch.distributed as dist

from attend import Attend, attention, list_backends, varlen_attn, with_kvcache
from attend.distributed import context_parallel_attention
from attend.inputs import validate
from attend.masks import lower

from .helpers import make_qkv, skip_unless_runs

# a door: (q (b, h, i, d), k (b, g, j, d), v (b, g, j, e), lengths (b,), causal, window) -> (b, h, i, e), where
# row b's keys past lengths[b] are padding
Door = Callable[..., torch.Tensor]


def _padding(k: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    return torch.arange(k.shape[2])[None] < torch.tensor(lengths)[:, None]  # (b, j), True = may attend


def _attention(q, k, v, lengths, causal, window):
    return attention(q, k, v, mask=_padding(k, lengths), causal=causal, window=window)


def _module(q, k, v, lengths, causal, window):
    return Attend(causal=causal, window=window)(q, k, v, mask=_padding(k, lengths))


def _varlen(q, k, v, lengths, causal, window):
    b, h, i, d = q.shape
    j = k.shape[2]
    left, right = window if window is not None else (None, None)
    right = 0 if causal else right
    size = (-1 if left is None else left, -1 if right is None else right)
    cu_q = torch.arange(0, (b + 1) * i, i, dtype=torch.int32)
    cu_k = torch.arange(0, (b + 1) * j, j, dtype=torch.int32)
    packed = [t.transpose(1, 2).flatten(0, 1) for t in (q, k, v)]  # (b * n, heads, dim)
    with torch.no_grad():
        out = varlen_attn(
            *packed, cu_q, cu_k, i, j, window_size=size, enable_gqa=True,
            seqused_k=torch.tensor(lengths, dtype=torch.int32),
        )  # fmt: skip
    return out.reshape(b, i, h, -1).transpose(1, 2)


def _kvcache(q, k, v, lengths, causal, window):
    with torch.no_grad():
        return with_kvcache(
            q, k, v, cache_seqlens=torch.tensor(lengths, dtype=torch.int32), causal=causal, window=window
        )


@pytest.fixture(scope="module")
def one_rank_group() -> Iterator[None]:
    if not dist.is_available():
        pytest.skip("this PyTorch build has no torch.distributed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _distributed(strategy: str) -> Door:
    def door(q, k, v, lengths, causal, window):
        pad = _padding(k, lengths)
        return context_parallel_attention(q, k, v, mask=pad, causal=causal, window=window, strategy=strategy)

    return door


DOORS: dict[str, Door] = {
    "attention": _attention,
    "Attend": _module,
    "varlen_attn": _varlen,
    "with_kvcache": _kvcache,
    "distributed-ring": _distributed("ring"),
    "distributed-allgather": _distributed("allgather"),
}


@pytest.fixture(params=list(DOORS))
def door(request) -> Door:
    if request.param.startswith("distributed"):
        request.getfixturevalue("one_rank_group")
    return DOORS[request.param]


def _shapes(door: Door) -> list[int]:
    # context parallel is self-attention (i == j); the others also decode (i = 1) and prefill a chunk (i = 5)
    return [12] if door in (DOORS["distributed-ring"], DOORS["distributed-allgather"]) else [1, 5, 12]


GARBAGE = [torch.finfo(torch.float32).max, -torch.finfo(torch.float32).max, float("inf"), float("nan")]
WINDOWS = [None, (2, 1), (4, 0), (0, 3)]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("window", WINDOWS, ids=str)
def test_garbage_behind_a_rows_length_changes_no_output(door, causal, window):
    """Garbage up to the dtype's max, inf or NaN in the keys and values past each row's length: every output is
    the one with ordinary values there (contract item 3, through every door)."""
    lengths = [12, 7, 3]
    for i in _shapes(door):
        q, k, v = make_qkv(b=3, h=4, g=2, i=i, j=12, d=8)
        clean = door(q, k, v, lengths, causal, window)
        assert torch.isfinite(clean).all()
        for value in GARBAGE:
            kg, vg = k.clone(), v.clone()
            for row, n in enumerate(lengths):
                kg[row, :, n:] = value
                vg[row, :, n:] = value
            got = door(q, kg, vg, lengths, causal, window)
            torch.testing.assert_close(
                got, clean, rtol=1e-5, atol=1e-6, msg=lambda m, i=i, x=value: f"i={i} garbage {x}: {m}"
            )


HUGE = [sys.maxsize, 10**20, 12, 13]  # 12, 13: at and past the sequence (j = 12)


@pytest.mark.parametrize("huge", HUGE, ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_a_window_side_of_any_size_equals_an_unbounded_one(door, huge, causal):
    """window=(huge, r) == (None, r) and (l, huge) == (l, None): no int64 wrap, no OverflowError."""
    lengths = [12, 9, 5]
    for i in _shapes(door):
        q, k, v = make_qkv(b=3, h=4, g=2, i=i, j=12, d=8)
        for big, unbounded in (((huge, 1), (None, 1)), ((2, huge), (2, None)), ((huge, huge), (None, None))):
            want = door(q, k, v, lengths, causal, unbounded)
            got = door(q, k, v, lengths, causal, big)
            torch.testing.assert_close(got, want, rtol=0, atol=0, msg=lambda m, i=i, w=big: f"i={i} {w}: {m}")


CPU_BACKENDS = [None] + [n for n in list_backends() if n in ("einsum", "sdpa:flash", "sdpa:math", "chunked")]


@pytest.mark.parametrize("backend", CPU_BACKENDS, ids=str)
@pytest.mark.parametrize("dtype, value", [(torch.float32, 1e4), (torch.float32, 3e30), (torch.float16, 6e4)])
def test_l2_garbage_behind_padding_moves_no_row(backend, dtype, value):
    """score="l2": the stabiliser is taken over keys some query may see, so finite garbage behind key padding
    moves no row (it moved every row by up to 1.67 in float32, and gave NaN in float16)."""
    q, k, v = make_qkv(b=1, h=1, g=1, i=4, j=8, d=8, dtype=dtype)
    pad = torch.arange(8)[None] < 3
    if backend is not None:  # (None: auto)
        skip_unless_runs(backend, lower(validate(q, k, v, mask=pad, score="l2")).inp)  # l2 lowered to a dot product
    k2 = k.clone()
    k2[:, :, 3:] = value
    want = attention(q, k, v, mask=pad, score="l2", backend=backend)
    for run in (
        lambda kk: attention(q, kk, v, mask=pad, score="l2", backend=backend),
        lambda kk: Attend(score="l2", backend=backend)(q, kk, v, mask=pad),
    ):
        got = run(k2)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("backend", CPU_BACKENDS, ids=str)
def test_keys_of_a_document_no_query_has_are_garbage(backend):
    """Keys whose document no query belongs to, at the dtype's max: no NaN (it was on sdpa:flash, sdpa:math and
    auto), the rows equal those with ordinary values there."""
    q, k, v = make_qkv(b=1, h=1, g=1, i=2, j=4, d=8)
    docs = (torch.zeros(1, 2, dtype=torch.long), torch.tensor([[1, 0, 0, 1]]))
    want = attention(q, k, v, documents=docs, backend=backend)
    k2 = k.clone()
    k2[:, :, [0, 3]] = torch.finfo(torch.float32).max
    for run in (
        lambda kk: attention(q, kk, v, documents=docs, backend=backend),
        lambda kk: Attend(backend=backend)(q, kk, v, documents=docs),
    ):
        torch.testing.assert_close(run(k2), want, rtol=0, atol=0)


def test_unsorted_documents_with_an_unseen_document_are_garbage_too():
    """Document ids out of order (compared per block, not by interval): the unseen document's keys still are."""
    q, k, v = make_qkv(b=1, h=2, g=1, i=3, j=6, d=8)
    docs = (torch.tensor([[2, 0, 2]]), torch.tensor([[0, 5, 2, 0, 5, 2]]))
    want = attention(q, k, v, documents=docs)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, [1, 4]] = v2[:, :, [1, 4]] = torch.finfo(torch.float32).max
    torch.testing.assert_close(attention(q, k2, v2, documents=docs), want, rtol=0, atol=0)


def test_varlen_a_sequence_without_queries_holds_garbage():
    """varlen_attn: the keys of a sequence with no query token are seen by no query."""
    q = torch.randn(5, 2, 8)
    k, v = torch.randn(9, 2, 8), torch.randn(9, 2, 8)
    cu_q = torch.tensor([0, 3, 3, 5], dtype=torch.int32)
    cu_k = torch.tensor([0, 3, 6, 9], dtype=torch.int32)
    want = varlen_attn(q, k, v, cu_q, cu_k, 3, 3)
    k2, v2 = k.clone(), v.clone()
    k2[3:6] = v2[3:6] = torch.finfo(torch.float32).max
    torch.testing.assert_close(varlen_attn(q, k2, v2, cu_q, cu_k, 3, 3), want, rtol=0, atol=0)


def test_paged_cache_garbage_past_a_rows_length():
    """The issue's repro: a paged cache whose unused slots hold the float32 max; row 0 was NaN."""
    big = torch.finfo(torch.float32).max
    kp = torch.full((4, 1, 4, 8), big)
    vp = kp.clone()
    kp[0, :, :1] = vp[0, :, :1] = 1
    kp[1] = vp[1] = 1
    kp[2, :, :1] = vp[2, :, :1] = 1
    table = torch.tensor([[0, 3], [1, 2]], dtype=torch.int32)
    x = torch.ones(2, 1, 1, 8)
    lens = torch.tensor([1, 5], dtype=torch.int32)
    for backend in [None, "sdpa:flash", "sdpa:math", "chunked", "einsum"]:
        k0, v0 = kp.clone(), vp.clone()
        with torch.no_grad():
            out = with_kvcache(x, k0, v0, x, x, cache_seqlens=lens, block_table=table, backend=backend)
        torch.testing.assert_close(out, torch.ones(2, 1, 1, 8), msg=lambda m, b=backend: f"{b}: {m}")


def test_l2_with_a_backend_that_cannot_run_it_describes_the_callers_call():
    """The error describes the call as given (d, score 'l2', the caller's scale), and its hint keeps --score l2."""
    q, k, v = make_qkv(b=1, h=2, g=2, i=4, j=4, d=8)
    with pytest.raises(ValueError) as err:
        attention(q, k, v, score="l2", backend="sdpa:efficient")  # CUDA-only: cannot run on the CPU
    text = str(err.value)
    assert "shape=(1, 2, 4, 8)" in text and "(1, 2, 4, 9)" not in text
    assert "score: 'l2'" in text
    assert "--score l2" in text
    assert f"scale: {8**-0.5:.6g}" in text


def test_varlen_names_its_own_arguments():
    cu = torch.tensor([0, 4], dtype=torch.int32)
    with pytest.raises(TypeError, match="expected `query` of a floating dtype"):
        varlen_attn(torch.ones(4, 2, 8, dtype=torch.long), torch.randn(4, 2, 8), torch.randn(4, 2, 8), cu, cu, 4, 4)
    with pytest.raises(TypeError, match="expected `query` to be a torch.Tensor"):
        varlen_attn(
            [[0.0]], torch.randn(4, 2, 8), torch.randn(4, 2, 8), cu, cu, 4, 4,
            seqused_k=torch.tensor([4], dtype=torch.int32),
        )  # fmt: skip
    with pytest.raises(TypeError, match="expected `key` of a floating dtype"):
        varlen_attn(torch.randn(4, 2, 8), torch.ones(4, 2, 8, dtype=torch.int32), torch.randn(4, 2, 8), cu, cu, 4, 4)


@pytest.mark.parametrize("score", ["dot", "l2"])
def test_unsorted_documents_key_hidden_by_causal_within_its_document(score):
    """Unsorted ids: a key whose document's queries all sit before it (causal) is seen by no query; garbage
    there changes nothing (it gave NaN with score="dot", and moved every row with score="l2")."""
    q, k, v = make_qkv(b=1, h=1, g=1, i=12, j=12, d=4)
    docs = (torch.tensor([[1] + [0] * 11]), torch.tensor([[1, 0, 0, 0, 0] + [1] * 7]))
    want = attention(q, k, v, documents=docs, causal=True, score=score)
    for value in (3e4, torch.finfo(torch.float32).max):
        k2, v2 = k.clone(), v.clone()
        k2[:, :, 5:] = v2[:, :, 5:] = value
        got = attention(q, k2, v2, documents=docs, causal=True, score=score)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["attention", "Attend", "distributed-ring", "distributed-allgather"])
@pytest.mark.parametrize("value", [3e38, float("inf")], ids=["max", "inf"])
def test_gradients_ignore_garbage_behind_padding(name, value, request):
    """Training through a door: garbage past a row's length changes no gradient of q, k or v, and the padded
    keys and values get gradient 0 (contract items 2 and 3, first order)."""
    if name.startswith("distributed"):
        request.getfixturevalue("one_rank_group")
    door, lengths = DOORS[name], [12, 7, 3]
    q, k, v = make_qkv(b=3, h=4, g=2, i=12, j=12, d=8)
    dout = torch.randn(3, 4, 12, 8, generator=torch.Generator().manual_seed(5))
    grads = []
    for fill in (None, value):
        kk, vv = k.clone(), v.clone()
        if fill is not None:
            for row, n in enumerate(lengths):
                kk[row, :, n:] = vv[row, :, n:] = fill
        leaves = [t.clone().requires_grad_() for t in (q, kk, vv)]
        door(*leaves, lengths, True, (4, 0)).backward(dout)
        grads.append([t.grad for t in leaves])
    pad = ~_padding(k, lengths)[:, None, :, None]
    for clean, dirty, what in zip(*grads, "qkv"):
        assert torch.isfinite(dirty).all(), what
        torch.testing.assert_close(dirty, clean, rtol=1e-5, atol=1e-6, msg=lambda m, w=what: f"d{w}: {m}")
        if what != "q":
            assert (dirty.masked_select(pad.expand_as(dirty)) == 0).all(), what
