"""Determinism: under `torch.use_deterministic_algorithms(True)`, with `Attend(deterministic=True)` or
`attention(deterministic=True)`, only backends declared deterministic are eligible, `explain` says why
the others are excluded, and two runs give bitwise-identical outputs and gradients.

Registry-driven: every registered backend that declares determinism on this device is run twice.
"""

from __future__ import annotations

import pytest
import torch

from attend import Attend, attention, dispatch, explain, get_backend, list_backends
from attend.backends.einsum import EinsumBackend
from attend.inputs import validate

from .conftest import DEVICES
from .helpers import CPU_BACKENDS, skip_unless_runs

REASON = "not deterministic, and determinism was requested"

# helpers


@pytest.fixture(autouse=True)
def _restore_determinism():
    before = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    dispatch.clear_cache()
    yield
    torch.use_deterministic_algorithms(before, warn_only=warn_only)
    dispatch.clear_cache()


class FakeNondeterministic(EinsumBackend):
    """A fast-but-nondeterministic backend (like the CUDA flash/efficient/cuDNN kernels), first in auto."""

    name = "fake:nondet"
    fused = True


@pytest.fixture
def nondet(monkeypatch):
    from dataclasses import replace

    fake = FakeNondeterministic()
    fake.caps = {dev: replace(c, deterministic=False) for dev, c in EinsumBackend.caps.items()}
    monkeypatch.setitem(dispatch._registry, fake.name, fake)
    monkeypatch.setitem(dispatch.PRIORITY, "cpu", (fake.name,) + dispatch.PRIORITY["cpu"])
    dispatch.clear_cache()
    return fake


def _inputs(device="cpu", dtype=torch.float32, g=2):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 33, 16, generator=gen).to(device, dtype)
    k = torch.randn(2, g, 47, 16, generator=gen).to(device, dtype)
    v = torch.randn(2, g, 47, 16, generator=gen).to(device, dtype)
    mask = (torch.rand(2, 47, generator=gen) > 0.2).to(device)
    bias = torch.randn(4, 33, 47, generator=gen).to(device, dtype)
    return q, k, v, mask, bias


def _run(name, q, k, v, *, seed=0, **kw):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    bias = kw.pop("bias", None)
    if bias is not None:
        bias = bias.detach().clone().requires_grad_(get_backend(name).caps_for(q.device).bias_grad)
        if bias.requires_grad:
            leaves.append(bias)
    torch.manual_seed(seed)
    out = attention(*leaves[:3], bias=bias, backend=name, **kw)
    d_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
    grads = torch.autograd.grad(out, leaves, d_out)
    return [out.detach(), *grads]


def _deterministic_backends(device):
    names = []
    for name in list_backends():
        caps = get_backend(name).caps_for(torch.device(device))
        if caps is not None and caps.deterministic and get_backend(name).unavailable_reason() is None:
            names.append(name)
    return names


# tests: eligibility and explain


def test_global_switch_excludes_nondeterministic(nondet):
    q, k, v, mask, _ = _inputs()
    assert explain(q, k, v, mask=mask).backend == nondet.name
    torch.use_deterministic_algorithms(True)
    report = explain(q, k, v, mask=mask)
    assert report.backend != nondet.name and get_backend(report.backend).caps_for(q.device).deterministic
    assert report.reasons[nondet.name] == [REASON]
    assert REASON in str(report)


def test_cached_choice_follows_the_global_switch(nondet):
    """The dispatch cache key includes determinism: flipping the global switch needs no clear_cache()."""
    q, k, v, mask, _ = _inputs()
    inp = validate(q, k, v, mask=mask)
    assert dispatch.select(inp).name == nondet.name
    torch.use_deterministic_algorithms(True)
    assert dispatch.select(inp).name != nondet.name
    torch.use_deterministic_algorithms(False)
    assert dispatch.select(inp).name == nondet.name


