"""Which backend auto picks (a table), pinned backends, NoBackendError, explain and the cache."""

from __future__ import annotations

import math

import pytest
import torch

import attend
from attend import NoBackendError, attention, dispatch, explain, features, list_backends
from attend.inputs import validate
from attend.testing import tolerance

from .helpers import make_qkv

PAD = torch.ones(2, 24, dtype=torch.bool)

# (description, kwargs for make_qkv, kwargs for attention, expected backend on CPU)
CPU_TABLE = [
    ("plain f32", {}, {}, "sdpa:flash"),
    ("causal", {}, {"causal": True}, "sdpa:flash"),
    ("key padding + causal", {}, {"mask": PAD, "causal": True}, "sdpa:flash"),
    ("bf16 GQA", {"dtype": torch.bfloat16}, {}, "sdpa:flash"),
    ("float64", {"dtype": torch.float64}, {}, "sdpa:flash"),
    ("dropout (CPU flash has none)", {}, {"dropout_p": 0.1}, "sdpa:math"),
    ("bf16 training (CPU flash backward inexact)", {"dtype": torch.bfloat16, "grad": True}, {}, "sdpa:math"),
    ("f32 training", {"grad": True}, {}, "sdpa:flash"),
    ("e != d", {"e": 16}, {}, "sdpa:math"),
    ("bias that requires grad", {}, {"bias": torch.zeros(1, 4, 16, 24, requires_grad=True)}, "sdpa:math"),
]


@pytest.mark.parametrize("desc, shape_kw, kw, expected", CPU_TABLE, ids=[row[0] for row in CPU_TABLE])
def test_auto_picks_on_cpu(desc, shape_kw, kw, expected):
    q, k, v = make_qkv(**shape_kw)
    if q.dtype in (torch.float16, torch.bfloat16) and not features.get("sdpa_cpu_half_exact").present():
        expected = "chunked"  # this torch's CPU SDPA kernels are not exact in half precision
    report = explain(q, k, v, **kw)
    assert report.backend == expected, str(report)
    assert dispatch.select(validate(q, k, v, **kw)).name == expected


def test_explain_lists_every_backend_with_reasons():
    q, k, v = make_qkv()
    report = explain(q, k, v, dropout_p=0.1)
    assert set(report.reasons) == set(list_backends())
    assert report.reasons["sdpa:flash"] == ["dropout_p=0.1 > 0; this backend has no dropout"]
    assert report.reasons["sdpa:efficient"] == ["device=cpu (supported: cuda)"]
    assert report.reasons[report.backend] == []
    text = str(report)
    assert "SELECTED" in text and "sdpa:flash" in text and "no: dropout_p=0.1" in text


def test_pinned_backend_that_cannot_run_lists_reasons_and_hint():
    q, k, v = make_qkv(e=16)
    with pytest.raises(ValueError) as err:
        attention(q, k, v, dropout_p=0.2, backend="sdpa:flash")
    msg = str(err.value)
    assert msg.startswith("backend='sdpa:flash' cannot run these inputs:")
    assert "value head dim e=16 != d=32 (needs e == d)" in msg
    assert "dropout_p=0.2 > 0; this backend has no dropout" in msg
    assert "Hint: `attend explain --shape 2,4,16,32 --kv-heads 2 --kv-len 24 --v-dim 16" in msg


def test_unknown_backend_lists_known_names():
    q, k, v = make_qkv()
    with pytest.raises(ValueError, match=r"expected a backend name among: einsum, sdpa:flash.*got 'flash'"):
        attention(q, k, v, backend="flash")


def test_no_backend_error_format(monkeypatch):
    monkeypatch.setitem(dispatch.PRIORITY, "cpu", ("sdpa:flash", "sdpa:efficient"))
    dispatch.clear_cache()
    q, k, v = make_qkv()
    try:
        with pytest.raises(NoBackendError) as err:
            attention(q, k, v, dropout_p=0.5)
    finally:
        dispatch.clear_cache()
    lines = str(err.value).splitlines()
    assert lines[0] == "No attention backend can run these inputs:"
    assert lines[1].startswith("  q      : shape=(2, 4, 16, 32) dtype=float32 device=cpu")
    assert "`sdpa:flash` cannot run because:" in lines
    assert "    dropout_p=0.5 > 0; this backend has no dropout" in lines
    assert "`sdpa:efficient` cannot run because:" in lines
    assert lines[-1].startswith("Hint: `attend explain --shape 2,4,16,32")


