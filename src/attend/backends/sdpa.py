"""`sdpa:*`: one registered backend per PyTorch `SDPBackend` variant.

Shape legend: b batch, h query heads, g key/value heads, i query positions, j key positions,
d head dim (q and k), e value head dim.

Each backend runs `F.scaled_dot_product_attention` under `torch.nn.attention.sdpa_kernel([variant])`,
scoped to the call, so a pinned backend can never silently fall back to another kernel. On CPU,
PyTorch's FLASH_ATTENTION variant is its CPU flash kernel: that is `sdpa:flash` there.

Declared limits follow PyTorch's own checks (`sdp_utils.cpp`, `sdp_utils_cpp.cpp`; see
`shared/research/anchors-features.md` section (b)).

Lowering, cheapest first:
  * no mask, causal with i == j        -> `is_causal=True` (the kernel skips masked blocks)
  * no mask, causal with i != j        -> CUDA: `causal_lower_right` (no tensor at all); CPU: one shared
                                          bool (rows, cols) tile per query block
  * key padding / bool mask            -> the user's own broadcast view, bool (never expanded)
  * bias                               -> bias in q's dtype, -inf where the mask or causality forbids
  * causal combined with a mask or bias, or with i != j on CPU -> queries in blocks of `query_block`,
    each against only the keys it can see: causal costs about half, as with `is_causal`
  * grouped-query heads                -> `enable_gqa=True` where the kernel has it, else k/v expanded
"""

from __future__ import annotations

import functools
import inspect
import threading
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from .. import features, grad2
from .._helpers import accum_dtype, differentiable, functorch_wrapped, one_op_thread, run_split, split_threads
from ..grad2 import Gate, gate, recompute_grads, records_graph
from ..inputs import AttnInputs, default_scale
from ..masks import Structure, dead_rows, sdpa_attn_mask
from .base import ALL_FLOATS, NO_FLOAT64, Backend, Caps, Intermediate, dense_intermediate

__all__ = ["SdpaFlash", "SdpaEfficient", "SdpaCudnn", "SdpaMath"]

# Bound once at import: users who monkeypatch `F.scaled_dot_product_attention` with
# `attend.scaled_dot_product_attention` (a common way to swap attention in someone else's model) would
# otherwise send our own kernel call back into the dispatcher, forever.
_sdpa = F.scaled_dot_product_attention

HALF = frozenset({torch.float16, torch.bfloat16})
FLOATS = ALL_FLOATS

# helpers


def _isolated(fn: Callable[[], bool]) -> bool:
    """Run a probe in a fresh thread: grad mode, inference mode, autocast and `torch.jit.trace` are
    per-thread, so whatever context the caller is in (no_grad, tracing, autocast) cannot touch it, and
    torch.compile never traces into it. An exception inside the probe is re-raised here."""
    box: dict[str, Any] = {}

    def work() -> None:
        try:
            box["value"] = fn()
        except BaseException as err:  # handed to the caller's thread
            box["error"] = err

    thread = threading.Thread(target=work, name="attend-probe", daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return bool(box["value"])


def _probe_enable_gqa() -> bool:
    q = torch.zeros(1, 2, 1, 8)
    kv = torch.zeros(1, 1, 1, 8)
    try:
        gqa: dict[str, Any] = {"enable_gqa": True}  # (a dict: older torch's typing has no such keyword)
        _sdpa(q, kv, kv, **gqa)
    except (TypeError, RuntimeError):
        return False
    return True


def _probe_dead_rows(variant: SDPBackend, device: str) -> bool:
    dtype = torch.float32 if device == "cpu" else torch.float16
    q = torch.ones(1, 1, 2, 8, dtype=dtype, device=device, requires_grad=True)
    kv = torch.ones(1, 1, 2, 8, dtype=dtype, device=device)
    keep = torch.tensor([[False, False], [True, True]], device=device)
    try:
        with sdpa_kernel([variant]):
            out = _sdpa(q, kv, kv, attn_mask=keep)
            out.sum().backward()
    except RuntimeError:
        return False
    return bool((out[0, 0, 0] == 0).all()) and q.grad is not None and bool(torch.isfinite(q.grad).all())


def _probe_half(variant: SDPBackend) -> bool:
    """Does this CPU kernel give float16 inputs the float32 answer where float16 itself cannot hold the
    intermediates: a float32 bias beyond float16's range (7e4) or finer than it (100.3), and huge values
    (6e4: q.k overflows float16) in keys the mask or causal hides? torch 2.13's CPU kernels do; 2.4.1's
    give NaN or a rounded bias."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 3, 8, generator=gen) for _ in range(3))
    k[..., 2, :], v[..., 2, :] = 6e4, -6e4  # garbage in key 2, hidden from rows 0 and 1
    bias = torch.zeros(1, 1, 3, 3)
    bias[..., 2] = -torch.inf
    bias[..., 0, 1], bias[..., 1, :2] = 7e4, torch.tensor([100.0, 100.3])
    qh, kh, vh = q.half(), k.half(), v.half()
    hidden = torch.ones(3, 3, dtype=torch.bool).tril()
    qw, kw, vw = qh.double(), kh.double(), vh.double()
    want = [_sdpa(qw, kw, vw, attn_mask=bias.double()), _sdpa(qw, kw, vw, attn_mask=hidden)]
    try:
        with sdpa_kernel([variant]):
            got = [_sdpa(qh, kh, vh, attn_mask=bias), _sdpa(qh, kh, vh, is_causal=True)]
    except RuntimeError:
        return False
    return all(
        bool(torch.isfinite(g[..., :2, :]).all()) and bool(((g.double() - w)[..., :2, :].abs() < 1e-2).all())
        for g, w in zip(got, want)
    )


def _probe_mask_with_causal() -> bool:
    """Does this torch's SDPA run `attn_mask` with `is_causal=True` on its CPU flash kernel (the mask AND the
    upper-left triangle; torch 2.4-2.13), or refuse the two before it picks a kernel (torch 2.15)?"""
    q = torch.zeros(1, 1, 2, 8)
    try:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            _sdpa(q, q, q, attn_mask=torch.ones(2, 2, dtype=torch.bool), is_causal=True)
    except RuntimeError:
        return False
    return True


def _probe_lower_right_gqa() -> bool:
    from torch.nn.attention.bias import CausalBias

    return "enable_gqa" in inspect.signature(CausalBias._dispatch).parameters


# Capabilities of this torch, decided by trying them (not by version strings). The CPU answers are found at
# import, each probe in its own thread (`_isolated`); another device's at its first eager call, the same way.
# Nothing here runs inside the caller's context, and nothing needs torch._dynamo (import time).
_PROBED: dict[tuple, bool] = {}


def has_enable_gqa() -> bool:
    """Does this torch's SDPA take `enable_gqa` (torch >= 2.5)? Found by calling it at import."""
    return _PROBED[("enable_gqa",)]


