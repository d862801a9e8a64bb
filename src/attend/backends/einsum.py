"""`einsum`: THE reference. Readable, runs every feature, on every device, in float64 too.

Shape legend: b batch, h query heads, g key/value heads, i query positions, j key positions,
d head dim (q and k), e value head dim; here also r = h // g, the query heads per kv head.

The backend over `attend.reference.einsum_attention` (the function lives there, below `grad2` and the
backends, which recompute through it; it is re-exported here). It holds the full (b, g, r, i, j) logits in
memory, so it is the spec, not the fast path.
"""

from __future__ import annotations

from torch import Tensor

from ..inputs import AttnInputs
from ..reference import einsum_attention
from .base import NO_FLOAT64, Backend, Caps

__all__ = ["EinsumBackend", "einsum_attention"]


class EinsumBackend(Backend):
    """The reference: every feature, every device and dtype, O(i * j) memory per head."""

    name = "einsum"
    caps = {
        "cpu": Caps(lse=True, softcap=True, l2=True),
        "cuda": Caps(lse=True, softcap=True, l2=True),
        "mps": Caps(dtypes=NO_FLOAT64, lse=True, softcap=True, l2=True),
    }

    def run(self, inp: AttnInputs) -> Tensor | tuple[Tensor, Tensor]:
        return einsum_attention(inp)

    def lowering(self, inp: AttnInputs) -> str | None:
        if not inp.structured:
            return None
        held = self.intermediate(inp)
        logits = "" if held is None else f"; holds {held.what} (the logits)"
        return f"the reference: window and documents as one dense (b, 1, i, j) bool mask, every key computed{logits}"
