"""Every torch feature attend probes (`attend.features`), switched off here as if this torch lacked it: the
fallback must give the reference's result, and what needs the feature must say so with the feature's reason.

`FALLBACKS` has one row per registered feature; a new probe without a row fails `test_every_feature_has_a_row`.
The switches are monkeypatches of the one binding each feature reads (so `features.missing()` sees them too).
On a torch that really lacks a feature (the nox matrix's older sessions) the same checks run without the patch.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend

import attend
from attend import _helpers, dispatch, features, grad2, tiles
from attend.backends import sdpa
from attend.inputs import validate

from .helpers import dense_formula, make_qkv

ROOT = Path(__file__).resolve().parents[1]


def _close(got, want, tol=1e-5):
    torch.testing.assert_close(got.double(), want.double(), atol=tol, rtol=tol)


# --- the switches ------------------------------------------------------------------------------------------


def off_enable_gqa(mp):
    mp.setitem(sdpa._PROBED, ("enable_gqa",), False)


def off_dead_rows(mp):
    for variant in (SDPBackend.FLASH_ATTENTION, SDPBackend.MATH):
        mp.setitem(sdpa._PROBED, ("dead_rows", variant.name, "cpu"), False)


def off_lower_right_gqa(mp):
    mp.setitem(sdpa._PROBED, ("lower_right_gqa",), False)


def off_half_exact(mp):
    for variant in (SDPBackend.FLASH_ATTENTION, SDPBackend.MATH):
        mp.setitem(sdpa._PROBED, ("half", variant.name), False)


def off_dynamo_traces(mp):
    mp.setitem(dispatch._TRACES, "dynamo", False)


def off_per_thread(mp):
    mp.setitem(_helpers._STATE, "per_thread", False)


def off_mask_with_causal(mp):
    mp.setitem(sdpa._PROBED, ("mask_with_causal",), False)


def off_fused_choice(mp):
    mp.delattr(torch, "_fused_sdp_choice", raising=False)


def off_flash_lse(mp):
    mp.setattr(sdpa, "flash_lse_op", None)


def off_node_hooks(mp):
    mp.setattr(grad2, "_HOOKS", False)


def off_keep_graph(mp):
    mp.setattr(grad2, "keep_graph", None)


def off_functorch_query(mp):
    mp.setattr(_helpers, "_is_wrapped", None)


def off_any_autocast(mp):
    mp.setattr(torch._C, "_is_any_autocast_enabled", None, raising=False)
    mp.delattr(torch._C, "_is_any_autocast_enabled")


def off_switch_functions(mp):
    cuda = torch.backends.cuda
    public = (
        (SDPBackend.FLASH_ATTENTION, cuda.flash_sdp_enabled, cuda.enable_flash_sdp),
        (SDPBackend.EFFICIENT_ATTENTION, cuda.mem_efficient_sdp_enabled, cuda.enable_mem_efficient_sdp),
        (SDPBackend.MATH, cuda.math_sdp_enabled, cuda.enable_math_sdp),
        (SDPBackend.CUDNN_ATTENTION, cuda.cudnn_sdp_enabled, cuda.enable_cudnn_sdp),
    )
    mp.setattr(sdpa, "_SWITCHES", public)
    for name, (_, get, _) in zip(("_FLASH_ON", "_EFFICIENT_ON", "_MATH_ON", "_CUDNN_ON"), public):
        mp.setattr(sdpa, name, get)


# --- what runs without each --------------------------------------------------------------------------------


def gqa_without_enable_gqa():
    """Grouped-query heads on the SDPA kernels: k, v expanded, the same result as the reference."""
    q, k, v = make_qkv(h=8, g=2, i=16, j=16)
    for name in ("sdpa:flash", "sdpa:math"):
        _close(attend.attention(q, k, v, causal=True, backend=name), dense_formula(q, k, v, causal=True)[0])
    out, lse = attend.attention(q, k, v, causal=True, backend="sdpa:flash", return_lse=True)  # the op, expanded
    want_out, want_lse = dense_formula(q, k, v, causal=True)
    _close(out, want_out)
    _close(lse, want_lse)
    # the drop-in takes enable_gqa on every torch (it is attend's own keyword, not forwarded to torch)
    _close(attend.scaled_dot_product_attention(q, k, v, enable_gqa=True), dense_formula(q, k, v)[0])


def dead_rows_without_safe_softmax():
    """A row with no key to attend: 0 output and finite gradients on both CPU SDPA kernels (the fix-up)."""
    q, k, v = make_qkv(b=1, h=2, g=2, i=4, j=4, grad=True)
    mask = torch.ones(1, 2, 4, 4, dtype=torch.bool)
    mask[:, :, 1] = False
    for name in ("sdpa:flash", "sdpa:math"):
        out = attend.attention(q, k, v, mask=mask, backend=name)
        _close(out, dense_formula(q.detach(), k.detach(), v.detach(), mask=mask)[0])
        assert (out[:, :, 1] == 0).all()
        (gq,) = torch.autograd.grad(out.sum(), q)
        assert torch.isfinite(gq).all() and (gq[:, :, 1] == 0).all()


def lower_right_gqa_without_bias():
    """CUDA only: the fused kernels say they need CausalBias with enable_gqa."""
    if not torch.cuda.is_available():
        pytest.skip("causal_lower_right_gqa is a CUDA path: no CUDA device here")
    q, k, v = make_qkv(h=8, g=2, i=4, j=16)
    q, k, v = (t.cuda().half() for t in (q, k, v))
    report = attend.explain(q, k, v, causal=True)
    assert features.get("causal_lower_right_gqa").reason() in str(report)
    _close(attend.attention(q, k, v, causal=True).float().cpu(),
           dense_formula(*(t.float().cpu() for t in (q, k, v)), causal=True)[0], tol=2e-3)


def half_without_exact_kernels():
    """float16 on CPU: the SDPA kernels are ineligible with the feature's reason; auto gives the reference."""
    q, k, v = (t.half() for t in make_qkv())
    reason = features.get("sdpa_cpu_half_exact").reason()
    for name in ("sdpa:flash", "sdpa:math"):
        assert any(reason in r for r in attend.get_backend(name).reasons_unsupported(validate(q, k, v)))
    bias = torch.zeros(1, 1, 16, 24)
    bias[..., 0, 1] = 7e4  # beyond float16
    out = attend.attention(q, k, v, bias=bias, causal=True)
    assert attend.explain(q, k, v, bias=bias, causal=True).backend == "chunked"
    _close(out, dense_formula(q, k, v, bias=bias, causal=True)[0], tol=2e-2)