def test_functional_keyword(nondet):
    q, k, v, mask, _ = _inputs()
    report = explain(q, k, v, mask=mask, deterministic=True)
    assert report.reasons[nondet.name] == [REASON]
    with pytest.raises(ValueError, match=REASON):
        attention(q, k, v, mask=mask, deterministic=True, backend=nondet.name)


def test_module_switch(nondet):
    q, k, v, mask, _ = _inputs()
    assert Attend()(q, k, v, mask=mask) is not None
    assert Attend().explain(q, k, v, mask=mask).backend == nondet.name
    attn = Attend(deterministic=True)
    report = attn.explain(q, k, v, mask=mask)
    assert report.backend != nondet.name
    assert report.reasons[nondet.name] == [REASON]
    assert "deterministic=True" in repr(attn)
    # Attend(flash=True) asks for fused kernels; the fake is the only fused one on CPU that could run
    # everything, so with determinism the fused-only search falls through to auto among deterministic ones
    out = Attend(flash=True, deterministic=True)(q, k, v, mask=mask)
    assert torch.isfinite(out).all()


def test_module_switch_is_per_module(nondet):
    """One module's switch does not leak into another's choice (the cache key carries it)."""
    q, k, v, mask, _ = _inputs()
    assert Attend(deterministic=True).explain(q, k, v, mask=mask).backend != nondet.name
    assert Attend().explain(q, k, v, mask=mask).backend == nondet.name
    assert Attend(deterministic=True).explain(q, k, v, mask=mask).backend != nondet.name


@pytest.mark.gpu
def test_declared_nondeterministic_cuda_backends_are_excluded():
    q, k, v, mask, _ = _inputs("cuda", torch.float16)
    report = explain(q, k, v, deterministic=True)
    for name in list_backends():
        caps = get_backend(name).caps_for(q.device)
        if caps is not None and not caps.deterministic:
            assert REASON in report.reasons[name]
    assert get_backend(report.backend).caps_for(q.device).deterministic


# tests: bitwise-identical runs


SETTINGS = [
    dict(),
    dict(causal=True),
    dict(mask=True, causal=True),
    dict(bias=True),
    dict(mask=True, bias=True, causal=True),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("how", ["global", "keyword"])
@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: "-".join(s) or "plain")
def test_two_runs_bitwise_identical(device, dtype, how, setting):
    q, k, v, mask, bias = _inputs(device, dtype)
    kw = dict(causal=setting.get("causal", False))
    if setting.get("mask"):
        kw["mask"] = mask
    if setting.get("bias"):
        kw["bias"] = bias
    if how == "global":
        torch.use_deterministic_algorithms(True)
    else:
        kw["deterministic"] = True
    ran = 0
    for name in _deterministic_backends(device):
        bias_in = kw.get("bias")
        if bias_in is not None:  # as `_run` will pass it: requiring grad where the backend gives one
            bias_in = bias_in.detach().requires_grad_(get_backend(name).caps_for(q.device).bias_grad)
        reasons = get_backend(name).reasons_unsupported(
            validate(q.detach().requires_grad_(), k, v, mask=kw.get("mask"), bias=bias_in,
                     causal=kw["causal"], deterministic=True)
        )  # fmt: skip
        if reasons:
            continue
        first, second = _run(name, q, k, v, **kw), _run(name, q, k, v, **kw)
        for a, b, what in zip(first, second, ["out", "dq", "dk", "dv", "dbias"]):
            assert torch.equal(a, b), f"{name}: {what} differs between two runs"
        ran += 1
    assert ran >= 1


@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_dropout_is_reproducible_under_a_seed(name):
    """Dropout draws from torch's RNG: the same seed gives the same mask, so determinism holds."""
    q, k, v, mask, _ = _inputs()
    inp = validate(q.detach().requires_grad_(), k, v, mask=mask, dropout_p=0.25, deterministic=True)
    skip_unless_runs(name, inp)
    first = _run(name, q, k, v, mask=mask, dropout_p=0.25, deterministic=True, seed=3)
    second = _run(name, q, k, v, mask=mask, dropout_p=0.25, deterministic=True, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
