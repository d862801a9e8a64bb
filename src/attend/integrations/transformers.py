"""Hugging Face transformers: `attend` as an attention implementation (their `AttentionInterface`).

    import attend.integrations.transformers as attend_hf
    attend_hf.register_transformers()                       # once; then, for any model that supports sdpa:
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="attend")

Shape legend: b batch, h query heads, g key/value heads, i query positions, j key positions,
d head dim (q and k), e value head dim.

The model calls `attend_attention_forward(module, q (b, h, i, d), k (b, g, j, d), v (b, g, j, e), mask)`
and gets `(out (b, i, h, e), None)`, as from transformers' own `sdpa_attention_forward`. Masks are the
ones transformers builds for its `sdpa` implementation (registered under the same name): a bool
(b, 1, i, j) tensor, True = attend, or None when SDPA's upper-left `is_causal` suffices. They go through
`attend.scaled_dot_product_attention`, so their meaning is exactly PyTorch's, while the kernel is
attend's choice: grouped-query heads run natively (k and v are never repeated to h heads), and rows
with no key (left padding) give 0 on every backend.

Tested with transformers 5.24.0 and torch 2.13.0 (CPU).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ..compat import scaled_dot_product_attention

__all__ = ["attend_attention_forward", "register_transformers", "NAME"]

NAME = "attend"

# helpers


def _import_transformers() -> Any:
    try:
        import transformers
    except ImportError as e:
        raise ImportError(
            "attend.integrations.transformers needs Hugging Face transformers, which is not installed; "
            "hint: `pip install 'torch-attend[transformers]'` (or `pip install transformers`)"
        ) from e
    return transformers


# main functions


def attend_attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """transformers' attention-interface signature, computed by attend.

    query (b, h, i, d), key (b, g, j, d), value (b, g, j, e); attention_mask bool (b|1, 1|h, i, j),
    True = attend, or float (added to the logits), or None. Returns (out (b, i, h, e), None): no
    attention weights, as with `sdpa`.

    Raises:
        ValueError: `softcap` or attention sinks (`s_aux`), which `sdpa` does not support either.
    """
    for unsupported in ("softcap", "s_aux"):
        if kwargs.get(unsupported) is not None:
            raise ValueError(
                f"expected no `{unsupported}` for attn_implementation={NAME!r}, got one; hint: use "
                "attn_implementation='eager' (or a kernel that supports it) for this model"
            )
    i, j = query.shape[2], key.shape[2]
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    # as in transformers' sdpa path: causal only without a mask and with more than one query (a single
    # decoding query attends every cached key). Shape test first: under torch.compile it must stay a bool.
    is_causal = bool(i > 1 and attention_mask is None and is_causal)

    position_bias = kwargs.get("position_bias")
    if position_bias is not None:  # T5-style learned bias: one float mask, built the way transformers does
        from transformers.integrations.sdpa_attention import create_position_bias_mask

        if is_causal and j > i:  # upper-left causal only sees the first i keys (static-cache prefill)
            key, value, position_bias = key[:, :, :i], value[:, :, :i], position_bias[..., :i]
        attention_mask = create_position_bias_mask(position_bias, attention_mask, is_causal, query, key)
        is_causal = False

    out = scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=attention_mask,
        dropout_p=dropout,
        is_causal=is_causal,
        scale=scaling,
        enable_gqa=key.shape[1] != query.shape[1],
    )
    return out.transpose(1, 2).contiguous(), None


def register_transformers(name: str = NAME) -> str:
    """Register attend with transformers under `name` (default "attend"); returns the name.

    After this, `attn_implementation=name` works for every model that supports `sdpa`: the attention
    function is `attend_attention_forward`, and the masks are built as for `sdpa`.

    Raises:
        ImportError: transformers is not installed (with the install hint).
    """
    transformers = _import_transformers()
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    transformers.AttentionInterface.register(name, attend_attention_forward)
    # without a mask function for `name`, transformers builds no mask at all (padding would be ignored)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, sdpa_mask)
    return name
