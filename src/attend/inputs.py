"""`AttnInputs` and `validate()`: every user-facing input error of the library lives in this file.

Shape legend: b batch, h query heads, g key/value heads, i query positions, j key positions,
d head dim (q and k), e value head dim.

    q (b, h, i, d)   k (b, g, j, d)   v (b, g, j, e)   h % g == 0
    mask  bool, True = may attend, broadcastable to (b, h, i, j); a 2-D (b, j) mask is key padding
    bias  float, added to the scaled logits, broadcastable to (b, h, i, j)

Errors read "expected X, got Y", name every shape involved and carry a hint where there is one. They
are raised before any kernel runs, and never with `assert` (it vanishes under `python -O`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ._helpers import exists, fmt_dtype, fmt_shape

__all__ = [
    "AttnInputs",
    "Options",
    "validate",
    "FLOAT_DTYPES",
    "describe",
    "check_tensor",
    "check_float",
    "check_sinks",
    "broadcast_4d",
    "check_window",
    "pages_in_use",
    "sides",
    "check_options",
    "VOCABULARY",
    "Term",
    "default_scale",
]

FLOAT_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})

# helpers


def describe(t: Any) -> str:
    """How an error message names a value the caller gave: a tensor's dims, shape and dtype, else its type and
    repr (cut at 120 characters). Every door's messages use it."""
    if isinstance(t, Tensor):
        return f"a {t.dim()}-D tensor of shape {fmt_shape(t.shape)}, dtype {fmt_dtype(t.dtype)}"
    return f"{type(t).__name__} {t!r}"[:120]


def check_tensor(name: str, t: Any, want: str = "") -> Tensor:
    """`t` is a dense (strided) tensor; `name` is the caller's own argument name (`q`, `query`, `k_cache`) and
    `want` the shape it expects, for the message. Returns `t`."""
    if not isinstance(t, Tensor):
        shape = f" of shape {want}" if want else ""
        raise TypeError(f"expected `{name}` to be a torch.Tensor{shape}, got {describe(t)}")
    if t.is_sparse or t.layout != torch.strided:
        raise TypeError(
            f"expected `{name}` to be a dense (strided) tensor, got layout {t.layout}; "
            f"hint: call `{name}.to_dense()` first"
        )
    if t.is_nested:  # (an attribute every Tensor has; dynamo on torch 2.4 cannot trace getattr with a default)
        raise TypeError(
            f"expected `{name}` to be a dense tensor, got a nested tensor; "
            "hint: pad the sequences and pass a key padding mask `(b, j)` instead"
        )
    return t


def broadcast_4d(
    name: str, t: Tensor, target: tuple[int, int, int, int], what: str, axes: tuple[str, ...] = ("b", "h", "i", "j")
) -> Tensor:
    """View `t` as 4-D (right-aligned, like PyTorch broadcasting) and check it broadcasts to `target`, whose
    axes the message names `axes` (a KV cache's last one is `cap`). `what`: the hint that ends the message."""
    legend = f"({', '.join(axes)})"
    if t.dim() > 4:
        raise ValueError(
            f"expected `{name}` with at most 4 dims, broadcastable to {legend} = {fmt_shape(target)}, "
            f"got {t.dim()}-D shape {fmt_shape(t.shape)}"
        )
    t4 = t.reshape((1,) * (4 - t.dim()) + tuple(t.shape)) if t.dim() < 4 else t
    for size, want, letter in zip(t4.shape, target, axes):
        if size not in (1, want):
            raise ValueError(
                f"expected `{name}` broadcastable to {legend} = {fmt_shape(target)}, got shape "
                f"{fmt_shape(t.shape)} (dim `{letter}` is {size}, must be 1 or {want}); {what}"
            )
    return t4


# main classes


class Options(NamedTuple):
    """Every non-tensor option of a call, as the caller gave it (unchecked; `validate` checks it).

    `attention`, `explain`, `Attend` and the dispatcher pass this one record, and its hash is part of the
    per-call cache key. Its fields are the rows of `VOCABULARY`, in order (a test keeps them equal): a new option
    is a row there (its check, CLI flag, spelling and how `describe` shows it) plus this field, the `AttnInputs`
    field, the keyword in the public signatures (a test keeps `attention` and `explain` identical), its lowering
    and the backends' capability fields. A NamedTuple: built on every call, and about 2 us cheaper to build than
    a frozen dataclass."""

    causal: Any = False
    scale: Any = None
    dropout_p: Any = 0.0
    window: Any = None
    score: Any = "dot"
    deterministic: Any = False
    check_finite: Any = None
    return_lse: Any = False
    softcap: Any = None


