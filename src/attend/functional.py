"""`attention()` and `explain()`: the functional API.

Shape legend: b batch, h query heads, g key/value heads, i query positions, j key positions,
d head dim (q and k), e value head dim.
"""

from __future__ import annotations

import contextlib
import math
import traceback
import warnings
from dataclasses import replace

import torch
from torch import Tensor

from .backends.base import Backend
from .dispatch import AttendFallbackWarning, Report, explain_inputs, fallbacks, select
from .inputs import AttnInputs, validate
from .masks import dead_keys, rows_that_see

__all__ = ["attention", "explain", "run_inputs", "autocast_inputs"]

_DOC_SEMANTICS = """
    Shapes (legend: b batch, h query heads, g key/value heads, i query positions, j key positions,
    d head dim of q and k, e value head dim):
        q (b, h, i, d), k (b, g, j, d), v (b, g, j, e), h % g == 0  ->  out (b, h, i, e), q's dtype

    Equivalent to (the `einsum` reference backend, with softmax in float32)::

        sim = einsum('b h i d, b h j d -> b h i j', q, k) * scale    # k, v shared by h // g heads
        sim = sim + bias                                              # bias: float, broadcast
        sim = sim.masked_fill(~mask | ~causal_keep, -inf)             # mask: bool, True = may attend
        attn = dropout(sim.softmax(dim=-1), dropout_p)                # a row with no key gives 0
        out = einsum('b h i j, b h j e -> b h i e', attn, v)

    Non-finite inputs (NaN, inf) in q, k or v make NaN exactly the output rows that see them: a row
    whose own query is non-finite, or that may attend a key whose k or v is non-finite. Nothing in a
    position a row may not attend reaches that row, on every backend (SDPA's kernels alone would spread
    it through their additive masks). Such rows pass no gradient, and non-finite entries get gradient 0.
    This costs one sum per input per call (`check_finite=False` skips it); under torch.compile,
    torch.export, torch.func.vmap and CUDA graph capture it is skipped too, and the kernel's own
    behaviour applies (docs/reliability.md).

    `mask` may be 2-D (b, j): a key padding mask. `causal=True` is aligned to the bottom-right, as in
    flash-attn and KV-cache decoding: query i may attend key j iff j <= i + (j_len - i_len)::

        i_len=2, j_len=5: q0 sees k0..k3, q1 sees k0..k4
        i_len=5, j_len=2: q0..q2 see nothing (output 0), q3 sees k0, q4 sees k0..k1
"""


# helpers


# torch >= 2.4 everywhere, but checked by capability: `torch.OutOfMemoryError` arrived after 2.4 (before,
# only `torch.cuda.OutOfMemoryError`), and `torch.amp.is_autocast_available` may be missing
_OOM_ERRORS: tuple[type[BaseException], ...] = tuple(
    err
    for err in (getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None), MemoryError)
    if isinstance(err, type)
)


def _autocast_on(device_type: str) -> bool:
    available = getattr(torch.amp, "is_autocast_available", lambda d: d in ("cpu", "cuda"))
    return available(device_type) and torch.is_autocast_enabled(device_type)