def has_lower_right_gqa() -> bool:
    """Does torch's `CausalBias` (bottom-right causal on CUDA) take `enable_gqa`? Found at the first eager
    CUDA call (its module imports torch._dynamo, too slow for `import attend`); False until then."""
    key = ("lower_right_gqa",)
    found = _PROBED.get(key)
    if found is None:
        if torch.compiler.is_compiling():
            return False
        found = _PROBED[key] = _isolated(_probe_lower_right_gqa)
    return found


def zeroes_dead_rows(variant: SDPBackend, device: str) -> bool:
    """Does this kernel give 0 output and finite gradients for a row with no key to attend?

    PyTorch >= 2.5 does (pytorch#133882, `_safe_softmax`); older kernels give NaN. Found once per (variant,
    device) by running it (CPU: at import); where it fails, `SdpaBackend._call` un-masks such rows and zeroes
    them after. A device first met under torch.compile, before any eager call, takes that fix-up path, which is
    right either way, and is probed at its first eager call."""
    key = ("dead_rows", variant.name, device)  # plain strings: dynamo guards on this lookup
    found = _PROBED.get(key)
    if found is None:
        if torch.compiler.is_compiling():
            return False
        found = _PROBED[key] = _isolated(functools.partial(_probe_dead_rows, variant, device))
    return found


def clear_probes() -> None:
    """Forget the probed answers and find them again (tests; a changed environment)."""
    _PROBED.clear()
    _PROBED[("enable_gqa",)] = _isolated(_probe_enable_gqa)
    for variant in (SDPBackend.FLASH_ATTENTION, SDPBackend.MATH):
        zeroes_dead_rows(variant, "cpu")
    _PROBED[("mask_with_causal",)] = _isolated(_probe_mask_with_causal)


def takes_mask_with_causal() -> bool:
    """Does this torch's SDPA take `attn_mask` with `is_causal=True` at all (`_probe_mask_with_causal`)?"""
    return _PROBED[("mask_with_causal",)]


def exact_in_half(variant: SDPBackend) -> bool:
    """Does this CPU kernel keep float16/bfloat16 inputs exact to float32 statistics (`_probe_half`)? Found at the
    first half-precision CPU call (30-40 ms of first-use kernel set-up: not at import); while torch.compile traces
    before that, no (chunked runs it, exactly). A kernel with no CPU implementation is not probed: its caps keep it
    off the CPU."""
    if variant not in (SDPBackend.FLASH_ATTENTION, SDPBackend.MATH):
        return True
    key = ("half", variant.name)
    found = _PROBED.get(key)
    if found is None:
        if torch.compiler.is_compiling():
            return False
        found = _PROBED[key] = _isolated(functools.partial(_probe_half, variant))
    return found


clear_probes()

MASK_WITH_CAUSAL = features.register(
    "sdpa_mask_with_causal",
    api="F.scaled_dot_product_attention taking attn_mask with is_causal=True (its CPU flash kernel)",
    since="2.1, until 2.15 refused it",
    without="attend.scaled_dot_product_attention refuses attn_mask with is_causal=True, as this torch's own does",
    present=takes_mask_with_causal,
)
HALF_CPU = features.register(
    "sdpa_cpu_half_exact",
    api="CPU SDPA kernels that keep float16 attention in float32 (a float32 bias beyond float16, huge values "
    "behind a mask)",
    since="2.5",
    without="float16 and bfloat16 calls on CPU go to chunked (float32 statistics), not sdpa:flash or sdpa:math",
    present=lambda: all(exact_in_half(v) for v in (SDPBackend.FLASH_ATTENTION, SDPBackend.MATH)),
)

ENABLE_GQA = features.register(
    "sdpa_enable_gqa",
    api="the enable_gqa keyword of F.scaled_dot_product_attention",
    since="2.5",
    without="the SDPA backends get k and v expanded to the query heads (a copy per call); "
    "attend.scaled_dot_product_attention takes enable_gqa on every torch",
    present=lambda: has_enable_gqa(),
)
SAFE_SOFTMAX = features.register(
    "sdpa_zero_dead_rows",
    api="SDPA kernels that give 0 for a row with no key to attend (pytorch#133882)",
    since="2.5",
    without="such rows are un-masked for the kernel and zeroed after (one more masked_fill)",
    present=lambda: all(zeroes_dead_rows(v, "cpu") for v in (SDPBackend.FLASH_ATTENTION, SDPBackend.MATH)),
)
LOWER_RIGHT_GQA = features.register(
    "causal_lower_right_gqa",
    api="torch.nn.attention.bias.CausalBias with enable_gqa (CUDA bottom-right causal)",
    since="2.5",
    without="on CUDA, causal with i != j and grouped-query heads is ineligible for the fused SDPA kernels",
    present=lambda: has_lower_right_gqa(),
)