@dataclass(frozen=True, eq=False)
class AttnInputs:
    """Everything a backend needs to decide and to run, already validated and normalised.

    Shapes: q (b, h, i, d); k (b, g, j, d); v (b, g, j, e); h % g == 0.
    `mask` (bool, True = may attend) and `bias` (float) are 4-D views broadcastable to (b, h, i, j),
    never expanded. `causal` is aligned to the bottom-right: query i may attend key j iff
    j <= i + (j_len - i_len). `scale` is resolved (default d ** -0.5).

    Build one with `validate(...)`; the constructor does not check anything.
    """

    q: Tensor
    k: Tensor
    v: Tensor
    mask: Tensor | None = None
    bias: Tensor | None = None
    causal: bool = False
    scale: float = 1.0
    dropout_p: float = 0.0
    deterministic: bool = False
    mask_kind: str = "none"  # "none" | "key_padding" | "bool"
    # NaN/inf (contract item 3). None (default): the guard on CPU (a call that masks anything checks its output,
    # so nothing a row may not see reaches it), nothing elsewhere (a CUDA check costs a host sync); True: the
    # exact check everywhere (q, k, v read; NaN exactly in the rows that see one); False: the kernel alone
    check_finite: bool | None = None
    # structure (masks.Structure lowers it per block; nothing builds a (b, h, i, j) tensor for it):
    # `window` (left, right), each an int >= 0 or None (unbounded), already merged with causal (right <= 0);
    # None when there is no window. `q_docs` (b|1, i) and `k_docs` (b|1, j): document ids, or None.
    # `q_pos` (b|1, i): each query's diagonal in key coordinates, where it is not i + (j - i_len) (varlen_attn
    # aligns causal per sequence); None: the default.
    window: tuple[int | None, int | None] | None = None
    q_docs: Tensor | None = None
    k_docs: Tensor | None = None
    q_pos: Tensor | None = None
    score: str = "dot"  # "dot" | "l2" (lowered to "dot" before any backend runs, `masks.lower_score`)
    # also return the log-sum-exp of each row's softmax normaliser, (b, h, i) in the accumulation dtype, -inf for a
    # row with no key; differentiable (`Caps.lse` says which backends give it)
    return_lse: bool = False
    # attention sinks (b|1, h): one logit per query head in every row's softmax denominator, with no value
    # (gpt-oss); lowered by the dispatcher to a rescale of the call's log-sum-exp (`masks.lower`)
    sinks: Tensor | None = None
    # logit soft-capping (Gemma 2): s = softcap * tanh(s / softcap) on the scaled logits, before bias and masks
    softcap: float | None = None

    @property
    def structured(self) -> bool:
        """A window, documents or per-sequence positions constrain attention (`masks.Structure`)."""
        return self.window is not None or self.q_docs is not None or self.q_pos is not None

    @property
    def finite_check(self) -> str | None:
        """The NaN/inf check this call runs (`check_finite` resolved): "exact" (q, k, v read: True), "guard"
        (the default on CPU for a call that masks anything: its output read), or None (False; an unmasked CPU
        call; any other device by default)."""
        if self.check_finite is not None:
            return "exact" if self.check_finite else None
        if self.device.type != "cpu":
            return None
        masks = self.mask is not None or self.bias is not None or self.causal or self.structured
        return "guard" if masks else None

    # derived, so backends never re-derive them differently

    @property
    def b(self) -> int:
        return self.q.shape[0]

    @property
    def h(self) -> int:
        return self.q.shape[1]

    @property
    def g(self) -> int:
        return self.k.shape[1]

    @property
    def i(self) -> int:
        return self.q.shape[2]

    @property
    def j(self) -> int:
        return self.k.shape[2]

    @property
    def d(self) -> int:
        return self.q.shape[3]

    @property
    def e(self) -> int:
        return self.v.shape[3]

    @property
    def device(self) -> torch.device:
        return self.q.device

    @property
    def dtype(self) -> torch.dtype:
        return self.q.dtype

    @property
    def gqa(self) -> bool:
        return self.h != self.g

    @property
    def needs_grad(self) -> bool:
        return torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (self.q, self.k, self.v, self.bias, self.sinks)
        )

    @property
    def bias_needs_grad(self) -> bool:
        return torch.is_grad_enabled() and self.bias is not None and self.bias.requires_grad

    def signature(self) -> tuple:
        """Everything a backend's eligibility may depend on; the dispatch cache key."""

        def desc(t: Tensor | None):
            return None if t is None else (tuple(t.shape), t.dtype, t.requires_grad)

        return (
            self.device.type,
            self.device.index,
            self.dtype,
            tuple(self.q.shape),
            tuple(self.k.shape),
            tuple(self.v.shape),
            tuple(t.stride(-1) == 1 for t in (self.q, self.k, self.v)),
            desc(self.mask),
            desc(self.bias),
            self.causal,
            self.window,
            desc(self.q_docs),
            desc(self.q_pos),
            self.score,
            self.dropout_p > 0,
            self.dropout_p,
            self.return_lse,
            desc(self.sinks),
            self.softcap,
            self.needs_grad,
            self.deterministic or torch.are_deterministic_algorithms_enabled(),
        )

    def describe(self) -> str:
        """Multi-line summary of the inputs, for error messages and `explain`: the tensors, then every option of
        `VOCABULARY` that is not at its default (the scale always)."""
        causal = "False"
        if self.causal:
            causal = "True (bottom-right aligned)" if self.i != self.j else "True"
        mask = "None" if self.mask is None else f"{self.mask_kind} {fmt_shape(self.mask.shape)}"
        bias = "None" if self.bias is None else f"{fmt_dtype(self.bias.dtype)} {fmt_shape(self.bias.shape)}"
        lines = [
            f"  q      : shape={fmt_shape(self.q.shape)} dtype={fmt_dtype(self.dtype)} device={self.device}",
            f"  k, v   : shape={fmt_shape(self.k.shape)}, {fmt_shape(self.v.shape)}",
            f"  causal : {causal}   mask: {mask}   bias: {bias}   grad: {self.needs_grad}",
        ]
        shown = [
            f"{term.name}: {term.show(getattr(self, term.name))}"
            for term in VOCABULARY
            if term.show is not None and (term.name == "scale" or getattr(self, term.name) != term.default)
        ]
        lines.append("  " + "   ".join(shown))
        if self.q_docs is not None and self.k_docs is not None:
            lines.append(f"  documents: q {fmt_shape(self.q_docs.shape)}, k {fmt_shape(self.k_docs.shape)}")
        if self.sinks is not None:
            lines.append(f"  sinks  : {fmt_dtype(self.sinks.dtype)} {fmt_shape(self.sinks.shape)}")
        return "\n".join(lines)

    def cli_hint(self, backend: str | None = None) -> str:
        """The `attend explain ...` command that reproduces these inputs (and the named `backend`, if any): the
        shapes, the mask kind, grad, documents, and every option `VOCABULARY` spells."""
        parts = [f"attend explain --shape {self.b},{self.h},{self.i},{self.d}"]
        if self.gqa:
            parts.append(f"--kv-heads {self.g}")
        if self.j != self.i:
            parts.append(f"--kv-len {self.j}")
        if self.e != self.d:
            parts.append(f"--v-dim {self.e}")
        parts.append(f"--dtype {fmt_dtype(self.dtype)} --device {self.device.type}")
        if self.mask is not None:
            parts.append(f"--mask {'padding' if self.mask_kind == 'key_padding' else 'bool'}")
        elif self.bias is not None:
            parts.append("--mask bias")
        if self.needs_grad:
            parts.append("--grad")
        for term in VOCABULARY:
            spelled = term.spell(getattr(self, term.name), self)
            if spelled is not None:
                # `--flag=value` for a negative value: argparse would read `--scale -1e-05` as a missing value
                parts.append(term.flag if spelled == "" else f"{term.flag}{'=' if spelled[0] == '-' else ' '}{spelled}")
        if self.q_docs is not None and self.q_docs is self.k_docs and self.q_docs.device.type == "cpu":
            ids = self.q_docs[0]
            starts = torch.nonzero(torch.cat([ids.new_ones(1, dtype=torch.bool), ids[1:] != ids[:-1]])).flatten()
            lengths = torch.diff(torch.cat([starts, starts.new_tensor([ids.numel()])])).tolist()
            parts.append("--documents " + ",".join(str(n) for n in lengths))
        if backend is not None:
            parts.append(f"--backend {backend}")
        return " ".join(parts)


