"""`attend.with_kvcache`: KV-cache decoding with in-place append, contiguous and paged caches.

Against a float64 reference built from attend's `einsum` reference, row by row over each row's valid cache slice
(causal bottom-right among them): ragged lengths including 0 and a full cache, i in {1, 4, 17}, grouped-query
heads, paged caches with shuffled pages, windows, key padding and bias over the cache positions; the decode
kernel's split-KV and paged paths forced at small sizes; the decode kernel against the dispatch path; the
in-place append at the edges; errors raised before any write; a stable storage over 1,000 steps.
"""

from __future__ import annotations

import math
import resource

import pytest
import torch

import attend
import attend.kvcache as kvcache
from attend import attention
from attend.kvcache import explain_kvcache, with_kvcache
from attend.testing import tolerance

B, H, G, D, CAP = 3, 8, 2, 16, 48


def make(i=1, *, b=B, h=H, g=G, d=D, e=None, cap=CAP, dtype=torch.float64, seed=0, lens=None):
    """q, caches (filled with noise past the lengths too), new k, v, and cache_seqlens: 0, a middle one and
    the last that fits (cap - i)."""
    gen = torch.Generator().manual_seed(seed)
    e = e or d

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    q, k_cache, v_cache = rand(b, h, i, d), rand(b, g, cap, d), rand(b, g, cap, e)
    k, v = rand(b, g, i, d), rand(b, g, i, e)
    if lens is None:
        lens = [0, 7, cap - i][:b] + [5] * max(0, b - 3)
    return q, k_cache, v_cache, k, v, torch.tensor(lens, dtype=torch.int32)


def reference(q, k_cache, v_cache, lengths, *, mask=None, bias=None, causal=True, window=None, scale=None):
    """float64, row by row: attend's einsum reference on the row's first L_b cache positions (bottom-right)."""
    outs = []
    for row, n in enumerate(lengths):
        m = None
        if mask is not None:
            m4 = mask[:, None, None] if mask.dim() == 2 else mask
            m = m4[row if m4.shape[0] > 1 else 0][None][..., :n]
        bb = None
        if bias is not None:
            bb = bias[row if bias.shape[0] > 1 else 0][None][..., :n].double()
        out = attention(
            q[row : row + 1].double(),
            k_cache[row : row + 1, :, :n].double(),
            v_cache[row : row + 1, :, :n].double(),
            mask=m,
            bias=bb,
            causal=causal,
            window=window,
            scale=scale,
            backend="einsum",
        )
        outs.append(out)
    return torch.cat(outs)


def appended(k_cache, v_cache, k, v, lens):
    """What the caches hold after the append, built by hand."""
    kc, vc = k_cache.clone(), v_cache.clone()
    for row, s in enumerate(lens.tolist()):
        kc[row, :, s : s + k.shape[2]] = k[row]
        vc[row, :, s : s + k.shape[2]] = v[row]
    return kc, vc


def paged(k_cache, v_cache, block_size, seed=0, spare=3):
    """The same caches as a shuffled page pool: (pool_k, pool_v, block_table int32 (b, cap // block_size))."""
    b, g, cap, d = k_cache.shape
    per_row = cap // block_size
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randperm(b * per_row + spare, generator=gen)[: b * per_row].view(b, per_row)
    pool_k = torch.randn(b * per_row + spare, g, block_size, d, generator=gen).to(k_cache.dtype)
    pool_v = torch.randn(b * per_row + spare, g, block_size, v_cache.shape[3], generator=gen).to(v_cache.dtype)
    for row in range(b):
        for p in range(per_row):
            pool_k[ids[row, p]] = k_cache[row, :, p * block_size : (p + 1) * block_size]
            pool_v[ids[row, p]] = v_cache[row, :, p * block_size : (p + 1) * block_size]
    return pool_k, pool_v, ids.to(torch.int32)


def unpaged(pool, table, block_size):
    """(b, g, cap, x): the rows' caches read back through the block table."""
    return torch.stack([torch.cat([pool[p] for p in row.tolist()], dim=1) for row in table])


