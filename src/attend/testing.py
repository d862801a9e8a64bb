"""Golden / baseline / candidate checks, public so users can test their own backends.

Shape legend: b batch, h query heads, g key/value heads, i query positions, j key positions,
d head dim (q and k), e value head dim.

* golden    = the `einsum` reference in float64
* baseline  = the `einsum` reference in the input dtype (the rounding budget the dtype earns)
* candidate = the backend under test, in the input dtype

A candidate passes if ``max|cand - golden| <= max(FLOOR[dtype] * max(1, max|golden|), FUDGE[dtype] *
max|baseline - golden|)``,
for the output and for each of dq, dk, dv (and dbias when the bias requires grad). Where no golden and
baseline are at hand (two paths that must agree, a known exact value), `tolerance(dtype)` turns the same
table into `torch.testing.assert_close` arguments.

The case grid (`Case`, `grid()`) and its input factory (`Case.inputs`) are the ones the test suite,
`attend check` and `attend bench` all use: awkward sizes on purpose.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import cast

import torch
from torch import Tensor

from ._helpers import fmt_dtype
from .dispatch import get_backend, list_backends
from .inputs import FLOAT_DTYPES, AttnInputs, validate
from .masks import lower_score
from .reference import einsum_attention

__all__ = [
    "backends_for",
    "FUDGE",
    "GRAD_FUDGE",
    "FLOOR",
    "TOLERANCE",
    "tolerance",
    "Check",
    "assert_matches_reference",
    "check_backend",
    "checkable",
    "Case",
    "case_flags",
    "SHAPES",
    "MASKS",
    "MASK_KINDS",
    "DTYPES",
    "grid",
    "SMOKE_GRID",
]

# How far a candidate may stray from the golden, relative to the baseline's own error.
FUDGE: dict[torch.dtype, float] = {
    torch.float64: 1.0,
    # fused kernels sum in another order and (CPU flash) use a fast exp: PyTorch's own SDPA tests allow
    # the same kind of headroom over a same-dtype math reference
    torch.float32: 10.0,
    # as flash-attn's own tests: twice the same-dtype reference's error
    torch.float16: 2.0,
    torch.bfloat16: 2.0,
}
# Per-backend overrides of FUDGE for the gradients (dq, dk, dv, dbias): (backend, device type, dtype) -> fudge.
GRAD_FUDGE: dict[tuple[str, str, torch.dtype], float] = {
    # none needed so far: where a kernel's gradients missed FUDGE (PyTorch's CPU flash backward in half
    # precision), the backend declares a reason instead, so auto never runs it there
}
# Floor, for cases where the baseline is (nearly) exact: about two ulps of the dtype, scaled by the golden's
# magnitude (max(1, max|golden|)), so a gradient of 4.1 in bfloat16 (ulp 0.03) is not held to 1.6e-2.
FLOOR: dict[torch.dtype, float] = {
    torch.float64: 1e-10,
    torch.float32: 2e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}
# Named bounds for the few comparisons the floor does not fit, each with its reason:
# (kind, dtype) -> (atol, rtol), read by `tolerance(dtype, kind)`.
TOLERANCE: dict[tuple[str, torch.dtype], tuple[float, float]] = {
    # torch.autograd.gradcheck's finite differences (eps=1e-6) in float64: their own error (about
    # eps**2 times the third derivative, plus ulp / eps: ~1e-10) sits far below; atol is 10x tighter than
    # gradcheck's default (1e-5), rtol is its default
    ("gradcheck", torch.float64): (1e-6, 1e-3),
    # one kernel run twice on the same values a row may attend, with other values where it may not (garbage
    # in masked keys): at most its sums run in another order, a few float32 ulps, relative; compared in
    # float32 whatever the input dtype, so half-precision outputs must be equal
    ("reordered", torch.float32): (0.0, 1e-6),
    # a torch.compile'd graph against eager: the same kernels, but AOTAutograd reorders and fuses the
    # surrounding ops (projections, reshapes), so sums run in another order; gradients, sums of sums, drift
    # further than outputs (measured up to ~3e-5 on the compile tests' shapes)
    ("compiled", torch.float32): (1e-5, 1e-5),
    ("compiled-grad", torch.float32): (1e-4, 1e-4),
    # the second-order hvp of two backends in float64: both exact formulas, summed in different orders
    ("second-order", torch.float64): (1e-12, 1e-10),
}



def backends_for(device_type: str) -> list[str]:
    """The registered backends that declare `device_type` ("cpu", "cuda") among their capabilities, in
    registration order: the (backend, device) pairs a test grid runs. A declared backend that cannot run a case
    is the case's to skip, with the backend's own reasons; one that never declared the device is not a case."""
    return [name for name in list_backends() if device_type in get_backend(name).caps]


def tolerance(dtype: torch.dtype, kind: str | None = None) -> dict[str, float]:
    """`atol` and `rtol` for `torch.testing.assert_close` (or `allclose`, `gradcheck`) where a golden and
    a baseline are not at hand: a result in `dtype` against the float64 reference or a known exact value,
    or two paths that must agree to the dtype's rounding (two backends, PyTorch's SDPA and ours, eager and
    compiled, one batch element alone and padded).

    Default: `atol = rtol = FLOOR[dtype] / 2`, so `atol + rtol * |expected| <= FLOOR[dtype] *
    max(1, |expected|)`: never more than the floor `assert_matches_reference` grants a candidate whose
    baseline is (nearly) exact. `kind` names an entry of `TOLERANCE` instead, for a comparison that needs
    its own bound (the table says why). Raises KeyError for a (kind, dtype) the table lacks.

        torch.testing.assert_close(out, ref, **tolerance(out.dtype))
    """
    if kind is None:
        return {"atol": FLOOR[dtype] / 2, "rtol": FLOOR[dtype] / 2}
    try:
        atol, rtol = TOLERANCE[(kind, dtype)]
    except KeyError:
        have = ", ".join(f"{k} {fmt_dtype(t)}" for k, t in TOLERANCE)
        raise KeyError(
            f"expected a (kind, dtype) in attend.testing.TOLERANCE ({have}), got {kind} {fmt_dtype(dtype)}"
        ) from None
    return {"atol": atol, "rtol": rtol}


@dataclass(frozen=True)
class Check:
    """One compared tensor: its name, the candidate's and the baseline's max error against the golden,
    the bound, and where the worst candidate element sits."""

    name: str
    error: float
    baseline_error: float
    bound: float
    worst_index: tuple[int, ...]
    worst_value: float
    golden_value: float

    @property
    def ok(self) -> bool:
        return self.error <= self.bound

    def __str__(self) -> str:
        verdict = "ok" if self.ok else "FAIL"
        return (
            f"{self.name}: {verdict} max|cand - golden| = {self.error:.3e} (bound {self.bound:.3e} = "
            f"max(floor * magnitude, fudge * baseline error {self.baseline_error:.3e})); worst at {self.worst_index}: "
            f"cand {self.worst_value:.6g} vs golden {self.golden_value:.6g}"
        )


def _compare(name: str, cand: Tensor, golden: Tensor, baseline: Tensor, dtype, fudge, floor) -> Check:
    fudge = fudge if fudge is not None else FUDGE[dtype]
    floor = floor if floor is not None else FLOOR[dtype]
    diff = (cand.double() - golden).abs()
    base = (baseline.double() - golden).abs()
    # NaN anywhere is the worst possible error
    diff = torch.where(torch.isnan(diff), torch.full_like(diff, float("inf")), diff)
    base_err = float(base.nan_to_num(nan=0.0).max()) if base.numel() else 0.0
    if diff.numel() == 0:
        return Check(name, 0.0, base_err, floor, (), 0.0, 0.0)
    flat = int(diff.argmax())
    idx = tuple(int(x) for x in torch.unravel_index(torch.tensor(flat), diff.shape))
    return Check(
        name=name,
        error=float(diff.max()),
        baseline_error=base_err,
        bound=max(floor * max(1.0, float(golden.abs().max())), fudge * base_err),
        worst_index=idx,
        worst_value=float(cand[idx]),
        golden_value=float(golden[idx]),
    )


def assert_matches_reference(
    cand: Tensor,
    golden: Tensor,
    baseline: Tensor,
    *,
    name: str = "out",
    fudge: float | None = None,
    floor: float | None = None,
) -> Check:
    """Raise AssertionError (with the worst element, its index, both errors and the bound) unless
    `cand` is as close to `golden` as the rule in this module's docstring allows."""
    check = _compare(name, cand, golden, baseline, cand.dtype, fudge, floor)
    if not check.ok:
        raise AssertionError(str(check))
    return check