def _shapes(q: Tensor, k: Tensor, v: Tensor) -> str:
    # formatted only when an error is raised: under torch.compile with dynamic shapes the sizes are
    # symbolic, and formatting them on every call cannot be traced
    return f"q {fmt_shape(q.shape)}, k {fmt_shape(k.shape)}, v {fmt_shape(v.shape)}"


def check_float(name: str, t: Tensor) -> None:
    """`t` has a floating dtype attention computes in (float16, bfloat16, float32, float64)."""
    if t.dtype not in FLOAT_DTYPES:
        if t.is_complex():
            kind = "complex"
        else:
            kind = "unsupported float" if t.is_floating_point() else "integer or bool"
        raise TypeError(
            f"expected `{name}` of a floating dtype (float16, bfloat16, float32, float64), "
            f"got {kind} dtype {fmt_dtype(t.dtype)}; hint: `{name}.float()`"
        )


def _check_qkv(
    q: Any, k: Any, v: Any, names: tuple[str, str, str] = ("q", "k", "v")
) -> tuple[int, int, int, int, int, int, int]:
    """q, k, v: dense float tensors of one dtype and device with shapes (b, h, i, d), (b, g, j, d),
    (b, g, j, e) and h % g == 0. Returns (b, h, i, d, g, j, e). `names`: the door's own names for them."""
    nq, nk, nv = names
    for name, t in zip(names, (q, k, v)):
        check_tensor(name, t)
    for name, t, want in zip(names, (q, k, v), ("(b, h, i, d)", "(b, g, j, d)", "(b, g, j, e)")):
        if t.dim() != 4:
            hint = ""
            if t.dim() == 3:
                hint = (
                    "; hint: for (b, n, h*d) activations split heads first: "
                    "`rearrange(t, 'b n (h d) -> b h n d', h=heads)`"
                )
            raise ValueError(f"expected `{name}` of shape {want}, got {describe(t)}{hint}")
    for name, t in zip(names, (q, k, v)):
        check_float(name, t)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(
            f"expected {nq}, {nk}, {nv} of one dtype, got {nq} {fmt_dtype(q.dtype)}, {nk} {fmt_dtype(k.dtype)}, "
            f"{nv} {fmt_dtype(v.dtype)}; hint: cast them to one dtype, or run under `torch.autocast`"
        )
    if not (q.device == k.device == v.device):
        raise ValueError(
            f"expected {nq}, {nk}, {nv} on one device, got {nq} on {q.device}, {nk} on {k.device}, {nv} on "
            f"{v.device}; hint: move them with `.to({nq}.device)`"
        )

    b, h, i, d = q.shape
    bk, g, j, dk = k.shape
    bv, gv, jv, e = v.shape
    if not (b == bk == bv):
        raise ValueError(f"expected one batch size `b` for q, k, v, got {b}, {bk}, {bv} ({_shapes(q, k, v)})")
    if g != gv:
        raise ValueError(
            f"expected k and v with the same number of heads `g`, got {g} and {gv} ({_shapes(q, k, v)})"
        )
    if j != jv:
        raise ValueError(f"expected k and v with the same length `j`, got {j} and {jv} ({_shapes(q, k, v)})")
    if dk != d:
        raise ValueError(f"expected q and k with the same head dim `d`, got {d} and {dk} ({_shapes(q, k, v)})")
    if g == 0 or h % g != 0:
        raise ValueError(
            f"expected query heads `h` to be a multiple of key/value heads `g` (h % g == 0), "
            f"got h={h}, g={g} ({_shapes(q, k, v)}); hint: grouped-query attention needs h = g * r"
        )
    if min(b, h, d, e) == 0:
        raise ValueError(f"expected non-zero b, h, d and e, got {_shapes(q, k, v)}")

    return b, h, i, d, g, j, e