@functools.lru_cache(maxsize=None)
def _lower_right_bias(i: int, j: int):
    """CUDA only: a `CausalBias` object PyTorch lowers to the kernels' native bottom-right causal."""
    from torch.nn.attention.bias import causal_lower_right

    return causal_lower_right(i, j)


# The global SDPA kernel switches. PyTorch's public getters and setters (torch.backends.cuda.*_sdp_enabled,
# enable_*_sdp) are one-line wrappers of these torch._C functions; the functions themselves are used where
# they exist (found by name, so a torch without them falls back to the public wrappers).
def _switch(name: str, public_get: Callable[[], bool], public_set: Callable[[bool], None]):
    get = getattr(torch._C, f"_get_{name}_sdp_enabled", None)
    put = getattr(torch._C, f"_set_sdp_use_{name}", None)
    return (get, put) if get is not None and put is not None else (public_get, public_set)


_cuda = torch.backends.cuda
_SWITCHES = (
    (SDPBackend.FLASH_ATTENTION, *_switch("flash", _cuda.flash_sdp_enabled, _cuda.enable_flash_sdp)),
    (SDPBackend.EFFICIENT_ATTENTION, *_switch("mem_efficient", _cuda.mem_efficient_sdp_enabled,
                                              _cuda.enable_mem_efficient_sdp)),
    (SDPBackend.MATH, *_switch("math", _cuda.math_sdp_enabled, _cuda.enable_math_sdp)),
    (SDPBackend.CUDNN_ATTENTION, *_switch("cudnn", _cuda.cudnn_sdp_enabled, _cuda.enable_cudnn_sdp)),
)  # fmt: skip


_FLASH_ON, _EFFICIENT_ON, _MATH_ON, _CUDNN_ON = (enabled for _, enabled, _ in _SWITCHES)
_PUBLIC_GETTERS = (_cuda.flash_sdp_enabled, _cuda.mem_efficient_sdp_enabled, _cuda.math_sdp_enabled,
                   _cuda.cudnn_sdp_enabled)  # fmt: skip
SWITCH_GETTERS = features.register(
    "sdpa_switch_functions",
    api="torch._C._get_{flash,mem_efficient,math,cudnn}_sdp_enabled and _set_sdp_use_*",
    since="2.0",
    without="the SDPA kernel switches are read and set through torch.backends.cuda's public wrappers",
    present=lambda: all(getter is not public for (_, getter, _), public in zip(_SWITCHES, _PUBLIC_GETTERS)),
)
FUSED_CHOICE = features.register(
    "fused_sdp_choice",
    api="torch._fused_sdp_choice",
    since="2.0",
    without="every CPU call sets the SDPA kernel switches (a few us), where it could skip that when PyTorch "
    "would pick the same kernel by itself",
    present=lambda: getattr(torch, "_fused_sdp_choice", None) is not None,
)


def _switch_state() -> tuple[bool, bool, bool, bool]:
    """The global SDPA kernel switches, in `_SWITCHES` order (four C calls: this runs once per call)."""
    return _FLASH_ON(), _EFFICIENT_ON(), _MATH_ON(), _CUDNN_ON()


def _picks(inp: AttnInputs, kwargs: dict[str, Any]) -> SDPBackend | None:
    """The kernel PyTorch's own SDPA would run for these inputs under the current switches, or None where
    it cannot say (`torch._fused_sdp_choice` missing, or without the `enable_gqa` keyword)."""
    choice = getattr(torch, "_fused_sdp_choice", None)
    if choice is None:
        return None
    try:
        extra = {name: kwargs[name] for name in ("scale", "enable_gqa") if name in kwargs}
        index = choice(inp.q, inp.k, inp.v, None, inp.dropout_p, inp.causal, **extra)
    except (TypeError, RuntimeError):
        return None
    return next((variant for variant, _, _ in _SWITCHES if int(variant) == index), None)


# `_Only` holds this while the process-wide switches are changed: two threads toggling them at once would record
# each other's changes as the state to restore, and leave a kernel switched off for the rest of the process
_SWITCH_LOCK = threading.RLock()


class _Only:
    """`sdpa_kernel([variant])` for eager calls: only `variant` enabled inside, every switch restored after.
    (A class, not a generator-based context manager, and only the switches that differ are touched: the
    per-call cost falls from about 8.5 us to a few.) Like `sdpa_kernel`'s, the switches are process-wide: a
    thread inside holds `_SWITCH_LOCK`, so other threads' calls that change them wait (the fast path of
    `SdpaBackend.plan` changes none while PyTorch would pick the variant anyway, and does not wait)."""

    __slots__ = ("variant", "changed")

    def __init__(self, variant: SDPBackend):
        self.variant = variant
        self.changed: list[tuple[Callable[[bool], None], bool]] = []

    def __enter__(self) -> None:
        _SWITCH_LOCK.acquire()
        try:
            for variant, enabled, enable in _SWITCHES:
                want = variant == self.variant
                was = enabled()
                if was != want:
                    enable(want)
                    self.changed.append((enable, was))
        except BaseException:
            self.__exit__()
            raise

    def __exit__(self, *exc: object) -> None:
        try:
            for enable, was in reversed(self.changed):
                enable(was)
            self.changed.clear()
        finally:
            _SWITCH_LOCK.release()


def _plain_eager(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Not tracing (torch.compile, whose AOTAutograd has no double backward anyway), and none of q, k, v is a
    torch.func transform's wrapper (the transform runs the kernel's own derivative rules; an autograd.Function
    of ours would need `setup_context` there)."""
    if torch.compiler.is_compiling():  # first: dynamo cannot trace the functorch query
        return False
    return not functorch_wrapped(q, k, v)


def _joined(outs: list[Tensor], ways: int) -> Tensor:
    """The query blocks' outputs along i; single-threaded after a split loop (a busy CPU: `one_op_thread`)."""
    if len(outs) == 1:
        return outs[0]
    return one_op_thread(lambda: torch.cat(outs, dim=2)) if ways > 1 else torch.cat(outs, dim=2)


