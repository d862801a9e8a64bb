"""`varlen_attn`: PyTorch's `torch.nn.attention.varlen.varlen_attn` (torch 2.13) on every device, with backward.

Shape legend: b batch, h query heads, g key/value heads, i query positions, j key positions, d head dim (q and
k), e value head dim. Here the batch is packed: total_q query tokens and total_k key tokens, the sequences one
after the other, with `cu_seq_q` / `cu_seq_k` (int32, (n + 1,)) the cumulative lengths of the n sequences.

    query (total_q, h, d)   key (total_k, g, d)   value (total_k, g, e)   ->   out (total_q, h, e)

Same signature, defaults and semantics as PyTorch's (whose kernel is CUDA-only): sequence s attends only to
itself, and causal / a window are aligned to the bottom-right of each sequence, as in flash-attn. Query token
x of sequence s (local index x - cu_seq_q[s], lengths Lq = cu_seq_q[s+1] - cu_seq_q[s], Lk likewise) has its
diagonal at local key p = (x - cu_seq_q[s]) + (Lk - Lq) and sees local keys [p - left, p + right].

It runs through attend's dispatch (`attend.dispatch.run`): the packing becomes document ids (`q_docs`, `k_docs`,
sorted, so every backend skips the key blocks of other sequences) and the per-sequence diagonal becomes `q_pos`
(`masks.Structure` turns them into each query's exact key interval). Gradients flow to query, key and value.
"""

from __future__ import annotations

import itertools
from dataclasses import replace
from typing import Any, NamedTuple, cast

import torch
from torch import Tensor

from ._helpers import autocast_inputs, fmt_dtype, fmt_shape
from .dispatch import run
from .inputs import AttnInputs, Options, check_float, check_tensor, describe, pages_in_use, validate

__all__ = ["varlen_attn", "AuxRequest"]



class AuxRequest(NamedTuple):
    """Which auxiliary outputs `varlen_attn` returns (PyTorch's `torch.nn.attention.varlen.AuxRequest`, which
    is accepted too: anything with a bool `lse` attribute)."""

    lse: bool = False


# helpers


def _check_packed(query: Any, key: Any, value: Any) -> None:
    """query (total_q, h, d), key (total_k, g, d), value (total_k, g, e) (head counts: `_check_heads`; dtypes and
    devices: `validate`)."""
    for name, t, want in (
        ("query", query, "(total_q, h, d)"),
        ("key", key, "(total_k, g, d)"),
        ("value", value, "(total_k, g, e)"),
    ):
        check_tensor(name, t, want)
        check_float(name, t)
        if t.dim() != 3:
            hint = ""
            if t.dim() == 4:
                hint = (
                    "; hint: varlen_attn takes the sequences packed one after the other, with cu_seq_q/cu_seq_k; "
                    "for a padded (b, h, i, d) batch use attend.attention with a key padding mask"
                )
            raise ValueError(f"expected `{name}` of shape {want}, got {describe(t)}{hint}")
    shapes = f"query {fmt_shape(query.shape)}, key {fmt_shape(key.shape)}, value {fmt_shape(value.shape)}"
    if key.shape[0] != value.shape[0]:
        raise ValueError(f"expected key and value with the same number of tokens total_k, got {shapes}")
    if key.shape[1] != value.shape[1]:
        raise ValueError(f"expected key and value with the same number of heads g, got {shapes}")
    if query.shape[2] != key.shape[2]:
        raise ValueError(f"expected query and key with the same head dim d, got {shapes}")