def test_choice_is_cached_per_signature(monkeypatch):
    dispatch.clear_cache()
    calls = []
    flash = dispatch.get_backend("sdpa:flash")
    real = type(flash).reasons_unsupported

    def counting(self, inp):
        calls.append(inp.i)
        return real(self, inp)

    monkeypatch.setattr(type(flash), "reasons_unsupported", counting)
    for _ in range(3):
        attention(*make_qkv(i=16))
    assert calls == [16], "second and third calls must hit the cache"
    attention(*make_qkv(i=17))
    assert calls == [16, 17], "a new shape is a new signature"
    dispatch.clear_cache()


def test_register_backend_inserts_into_priority(monkeypatch):
    from attend.backends.einsum import EinsumBackend

    class Mine(EinsumBackend):
        name = "mine"

    monkeypatch.setattr(dispatch, "_registry", dict(dispatch._registry))
    monkeypatch.setattr(dispatch, "PRIORITY", dict(dispatch.PRIORITY))
    dispatch.register_backend(Mine(), priority={"cpu": 0})
    try:
        assert explain(*make_qkv()).backend == "mine"
        assert "mine" in list_backends()
    finally:
        dispatch.clear_cache()
    with pytest.raises(TypeError, match="expected an attend Backend instance"):
        dispatch.register_backend(object())


def test_slow_path_is_logged_once(caplog):
    """Auto on CUDA landing on einsum/math is logged once with reasons (simulated: SLOW covers cpu here)."""
    q, k, v = make_qkv()
    inp = validate(q, k, v, dropout_p=0.1)
    with caplog.at_level("WARNING", logger="attend"):
        dispatch._logged.clear()
        old = dispatch.SLOW
        dispatch.SLOW = {"cpu": frozenset({"sdpa:math"})}
        try:
            dispatch._log_slow(inp, "sdpa:math", {"sdpa:flash": ["dropout_p=0.1 > 0; this backend has no dropout"]})
            dispatch._log_slow(inp, "sdpa:math", {"sdpa:flash": ["dropout_p=0.1 > 0; this backend has no dropout"]})
        finally:
            dispatch.SLOW = old
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 1 and "slow `sdpa:math`" in msgs[0] and "sdpa:flash: dropout_p=0.1" in msgs[0]


def test_explain_takes_every_option_attention_takes():
    """One vocabulary: explain(...) accepts exactly attention(...)'s keywords, with the same defaults."""
    import inspect

    def params(fn):
        return {n: p.default for n, p in inspect.signature(fn).parameters.items()}

    assert params(attend.explain) == params(attend.attention)


def test_cache_is_bounded_while_decoding():
    """10,000 decode steps with the key length growing by one: the per-signature state stays within
    CACHE_SIZE entries (a server decoding for days does not grow without bound)."""
    dispatch.clear_cache()
    steps = 10_000
    q = torch.randn(1, 2, 1, 8)
    cache = torch.randn(2, 1, 2, steps, 8)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny kernels: one thread, so a busy machine does not slow each step 30x
    try:
        for j in range(1, steps + 1):
            attend.attention(q, cache[0, :, :, :j], cache[1, :, :, :j], causal=True)
            assert len(dispatch._cache) <= dispatch.CACHE_SIZE
    finally:
        torch.set_num_threads(threads)
    assert len(dispatch._cache) == dispatch.CACHE_SIZE
    assert len(dispatch._failed) == 0


def test_nan_check_default_is_the_guard_on_cpu_and_off_elsewhere():
    """check_finite=None (the default) resolves by device and call: on CPU a call that masks anything reads
    its output ("guard"), an unmasked one reads nothing; elsewhere nothing (a CUDA host sync per call would
    stall the GPU pipeline). True is the exact check everywhere, False none."""
    q = torch.randn(1, 2, 3, 8)
    pad = torch.ones(1, 3, dtype=torch.bool)
    assert validate(q, q, q).finite_check is None
    assert validate(q, q, q, causal=True).finite_check == "guard"
    assert validate(q, q, q, mask=pad).finite_check == "guard"
    assert validate(q, q, q, bias=torch.zeros(3, 3)).finite_check == "guard"
    assert validate(q, q, q, window=(1, 0)).finite_check == "guard"
    meta = q.to("meta")
    assert validate(meta, meta, meta, causal=True).finite_check is None
    assert validate(meta, meta, meta, check_finite=True).finite_check == "exact"
    assert validate(q, q, q, check_finite=True).finite_check == "exact"
    assert validate(q, q, q, causal=True, check_finite=False).finite_check is None