def _check_mask(mask: Any, q: Tensor, k: Tensor, v: Tensor, target: tuple[int, int, int, int]):
    """mask: None, a bool (b, j) key padding mask, or bool broadcastable to (b, h, i, j). Returns the 4-D view
    and its kind ("none", "key_padding", "bool")."""
    b, h, i, j = target
    mask4, kind = None, "none"
    if exists(mask):
        check_tensor("mask", mask)
        if mask.dtype != torch.bool:
            hint = (
                "pass additive float masks as `bias=` instead"
                if mask.is_floating_point()
                else "convert it with `mask.bool()` (True = may attend)"
            )
            raise TypeError(
                f"expected `mask` of dtype bool (True = may attend), got {fmt_dtype(mask.dtype)}; hint: {hint}"
            )
        if mask.device != q.device:
            raise ValueError(f"expected `mask` on {q.device} like q, got {mask.device}")
        if mask.dim() == 2:
            if tuple(mask.shape) != (b, j):
                hint = "for an (i, j) mask pass `mask[None, None]`"
                if mask.shape[0] == b:  # one row per batch element: key padding, with the wrong number of keys
                    hint = (
                        f"it looks like a key padding mask of the wrong length: j = {j} keys, got {mask.shape[1]}; "
                        "give it one entry per key of k (True = may attend)"
                    )
                raise ValueError(
                    f"expected a 2-D `mask` to be a key padding mask (b, j) = {fmt_shape((b, j))}, got shape "
                    f"{fmt_shape(mask.shape)} ({_shapes(q, k, v)}); hint: {hint}"
                )
            mask4, kind = mask[:, None, None, :], "key_padding"
        else:
            mask4 = broadcast_4d("mask", mask, target, "hint: True = may attend, one entry per (b, h, i, j)")
            kind = "key_padding" if mask4.shape[1] == 1 and mask4.shape[2] == 1 else "bool"

    return mask4, kind


