"""attend as a Hugging Face transformers attention implementation: a tiny randomly initialised Llama
(no download) gives the same logits as attn_implementation="sdpa" on padded batches, and the same greedy
tokens with a KV cache, dynamic or static (`cache_implementation="static"`)."""

from __future__ import annotations

import copy
import sys

import pytest
import torch

from .helpers import transformers_or_skip

transformers = transformers_or_skip()

import attend.integrations.transformers as attend_hf  # noqa: E402
from attend.testing import tolerance  # noqa: E402

B, N = 3, 10  # batch, tokens


@pytest.fixture(scope="module")
def models():
    from transformers import LlamaConfig, LlamaForCausalLM

    attend_hf.register_transformers()
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query: h / g = 2
        vocab_size=128,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    # one config each: `_from_config` writes the implementation into the config it is given
    ref = LlamaForCausalLM._from_config(copy.deepcopy(cfg), attn_implementation="sdpa").eval()
    ours = LlamaForCausalLM._from_config(copy.deepcopy(cfg), attn_implementation="attend").eval()
    ours.load_state_dict(ref.state_dict())
    assert (ref.config._attn_implementation, ours.config._attn_implementation) == ("sdpa", "attend")
    return ref, ours


@pytest.fixture
def calls(monkeypatch):
    """Record the shapes/dtypes of what transformers hands to attend, proving our function ran."""
    seen = []
    real = attend_hf.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        seen.append((tuple(q.shape), tuple(k.shape), None if attn_mask is None else attn_mask.dtype, kw["is_causal"]))
        return real(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(attend_hf, "scaled_dot_product_attention", spy)
    return seen


def _batch(padding: str):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 128, (B, N), generator=gen)
    am = torch.ones(B, N, dtype=torch.long)
    if padding == "left":
        am[1, :4] = 0
        am[2, :1] = 0
    elif padding == "right":
        am[1, 6:] = 0
        am[2, 9:] = 0
    return ids, am


@pytest.mark.parametrize("padding", ["none", "left", "right"])
def test_logits_match_sdpa(models, calls, padding):
    ref, ours = models
    ids, am = _batch(padding)
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=am).logits
        got = ours(input_ids=ids, attention_mask=am).logits
    torch.testing.assert_close(got, expected, **tolerance(got.dtype))
    assert len(calls) == 2  # one per layer
    q_shape, k_shape, mask_dtype, is_causal = calls[0]
    assert k_shape[1] == 2 and q_shape[1] == 4  # k/v arrive with g heads: never repeated to h
    if padding == "none":
        assert mask_dtype is None and is_causal  # no mask tensor: causal by the flag
    else:
        assert mask_dtype == torch.bool and not is_causal  # the sdpa mask builder ran for "attend"


def test_padding_is_honoured(models):
    """Padding changes the valid positions' logits neither for sdpa nor for attend (right padding)."""
    _, ours = models
    ids, am = _batch("right")
    with torch.no_grad():
        padded = ours(input_ids=ids, attention_mask=am).logits
        alone = ours(input_ids=ids[1:2, :6]).logits
    torch.testing.assert_close(padded[1:2, :6], alone, **tolerance(alone.dtype))


def test_greedy_generation_with_kv_cache_matches_sdpa(models, calls):
    ref, ours = models
    ids, am = _batch("left")
    kw = dict(attention_mask=am, max_new_tokens=8, do_sample=False, pad_token_id=0)
    expected = ref.generate(input_ids=ids, **kw)
    got = ours.generate(input_ids=ids, **kw)
    assert torch.equal(got, expected)
    assert any(q[2] == 1 and k[2] > 1 for q, k, _, _ in calls)  # decoding steps against the cache ran through attend


