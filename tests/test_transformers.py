"""attend as a Hugging Face transformers attention implementation: a tiny randomly initialised Llama
(no download) gives the same logits as attn_implementation="sdpa" on padded batches, and the same greedy
tokens with a KV cache."""

from __future__ import annotations

import copy
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

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
    with pytest.raises(ValueError, match="softcap"):
        attend_hf.attend_attention_forward(module, q, k, v, None, softcap=30.0)


def test_register_without_transformers_raises_a_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'torch-attend\[transformers\]'"):
        attend_hf.register_transformers()