@pytest.fixture
def small_splits(monkeypatch):
    """Split-KV from 4 keys on, in chunks of about 5: every contiguous call below takes the split path, with
    overlapping chunks (n % chunks != 0)."""
    monkeypatch.setattr(kvcache, "_SPLIT_MIN", 4)
    monkeypatch.setattr(kvcache, "_SPLIT_KEYS", 5)


OPTIONS = {
    "causal": {},
    "window": {"window": (5, None)},
    "full": {"causal": False},
    "full-window": {"causal": False, "window": (3, 2)},
    "scale": {"scale": 0.3},
}


def options(name: str, b: int, h: int, i: int, cap: int, dtype=torch.float64, seed=1) -> dict:
    gen = torch.Generator().manual_seed(seed)
    if name == "padding":
        return {"mask": torch.rand(b, cap, generator=gen) > 0.3}
    if name == "mask4":
        return {"mask": torch.rand(b, 1, i, cap, generator=gen) > 0.3}
    if name == "bias":
        return {"bias": torch.randn(b, h, i, cap, generator=gen).to(dtype)}
    if name == "bias-heads":
        return {"bias": torch.randn(1, h, 1, cap, generator=gen).to(dtype)}
    return dict(OPTIONS[name])


NAMES = [*OPTIONS, "padding", "mask4", "bias", "bias-heads"]


def check(got, want, dtype):
    assert got.dtype == dtype and got.shape == want.shape
    torch.testing.assert_close(got.double(), want, **tolerance(dtype))


