"""FLOP counts by the flash-attention convention.

Shape legend: b batch, h query heads, g key/value heads, i query positions, j key positions,
d head dim (q and k), e value head dim.

Forward: two matmuls, 2 FLOP per multiply-add: `2 * b * h * pairs * (d + e)`, which is the familiar
`4 * b * h * i * j * d` when e == d. `pairs` is i * j, halved for causal with i == j (the FA2/FA3
papers' convention); for causal with i != j it is the exact number of (query, key) pairs the
bottom-right aligned mask lets through. Padding and boolean masks are not discounted (the kernels do
the work anyway). Backward: 2.5x the forward (5 matmuls, recomputation included); forward+backward 3.5x.
"""

from __future__ import annotations

__all__ = ["attended_pairs", "attention_flops", "matmul_flops", "BWD_FACTOR"]

BWD_FACTOR = 2.5


def attended_pairs(i: int, j: int, causal: bool) -> float:
    """Number of (query, key) pairs attention computes per (batch, head).

    Causal is aligned to the bottom-right: query r may attend key c iff c <= r + (j - i).
    """
    if not causal:
        return float(i * j)
    if i == j:
        return i * j / 2  # the FA convention, not i * (i + 1) / 2
    off = j - i
    # row r sees min(j, max(0, r + off + 1)) keys: a ramp clipped at 0 and j, summed in closed form
    lo = max(0, -off)  # first row that sees any key
    hi = min(i, j - off)  # first row that sees every key
    ramp = 0
    if hi > lo:
        first, last = lo + off + 1, hi - 1 + off + 1
        ramp = (first + last) * (hi - lo) // 2
    full = max(0, i - max(hi, lo)) * j
    return float(ramp + full)


def attention_flops(shape: dict[str, int], causal: bool, mode: str = "fwd") -> float:
    """FLOPs of one pass. `shape` holds b, h, i, j, d, e; `mode` is "fwd", "bwd" or "fwdbwd"."""
    fwd = 2.0 * shape["b"] * shape["h"] * attended_pairs(shape["i"], shape["j"], causal) * (shape["d"] + shape["e"])
    return {"fwd": fwd, "bwd": BWD_FACTOR * fwd, "fwdbwd": (1 + BWD_FACTOR) * fwd}[mode]


def matmul_flops(n: int, i: int, j: int, d: int, e: int) -> float:
    """FLOPs of the matmul ceiling: (n, i, d) @ (n, d, j) then (n, i, j) @ (n, j, e)."""
    return 2.0 * n * i * j * (d + e)
