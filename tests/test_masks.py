"""Lowering, not densifying: what the SDPA backends actually hand to the kernel."""

from __future__ import annotations

import torch

from attend import attention
from attend.inputs import validate
from attend.masks import causal_keep, dead_rows, sdpa_attn_mask

from .helpers import make_qkv, needs, spy_sdpa


@needs("sdpa_zero_dead_rows")  # without it, rows with no key are un-masked: a copy
def test_key_padding_stays_a_broadcast_view(monkeypatch):
    q, k, v = make_qkv(b=2, h=4, g=2, i=16, j=24)
    pad = torch.ones(2, 24, dtype=torch.bool)
    with spy_sdpa(monkeypatch) as calls:
        attention(q, k, v, mask=pad, backend="sdpa:flash")
    (call,) = calls
    assert call["attn_mask"].shape == (2, 1, 1, 24)
    assert call["attn_mask"].data_ptr() == pad.data_ptr(), "the user's mask, not a copy"
    assert call["kwargs"] == {"enable_gqa": True} and call["k"] == (2, 2, 24, 32), "k/v not copied to h heads"


def test_square_causal_uses_is_causal(monkeypatch):
    q, k, v = make_qkv(i=24, j=24)
    with spy_sdpa(monkeypatch) as calls:
        attention(q, k, v, causal=True, backend="sdpa:flash")
    assert [(c["attn_mask"], c["is_causal"]) for c in calls] == [(None, True)]


@needs("sdpa_zero_dead_rows")  # without it, rows with no key are un-masked: a copy
def test_unaligned_causal_uses_shared_tiles_per_query_block(monkeypatch):
    from attend.backends.sdpa import SdpaFlash

    monkeypatch.setattr(SdpaFlash, "query_block", 8)
    q, k, v = make_qkv(b=2, h=4, g=2, i=20, j=30)
    with spy_sdpa(monkeypatch) as calls:
        out = attention(q, k, v, causal=True, backend="sdpa:flash")
    # blocks of 8 queries, each against only the keys it can see (j - i = 10 keys of history)
    assert [c["q"][2] for c in calls] == [8, 8, 4]
    assert [c["k"][2] for c in calls] == [18, 26, 30]
    assert all(c["attn_mask"].dim() == 2 for c in calls), "one (rows, cols) tile shared by every batch and head"
    torch.testing.assert_close(out, attention(q, k, v, causal=True, backend="einsum"))


def test_causal_plus_padding_never_builds_per_head_mask(monkeypatch):
    q, k, v = make_qkv(b=2, h=4, g=2, i=40, j=40)
    pad = torch.ones(2, 40, dtype=torch.bool)
    pad[1, 30:] = False
    with spy_sdpa(monkeypatch) as calls:
        attention(q, k, v, mask=pad, causal=True, backend="sdpa:flash")
    assert all(c["attn_mask"].shape[1] == 1 for c in calls), "no h dim in the lowered mask"


def test_bias_with_mask_is_one_float_tensor_with_neg_inf():
    q, k, v = make_qkv(b=2, h=4, g=2, i=8, j=8)
    pad = torch.ones(2, 8, dtype=torch.bool)
    pad[0, -1] = False
    bias = torch.randn(1, 4, 8, 8)
    lowered = sdpa_attn_mask(validate(q, k, v, mask=pad, bias=bias))
    assert lowered.dtype == torch.float32 and lowered.shape == (2, 4, 8, 8)
    assert torch.isneginf(lowered[0, :, :, -1]).all() and torch.isfinite(lowered[1]).all()


def test_causal_keep_picture():
    assert causal_keep(2, 5, torch.device("cpu")).int().tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert causal_keep(4, 2, torch.device("cpu")).int().tolist() == [[0, 0], [0, 0], [1, 0], [1, 1]]


def test_dead_rows():
    q, k, v = make_qkv(b=1, h=1, g=1, i=4, j=2)
    assert dead_rows(validate(q, k, v, causal=True)).flatten().tolist() == [True, True, False, False]
    assert dead_rows(validate(q, k, v)) is None