# against the reference


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("i", [1, 4, 17])
@pytest.mark.parametrize("split", [False, True])
def test_contiguous_matches_reference(name, i, split, request):
    if split:
        request.getfixturevalue("small_splits")
    q, kc, vc, k, v, lens = make(i)
    kw = options(name, B, H, i, CAP)
    want = reference(q, *appended(kc, vc, k, v, lens), (lens + i).tolist(), **kw)
    path = explain_kvcache(q, kc, vc, k, v, cache_seqlens=lens, **kw).path
    assert path == ("decode" if i * H // G <= kvcache.DECODE_ROWS else "dispatch")
    got = with_kvcache(q, kc, vc, k, v, cache_seqlens=lens, **kw)
    check(got, want, q.dtype)
    # the cache now holds the appended tokens; without k, v the lengths already count them
    again = with_kvcache(q, kc, vc, cache_seqlens=lens + i, **kw)
    check(again, want, q.dtype)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("i", [1, 4, 17])
@pytest.mark.parametrize("mode", ["in place", "gather"])
def test_paged_matches_reference(name, i, mode, monkeypatch):
    if mode == "gather":
        monkeypatch.setattr(kvcache, "_MAX_WASTE", -1)
    q, kc, vc, k, v, lens = make(i)
    kw = options(name, B, H, i, CAP)
    want = reference(q, *appended(kc, vc, k, v, lens), (lens + i).tolist(), **kw)
    pool_k, pool_v, table = paged(kc, vc, block_size=16)
    plan = explain_kvcache(q, pool_k, pool_v, k, v, cache_seqlens=lens, block_table=table, **kw)
    if plan.path == "decode" and name == "causal":  # full pages to read (a window may leave only partial ones)
        assert plan.paged == mode
    got = with_kvcache(q, pool_k, pool_v, k, v, cache_seqlens=lens, block_table=table, **kw)
    check(got, want, q.dtype)
    kc2, vc2 = appended(kc, vc, k, v, lens)
    assert torch.equal(unpaged(pool_k, table, 16), kc2) and torch.equal(unpaged(pool_v, table, 16), vc2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("paged_cache", [False, True])
def test_lower_precision(dtype, paged_cache, small_splits):
    q, kc, vc, k, v, lens = make(4, dtype=dtype)
    want = reference(q, *appended(kc, vc, k, v, lens), (lens + 4).tolist())
    if paged_cache:
        pool_k, pool_v, table = paged(kc, vc, block_size=8)
        got = with_kvcache(q, pool_k, pool_v, k, v, cache_seqlens=lens, block_table=table)
    else:
        got = with_kvcache(q, kc, vc, k, v, cache_seqlens=lens)
    check(got, want, dtype)


@pytest.mark.parametrize("split", [False, True])
def test_equal_lengths_run_as_one_batch(split, request):
    """All rows at one length: one kernel call for the batch (rows x kv heads as the kernel's head dim)."""
    if split:
        request.getfixturevalue("small_splits")
    q, kc, vc, k, v, lens = make(2, lens=[30, 30, 30])
    kw = {"mask": torch.rand(B, CAP) > 0.2}
    plan = explain_kvcache(q, kc, vc, k, v, cache_seqlens=lens, **kw)
    assert (plan.path, plan.rows, plan.calls) == ("decode", "batched", 1)
    want = reference(q, *appended(kc, vc, k, v, lens), [32] * 3, **kw)
    check(with_kvcache(q, kc, vc, k, v, cache_seqlens=lens, **kw), want, q.dtype)


def test_int_seqlens_and_value_dim():
    """e != d: the dispatch path (PyTorch's CPU flash kernel takes one head dim)."""
    q, kc, vc, k, v, _ = make(3, e=5)
    assert explain_kvcache(q, kc, vc, k, v, cache_seqlens=9).path == "dispatch"
    out = with_kvcache(q, kc, vc, k, v, cache_seqlens=9)
    want = reference(q, *appended(kc, vc, k, v, torch.tensor([9] * B)), [12] * B)
    assert out.shape == (B, H, 3, 5)
    check(out, want, q.dtype)


def test_without_new_tokens_the_lengths_count_them():
    """No k, v: row b attends its first cache_seqlens[b] keys, query t at position L_b - i + t; a row with
    L_b = 0 (or with i > L_b, the first i - L_b queries) sees nothing: 0."""
    q, kc, vc, _, _, _ = make(4)
    lens = torch.tensor([0, 2, 20], dtype=torch.int32)
    out = with_kvcache(q, kc, vc, cache_seqlens=lens)
    check(out, reference(q, kc, vc, lens.tolist()), q.dtype)
    assert (out[0] == 0).all() and (out[1, :, :2] == 0).all() and (out[1, :, 2:] != 0).all()


def test_prefix_pages_shared_between_rows():
    """Two rows reading one pool page (a shared prompt prefix) without appending."""
    q, kc, vc, _, _, _ = make(1)
    pool_k, pool_v, table = paged(kc, vc, block_size=16)
    table[1, 0] = table[0, 0]
    lens = torch.tensor([20, 40, 5], dtype=torch.int32)
    want = reference(q, unpaged(pool_k, table, 16), unpaged(pool_v, table, 16), lens.tolist())
    check(with_kvcache(q, pool_k, pool_v, cache_seqlens=lens, block_table=table), want, q.dtype)


def test_decode_kernel_agrees_with_dispatch_backends():
    q, kc, vc, k, v, lens = make(4, dtype=torch.float32, seed=3)
    kc2, vc2 = appended(kc, vc, k, v, lens)
    auto = with_kvcache(q, kc, vc, k, v, cache_seqlens=lens, window=(9, None))
    for backend in ("sdpa:flash", "chunked", "einsum"):
        plan = explain_kvcache(q, kc2, vc2, cache_seqlens=lens + 4, window=(9, None), backend=backend)
        assert (plan.path, plan.backend) == ("dispatch", backend)
        got = with_kvcache(q, kc2, vc2, cache_seqlens=lens + 4, window=(9, None), backend=backend)
        torch.testing.assert_close(got, auto, **tolerance(torch.float32))


def test_a_row_with_every_key_masked_gives_zero(small_splits):
    q, kc, vc, k, v, lens = make(1)
    mask = torch.ones(B, CAP, dtype=torch.bool)
    mask[1] = False
    out = with_kvcache(q, kc, vc, k, v, cache_seqlens=lens, mask=mask)
    assert (out[1] == 0).all() and (out[2] != 0).any()


# garbage and NaN


@pytest.mark.parametrize("paged_cache", [False, True])
def test_garbage_past_the_lengths_never_reaches_a_row(paged_cache, small_splits):
    """Uninitialised caches: NaN and inf everywhere no row may see (past the lengths, masked keys)."""
    q, kc, vc, k, v, lens = make(4)
    want_k, want_v = appended(kc, vc, k, v, lens)
    mask = torch.rand(B, CAP) > 0.3
    for row, s in enumerate((lens + 4).tolist()):
        kc[row, :, s:], vc[row, :, s:] = math.nan, math.inf
        want_k[row, :, s:], want_v[row, :, s:] = math.nan, math.inf
    hidden = ~mask & (torch.arange(CAP) < (lens + 4)[:, None])
    vc.masked_fill_(hidden[:, None, :, None], math.nan)
    want_v.masked_fill_(hidden[:, None, :, None], math.nan)
    want = reference(q, want_k, want_v, (lens + 4).tolist(), mask=mask)
    assert want.isfinite().all()
    if paged_cache:
        pool_k, pool_v, table = paged(kc, vc, block_size=16)
        got = with_kvcache(q, pool_k, pool_v, k, v, cache_seqlens=lens, block_table=table, mask=mask)
    else:
        got = with_kvcache(q, kc, vc, k, v, cache_seqlens=lens, mask=mask)
    check(got, want, q.dtype)


def test_a_nan_key_reaches_exactly_the_rows_that_see_it():
    q, kc, vc, _, _, _ = make(4)
    kc[1, 0, 21] = math.nan  # row 1, kv head 0, position 21: seen by queries 1..3 (causal), heads 0..3
    out = with_kvcache(q, kc, vc, cache_seqlens=torch.tensor([24, 24, 24], dtype=torch.int32))
    nan_rows = out.isnan().any(-1)
    want = torch.zeros(B, H, 4, dtype=torch.bool)
    want[1, : H // G, 1:] = True
    assert torch.equal(nan_rows, want)


# the append


def test_append_writes_in_place_at_the_edges():
    q, kc, vc, k, v, lens = make(5)  # lengths 0, 7 and cap - 5
    ptrs = (kc.data_ptr(), vc.data_ptr())
    want_k, want_v = appended(kc, vc, k, v, lens)
    with_kvcache(q, kc, vc, k, v, cache_seqlens=lens)
    assert (kc.data_ptr(), vc.data_ptr()) == ptrs
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v)


@pytest.mark.parametrize("paged_cache", [False, True])
def test_append_many_tokens_at_once(paged_cache):
    """b * i > 64: one indexed copy per cache instead of slice copies."""
    q, kc, vc, k, v, lens = make(17, b=4)
    want = reference(q, *appended(kc, vc, k, v, lens), (lens + 17).tolist())
    if paged_cache:
        pool_k, pool_v, table = paged(kc, vc, block_size=8)
        got = with_kvcache(q, pool_k, pool_v, k, v, cache_seqlens=lens, block_table=table)
        kc, vc = unpaged(pool_k, table, 8), unpaged(pool_v, table, 8)
    else:
        got = with_kvcache(q, kc, vc, k, v, cache_seqlens=lens)
    check(got, want, q.dtype)
    want_k, want_v = appended(*make(17, b=4)[1:3], k, v, lens)
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v)


def test_append_through_pages():
    q, kc, vc, k, v, lens = make(5)
    pool_k, pool_v, table = paged(kc, vc, block_size=8)
    spare = sorted(set(range(pool_k.shape[0])) - set(table.flatten().tolist()))
    untouched = pool_k[spare].clone(), pool_v[spare].clone()  # the pages no row uses
    with_kvcache(q, pool_k, pool_v, k, v, cache_seqlens=lens, block_table=table)
    want_k, want_v = appended(kc, vc, k, v, lens)
    assert torch.equal(unpaged(pool_k, table, 8), want_k) and torch.equal(unpaged(pool_v, table, 8), want_v)
    assert len(spare) == 3 and torch.equal(pool_k[spare], untouched[0]) and torch.equal(pool_v[spare], untouched[1])


def test_a_thousand_steps_keep_the_storage_and_the_memory_flat():
    b, h, g, d, cap = 2, 4, 2, 16, 1100
    k_cache, v_cache = torch.zeros(b, g, cap, d), torch.zeros(b, g, cap, d)
    ptrs = (k_cache.data_ptr(), v_cache.data_ptr())
    lens = torch.tensor([0, 50], dtype=torch.int32)
    gen = torch.Generator().manual_seed(0)
    rss = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny calls: no thread pool to wait for (2 threads on a shared 2-core box can stall)
    try:
        run_steps(1000, b, h, g, d, k_cache, v_cache, lens, gen, rss)
    finally:
        torch.set_num_threads(threads)
    assert (k_cache.data_ptr(), v_cache.data_ptr()) == ptrs
    assert torch.equal(k_cache[1, :, 1050:], torch.zeros(g, 50, d))  # nothing written past the last step
    assert rss[1] - rss[0] < 8 * 1024  # < 8 MiB of peak growth over 900 steps (the cache is 0.3 MiB)


def run_steps(n, b, h, g, d, k_cache, v_cache, lens, gen, rss):
    with torch.inference_mode():
        for step in range(n):
            q, k, v = (torch.randn(b, n, 1, d, generator=gen) for n in (h, g, g))
            with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=lens)
            lens += 1
            if step in (100, n - 1):
                rss.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # KiB on Linux