def _check_heads(query: Tensor, key: Tensor, value: Tensor, enable_gqa: Any) -> None:
    """h == g, or h % g == 0 with enable_gqa. After the cumulative lengths are checked against the packed
    tensors: a heads-first tensor gets its layout hint there, not a head count that is really total_q."""
    shapes = f"query {fmt_shape(query.shape)}, key {fmt_shape(key.shape)}, value {fmt_shape(value.shape)}"
    if not isinstance(enable_gqa, bool):
        raise TypeError(f"expected `enable_gqa` to be a bool, got {describe(enable_gqa)}")
    h, g = query.shape[1], key.shape[1]
    if not enable_gqa and h != g:
        raise ValueError(
            f"expected query and key/value with the same number of heads, got h={h} and g={g} ({shapes}); "
            "hint: pass enable_gqa=True for grouped-query attention"
        )
    if g == 0 or h % g != 0:
        raise ValueError(
            f"expected query heads h to be a multiple of key/value heads g for grouped-query attention, got "
            f"h={h} and g={g} ({shapes})"
        )


def _check_cu_seq(
    name: str, cu: Any, packed: Tensor, tokens: str, device: torch.device, partner: str | None = None
) -> list[int]:
    """cu: int32 (n + 1,) on `device`, starting at 0, non-decreasing, ending at the number of tokens of `packed`
    (the 3-D (total, heads, dim) tensor it describes, `query` or `key` as `tokens` names it; `partner`: a tensor
    laid out like it, `value`, for the hint). Returns its values (one read to the host)."""
    total = packed.shape[0]
    if not isinstance(cu, Tensor):
        raise TypeError(f"expected `{name}` to be an int32 torch.Tensor of shape (n + 1,), got {describe(cu)}")
    if cu.dim() != 1 or cu.shape[0] < 2:
        raise ValueError(
            f"expected `{name}` of shape (n + 1,) with n >= 1 sequences (cumulative lengths, starting at 0), "
            f"got {describe(cu)}"
        )
    if cu.dtype != torch.int32:
        raise TypeError(
            f"expected `{name}` of dtype int32, got {fmt_dtype(cu.dtype)}; hint: `{name}.to(torch.int32)` "
            "(PyTorch's varlen kernels take int32)"
        )
    if cu.device != device:
        raise ValueError(f"expected `{name}` on {device} like query, got {cu.device}")
    values = [int(x) for x in cu.tolist()]
    if values[0] != 0:
        raise ValueError(f"expected `{name}` to start at 0, got {name}[0] = {values[0]} (shape {fmt_shape(cu.shape)})")
    for s in range(len(values) - 1):
        if values[s + 1] < values[s]:
            raise ValueError(
                f"expected `{name}` non-decreasing (cumulative lengths), got {name}[{s}] = {values[s]} > "
                f"{name}[{s + 1}] = {values[s + 1]}"
            )
    if values[-1] != total and packed.dim() == 3 and packed.shape[1] == values[-1]:
        # (heads, total, dim): the layout of attention's (b, h, i, d) without the batch, passed as it is
        n_tokens, heads = f"total_{tokens[0]}", "h" if tokens == "query" else "g"
        also = f" (and `{partner}.transpose(0, 1)`)" if partner else ""
        raise ValueError(
            f"expected `{tokens}` of shape ({n_tokens}, {heads}, d) with {n_tokens} = {name}[-1] = {values[-1]}, "
            f"got shape {fmt_shape(packed.shape)}; hint: `{tokens}` looks heads-first ({heads}, {n_tokens}, d): "
            f"pass `{tokens}.transpose(0, 1)`{also}"
        )
    if values[-1] != total:
        raise ValueError(
            f"expected `{name}[-1]` to equal the number of {tokens} tokens, {total}, got {values[-1]} (shape "
            f"{fmt_shape(cu.shape)}); hint: {name} = pad(lengths.cumsum(0), (1, 0)).to(torch.int32)"
        )
    return values


def _check_max(name: str, value: Any, cu_name: str, cu: list[int]) -> None:
    longest = max(b - a for a, b in zip(cu, cu[1:]))
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected `{name}` to be a Python int (the longest sequence), got {describe(value)}")
    if value < longest:
        raise ValueError(
            f"expected `{name}` >= the longest sequence in `{cu_name}`, {longest}, got {value}; "
            f"hint: {name} = int((cu[1:] - cu[:-1]).max())"
        )


