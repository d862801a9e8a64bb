"""Gemma 2 (logit soft-capping + sliding window + GQA) and gpt-oss (attention sinks + sliding window + GQA) with
attn_implementation="attend": tiny randomly initialised models (no download) match attn_implementation="eager"
(float32) on padded batches, forward and a training step's gradients, and greedy `generate` with a cache; the
calls go through attend's vocabulary (softcap, sinks), never eager's (i, j) formula."""

from __future__ import annotations

import copy

import pytest
import torch

from .helpers import transformers_or_skip

transformers = transformers_or_skip()

import attend.integrations.transformers as attend_hf  # noqa: E402

B, N = 3, 12


def _gemma2():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = Gemma2Config(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=4, attn_logit_softcapping=2.0,
        final_logit_softcapping=30.0, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    return cfg, Gemma2ForCausalLM


def _gpt_oss():
    from transformers import GptOssConfig, GptOssForCausalLM

    cfg = GptOssConfig(
        vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=4, num_local_experts=4, num_experts_per_tok=2,
        layer_types=["sliding_attention", "full_attention"], max_position_embeddings=64, pad_token_id=0,
        bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    return cfg, GptOssForCausalLM


MODELS = {"gemma2": _gemma2, "gpt-oss": _gpt_oss}


@pytest.fixture(scope="module", params=list(MODELS))
def pair(request):
    attend_hf.register_transformers()
    cfg, cls = MODELS[request.param]()
    torch.manual_seed(0)
    ref = cls._from_config(copy.deepcopy(cfg), attn_implementation="eager").eval()
    ours = cls._from_config(copy.deepcopy(cfg), attn_implementation="attend").eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("sinks"):  # gpt-oss initialises them to zeros: make them matter
                p.normal_(0.0, 1.0)
    ours.load_state_dict(ref.state_dict())
    return request.param, ref, ours


@pytest.fixture
def vocabulary_calls(monkeypatch):
    """Every attend call made with softcap or sinks (proof that the model ran through attend's vocabulary)."""
    seen = []
    real = attend_hf.attention

    def spy(*args, **kwargs):
        seen.append((kwargs.get("softcap"), None if kwargs.get("sinks") is None else tuple(kwargs["sinks"].shape)))
        return real(*args, **kwargs)

    monkeypatch.setattr(attend_hf, "attention", spy)
    return seen


def _batch():
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 128, (B, N), generator=gen)
    am = torch.ones(B, N, dtype=torch.long)
    am[1, :5] = 0  # left padding
    am[2, :2] = 0
    return ids, am


def test_logits_match_eager(pair, vocabulary_calls):
    name, ref, ours = pair
    ids, am = _batch()
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=am).logits
        got = ours(input_ids=ids, attention_mask=am).logits
    keep = am.bool()
    torch.testing.assert_close(got[keep], want[keep], rtol=1e-5, atol=1e-5)
    assert vocabulary_calls, "no call went through attend's softcap/sinks path"
    if name == "gemma2":
        assert all(cap == 2.0 for cap, _ in vocabulary_calls)
    else:
        assert all(shape == (4,) for _, shape in vocabulary_calls)


def test_training_step_gradients_match_eager(pair):
    _, ref, ours = pair
    ids, am = _batch()
    labels = ids.masked_fill(am == 0, -100)
    # no loss on a prediction made at a padded position (the first real token after left padding): a query
    # row there sees no key, which eager fills with an average of the padding's values and attend with 0
    labels[:, 1:] = labels[:, 1:].masked_fill(am[:, :-1] == 0, -100)
    grads = []
    for model in (ref, ours):
        model.zero_grad()
        model.train()
        try:
            model(input_ids=ids, attention_mask=am, labels=labels).loss.backward()
        finally:
            model.eval()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-4, atol=1e-5, msg=lambda m, n=n: f"{n}: {m}")


def test_greedy_generate_with_cache_matches_eager(pair, vocabulary_calls):
    _, ref, ours = pair
    ids, am = _batch()
    kw = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        want = ref.generate(input_ids=ids, attention_mask=am, **kw)
        got = ours.generate(input_ids=ids, attention_mask=am, **kw)
    assert torch.equal(got, want)
    assert any(True for _ in vocabulary_calls)


@pytest.mark.parametrize("flash_kwargs", [False, True], ids=["position_ids", "cu_seq_lens"])
def test_padding_free_packing_matches_eager_per_sequence(pair, vocabulary_calls, flash_kwargs):
    """DataCollatorWithFlattening's (1, total) batch through attend (documents + softcap or sinks): each
    sequence's logits equal eager's on that sequence alone, and the loss and gradients those of the sequences
    run one by one through eager (use_cache=False: the mask transformers builds for the packing is dropped)."""
    from transformers import DataCollatorWithFlattening

    name, ref, ours = pair
    lengths = (7, 4, 9)
    gen = torch.Generator().manual_seed(5)
    seqs = [torch.randint(3, 128, (n,), generator=gen) for n in lengths]
    batch = DataCollatorWithFlattening(return_flash_attn_kwargs=flash_kwargs)([{"input_ids": s.tolist()} for s in seqs])
    with torch.no_grad():
        got = ours(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits[0]
        want = torch.cat([ref(input_ids=s[None], use_cache=False).logits[0] for s in seqs])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert vocabulary_calls