# explain


def test_explain_names_the_path_and_writes_nothing():
    q, kc, vc, k, v, lens = make(1)
    before = kc.clone()
    plan = explain_kvcache(q, kc, vc, k, v, cache_seqlens=lens)
    assert torch.equal(kc, before)
    assert plan.path == "decode" and plan.backend is None and plan.lengths == (1, 8, 48)
    assert "decode kernel" in str(plan) and plan.rows == "per row" and plan.calls == 3

    long_q = make(17)[0]
    plan = explain_kvcache(long_q, kc, vc, cache_seqlens=torch.tensor([17, 20, 48], dtype=torch.int32))
    assert plan.path == "dispatch" and plan.backend in attend.list_backends()
    assert any("DECODE_ROWS" in why for why in plan.reasons)
    assert plan.report is not None and "SELECTED" in str(plan)

    pool_k, pool_v, table = paged(kc, vc, block_size=16)
    plan = explain_kvcache(q, pool_k, pool_v, k, v, cache_seqlens=lens, block_table=table)
    assert plan.path == "decode" and plan.paged == "in place" and "paged" in str(plan)


# errors


def _everything_unchanged(*tensors):
    copies = [t.clone() for t in tensors]
    return lambda: all(torch.equal(a, b) for a, b in zip(tensors, copies))


