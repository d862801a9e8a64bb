"""`attention()` and `explain()`: the functional API.

Shape legend: b batch, h query heads, g key/value heads, i query positions, j key positions,
d head dim (q and k), e value head dim.
"""

from __future__ import annotations

from typing import Literal, overload

from torch import Tensor

from ._helpers import any_autocast, autocast_inputs
from .dispatch import Report, call, explain_inputs
from .inputs import Options, validate

__all__ = ["attention", "explain", "autocast_inputs", "DOC_SEMANTICS"]

DOC_SEMANTICS = """
    Shapes (legend: b batch, h query heads, g key/value heads, i query positions, j key positions,
    d head dim (q and k), e value head dim):
        q (b, h, i, d), k (b, g, j, d), v (b, g, j, e), h % g == 0  ->  out (b, h, i, e), q's dtype

    Equivalent to (the `einsum` reference backend, with softmax in float32)::

        sim = einsum('b h i d, b h j d -> b h i j', q, k) * scale    # k, v shared by h // g heads
        sim = sim + bias                                              # bias: float, broadcast
        sim = sim.masked_fill(~mask | ~causal_keep, -inf)             # mask: bool, True = may attend
        attn = dropout(sim.softmax(dim=-1), dropout_p)                # a row with no key gives 0
        out = einsum('b h i j, b h j e -> b h i e', attn, v)

    Non-finite inputs (NaN, inf): whatever sits in a position a row may not attend never reaches that row,
    on every backend (SDPA's kernels alone would spread it through their additive masks). With
    `check_finite=True`, a NaN or inf in q, k or v makes NaN exactly the output rows that see it: a row whose
    own query is non-finite, or that may attend a key whose k or v is non-finite; such rows pass no
    gradient, and non-finite entries get gradient 0. The default checks only what a masked call outputs (on
    CPU), so a row that sees one gets the kernel's own result (CPU flash gives a NaN query row 0). Under
    torch.compile, torch.export, torch.func.vmap and CUDA graph capture no check runs (docs/reliability.md).

    `mask` may be 2-D (b, j): a key padding mask. `causal=True` is aligned to the bottom-right, as in
    flash-attn and KV-cache decoding: query i may attend key j iff j <= i + (j_len - i_len)::

        i_len=2, j_len=5: q0 sees k0..k3, q1 sees k0..k4
        i_len=5, j_len=2: q0..q2 see nothing (output 0), q3 sees k0, q4 sees k0..k1
"""


@overload
def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: Tensor | None = None,
    bias: Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
    backend: str | None = None,
    window: tuple[int | None, int | None] | None = None,
    documents: Tensor | tuple[Tensor, Tensor] | None = None,
    score: str = "dot",
    deterministic: bool = False,
    check_finite: bool | None = None,
    sinks: Tensor | None = None,
    softcap: float | None = None,
    return_lse: Literal[False] = False,
) -> Tensor: ...


@overload
def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: Tensor | None = None,
    bias: Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
    backend: str | None = None,
    window: tuple[int | None, int | None] | None = None,
    documents: Tensor | tuple[Tensor, Tensor] | None = None,
    score: str = "dot",
    deterministic: bool = False,
    check_finite: bool | None = None,
    sinks: Tensor | None = None,
    softcap: float | None = None,
    return_lse: Literal[True],
) -> tuple[Tensor, Tensor]: ...


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: Tensor | None = None,
    bias: Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
    backend: str | None = None,
    window: tuple[int | None, int | None] | None = None,
    documents: Tensor | tuple[Tensor, Tensor] | None = None,
    score: str = "dot",
    deterministic: bool = False,
    check_finite: bool | None = None,
    sinks: Tensor | None = None,
    softcap: float | None = None,
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    if any_autocast():  # (one C call; the function call and its tuples cost more than the check)
        q, k, v, bias = autocast_inputs(q, k, v, bias)  # type: ignore[assignment]
    options = Options(causal, scale, dropout_p, window, score, deterministic, check_finite, return_lse, softcap)
    return call(q, k, v, mask, bias, documents, sinks, options=options, backend=backend)