def check_sinks(sinks: Any, q: Tensor, b: int, h: int) -> Tensor | None:
    """sinks: None or a float tensor (h,) or (b, h) on q's device: one logit per query head (per batch element)
    in every row's softmax denominator, with no value. Returns the (b|1, h) view."""
    if sinks is None:
        return None
    check_tensor("sinks", sinks, "(h,) or (b, h)")
    if not sinks.is_floating_point():
        raise TypeError(f"expected `sinks` of a floating dtype (one logit per head), got {fmt_dtype(sinks.dtype)}")
    if sinks.device != q.device:
        raise ValueError(f"expected `sinks` on {q.device} like q, got {sinks.device}")
    if tuple(sinks.shape) not in ((h,), (b, h), (1, h)):
        raise ValueError(
            f"expected `sinks` of shape (h,) = ({h},) or (b, h) = {fmt_shape((b, h))}, one logit per query head, "
            f"got shape {fmt_shape(sinks.shape)}; hint: gpt-oss keeps one learned sink per head, `sinks=s_aux`"
        )
    return sinks.reshape(-1, h)


def _check_bias(bias: Any, q: Tensor, target: tuple[int, int, int, int]) -> Tensor | None:
    """bias: None or a float tensor on q's device broadcastable to (b, h, i, j). Returns the 4-D view."""
    bias4 = None
    if exists(bias):
        check_tensor("bias", bias)
        if not bias.is_floating_point():
            raise TypeError(
                f"expected `bias` of a floating dtype (added to the logits), got {fmt_dtype(bias.dtype)}; "
                "hint: boolean masks go in `mask=`"
            )
        if bias.device != q.device:
            raise ValueError(f"expected `bias` on {q.device} like q, got {bias.device}")
        bias4 = broadcast_4d("bias", bias, target, "hint: one additive logit per (b, h, i, j)")

    return bias4


def check_window(
    window: Any, causal: bool, extent: int | None = None
) -> tuple[int | None, int | None] | None:
    """window: None, or (left, right) with each an int >= 0 or None (unbounded). Merged with causal: right <= 0.

    `extent`: i + j of the call (queries plus keys, in the coordinates its positions use). Every door's query
    positions p and keys lie within that many of each other, so a side at or past it hides nothing and is
    unbounded (None): any Python int is valid, `sys.maxsize` and `10**20` included, and none reaches int64
    arithmetic to wrap. A window that hides nothing beyond causal is None (the plain path). Without `extent`
    (a constructor checking early, a rank that does not know the global length yet) the sides are only checked.
    A caller whose query positions lie outside [j - i, j) (`AttnInputs.q_pos` set after `validate`, as the ring
    does for a run of keys) saturates at its own global extent and sets the window after `validate`.
    """
    if window is None:
        return None
    if isinstance(window, Tensor) or not isinstance(window, (tuple, list)) or len(window) != 2:
        raise TypeError(
            f"expected `window` to be a pair (left, right) of ints >= 0 or None, got {describe(window)}; "
            "hint: window=(128, 0) lets each query see itself and the 128 keys before it"
        )
    for side, w in zip(("left", "right"), window):
        if w is not None and (isinstance(w, bool) or not isinstance(w, int) or w < 0):
            raise ValueError(
                f"expected `window` {side} to be an int >= 0 or None (unbounded), got {w!r} in window={tuple(window)}"
            )
    left, right = (None if w is None or (extent is not None and w >= extent) else int(w) for w in window)
    if causal:
        right = 0  # causal: no key after the diagonal
        if left is None:
            return None  # (None, 0) with causal is causal itself
    elif extent is not None and left is None and right is None:
        return None
    return left, right