@pytest.mark.parametrize(
    "override, error, words",
    [
        ({"cache_seqlens": torch.tensor([0, 7, 45], dtype=torch.int32)}, ValueError, "capacity 48"),
        ({"cache_seqlens": torch.tensor([0, -1, 5], dtype=torch.int32)}, ValueError, ">= 0"),
        ({"cache_seqlens": torch.tensor([0, 7, 5])}, None, None),  # int64 is accepted
        ({"cache_seqlens": torch.tensor([0.0, 7.0, 5.0])}, TypeError, "int32"),
        ({"cache_seqlens": torch.tensor([0, 7], dtype=torch.int32)}, ValueError, "(b,)"),
        ({"v": None}, ValueError, "both"),
        ({"k": torch.randn(3, 2, 2, 16, dtype=torch.float64)}, ValueError, "one new key/value per query"),
        ({"q": torch.randn(3, 8, 4, 16)}, TypeError, "one dtype"),
        ({"q": torch.randn(3, 5, 4, 16, dtype=torch.float64)}, ValueError, "multiple"),
        ({"q": torch.randn(3, 8, 4, 8, dtype=torch.float64)}, ValueError, "head dim"),
        (
            {"k_cache": torch.randn(2, 2, 48, 16, dtype=torch.float64), "v_cache": torch.randn(2, 2, 48, 16).double()},
            ValueError,
            "one row per query row",
        ),
        ({"mask": torch.ones(3, 40, dtype=torch.bool)}, ValueError, "capacity"),
        ({"mask": torch.ones(3, 48)}, TypeError, "bool"),
        ({"bias": torch.zeros(3, 8, 4, 40, dtype=torch.float64)}, ValueError, "cap"),
        ({"window": (2, -1)}, ValueError, "window"),
        ({"backend": "nope"}, ValueError, "backend name"),
        ({"backend": "sdpa:efficient"}, ValueError, "cannot run these inputs"),  # the dispatcher's own message
    ],
)
def test_bad_inputs_raise_before_any_write(override, error, words):
    q, kc, vc, k, v, lens = make(4)
    args = {"q": q, "k_cache": kc, "v_cache": vc, "k": k, "v": v, "cache_seqlens": lens}
    args.update(override)
    unchanged = _everything_unchanged(kc, vc)
    if error is None:
        with_kvcache(**args)
        return
    with pytest.raises(error) as info:
        with_kvcache(**args)
    assert words in str(info.value)
    assert "expected" in str(info.value) or "backend" in args
    assert unchanged()
    if args.get("backend") == "sdpa:efficient":  # explain reports the named backend's reasons instead
        assert explain_kvcache(**args).backend is None
        return
    with pytest.raises(error):
        explain_kvcache(**args)


