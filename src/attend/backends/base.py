"""`Backend`: a way to compute attention, with its capabilities declared as data.

Shape legend: b batch, h query heads, g key/value heads, i query positions, j key positions,
d head dim (q and k), e value head dim.

A backend declares, per device type, a `Caps` record. One generic `reasons_unsupported` reads it; a
backend extends it with `super()` for checks that cannot be data. The dispatcher, `explain`, the test
generator and the error messages all read the same declarations, so they cannot disagree.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor

from .._helpers import accum_dtype, cuda_capability, fmt_dtypes, fmt_shape
from ..inputs import FLOAT_DTYPES, AttnInputs

__all__ = ["Caps", "Backend", "Intermediate", "dense_intermediate", "fmt_bytes"]

ALL_FLOATS = FLOAT_DTYPES
# every float dtype but float64 (MPS has none; CUDA's memory-efficient kernel takes none)
NO_FLOAT64 = FLOAT_DTYPES - {torch.float64}


def fmt_bytes(n: int) -> str:
    """Bytes as GiB from 1 GiB up, else MiB, one decimal: what `explain` and the budget's reasons print."""
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


class Intermediate(NamedTuple):
    """The (i, j)-sized memory a backend's `run` holds for some inputs (`Backend.intermediate`): `nbytes`, the
    figure the dispatcher's memory budget compares, and `what`, those bytes in words ("a 8.0 GiB (b, h, i, j) =
    (1, 8, 16384, 16384) intermediate", or a query block's). The words are formatted only when read (under
    torch.compile a size formatted into a string would specialise the graph on it)."""

    nbytes: int
    shape: tuple  # (b, h, i, j); with query blocks, the largest block's (b, h, rows, keys)
    block_rows: int = 0  # 0: one call over (b, h, i, j); else the rows of each query block
    block_bytes: int = 0  # the largest block's scores
    max_keys: int = 0  # the most keys any block sees
    kept: int = 0  # training: the blocks autograd keeps for the backward (nbytes is then all of theirs)

    @property
    def what(self) -> str:
        if not self.block_rows:
            return f"a {fmt_bytes(self.nbytes)} (b, h, i, j) = {fmt_shape(self.shape)} intermediate"
        text = (
            f"query blocks of {self.block_rows} rows against at most {self.max_keys} keys each: up to "
            f"{fmt_bytes(self.block_bytes)} of (b, h, rows, keys) = {fmt_shape(self.shape)} scores per block"
        )
        if self.kept:
            text += f"; training keeps all {self.kept} for the backward: {fmt_bytes(self.nbytes)}"
        return text


def dense_intermediate(inp: AttnInputs) -> Intermediate:
    """The full (b, h, i, j) scores in the accumulation dtype: what a backend that computes every (i, j) logit at
    once holds."""
    return Intermediate(inp.b * inp.h * inp.i * inp.j * accum_dtype(inp.dtype).itemsize, (inp.b, inp.h, inp.i, inp.j))


@dataclass(frozen=True)
class Caps:
    """What a backend can run on one device type. Every field is read by `Backend.reasons_unsupported`."""

    dtypes: frozenset = ALL_FLOATS
    max_head_dim: int | None = None  # applies to d and e
    head_dim_multiple: dict = field(default_factory=dict)  # dtype -> d and e must be multiples of it
    same_value_dim: bool = False  # needs e == d
    min_capability: tuple[int, int] | None = None  # CUDA compute capability
    min_capability_for: dict = field(default_factory=dict)  # dtype -> capability (bf16 needs sm80)
    mask: bool = True  # bool masks and causal combined with other constraints
    # a sliding window (with per-sequence positions where a door sets them), and document ids (packed sequences,
    # varlen): each lowered per block of queries (`masks.Structure`), which a kernel that takes no mask cannot apply
    window: bool = True
    documents: bool = True
    bias: bool = True
    bias_grad: bool = True  # gradient with respect to `bias`
    causal: bool = True
    dropout: bool = True
    dropout_step: float | None = None  # dropout_p must be a multiple of this
    grad: bool = True
    # the dtype its kernel takes an additive bias in: "accum" (float32, float64 for float64 inputs: the
    # softmax's precision, contract item 4) or "input" (q's dtype only; the bias is then saturated to that
    # dtype's finite range, `masks.bias_as`)
    bias_dtype: str = "accum"
    # its own backward is differentiable again (create_graph=True). False: a first-order kernel (PyTorch's
    # fused ones), which `attend.grad2` makes twice differentiable by recomputing through the reference
    grad2: bool = True
    native_gqa: bool = True  # False: k/v are expanded to h heads (a copy)
    deterministic: bool = True
    # Holds its scores in memory as plain tensors: the (b, h, i, j) scores, or those of each piece it runs in
    # (sdpa:math's query blocks; the dispatcher's memory budget reads it through `Backend.intermediate`). None =
    # not declared: non-fused backends do (einsum, sdpa:math), fused kernels do not; a memory-bounded non-fused
    # backend (chunked) declares False.
    dense_scores: bool | None = None
    # gives the log-sum-exp of each row (`return_lse=True`), differentiable, second order included. Opt-in: a
    # backend claims it (einsum, chunked); PyTorch's SDPA returns none
    lse: bool = False
    # caps the logits inside its tiles (`softcap`: s = c * tanh(s / c) before bias and masks). Opt-in; a kernel
    # that cannot would have to densify (b, h, i, j) scores, so it is ineligible instead
    softcap: bool = False
    # computes score="l2" itself. Needed only with softcap: otherwise the dispatcher lowers l2 to a dot product
    # every backend runs (`masks.lower_score`), whose per-row shift of the logits capping would not allow
    l2: bool = False


