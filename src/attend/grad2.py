"""Second-order gradients through every backend: the backward, when autograd records it, is recomputed
through the reference's twice-differentiable formula.

Shape legend: b batch, h query heads, g key/value heads, i query positions, j key positions,
d head dim (q and k), e value head dim.

A fused kernel's backward (PyTorch's flash and memory-efficient kernels, `chunked`'s tile loop) is a
first-order formula: differentiating it again either fails (`derivative for
aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented`) or, for a hand-written
`autograd.Function`, silently treats its saved state as constants. GAN gradient penalties (R1/R2,
WGAN-GP), meta-learning and Hessian-vector products need the second derivative. The rule here:

* ordinary training (`loss.backward()`, `torch.autograd.grad(...)` without `create_graph`) runs each
  backend's own fast backward, unchanged;
* a backward that autograd records (`create_graph=True`; inside the backward `torch.is_grad_enabled()`
  is then True) computes dq, dk, dv, dbias from the reference formula (`attend.reference`, what the
  `einsum` backend runs, in float32 or float64) on the saved inputs, with the same masks and, for dropout,
  the forward's own keep-mask.
  Those gradients are exact and differentiable again, to any order.

Cost: the create_graph backward recomputes, and holds the (b, h, i, j) probabilities like the reference
does (a memory-bounded double backward would need a hand-written second-order kernel); ordinary training
pays only the gate's bookkeeping below, and keeps q, k, v no longer than the kernel's own saved tensors.

Backends use it in two ways. One with its own `autograd.Function` (`chunked`) calls `recompute_grads`
from its backward. One whose kernel belongs to PyTorch (`sdpa:flash`, `sdpa:efficient`, `sdpa:cudnn`)
goes through `gate` (or `Gate`, one per dispatch-cache entry), which keeps the kernel's own graph for the
first-order backward: where the output comes straight from the kernel's autograd node, and that node takes and
saves q, k, v as they are, a pre-hook on the node (`torch.autograd.graph.Node.register_prehook`) does nothing in
a first-order backward; under create_graph it puts a post-hook on the node that swaps in the reference's
gradients, computed from the node's own saved q, k, v (read through `torch._C._current_autograd_node()`: the
hooks hold no activation), ahead of any post-hook of the caller's, and marks the node (`node.metadata` then holds
`"attend.grad2": True`). Any Python hook on a node costs about 4-6 us per training call on CPU (registering
it, and the engine calling back into Python in the backward, whatever the hook does; a pre-hook is handed one
gradient, a post-hook four: about 1.5 us more), the bulk of what attend adds to a small call's forward +
backward. Anywhere else, and
under saved-tensor hooks (activation checkpointing, offloading), the output goes through `TwiceDifferentiable`,
a Python `autograd.Function` (about 17 us) that saves q, k, v through those hooks.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import replace
from typing import Any, cast

import torch
from torch import Tensor

from . import features
from ._helpers import accum_dtype
from .inputs import AttnInputs
from .reference import einsum_attention

__all__ = ["recompute_grads", "TwiceDifferentiable", "records_graph", "gate", "Gate", "keep_graph"]


def records_graph() -> bool:
    """Inside a backward: is autograd recording it (`create_graph=True`)?"""
    return torch.is_grad_enabled()


def recompute_grads(
    inp: AttnInputs,
    dout: Tensor,
    wanted: tuple[bool, bool, bool, bool],
    dropout_keep: Tensor | None = None,
    dlse: Tensor | None = None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """(dq, dk, dv, dbias) of the reference at `inp` for the output gradient `dout` (and `dlse`, the gradient
    of the log-sum-exp output, (b, h, i), where the call returned one), as differentiable functions of inp.q,
    inp.k, inp.v, inp.bias, dout and dlse. `wanted` flags which of the four are needed (None is returned for
    the others). `dropout_keep`: the forward's bool keep-mask, broadcastable to (b, h, i, j); required when
    inp.dropout_p > 0.

    Runs in float32 (float64 for float64 inputs): the gradients are cast back to each input's dtype.
    """
    if inp.dropout_p > 0 and dropout_keep is None:
        raise RuntimeError(
            "attend: second-order gradients through dropout need the forward's keep-mask, and this backend "
            "cannot give it back; hint: pin backend='chunked' or backend='sdpa:math' for double backward "
            "with dropout"
        )
    acc = accum_dtype(inp.dtype)
    leaves = (inp.q, inp.k, inp.v, inp.bias)
    with torch.enable_grad():
        # a fresh alias of each input (a view, or the cast): with `attention(x, x, x)` or k and v the same tensor,
        # the gradient for k must be the one through k alone, not x's total (then counted once per use)
        wide = [None if t is None else (t.view_as(t) if t.dtype == acc else t.to(acc)) for t in leaves]
        q, k, v = cast(Tensor, wide[0]), cast(Tensor, wide[1]), cast(Tensor, wide[2])
        run = replace(inp, q=q, k=k, v=v, bias=wide[3], return_lse=dlse is not None)
        result_ = einsum_attention(run, dropout_keep=dropout_keep)
        outs: list[Tensor] = [result_] if isinstance(result_, Tensor) else list(result_)
        cotangents = [dout] if dlse is None else [dout, dlse]  # (out, lse): the log-sum-exp's gradient too
        targets = [w for w, want in zip(wide, wanted) if want and w is not None]
        cotangents = [c.to(o.dtype) for c, o in zip(cotangents, outs)]
        grads = iter(torch.autograd.grad(outs, targets, cotangents, create_graph=True, allow_unused=True))
    result: list[Tensor | None] = []
    for t, want in zip(leaves, wanted):
        if not want or t is None:
            result.append(None)
            continue
        grad = next(grads)
        result.append(torch.zeros_like(t) if grad is None else grad.to(t.dtype))
    return result[0], result[1], result[2], result[3]


class TwiceDifferentiable(torch.autograd.Function):
    """A gate on the output of a PyTorch kernel that has only a first-order backward:
    `TwiceDifferentiable.apply(out, inp, q, k, v, bias)` returns `out` (a view). Only `inp`'s non-tensor fields
    (and its mask) are read: the backward puts the saved q, k, v, bias in.

    Its backward hands the output gradient straight on to the kernel's own backward node (in the same pass of
    the autograd engine: no nested backward, no recompute, nothing kept), unless autograd records the backward
    (create_graph): then the kernel's node gets no gradient at all and dq, dk, dv, dbias come from the reference
    (`recompute_grads`), differentiable again.
    """

    @staticmethod
    def forward(ctx, out: Tensor, inp: AttnInputs, q, k, v, bias):
        ctx.inp = inp
        ctx.save_for_backward(q, k, v, bias)
        return out.view_as(out)

    @staticmethod
    def backward(ctx, dout):
        if records_graph():
            q, k, v, bias = ctx.saved_tensors
            wanted = tuple(ctx.needs_input_grad[2:6])
            grads = recompute_grads(replace(ctx.inp, q=q, k=k, v=v, bias=bias), dout, wanted)
            return (None, None, *grads)
        return dout, None, None, None, None, None


def _node_takes(node: torch.autograd.graph.Node, inputs: tuple[Tensor, Tensor, Tensor]) -> bool:
    """Are the autograd node's inputs exactly `inputs`, in order (a None edge for one that needs no grad)?"""
    edges = node.next_functions
    if len(edges) != len(inputs):
        return False
    for (fn, _), t in zip(edges, inputs):
        if not t.requires_grad:
            if fn is not None:
                return False
        elif t.grad_fn is not None:
            if fn is not t.grad_fn:
                return False
        elif fn is None or getattr(fn, "variable", None) is not t:  # a leaf: its AccumulateGrad
            return False
    return True