def _check_window(window_size: Any) -> tuple[int | None, int | None] | None:
    """(left, right), each an int >= 0 or -1 (unbounded; as in PyTorch's, no other negative) -> attend's window
    (None unbounded), None for (-1, -1)."""
    if isinstance(window_size, Tensor) or not isinstance(window_size, (tuple, list)):
        raise TypeError(
            f"expected `window_size` to be a pair (left, right) of ints, -1 for unbounded, got "
            f"{describe(window_size)}; hint: (-1, 0) is causal, (128, 0) causal with a window of 128"
        )
    if len(window_size) != 2:
        raise ValueError(f"expected `window_size` to have length 2 (left, right), got {len(window_size)}")
    for side, w in zip(("left", "right"), window_size):
        if isinstance(w, bool) or not isinstance(w, int):
            raise TypeError(f"expected `window_size` {side} to be an int (-1: unbounded), got {describe(w)}")
        if w < -1:
            raise ValueError(
                f"expected `window_size` {side} to be an int >= 0, or -1 for unbounded, got {w} in "
                f"window_size={tuple(window_size)}; hint: (-1, 0) is causal, (128, 0) causal with a window of 128"
            )
    left, right = (None if w < 0 else w for w in window_size)
    return None if left is None and right is None else (left, right)


def _check_extras(return_aux: Any, num_splits: Any) -> bool:
    """Returns whether the log-sum-exp is wanted."""
    lse = False
    if return_aux is not None:
        wanted = getattr(return_aux, "lse", None)
        if not isinstance(wanted, bool):
            raise TypeError(f"expected `return_aux` to be None or an AuxRequest(lse=bool), got {describe(return_aux)}")
        lse = wanted
    if num_splits is not None and (isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 1):
        raise ValueError(f"expected `num_splits` to be None or an int >= 1, got {describe(num_splits)}")
    return lse


def _heads_first(t: Tensor) -> Tensor:
    """(total, heads, dim) -> (1, heads, total, dim), a view."""
    return t.transpose(0, 1)[None]


def _tokens_first(out: Tensor) -> Tensor:
    """(1, h, total_q, e) -> (total_q, h, e), contiguous like PyTorch's output."""
    return out[0].transpose(0, 1).contiguous()


def _check_grad_free(query: Tensor, key: Tensor, value: Tensor, which: str) -> None:
    if torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
        raise RuntimeError(
            f"attend.varlen_attn: expected query, key and value that do not require grad with {which} (the KV cache "
            "is inference-only, as in PyTorch), got requires_grad=True with grad mode on; hint: run it under "
            "torch.no_grad() or torch.inference_mode()"
        )


