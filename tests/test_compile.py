"""torch.compile: a model built on `Attend` (masks, causal, grouped-query heads) compiles with
fullgraph=True (so no graph breaks: dispatch, probes and the scoped `sdpa_kernel` all trace) and matches
eager in outputs and gradients.

Compilation on a 2-core CPU is slow: most tests use the "aot_eager" backend, which runs dynamo and
AOTAutograd (the parts that graph-break) without generating code; one test goes through inductor.
"""

from __future__ import annotations

import pytest
import torch
from einops import rearrange
from torch import nn

from attend import Attend, dispatch
from attend.testing import tolerance

from .helpers import compile_counter, fresh_dynamo, needs  # noqa: F401 (fresh_dynamo: a fixture, used by name)

# torch._dynamo.testing imports a deprecated torch.jit helper; not ours to fix
pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
    pytest.mark.usefixtures("fresh_dynamo"),  # reset dynamo around every test
    needs("dynamo_traces_attend"),  # elsewhere attend runs eagerly under compile (tests/test_torch_features.py)
]


class Block(nn.Module):
    """(b, n, dim) -> (b, n, dim): grouped-query self-attention with a key padding mask and causal."""

    def __init__(self, dim: int = 32, heads: int = 4, kv_heads: int = 2, backend: str | None = None):
        super().__init__()
        self.heads, self.kv_heads, self.dim_head = heads, kv_heads, dim // heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(dim, 2 * kv_heads * self.dim_head, bias=False)
        self.attend = Attend(causal=True, backend=backend)
        self.to_out = nn.Linear(dim, dim, bias=False)

    def forward(self, x, mask=None, bias=None, context=None):
        q = rearrange(self.to_q(x), "b n (h d) -> b h n d", h=self.heads)
        kv = self.to_kv(x if context is None else torch.cat((context, x), dim=1))
        k, v = rearrange(kv, "b n (two g d) -> two b g n d", two=2, g=self.kv_heads)
        out = self.attend(q, k, v, mask=mask, bias=bias)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


_counter = compile_counter


def _inputs(kind: str):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, 32, generator=gen)
    mask = bias = context = None
    if kind in ("padding", "padding+bias"):
        mask = torch.ones(2, 9, dtype=torch.bool)
        mask[1, 6:] = False
    if kind == "bool":
        mask = torch.rand(2, 1, 9, 9, generator=gen) > 0.3
    if kind == "padding+bias":
        bias = torch.randn(1, 4, 9, 9, generator=gen)
    if kind == "kv-cache":  # i != j: bottom-right causal against 5 cached positions
        context = torch.randn(2, 5, 32, generator=gen)
    return x, mask, bias, context


def _run(model, x, mask, bias, context):
    x = x.clone().requires_grad_()
    out = model(x, mask=mask, bias=bias, context=context)
    out.backward(torch.ones_like(out))
    grads = [x.grad] + [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    return out.detach(), grads


@pytest.mark.parametrize("backend", [None, "einsum", "sdpa:math"], ids=["auto", "einsum", "sdpa-math"])
@pytest.mark.parametrize("kind", ["padding", "bool", "padding+bias", "kv-cache"])
def test_fullgraph_matches_eager(kind, backend):
    torch.manual_seed(0)
    model = Block(backend=backend)
    inputs = _inputs(kind)
    counter = _counter()
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    out, grads = _run(compiled, *inputs)
    ref_out, ref_grads = _run(model, *inputs)
    torch.testing.assert_close(out, ref_out, **tolerance(torch.float32, "compiled"))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, **tolerance(torch.float32, "compiled"))
    assert counter.frame_count == 1  # fullgraph=True already forbids breaks; one graph, no retrace
    _run(compiled, *inputs)  # same inputs again: no recompilation
    assert counter.frame_count == 1


def test_compiling_leaves_the_dispatch_cache_alone():
    """The choice is made at trace time; the compiled region neither reads nor writes the eager cache."""
    dispatch.clear_cache()
    model = Block()
    torch.compile(model, fullgraph=True, backend=_counter())(*_inputs("padding")[:1])
    assert dispatch._cache == {}
    model(*_inputs("padding")[:1])  # eager fills it as usual
    assert len(dispatch._cache) == 1


def test_inductor_fullgraph_forward_and_backward():
    """One end-to-end inductor build (the slow one): same outputs and gradients as eager."""
    torch.manual_seed(0)
    model = Block()
    inputs = _inputs("padding")
    compiled = torch.compile(model, fullgraph=True)
    out, grads = _run(compiled, *inputs)
    ref_out, ref_grads = _run(model, *inputs)
    torch.testing.assert_close(out, ref_out, **tolerance(torch.float32, "compiled"))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, **tolerance(torch.float32, "compiled-grad"))