attention.__doc__ = (
    """Scaled dot-product attention through the fastest backend that can run the inputs.

    Args:
        q, k, v: query, key and value tensors (shapes below).
        mask: bool, True = may attend, broadcastable to (b, h, i, j); 2-D (b, j) = key padding.
        bias: float, added to the scaled logits, broadcastable to (b, h, i, j).
        causal: bottom-right aligned causal masking (picture below).
        scale: logit scale, default d ** -0.5.
        dropout_p: dropout on the attention probabilities (applied whenever > 0).
        backend: None for auto, or a name from `list_backends()`; a named backend runs or raises.
        window: (left, right): query i sees key j iff p - left <= j <= p + right, p = i + (j_len - i_len)
            (bottom-right aligned, like causal; with causal=True right is 0). Each side an int >= 0 or
            None (unbounded). Costs work in proportion to i * (left + right), not i * j.
        documents: int (b, j) document ids of the keys, also the queries' when i == j, or a pair
            (q_docs (b, i), k_docs (b, j)): a query sees only keys of its own document (packed sequences).
            Causal and window stay position-based, so causal holds inside each packed document. Sorted
            key ids (as packing gives) let every backend skip the blocks across documents.
        score: "dot" (q . k) or "l2": -(|q|^2 + |k|^2 - 2 q . k) * scale, GigaGAN's negative squared L2
            distance; runs on the fused kernels as a dot product with one more head dim (exact gradients).
        deterministic: only backends declared deterministic may run (bitwise-identical outputs and
            gradients run to run); also implied by `torch.use_deterministic_algorithms(True)`.
        check_finite: the NaN/inf check (below). None (default): on CPU, a call that masks anything (mask,
            bias, causal, window, documents) reads its output, so nothing from a position a row may not
            see can reach it (SDPA's additive masks would leak it); an unmasked call reads nothing. Off
            on CUDA, where reading a result would stall the GPU pipeline once per call. True: the exact
            check everywhere: q, k, v are read too, and NaN/inf make NaN exactly the rows that see them
            (on CUDA one host sync per call). False: off; each kernel's own NaN behaviour applies.
        sinks: attention sinks, float (h,) or (b, h): one logit per query head added to every row's softmax
            denominator with no value (gpt-oss): `p = softmax([s_1 .. s_j, sink_h])[:j]`, `out = p @ v`. A row
            with no key still gives 0. Differentiable in `sinks`. Run as a rescale of the log-sum-exp, so by the
            backends that give one (`return_lse` below).
        softcap: logit soft-capping (Gemma 2), a float > 0: `s = softcap * tanh(scale * q.k / softcap)` before the
            bias and the masks (flash-attention's order); with score="l2" it caps the l2 score. Backends that
            cap inside their tiles declare `Caps.softcap` (einsum, chunked); the others are ineligible rather
            than build (b, h, i, j) scores.
        return_lse: also return the log-sum-exp: `(out, lse)`, lse (b, h, i) float32 (float64 for float64
            inputs), the natural log of each row's softmax normaliser over the keys it may attend, after the
            scale and bias (`logsumexp(sim, dim=-1)` in the formula below); -inf for a row with no key; NaN where
            the row's output is NaN; with sinks it includes the sink (a row with no key: the sink). Differentiable
            (into q, k, bias and sinks), second order too. Backends that give
            it declare `Caps.lse` (einsum, chunked; not PyTorch's SDPA kernels, `explain` says so).

    Faults: in auto mode, a backend that runs out of memory or says it cannot run the inputs ("No
    available kernel", "not implemented for", "not supported") is retried on the next eligible backend
    (`chunked` first for out of memory) with one `AttendFallbackWarning`, and not tried again for that
    signature (`explain` names the one that runs); any other exception propagates untouched. A named
    backend re-raises as RuntimeError("backend 'name' failed: ...").
"""
    + DOC_SEMANTICS
    + """
    Raises:
        TypeError, ValueError: bad input, before any kernel runs ("expected X, got Y").
        ValueError: the named `backend` cannot run these inputs (its reasons are listed).
        NoBackendError: no registered backend can run these inputs.
        RuntimeError: the named `backend` failed at run time, or every eligible one did.

    Example::

        >>> q = torch.randn(2, 8, 128, 64); k = v = torch.randn(2, 2, 128, 64)
        >>> pad = torch.ones(2, 128, dtype=torch.bool); pad[1, 100:] = False
        >>> out = attention(q, k, v, mask=pad, causal=True)       # (2, 8, 128, 64)
    """
)


def explain(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: Tensor | None = None,
    bias: Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
    backend: str | None = None,
    window: tuple[int | None, int | None] | None = None,
    documents: Tensor | tuple[Tensor, Tensor] | None = None,
    score: str = "dot",
    deterministic: bool = False,
    check_finite: bool | None = None,
    sinks: Tensor | None = None,
    softcap: float | None = None,
    return_lse: bool = False,
) -> Report:
    q, k, v, bias = autocast_inputs(q, k, v, bias)  # type: ignore[assignment]
    options = Options(causal, scale, dropout_p, window, score, deterministic, check_finite, return_lse, softcap)
    inp = validate(q, k, v, mask=mask, bias=bias, documents=documents, sinks=sinks, options=options)
    return explain_inputs(inp, backend)


explain.__doc__ = (
    """Which backend `attention(...)` would run for these inputs, and why not each of the others.

    Takes the same arguments as `attention`; runs no kernel. Returns a `Report` with
    `report.backend` (str, or None when nothing can run), `report.reasons` (dict: backend name ->
    list of reasons it cannot run the inputs; empty when it can), `report.lowering` (how the chosen
    backend runs an l2 score, a window or documents) and `str(report)`, a readable table.
"""
    + DOC_SEMANTICS
    + """
    Raises:
        TypeError, ValueError: bad input ("expected X, got Y").

    Example::

        >>> print(explain(q, k, v, mask=pad, causal=True))
        >>> explain(q, k, v, dropout_p=0.1).reasons["sdpa:flash"]
        ['dropout_p=0.1 > 0; this backend has no dropout']
    """
)