class _BlockGrads(torch.autograd.Function):
    """Query blocks of one call, each against its own keys, with a backward that writes each block's
    dq, dk, dv into preallocated full tensors (a slice-add per block) instead of letting autograd sum one
    full-size gradient per block. First-order only: `grad2.gate` handles create_graph above it."""

    @staticmethod
    def forward(ctx, block, blocks, q, k, v, deterministic):
        ctx.blocks = blocks
        work = q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] * q.shape[3]
        ctx.ways = split_threads(q, len(blocks), deterministic, work)  # the backward splits as the forward did
        graphs: list = [None] * len(blocks)
        outs: list = [None] * len(blocks)

        def one(n: int, rows: slice, cols: slice | None, masked: bool) -> None:
            qb = q[:, :, rows].detach().requires_grad_(q.requires_grad)
            kb = (k if cols is None else k[:, :, cols]).detach().requires_grad_(k.requires_grad)
            vb = (v if cols is None else v[:, :, cols]).detach().requires_grad_(v.requires_grad)
            out = block(rows, cols, masked, qb, kb, vb)
            graphs[n] = (out, qb, kb, vb)
            outs[n] = out.detach()

        with torch.enable_grad():  # each block on its own thread where the CPU has several (`run_split`)
            units = [(n, *b) for n, b in enumerate(blocks)]
            run_split(units, one, ctx.ways)
        ctx.graphs = graphs
        # what the backward's accumulators need, not q, k, v themselves (the node outlives the backward with the
        # caller's loss: holding them would keep the activations until the next step); they are saved (freed with
        # the graph) for grad2's hook, which reads them under create_graph
        ctx.save_for_backward(q, k, v)
        ctx.shapes = [(t.shape, t.dtype, t.device) if t.requires_grad else None for t in (q, k, v)]
        ctx.set_materialize_grads(True)
        return _joined(outs, ctx.ways)

    @staticmethod
    def backward(ctx, dout):
        if ctx.graphs is None:
            raise RuntimeError(
                "Trying to backward through the graph a second time (attend's query blocks freed theirs); hint: "
                "pass retain_graph=True to the first backward"
            )
        # the blocks' graphs live as long as this backward keeps the whole graph (retain_graph, and the recorded
        # pass of a create_graph backward: the gate then replaces these gradients, and a later backward runs here)
        keep = grad2.keep_graph is None or grad2.keep_graph()  # (read here: one binding, in grad2)

        def zeros() -> list:
            return [None if spec is None else torch.zeros(spec[0], dtype=spec[1], device=spec[2])
                    for spec in ctx.shapes]  # fmt: skip

        grads = one_op_thread(zeros) if ctx.ways > 1 else zeros()  # split on a busy CPU: serial steps too

        def one(graph: tuple, rows: slice, cols: slice | None, into: tuple) -> None:
            out, qb, kb, vb = graph
            wanted = [t for t in (qb, kb, vb) if t.requires_grad]
            if cols is None or not wanted or not out.requires_grad:
                return
            got = iter(torch.autograd.grad(out, wanted, dout[:, :, rows], retain_graph=keep, allow_unused=True))
            for n, (leaf, where) in enumerate(((qb, rows), (kb, cols), (vb, cols))):
                if leaf.requires_grad:
                    g = next(got)
                    if g is not None:
                        into[n][:, :, where] += g

        # each block's backward on its own thread where the CPU has several; dk, dv summed from per-thread copies
        units = [(graph, rows, cols) for graph, (rows, cols, _) in zip(ctx.graphs, ctx.blocks)]
        run_split(units, one, ctx.ways, tuple(grads))
        if not keep:
            ctx.graphs = None
        return None, None, *grads, None


