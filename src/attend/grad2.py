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
  is then True) computes dq, dk, dv, dbias from the reference formula (the `einsum` backend, in float32
  or float64) on the saved inputs, with the same masks and, for dropout, the forward's own keep-mask.
  Those gradients are exact and differentiable again, to any order.

Cost: only the create_graph backward pays, and it holds the (b, h, i, j) probabilities like the reference
does (a memory-bounded double backward would need a hand-written second-order kernel).

Backends use it in two ways. One with its own `autograd.Function` (`chunked`) calls `recompute_grads`
from its backward. One whose kernel belongs to PyTorch (`sdpa:flash`, `sdpa:efficient`, `sdpa:cudnn`)
runs through `TwiceDifferentiable`, which keeps the kernel's own graph for the first-order backward.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import cast

import torch
from torch import Tensor

from ._helpers import accum_dtype
from .backends.einsum import einsum_attention
from .inputs import AttnInputs

__all__ = ["recompute_grads", "TwiceDifferentiable", "records_graph"]


def records_graph() -> bool:
    """Inside a backward: is autograd recording it (`create_graph=True`)?"""
    return torch.is_grad_enabled()


def recompute_grads(
    inp: AttnInputs, dout: Tensor, wanted: tuple[bool, bool, bool, bool], dropout_keep: Tensor | None = None
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """(dq, dk, dv, dbias) of the reference at `inp` for the output gradient `dout`, as differentiable
    functions of inp.q, inp.k, inp.v, inp.bias and dout. `wanted` flags which of the four are needed
    (None is returned for the others). `dropout_keep`: the forward's bool keep-mask, broadcastable to
    (b, h, i, j); required when inp.dropout_p > 0.

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
        wide = [None if t is None else (t if t.dtype == acc else t.to(acc)) for t in leaves]
        run = replace(inp, q=cast(Tensor, wide[0]), k=cast(Tensor, wide[1]), v=cast(Tensor, wide[2]), bias=wide[3])
        out = einsum_attention(run, dropout_keep=dropout_keep)
        targets = [t for t, want in zip(leaves, wanted) if want and t is not None]
        grads = iter(torch.autograd.grad(out, targets, dout.to(out.dtype), create_graph=True, allow_unused=True))
    result: list[Tensor | None] = []
    for t, want in zip(leaves, wanted):
        if not want or t is None:
            result.append(None)
            continue
        grad = next(grads)
        result.append(torch.zeros_like(t) if grad is None else grad.to(t.dtype))
    return result[0], result[1], result[2], result[3]


class TwiceDifferentiable(torch.autograd.Function):
    """Run `kernel(inp)` (a PyTorch kernel with its own first-order backward) so that its backward is
    that kernel's own, and a recorded backward (create_graph) is the reference's (`recompute_grads`).

    The kernel runs on detached copies of q, k, v, bias with grad enabled, so its graph is kept for the
    first-order backward exactly as a direct call keeps it: no extra memory, no recompute.
    """

    @staticmethod
    def forward(ctx, kernel: Callable[[AttnInputs], Tensor], inp: AttnInputs, q, k, v, bias):
        inner = [None if t is None else t.detach().requires_grad_(t.requires_grad) for t in (q, k, v, bias)]
        with torch.enable_grad():
            out = kernel(replace(inp, q=cast(Tensor, inner[0]), k=cast(Tensor, inner[1]), v=cast(Tensor, inner[2]),
                                 bias=inner[3]))
        ctx.inp = inp
        ctx.inner = inner
        # the kernel's output (and through its grad_fn, the kernel's own graph) is saved like any tensor, so
        # autograd frees it when it frees this node's saved tensors: right after this node's backward,
        # unless the caller asked for retain_graph=True (then it stays for the next backward, as it should)
        ctx.save_for_backward(q, k, v, bias, out)
        return out.detach()

    @staticmethod
    def backward(ctx, dout):
        wanted = tuple(ctx.needs_input_grad[2:6])
        q, k, v, bias, out = ctx.saved_tensors
        if records_graph():
            grads = recompute_grads(replace(ctx.inp, q=q, k=k, v=v, bias=bias), dout, wanted)
            return (None, None, *grads)
        inner = ctx.inner
        targets = [t for t, want in zip(inner, wanted) if want and t is not None]
        found = iter(torch.autograd.grad(out, targets, dout, retain_graph=True, allow_unused=True))
        grads = []
        for t, want in zip(inner, wanted):
            grad = next(found) if want and t is not None else None
            grads.append(torch.zeros_like(t) if grad is None and want and t is not None else grad)
        return (None, None, *grads)