class Backend:
    """A way to compute attention. Subclasses set `name` and `caps` and implement `run`.

    `run(inp)` takes validated `AttnInputs` and returns `(b, h, i, e)` in the dtype of q; with `inp.return_lse`
    (only where its `Caps.lse` says so) the pair `(out, lse)`, lse `(b, h, i)` in the accumulation dtype, -inf
    for a row with no key, differentiable.
    """

    name: str = ""  # a class default; an instance may carry its own (a tuned copy registered anew)
    caps: ClassVar[dict[str, Caps]] = {}
    fused: ClassVar[bool] = False  # counts as "flash" for Attend(flash=True)

    def unavailable_reason(self) -> str | None:
        """Environment check independent of the inputs (missing dependency, torch too old). None = available."""
        return None

    def caps_for(self, device: torch.device) -> Caps | None:
        return self.caps.get(device.type)

    def reasons_unsupported(self, inp: AttnInputs) -> list[str]:
        """Every reason this backend cannot run `inp`; an empty list means it can.

        One short line each, naming the actual value and the limit: `head_dim=320 > 256`.
        """
        why = self.unavailable_reason()
        if why is not None:
            return [why]
        caps = self.caps_for(inp.device)
        if caps is None:
            return [f"device={inp.device.type} (supported: {', '.join(sorted(self.caps))})"]
        reasons = []
        if inp.dtype not in caps.dtypes:
            reasons.append(f"dtype={inp.dtype} (supported: {fmt_dtypes(caps.dtypes)})")
        if caps.same_value_dim and inp.e != inp.d:
            reasons.append(f"value head dim e={inp.e} != d={inp.d} (needs e == d)")
        if caps.max_head_dim is not None:
            for letter, size in (("d", inp.d), ("e", inp.e)):
                if size > caps.max_head_dim:
                    reasons.append(f"head_dim {letter}={size} > {caps.max_head_dim}")
        multiple = caps.head_dim_multiple.get(inp.dtype)
        if multiple:
            for letter, size in (("d", inp.d), ("e", inp.e)):
                if size % multiple:
                    reasons.append(f"head_dim {letter}={size} is not a multiple of {multiple} for {inp.dtype}")
        if inp.device.type == "cuda":
            cap = cuda_capability(inp.device.index if inp.device.index is not None else torch.cuda.current_device())
            need = max([c for c in (caps.min_capability, caps.min_capability_for.get(inp.dtype)) if c], default=None)
            if need is not None and cap < need:
                reasons.append(f"compute capability sm{cap[0]}{cap[1]} < sm{need[0]}{need[1]}")
        if inp.mask is not None and not caps.mask:
            reasons.append(f"mask given ({inp.mask_kind}); this backend takes no mask")
        if inp.window is not None and not caps.window:
            reasons.append(f"window={inp.window} given; this backend takes no window")
        elif inp.q_pos is not None and not caps.window:
            reasons.append(
                "per-row query positions given (a KV cache's ragged rows, varlen's sequences); this backend takes no "
                "window or causal offset per row"
            )
        if inp.q_docs is not None and not caps.documents:
            reasons.append("documents given; this backend takes no documents")
        if inp.bias is not None and not caps.bias:
            reasons.append("bias given; this backend takes no bias")
        if inp.bias_needs_grad and not caps.bias_grad:
            reasons.append("bias requires grad; this backend gives no gradient for bias")
        if (
            inp.bias_needs_grad
            and caps.bias_dtype == "input"
            and inp.dtype in (torch.float16, torch.bfloat16)
            and inp.bias is not None
            and tuple(inp.bias.shape) != (inp.b, inp.h, inp.i, inp.j)
        ):
            # the kernel takes the bias in q's dtype, so autograd sums the gradient of a broadcast bias over
            # many positions in half precision (measured on sdpa:math when it did: off by 2e-2 where the true
            # value is 0; docs/reliability.md)
            reasons.append(f"gradient of a broadcast bias would be summed in {inp.dtype} (inexact)")
        if inp.causal and not caps.causal:
            reasons.append("causal=True not supported")
        if inp.dropout_p > 0 and not caps.dropout:
            reasons.append(f"dropout_p={inp.dropout_p} > 0; this backend has no dropout")
        if inp.dropout_p > 0 and caps.dropout_step:
            steps = inp.dropout_p / caps.dropout_step
            if abs(steps - round(steps)) > 1e-9:
                reasons.append(f"dropout_p={inp.dropout_p} is not a multiple of {caps.dropout_step}")
        if inp.return_lse and not caps.lse:
            reasons.append("needs each row's log-sum-exp (return_lse=True, or sinks); this backend gives none")
        if inp.score == "l2" and inp.softcap is not None and not caps.l2:
            reasons.append(
                "score='l2' with softcap: the l2 score must be computed in the kernel (its dot-product lowering "
                "shifts each row's logits, which the cap does not allow); this backend computes q.k only"
            )
        if inp.softcap is not None and not caps.softcap:
            reasons.append(f"softcap={inp.softcap} given; this backend cannot cap logits inside its kernel")
        if inp.needs_grad and not caps.grad:
            reasons.append("inputs require grad; this backend has no backward")
        if not caps.deterministic and (inp.deterministic or torch.are_deterministic_algorithms_enabled()):
            reasons.append("not deterministic, and determinism was requested")
        return reasons

    def holds_scores(self, inp: AttnInputs) -> bool:
        """Does `run(inp)` compute its scores as plain tensors (not inside a fused kernel or a bounded tile loop)?
        As the backend declares `Caps.dense_scores`; undeclared: True for a non-fused backend."""
        caps = self.caps_for(inp.device)
        if caps is None:
            return False
        return caps.dense_scores if caps.dense_scores is not None else not self.fused

    def intermediate(self, inp: AttnInputs) -> Intermediate | None:
        """The largest (i, j)-sized intermediate `run(inp)` holds, in bytes and in words, or None (none: a fused
        kernel, a memory-bounded tile loop). Here: the (b, h, i, j) scores in the accumulation dtype when the
        backend holds scores (`holds_scores`); a backend that runs in pieces (`sdpa:math`'s query blocks) says
        its pieces' instead. A dense mask or bias the user passed is theirs already and is not counted."""
        return dense_intermediate(inp) if self.holds_scores(inp) else None

    def intermediate_bytes(self, inp: AttnInputs) -> int:
        """Bytes of the largest (i, j)-sized intermediate `run(inp)` holds (`intermediate`), 0 for none: what the
        dispatcher's memory budget compares."""
        found = self.intermediate(inp)
        return 0 if found is None else found.nbytes

    def lowering(self, inp: AttnInputs) -> str | None:
        """How `run` handles a window or documents (what `explain` prints), or None: nothing to say."""
        return None

    def plan(self, inp: AttnInputs) -> Callable[[Tensor, Tensor, Tensor], Tensor] | None:
        """A runner for every later call of this signature (`dispatch.call`'s fast path), or None (the default:
        each call goes through `run`). Asked only for calls with no mask, bias, structure or NaN/inf check
        (`inp.finite_check` None) whose score is "dot"; `plan(inp)(q, k, v)` must equal `run` on the same
        inputs with q, k, v of `inp`'s shapes, dtypes, devices and grad state, deciding nothing per call
        that `run` would decide the same way every time."""
        return None

    def supports(self, inp: AttnInputs) -> bool:
        return not self.reasons_unsupported(inp)

    def run(self, inp: AttnInputs) -> Tensor | tuple[Tensor, Tensor]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<attend backend {self.name!r}>"