@pytest.mark.parametrize(
    "table, words",
    [
        (lambda t: t.masked_fill(t == t[2, 2], 99), "[0, num_blocks)"),
        (lambda t: t.long().float(), "int32"),
        (lambda t: t[:2], "(b, max_blocks)"),
        (lambda t: t.masked_fill(t == t[1, 0], -1), "block_table[1, 0] = -1"),
    ],
)
def test_bad_block_table_raises_before_any_write(table, words):
    q, kc, vc, k, v, lens = make(4)
    pool_k, pool_v, good = paged(kc, vc, block_size=16)
    unchanged = _everything_unchanged(pool_k, pool_v)
    with pytest.raises((ValueError, TypeError)) as info:
        with_kvcache(q, pool_k, pool_v, k, v, cache_seqlens=lens, block_table=table(good.clone()))
    assert "expected" in str(info.value) and words in str(info.value)
    assert unchanged()


def test_unused_block_table_entries_are_not_read():
    q, kc, vc, k, v, lens = make(1)
    pool_k, pool_v, table = paged(kc, vc, block_size=16)
    table[0, 1:] = -1  # row 0 holds 1 token: only its first page is in use
    with_kvcache(q, pool_k, pool_v, k, v, cache_seqlens=lens, block_table=table)


def test_grad_is_refused_before_any_write():
    q, kc, vc, k, v, lens = make(1)
    unchanged = _everything_unchanged(kc, vc)
    with pytest.raises(RuntimeError, match="requires_grad.*hint: run it under torch.no_grad"):
        with_kvcache(q.requires_grad_(True), kc, vc, k, v, cache_seqlens=lens)
    assert unchanged()
    with torch.no_grad():
        with_kvcache(q, kc, vc, k, v, cache_seqlens=lens)  # no grad mode: fine


@pytest.mark.parametrize("split", [False, True])
def test_strided_layouts(split, request):
    """A (b, cap, g, d) cache viewed as (b, g, cap, d), and a non-contiguous q (b, i, h, d) -> (b, h, i, d)."""
    if split:
        request.getfixturevalue("small_splits")
    q, kc, vc, k, v, lens = make(2)
    want = reference(q, *appended(kc, vc, k, v, lens), (lens + 2).tolist())
    kc_t, vc_t = kc.transpose(1, 2).contiguous().transpose(1, 2), vc.transpose(1, 2).contiguous().transpose(1, 2)
    q_t = q.transpose(1, 2).contiguous().transpose(1, 2)
    got = with_kvcache(q_t, kc_t, vc_t, k, v, cache_seqlens=lens)
    check(got, want, q.dtype)
    assert torch.equal(kc_t, appended(kc, vc, k, v, lens)[0])


def test_ragged_causal_rows_need_a_backend_that_takes_per_row_positions():
    """A ragged cache's dispatch inputs carry per-row positions (q_pos) even when the window folds into causal:
    a backend declaring no window must say so (it did not, and would have been chosen)."""
    from dataclasses import replace

    from attend.backends.base import Backend, Caps
    from attend.kvcache import _dispatch_inputs, _prepare

    class NoWindow(Backend):
        name = "no-window"
        caps = {"cpu": Caps(mask=False, window=False, documents=False)}

    q, kc, vc, k, v, lens = make(3)
    lens = torch.tensor([3, 9, 5], dtype=torch.int32)
    call = _prepare(q, kc, vc, None, None, lens, None, None, None, True, None, None, None)
    inp = _dispatch_inputs(call, stand_in=True)
    assert inp.q_pos is not None and inp.window is None
    reasons = NoWindow().reasons_unsupported(inp)
    assert any("per-row query positions" in r for r in reasons), reasons
    assert not NoWindow().reasons_unsupported(replace(inp, q_pos=None, causal=False))
