"""Golden / baseline / candidate checks, public so users can test their own backends.

Shape legend: b batch, h query heads, g key/value heads, i query positions, j key positions,
d head dim (q and k), e value head dim.

* golden    = the `einsum` reference in float64
* baseline  = the `einsum` reference in the input dtype (the rounding budget the dtype earns)
* candidate = the backend under test, in the input dtype

A candidate passes if ``max|cand - golden| <= max(FLOOR[dtype] * max(1, max|golden|), FUDGE[dtype] *
max|baseline - golden|)``,
for the output and for each of dq, dk, dv (and dbias when the bias requires grad).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ._helpers import fmt_dtype
from .backends.einsum import einsum_attention
from .dispatch import get_backend
from .inputs import AttnInputs, validate

__all__ = ["FUDGE", "GRAD_FUDGE", "FLOOR", "Check", "assert_matches_reference", "check_backend"]

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
    q, k, v = (leaf(t, True) for t in (inp.q, inp.k, inp.v))
    bias = leaf(inp.bias, bias_grad)
    new = validate(
        q, k, v, mask=inp.mask, bias=bias, causal=inp.causal, scale=inp.scale, dropout_p=0.0,
        deterministic=inp.deterministic,
    )
    return new, leaves


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
) -> list[Check]:
    """Run backend `backend` on the inputs and compare its output (and dq, dk, dv, dbias when `grad`)
    with the float64 golden, within the budget the baseline earns. Returns the checks; raises
    AssertionError listing all of them when any fails, and ValueError when the backend cannot run them.

    Shapes: q (b, h, i, d), k (b, g, j, d), v (b, g, j, e); mask and bias as in `attention`.
    """
    inp = validate(q, k, v, mask=mask, bias=bias, causal=causal, scale=scale)
    dtype = inp.dtype
    impl = get_backend(backend)
    with torch.set_grad_enabled(grad):
        reasons = impl.reasons_unsupported(_clone_inputs(inp, dtype)[0])
    if reasons:
        raise ValueError(f"backend {backend!r} cannot run this case: {'; '.join(reasons)}")

    gen = torch.Generator(device="cpu").manual_seed(seed)
    results = {}
    for role, run_dtype, fn in (
        ("golden", torch.float64, einsum_attention),
        ("baseline", dtype, einsum_attention),
        ("candidate", dtype, impl.run),
    ):
        with torch.set_grad_enabled(grad):
            rinp, leaves = _clone_inputs(inp, run_dtype)
            out = fn(rinp)
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