@pytest.mark.parametrize("rows", [2, 1], ids=["b2-left-padded", "b1"])
def test_greedy_generation_with_static_cache_matches_sdpa(models, calls, rows):
    """cache_implementation="static": transformers preallocates (b, g, max_cache_len, d) key/value buffers,
    writes each step's keys into them in place (`StaticLayer.update`, index_copy_ at the fill length) and hands
    the attention function the whole buffers every call. Prefill: q (b, h, n, d) against (b, g, max_cache_len, d)
    with a bool (b, 1, n, max_cache_len) mask (None and upper-left `is_causal` for an unpadded b == 1 prompt,
    which hides the empty slots); decoding: q (b, h, 1, d) with a bool (b, 1, 1, max_cache_len) mask, True on
    the filled, non-padding slots. Same tokens and per-step logits as sdpa, left padding included."""
    ref, ours = models
    ids, am = _batch("left")
    ids, am = ids[:rows], am[:rows]  # b2: row 1 has 4 pads on the left
    new = 12
    # min_new_tokens: a random model may emit eos at once, and every row must decode all 12 steps
    kw = dict(
        max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0, cache_implementation="static",
        output_logits=True, return_dict_in_generate=True,
    )  # fmt: skip
    if rows == 2:
        kw["attention_mask"] = am
    expected = ref.generate(input_ids=ids, **kw)
    calls.clear()
    got = ours.generate(input_ids=ids, **kw)
    assert got.sequences.shape == (rows, N + new) and torch.equal(got.sequences, expected.sequences)
    assert len(got.logits) == new
    for step, (a, b) in enumerate(zip(got.logits, expected.logits)):
        torch.testing.assert_close(a, b, **tolerance(a.dtype), msg=f"step {step}")
    # every call saw the whole static buffer: one key length, at least prompt + new - 1 slots
    key_lengths = {k[2] for _, k, _, _ in calls}
    assert len(key_lengths) == 1 and key_lengths.pop() >= N + new - 1
    decode = [(q, k, m, c) for q, k, m, c in calls if q[2] == 1]
    assert len(decode) == 2 * (new - 1)  # two layers, every step after the prefill
    assert all(k[1] == 2 and m == torch.bool and not c for _, k, m, c in decode)  # g heads, a bool mask