def sides(window: tuple[int | None, int | None] | None, causal: bool) -> tuple[int | None, int | None]:
    """(left, right) a query sees around its diagonal, from a checked window and causal: (None, 0) for causal
    alone, (None, None) for neither. The one place that default is written."""
    return window if window is not None else (None, 0 if causal else None)


def pages_in_use(
    table: Tensor, lengths: list[int], page_size: int, pool: int, *, pool_name: str, row_name: str
) -> list[list[int]]:
    """A paged KV cache's block table checked against the keys each row uses: row x's key t lives in page
    table[x, t // page_size]; only the first ceil(lengths[x] / page_size) entries of a row are read, and they must
    name a page of the pool, [0, pool). One read of the table to the host. `pool_name` (num_blocks, total_pages)
    and `row_name` (row, sequence): the door's own words. Returns the pages each row uses, in order."""
    rows = table.tolist()
    used = []
    for x, n in enumerate(lengths):
        need = -(-n // page_size)
        if need > table.shape[1]:
            raise ValueError(
                f"expected at most max_pages * page_size = {table.shape[1] * page_size} keys per {row_name}, got "
                f"{n} for {row_name} {x}; hint: give the block table more columns"
            )
        ids = rows[x][:need]
        bad = [p for p in ids if not 0 <= p < pool]
        if bad:
            raise ValueError(
                f"expected the pages in use of `block_table` in [0, {pool_name}) = [0, {pool}), got "
                f"block_table[{x}, {ids.index(bad[0])}] = {bad[0]} ({row_name} {x} uses its first {need} "
                f"entries for {n} keys of page size {page_size})"
            )
        used.append(ids)
    return used


def default_scale(d: int) -> float:
    """The logit scale when none is given: d ** -0.5, computed as SDPA computes its own (1 / sqrt(d) in double;
    the power can differ by an ulp, at d = 32, 48, 128), so an unmasked call equals a direct SDPA call bit for
    bit."""
    return 1.0 / math.sqrt(d)


# the vocabulary: one row per option


def _check_causal(value: Any, ctx: dict[str, Any]) -> bool:
    # bool, or the ints 0 and 1 (a flag read from a config file); `causal=2` is a bug, not a flag
    if isinstance(value, Tensor) or not isinstance(value, (bool, int)) or value not in (0, 1):
        raise TypeError(f"expected `causal` to be a bool, got {describe(value)}")
    return bool(value)


def _check_scale(value: Any, ctx: dict[str, Any]) -> float:
    d = ctx["d"]
    if value is None:
        return default_scale(d)
    if isinstance(value, Tensor) or isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"expected `scale` to be a Python float, got {describe(value)}")
    if not math.isfinite(float(value)):
        raise ValueError(
            f"expected a finite `scale`, got {float(value)}; hint: leave it None for d ** -0.5 = {d**-0.5:.6g}"
        )
    return float(value)


def _check_dropout(value: Any, ctx: dict[str, Any]) -> float:
    if isinstance(value, Tensor) or isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"expected `dropout_p` to be a Python float in [0, 1), got {describe(value)}")
    if not (0.0 <= float(value) < 1.0):
        raise ValueError(f"expected `dropout_p` in [0, 1), got {value}")
    return float(value)


def _check_score(value: Any, ctx: dict[str, Any]) -> str:
    if value not in ("dot", "l2"):
        raise ValueError(f"expected `score` to be 'dot' (q . k) or 'l2' (-|q - k|^2, GigaGAN's), got {describe(value)}")
    return value


def _check_flag(name: str, none_ok: bool = False) -> Callable[[Any, dict[str, Any]], Any]:
    def check(value: Any, ctx: dict[str, Any]) -> Any:
        if not isinstance(value, bool) and not (none_ok and value is None):
            raise TypeError(f"expected `{name}` to be a bool{' or None' if none_ok else ''}, got {describe(value)}")
        return value

    return check


def _check_softcap(value: Any, ctx: dict[str, Any]) -> float | None:
    if value is None:
        return None
    if isinstance(value, Tensor) or isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"expected `softcap` to be a Python float > 0 or None, got {describe(value)}")
    if not (math.isfinite(float(value)) and value > 0):
        raise ValueError(f"expected `softcap` to be a finite float > 0 (Gemma 2 uses 50.0), got {value!r}")
    return float(value)


