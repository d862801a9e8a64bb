"""The candidates a benchmark row times, each as a zero-argument callable.

Shape legend: b batch, h query heads, g key/value heads, i query positions, j key positions,
d head dim (q and k), e value head dim.

* `attend`      `attend.attention(...)`, backend chosen by auto (the row's subject)
* `attend:unchecked` the same with `check_finite=False` (no NaN/inf check): its ratio is the default
                check's cost (on CPU one read of the output for a call that masks anything; none for an
                unmasked call; none on CUDA)
* `attend:module` the same through an `attend.Attend()` module (`nn.Module.__call__` included)
* `<backend>`   `attend.attention(..., backend=name)` for every registered backend that can run the case:
                the same mask semantics on every SDPA variant, lowered by the backend itself
* `seed:einsum` the seed's einsum path: einsum with the softmax in the input dtype
* `seed:sdpa`   `F.scaled_dot_product_attention` under the seed's backend flags, with the mask built
                the way a careful user would (bottom-right causal, padding AND causal in one bool mask),
                once, outside the timed region
* `torch:sdpa`  CUDA only: plain `F.scaled_dot_product_attention` with PyTorch's own kernel choice
                (on CPU the seed enabled every kernel, so `seed:sdpa` is already that)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..dispatch import get_backend, list_backends
from ..functional import attention
from ..inputs import AttnInputs, validate
from ..module import Attend
from ..reference import einsum_attention

__all__ = [
    "SEEDS", "UNCHECKED", "MODULE", "seed_sdpa_variants", "user_mask", "make_call", "dense_bytes", "holds_scores"
]  # fmt: skip

SEEDS = ("seed:einsum", "seed:sdpa")
UNCHECKED = "attend:unchecked"
MODULE = "attend:module"

# helpers


def seed_sdpa_variants(device: torch.device) -> list[SDPBackend] | None:
    """The kernels the seed (gigagan-pytorch `Attend`) enabled; None = all of them (PyTorch decides).

    The seed: CPU -> every kernel; CUDA sm80 (its A100 check) -> flash only; any other GPU -> math and
    memory-efficient, and cuDNN too, because the deprecated `sdp_kernel` it used left cuDNN enabled.
    """
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    if (props.major, props.minor) == (8, 0):
        return [SDPBackend.FLASH_ATTENTION]
    return [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH, SDPBackend.CUDNN_ATTENTION]


def user_mask(q: Tensor, k: Tensor, mask: Tensor | None, bias: Tensor | None, causal: bool):
    """(attn_mask, is_causal) for raw SDPA, built as a careful user would: `is_causal` only where it means
    what attend means (i == j, nothing else to combine); else one bool (or float) mask with causality
    aligned to the bottom-right, key padding broadcast as (b, 1, 1, j)."""
    i, j = q.shape[-2], k.shape[-2]
    if causal and mask is None and bias is None and i == j:
        return None, True
    keep = None
    if mask is not None:
        keep = mask[:, None, None, :] if mask.dim() == 2 else mask
    if causal:
        tri = torch.ones(i, j, dtype=torch.bool, device=q.device).tril(j - i)
        keep = tri if keep is None else keep & tri
    if bias is None:
        return keep, False
    if keep is None:
        return bias, False
    return bias.masked_fill(~keep, float("-inf")), False


def _expand(t: Tensor, h: int) -> Tensor:
    """(b, g, j, x) -> (b, h, j, x): the seed's users repeat k/v heads for grouped-query attention."""
    return t.repeat_interleave(h // t.shape[1], dim=1) if t.shape[1] != h else t


def holds_scores(name: str, inp: AttnInputs) -> bool:
    """Whether candidate `name` holds the (b, h, i, j) logits in memory for `inp`: the seed's einsum does;
    a registered backend as its capabilities declare (`intermediate_bytes`, from `Caps.dense_scores`);
    `attend` is bounded by auto's own memory budget, and SDPA under the seed's or PyTorch's flags picks
    fused kernels."""
    if name == "seed:einsum":
        return True
    return name in list_backends() and get_backend(name).intermediate_bytes(inp) > 0


def dense_bytes(shape: dict[str, int], mode: str) -> int:
    """Rough peak bytes of an implementation that holds the float32 (b, h, i, j) logits."""
    n = shape["b"] * shape["h"] * shape["i"] * shape["j"] * 4
    return n * (3 if mode == "fwd" else 6)


# main function


def make_call(
    name: str,
    tensors: tuple,
    causal: bool,
    mode: str,
    grad_out: Tensor | None = None,
) -> Callable[[], object]:
    """A zero-argument callable that runs candidate `name` once on `tensors` = (q, k, v, mask, bias).

    mode "fwd": forward under `torch.no_grad()`; "fwdbwd": forward, then the gradients of q, k, v
    for `grad_out` (no `.grad` accumulation).
    """
    q, k, v, mask, bias = tensors
    if name == "attend":

        def fwd():
            return attention(q, k, v, mask=mask, bias=bias, causal=causal)

    elif name == UNCHECKED:

        def fwd():
            return attention(q, k, v, mask=mask, bias=bias, causal=causal, check_finite=False)

    elif name == MODULE:
        module = Attend(causal=causal)

        def fwd():
            return module(q, k, v, mask=mask, bias=bias)

    elif name == "seed:einsum":

        def fwd():
            inp = validate(q, k, v, mask=mask, bias=bias, causal=causal)
            return einsum_attention(inp, softmax_dtype=q.dtype)

    elif name in ("seed:sdpa", "torch:sdpa"):
        attn_mask, is_causal = user_mask(q, k, mask, bias, causal)
        variants = seed_sdpa_variants(q.device) if name == "seed:sdpa" else None
        kk, vv = (k, v) if k.shape[1] == q.shape[1] else (None, None)

        def fwd():
            ctx = sdpa_kernel(variants) if variants else contextlib.nullcontext()
            k2, v2 = (kk, vv) if kk is not None else (_expand(k, q.shape[1]), _expand(v, q.shape[1]))
            with ctx:
                return F.scaled_dot_product_attention(q, k2, v2, attn_mask=attn_mask, is_causal=is_causal)

    else:

        def fwd():
            return attention(q, k, v, mask=mask, bias=bias, causal=causal, backend=name)

    if mode == "fwd":

        def run():
            with torch.no_grad():
                return fwd()

        return run

    leaves = [t for t in (q, k, v) if t.requires_grad]

    def run_bwd():
        out = fwd()
        return torch.autograd.grad(out, leaves, grad_out)

    return run_bwd