def _used_keys(
    query: Any,
    key: Any,
    value: Any,
    cu_seq_q: Any,
    cu_seq_k: Any,
    max_k: Any,
    seqused_k: Any,
    block_table: Any,
) -> tuple[Tensor, Tensor, Tensor, int]:
    """The KV-cache arguments as plain packing: the keys and values each sequence uses, gathered in order (one
    `index_select` each), and their cumulative lengths. Returns (key (total_used, g, d), value (total_used, g, e),
    cu_seq_k int32 (n + 1,), max_k).

    seqused_k (n,) int32: sequence s uses the first seqused_k[s] keys of its key segment (cu_seq_k), or of its
    pages when block_table (n, max_pages) int32 is given: then key and value are page pools (total_pages,
    page_size, g, d|e) and sequence s's key t is key[block_table[s, t // page_size], t % page_size]; cu_seq_k is
    not read then (None, or an int32 (n + 1,) tensor). Causal and the window align to the used length."""
    which = " and ".join(n for n, t in (("seqused_k", seqused_k), ("block_table", block_table)) if t is not None)
    check_tensor("query", query, "(total_q, h, d)")
    if not isinstance(cu_seq_q, Tensor) or cu_seq_q.dim() != 1 or cu_seq_q.shape[0] < 2:
        raise ValueError(
            "expected `cu_seq_q` of shape (n + 1,) with n >= 1 sequences (cumulative lengths), "
            f"got {describe(cu_seq_q)}"
        )
    n = cu_seq_q.shape[0] - 1
    if seqused_k is None:
        raise ValueError(
            "expected `seqused_k` (n,) int32 with `block_table` (the keys each sequence uses in its pages), got None; "
            "hint: seqused_k = the number of tokens in each sequence's cache, as PyTorch requires"
        )
    paged = block_table is not None
    for name, t, want in (
        ("key", key, "(total_pages, page_size, g, d)"),
        ("value", value, "(total_pages, page_size, g, e)"),
    ):
        check_tensor(name, t, want if paged else want.replace("total_pages, page_size", "total_k"))
        if paged and t.dim() != 4:
            raise ValueError(f"expected `{name}` of shape {want} with block_table (a page pool), got {describe(t)}")
    if paged and key.shape[:3] != value.shape[:3]:
        raise ValueError(
            f"expected key and value pools that agree on (total_pages, page_size, g), got key {fmt_shape(key.shape)} "
            f"and value {fmt_shape(value.shape)}"
        )
    if not isinstance(seqused_k, Tensor):
        raise TypeError(f"expected `seqused_k` to be an int32 torch.Tensor of shape (n,), got {describe(seqused_k)}")
    if seqused_k.dtype != torch.int32:
        raise TypeError(
            f"expected `seqused_k` of dtype int32, got {fmt_dtype(seqused_k.dtype)}; hint: `.to(torch.int32)`"
        )
    if seqused_k.dim() != 1 or seqused_k.shape[0] != n:
        raise ValueError(
            f"expected `seqused_k` of shape (n,) = ({n},), one length per sequence of cu_seq_q, "
            f"got {describe(seqused_k)}"
        )
    if seqused_k.device != query.device:
        raise ValueError(f"expected `seqused_k` on {query.device} like query, got {seqused_k.device}")
    used = [int(x) for x in seqused_k.tolist()]
    if min(used) < 0:
        raise ValueError(f"expected `seqused_k` >= 0, got seqused_k[{used.index(min(used))}] = {min(used)}")
    device = query.device
    if not paged:
        if not isinstance(key, Tensor) or key.dim() != 3:
            raise ValueError(f"expected `key` of shape (total_k, g, d), got {describe(key)}")
        partner = "value" if isinstance(value, Tensor) and value.shape[:2] == key.shape[:2] else None
        cu_k = _check_cu_seq("cu_seq_k", cu_seq_k, key, "key", device, partner)
        if len(cu_k) != n + 1:
            raise ValueError(
                f"expected cu_seq_k with one entry per sequence, shape ({n + 1},), got {describe(cu_seq_k)}"
            )
        for s in range(n):
            if used[s] > cu_k[s + 1] - cu_k[s]:
                raise ValueError(
                    f"expected seqused_k[{s}] <= the length of sequence {s}'s keys in cu_seq_k, "
                    f"{cu_k[s + 1] - cu_k[s]}, got {used[s]}"
                )
        index = torch.cat([torch.arange(cu_k[s], cu_k[s] + used[s], device=device) for s in range(n)])
        flat_k, flat_v = key, value
    else:
        if not isinstance(block_table, Tensor) or block_table.dtype != torch.int32:
            got = describe(block_table) if not isinstance(block_table, Tensor) else fmt_dtype(block_table.dtype)
            raise TypeError(f"expected `block_table` of dtype int32, shape (n, max_pages), got {got}")
        if block_table.dim() != 2 or block_table.shape[0] != n:
            raise ValueError(
                f"expected `block_table` of shape (n, max_pages) with n = {n}, got {describe(block_table)}"
            )
        if block_table.device != device:
            raise ValueError(f"expected `block_table` on {device} like query, got {block_table.device}")
        if cu_seq_k is not None and (
            not isinstance(cu_seq_k, Tensor) or cu_seq_k.dtype != torch.int32 or tuple(cu_seq_k.shape) != (n + 1,)
        ):
            raise ValueError(
                f"expected `cu_seq_k` None or an int32 tensor of shape ({n + 1},) with block_table (its values are not "
                f"read: seqused_k gives the lengths), got {describe(cu_seq_k)}"
            )
        page_size = key.shape[1]
        pools = pages_in_use(block_table, used, page_size, key.shape[0], pool_name="total_pages", row_name="sequence")
        parts = []
        for s, ids in enumerate(pools):
            at = torch.tensor(ids, device=device, dtype=torch.long)
            parts.append((at[:, None] * page_size + torch.arange(page_size, device=device)).flatten()[: used[s]])
        index = torch.cat(parts)
        flat_k, flat_v = key.flatten(0, 1), value.flatten(0, 1)
    _check_grad_free(query, key, value, which)
    if isinstance(max_k, bool) or not isinstance(max_k, int):
        raise TypeError(f"expected `max_k` to be a Python int (the longest sequence), got {describe(max_k)}")
    if max_k < max(used):
        raise ValueError(f"expected `max_k` >= the longest used key sequence (seqused_k), {max(used)}, got {max_k}")
    new_cu = torch.tensor([0, *itertools.accumulate(used)], dtype=torch.int32, device=device)
    return flat_k.index_select(0, index), flat_v.index_select(0, index), new_cu, max_k