def _parse_window(text: str) -> tuple[int | None, int | None]:
    try:
        window = tuple(None if w.strip().lower() == "none" else int(w) for w in text.split(","))
    except ValueError:
        window = ()
    if len(window) != 2:
        raise ValueError(f"expected --window LEFT,RIGHT (ints, or 'none' for unbounded), got {text!r}")
    for side, w in zip(("left", "right"), window):
        if w is not None and w < 0:  # flash-attn's and varlen_attn's -1 = unbounded: 'none' on attend's command line
            fixed = ",".join("none" if s is None or s < 0 else str(s) for s in window)
            raise ValueError(
                f"expected `window` {side} to be an int >= 0 or 'none' (unbounded), got {w} in --window {text}; "
                f"hint: flash-attn's -1 (unbounded) is 'none' here: --window {fixed}"
            )
    return window[0], window[1]


def _parse_bool(text: str) -> bool:
    if text.lower() not in ("true", "false"):
        raise ValueError(f"expected true or false, got {text!r}")
    return text.lower() == "true"


class Term(NamedTuple):
    """One option of the vocabulary (a row of `VOCABULARY`): everything the library says about it in one place.

    `name`: the keyword of `attention`/`explain` and the field of `Options` and `AttnInputs`. `check(value, ctx)`
    raises "expected X, got Y" or returns the resolved value (`ctx`: the head dim `d`, the call's `extent` and the
    options resolved before this one). `flag`: its `attend explain` flag; `metavar` None makes it a switch;
    `parse` turns the flag's text into the value; `spell(value, inp)` gives the flag's text for a resolved value
    ("" for a switch), or None to leave the flag out (the value is the default). `show`: how `describe` prints
    it, or None where `describe` says it already (causal, with its alignment)."""

    name: str
    default: Any
    check: Callable[[Any, dict[str, Any]], Any]
    flag: str
    help: str
    metavar: str | None = None
    parse: Callable[[str], Any] = str
    spell: Callable[[Any, AttnInputs], str | None] = lambda value, inp: None
    show: Callable[[Any], str] | None = repr


VOCABULARY: tuple[Term, ...] = (
    Term(
        "causal", False, _check_causal, "--causal", "bottom-right aligned causal masking",
        spell=lambda v, inp: "" if v else None, show=None,
    ),
    Term(
        "scale", None, _check_scale, "--scale", "logit scale; default d ** -0.5", "S", float,
        spell=lambda v, inp: None if v == default_scale(inp.d) else repr(v), show=lambda v: f"{v:.6g}",
    ),
    Term(
        "dropout_p", 0.0, _check_dropout, "--dropout", "dropout probability", "P", float,
        spell=lambda v, inp: repr(v) if v > 0 else None,
    ),
    Term(
        "window", None, lambda v, ctx: check_window(v, ctx["causal"], ctx["extent"]), "--window",
        "sliding window, each side an int >= 0 or 'none' (unbounded)", "LEFT,RIGHT", _parse_window,
        spell=lambda v, inp: None if v is None else ",".join("none" if w is None else str(w) for w in v),
    ),
    Term(
        "score", "dot", _check_score, "--score", "dot (default) or l2 (GigaGAN)", "{dot,l2}", str,
        spell=lambda v, inp: None if v == "dot" else v,
    ),
    Term(
        "deterministic", False, _check_flag("deterministic"), "--deterministic", "ask for deterministic kernels",
        spell=lambda v, inp: "" if v else None,
    ),
    Term(
        "check_finite", None, _check_flag("check_finite", none_ok=True), "--check-finite",
        "the NaN/inf check: true (exact, every device) or false (off); default: the guard on CPU",
        "{true,false}", _parse_bool, spell=lambda v, inp: None if v is None else str(v).lower(),
    ),
    Term(
        "return_lse", False, _check_flag("return_lse"), "--return-lse",
        "also return the log-sum-exp of each row (b, h, i), differentiable",
        spell=lambda v, inp: "" if v else None,
    ),
    Term(
        "softcap", None, _check_softcap, "--softcap", "logit soft-capping: softcap * tanh(s / softcap)", "C", float,
        spell=lambda v, inp: None if v is None else repr(v),
    ),
)  # fmt: skip


def check_options(opts: Options, d: int, extent: int | None = None) -> Options:
    """Every option checked by its row of `VOCABULARY`, in order; returns them resolved (scale a float,
    d ** -0.5 by default; dropout_p a float; window merged with causal and saturated at `extent`, `check_window`).
    """
    ctx: dict[str, Any] = {"d": d, "extent": extent}
    for term, value in zip(VOCABULARY, opts):
        ctx[term.name] = term.check(value, ctx)
    return Options(*(ctx[term.name] for term in VOCABULARY))