def test_forward_signature_and_layout():
    """The function alone: (b, h, i, d) in, (b, i, h, e) out, no weights; upper-left is_causal like sdpa."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = torch.nn.Module()
    module.is_causal = True
    module.num_key_value_groups = 2
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    out, weights = attend_hf.attend_attention_forward(module, q, k, v, None, scaling=0.5)
    expected, _ = sdpa_attention_forward(module, q, k, v, None, scaling=0.5)
    assert weights is None and out.shape == (2, 5, 4, 8) and out.is_contiguous()
    torch.testing.assert_close(out, expected)
    mask = torch.randn(2, 1, 5, 5)
    torch.testing.assert_close(
        attend_hf.attend_attention_forward(module, q, k, v, mask)[0], sdpa_attention_forward(module, q, k, v, mask)[0]
    )
    position_bias = torch.randn(1, 4, 5, 5)  # T5-style learned bias, causal and with a mask
    for m in (None, mask):
        torch.testing.assert_close(
            attend_hf.attend_attention_forward(module, q, k, v, m, position_bias=position_bias)[0],
            sdpa_attention_forward(module, q, k, v, m, position_bias=position_bias)[0],
        )
    # softcap (Gemma 2) and s_aux (gpt-oss's sinks), which sdpa cannot run, go through attend.attention
    from attend import attention

    sinks = torch.randn(4)
    got = attend_hf.attend_attention_forward(module, q, k, v, None, scaling=0.5, softcap=3.0, s_aux=sinks)[0]
    want = attention(q, k, v, causal=True, scale=0.5, softcap=3.0, sinks=sinks, backend="einsum")
    torch.testing.assert_close(got, want.transpose(1, 2))


def test_register_without_transformers_raises_a_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'torch-attend\[transformers\]'"):
        attend_hf.register_transformers()


# packed (padding-free) batches: DataCollatorWithFlattening

LENGTHS = (7, 12, 4)  # three sequences of different lengths


def _sequences():
    gen = torch.Generator().manual_seed(2)
    return [torch.randint(3, 128, (n,), generator=gen) for n in LENGTHS]


def _loss_and_grads(model, **batch):
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def _padded_reference(ref, device):
    """The same sequences right-padded, through transformers' sdpa: the loss and every parameter's gradient.
    Labels are the tokens with -100 on padding and on each sequence's first token, as the flattening collator
    sets them, so both losses average over the same next-token targets (sum(n - 1) of them)."""
    seqs = _sequences()
    ids = torch.zeros(len(seqs), max(LENGTHS), dtype=torch.long)
    am = torch.zeros_like(ids)
    for r, s in enumerate(seqs):
        ids[r, : len(s)], am[r, : len(s)] = s, 1
    labels = ids.masked_fill(am == 0, -100)
    labels[:, 0] = -100
    batch = dict(input_ids=ids, attention_mask=am, labels=labels)
    return _loss_and_grads(ref, **{k: v.to(device) for k, v in batch.items()})


@pytest.fixture
def packed_calls(monkeypatch):
    """Record how attend is called: the packed path must reach `attention` with documents (and no mask)."""
    seen = {"attention": [], "sdpa": 0}
    real = attend_hf.attention

    def spy(q, k, v, **kw):
        seen["attention"].append(kw)
        return real(q, k, v, **kw)

    def no_sdpa(*args, **kw):
        seen["sdpa"] += 1
        return real_sdpa(*args, **kw)

    real_sdpa = attend_hf.scaled_dot_product_attention
    monkeypatch.setattr(attend_hf, "attention", spy)
    monkeypatch.setattr(attend_hf, "scaled_dot_product_attention", no_sdpa)
    return seen


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none here)")
        ),
    ],
)
@pytest.mark.parametrize("flash_kwargs", [False, True], ids=["position_ids", "cu_seq_lens"])
@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no_cache"])
def test_packed_batch_matches_padded_sdpa(models, packed_calls, device, flash_kwargs, use_cache):
    """DataCollatorWithFlattening's (1, total) batch through attend: the loss and every gradient of the same
    sequences padded through sdpa. use_cache=True (the config default): transformers builds no mask (it looks
    for packing only without a cache); use_cache=False: it builds the block-diagonal mask, which attend drops."""
    from transformers import DataCollatorWithFlattening

    ref, ours = (copy.deepcopy(m).to(device).train() for m in models)
    expected_loss, expected_grads = _padded_reference(ref, device)

    collate = DataCollatorWithFlattening(return_flash_attn_kwargs=flash_kwargs)
    batch = collate([{"input_ids": s.tolist()} for s in _sequences()])
    assert batch["input_ids"].shape == (1, sum(LENGTHS))
    assert ("cu_seq_lens_q" in batch) == flash_kwargs
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    assert int((batch["labels"] != -100).sum()) == sum(n - 1 for n in LENGTHS)
    loss, grads = _loss_and_grads(ours, **batch, use_cache=use_cache)

    torch.testing.assert_close(loss, expected_loss, **tolerance(torch.float32))
    assert grads.keys() == expected_grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, expected_grads[name], **tolerance(torch.float32), msg=name)
    # attend ran the packed path in both layers: documents, causal, no (i, j) mask, never the sdpa shim
    assert packed_calls["sdpa"] == 0 and len(packed_calls["attention"]) == 2
    for kw in packed_calls["attention"]:
        assert kw["causal"] and kw["mask"] is None and kw["bias"] is None
        docs = kw["documents"]
        assert docs.shape == (1, sum(LENGTHS))
        assert docs[0].tolist() == [d for d, n in enumerate(LENGTHS) for _ in range(n)]


def _packed_qkv():
    torch.manual_seed(3)
    module = torch.nn.Module()
    module.is_causal = True
    module.num_key_value_groups = 2
    n = sum(LENGTHS)
    q, k, v = torch.randn(1, 4, n, 8), torch.randn(1, 2, n, 8), torch.randn(1, 2, n, 8)
    position_ids = torch.cat([torch.arange(m) for m in LENGTHS])[None]
    docs = torch.repeat_interleave(torch.arange(len(LENGTHS)), torch.tensor(LENGTHS))
    same_doc = (docs[:, None] == docs[None, :])[None, None]
    return module, q, k, v, position_ids, same_doc


def test_packed_with_another_mask_keeps_it(packed_calls):
    """A mask built for a reason of its own (here a sliding window of 3, without the documents, as with a cache)
    is kept and restricted to each sequence: sdpa with (window AND same document) is the reference."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module, q, k, v, position_ids, same_doc = _packed_qkv()
    n = q.shape[2]
    window = torch.ones(n, n, dtype=torch.bool).tril() & ~torch.ones(n, n, dtype=torch.bool).tril(-3)
    window = window[None, None]
    got, _ = attend_hf.attend_attention_forward(module, q, k, v, window, position_ids=position_ids)
    expected, _ = sdpa_attention_forward(module, q, k, v, window & same_doc)
    torch.testing.assert_close(got, expected, **tolerance(got.dtype))
    (kw,) = packed_calls["attention"]
    assert kw["mask"] is window and not kw["causal"] and kw["documents"] is not None
    # the mask transformers builds from the packing itself is dropped: the documents and causal say the same
    packed_calls["attention"].clear()
    causal_docs = torch.ones(n, n, dtype=torch.bool).tril() & same_doc
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
    got, _ = attend_hf.attend_attention_forward(module, q, k, v, causal_docs, cu_seq_lens_q=cu, cu_seq_lens_k=cu)
    torch.testing.assert_close(got, sdpa_attention_forward(module, q, k, v, causal_docs)[0], **tolerance(got.dtype))
    (kw,) = packed_calls["attention"]
    assert kw["mask"] is None and kw["causal"]