# Does the running backward keep its graph (retain_graph)? A private engine query (torch 2.13 has it): a per-call
# hook lets go of its inputs' mask when the backward frees the graph (without it, when the node dies)
keep_graph: Callable[[], bool] | None = getattr(
    getattr(torch._C, "_autograd", None), "_get_current_graph_task_keep_graph", None
)
# The node the autograd engine is running (private; torch 2.13 has it): the hook reads q, k, v from the kernel
# node's own saved tensors, so it holds no activation and they live exactly as long as the kernel keeps them
_current_node: Callable[[], Any] | None = getattr(torch._C, "_current_autograd_node", None)
# Are saved-tensor hooks active (activation checkpointing, CPU offloading)? Then the node's saved tensors may be
# unpacked only once (checkpoint's rule): q, k, v are saved through the hooks by the wrapper instead
_saved_tensors_hooks = getattr(getattr(torch._C, "_autograd", None), "_top_saved_tensors_default_hooks", None)
# the hook needs both private queries, and a node's pre-hooks and metadata; without any, every output is wrapped
_HOOKS = (
    _current_node is not None
    and _saved_tensors_hooks is not None
    and hasattr(torch.autograd.graph.Node, "register_prehook")
    and hasattr(torch.autograd.graph.Node, "metadata")
)
HOOKS = features.register(
    "autograd_node_hooks",
    api="torch._C._current_autograd_node and torch._C._autograd._top_saved_tensors_default_hooks "
    "(with Node.register_prehook and Node.metadata)",
    since="2.5",
    without="every fused kernel's output goes through grad2.TwiceDifferentiable, which saves q, k, v itself "
    "(the same gradients; about one activation more per call while training)",
    present=lambda: _HOOKS,
)
KEEP_GRAPH = features.register(
    "graph_task_keep_graph",
    api="torch._C._autograd._get_current_graph_task_keep_graph",
    since="2.5",
    without="a hooked kernel node keeps its inputs' mask until the node dies, not until backward frees the graph",
    present=lambda: keep_graph is not None,
)
_ARMED = "attend.grad2"  # the key in a node's metadata once `_Arm` has put the post-hook on it
_NOTHING = torch.empty(0, device="meta")


