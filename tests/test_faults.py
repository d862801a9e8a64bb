"""Faults lose nothing, and hide nothing: a backend that cannot run the inputs after all (out of memory, "No
available kernel") is retried in auto mode on the next eligible one with exactly one `AttendFallbackWarning`
that points at the caller's line, and is not tried again for that signature (`explain` then names the one
that runs); out of memory lands on a backend that holds no (i, j) intermediate (`chunked` on CPU); any other
error propagates untouched; a named backend re-raises with context. Failures are injected by monkeypatching
`run`.

Registry-driven: which backend auto picks, and which one it falls back to, come from the dispatcher.
"""

from __future__ import annotations

import warnings
from dataclasses import replace

import pytest
import torch

import attend
from attend import Attend, AttendFallbackWarning, attention, dispatch, get_backend
from attend.backends.einsum import EinsumBackend
from attend.inputs import validate
from attend.testing import tolerance

# helpers


def _inputs(grad=False):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 7, 8, generator=gen)
    k = torch.randn(2, 2, 9, 8, generator=gen)
    v = torch.randn(2, 2, 9, 8, generator=gen)
    mask = torch.rand(2, 9, generator=gen) > 0.3
    if grad:
        q, k, v = (t.requires_grad_() for t in (q, k, v))
    return q, k, v, mask


def _reference(q, k, v, mask, causal=True):
    return attention(*(t.detach().double() for t in (q, k, v)), mask=mask, causal=causal, backend="einsum")


def _break(monkeypatch, name, exc):
    calls = []

    def run(inp):
        calls.append(name)
        raise exc

    monkeypatch.setattr(get_backend(name), "run", run)
    return calls


@pytest.fixture(autouse=True)
def _fresh_cache():
    dispatch.clear_cache()
    yield
    dispatch.clear_cache()


def _no_kernel(name: str) -> RuntimeError:
    return RuntimeError(f"{name}: No available kernel. Aborting execution.")


class FakeChunked(EinsumBackend):
    """Stands in for the memory-bounded backend when it is not registered (or replaces it for the test)."""

    name = "chunked"
    caps = {device: replace(c, dense_scores=False) for device, c in EinsumBackend.caps.items()}
    ran = 0

    def run(self, inp):
        FakeChunked.ran += 1
        return super().run(inp)


# tests


def test_auto_retries_on_next_eligible_with_one_warning(monkeypatch):
    q, k, v, mask = _inputs(grad=True)
    inp = validate(q, k, v, mask=mask, causal=True)
    first = dispatch.select(inp).name
    rest = dispatch.fallbacks(inp, {first})
    if not rest:
        pytest.skip(f"only {first} can run this case here")
    calls = _break(monkeypatch, first, _no_kernel(first))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = attention(q, k, v, mask=mask, causal=True)
    assert calls == [first]
    fallback = [w for w in caught if issubclass(w.category, AttendFallbackWarning)]
    assert len(caught) == 1 and len(fallback) == 1
    text = str(fallback[0].message)
    assert first in text and "No available kernel" in text and f"retried on {rest[0].name!r}" in text
    assert fallback[0].filename == __file__  # the warning points at the caller's line
    torch.testing.assert_close(out.double(), _reference(q, k, v, mask), **tolerance(torch.float32))
    out.sum().backward()  # the training step goes on: gradients from the fallback backend
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    # remembered for this signature: not tried again, no second warning, and explain names what runs
    assert dispatch.select(inp).name == rest[0].name
    assert attend.explain(q, k, v, mask=mask, causal=True).backend == rest[0].name
    reasons = attend.explain(q, k, v, mask=mask, causal=True).reasons[first]
    assert any("failed at run time for these inputs" in r for r in reasons)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attention(q, k, v, mask=mask, causal=True)
    assert calls == [first]


def test_warning_category_is_a_runtime_warning():
    assert issubclass(AttendFallbackWarning, RuntimeWarning)
    assert attend.AttendFallbackWarning is AttendFallbackWarning