def _expand_kv(t: Tensor, h: int) -> Tensor:
    """(b, g, j, x) -> (b, h, j, x), a copy: only for kernels with no native grouped-query path."""
    b, g, j, x = t.shape
    return t[:, :, None].expand(b, g, h // g, j, x).reshape(b, h, j, x)


# main class


class SdpaBackend(Backend):
    variant: SDPBackend
    fused = True
    query_block: int = 512  # queries per block when causal must be combined with a mask (see module doc)

    def caps_for(self, device: torch.device) -> Caps | None:
        caps = super().caps_for(device)
        if caps is not None and caps.native_gqa and not has_enable_gqa():
            caps = replace(caps, native_gqa=False)
        return caps

    def reasons_unsupported(self, inp: AttnInputs) -> list[str]:
        reasons = super().reasons_unsupported(inp)
        if inp.device.type == "cpu" and inp.dtype in HALF and not exact_in_half(self.variant):
            reasons.append(f"{inp.dtype} on CPU: {HALF_CPU.reason()}")
        return reasons

    def run(self, inp: AttnInputs) -> Tensor:
        caps = self.caps_for(inp.device)
        if caps is None:  # never eligible there; a direct call still gets the kernel's own error
            caps = Caps()
        out = self._kernel(inp, caps)
        if not caps.grad2 and inp.needs_grad and _plain_eager(inp.q, inp.k, inp.v):
            # a first-order kernel: its own backward for training, the reference's for create_graph
            return gate(out, inp, inp.q, inp.k, inp.v, inp.bias)
        return out

    def plan(self, inp: AttnInputs) -> Callable[[Tensor, Tensor, Tensor], Tensor] | None:
        """One SDPA call with this signature's arguments bound: what `run` does for an unmasked call (plain or
        aligned causal; native GQA), without deciding it again. On CPU the kernel switches are left alone
        while they are as they were here and PyTorch's own choice was this kernel (`torch._fused_sdp_choice`):
        toggling them costs about 1.5 us per call."""
        if inp.structured or inp.mask is not None or inp.bias is not None or torch.compiler.is_compiling():
            return None
        caps = self.caps_for(inp.device)
        if caps is None or (inp.causal and inp.i != inp.j) or (inp.gqa and not caps.native_gqa):
            return None
        # only what is not SDPA's default (each keyword costs about 0.4 us)
        kwargs: dict[str, Any] = {} if inp.scale == default_scale(inp.d) else {"scale": inp.scale}
        if inp.dropout_p:
            kwargs["dropout_p"] = inp.dropout_p
        if inp.causal:
            kwargs["is_causal"] = True
        if inp.gqa:
            kwargs["enable_gqa"] = True
        # a first-order kernel under training: grad2's gate (it holds no tensor: the plan, kept in the dispatch
        # cache, must not hold the first call's activations)
        gate_out = Gate(inp) if not caps.grad2 and inp.needs_grad else None
        variant = self.variant
        switches = _switch_state() if inp.device.type == "cpu" and _picks(inp, kwargs) == variant else None

        def fast(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            if switches is not None and _switch_state() == switches:
                out = _sdpa(q, k, v, **kwargs)
            else:
                with _Only(variant):
                    out = _sdpa(q, k, v, **kwargs)
            if gate_out is not None and not functorch_wrapped(q, k, v):  # (`call` keys no compiled call: eager)
                return gate_out(out, q, k, v)
            return out

        return fast

    def lowering(self, inp: AttnInputs) -> str | None:
        if not inp.structured:
            return None
        if torch.compiler.is_compiling():
            return "under torch.compile: one call with the structure as a mask"
        how = Structure(inp).describe(self.query_block)
        held = self.intermediate(inp)
        return how if held is None else f"{how}; holds {held.what}"

    def intermediate(self, inp: AttnInputs) -> Intermediate | None:
        """A kernel that holds its scores (`sdpa:math`): the (b, h, i, j) scores of its one call, or, where `run`
        goes in query blocks (`_query_blocks`), those of the largest block; in training, every block's, which
        autograd keeps for the backward. Measured (peak RSS above the inputs, child process, 2-vCPU AMD EPYC, torch
        2.13.0+cpu, 2026-12-07, causal, window (128, 0), float32): at (1, 8, 4096, 64) 36 MB forward and 147 MB
        fwd+bwd, where this says 10.0 MiB per block and 78.0 MiB for the 8 blocks (the rest: the output, its blocks
        before `cat`, the gradients); at (1, 8, 8192, 64) 45 MB and 284 MB against 10.0 MiB and 158.0 MiB. The
        (b, h, i, j) figure it gave before was 512 MiB and 2 GiB."""
        if not self.holds_scores(inp):
            return None
        blocks = self._query_blocks(inp)
        if blocks is None:
            return dense_intermediate(inp)
        if not blocks:  # no query sees a key: no kernel call at all
            return None
        itemsize = accum_dtype(inp.dtype).itemsize
        sizes = [inp.b * inp.h * rows * keys * itemsize for rows, keys in blocks]
        largest = max(sizes)
        rows, keys = blocks[sizes.index(largest)]
        kept = len(blocks) if inp.needs_grad else 0
        return Intermediate(
            sum(sizes) if kept else largest, (inp.b, inp.h, rows, keys), self.query_block, largest,
            max(k for _, k in blocks), kept,
        )  # fmt: skip

    def _query_blocks(self, inp: AttnInputs) -> list[tuple[int, int]] | None:
        """(rows, keys) of each kernel call `run(inp)` makes where it runs queries in blocks (`_structured`,
        `_causal_blocks`; a block that sees no key makes none), or None where it makes one call over all i and j.
        The same decisions as `_kernel`, read from the inputs' sizes and structure."""
        if torch.compiler.is_compiling():
            return None  # one call (a loop would specialise the graph on the length)
        step = self.query_block
        blocks = []
        if inp.structured:
            structure = Structure(inp)
            for start in range(0, inp.i, step):
                stop = min(start + step, inp.i)
                lo, hi = structure.rows(start, stop)[:2]
                if hi > lo:
                    blocks.append((stop - start, hi - lo))
            return blocks
        if not inp.causal or (inp.i == inp.j and inp.mask is None and inp.bias is None) or inp.i <= step:
            return None
        caps = self.caps_for(inp.device)
        if self._native_lower_right(inp, {"enable_gqa": True} if inp.gqa and caps and caps.native_gqa else {}):
            return None
        for start in range(0, inp.i, step):
            stop = min(start + step, inp.i)
            keys = max(0, min(inp.j, stop + inp.j - inp.i))
            if keys:
                blocks.append((stop - start, keys))
        return blocks

    def _kernel(self, inp: AttnInputs, caps: Caps) -> Tensor:
        q, k, v = inp.q, inp.k, inp.v
        kwargs: dict[str, Any] = {"scale": inp.scale, "dropout_p": inp.dropout_p}
        if inp.gqa:
            if caps.native_gqa:
                kwargs["enable_gqa"] = True
            else:
                k, v = _expand_kv(k, inp.h), _expand_kv(v, inp.h)
        bias_dtype = accum_dtype(inp.dtype) if caps.bias_dtype == "accum" else inp.dtype

        # dynamo knows `sdpa_kernel` (the pinned kernel is traced into the graph); eager calls take the
        # cheaper `_Only` (the same global switches, set and restored without contextlib)
        scope = sdpa_kernel([self.variant]) if torch.compiler.is_compiling() else _Only(self.variant)
        with scope:
            if inp.structured:
                return self._structured(inp, q, k, v, kwargs, bias_dtype)
            if not inp.causal or (inp.i == inp.j and inp.mask is None and inp.bias is None):
                return self._call(inp, q, k, v, kwargs, bias_dtype, rows=None, cols=None)
            if self._native_lower_right(inp, kwargs):
                return _sdpa(q, k, v, attn_mask=_lower_right_bias(inp.i, inp.j), **kwargs)
            if inp.i <= self.query_block or torch.compiler.is_compiling():
                # one block, every key: under torch.compile a loop over query blocks would specialise the
                # graph on the sequence length (a recompile per length); the compiled kernel pays the
                # masked upper triangle instead
                return self._call(inp, q, k, v, kwargs, bias_dtype, rows=None, cols=None, masked=True)
            # causal with a mask, or unaligned: each block of queries sees keys [0, last visible)
            return self._causal_blocks(inp, q, k, v, kwargs, bias_dtype, caps)

    def _causal_blocks(self, inp: AttnInputs, q, k, v, kwargs, bias_dtype, caps: Caps) -> Tensor:
        """Causal with a mask or bias, or unaligned: each block of `query_block` queries against the keys
        [0, last one it may see), a key prefix."""
        blocks = []  # (rows, the key prefix or None when no key is visible, masked)
        for start in range(0, inp.i, self.query_block):
            rows = slice(start, min(start + self.query_block, inp.i))
            cols = max(0, min(inp.j, rows.stop + inp.j - inp.i))
            blocks.append((rows, slice(0, cols) if cols else None, True))

        def block(rows: slice, cols: slice | None, masked: bool, qb: Tensor, kb: Tensor, vb: Tensor) -> Tensor:
            if cols is None:  # every query here comes before the first key: output 0 (gradient 0, connected)
                return qb.new_zeros(inp.b, inp.h, rows.stop - rows.start, inp.e) + 0 * qb[..., :1]
            return self._call(inp, qb, kb, vb, kwargs, bias_dtype, rows, cols.stop)

        return self._run_blocks(inp, q, k, v, caps, blocks, block)

    def _run_blocks(self, inp: AttnInputs, q, k, v, caps: Caps | None, blocks: list, block) -> Tensor:
        """The query blocks' outputs, concatenated. Training a first-order kernel (behind attend.grad2's gate for
        create_graph): one graph per block, its gradients added into dq, dk, dv in place (autograd's own slicing
        would add a zero-filled full-size dk, dv per block: quadratic in the number of blocks)."""
        if inp.needs_grad and not inp.bias_needs_grad and caps is not None and not caps.grad2 and _plain_eager(q, k, v):
            return _BlockGrads.apply(block, blocks, q, k, v, inp.deterministic)
        outs: list = [None] * len(blocks)

        def one(n: int, rows: slice, cols: slice | None, masked: bool) -> None:
            kv = (k[:, :, cols], v[:, :, cols]) if cols else (k, v)
            outs[n] = block(rows, cols, masked, q[:, :, rows], *kv)

        work = inp.b * inp.h * inp.i * inp.j * inp.d
        ways = split_threads(q, len(blocks), inp.deterministic, work)
        run_split([(n, *b) for n, b in enumerate(blocks)], one, ways)
        return _joined(outs, ways)

    def _structured(self, inp: AttnInputs, q, k, v, kwargs, bias_dtype) -> Tensor:
        """Window and documents: each block of queries against only the keys it can see ([lo, hi) of
        `Structure.rows`), masked only when the block is partly visible. Under torch.compile: one masked call
        (a per-block loop reads the document ids and would specialise the graph on the length)."""
        structure = Structure(inp)
        if torch.compiler.is_compiling():
            return self._call(inp, q, k, v, kwargs, bias_dtype, None, None, masked=True, structure=structure)
        blocks = []  # (rows, cols or None when no key is visible, masked)
        for start in range(0, inp.i, self.query_block):
            rows = slice(start, min(start + self.query_block, inp.i))
            lo, hi, full_lo, full_hi = structure.rows(rows.start, rows.stop)
            blocks.append((rows, slice(lo, hi) if hi > lo else None, not (full_lo <= lo and hi <= full_hi)))

        def block(rows: slice, cols: slice | None, masked: bool, qb: Tensor, kb: Tensor, vb: Tensor) -> Tensor:
            if cols is None:  # no query here sees any key: output 0 (and gradient 0, still connected to q)
                return qb.new_zeros(inp.b, inp.h, rows.stop - rows.start, inp.e) + 0 * qb[..., :1]
            return self._call(inp, qb, kb, vb, kwargs, bias_dtype, rows, cols, masked=masked, structure=structure)

        return self._run_blocks(inp, q, k, v, self.caps_for(inp.device), blocks, block)

    def _native_lower_right(self, inp: AttnInputs, kwargs: dict) -> bool:
        """CUDA flash and efficient kernels align causal to the bottom-right natively; PyTorch reaches them
        through `causal_lower_right` without building any mask."""
        return (
            inp.device.type == "cuda"
            and inp.mask is None
            and inp.bias is None
            and self.variant in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION)
            and ("enable_gqa" not in kwargs or has_lower_right_gqa())
        )

    def _call(
        self, inp: AttnInputs, q, k, v, kwargs, bias_dtype, rows, cols, masked: bool = False, structure=None
    ) -> Tensor:
        """One SDPA call. `rows`/`cols`: the query block and the keys it covers (None: all; an int: a key
        prefix; a slice: a key block). Causal goes in as `is_causal=True` only for the whole, unmasked,
        aligned square; otherwise (a block, `masked`) as a mask. With a `structure` (window, documents),
        `masked` says whether the block needs its structure mask (False: every row sees every key here)."""
        if structure is not None:
            plain = inp if masked else replace(inp, causal=False, window=None, q_docs=None, k_docs=None, q_pos=None)
            attn_mask = sdpa_attn_mask(plain, rows, cols, bias_dtype, structure if masked else None)
            is_causal = False
        elif not inp.causal or rows is not None or masked:
            attn_mask = sdpa_attn_mask(inp, rows, cols, bias_dtype)
            is_causal = False
        else:
            attn_mask, is_causal = None, True
        dead = None
        if attn_mask is not None and not zeroes_dead_rows(self.variant, inp.device.type):
            # old kernels give NaN for rows with no key: let those rows attend everything, zero them after
            if structure is not None:  # this block's own rows, from its own mask
                gone = ~attn_mask if attn_mask.dtype == torch.bool else attn_mask == float("-inf")
                dead = gone.all(-1, keepdim=True)
            else:
                dead = dead_rows(inp)
                if dead is not None and rows is not None and dead.shape[2] != 1:
                    dead = dead[:, :, rows]
            if dead is not None:
                attn_mask = attn_mask | dead if attn_mask.dtype == torch.bool else attn_mask.masked_fill(dead, 0.0)
        out = _sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kwargs)
        if dead is not None:
            out = out.masked_fill(dead, 0.0)
        return out