def _clone_inputs(inp: AttnInputs, dtype: torch.dtype) -> tuple[AttnInputs, list[Tensor]]:
    leaves = []

    def leaf(t: Tensor | None, grad: bool) -> Tensor | None:
        if t is None:
            return None
        t = t.detach().to(dtype).requires_grad_(grad)
        if grad:
            leaves.append(t)
        return t

    bias_grad = inp.bias is not None and inp.bias.requires_grad
    q, k, v = (cast(Tensor, leaf(t, True)) for t in (inp.q, inp.k, inp.v))
    bias = leaf(inp.bias, bias_grad)
    # every other field (mask, causal, window, documents, score, ...) as validated once
    return replace(inp, q=q, k=k, v=v, bias=bias, dropout_p=0.0), leaves


def _lowered(run):
    """A backend's `run` behind the dispatcher's score lowering (`masks.lower_score`), as `attention` calls it."""

    def call(inp: AttnInputs) -> Tensor:
        low = lower_score(inp)
        out = run(low.inp)
        return out if low.e is None else out[..., : low.e]

    return call


def check_backend(
    backend: str,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: Tensor | None = None,
    bias: Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    grad: bool = True,
    fudge: float | None = None,
    floor: float | None = None,
    seed: int = 0,
    window: tuple[int | None, int | None] | None = None,
    documents: Tensor | tuple[Tensor, Tensor] | None = None,
    score: str = "dot",
) -> list[Check]:
    """Run backend `backend` on the inputs and compare its output (and dq, dk, dv, dbias when `grad`)
    with the float64 golden, within the budget the baseline earns. Returns the checks; raises
    AssertionError listing all of them when any fails, and ValueError when the backend cannot run them.

    Shapes: q (b, h, i, d), k (b, g, j, d), v (b, g, j, e); mask, bias, window, documents and score as in
    `attention`. The golden and the baseline are the `einsum` reference as written (an l2 score included);
    the candidate runs behind the dispatcher's lowering, as `attention` runs it.
    """
    inp = validate(
        q, k, v, mask=mask, bias=bias, causal=causal, scale=scale, window=window, documents=documents, score=score
    )
    dtype = inp.dtype
    impl = get_backend(backend)
    with torch.set_grad_enabled(grad):
        reasons = impl.reasons_unsupported(lower_score(_clone_inputs(inp, dtype)[0])[0])
    if reasons:
        raise ValueError(f"backend {backend!r} cannot run this case: {'; '.join(reasons)}")

    gen = torch.Generator(device="cpu").manual_seed(seed)
    results = {}
    for role, run_dtype, fn in (
        ("golden", torch.float64, einsum_attention),
        ("baseline", dtype, einsum_attention),
        ("candidate", dtype, _lowered(impl.run)),
    ):
        with torch.set_grad_enabled(grad):
            rinp, leaves = _clone_inputs(inp, run_dtype)
            out = cast(Tensor, fn(rinp))
            grads: list[Tensor | None] = []
            if grad:
                d_out = torch.randn(out.shape, generator=gen.manual_seed(seed + 1), dtype=torch.float64)
                grads = list(torch.autograd.grad(out, leaves, d_out.to(out.device, out.dtype), allow_unused=True))
        results[role] = [out.detach()] + [
            torch.zeros_like(leaf) if g is None else g for leaf, g in zip(leaves, grads)
        ]

    names = ["out", "dq", "dk", "dv", "dbias"][: len(results["golden"])]
    grad_fudge = fudge if fudge is not None else GRAD_FUDGE.get((backend, inp.device.type, dtype))
    checks = [
        _compare(n, c, gd, bl, dtype, fudge if n == "out" else grad_fudge, floor)
        for n, c, gd, bl in zip(names, results["candidate"], results["golden"], results["baseline"])
    ]
    if not all(c.ok for c in checks):
        head = f"{backend} on {fmt_dtype(dtype)} {inp.cli_hint()!r} does not match the float64 reference:"
        raise AssertionError("\n".join([head] + [f"  {c}" for c in checks]))
    return checks