def test_out_of_memory_lands_on_chunked(monkeypatch):
    q, k, v, mask = _inputs()
    monkeypatch.setitem(dispatch._registry, "chunked", FakeChunked())
    dispatch.clear_cache()
    first = dispatch.select(validate(q, k, v, mask=mask, causal=True)).name
    assert first != "chunked" or pytest.skip("chunked is auto's first choice here")
    _break(monkeypatch, first, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB"))
    FakeChunked.ran = 0
    with pytest.warns(AttendFallbackWarning, match="retried on 'chunked'"):
        out = attention(q, k, v, mask=mask, causal=True)
    assert FakeChunked.ran == 1
    torch.testing.assert_close(out.double(), _reference(q, k, v, mask), **tolerance(torch.float32))


def test_cpu_allocator_failure_counts_as_out_of_memory(monkeypatch):
    q, k, v, mask = _inputs()
    monkeypatch.setitem(dispatch._registry, "chunked", FakeChunked())
    dispatch.clear_cache()
    first = dispatch.select(validate(q, k, v, mask=mask)).name
    _break(monkeypatch, first, RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"))
    with pytest.warns(AttendFallbackWarning, match="retried on 'chunked'"):
        attention(q, k, v, mask=mask)


def test_kernel_error_follows_priority_not_chunked(monkeypatch):
    """Only a memory failure jumps to `chunked`; a kernel that cannot run takes the next backend in priority."""
    q, k, v, mask = _inputs()
    monkeypatch.setitem(dispatch._registry, "chunked", FakeChunked())
    dispatch.clear_cache()
    inp = validate(q, k, v, mask=mask)
    first = dispatch.select(inp).name
    expected = dispatch.fallbacks(inp, {first})[0].name
    _break(monkeypatch, first, _no_kernel(first))
    with pytest.warns(AttendFallbackWarning, match=f"retried on {expected!r}"):
        attention(q, k, v, mask=mask)


def test_chained_failures_then_success_warn_once(monkeypatch):
    q, k, v, mask = _inputs()
    inp = validate(q, k, v, mask=mask)
    order = [dispatch.select(inp).name] + [b.name for b in dispatch.fallbacks(inp, {dispatch.select(inp).name})]
    if len(order) < 3:
        pytest.skip("needs three eligible backends")
    for name in order[:2]:
        _break(monkeypatch, name, _no_kernel(name))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = attention(q, k, v, mask=mask)
    assert len(caught) == 1
    text = str(caught[0].message)
    assert f"{order[0]}: No available" in text and f"{order[1]}: No available" in text
    assert f"retried on {order[2]!r}" in text
    torch.testing.assert_close(out.double(), _reference(q, k, v, mask, causal=False), **tolerance(torch.float32))


def test_every_backend_fails(monkeypatch):
    q, k, v, mask = _inputs()
    inp = validate(q, k, v, mask=mask)
    names = [dispatch.select(inp).name] + [b.name for b in dispatch.fallbacks(inp, {dispatch.select(inp).name})]
    for name in names:
        _break(monkeypatch, name, _no_kernel(name))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no success, so no fallback warning either
        with pytest.raises(RuntimeError) as info:
            attention(q, k, v, mask=mask)
    if len(names) > 1:
        assert str(info.value).startswith("attend: every eligible backend failed: ")
        assert all(f"{n}: No available kernel" in str(info.value) for n in names)
        assert isinstance(info.value.__cause__, RuntimeError)
    else:
        assert str(info.value) == str(_no_kernel(names[0]))


def test_only_one_eligible_reraises_original(monkeypatch):
    """With nothing else to try, the original error comes back untouched (same type, same message)."""
    q, k, v, mask = _inputs()
    inp = validate(q, k, v, mask=mask)
    first = dispatch.select(inp).name
    for other in dispatch.fallbacks(inp, {first}):
        monkeypatch.setattr(other, "reasons_unsupported", lambda inp: ["disabled for this test"])
    err = torch.OutOfMemoryError("CUDA out of memory")
    _break(monkeypatch, first, err)
    with pytest.raises(torch.OutOfMemoryError) as info:
        attention(q, k, v, mask=mask)
    assert info.value is err


@pytest.mark.parametrize("exc", [RuntimeError("kernel failed"), torch.OutOfMemoryError("CUDA out of memory")])
def test_named_backend_reraises_with_context(monkeypatch, exc):
    q, k, v, mask = _inputs()
    name = dispatch.select(validate(q, k, v, mask=mask)).name
    _break(monkeypatch, name, exc)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeError) as info:
            attention(q, k, v, mask=mask, backend=name)
    assert str(info.value) == f"backend {name!r} failed: {type(exc).__name__}: {exc}"
    assert info.value.__cause__ is exc


def test_attend_flash_false_is_named(monkeypatch):
    """Attend(flash=False) names the einsum backend: it re-raises, it does not fall back."""
    q, k, v, mask = _inputs()
    _break(monkeypatch, "einsum", RuntimeError("boom"))
    with pytest.raises(RuntimeError, match="backend 'einsum' failed: RuntimeError: boom"):
        Attend(flash=False)(q, k, v, mask=mask)


def test_module_auto_retries(monkeypatch):
    q, k, v, mask = _inputs()
    attn = Attend(causal=True)
    first = attn.explain(q, k, v, mask=mask).backend
    inp = validate(q, k, v, mask=mask, causal=True)
    if not dispatch.fallbacks(inp, {first}):
        pytest.skip("one eligible backend")
    _break(monkeypatch, first, _no_kernel(first))
    with pytest.warns(AttendFallbackWarning) as record:
        out = attn(q, k, v, mask=mask)
    assert record[0].filename == __file__  # not torch/nn/modules/module.py
    torch.testing.assert_close(out.double(), _reference(q, k, v, mask), **tolerance(torch.float32))


@pytest.mark.parametrize(
    "err",
    [RuntimeError("CUDA error: an illegal memory access was encountered"), RuntimeError("shape '[2, 3]' is invalid")],
    ids=["illegal-memory-access", "plain-bug"],
)
def test_other_runtime_errors_propagate_untouched(monkeypatch, err):
    """A RuntimeError that is neither out of memory nor "cannot run these inputs" is a fault to see, not to
    hide: auto mode re-raises it as it is, tries no other backend and remembers nothing."""
    q, k, v, mask = _inputs()
    inp = validate(q, k, v, mask=mask)
    first = dispatch.select(inp).name
    calls = _break(monkeypatch, first, err)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeError) as info:
            attention(q, k, v, mask=mask)
    assert info.value is err and calls == [first]
    assert dispatch.select(inp).name == first