def autocast_inputs(*tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """Cast float tensors to the autocast dtype when autocast is on for the first tensor's device.

    Attention is a lower-precision op under autocast, as `F.scaled_dot_product_attention` is: every
    floating input except float64 is cast (PyTorch's rule for such ops), so q, k, v that arrive in
    different dtypes (a float32 q from a LayerNorm, bfloat16 k, v from a Linear) meet in one dtype.
    The softmax statistics stay in float32 inside every backend (contract item 4).
    """
    first = next((t for t in tensors if isinstance(t, Tensor)), None)
    if first is None:
        return tensors
    if not _autocast_on(first.device.type):
        return tensors
    dtype = torch.get_autocast_dtype(first.device.type)
    return tuple(
        t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64 else t
        for t in tensors
    )


def _failure(name: str, err: BaseException) -> str:
    first = (str(err).splitlines() or [""])[0]
    return f"backend {name!r} failed with {type(err).__name__}: {first}"


def _finite_sum(t: Tensor) -> Tensor:
    # float32, bfloat16, float64 sums accumulate in float32 or wider and have its range; a float16 sum
    # would overflow 65504 on ordinary activations, but its mean (accumulated in float32) cannot
    return t.mean() if t.dtype == torch.float16 else t.sum()


def _checkable(inp: AttnInputs) -> bool:
    """Can Python read values here? Not while tracing (torch.compile, torch.export), capturing a CUDA graph,
    or on meta tensors (vmap and fake tensors are found out when the read fails, `_all_finite`)."""
    if inp.device.type == "meta" or torch.compiler.is_compiling():
        return False
    return not (inp.device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def _all_finite(inp: AttnInputs, out: Tensor) -> bool:
    """False when q, k or v may hold a NaN or inf, or when the output of a call that has a mask or bias
    holds one (a garbage key that every row masks out can overflow to inf inside a kernel that adds its
    mask as -inf, SDPA's, and inf + -inf = NaN; so can a huge bias or visible logit, a false alarm).

    Cost: one sum per input (and of the output when there is a mask or bias) and one host sync, after the
    kernel ran (free on CPU). A false alarm (a sum of finite values that overflows) only costs the exact
    path. True (no check) where values cannot be read: vmap and fake tensors."""
    parts = [inp.q, inp.k, inp.v]
    if inp.mask is not None or inp.bias is not None:
        parts.append(out)
    with torch.no_grad():
        try:
            if inp.device.type == "cpu":  # a read per sum is free on CPU, and cheaper than stacking them
                return all(math.isfinite(_finite_sum(t).item()) for t in parts)
            return bool(torch.stack([_finite_sum(t).float() for t in parts]).sum().isfinite())  # one sync
        except RuntimeError:
            # vmap (over any input: q, k, v, the mask, the bias) and fake tensors: skipped, as under compile
            if any(_no_data_branch(t) for t in (*parts, inp.mask, inp.bias) if t is not None):
                return True
            raise


def _no_data_branch(t: Tensor) -> bool:
    """True for tensors whose values Python cannot read: functorch-wrapped (`torch.func.vmap`) or fake
    (`FakeTensorMode`, shape propagation). Checked by capability: both helpers exist on torch >= 2.0."""
    functorch = getattr(torch._C, "_functorch", None)
    if functorch is not None and functorch.is_functorch_wrapped_tensor(t):
        return True
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


def _finite_part(inp: AttnInputs) -> tuple[AttnInputs, Tensor, Tensor]:
    """The inputs with every non-finite entry of q, k, v set to 0 and the keys no query may attend
    (`masks.dead_keys`) zeroed in k and v, and which rows (bool (b, h, i)) and keys (bool (b, g, j), k or
    v) held a non-finite entry, so the output rows that see them can be set to NaN."""
    finite = [torch.isfinite(t) for t in (inp.q, inp.k, inp.v)]
    q_bad = ~finite[0].all(-1)
    kv_bad = ~(finite[1].all(-1) & finite[2].all(-1))
    q, k, v = (t.masked_fill(~ok, 0) for t, ok in zip((inp.q, inp.k, inp.v), finite))
    dead = dead_keys(inp)
    if dead is not None:
        # whatever sits there (garbage up to the dtype's max) can reach no output, but in a kernel that
        # adds its mask a huge logit would meet the mask's -inf; zeros reach nothing either
        k, v = k.masked_fill(dead[:, None, :, None], 0), v.masked_fill(dead[:, None, :, None], 0)
    return replace(inp, q=q, k=k, v=v), q_bad, kv_bad


def run_inputs(inp: AttnInputs, backend: str | None = None, *, fused_only: bool = False) -> Tensor:
    """Dispatch validated inputs and run them (used by `attention` and `Attend`)."""
    if inp.i == 0 or inp.j == 0:
        # empty queries: empty output. No keys: every row has nothing to attend, so 0 (contract item 2).
        # The zero terms keep the graph connected so gradients are zeros, not None.
        if backend is not None:
            select(inp, backend)  # a named backend still has to exist and accept the inputs
        # (nan_to_num: a NaN in q still has no key to reach, so the row stays 0)
        zero = ((inp.q.sum() + inp.k.sum() + inp.v.sum()) * 0).nan_to_num(0.0, 0.0, 0.0)
        return inp.q.new_zeros(inp.b, inp.h, inp.i, inp.e) + zero
    chosen = select(inp, backend, fused_only=fused_only)
    out = _run(inp, chosen, backend)
    if not inp.check_finite or not _checkable(inp) or _all_finite(inp, out):
        return out
    # rare: run the finite part (non-finite entries and keys no query may attend set to 0), then mark the
    # rows that see a NaN/inf: no kernel's masking can leak it
    clean, q_bad, kv_bad = _finite_part(inp)
    out = _run(clean, chosen, backend)
    return out.masked_fill(rows_that_see(inp, q_bad, kv_bad)[..., None], float("nan"))


def _run(inp: AttnInputs, chosen: Backend, backend: str | None) -> Tensor:
    # under autocast the inputs were cast by `autocast_inputs`; inside, the backend owns its precision
    # (float32 softmax statistics, float32 matmuls where it wants them), as `torch.amp.custom_fwd` does
    no_autocast = (
        torch.autocast(inp.device.type, enabled=False) if _autocast_on(inp.device.type) else contextlib.nullcontext()
    )
    try:
        with no_autocast:
            return chosen.run(inp)
    except (RuntimeError, MemoryError) as err:
        if backend is not None:  # a named backend runs or raises: never a silent fallback
            raise RuntimeError(f"backend {backend!r} failed: {type(err).__name__}: {err}") from err
        with no_autocast:
            return _retry(inp, chosen.name, err)


def _retry(inp: AttnInputs, failed_name: str, err: BaseException) -> Tensor:
    """Auto mode, after `failed_name` raised at run time (a kernel error, out of memory): run the next
    eligible backend in priority order (`chunked` first for out of memory), so a training step is not
    lost, and warn once naming the failure and the backend used. Backward failures cannot be retried.

    Any eligible backend may take over, fused or not: `Attend(flash=True)` already falls back to auto
    when no fused kernel can run, and a fault is no reason to lose the step instead."""
    failures = [_failure(failed_name, err)]
    text = str(err).lower()
    oom = isinstance(err, _OOM_ERRORS) or any(
        sign in text for sign in ("out of memory", "can't allocate memory")  # CUDA, CPU allocator
    )
    if oom:
        # the failed attempt's intermediates live on in its traceback's frames: free them before retrying
        traceback.clear_frames(err.__traceback__)
    failed = {failed_name}
    for candidate in fallbacks(inp, failed, oom=oom):
        try:
            out = candidate.run(inp)
        except (RuntimeError, MemoryError) as again:
            failed.add(candidate.name)
            failures.append(_failure(candidate.name, again))
            err = again
            continue
        warnings.warn(
            f"attend: {'; '.join(failures)}; retried on {candidate.name!r}", AttendFallbackWarning, stacklevel=5
        )
        return out
    if len(failures) == 1:
        raise err  # nothing else could run these inputs: the original error, untouched
    raise RuntimeError(f"attend: every eligible backend failed: {'; '.join(failures)}") from err


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
    deterministic: bool = False,
    check_finite: bool = True,
) -> Tensor:
    q, k, v, bias = autocast_inputs(q, k, v, bias)  # type: ignore[assignment]
    inp = validate(
        q,
        k,
        v,
        mask=mask,
        bias=bias,
        causal=causal,
        scale=scale,
        dropout_p=dropout_p,
        deterministic=deterministic,
        check_finite=check_finite,
    )
    return run_inputs(inp, backend)


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
        deterministic: only backends declared deterministic may run (bitwise-identical outputs and
            gradients run to run); also implied by `torch.use_deterministic_algorithms(True)`.
        check_finite: make NaN/inf in q, k, v reach exactly the output rows that see them (below).
            It costs one extra read of q, k, v per call (8-16 % on ~1 ms CPU calls, nothing measurable
            at 4096 tokens; a host sync on CUDA); False skips it where the inputs are known finite, and then
            each kernel's own NaN behaviour applies (docs/reliability.md).

    Faults: in auto mode, a backend that fails at run time (RuntimeError, including out of memory) is
    retried on the next eligible backend (`chunked` first for out of memory) with one
    `AttendFallbackWarning`; a named backend re-raises as RuntimeError("backend 'name' failed: ...").
"""
    + _DOC_SEMANTICS
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
    deterministic: bool = False,
) -> Report:
    q, k, v, bias = autocast_inputs(q, k, v, bias)  # type: ignore[assignment]
    inp = validate(
        q, k, v, mask=mask, bias=bias, causal=causal, scale=scale, dropout_p=dropout_p, deterministic=deterministic
    )
    return explain_inputs(inp, backend)


explain.__doc__ = (
    """Which backend `attention(...)` would run for these inputs, and why not each of the others.

    Takes the same arguments as `attention`; runs no kernel. Returns a `Report` with
    `report.backend` (str, or None when nothing can run), `report.reasons` (dict: backend name ->
    list of reasons it cannot run the inputs; empty when it can) and `str(report)`, a readable table.
"""
    + _DOC_SEMANTICS
    + """
    Raises:
        TypeError, ValueError: bad input ("expected X, got Y").

    Example::

        >>> print(explain(q, k, v, mask=pad, causal=True))
        >>> explain(q, k, v, dropout_p=0.1).reasons["sdpa:flash"]
        ['dropout_p=0.1 > 0; this backend has no dropout']
    """
)