def checkable(backend: str, q: Tensor, k: Tensor, v: Tensor, **kwargs) -> tuple[bool, list[str]]:
    """Whether `check_backend` can check `backend` on these inputs with gradients, and why not.

    Returns (True, []) when it runs forward and backward; (False, []) when it runs the forward only (the
    backend declares no backward for inputs it runs forward, as PyTorch's CPU flash kernel in half
    precision, and no bias requires grad): check with `grad=False` so inference stays covered; (False,
    reasons) when it cannot run them at all. `kwargs`: mask, bias, causal, scale as in `check_backend`.
    """
    impl = get_backend(backend)
    bias = kwargs.get("bias")
    with torch.enable_grad():
        leaves = (t.detach().requires_grad_(True) for t in (q, k, v))
        reasons = impl.reasons_unsupported(lower_score(validate(*leaves, **kwargs))[0])
    if not reasons:
        return True, []
    if bias is not None and bias.requires_grad:
        return False, reasons
    with torch.no_grad():
        if not impl.reasons_unsupported(lower_score(validate(q.detach(), k.detach(), v.detach(), **kwargs))[0]):
            return False, []
    return False, reasons


# the case grid: awkward sizes on purpose (tests, `attend check` and `attend bench` build inputs here)

# mask kinds of the grid: bias is a random (1, h, i, j) float bias; padding a (b, j) key padding mask;
# bool a random (b, 1, i, j) mask with a fully masked query row; bias-grad a bias that requires grad
MASKS = ("none", "padding", "bool", "bias", "bias+padding", "bias-grad")
# benchmarks also use key-bias: gigagan's L2-distance attention, a per-key (b, 1, 1, j) bias -|k|^2 / sqrt(d)
MASK_KINDS = MASKS + ("key-bias",)
SHAPES = [
    # b, h, g, i, j, d, e
    (2, 8, 2, 129, 257, 64, 64),  # GQA h/g = 4, i < j (KV cache), ragged lengths
    (2, 4, 4, 129, 64, 40, 40),  # i > j: causal leaves rows with no key; odd head dim
    (1, 4, 1, 1, 7, 72, 72),  # single query (decoding), MQA
    (2, 2, 2, 7, 1, 80, 80),  # single key
    (1, 4, 2, 64, 64, 64, 32),  # e != d
    (1, 2, 2, 129, 129, 16, 16),  # square, i == j: is_causal path
]
DTYPES = tuple(sorted(FLOAT_DTYPES, key=str))  # bfloat16, float16, float32, float64


