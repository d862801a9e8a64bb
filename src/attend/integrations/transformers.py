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

Packed (padding-free) batches, as `transformers.DataCollatorWithFlattening` makes them: several sequences
concatenated into one row (b == 1) with `position_ids` restarting for each, and with
`return_flash_attn_kwargs=True` also `cu_seq_lens_q` / `cu_seq_lens_k` (the sequences' cumulative lengths;
`max_length_q` / `max_length_k` are not needed). transformers hands these to the attention function as
keyword arguments, so the call becomes `attend.attention(q, k, v, causal=True, documents=ids)`, one document
id per token: no token attends another sequence, causal holds inside each, and attend skips the blocks
across sequences (no (i, j) mask is built). The mask that arrives then:

* None when the model has a cache (`use_cache=True`, the config default, even in training): transformers
  detects packing only without a cache, so its own `sdpa` attends across the packed sequences there. attend
  does not: the documents alone give each sequence's causal attention.
* The block-diagonal causal mask transformers builds from the packed `position_ids` (`use_cache=False`). It
  says exactly what the documents say, so it is checked (one comparison per call) and dropped.
* Any other mask (a sliding window, bidirectional image tokens, a custom 4-D mask; padding only with
  `cu_seq_lens`, see below) was built for a reason of its own: it is kept and combined with the documents
  (mask AND same document, no separate causal flag, as the mask holds the causal pattern), so the result
  is that mask's, restricted to each sequence.

Packing is read from `cu_seq_lens_q` / `cu_seq_lens_k` (b must be 1: they index the flattened tokens) or,
without them, from `position_ids` (1, i) of a b == 1 call without cached keys (i == j) whose positions do not
increase by one somewhere (transformers' own rule in `masking_utils.find_packed_sequence_indices`; it costs
one host read per layer, as transformers' flash path pays) and without padding (no key that every query is
masked from: a left-padded prompt's position_ids restart too, and transformers reads packing only without a
padding mask). Under torch.compile only `cu_seq_lens` are read (the `position_ids` test is data-dependent);
transformers' mask then carries the packing when there is no cache. Everything else (unpacked batches,
decoding against a KV cache, i != j) runs as before.

Tested with transformers 5.24.0 and torch 2.13.0 (CPU).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..compat import scaled_dot_product_attention, upper_left_causal
from ..functional import attention

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
    usable = getattr(getattr(transformers, "utils", None), "is_torch_available", lambda: True)
    if not usable():
        raise ImportError(
            f"attend.integrations.transformers needs transformers' PyTorch models, which transformers "
            f"{transformers.__version__} disables on torch {torch.__version__} (it needs a newer torch); hint: "
            "`pip install -U torch`, or a transformers release that supports this torch"
        )
    return transformers


def _docs_from_cu_seqlens(cu: Any, n: int, name: str, device: torch.device) -> Tensor:
    """Document ids (1, n) of the tokens from cumulative sequence lengths (s + 1,): token t is in document
    d iff cu[d] <= t < cu[d + 1]."""
    if not isinstance(cu, Tensor):
        cu = torch.as_tensor(cu)
    cu = cu.to(device=device, dtype=torch.int64).reshape(-1)
    if not torch.compiler.is_compiling():
        if cu.numel() < 2 or int(cu[0]) != 0 or int(cu[-1]) != n or not bool((cu.diff() >= 0).all()):
            raise ValueError(
                f"expected `{name}` to be cumulative sequence lengths from 0 to the {n} tokens of the packed "
                f"row, non-decreasing, got {cu.tolist() if cu.numel() <= 16 else tuple(cu.shape)}"
            )
    tokens = torch.arange(n, device=device, dtype=torch.int64)
    return (torch.searchsorted(cu, tokens, right=True) - 1)[None]