@pytest.mark.gpu
def test_default_cuda_call_makes_no_host_sync():
    """Under torch.cuda.set_sync_debug_mode("error") a synchronising call raises: the default path (auto
    choice, masks, the cached fast path) has none; check_finite=True has its documented one."""
    q, k, v = (torch.randn(2, 4, 64, 32, device="cuda", dtype=torch.float16) for _ in range(3))
    pad = torch.ones(2, 64, dtype=torch.bool, device="cuda")
    pad[1, 40:] = False
    attention(q, k, v, mask=pad, causal=True)  # first call of the signature: probes, choice
    torch.cuda.set_sync_debug_mode("error")
    try:
        attention(q, k, v, mask=pad, causal=True)
        attention(q, k, v)
        with pytest.raises(RuntimeError, match="synchroniz"):
            attention(q, k, v, check_finite=True)
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_every_reason_is_listed():
    """A backend lists every reason it cannot run the inputs, not only the first kind: CPU flash with a
    half-precision backward and dropout names both (the dropout one used to hide the other)."""
    q = torch.randn(1, 2, 4, 8, dtype=torch.bfloat16, requires_grad=True)
    reasons = explain(q, q, q, dropout_p=0.1).reasons["sdpa:flash"]
    assert any("dropout_p=0.1" in r for r in reasons)
    assert any("backward in torch.bfloat16 on CPU is inexact" in r for r in reasons)


def test_the_cache_keeps_no_tensor_alive():
    """A cached signature must not hold the first call's activations (512 entries of them would be a leak)."""
    import gc
    import weakref

    dispatch.clear_cache()
    q = torch.randn(1, 2, 16, 8)
    mask = torch.ones(1, 16, dtype=torch.bool)
    refs = [weakref.ref(t) for t in (q, mask)]
    attention(q, q, q, mask=mask)
    assert len(dispatch._cache) == 1
    del q, mask
    gc.collect()
    assert all(r() is None for r in refs)
    # the fast path's runner (`Backend.plan`) neither, with the double-backward gate bound in it
    q = torch.randn(1, 2, 16, 8, requires_grad=True)
    ref = weakref.ref(q)
    attention(q, q, q).sum().backward()
    assert any(entry.value.fast is not None for entry in dispatch._cache.values())
    del q
    gc.collect()
    assert ref() is None


@pytest.mark.parametrize("grad", [False, True])
def test_fast_path_is_the_run_path(grad):
    """An unmasked call of a known signature takes the backend's runner (`Backend.plan`): same output, same
    gradients (first and second order) as the full path."""
    dispatch.clear_cache()
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 8, 16, generator=gen, requires_grad=grad) for _ in range(3))
    want = attention(q, k, v)  # first call: validates, chooses, plans
    (entry,) = dispatch._cache.values()
    if entry.value.fast is None:
        pytest.skip(f"{entry.value.backend.name} has no runner for this signature")
    calls = []
    fast = entry.value.fast
    entry.value.__dict__["fast"] = lambda *a: calls.append(1) or fast(*a)  # frozen dataclass: count the calls
    got = attention(q, k, v)
    assert calls == [1]
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    if grad:
        (dq,) = torch.autograd.grad(got.square().sum(), q, create_graph=True)
        (ddq,) = torch.autograd.grad(dq.sum(), q)
        ref = attention(q, k, v, backend="einsum")
        (rq,) = torch.autograd.grad(ref.square().sum(), q, create_graph=True)
        (rdq,) = torch.autograd.grad(rq.sum(), q)
        torch.testing.assert_close(dq, rq, **tolerance(q.dtype))
        torch.testing.assert_close(ddq, rdq, **tolerance(q.dtype))


@pytest.mark.parametrize("d", [32, 48, 64, 128])
def test_the_default_scale_is_sdpas_to_the_bit(d):
    """The default scale is 1 / sqrt(d) in double, as SDPA computes its own (`d ** -0.5` differs by an ulp at
    d = 32, 48, 128): an unmasked `attention` call on SDPA's kernel then equals a direct SDPA call bit for bit,
    in float64 too, on the first call (full path) and on later ones (the plan, which leaves out the scale)."""
    import torch.nn.functional as F

    dispatch.clear_cache()
    gen = torch.Generator().manual_seed(d)
    q, k, v = (torch.randn(1, 2, 24, d, generator=gen, dtype=torch.float64) for _ in range(3))
    assert validate(q, k, v).scale == 1.0 / math.sqrt(d)
    want = F.scaled_dot_product_attention(q, k, v)
    for _ in range(2):
        assert torch.equal(attention(q, k, v, backend="sdpa:flash"), want)
