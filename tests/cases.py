"""The case grid the backend tests are generated from: awkward sizes on purpose.

Shape legend: b batch, h query heads, g key/value heads, i query positions, j key positions,
d head dim (q and k), e value head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attend._helpers import fmt_dtype


@dataclass(frozen=True)
class Case:
    b: int
    h: int
    g: int
    i: int
    j: int
    d: int
    e: int
    dtype: torch.dtype = torch.float32
    causal: bool = False
    mask: str = "none"  # none | padding | bool | bias | bias+padding | bias-grad
    device: str = "cpu"

    def id(self, backend: str) -> str:
        e = f"e{self.e}" if self.e != self.d else ""
        parts = [
            backend,
            self.device,
            fmt_dtype(self.dtype).replace("float", "f").replace("bf16", "bf16").replace("bfloat16", "bf16"),
            f"b{self.b}h{self.h}g{self.g}",
            f"i{self.i}j{self.j}",
            f"d{self.d}{e}",
        ]
        if self.causal:
            parts.append("causal")
        if self.mask != "none":
            parts.append(self.mask)
        return "-".join(parts)

    def tensors(self, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        q = torch.randn(self.b, self.h, self.i, self.d, generator=gen)
        k = torch.randn(self.b, self.g, self.j, self.d, generator=gen)
        v = torch.randn(self.b, self.g, self.j, self.e, generator=gen)
        mask = bias = None
        if "padding" in self.mask:
            mask = torch.ones(self.b, self.j, dtype=torch.bool)
            mask[-1, max(1, self.j // 2):] = False  # last batch element: half its keys are padding
        if self.mask == "bool":
            mask = torch.rand(self.b, 1, self.i, self.j, generator=gen) > 0.3
            mask[..., 0, :] = False  # a fully masked row, on purpose
        if self.mask.startswith("bias"):
            bias = torch.randn(1, self.h, self.i, self.j, generator=gen)
        q, k, v = (t.to(self.device, self.dtype) for t in (q, k, v))
        mask = None if mask is None else mask.to(self.device)
        bias = None if bias is None else bias.to(self.device, self.dtype)
        if self.mask == "bias-grad":
            bias.requires_grad_(True)
        return q, k, v, mask, bias


SHAPES = [
    # b, h, g, i, j, d, e
    (2, 8, 2, 129, 257, 64, 64),  # GQA h/g = 4, i < j (KV cache), ragged lengths
    (2, 4, 4, 129, 64, 40, 40),  # i > j: causal leaves rows with no key; odd head dim
    (1, 4, 1, 1, 7, 72, 72),  # single query (decoding), MQA
    (2, 2, 2, 7, 1, 80, 80),  # single key
    (1, 4, 2, 64, 64, 64, 32),  # e != d
    (1, 2, 2, 129, 129, 16, 16),  # square, i == j: is_causal path
]
MASKS = ["none", "padding", "bool", "bias", "bias+padding", "bias-grad"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def grid(device: str = "cpu") -> list[Case]:
    cases = []
    for shape in SHAPES:
        for mask in MASKS:
            for causal in (False, True):
                for dtype in DTYPES:
                    cases.append(Case(*shape, dtype=dtype, causal=causal, mask=mask, device=device))
    return cases