flash_lse_op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_TINY = 1e-30  # |dout|^2 below this: the lse's gradient goes in through a widened call (`_FlashLse.backward`)
flash_lse_bwd = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
FLASH_LSE = features.register(
    "cpu_flash_lse",
    api="aten._scaled_dot_product_flash_attention_for_cpu and its _backward (PyTorch's CPU flash op, with the lse)",
    since="2.3",
    without="return_lse and sinks on CPU run on chunked, not sdpa:flash; with_kvcache's decode kernel neither "
    "reads paged caches in place nor gives the lse (those calls take the dispatch path)",
    present=lambda: flash_lse_op is not None and flash_lse_bwd is not None,
)


class _FlashLse(torch.autograd.Function):
    """PyTorch's CPU flash op itself, which returns each row's log-sum-exp beside the output: (q, k, v, mask,
    causal, scale, inp) -> (out (b, h, i, e), lse (b, h, i) float32), both differentiable.

    A row whose mask is all -inf gets out 0 and lse 0 from the kernel (the caller makes that lse -inf); its
    gradients are 0, since p = exp(-inf - 0) = 0 in the backward. The op's backward has no input for the lse's
    gradient: it forms D = rowsum(dout * out) from the output it is given, and the lse's gradient enters exactly
    there (ds = p * (dp - (D - dlse))). The backward passes out - (dlse / |dout|^2) dout, which gives D - dlse
    and changes nothing else; where a row's dout is 0 (a loss on the lse alone), it runs on one more head-dim
    column instead: v' = [v, 0] leaves dp unchanged, out' = [out, 1] with dout' = [dout, -dlse] gives D - dlse,
    and q' = [q, 0], k' = [k, 0] keep the logits (the op needs d == e; about 20 % slower at d = 64). Under
    create_graph the gradients are the reference's (`grad2.recompute_grads`), differentiable again. In the
    setup_context form with a generated vmap rule, so torch.func transforms (jacrev of the lse) work."""

    generate_vmap_rule = True

    @staticmethod
    def forward(q, k, v, mask, causal, scale, inp):
        return flash_lse_op(q, k, v, 0.0, causal, attn_mask=mask, scale=scale)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, mask, causal, scale, inp = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, mask, out, lse)
        ctx.args = (causal, scale, inp)
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, mask, out, lse = ctx.saved_tensors
        causal, scale, inp = ctx.args
        if dout is None and dlse is None:
            return (None,) * 7
        if dout is None:
            dout = torch.zeros_like(out)
        if records_graph() and any(differentiable(t) for t in (q, k, v)):
            run = replace(inp, q=q, k=k, v=v, return_lse=True)
            dq, dk, dv, _ = recompute_grads(run, dout, (True, True, True, False), None, dlse)
            return dq, dk, dv, None, None, None, None
        if dlse is None:
            dq, dk, dv = flash_lse_bwd(dout.contiguous(), q, k, v, out, lse, 0.0, causal, attn_mask=mask, scale=scale)
            return dq, dk, dv, None, None, None, None

        # the op reads `out` only for D = rowsum(dout * out): out - (dlse / |dout|^2) dout gives D - dlse with
        # nothing else changed (a row's terms stay bounded by |dlse|: no cancellation). A row with dout = 0 and
        # dlse != 0 (a loss on the lse alone) has no such vector: then the widened call below
        norm2 = dout.square().sum(-1)
        usable = norm2 > _TINY
        # (under torch.func.vmap, jacrev of the lse, a value cannot decide a branch: the widened call then)
        if not functorch_wrapped(dout, dlse) and bool((usable | (dlse == 0)).all()):
            coef = torch.where(usable, dlse.to(norm2.dtype) / torch.where(usable, norm2, 1.0), 0.0)
            out2 = (out - coef[..., None] * dout).contiguous()
            dq, dk, dv = flash_lse_bwd(dout.contiguous(), q, k, v, out2, lse, 0.0, causal, attn_mask=mask, scale=scale)
            return dq, dk, dv, None, None, None, None

        def widen(t: Tensor, fill: float) -> Tensor:
            return torch.cat([t, t.new_full((*t.shape[:-1], 1), fill)], dim=-1)

        dout2 = torch.cat([dout, -dlse[..., None].to(dout.dtype)], dim=-1)
        dq, dk, dv = flash_lse_bwd(
            dout2, widen(q, 0.0), widen(k, 0.0), widen(v, 0.0), widen(out, 1.0), lse, 0.0, causal, attn_mask=mask,
            scale=scale,
        )  # fmt: skip
        return dq[..., :-1], dk[..., :-1], dv[..., :-1], None, None, None, None