def compile_without_tracing():
    """torch.compile over attend where dynamo cannot trace it: attend runs eagerly between graphs (the
    reference's result); fullgraph=True raises."""
    import torch._dynamo

    torch._dynamo.reset()
    q, k, v = make_qkv()
    f = torch.compile(lambda q, k, v: attend.attention(q, k, v, causal=True) * 2, backend="eager")
    _close(f(q, k, v), 2 * dense_formula(q, k, v, causal=True)[0])
    g = torch.compile(lambda q, k, v: attend.attention(q, k, v) * 2, backend="eager", fullgraph=True)
    with pytest.raises(Exception, match="disable"):
        g(q, k, v)
    torch._dynamo.reset()


def chunked_without_per_thread_counts():
    """chunked's tile loop in the calling thread (no split): the reference's result, forward and backward."""
    q, k, v = make_qkv(b=2, h=4, g=2, i=300, j=300, grad=True)
    inp = validate(q, k, v, causal=True)
    plan = tiles.Plan(q, k, v, None, None, True, inp.scale, 0.0, 0, 64, 64)
    assert tiles.split_ways(plan, q, 5) == 1
    out = attend.attention(q, k, v, causal=True, backend="chunked")
    ref = dense_formula(*(t.detach() for t in (q, k, v)), causal=True)[0]
    _close(out, ref)
    w = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), w)
    want = torch.autograd.grad(attend.attention(q, k, v, causal=True, backend="einsum"), (q, k, v), w)
    for a, b in zip(got, want):
        _close(a, b, 1e-4)


def drop_in_refuses_mask_with_causal():
    """Where torch's SDPA refuses attn_mask with is_causal=True, so does the drop-in (a RuntimeError, as torch's);
    either alone runs."""
    q, k, v = make_qkv(h=2, g=2, i=5, j=7)
    keep = torch.ones(5, 7, dtype=torch.bool)
    with pytest.raises(RuntimeError, match="refuses for every kernel"):
        attend.scaled_dot_product_attention(q, k, v, attn_mask=keep, is_causal=True)
    _close(attend.scaled_dot_product_attention(q, k, v, attn_mask=keep), dense_formula(q, k, v)[0])


def plain_call_without_fused_choice():
    """Without PyTorch's own pick, every CPU call sets the switches: same results, switches restored."""
    q, k, v = make_qkv()
    before = tuple(sdpa._switch_state())
    for name in ("sdpa:flash", "sdpa:math"):
        _close(attend.attention(q, k, v, backend=name), dense_formula(q, k, v)[0])
    assert sdpa._picks(validate(q, k, v), {}) is None
    assert tuple(sdpa._switch_state()) == before