def _varlen_inputs(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    cu_seq_q: Tensor,
    cu_seq_k: Tensor | None,
    max_q: int,
    max_k: int,
    *,
    scale: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
    enable_gqa: bool = False,
    seqused_k: Tensor | None = None,
    block_table: Tensor | None = None,
    sinks: Tensor | None = None,
    softcap: float | None = None,
) -> AttnInputs:
    """Check everything and build the packed `AttnInputs`: q (1, h, total_q, d), k (1, g, total_k, d),
    v (1, g, total_k, e), document ids from the cumulative lengths and each query's diagonal (`q_pos`) where
    it is not the default. seqused_k / block_table (the KV cache): the used keys gathered first (`_used_keys`).
    Raises (TypeError, ValueError; RuntimeError for gradients with the KV cache) before any kernel runs."""
    if seqused_k is not None or block_table is not None:
        key, value, cu_seq_k, max_k = _used_keys(query, key, value, cu_seq_q, cu_seq_k, max_k, seqused_k, block_table)
    _check_packed(query, key, value)
    if cu_seq_k is None:
        raise ValueError(
            "expected `cu_seq_k` to be an int32 tensor of shape (n + 1,), got None; hint: for self-attention "
            "packing pass cu_seq_q again (None is only for the paged KV cache, block_table)"
        )
    cu_q = _check_cu_seq("cu_seq_q", cu_seq_q, query, "query", query.device)
    cu_k = _check_cu_seq("cu_seq_k", cu_seq_k, key, "key", query.device, "value")
    _check_heads(query, key, value, enable_gqa)
    if len(cu_q) != len(cu_k):
        raise ValueError(
            f"expected cu_seq_q and cu_seq_k with one entry per sequence (the same length), got shapes "
            f"{fmt_shape(cu_seq_q.shape)} and {fmt_shape(cu_seq_k.shape)}"
        )
    _check_max("max_q", max_q, "cu_seq_q", cu_q)
    _check_max("max_k", max_k, "cu_seq_k", cu_k)
    window = _check_window(window_size)

    q, k, v = _heads_first(query), _heads_first(key), _heads_first(value)
    total_q, total_k, device = query.shape[0], key.shape[0], query.device
    # the sequence of each token; sorted, so `Structure` finds each query's key interval by binary search
    q_docs = torch.searchsorted(cu_seq_q[1:], torch.arange(total_q, dtype=torch.int32, device=device), right=True)
    k_docs = torch.searchsorted(cu_seq_k[1:], torch.arange(total_k, dtype=torch.int32, device=device), right=True)
    options = Options(scale=scale, window=window, softcap=softcap)
    inp = validate(
        q, k, v, documents=(q_docs[None], k_docs[None]), sinks=sinks, options=options, names=("query", "key", "value")
    )
    # causal and the window are bottom-right aligned per sequence: query x of sequence s has its diagonal at
    # global key x + (cu_seq_k[s+1] - cu_seq_q[s+1]). Only a window reads it; skipped where it is attend's
    # default diagonal x + (total_k - total_q) for every sequence that has queries.
    shifts = [cu_k[s + 1] - cu_q[s + 1] for s in range(len(cu_q) - 1) if cu_q[s + 1] > cu_q[s]]
    if window is not None and any(shift != total_k - total_q for shift in shifts):
        per_seq = (cu_seq_k[1:] - cu_seq_q[1:]).long()
        q_pos = torch.arange(total_q, device=device) + per_seq[q_docs]
        inp = replace(inp, q_pos=q_pos[None])
    return inp