class SdpaFlash(SdpaBackend):
    """`SDPBackend.FLASH_ATTENTION`: FlashAttention-2 on CUDA, PyTorch's flash kernel on CPU."""

    name = "sdpa:flash"
    variant = SDPBackend.FLASH_ATTENTION
    caps = {
        # sdp_utils_cpp.cpp: any float dtype, q/k/v one head dim, masks without grad, no dropout. The
        # log-sum-exp: PyTorch's CPU flash op returns it (`_FlashLse`)
        "cpu": Caps(dtypes=FLOATS, same_value_dim=True, bias_grad=False, dropout=False, grad2=False, lse=True),
        # sdp_utils.cpp: sm80+, fp16/bf16, d = e <= 256, no attn_mask; bottom-right causal via CausalBias
        "cuda": Caps(
            dtypes=HALF,
            max_head_dim=256,
            same_value_dim=True,
            min_capability=(8, 0),
            mask=False,
            window=False,
            documents=False,
            bias=False,
            deterministic=False,
            grad2=False,
        ),
    }

    def reasons_unsupported(self, inp: AttnInputs) -> list[str]:
        reasons = super().reasons_unsupported(inp)
        if inp.device.type == "cpu" and inp.needs_grad and inp.dtype in HALF:
            # PyTorch's CPU flash backward in float16/bfloat16 misses the contract's budget: the property runs
            # measured dq, dk up to 81x the same-dtype reference's error (26% relative; docs/reliability.md,
            # torch 2.13). Its forward is fine; training in half precision on CPU goes to math or chunked.
            reasons.append(f"backward in {inp.dtype} on CPU is inexact (PyTorch's CPU flash kernel)")
        if inp.device.type == "cuda" and inp.causal and inp.i != inp.j and inp.gqa and not has_lower_right_gqa():
            reasons.append(f"causal with i != j and grouped-query heads: {LOWER_RIGHT_GQA.reason()}")
        if inp.return_lse and inp.device.type == "cpu":
            if not FLASH_LSE.present():
                reasons.append(FLASH_LSE.reason())
            if inp.structured:
                reasons.append("return_lse with a window or documents: the lse path is one kernel call, no blocks")
            if torch.compiler.is_compiling():
                reasons.append("return_lse under torch.compile: the lse path (an autograd Function) is eager only")
        return reasons

    def run(self, inp: AttnInputs) -> Tensor | tuple[Tensor, Tensor]:  # type: ignore[override]
        if not inp.return_lse:
            return super().run(inp)
        # one call of PyTorch's CPU flash op: causal as its own flag where it is the usual triangle, else folded
        # into the additive mask with the mask and the bias (in float32: contract item 4)
        flag = inp.causal and inp.i == inp.j and inp.mask is None and inp.bias is None
        mask = None if flag else sdpa_attn_mask(inp, bias_dtype=accum_dtype(inp.dtype))
        if mask is not None and mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=accum_dtype(inp.dtype), device=mask.device).masked_fill_(
                ~mask, -torch.inf
            )
        dead = None if mask is None else dead_rows(inp)  # (b|1, h|1, i, 1): rows that may attend no key
        if mask is not None and dead is not None and not zeroes_dead_rows(self.variant, inp.device.type):
            # a kernel without safe softmax (torch < 2.5) gives such rows NaN: un-masked here, zeroed below
            mask = mask.masked_fill(dead, 0.0)
        k, v = inp.k, inp.v
        if inp.gqa and not has_enable_gqa():
            # the op takes fewer key/value heads where SDPA has enable_gqa (torch >= 2.5); on an older torch it
            # reads past k's heads (torch 2.4.1: wrong gradients, then an abort), so they are expanded first
            k, v = _expand_kv(k, inp.h), _expand_kv(v, inp.h)
        with torch.autocast(inp.device.type, enabled=False):
            out, lse = _FlashLse.apply(inp.q, k, v, mask, flag, inp.scale, inp)
        if dead is not None:
            out, lse = out.masked_fill(dead, 0.0), lse.masked_fill(dead[..., 0], -torch.inf)
        return out, lse