def test_unpacked_calls_keep_the_sdpa_path(packed_calls):
    """One sequence (positions 0..n-1), b > 1, decoding against cached keys (i != j), and a padded prompt (its
    position_ids restart at the pads, as generate makes them) never take the packed path."""
    module, q, k, v, position_ids, _ = _packed_qkv()
    n = q.shape[2]
    attend_hf.attend_attention_forward(module, q, k, v, None, position_ids=torch.arange(n)[None])
    attend_hf.attend_attention_forward(module, q.expand(2, -1, -1, -1), k, v, None, position_ids=position_ids)
    attend_hf.attend_attention_forward(module, q[:, :, -1:], k, v, None, position_ids=position_ids[:, -1:])
    left_padded = torch.cat([torch.ones(3, dtype=torch.long), torch.arange(n - 3)])[None]  # 1, 1, 1, 0, 1, ...
    keep = torch.ones(n, n, dtype=torch.bool).tril()
    keep[:, :3] = False  # the 3 pad keys: no query sees them
    attend_hf.attend_attention_forward(module, q, k, v, keep[None, None], position_ids=left_padded)
    assert packed_calls["sdpa"] == 4 and packed_calls["attention"] == []


def test_malformed_cu_seq_lens_raise():
    module, q, k, v, _, _ = _packed_qkv()
    n = q.shape[2]
    cu = torch.tensor([0, 7, n], dtype=torch.int32)
    with pytest.raises(ValueError, match="both `cu_seq_lens_q` and `cu_seq_lens_k`"):
        attend_hf.attend_attention_forward(module, q, k, v, None, cu_seq_lens_q=cu)
    with pytest.raises(ValueError, match=r"b == 1"):
        kk, vv = k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1)
        attend_hf.attend_attention_forward(
            module, q.expand(2, -1, -1, -1), kk, vv, None, cu_seq_lens_q=cu, cu_seq_lens_k=cu
        )
    short = torch.tensor([0, 7, n - 1], dtype=torch.int32)
    with pytest.raises(ValueError, match="cumulative sequence lengths"):
        attend_hf.attend_attention_forward(module, q, k, v, None, cu_seq_lens_q=short, cu_seq_lens_k=short)
    other = torch.tensor([0, 5, n], dtype=torch.int32)
    with pytest.raises(ValueError, match="same sequence boundaries"):
        attend_hf.attend_attention_forward(module, q, k, v, None, cu_seq_lens_q=cu, cu_seq_lens_k=other)