def _group_heads(t: Tensor, g: int) -> Tensor:
    """(b, h, i, d) -> (b, g, r, i, d), h = g * r: query head x uses key/value head x // r."""
    b, h, i, d = t.shape
    return t.reshape(b, g, h // g, i, d)


def _per_sequence(inp: AttnInputs, cu_q: list[int], cu_k: list[int]) -> Tensor | tuple[Tensor, Tensor]:
    """num_splits=1: every sequence through the dispatcher on its own, so its result is the same bit for bit
    whatever else is in the batch. Returns (1, h, total_q, e), with the log-sum-exp (1, h, total_q) where
    `inp.return_lse`."""
    outs, lses = [], []
    for s in range(len(cu_q) - 1):
        rows, cols = slice(cu_q[s], cu_q[s + 1]), slice(cu_k[s], cu_k[s + 1])
        if rows.stop == rows.start:
            continue
        one = replace(
            inp,
            q=inp.q[:, :, rows],
            k=inp.k[:, :, cols],
            v=inp.v[:, :, cols],
            q_docs=None,
            k_docs=None,
            q_pos=None,
        )
        result = run(one)
        out, lse = result if isinstance(result, tuple) else (result, None)
        outs.append(out)
        lses.append(lse)
    if not outs:  # no query token at all
        return run(inp)
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    if not inp.return_lse:
        return out
    parts = cast(list[Tensor], lses)
    return out, parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


# main function


def varlen_attn(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    cu_seq_q: Tensor,
    cu_seq_k: Tensor | None,
    max_q: int,
    max_k: int,
    *,
    return_aux: AuxRequest | None = None,
    scale: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
    enable_gqa: bool = False,
    seqused_k: Tensor | None = None,
    block_table: Tensor | None = None,
    num_splits: int | None = None,
    sinks: Tensor | None = None,
    softcap: float | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Attention over variable-length sequences packed one after the other: PyTorch 2.13's
    `torch.nn.attention.varlen.varlen_attn`, with its signature and semantics, on every device, with backward.

    Shapes (legend: b batch, h query heads, g key/value heads, i query positions, j key positions, d head dim
    of q and k, e value head dim; here the n sequences are packed into total_q query and total_k key tokens)::

        query (total_q, h, d), key (total_k, g, d), value (total_k, g, e)  ->  out (total_q, h, e), query's dtype
        cu_seq_q, cu_seq_k: int32 (n + 1,), cumulative lengths: sequence s is tokens [cu[s], cu[s + 1])

    Sequence s's queries attend only to sequence s's keys. `window_size=(left, right)`, -1 unbounded, aligned to
    the bottom-right of each sequence as in flash-attn: query x of sequence s, at local index
    x - cu_seq_q[s], has its diagonal at local key p = (x - cu_seq_q[s]) + (Lk - Lq) (Lq, Lk: the sequence's
    lengths) and sees local keys p - left .. p + right. (-1, 0) is causal; (W, 0) causal with a window of W.
    A query that sees no key (Lk = 0, or Lq > Lk under causal) gives 0.

    Args:
        query, key, value: packed tensors (shapes above); float16, bfloat16, float32 or float64.
        cu_seq_q, cu_seq_k: cumulative sequence lengths, int32 (n + 1,) on query's device, starting at 0,
            non-decreasing, ending at total_q and total_k (a length may be 0).
        max_q, max_k: Python ints, at least the longest query and key sequence (PyTorch's kernel sizes its grid
            with them; here they are only checked).
        return_aux: `AuxRequest(lse=True)` also returns the log-sum-exp of the scaled logits over the keys each
            query sees, (h, total_q), float32 (float64 for float64 inputs), -inf for a query that sees no key (with
            sinks, the sink's). It has a gradient (PyTorch's drops it). It comes from the same kernel call as the
            output (`attention(..., return_lse=True)`), so only backends that give it run such a call.
        scale: logit scale, default d ** -0.5.
        window_size: (left, right) as above, each an int >= 0 or -1 (unbounded; another negative raises, as
            only -1 means unbounded in PyTorch's); default (-1, -1), full attention within each sequence.
        enable_gqa: allow g < h key/value heads (h % g == 0; query head x uses key/value head x // (h // g)).
        seqused_k: int32 (n,), inference only: sequence s uses only the first seqused_k[s] keys of its key segment
            (of its pages with block_table); causal and the window align to that length (as in flash-attn).
        block_table: int32 (n, max_pages), inference only, needs seqused_k: key and value are then page pools
            (total_pages, page_size, g, d|e) and sequence s's key t is key[block_table[s, t // page_size],
            t % page_size]; only the pages a sequence uses are read (and must be in [0, total_pages)); cu_seq_k may
            be None (its values are not read). The used keys and values are gathered into a packed copy first (one
            `index_select` each), then run as plain packing. For decoding from a cache, `attend.with_kvcache` reads
            the pages in place.
        sinks: attend's extension: attention sinks (h,), one logit per query head in every row's softmax
            denominator with no value, as in `attention` (gpt-oss).
        softcap: attend's extension: logit soft-capping, `softcap * tanh(s / softcap)`, as in `attention`.
        num_splits: PyTorch's split-KV setting. 1 asks for batch invariance: each sequence then runs through the
            dispatcher on its own (bitwise the same result whatever else is packed with it; slower for many
            short sequences). None or > 1: the packed path (attend's kernels have no split-KV to tune).

    Returns:
        out (total_q, h, e); with `return_aux=AuxRequest(lse=True)`: (out, lse (h, total_q)).

    Raises:
        TypeError, ValueError: bad input, before any kernel runs ("expected X, got Y").
        RuntimeError: seqused_k or block_table with an input that requires grad (inference only, as in PyTorch).

    Example::

        >>> lengths = torch.tensor([5, 1, 17])
        >>> cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)   # [0, 5, 6, 23]
        >>> q = torch.randn(23, 8, 64); k = v = torch.randn(23, 2, 64)
        >>> out = varlen_attn(q, k, v, cu, cu, 17, 17, window_size=(-1, 0), enable_gqa=True)   # (23, 8, 64)
    """
    lse_wanted = _check_extras(return_aux, num_splits)
    query, key, value = autocast_inputs(query, key, value)  # type: ignore[assignment]
    if seqused_k is not None or block_table is not None:
        key, value, cu_seq_k, max_k = _used_keys(query, key, value, cu_seq_q, cu_seq_k, max_k, seqused_k, block_table)
        seqused_k = block_table = None
    inp = _varlen_inputs(
        query,
        key,
        value,
        cu_seq_q,
        cu_seq_k,
        max_q,
        max_k,
        scale=scale,
        window_size=window_size,
        enable_gqa=enable_gqa,
        seqused_k=seqused_k,
        block_table=block_table,
        sinks=sinks,
        softcap=softcap,
    )
    inp = replace(inp, return_lse=lse_wanted)
    if num_splits == 1:
        cu_q, cu_k = cu_seq_q.tolist(), cast(Tensor, cu_seq_k).tolist()  # checked by _varlen_inputs
        result = _per_sequence(inp, cu_q, cu_k)
    else:
        result = run(inp)
    if isinstance(result, tuple):
        return _tokens_first(result[0]), result[1][0]
    return _tokens_first(result)