def test_sdpa_drop_in_compiles():
    """`attend.scaled_dot_product_attention` (upper-left is_causal, bool and float masks, GQA) traces too."""
    from attend import scaled_dot_product_attention as sdpa

    def f(q, k, v, keep, bias):
        causal = sdpa(q, k, v, is_causal=True, enable_gqa=True)
        return causal + sdpa(q, k, v, attn_mask=keep, enable_gqa=True) + sdpa(q, k, v, attn_mask=bias, enable_gqa=True)

    gen = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 4, 5, 8, generator=gen), torch.randn(2, 2, 7, 8, generator=gen), torch.randn(2, 2, 7, 8)
    keep, bias = torch.rand(2, 1, 5, 7, generator=gen) > 0.3, torch.randn(5, 7, generator=gen)
    counter = _counter()
    out = torch.compile(f, fullgraph=True, backend=counter)(q, k, v, keep, bias)
    torch.testing.assert_close(out, f(q, k, v, keep, bias))
    assert counter.frame_count == 1


@pytest.mark.parametrize(
    "backend, op",
    [("sdpa:flash", "_scaled_dot_product_flash_attention_for_cpu"), ("sdpa:math", "_safe_softmax")],
    ids=["flash", "math"],
)
def test_pinned_kernel_survives_compilation(backend, op):
    """The scoped `sdpa_kernel([variant])` is traced, not dropped: the compiled graph holds the pinned kernel."""
    from torch._dynamo.testing import AotEagerAndRecordGraphs

    record = AotEagerAndRecordGraphs()
    attn = Attend(backend=backend)
    q = torch.randn(1, 2, 5, 8)
    pad = torch.ones(1, 5, dtype=torch.bool)
    torch.compile(lambda q: attn(q, q, q, mask=pad), fullgraph=True, backend=record)(q)
    code = record.fw_graphs[0].code
    assert op in code
    if backend == "sdpa:math":
        assert "flash_attention" not in code


def test_flash_fallback_with_dropout_compiles():
    """Attend(flash=True) in training with dropout: no fused CPU kernel has dropout, so it falls back to auto
    (logged once in eager; the log call is skipped while tracing, where it would be a graph break)."""
    attn = Attend(dropout=0.1, flash=True).train()
    q = torch.randn(1, 2, 16, 8)
    counter = _counter()
    out = torch.compile(lambda q: attn(q, q, q), fullgraph=True, backend=counter)(q)
    assert out.shape == q.shape and counter.frame_count == 1


# changing sequence lengths (the issue: validation formatted symbolic sizes on every call)

LENGTHS = (9, 13, 64, 257)


def _entry(kind: str, training: bool):
    """(callable on (q, k, v, pad), its eager twin). Causal + key padding: the bottom-right and padding paths."""
    if kind == "Attend":
        module = Attend(causal=True).train(training)
        return (lambda q, k, v, pad: module(q, k, v, mask=pad)), module
    if kind == "attention":
        from attend import attention

        return lambda q, k, v, pad: attention(q, k, v, mask=pad, causal=True), None
    from attend import scaled_dot_product_attention as sdpa

    # PyTorch's own semantics: upper-left causal, a key padding mask as a 4-D bool
    return lambda q, k, v, pad: sdpa(q, k, v, attn_mask=pad[:, None, None, :], enable_gqa=True), None


def _length_inputs(n: int, grad: bool):
    gen = torch.Generator().manual_seed(n)
    q = torch.randn(2, 4, n, 8, generator=gen).requires_grad_(grad)
    k, v = (torch.randn(2, 2, n, 8, generator=gen).requires_grad_(grad) for _ in range(2))
    pad = torch.ones(2, n, dtype=torch.bool)
    pad[1, n - n // 3 :] = False
    return q, k, v, pad


@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("dynamic", [None, True], ids=["auto-dynamic", "dynamic"])
@pytest.mark.parametrize("kind", ["Attend", "attention", "sdpa-drop-in"])
def test_changing_lengths_compile_once(kind, dynamic, training):
    """Lengths 9, 13, 64, 257 under fullgraph=True: outputs and grads equal eager. dynamic=True compiles one
    graph for every length; the default (automatic dynamic) specialises on the first length and then
    compiles one dynamic graph. Dynamo may restart the first compile once (frame_count counts that too), so
    the count is read after the first call and must not grow."""
    fn, _ = _entry(kind, training)
    counter = _counter()
    compiled = torch.compile(fn, fullgraph=True, dynamic=dynamic, backend=counter)
    counts = []
    for n in LENGTHS:
        q, k, v, pad = _length_inputs(n, training)
        out = compiled(q, k, v, pad)
        ref_inputs = [t.detach().requires_grad_(training) for t in (q, k, v)]
        ref = fn(*ref_inputs, pad)
        torch.testing.assert_close(out, ref, **tolerance(torch.float32, "compiled"))
        if training:
            grads = torch.autograd.grad(out.square().sum(), (q, k, v))
            ref_grads = torch.autograd.grad(ref.square().sum(), ref_inputs)
            for got, want in zip(grads, ref_grads):
                torch.testing.assert_close(got, want, **tolerance(torch.float32, "compiled-grad"))
        counts.append(counter.frame_count)
    if dynamic:
        assert counts == [counts[0]] * len(LENGTHS), counts  # no recompile for a new length
    else:
        assert len(set(counts[1:])) == 1, counts  # one recompile (to a dynamic graph), then none
