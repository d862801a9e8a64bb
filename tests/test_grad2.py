"""Second-order gradients (create_graph=True, then another backward) on every backend and every feature:
gradgradcheck in float64, and a GAN R1 penalty through `Attend` against the float64 reference.

Backends whose own backward is first-order only (PyTorch's fused kernels, `chunked`'s tile loop) recompute a
recorded backward through the reference (`attend.grad2`); einsum and sdpa:math are twice differentiable as
they are. Every backend is checked the same way, so a backend added later is covered too.
"""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

from attend import Attend, attention, dispatch, features
from attend.inputs import validate
from attend.testing import assert_matches_reference, tolerance

from .helpers import CPU_BACKENDS, needs, skip_unless_runs

# feature -> (h, g, i, j, keyword arguments); small shapes so gradgradcheck's finite differences are quick
FEATURES = {
    "plain": (2, 2, 3, 4, {}),
    "padding+causal": (2, 2, 4, 5, {"causal": True, "mask": torch.tensor([[True, True, True, False, True]])}),
    "bias-grad": (2, 2, 3, 4, {"bias": "grad"}),
    "gqa": (4, 2, 3, 4, {"causal": True}),
    "dropout": (2, 2, 3, 4, {"dropout_p": 0.3}),
    "l2": (2, 2, 3, 4, {"score": "l2", "causal": True}),  # masks.lower_score's column Function, second order too
}