def _doc_ids(name: str, t: Any, q: Tensor, b: int, n: int, letter: str) -> Tensor:
    check_tensor(name, t)
    if t.dtype.is_floating_point or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(
            f"expected `{name}` of an integer dtype (document ids), got {fmt_dtype(t.dtype)}; hint: `.long()`"
        )
    if t.device != q.device:
        raise ValueError(f"expected `{name}` on {q.device} like q, got {t.device}")
    if t.dim() != 2 or t.shape[0] not in (1, b) or t.shape[1] != n:
        raise ValueError(
            f"expected `{name}` of shape (b, {letter}) = {fmt_shape((b, n))} (or (1, {letter})), got shape "
            f"{fmt_shape(t.shape)}"
        )
    return t


def _check_documents(documents: Any, q: Tensor, b: int, i: int, j: int) -> tuple[Tensor | None, Tensor | None]:
    """documents: None, an integer (b, j) tensor of key document ids (also the queries' when i == j), or a pair
    (q_docs (b, i), k_docs (b, j)). Returns (q_docs, k_docs)."""
    if documents is None:
        return None, None
    if isinstance(documents, (tuple, list)):
        if len(documents) != 2:
            raise ValueError(
                f"expected `documents` as a pair (q_docs (b, i), k_docs (b, j)), got {len(documents)} items"
            )
        return (
            _doc_ids("documents[0] (q_docs)", documents[0], q, b, i, "i"),
            _doc_ids("documents[1] (k_docs)", documents[1], q, b, j, "j"),
        )
    if isinstance(documents, Tensor) and i != j:
        raise ValueError(
            f"expected a pair (q_docs (b, i), k_docs (b, j)) for `documents` when i != j, got one tensor of shape "
            f"{fmt_shape(documents.shape)} with i={i}, j={j}; hint: documents=(q_docs, k_docs)"
        )
    k_docs = _doc_ids("documents", documents, q, b, j, "j")
    return k_docs, k_docs


def validate(
    q: Any,
    k: Any,
    v: Any,
    *,
    mask: Any = None,
    bias: Any = None,
    documents: Any = None,
    sinks: Any = None,
    options: Options | None = None,
    names: tuple[str, str, str] = ("q", "k", "v"),
    **option_kwargs: Any,
) -> AttnInputs:
    """Check user inputs and return a normalised `AttnInputs`.

    Shapes: q (b, h, i, d); k (b, g, j, d); v (b, g, j, e); mask bool broadcastable to (b, h, i, j) or
    (b, j) key padding; bias float broadcastable to (b, h, i, j); documents int (b, j), or a pair
    ((b, i), (b, j)); sinks float (h,) or (b, h). The options come as one `Options` record or as its fields by
    keyword. `names`: how the
    messages name q, k, v (a door with its own argument names passes them: `query`, `key`, `value`).

    Raises:
        TypeError: a non-tensor, sparse or nested tensor, or a wrong dtype (integer, complex, float mask).
        ValueError: any shape, device or value mismatch, as "expected X, got Y" with every shape involved.
    """
    opts = Options(**option_kwargs) if options is None else options
    b, h, i, d, g, j, e = _check_qkv(q, k, v, names)
    mask4, kind = _check_mask(mask, q, k, v, (b, h, i, j))
    bias4 = _check_bias(bias, q, (b, h, i, j))
    q_docs, k_docs = _check_documents(documents, q, b, i, j)
    sinks2 = check_sinks(sinks, q, b, h)
    resolved = check_options(opts, d, i + j)
    # Views work everywhere: every fused kernel needs a unit stride on the last dim (PyTorch's
    # sdp_utils_cpp.h: "All fused kernels require the last dimension of the input to have stride 1"), so
    # a transposed view is copied here, once, instead of failing inside the kernel. Expanded (stride-0)
    # batch or head dims and other strides are kept as they are.
    # (`clone`, not `contiguous`: a size-1 last dim counts as contiguous whatever its stride.)
    q, k, v = (t if t.stride(-1) == 1 else t.clone(memory_format=torch.contiguous_format) for t in (q, k, v))

    return AttnInputs(
        q=q,
        k=k,
        v=v,
        mask=mask4,
        bias=bias4,
        causal=resolved.causal,
        scale=resolved.scale,
        dropout_p=resolved.dropout_p,
        deterministic=resolved.deterministic,
        mask_kind=kind,
        check_finite=resolved.check_finite,
        window=resolved.window,
        q_docs=q_docs,
        k_docs=k_docs,
        score=resolved.score,
        return_lse=resolved.return_lse,
        sinks=sinks2,
        softcap=resolved.softcap,
    )