def test_out_of_memory_falls_back_once_and_is_remembered(monkeypatch):
    q, k, v, mask = _inputs()
    monkeypatch.setitem(dispatch._registry, "chunked", FakeChunked())
    dispatch.clear_cache()
    first = dispatch.select(validate(q, k, v, mask=mask)).name
    calls = _break(monkeypatch, first, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB"))
    FakeChunked.ran = 0
    with pytest.warns(AttendFallbackWarning, match="retried on 'chunked'"):
        attention(q, k, v, mask=mask)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            attention(q, k, v, mask=mask)
    assert calls == [first] and FakeChunked.ran == 4
    assert attend.explain(q, k, v, mask=mask).backend == "chunked"


def test_drop_in_fallback_warning_points_at_the_caller(monkeypatch):
    q, k, v, mask = _inputs()
    first = dispatch.select(validate(q, k, v, mask=mask[:, None, None, :])).name
    _break(monkeypatch, first, _no_kernel(first))
    with pytest.warns(AttendFallbackWarning) as record:
        attend.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :], enable_gqa=True)
    assert record[0].filename == __file__


def test_programming_errors_are_not_retried(monkeypatch):
    """Only run-time failures (RuntimeError, MemoryError) are retried; a TypeError is a bug and surfaces."""
    q, k, v, mask = _inputs()
    first = dispatch.select(validate(q, k, v, mask=mask)).name
    _break(monkeypatch, first, TypeError("bad argument"))
    with pytest.raises(TypeError, match="bad argument"):
        attention(q, k, v, mask=mask)