def _inputs(h, g, i, j, kw, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, h, i, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, g, j, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, g, j, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    kw = dict(kw)
    leaves = [q, k, v]
    if kw.get("bias") == "grad":
        kw["bias"] = torch.randn(1, h, i, j, generator=gen, dtype=torch.float64, requires_grad=True)
        leaves.append(kw["bias"])
    return leaves, kw


def _fixed_rng(fn):
    """Dropout draws from the global generator: reseed it on every call, so each call of `fn` (gradgradcheck
    calls it many times) applies the same keep-mask."""

    def call(*args):
        with torch.random.fork_rng():
            torch.manual_seed(1234)
            return fn(*args)

    return call


@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_gradgradcheck(name, feature):
    h, g, i, j, kw = FEATURES[feature]
    leaves, kw = _inputs(h, g, i, j, kw)
    skip_unless_runs(name, validate(*leaves[:3], **kw))
    bias_leaf = len(leaves) == 4

    @_fixed_rng
    def fn(q, k, v, *bias):
        extra = {"bias": bias[0]} if bias_leaf else {}
        return attention(q, k, v, backend=name, **{**kw, **extra})

    # the recorded backward's values equal the plain backward's (gradgradcheck would not notice otherwise)
    out = fn(*leaves)
    dout = torch.randn_like(out)
    plain = torch.autograd.grad(out, leaves, dout)
    recorded = torch.autograd.grad(fn(*leaves), leaves, dout, create_graph=True)
    for a, b in zip(recorded, plain):
        torch.testing.assert_close(a, b)
    assert gradcheck(fn, tuple(leaves))
    assert gradgradcheck(fn, tuple(leaves))


@pytest.mark.parametrize("uses", ["x, x, x", "2x, x, x"])
@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_gradgradcheck_with_one_tensor_in_several_places(name, uses):
    """Self-attention on one tensor (`attention(x, x, x)`, or k and v the same tensor): the recomputed
    second-order backward must give each use its own gradient, not the tensor's total once per use (it did:
    10x off through the fused kernels)."""
    x = torch.randn(1, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    skip_unless_runs(name, validate(x, x, x))

    def fn(x):
        q = x if uses == "x, x, x" else 2.0 * x
        return attention(q, x, x, backend=name, causal=True)

    # (gradgradcheck alone misses it: it differentiates the recorded backward, wrong or not, consistently)
    dout = torch.randn(1, 2, 5, 4, dtype=torch.float64)
    (plain,) = torch.autograd.grad(fn(x), x, dout)
    (recorded,) = torch.autograd.grad(fn(x), x, dout, create_graph=True)
    torch.testing.assert_close(recorded, plain)
    assert gradcheck(fn, (x,))
    assert gradgradcheck(fn, (x,))


@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_issue_example_hessian_vector_product(name):
    """The report: chunked's hvp was off by 10.1 (its saved state was differentiated as constants)."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 3, 2, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3))
    skip_unless_runs(name, validate(q, k, v))

    def hvp(backend):
        (gq,) = torch.autograd.grad(attention(q, k, v, backend=backend).pow(2).sum(), q, create_graph=True)
        return torch.autograd.grad(gq.pow(2).sum(), k)[0]

    torch.testing.assert_close(hvp(name), hvp("einsum"), **tolerance(torch.float64, "second-order"))


def _r1(attend_fn, q, k, v, w):
    """R1-style penalty: |d(out . w)/d(q, k, v)|^2, then its gradient (a second derivative)."""
    out = attend_fn(q, k, v)
    grads = torch.autograd.grad((out * w).sum(), (q, k, v), create_graph=True)
    penalty = sum(gr.pow(2).sum() for gr in grads)
    return [out.detach(), penalty.detach(), *torch.autograd.grad(penalty, (q, k, v))]


def test_r1_penalty_through_attend_matches_the_float64_reference():
    """GigaGAN's discriminator penalty at (4, 8, 256, 32) through `Attend().train()` on the backend auto picks
    (sdpa:flash on CPU, a first-order kernel): the penalty and its gradients equal the float64 reference within
    the budget the float32 reference earns."""
    gen = torch.Generator().manual_seed(0)
    base = [torch.randn(4, 8, 256, 32, generator=gen) for _ in range(3)]
    w = torch.randn(4, 8, 256, 32, generator=gen)
    attn = Attend().train()
    assert attn.explain(*(t.requires_grad_() for t in base)).backend == "sdpa:flash"

    def leaves(dtype):
        return [t.detach().to(dtype).requires_grad_() for t in base]

    cand = _r1(attn, *leaves(torch.float32), w)
    golden = _r1(lambda q, k, v: attention(q, k, v, backend="einsum"), *leaves(torch.float64), w.double())
    baseline = _r1(lambda q, k, v: attention(q, k, v, backend="einsum"), *leaves(torch.float32), w)
    for what, c, gd, bl in zip(["out", "penalty", "d2q", "d2k", "d2v"], cand, golden, baseline):
        assert_matches_reference(c, gd, bl, name=what)


def test_first_order_backward_keeps_the_kernels_own_backward(monkeypatch):
    """Ordinary training pays nothing for second-order support: without create_graph the reference is never
    recomputed (the fused kernel's own backward runs)."""
    import attend.grad2 as grad2

    calls = []
    real = grad2.recompute_grads
    monkeypatch.setattr(grad2, "recompute_grads", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q, k, v = (torch.randn(2, 4, 16, 8, requires_grad=True) for _ in range(3))
    for name in ("sdpa:flash", "chunked"):
        attention(q, k, v, backend=name).sum().backward()
    assert calls == []
    attention(q, k, v, backend="sdpa:flash")
    (gq,) = torch.autograd.grad(attention(q, k, v, backend="sdpa:flash").sum(), q, create_graph=True)
    assert calls == [1]


@needs("autograd_node_hooks")  # the test watches the hook itself
def test_the_kernels_graph_is_freed_after_backward_and_kept_with_retain_graph():
    """The gate keeps the fused kernel's own node (a post-hook on it, no wrapper node): a plain backward frees
    its graph at once (as PyTorch frees any node's), retain_graph=True keeps it for a second backward, and the
    hook keeps q, k, v no longer than the node does."""
    import gc
    import weakref

    x, k, v = (torch.randn(1, 2, 8, 8, requires_grad=True) for _ in range(3))
    q = x * 1.0  # not a leaf: the hook must not keep it (and its graph) alive after the output is gone
    out = attention(q, k, v, backend="sdpa:flash")
    assert type(out.grad_fn).__name__ == "ScaledDotProductFlashAttentionForCpuBackward0"
    out.sum().backward(retain_graph=True)
    first = x.grad.clone()
    out.sum().backward()  # the second backward through the kept graph
    torch.testing.assert_close(x.grad, 2 * first)
    with pytest.raises(RuntimeError, match="second time"):
        out.sum().backward()
    alive = weakref.ref(q)
    del q, out
    gc.collect()
    assert alive() is None


def test_the_gate_lets_go_of_q_k_v_when_the_backward_releases_the_graph():
    """The training loop keeps `loss` (and every node) until the next step's loss replaces it: the gate's hook
    must let go of the activations when the kernel's own saved tensors go (a backward without retain_graph),
    not when the node dies; and keep them through a retained backward, for a later create_graph one."""
    import gc
    import weakref

    x, k, v = (torch.randn(1, 2, 8, 8, requires_grad=True) for _ in range(3))

    def call() -> tuple[torch.Tensor, weakref.ref]:
        q = x * 1.0
        return attention(q, k, v, backend="sdpa:flash"), weakref.ref(q)

    out, alive = call()
    loss = (out * 2).sum()
    loss.backward()
    gc.collect()
    assert alive() is None, "the activations outlived the backward (the loss still holds the graph)"

    out, alive = call()
    out.sum().backward(retain_graph=True)
    gc.collect()
    assert alive() is not None
    # first order with retain_graph, then create_graph: still the reference's, differentiable again
    grads = torch.autograd.grad(out.sum(), (x, k, v), create_graph=True)
    assert all(g.grad_fn is not None for g in grads)
    want = torch.autograd.grad(attention(x * 1.0, k, v, backend="einsum").sum(), (x, k, v), create_graph=True)
    for got, ref in zip(grads, want):
        torch.testing.assert_close(got, ref, **tolerance(torch.float32))
    out.sum().backward()
    gc.collect()
    assert alive() is None


def test_under_activation_checkpointing_the_gate_saves_through_its_hooks():
    """torch.utils.checkpoint (non-reentrant) frees a block's activations after its forward and recomputes them
    in backward: the gate must not hold q, k, v itself there (it saves them through the saved-tensor hooks),
    and first- and second-order gradients stay the reference's. Outside a checkpoint, the wrapper the gate
    falls back to (forced here by identity saved-tensor hooks) also lets go of them after the backward."""
    import gc
    import weakref

    import torch.utils.checkpoint as checkpoint

    x = torch.randn(1, 2, 64, 8, requires_grad=True)
    alive: list[weakref.ref] = []

    def block(x: torch.Tensor) -> torch.Tensor:
        q = x * 2.0
        alive.append(weakref.ref(q))
        return attention(q, x, x, backend="sdpa:flash")

    out = checkpoint.checkpoint(block, x, use_reentrant=False)
    gc.collect()
    assert alive[0]() is None, "the checkpointed block's activations outlived its forward"
    dout = torch.randn_like(out)
    (plain,) = torch.autograd.grad(out, x, dout, retain_graph=True)
    (recorded,) = torch.autograd.grad(checkpoint.checkpoint(block, x, use_reentrant=False), x, dout, create_graph=True)
    (want,) = torch.autograd.grad(attention(x * 2.0, x, x, backend="einsum"), x, dout, create_graph=True)
    torch.testing.assert_close(plain, want, **tolerance(torch.float32))
    torch.testing.assert_close(recorded, want, **tolerance(torch.float32))
    small = torch.randn(1, 2, 6, 4, dtype=torch.float64, requires_grad=True)
    assert gradgradcheck(lambda t: checkpoint.checkpoint(block, t, use_reentrant=False), (small,))

    alive.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        out = block(x)
    assert type(out.grad_fn).__name__ == "TwiceDifferentiableBackward"
    loss = out.sum()
    loss.backward()
    gc.collect()
    assert alive[0]() is None, "the wrapper kept the activations after the backward"


def test_the_block_path_lets_go_of_the_activations_after_backward():
    """A window on sdpa:flash runs in query blocks (`_BlockGrads`, under the gate's wrapper): after a backward
    without retain_graph, nothing there holds q, k, v while the caller's loss keeps the graph."""
    import gc
    import weakref

    x = torch.randn(1, 2, 1200, 8, requires_grad=True)
    q = x * 2.0
    alive = weakref.ref(q)
    out = attention(q, x, x, window=(64, 0), backend="sdpa:flash")
    loss = out.sum()
    del q, out
    loss.backward()
    gc.collect()
    assert alive() is None, "the query blocks' node kept q after the backward"
    (want,) = torch.autograd.grad(attention(x * 2.0, x, x, window=(64, 0), backend="einsum").sum(), x)
    torch.testing.assert_close(x.grad, want, **tolerance(torch.float32))


@pytest.mark.parametrize("kind", ["causal + padding", "window"])
def test_the_block_path_backs_up_twice_and_through_an_r1_penalty(kind):
    """Query blocks (`_BlockGrads`) keep their graphs as long as the backward keeps the whole graph: a second
    backward after retain_graph=True, and an R1-style loss (a create_graph gradient, then a backward through
    both it and the output) give the reference's gradients; a third backward without retain says so."""
    n = 600  # above sdpa's query_block: more than one block
    pad = torch.ones(1, n, dtype=torch.bool)
    pad[:, 500:] = False
    kw = dict(mask=pad, causal=True) if kind == "causal + padding" else dict(window=(40, 3))

    def grads(backend: str) -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(0)
        q, k, v = (torch.randn(1, 2, n, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
        out = attention(q, k, v, backend=backend, **kw)
        loss = (out * torch.linspace(-1, 1, 8, dtype=torch.float64)).sum()
        loss.backward(retain_graph=True)
        loss.backward(retain_graph=True)  # the second pass through the kept graph: twice the gradient
        twice = q.grad.clone()
        q.grad = None
        (g,) = torch.autograd.grad(loss, q, create_graph=True)
        (loss + g.square().sum()).backward()
        if backend != "einsum":
            with pytest.raises(RuntimeError, match="second time"):
                loss.backward()
        return twice, q.grad

    got, want = grads("sdpa:flash"), grads("einsum")
    node = "_BlockGradsBackward" if features.get("autograd_node_hooks").present() else "TwiceDifferentiableBackward"
    assert type(attention(*(torch.randn(1, 2, n, 8, requires_grad=True) for _ in range(3)), backend="sdpa:flash",
                          **kw).grad_fn).__name__ == node  # fmt: skip
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@needs("autograd_node_hooks")  # the test watches the hook itself
def test_the_gate_wraps_what_is_not_the_kernels_own_node():
    """`grad2.gate` hooks the kernel's node only where the output comes straight from it and its inputs are
    q, k, v; anything else (here the output of a later op, or a kernel fed an expanded k) goes through the
    `TwiceDifferentiable` wrapper. Both are exact to second order."""
    import torch.nn.functional as F

    from attend.grad2 import gate

    q, k, v = (torch.randn(1, 2, 6, 8, requires_grad=True, dtype=torch.float64) for _ in range(3))
    inp = validate(q, k, v)

    def hooked(q, k, v):
        return gate(F.scaled_dot_product_attention(q, k, v), inp, q, k, v, None)

    def after_an_op(q, k, v):
        return gate(F.scaled_dot_product_attention(q, k, v) * 1.0, inp, q, k, v, None)

    def expanded(q, k, v):
        return gate(F.scaled_dot_product_attention(q, k.expand(1, 2, 6, 8), v), inp, q, k, v, None)

    kinds = {fn: type(fn(q, k, v).grad_fn).__name__ for fn in (hooked, after_an_op, expanded)}
    assert kinds == {
        hooked: "ScaledDotProductFlashAttentionForCpuBackward0",
        after_an_op: "TwiceDifferentiableBackward",
        expanded: "TwiceDifferentiableBackward",
    }
    for fn in kinds:
        assert gradgradcheck(fn, (q, k, v))



@needs("autograd_node_hooks")  # the test watches the hook itself
def test_a_signatures_gate_remembers_whether_the_kernel_takes_q_k_v():
    """`grad2.Gate` (one per dispatch-cache entry) checks the kernel's node at its first gated call and keeps the
    node's type: a signature whose kernel transforms an input (here an expanded k) is wrapped on every later call
    too, one that takes q, k, v is hooked while its node is of that type (another kernel's node is wrapped), and all
    stay exact to second order. Calls without a graph pass through."""
    import torch.nn.functional as F

    from attend.grad2 import Gate

    q, k, v = (torch.randn(1, 2, 6, 8, requires_grad=True, dtype=torch.float64) for _ in range(3))
    takes, expands = Gate(validate(q, k, v)), Gate(validate(q, k, v))
    assert takes.kind is None and takes.template.q.device.type == "meta"  # holds no activation
    flash = "ScaledDotProductFlashAttentionForCpuBackward0"

    def hooked(q, k, v):
        return takes(F.scaled_dot_product_attention(q, k, v), q, k, v)

    def expanded(q, k, v):
        return expands(F.scaled_dot_product_attention(q, k.expand(1, 2, 6, 8), v), q, k, v)

    def another_kernel(q, k, v):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.MATH]):
            return takes(F.scaled_dot_product_attention(q, k, v), q, k, v)

    with torch.no_grad():
        assert hooked(q, k, v).grad_fn is None and takes.kind is None
    for _ in range(2):
        assert type(hooked(q, k, v).grad_fn).__name__ == flash
        assert type(expanded(q, k, v).grad_fn).__name__ == "TwiceDifferentiableBackward"
    assert type(another_kernel(q, k, v).grad_fn).__name__ == "TwiceDifferentiableBackward"
    assert (takes.kind.__name__, expands.kind) == (flash, False)
    for fn in (hooked, expanded, another_kernel):
        assert gradgradcheck(fn, (q, k, v))


def test_recorded_backward_through_an_unrecoverable_dropout_mask_says_what_to_do():
    """A fused CUDA kernel's dropout mask cannot be read back: the recorded backward raises, naming the way out."""
    from attend.grad2 import recompute_grads

    q, k, v = (torch.randn(1, 2, 3, 4, requires_grad=True) for _ in range(3))
    inp = validate(q, k, v, dropout_p=0.1)
    with pytest.raises(RuntimeError, match="backend='chunked' or backend='sdpa:math'"):
        recompute_grads(inp, torch.ones(1, 2, 3, 4), (True, True, True, False))


def test_r1_penalty_with_dropout_uses_the_forward_keep_mask():
    """`Attend(dropout=0.1).train()` at (4, 8, 256, 32): auto picks `chunked` on CPU (dropout, large tiles).
    The R1 penalty and its second-order gradients equal the float64 reference given chunked's own keep-mask
    (rebuilt from the seed the call drew), within the float32 reference's earned budget."""
    from attend import tiles
    from attend.backends import chunked
    from attend.backends.einsum import einsum_attention

    gen = torch.Generator().manual_seed(1)
    base = [torch.randn(4, 8, 256, 32, generator=gen) for _ in range(3)]
    w = torch.randn(4, 8, 256, 32, generator=gen)
    attn = Attend(dropout=0.1).train()
    assert attn.explain(*(t.requires_grad_() for t in base)).backend == "chunked"

    torch.manual_seed(7)
    seed = tiles.draw_seed()  # the draw the call below makes from the same generator state
    keep = chunked.dropout_keep_mask(validate(*base, dropout_p=0.1), seed)
    assert 0.85 < keep.float().mean() < 0.95

    def leaves(dtype):
        return [t.detach().to(dtype).requires_grad_() for t in base]

    torch.manual_seed(7)
    cand = _r1(attn, *leaves(torch.float32), w)

    def reference(q, k, v):
        return einsum_attention(validate(q, k, v, dropout_p=0.1), dropout_keep=keep)

    golden = _r1(reference, *leaves(torch.float64), w.double())
    baseline = _r1(reference, *leaves(torch.float32), w)
    for what, c, gd, bl in zip(["out", "penalty", "d2q", "d2k", "d2v"], cand, golden, baseline):
        assert_matches_reference(c, gd, bl, name=what)


def _second_order(fn, q, k, v):
    """First- and second-order gradients of a fixed scalar loss of fn(q, k, v) (q, k, v float64 leaves)."""
    out = fn(q, k, v)
    first = torch.autograd.grad(out.sin().sum(), (q, k, v), create_graph=True)
    second = torch.autograd.grad(sum(g.square().sum() for g in first), (q, k, v))
    return [g.detach() for g in first], second


@needs("autograd_node_hooks")  # the test watches the hook itself
def test_a_tensor_subclass_after_plain_tensors_of_one_signature_stays_exact():
    """A `__torch_function__` subclass's output comes from its own wrapper node (AliasBackward0), not the kernel's:
    a call of it after plain calls of the same shapes must not get the plain calls' hook (it crashed the create_graph
    backward), and plain calls after it must still take the hook."""

    class Tagged(torch.Tensor):
        pass

    dispatch.clear_cache()

    def leaves(sub):
        gen = torch.Generator().manual_seed(3)
        ts = [torch.randn(1, 2, 16, 8, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3)]
        return [t.as_subclass(Tagged) for t in ts] if sub else ts

    want = _second_order(lambda q, k, v: attention(q, k, v, backend="einsum"), *leaves(False))
    for sub in (False, False, True, False):
        got = _second_order(attention, *leaves(sub))
        for a, b in zip([*got[0], *got[1]], [*want[0], *want[1]]):
            torch.testing.assert_close(a.as_subclass(torch.Tensor), b)
    assert type(attention(*leaves(False)).grad_fn).__name__ == "ScaledDotProductFlashAttentionForCpuBackward0"


@needs("autograd_node_hooks")  # the test watches the hook itself
def test_a_last_dim_of_size_one_with_another_stride_takes_the_kernel_that_was_chosen():
    """(b, h, n, 1) seen through a transpose has stride(-1) != 1 but is_contiguous() True; SDPA's CPU flash refuses
    it and its auto would run math silently, so it must not reuse the contiguous calls' plan: it is validated (a
    contiguous copy) and runs the flash kernel, exact to second order."""
    dispatch.clear_cache()
    gen = torch.Generator().manual_seed(4)
    flat = [torch.randn(1, 2, 16, 1, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    want = _second_order(lambda q, k, v: attention(q, k, v, backend="einsum"), *flat)
    for _ in range(2):
        _second_order(attention, *flat)
    # fresh (1, 2, 1, 16) leaves (strides (32, 16, 16, 1)) with the same values
    base = [torch.zeros(1, 2, 1, 16, dtype=torch.float64).copy_(t.detach().transpose(-1, -2)).requires_grad_() for t in flat]
    views = [t.transpose(-1, -2) for t in base]
    assert views[0].is_contiguous() and views[0].stride(-1) != 1
    out = attention(*views)
    assert type(out.grad_fn).__name__ == "ScaledDotProductFlashAttentionForCpuBackward0"
    first = torch.autograd.grad(out.sin().sum(), base, create_graph=True)
    second = torch.autograd.grad(sum(g.square().sum() for g in first), base)
    for a, b in zip([*first, *second], [*want[0], *want[1]]):
        torch.testing.assert_close(a.transpose(-1, -2), b)


@pytest.mark.parametrize("wrt", ["k", "v"])
def test_func_grad_with_respect_to_k_or_v_alone(wrt):
    """torch.func.grad of attention in k (or v) with q a plain tensor: the transform runs the kernel's own
    derivative (no gate: an autograd.Function of ours would need setup_context under torch.func)."""
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 8, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    for backend in (None, "sdpa:flash"):

        def loss(t, backend=backend):
            args = (q, t, v) if wrt == "k" else (q, k, t)
            return attention(*args, backend=backend).sin().sum()

        x = k if wrt == "k" else v
        want = torch.func.grad(lambda t: loss(t, backend="einsum"))(x)
        for _ in range(2):  # the first call plans, the second runs the plan
            torch.testing.assert_close(torch.func.grad(loss)(x), want)


class _DropGrad(torch.autograd.Function):
    """x, passed on; its backward gives x no gradient at all (None)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return None


@pytest.mark.parametrize("kw", [{}, {"mask": "padding", "causal": True}], ids=["plain", "padding + causal (blocks)"])
def test_create_graph_when_no_gradient_reaches_the_output(kw):
    """Under create_graph, the output's gradient may be None (a custom Function that gives none): the hook leaves the
    kernel's zero gradients, as the reference gives (it crashed with an AttributeError)."""
    n = 1100 if kw else 16
    gen = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, 2, n, 8, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3))
    if kw:
        mask = torch.ones(1, n, dtype=torch.bool)
        mask[:, -100:] = False
        kw = {**kw, "mask": mask}
    for backend in ("einsum", "sdpa:flash", "sdpa:flash"):
        out = attention(q, k, v, backend=backend, **kw)
        grads = torch.autograd.grad(_DropGrad.apply(out).sum() + q.square().sum(), (q, k, v), create_graph=True,
                                    allow_unused=True)  # fmt: skip
        torch.testing.assert_close(grads[0], 2 * q)
        assert all(g is None or not g.any() for g in grads[1:])


@needs("autograd_node_hooks")  # the test watches the hook itself
def test_the_second_order_hook_is_armed_only_by_a_recording_backward():
    """The kernel's node carries a pre-hook (one gradient handed to Python per first-order backward); a backward
    that records (create_graph) arms the post-hook that swaps in the reference's gradients, once per node, and every
    recording backward through the node then gets exact, differentiable gradients."""
    from attend.grad2 import _ARMED

    dispatch.clear_cache()
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, 2, 16, 8, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3))
    want = _second_order(lambda q, k, v: attention(q, k, v, backend="einsum"), q, k, v)
    for _ in range(2):
        out = attention(q, k, v)
        node = out.grad_fn
        assert type(node).__name__ == "ScaledDotProductFlashAttentionForCpuBackward0"
        loss = out.sin().sum()
        loss.backward(retain_graph=True)  # first order: the pre-hook only
        assert _ARMED not in node.metadata
        for _ in range(2):  # two recording backwards through one node: armed once, exact both times
            first = torch.autograd.grad(loss, (q, k, v), create_graph=True)
            assert node.metadata[_ARMED] is True
            second = torch.autograd.grad(sum(g.square().sum() for g in first), (q, k, v), retain_graph=True)
            for a, b in zip([*first, *second], [*want[0], *want[1]]):
                torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kw", [{}, {"window": (3, 2)}], ids=["hooked kernel", "query blocks"])
def test_a_callers_own_post_hook_applies_under_create_graph_too(kw):
    """A post-hook the caller puts on the output's node after the forward sees, and may change, the gradients in
    both kinds of backward: attend's reference gradients are registered ahead of it when a recording backward
    arms them (before, they came after it and threw its change away under create_graph)."""
    gen = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(1, 2, 16, 8, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3))
    for _ in range(2):
        out = attention(q, k, v, **kw)
        out.grad_fn.register_hook(lambda grads, _: tuple(None if g is None else 2 * g for g in grads))
        (first,) = torch.autograd.grad(out.sum(), q, retain_graph=True)
        (recorded,) = torch.autograd.grad(out.sum(), q, create_graph=True)
        torch.testing.assert_close(recorded, first)
        assert recorded.requires_grad


def test_threads_recording_backwards_through_one_graph_all_get_the_reference(monkeypatch):
    """Two threads run create_graph backwards through one graph at once (PyTorch allows it on CPU with
    retain_graph). Arming the post-hook is atomic: neither thread runs the node without it (the second order then
    raised PyTorch's 'not implemented'), nor with one registered after its own pre-hooks (an IndexError). The hook's
    constructor is slowed here to hold that window open."""
    import threading
    import time

    from attend import grad2

    class Slow(grad2._SecondOrder):
        __slots__ = ()

        def __init__(self, *args):
            time.sleep(0.1)
            super().__init__(*args)

    monkeypatch.setattr(grad2, "_SecondOrder", Slow)
    gen = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(1, 2, 16, 8, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3))
    want = _second_order(lambda q, k, v: attention(q, k, v, backend="einsum"), q, k, v)
    loss = attention(q, k, v).sin().sum()
    results: dict[str, object] = {}

    def run(name: str, delay: float) -> None:
        time.sleep(delay)
        try:
            first = torch.autograd.grad(loss, (q, k, v), create_graph=True)
            second = torch.autograd.grad(sum(g.square().sum() for g in first), (q, k, v), retain_graph=True)
            results[name] = [*first, *second]
        except Exception as err:  # reported below, with the thread's name
            results[name] = err

    threads = [threading.Thread(target=run, args=(name, delay)) for name, delay in (("a", 0.0), ("b", 0.03))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for name, got in results.items():
        assert isinstance(got, list), f"thread {name}: {got!r}"
        for a, b in zip(got, [*want[0], *want[1]]):
            torch.testing.assert_close(a, b)
    assert len(results) == 2