def gate(out: Tensor, inp: AttnInputs, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None) -> Tensor:
    """`out` of a first-order PyTorch kernel on (q, k, v, bias), made exactly twice differentiable: the
    kernel's own backward for training, `recompute_grads` under create_graph. Only `inp`'s non-tensor fields
    (and its mask) are read; q, k, v, bias are this call's.

    Where `out` is the first output of the kernel's node, and that node takes and saves exactly q, k, v (no
    bias), the node gets a pre-hook (`_Arm`) that, under create_graph, adds the post-hook replacing its gradients
    by the reference's, computed from the node's own saved q, k, v. Otherwise, and while saved-tensor hooks are
    active (activation checkpointing, offloading), `out` goes through `TwiceDifferentiable`, which saves q, k, v
    through them."""
    node = out.grad_fn
    if node is None:
        return out
    if bias is None and _hooks_usable() and _hooked(out, node, q, k, v):
        # the hook lets go of `inp` when the backward frees the graph; where it cannot tell, it keeps no activation
        node.register_prehook(_Arm(inp if keep_graph is not None else _template(inp), release=True))
        return out
    return TwiceDifferentiable.apply(out, _template(inp), q, k, v, bias)


class Gate:
    """`gate` for the calls of one signature (shapes, dtypes, devices, tensor types, grad state, options: what a
    dispatch cache entry is keyed on), bias-free: `Gate(inp)(out, q, k, v)`. Whether the kernel's node takes and
    saves q, k, v as they are follows from the signature (a kernel that pads, expands or scales an input does so
    for every call of it), so it is checked at the first call, and later calls check only that their node is of
    the same type (another kernel, or a subclass's wrapper node, makes another type: the wrapper then runs).
    Every call's node gets the same hook: about 1 us less per call than `gate`. Holds no tensor (q, k, v of `inp`
    become meta placeholders)."""

    __slots__ = ("hook", "kind")

    def __init__(self, inp: AttnInputs):
        self.hook = _Arm(_template(inp), release=False)
        # the type of the node the hook goes on: None before the first call with hooks usable, False when that
        # call's node could not carry it
        self.kind: type | bool | None = None

    @property
    def template(self) -> AttnInputs:
        return cast(AttnInputs, self.hook.inp)

    def __call__(self, out: Tensor, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        node = out.grad_fn
        if node is None:
            return out
        if _hooks_usable():
            kind = self.kind
            if kind is None:
                kind = self.kind = type(node) if _hooked(out, node, q, k, v) else False
            if type(node) is kind:
                node.register_prehook(self.hook)
                return out
        return TwiceDifferentiable.apply(out, self.template, q, k, v, None)


def _hooks_usable() -> bool:
    """This torch has what the hooks need (`_HOOKS`), and no saved-tensor hooks are active."""
    return _HOOKS and _saved_tensors_hooks(False) is None  # type: ignore[misc]


def _hooked(out: Tensor, node, q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Can `node` carry the hook: `out` is its first output, its inputs are q, k, v, and it saves them as they
    are (`_saved_qkv`)? Reads the saved tensors: only while no saved-tensor hooks are active."""
    if out.output_nr != 0 or not _node_takes(node, (q, k, v)):
        return False
    saved = _saved_qkv(node)
    return saved is not None and saved[0] is q and saved[1] is k and saved[2] is v


def _saved_qkv(node) -> tuple[Tensor, Tensor, Tensor] | None:
    """The q, k, v a kernel's autograd node saved: SDPA's kernels name them (`_saved_query`...); an
    `autograd.Function` of ours (`_BlockGrads`) saves them first (`ctx.save_for_backward(q, k, v)`)."""
    try:
        return node._saved_query, node._saved_key, node._saved_value
    except AttributeError:
        saved = getattr(node, "saved_tensors", None)
        return None if saved is None or len(saved) < 3 else (saved[0], saved[1], saved[2])


def _template(inp: AttnInputs) -> AttnInputs:
    """`inp` without its activations: what the hook and the wrapper's ctx keep as long as the node lives."""
    if inp.q.device.type == "meta":
        return inp
    return replace(inp, q=_NOTHING, k=_NOTHING, v=_NOTHING, bias=None)


class _Arm:
    """The pre-hook `gate` and `Gate` put on a kernel's autograd node. A first-order backward pays only this call
    (PyTorch hands a pre-hook the one output gradient, a post-hook all four gradients: about 1.5 us less per call
    on CPU). Under create_graph it puts `_SecondOrder` on the node as a post-hook, once per node (the engine looks
    for post-hooks after running the pre-hooks). `release`: let go of `inp` (its mask, and for `gate` q, k, v)
    when a backward that frees the graph runs through (a per-call hook; `Gate`'s one hook serves every call of
    its signature)."""

    __slots__ = ("inp", "release")

    def __init__(self, inp: AttnInputs, release: bool):
        self.inp: AttnInputs | None = inp
        self.release = release

    def __call__(self, grad_outputs: tuple) -> None:
        inp = _take(self)
        if torch.is_grad_enabled() and inp is not None:  # records_graph(), without a Python call
            node = _current_node()  # type: ignore[misc]  # (not None wherever the hook is used: _HOOKS)
            # under a lock, marked once registered: threads may run recording backwards through one graph, and one
            # that found no mark, or the mark before the hook, would run the node without it
            with _ARM_LOCK:
                marks = node.metadata
                if _ARMED not in marks:
                    _first_post_hook(node, _SecondOrder(inp, self.release))
                    marks[_ARMED] = True
        return None


_ARM_LOCK = threading.Lock()


def _take(hook: _Arm | _SecondOrder) -> AttnInputs | None:
    """The hook's `inp`, which it lets go of (`release`) when the running backward frees the graph: nothing may run
    through the node again."""
    inp = hook.inp
    if hook.release and keep_graph is not None and not keep_graph():
        hook.inp = None
    return inp


def _first_post_hook(node, hook: _SecondOrder) -> None:
    """Register `hook` on `node` ahead of the Python post-hooks already there: a caller's own post-hook, added after
    the forward, must see (and may change) the reference's gradients under create_graph, as it sees the kernel's in
    a first-order backward. (PyTorch keeps a node's Python post-hooks in one dict, called in its order.)"""
    handle = node.register_hook(hook)
    hooks = getattr(handle, "hooks_dict_ref", lambda: None)()
    if hooks is not None and len(hooks) > 1:
        others = [(key, value) for key, value in hooks.items() if key != handle.id]
        hooks.clear()
        hooks[handle.id] = hook
        hooks.update(others)


class _SecondOrder:
    """The post-hook `_Arm` puts on a kernel's autograd node under create_graph: the reference's dq, dk, dv
    (differentiable again) from the node's own saved q, k, v, in place of the kernel's; nothing in a later
    backward that does not record. `release`: as `_Arm`'s."""

    __slots__ = ("inp", "release")

    def __init__(self, inp: AttnInputs, release: bool):
        self.inp: AttnInputs | None = inp
        self.release = release

    def __call__(self, grad_inputs: tuple, grad_outputs: tuple) -> tuple | None:
        # (the kernel's node ran first: had its saved tensors been released, it would have raised already; they
        # are released after its post-hooks)
        inp = _take(self)
        # (records_graph(), without a Python call: this runs in every backward.) No gradient reached the output
        # (None: a zero gradient): the kernel's gradients are zero and take no part in a second backward
        if not torch.is_grad_enabled() or grad_outputs[0] is None:
            return None
        assert inp is not None and _current_node is not None
        q, k, v = cast(tuple, _saved_qkv(_current_node()))
        run = replace(inp, q=q, k=k, v=v, bias=None)
        wanted = (grad_inputs[0] is not None, grad_inputs[1] is not None, grad_inputs[2] is not None, False)
        dq, dk, dv, _ = recompute_grads(run, grad_outputs[0], wanted)
        return dq, dk, dv