def lse_without_cpu_flash_op():
    """return_lse and sinks on CPU go to chunked, with the feature's reason; with_kvcache takes dispatch."""
    q, k, v = make_qkv(h=4, g=2, i=16, j=16, grad=True)
    reason = features.get("cpu_flash_lse").reason()
    report = attend.explain(q, k, v, causal=True, return_lse=True)
    assert report.backend != "sdpa:flash" and reason in str(report)
    out, lse = attend.attention(q, k, v, causal=True, return_lse=True)
    want_out, want_lse = dense_formula(q.detach(), k.detach(), v.detach(), causal=True)
    _close(out, want_out)
    _close(lse, want_lse)
    sinks = torch.randn(4)
    _close(attend.attention(q, k, v, causal=True, sinks=sinks),
           dense_formula(q.detach(), k.detach(), v.detach(), causal=True, sinks=sinks)[0])
    # decoding from a paged cache, with the lse: the dispatch path, the reference's result
    with torch.no_grad():
        qd = torch.randn(2, 4, 1, 32)
        pool_k, pool_v = torch.randn(6, 2, 8, 32), torch.randn(6, 2, 8, 32)
        table = torch.tensor([[0, 2, 4], [1, 3, 5]])
        lens = torch.tensor([20, 9])
        out, lse = attend.with_kvcache(qd, pool_k, pool_v, cache_seqlens=lens, block_table=table, return_lse=True)
        kc = pool_k[table].permute(0, 2, 1, 3, 4).reshape(2, 2, 24, 32)
        vc = pool_v[table].permute(0, 2, 1, 3, 4).reshape(2, 2, 24, 32)
        pad = torch.arange(24)[None] < lens[:, None]
        want_out, want_lse = dense_formula(qd, kc, vc, mask=pad)
        _close(out, want_out)
        _close(lse, want_lse)
        why = attend.explain_kvcache(qd, pool_k, pool_v, cache_seqlens=lens, block_table=table, return_lse=True)
        assert reason in str(why)


def grad2_without_node_hooks():
    """Second order through sdpa:flash: the wrapper runs (not the hook), with the reference's gradients."""
    q, k, v = make_qkv(b=1, h=2, g=2, i=8, j=8, d=8, dtype=torch.float64, grad=True)
    out = attend.attention(q, k, v, backend="sdpa:flash")
    assert type(out.grad_fn).__name__ == "TwiceDifferentiableBackward"
    assert torch.autograd.gradgradcheck(lambda *t: attend.attention(*t, backend="sdpa:flash"), (q, k, v))


def grad2_without_keep_graph():
    """The hook (or query blocks) without the engine's retain_graph query: gradients twice, both right."""
    q, k, v = make_qkv(b=1, h=2, g=2, i=8, j=8, d=8, dtype=torch.float64, grad=True)
    for kw in ({}, {"window": (3, 2), "backend": "sdpa:math"}):
        out = attend.attention(q, k, v, **kw)
        w = torch.randn_like(out)
        g1 = torch.autograd.grad(out, (q, k, v), w, retain_graph=True)
        g2 = torch.autograd.grad(out, (q, k, v), w)
        ref = dense_formula(q, k, v, **({"mask": _window_mask(8, 8, 3, 2)} if kw else {}))[0]
        want = torch.autograd.grad(ref, (q, k, v), w)
        for a, b, c in zip(g1, g2, want):
            _close(a, c, 1e-8)
            _close(b, c, 1e-8)
    assert torch.autograd.gradgradcheck(lambda *t: attend.attention(*t), (q, k, v))


def _window_mask(i, j, left, right):
    pos_i, pos_j = torch.arange(i)[:, None], torch.arange(j)[None]
    return ((pos_j >= pos_i - left) & (pos_j <= pos_i + right))[None, None].expand(1, 2, i, j)


def vmap_without_functorch_query():
    """torch.func.vmap over attention: the reference's result; check_finite's guard then raises torch's error."""
    q, k, v = make_qkv(b=3, h=2, g=2, i=8, j=8)
    got = torch.func.vmap(lambda a, b, c: attend.attention(a[None], b[None], c[None])[0])(q, k, v)
    _close(got, dense_formula(q, k, v)[0])
    with pytest.raises(RuntimeError):
        torch.func.vmap(lambda a, b, c: attend.attention(a[None], b[None], c[None], check_finite=True)[0])(q, k, v)