def _packed_documents(
    query: Tensor, key: Tensor, attention_mask: Tensor | None, kwargs: dict[str, Any]
) -> tuple[Tensor, Tensor] | None:
    """(q_docs (1, i), k_docs (1, j)) for a packed (padding-free) batch, or None when it is not packed.

    From `cu_seq_lens_q` / `cu_seq_lens_k` when given (b must be 1), else from `position_ids` of a b == 1,
    i == j call: a new document starts wherever the position does not increase by one (as transformers'
    `find_packed_sequence_indices`); None when there is only one, or when the mask shows padding (a key that
    no query sees: transformers reads packing only without a padding mask, and a padded prompt's position_ids
    restart too) or is a float mask.

    Raises:
        ValueError: only one of `cu_seq_lens_q` / `cu_seq_lens_k`, b != 1 with them, or lengths that do not
            add up to i and j.
    """
    b, i, j = query.shape[0], query.shape[2], key.shape[2]
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is not None or cu_k is not None:
        if cu_q is None or cu_k is None:
            raise ValueError(
                "expected both `cu_seq_lens_q` and `cu_seq_lens_k` for a packed batch, got only "
                f"`{'cu_seq_lens_q' if cu_q is not None else 'cu_seq_lens_k'}`"
            )
        if b != 1:
            raise ValueError(
                f"expected a packed batch of one row (b == 1) with `cu_seq_lens_q` / `cu_seq_lens_k`, got b={b} "
                f"(query {tuple(query.shape)}); hint: DataCollatorWithFlattening makes (1, total) batches"
            )
        return (
            _docs_from_cu_seqlens(cu_q, i, "cu_seq_lens_q", query.device),
            _docs_from_cu_seqlens(cu_k, j, "cu_seq_lens_k", query.device),
        )
    position_ids = kwargs.get("position_ids")
    if (
        b != 1
        or i != j  # cached keys (decoding, chunked prefill): not a packed training batch
        or i < 2
        or not isinstance(position_ids, Tensor)
        or position_ids.is_floating_point()
        or tuple(position_ids.shape) != (1, i)  # (3, b, i) multimodal rope positions are not sequence starts
        or torch.compiler.is_compiling()  # data-dependent: transformers' mask carries the packing there
    ):
        return None
    pos = position_ids.to(query.device)
    starts = torch.diff(pos, prepend=pos[:, :1] - 1, dim=-1) != 1
    if not bool(starts.any()):  # one sequence: the ordinary path
        return None
    if attention_mask is not None and (
        attention_mask.dtype != torch.bool or not bool(attention_mask.any(dim=-2).all())
    ):
        return None
    docs = starts.cumsum(-1)
    return docs, docs


def _is_documents_mask(mask: Tensor, q_docs: Tensor, k_docs: Tensor, causal: bool) -> bool:
    """Whether the bool `mask` says exactly "same document (and causal)": the mask transformers builds for a
    packed batch, made redundant by the documents. Compared a block of rows at a time (temporaries of at most
    ~2**24 elements beside the mask), with one host read at the end."""
    i, j = q_docs.shape[-1], k_docs.shape[-1]
    if torch.compiler.is_compiling() or mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[-2:] != (i, j):
        return False
    cols = torch.arange(j, device=mask.device)
    same = torch.ones((), dtype=torch.bool, device=mask.device)
    step = max(1, 2**24 // max(1, j * mask.shape[0] * mask.shape[1]))
    for r0 in range(0, i, step):
        r1 = min(i, r0 + step)
        keep = q_docs[:, None, r0:r1, None] == k_docs[:, None, None, :]  # (b|1, 1, rows, j)
        if causal:  # bottom-right aligned, as attend's causal
            keep = keep & (cols <= torch.arange(r0, r1, device=mask.device)[:, None] + (j - i))
        same = same & (mask[:, :, r0:r1] == keep).all()
    return bool(same)


def _packed_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float,
    scaling: float | None,
    causal: bool,
    docs: tuple[Tensor, Tensor],
    softcap: float | None = None,
    sinks: Tensor | None = None,
) -> Tensor:
    """Attention over the packed sequences `docs`: out (b, h, i, e).

    Without a mask, or with the one transformers builds from the packing (same document, causal), the
    documents and the causal flag say it all. Any other mask is kept as the authority on causality and
    everything else it encodes, restricted to each document."""
    q_docs, k_docs = docs
    if q_docs is k_docs or (not torch.compiler.is_compiling() and torch.equal(q_docs, k_docs)):
        documents: Tensor | tuple[Tensor, Tensor] = k_docs
    elif causal and not torch.compiler.is_compiling():
        # flash-attn aligns causal to each sequence's own end; attend's causal is one diagonal for the row
        raise ValueError(
            "expected the same sequence boundaries for queries and keys in causal packed attention, got "
            "`cu_seq_lens_q` != `cu_seq_lens_k`; hint: attn_implementation='attend' runs causal packed "
            "attention only with queries and keys of the same sequences (self-attention without a cache)"
        )
    else:  # cross-attention between packed sequences
        documents = (q_docs, k_docs)
    mask = bias = None
    if attention_mask is not None and not _is_documents_mask(attention_mask, q_docs, k_docs, causal):
        causal = False  # as in transformers' sdpa path: a mask holds the causal pattern itself
        if attention_mask.dtype == torch.bool:
            mask = attention_mask
        else:
            bias = attention_mask  # a float mask is added to the logits
    return attention(
        query, key, value, mask=mask, bias=bias, causal=causal, documents=documents, scale=scaling, dropout_p=dropout,
        softcap=softcap, sinks=sinks,
    )  # fmt: skip