def test_flash_true_falls_back_past_fused_kernels(monkeypatch):
    """Attend(flash=True) runs a fused kernel; when it fails at run time and no other fused kernel can run,
    the step is not lost: any eligible backend takes over (as when no fused kernel can run at all)."""
    q, k, v, mask = _inputs()
    inp = validate(q, k, v, mask=mask)
    fused = dispatch.select(inp, fused_only=True)
    others = dispatch.fallbacks(inp, {fused.name})
    for other in others:
        if other.fused:
            _break(monkeypatch, other.name, _no_kernel(other.name))
    landing = next((b for b in others if not b.fused), None)
    if landing is None:
        pytest.skip("no non-fused backend eligible")
    _break(monkeypatch, fused.name, _no_kernel(fused.name))
    with pytest.warns(AttendFallbackWarning, match=f"retried on {landing.name!r}"):
        out = Attend(flash=True)(q, k, v, mask=mask)
    torch.testing.assert_close(out.double(), _reference(q, k, v, mask, causal=False), **tolerance(torch.float32))


CASES = [
    dict(),
    dict(causal=True),
    dict(mask="padding"),
    dict(mask="bool", causal=True),
    dict(bias=True),
    dict(bias=True, causal=True, mask="padding"),
    dict(gqa=True, causal=True),
]


@pytest.mark.parametrize("case", CASES, ids=[str(c) for c in CASES])
@pytest.mark.parametrize("flash", [None, True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_drop_in_emits_no_warnings(case, flash, dtype):
    """The seed drop-in `Attend(dropout, flash)` must be silent in normal operation (forward, backward,
    training with dropout, eval), including transposed views."""
    gen = torch.Generator().manual_seed(0)
    g = 2 if case.get("gqa") else 4
    q = torch.randn(2, 4, 16, 8, generator=gen).transpose(-1, -2)  # (2, 4, 8, 16), last dim strided
    q = q.to(dtype).requires_grad_()
    k = torch.randn(2, g, 12, 16, generator=gen, dtype=dtype).requires_grad_()
    v = torch.randn(2, g, 12, 16, generator=gen, dtype=dtype).requires_grad_()
    mask = None
    if case.get("mask") == "padding":
        mask = torch.rand(2, 12, generator=gen) > 0.3
    elif case.get("mask") == "bool":
        mask = torch.rand(2, 1, 8, 12, generator=gen) > 0.3
    bias = torch.randn(4, 8, 12, generator=gen, dtype=dtype) if case.get("bias") else None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for training in (True, False):
            attn = Attend(dropout=0.1, flash=flash).train(training)
            out = attn(q, k, v, mask=mask, bias=bias, causal=case.get("causal"))
            out.float().sum().backward()
            attn.explain(q, k, v, mask=mask, bias=bias, causal=case.get("causal"))


def test_out_of_memory_frees_the_failed_attempt_before_retrying(monkeypatch):
    """The failed backend's intermediates (held by its traceback frames) are released before the retry."""
    import gc
    import weakref

    q, k, v, mask = _inputs()
    inp = validate(q, k, v, mask=mask)
    first = dispatch.select(inp).name
    if not dispatch.fallbacks(inp, {first}, oom=True):
        pytest.skip("one eligible backend")
    refs = []

    def run(inp):
        big = torch.empty(1024)  # stands in for a large intermediate of the failed kernel
        refs.append(weakref.ref(big))
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(get_backend(first), "run", run)
    seen_alive = []
    for other in dispatch.fallbacks(inp, {first}, oom=True)[:1]:
        original = other.run

        def spy(inp, original=original):
            gc.collect()
            seen_alive.append(refs[0]() is not None)
            return original(inp)

        monkeypatch.setattr(other, "run", spy)
    with pytest.warns(AttendFallbackWarning):
        attention(q, k, v, mask=mask)
    assert seen_alive == [False]