def autocast_without_any_query():
    """Autocast seen device by device: the fallback agrees with torch's own query, on and off."""
    assert _helpers.any_autocast_by_device() is False
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _helpers.any_autocast_by_device() is True
        q, k, v = make_qkv()
        out = attend.attention(q, k, v)
    assert out.dtype == torch.bfloat16
    _close(out, dense_formula(q, k, v)[0], tol=3e-2)


def switches_without_private_functions():
    """The kernel switches through torch.backends.cuda's public wrappers: pinned kernels run, and every
    switch is as it was after."""
    before = (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.math_sdp_enabled())
    q, k, v = make_qkv()
    for name in ("sdpa:flash", "sdpa:math"):
        _close(attend.attention(q, k, v, causal=True, backend=name), dense_formula(q, k, v, causal=True)[0])
    assert (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.math_sdp_enabled()) == before


FALLBACKS: dict[str, tuple[Callable, Callable]] = {
    "sdpa_enable_gqa": (off_enable_gqa, gqa_without_enable_gqa),
    "sdpa_zero_dead_rows": (off_dead_rows, dead_rows_without_safe_softmax),
    "causal_lower_right_gqa": (off_lower_right_gqa, lower_right_gqa_without_bias),
    "fused_sdp_choice": (off_fused_choice, plain_call_without_fused_choice),
    "sdpa_cpu_half_exact": (off_half_exact, half_without_exact_kernels),
    "dynamo_traces_attend": (off_dynamo_traces, compile_without_tracing),
    "per_thread_intra_op": (off_per_thread, chunked_without_per_thread_counts),
    "sdpa_mask_with_causal": (off_mask_with_causal, drop_in_refuses_mask_with_causal),
    "cpu_flash_lse": (off_flash_lse, lse_without_cpu_flash_op),
    "autograd_node_hooks": (off_node_hooks, grad2_without_node_hooks),
    "graph_task_keep_graph": (off_keep_graph, grad2_without_keep_graph),
    "functorch_wrapped_query": (off_functorch_query, vmap_without_functorch_query),
    "any_autocast_query": (off_any_autocast, autocast_without_any_query),
    "sdpa_switch_functions": (off_switch_functions, switches_without_private_functions),
}


def test_every_feature_has_a_row():
    assert sorted(FALLBACKS) == [f.name for f in features.registered()]


@pytest.mark.parametrize("name", sorted(FALLBACKS))
def test_fallback_gives_the_reference(name, monkeypatch):
    switch_off, check = FALLBACKS[name]
    feature = features.get(name)
    if feature.present():
        switch_off(monkeypatch)
    if name == "any_autocast_query":  # its fallback is a function of its own: checked directly
        check()
        return
    assert not feature.present(), f"switching {name} off did not reach the binding its probe reads"
    assert name in features.missing()
    dispatch.clear_cache()  # decisions cached with the feature present
    check()
    dispatch.clear_cache()


def test_a_reason_names_the_missing_feature():
    feature = features.get("cpu_flash_lse")
    assert feature.reason() == (
        f"this torch ({torch.__version__}) has no aten._scaled_dot_product_flash_attention_for_cpu and its "
        "_backward (PyTorch's CPU flash op, with the lse)"
    )


@pytest.mark.skipif(bool(os.environ.get("ATTEND_TORCH_MATRIX")), reason="a nox matrix session: the matrix itself "
                    "is writing docs/torch-matrix.json (checked after it, by `nox -s support_table`)")
def test_tested_releases_are_the_last_matrix_run():
    """`features.TESTED` (what `attend info` says) and README's support table are docs/torch-matrix.json's."""
    matrix = json.loads((ROOT / "docs" / "torch-matrix.json").read_text())["sessions"]
    passed = sorted(features.torch_release(s["torch"]) for s in matrix.values() if s["result"] == "pass")
    assert passed == sorted(features.torch_release(v) for v in features.TESTED)
    spec = importlib.util.spec_from_file_location("support_table", ROOT / "docs" / "support_table.py")
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    assert table.main(["--check"]) == 0, "README's table or features.TESTED: run `python docs/support_table.py`"


@pytest.mark.parametrize(
    ("version", "says"),
    [
        ("2.13.0+cpu", "tested"),
        ("99.0.0", "newer than the newest tested"),
        ("2.3.1", "older than the lowest tested"),
        ("2.11.0", "not in the tested matrix"),
    ],
)
def test_tested_status(version, says):
    assert features.tested_status(version).startswith(says)


def test_import_prints_nothing_whatever_the_torch():
    """`import attend` says nothing on any torch, tested or not (`attend info` says whether it is tested)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-W", "default", "-c", "import attend"], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 0 and done.stdout == "" and done.stderr == "", done.stderr