class SdpaEfficient(SdpaBackend):
    """`SDPBackend.EFFICIENT_ATTENTION`: the CUTLASS memory-efficient kernel (CUDA only)."""

    name = "sdpa:efficient"
    variant = SDPBackend.EFFICIENT_ATTENTION
    caps = {
        # sdp_utils.cpp: sm50+, bf16 needs sm80, d and e aligned (8 for half types, 4 for float32);
        # GQA only on recent torch main (pytorch#191085), so k/v are expanded
        "cuda": Caps(
            dtypes=NO_FLOAT64,
            min_capability=(5, 0),
            min_capability_for={torch.bfloat16: (8, 0)},
            head_dim_multiple={torch.float16: 8, torch.bfloat16: 8, torch.float32: 4},
            native_gqa=False,
            deterministic=False,
            grad2=False,
            bias_dtype="input",  # the CUTLASS kernel checks "invalid dtype for bias - should match query's dtype"
        ),
    }


class SdpaCudnn(SdpaBackend):
    """`SDPBackend.CUDNN_ATTENTION`: cuDNN's fused attention (CUDA only)."""

    name = "sdpa:cudnn"
    variant = SDPBackend.CUDNN_ATTENTION
    caps = {
        # sdp_utils.cpp: sm80+, fp16/bf16, d and e <= 128 and multiples of 8 (256 only on newest cuDNN:
        # not claimed), masks without grad, dropout in steps of 1/16, not deterministic
        "cuda": Caps(
            dtypes=HALF,
            max_head_dim=128,
            head_dim_multiple={torch.float16: 8, torch.bfloat16: 8},
            min_capability=(8, 0),
            bias_grad=False,
            dropout_step=1 / 16,
            deterministic=False,
            grad2=False,
            bias_dtype="input",  # not verified on a GPU yet: assumed like the CUTLASS kernel
        ),
    }

    def reasons_unsupported(self, inp: AttnInputs) -> list[str]:
        reasons = super().reasons_unsupported(inp)
        if inp.j == 1:
            reasons.append("key length j=1 (cuDNN needs j > 1)")
        return reasons


class SdpaMath(SdpaBackend):
    """`SDPBackend.MATH`: PyTorch's composite implementation; every feature, O(i * j) memory."""

    name = "sdpa:math"
    variant = SDPBackend.MATH
    fused = False
    caps = {
        "cpu": Caps(),
        "cuda": Caps(),
        "mps": Caps(dtypes=NO_FLOAT64),
    }

