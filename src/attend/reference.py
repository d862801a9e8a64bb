"""The reference attention: readable, runs every feature, on every device, in float64 too.

Shape legend: b batch, h query heads, g key/value heads, i query positions, j key positions,
d head dim (q and k), e value head dim; here also r = h // g, the query heads per kv head.

It holds the full (b, g, r, i, j) logits in memory, so it is the spec, not the fast path. The `einsum`
backend (`attend.backends.einsum`) runs it; `attend.grad2` recomputes other backends' gradients through it
under create_graph; `attend.testing` and the benchmarks check against it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from ._helpers import accum_dtype
from .inputs import AttnInputs
from .masks import combined_keep

__all__ = ["einsum_attention"]

# helpers


def _group(t: Tensor, g: int) -> Tensor:
    """(b, h|1, i, j) -> (b, g|1, r|1, i, j) so masks and bias line up with grouped queries."""
    if t.dim() == 2:  # a shared (i, j) tile
        return t
    if t.shape[1] == 1:
        return t[:, :, None]
    return rearrange(t, "b (g r) i j -> b g r i j", g=g)


def einsum_attention(
    inp: AttnInputs,
    *,
    softmax_dtype: torch.dtype | None = None,
    dropout_keep: Tensor | None = None,
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Attention as the contract defines it. `softmax_dtype` overrides where the softmax runs (the
    seed's behaviour, softmax in the input dtype, is `softmax_dtype=q.dtype`; benchmarks only).
    `dropout_keep`: a bool keep-mask broadcastable to (b, h, i, j) to apply instead of drawing one (the
    second-order recompute of another backend replays that backend's own mask, `attend.grad2`).
    `return_lse` (or `inp.return_lse`): also the log-sum-exp of each row's logits over the keys it may attend,
    (b, h, i) in the softmax's dtype, -inf for a row with no key: `log(den) + row_max` below."""
    acc = softmax_dtype or accum_dtype(inp.dtype)

    # scale q before the matmul rather than the logits after it: in float16 q @ k overflows (> 65504) long
    # before the scaled logits do (scale * |q||k| in the hundreds). SDPA's math path scales q and k by
    # sqrt(scale) for the same reason; sdpa:flash on CPU computes the logits in float32. The logits stay in
    # the input dtype (the baseline's rounding budget is that of the input dtype, see attend.testing).
    # grouped-query heads: fold the r query heads that share one kv head into their own dim, so k and v
    # are never copied to h heads
    q = rearrange(inp.q * inp.scale, "b (g r) i d -> b g r i d", g=inp.g)
    sim = torch.einsum("b g r i d, b g j d -> b g r i j", q, inp.k)
    sim = sim.to(acc)
    if inp.score == "l2":
        # GigaGAN's negative squared L2 distance, as written: -(|q|^2 + |k|^2 - 2 q.k) * scale (the dispatcher
        # lowers it to a dot product for every backend, `masks.lower_score`; this is the spec it is tested on)
        q_sq = rearrange(inp.q.to(acc).square().sum(-1), "b (g r) i -> b g r i", g=inp.g)[..., None]
        k_sq = inp.k.to(acc).square().sum(-1)[:, :, None, None, :]
        sim = -(q_sq + k_sq) * inp.scale + 2 * sim

    if inp.softcap is not None:
        # Gemma 2's soft-capping, on the scaled logits, before the bias and the masks
        sim = torch.tanh(sim / inp.softcap) * inp.softcap

    if inp.bias is not None:
        sim = sim + _group(inp.bias, inp.g).to(acc)

    keep = combined_keep(inp)
    if inp.bias is not None:
        # a -inf bias is a mask: treat it as one, so huge garbage at such a key (a logit that overflowed to
        # inf in float16) cannot turn the row into inf + -inf = NaN (contract item 3)
        finite = inp.bias != float("-inf")
        keep = finite if keep is None else keep & finite
    if keep is not None:
        # masked_fill, not an add: a garbage (even NaN) logit at a masked key never reaches the softmax
        sim = sim.masked_fill(~_group(keep, inp.g), float("-inf"))

    # softmax that gives exactly 0 (and zero gradients) for a row with no key it may attend
    row_max = sim.amax(dim=-1, keepdim=True).detach()
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    exp = (sim - row_max).exp()
    den = exp.sum(dim=-1, keepdim=True)
    seen = den > 0
    attn = exp / torch.where(seen, den, torch.ones_like(den))
    lse = None
    if return_lse or inp.return_lse:
        # m + log(sum exp(s - m)), m detached: its gradient is the softmax, exactly (a NaN logit stays NaN)
        lse = torch.where(seen, row_max + torch.where(seen, den, torch.ones_like(den)).log(), -torch.inf)
        lse = rearrange(lse[..., 0], "b g r i -> b (g r) i")

    if dropout_keep is not None:
        attn = attn * _group(dropout_keep, inp.g).to(attn.dtype) * (1.0 / (1.0 - inp.dropout_p))
    elif inp.dropout_p > 0:
        attn = F.dropout(attn, p=inp.dropout_p, training=True)

    out = torch.einsum("b g r i j, b g j e -> b g r i e", attn.to(inp.v.dtype), inp.v)
    out = rearrange(out, "b g r i e -> b (g r) i e").to(inp.dtype)
    return out if lse is None else (out, lse)
