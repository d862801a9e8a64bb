"""Concurrency: many threads calling `attention` with different shapes, dtypes and masks at once get
correct results, and the dispatch cache stays consistent: every cached choice equals a fresh, uncached
selection for its inputs.
"""

from __future__ import annotations

import threading

import pytest
import torch

from attend import Attend, attention, dispatch, get_backend
from attend.inputs import Options, validate
from attend.testing import DTYPES, assert_matches_reference

THREADS, CALLS = 8, 20

# helpers


@pytest.fixture(autouse=True)
def _fresh_cache():
    dispatch.clear_cache()
    yield
    dispatch.clear_cache()


def _case(thread: int, call: int):
    """A different case per (thread, call): shapes, dtype, mask kind, causal, grad, module or function."""
    gen = torch.Generator().manual_seed(1000 * thread + call)
    pick = lambda n: int(torch.randint(0, n, (1,), generator=gen))  # noqa: E731
    g = [1, 2][pick(2)]
    h = g * [1, 2, 4][pick(3)]
    b, i, j, d = 1 + pick(2), [1, 5, 16, 33][pick(4)], [1, 7, 16, 40][pick(4)], [8, 16][pick(2)]
    dtype = DTYPES[(thread + call) % len(DTYPES)]
    q = torch.randn(b, h, i, d, generator=gen).to(dtype)
    k = torch.randn(b, g, j, d, generator=gen).to(dtype)
    v = torch.randn(b, g, j, d, generator=gen).to(dtype)
    kind = pick(4)
    mask = bias = None
    if kind == 1:
        mask = torch.rand(b, j, generator=gen) > 0.3
    elif kind == 2:
        mask = torch.rand(b, 1, i, j, generator=gen) > 0.3
    elif kind == 3:
        bias = torch.randn(h, i, j, generator=gen).to(dtype)
    return dict(q=q, k=k, v=v, mask=mask, bias=bias, causal=bool(pick(2)), grad=bool(pick(2)), module=bool(pick(2)))


def _fresh_choice(inp) -> str:
    """What auto would pick with no cache at all."""
    for name in dispatch._priority(inp.device.type):
        if not get_backend(name).reasons_unsupported(inp):
            return name
    raise AssertionError("nothing eligible")


def _run_threads(work):
    errors: list[BaseException] = []
    barrier = threading.Barrier(THREADS)

    def target(t):
        try:
            barrier.wait()
            for c in range(CALLS):
                work(t, c)
        except BaseException as err:  # noqa: BLE001 - reported by the main thread
            errors.append(err)

    threads = [threading.Thread(target=target, args=(t,)) for t in range(THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=300)
    assert not any(th.is_alive() for th in threads), "a thread hung"
    if errors:
        raise errors[0]


# tests


def test_many_threads_get_correct_results_and_a_consistent_cache():
    seen: list = []
    lock = threading.Lock()

    def work(t, c):
        case = _case(t, c)
        q, k, v = case["q"], case["k"], case["v"]
        if case["grad"]:
            q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
        kw = dict(mask=case["mask"], bias=case["bias"], causal=case["causal"])
        out = Attend()(q, k, v, **kw) if case["module"] else attention(q, k, v, **kw)
        golden = attention(*(x.detach().double() for x in (q, k, v)), backend="einsum",
                           mask=kw["mask"], bias=None if kw["bias"] is None else kw["bias"].double(), causal=kw["causal"])  # fmt: skip
        baseline = attention(*(x.detach() for x in (q, k, v)), backend="einsum", **kw)
        assert_matches_reference(out.detach(), golden, baseline)
        if case["grad"]:
            out.float().sum().backward()
            assert torch.isfinite(q.grad).all()
        with lock:
            # the key `attention`/`Attend` cache this call under (their options: no dropout in this test)
            options = (Options(causal=kw["causal"]), None, False)  # (options, backend, fused_only), as `call` keys
            seen.append((dispatch._call_key(q, k, v, kw["mask"], kw["bias"], options), validate(q, k, v, **kw)))

    _run_threads(work)
    assert len(seen) == THREADS * CALLS
    # every cached choice equals a fresh uncached selection for the inputs it was cached for
    inputs = dict(seen)
    checked = 0
    for key, cached in list(dispatch._cache.items()):
        assert cached.value.backend.name in dispatch._registry
        if cached.value.auto and key in inputs:
            assert cached.value.backend.name == _fresh_choice(inputs[key]), inputs[key].describe()
            checked += 1
    assert checked >= len(inputs) // 2


def test_cache_stays_consistent_while_another_thread_clears_it():
    stop = threading.Event()

    def clearer():
        while not stop.is_set():
            dispatch.clear_cache()

    bg = threading.Thread(target=clearer)
    bg.start()
    try:

        def work(t, c):
            case = _case(t, c)
            inp = validate(case["q"], case["k"], case["v"], mask=case["mask"], bias=case["bias"], causal=case["causal"])
            assert dispatch.select(inp).name == _fresh_choice(inp)

        _run_threads(work)
    finally:
        stop.set()
        bg.join()
    for cached in list(dispatch._cache.values()):
        assert cached.value.backend.name in dispatch._registry


def test_a_choice_made_before_a_registry_change_is_not_cached(monkeypatch):
    """A call that chose under the old registry must not cache its answer after a change (the generation
    counter): simulate the race by changing the registry from inside the eligibility check."""
    dispatch.clear_cache()
    q = torch.randn(1, 2, 4, 8)
    first = dispatch._priority("cpu")[0]
    backend = get_backend(first)
    original = backend.reasons_unsupported

    def racing(inp):
        dispatch.clear_cache()  # another thread registers a backend or clears the cache right now
        return original(inp)

    monkeypatch.setattr(backend, "reasons_unsupported", racing)
    attention(q, q, q)
    assert dispatch._cache == {}
    monkeypatch.undo()
    attention(q, q, q)
    assert [cached.value.backend.name for cached in dispatch._cache.values()] == [first]


def test_threads_leave_the_sdpa_kernel_switches_as_they_were():
    """attend pins an SDPA variant by flipping PyTorch's process-wide kernel switches around the call: threads
    doing it at once must not restore each other's flips (that left flash switched off for the rest of the
    process)."""
    from attend.backends.sdpa import _switch_state

    before = _switch_state()
    names = ("sdpa:flash", "sdpa:math")

    def work(t, c):
        q = torch.randn(1, 2, 8 + c % 3, 8)
        attention(q, q, q, backend=names[(t + c) % 2], causal=bool(c % 2))

    for _ in range(5):
        _run_threads(work)
        assert _switch_state() == before