# structure of the grid's structured cases: a window, packed documents (ids as a (q, k) pair), the l2 score
STRUCTURES = ("none", "window", "documents", "l2")


def case_flags(causal: bool, mask: str, structure: str = "none") -> str:
    """A case's flags as tables show them: `causal`, the mask kind, the structure, joined (`causal+padding`)
    or ''."""
    flags = (("causal", causal), (mask, mask != "none"), (structure, structure != "none"))
    return "+".join(f for f, on in flags if on)


@dataclass(frozen=True)
class Case:
    """One case: sizes (b, h, g, i, j, d, e), dtype, causality, a mask kind (`MASK_KINDS`), device, and
    `pad`: the fraction of its keys the last batch element loses to padding (the others proportionally
    less). `inputs()` builds its tensors, `id(backend)` names a test, `label()` a table row."""

    b: int
    h: int
    g: int
    i: int
    j: int
    d: int
    e: int
    dtype: torch.dtype = torch.float32
    causal: bool = False
    mask: str = "none"
    device: str = "cpu"
    pad: float = 0.5
    structure: str = "none"

    def __post_init__(self):
        if self.mask not in MASK_KINDS:
            raise ValueError(f"expected a mask kind among {', '.join(MASK_KINDS)}, got {self.mask!r}")
        if self.structure not in STRUCTURES:
            raise ValueError(f"expected a structure among {', '.join(STRUCTURES)}, got {self.structure!r}")

    @property
    def flags(self) -> str:
        return case_flags(self.causal, self.mask, self.structure)

    def options(self) -> dict:
        """The case's structure as `attention` keywords: window=(i // 8 + 1, 3); documents as a (q_docs, k_docs)
        pair of sorted ids (4 documents, the second batch element's in reverse order, so the split points
        differ); score="l2". Empty for structure "none"."""
        if self.structure == "window":
            return {"window": (self.i // 8 + 1, 3)}
        if self.structure == "l2":
            return {"score": "l2"}
        if self.structure == "documents":

            def ids(n: int) -> Tensor:
                cuts = [n * f // 10 for f in (0, 1, 5, 6, 10)]  # lengths 10 %, 40 %, 10 %, 40 % (some may be 0)
                one = torch.repeat_interleave(torch.arange(4), torch.tensor([b - a for a, b in zip(cuts, cuts[1:])]))
                rows = [one if r % 2 == 0 else (3 - one).flip(0) for r in range(self.b)]
                return torch.stack(rows).to(self.device)

            return {"documents": (ids(self.i), ids(self.j))}
        return {}

    def id(self, backend: str) -> str:
        """A readable test id: `sdpa:efficient-cpu-bf16-b2h8g2-i129j257-d64-causal`."""
        e = f"e{self.e}" if self.e != self.d else ""
        parts = [
            backend,
            self.device,
            fmt_dtype(self.dtype).replace("float", "f"),
            f"b{self.b}h{self.h}g{self.g}",
            f"i{self.i}j{self.j}",
            f"d{self.d}{e}",
        ]
        if self.causal:
            parts.append("causal")
        if self.mask != "none":
            parts.append(self.mask)
        if self.structure != "none":
            parts.append(self.structure)
        return "-".join(parts)

    def label(self) -> str:
        """Sizes and flags for a table row: `b2 h8 g2 i129 j257 d64 causal+padding`."""
        e = f" e={self.e}" if self.e != self.d else ""
        return f"b{self.b} h{self.h} g{self.g} i{self.i} j{self.j} d{self.d}{e} {self.flags}".rstrip()

    def inputs(self, seed: int = 0, *, grad: bool = False):
        """q (b, h, i, d), k (b, g, j, d), v (b, g, j, e) and the case's mask and bias, drawn on the CPU
        from `seed` (the same values on every device), in the case's dtype on its device. `grad`: q, k, v
        require grad; a `bias-grad` bias always does. Returns q, k, v, mask, bias."""
        b, h, g, i, j, d, e = self.b, self.h, self.g, self.i, self.j, self.d, self.e
        gen = torch.Generator().manual_seed(seed)
        q = torch.randn(b, h, i, d, generator=gen)
        k = torch.randn(b, g, j, d, generator=gen)
        v = torch.randn(b, g, j, e, generator=gen)
        mask = bias = None
        if "padding" in self.mask:
            # batch element n keeps max(1, j * (1 - pad * (n + 1) / b)) keys: the last loses `pad` of them
            lost = self.pad * torch.arange(1, b + 1, dtype=torch.float64) / b
            keep = (j * (1 - lost)).floor().clamp(min=1)
            mask = torch.arange(j, dtype=torch.float64) < keep[:, None]
        if self.mask == "bool":
            mask = torch.rand(b, 1, i, j, generator=gen) > 0.3
            mask[..., 0, :] = False  # a fully masked query row, on purpose
        if self.mask in ("bias", "bias+padding", "bias-grad"):
            bias = torch.randn(1, h, i, j, generator=gen)
        if self.mask == "key-bias":
            bias = -k.pow(2).sum(-1).mean(1)[:, None, None, :] * d**-0.5
        q, k, v = (t.to(self.device, self.dtype).requires_grad_(grad) for t in (q, k, v))
        mask = None if mask is None else mask.to(self.device)
        if bias is not None:
            bias = bias.to(self.device, self.dtype).requires_grad_(self.mask == "bias-grad")
        return q, k, v, mask, bias


# the shapes the structured cases use: i < j with GQA, i > j, square
STRUCTURED_SHAPES = [SHAPES[0], SHAPES[1], SHAPES[5]]


def grid(device: str = "cpu", dtypes=DTYPES) -> list[Case]:
    """Every shape x mask kind x causal x dtype of the grid, on `device`; then window, documents and l2 on
    three of the shapes x (no mask, key padding, bias) x causal x dtype."""
    plain = [
        Case(*shape, dtype=dtype, causal=causal, mask=mask, device=device)
        for shape in SHAPES
        for mask in MASKS
        for causal in (False, True)
        for dtype in dtypes
    ]
    structured = [
        Case(*shape, dtype=dtype, causal=causal, mask=mask, device=device, structure=structure)
        for shape in STRUCTURED_SHAPES
        for structure in STRUCTURES[1:]
        for mask in ("none", "padding", "bias")
        for causal in (False, True)
        for dtype in dtypes
    ]
    return plain + structured


# two tiny cases for a quick run (`attend check --grid smoke`, used by the CLI's tests)
SMOKE_GRID = [
    Case(1, 2, 1, 7, 9, 16, 16, mask="padding", causal=True),
    Case(1, 2, 2, 9, 7, 16, 16, mask="bool"),
]