def _vocabulary_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float,
    scaling: float | None,
    is_causal: bool,
    softcap: float | None,
    sinks: Tensor | None,
) -> tuple[Tensor, None]:
    """A call with soft-capping or sinks: transformers' sdpa mask (bool, True = attend; float, added; or None
    with PyTorch's upper-left `is_causal`) as `attend.attention`'s mask, bias and causal. Returns
    (out (b, i, h, e), None)."""
    mask = bias = None
    causal = False
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            mask = attention_mask
        else:
            bias = attention_mask
    elif is_causal:
        key, value, causal, mask = upper_left_causal(key, value, query.shape[2])
    out = attention(
        query, key, value, mask=mask, bias=bias, causal=causal, scale=scaling, dropout_p=dropout, softcap=softcap,
        sinks=sinks,
    )  # fmt: skip
    return out.transpose(1, 2).contiguous(), None


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

    Packed batches (`cu_seq_lens_q` / `cu_seq_lens_k`, or restarting `position_ids` with b == 1 and i == j,
    in kwargs) run as `attend.attention(..., documents=...)`, one document per sequence (module docstring).

    Logit soft-capping (`softcap`, Gemma 2) and attention sinks (`s_aux`, gpt-oss), which `sdpa` cannot run,
    go to `attend.attention(..., softcap=, sinks=)` with the same mask (transformers' eager formula; no
    fallback to eager and no (i, j) scores on the backends that run them).

    Raises:
        ValueError: malformed `cu_seq_lens_q` / `cu_seq_lens_k` (one without the other, b != 1, lengths that do
            not add up to i and j, different boundaries for queries and keys under causal attention).
    """
    softcap, sinks = kwargs.get("softcap"), kwargs.get("s_aux")
    i, j = query.shape[2], key.shape[2]
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    docs = _packed_documents(query, key, attention_mask, kwargs) if kwargs.get("position_bias") is None else None
    if docs is not None:  # a packed batch (module docstring): one document per sequence
        out = _packed_attention(
            query, key, value, attention_mask, dropout, scaling, bool(is_causal), docs, softcap, sinks
        )
        return out.transpose(1, 2).contiguous(), None
    # as in transformers' sdpa path: causal only without a mask and with more than one query (a single
    # decoding query attends every cached key). Shape test first: under torch.compile it must stay a bool.
    is_causal = bool(i > 1 and attention_mask is None and is_causal)
    if softcap is not None or sinks is not None:
        return _vocabulary_attention(query, key, value, attention_mask, dropout, scaling, is_causal, softcap, sinks)

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
    function is `attend_attention_forward`, and the masks are built as for `sdpa`. Packed batches
    (`DataCollatorWithFlattening`) work too, with or without `return_flash_attn_kwargs=True`.

    Raises:
        ImportError: transformers is not installed, or disables its PyTorch models on this torch (transformers 5
            needs torch >= 2.6), with a hint.
    """
    transformers = _import_transformers()
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    transformers.AttentionInterface.register(name, attend_attention_forward)
    # without a mask function for `name`, transformers builds no mask at all (padding would be ignored)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, sdpa_mask)
    return name
