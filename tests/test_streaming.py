"""refimpl.streaming: attention sinks + recent window — rule, real removal, positions, padding, HF generate."""

from __future__ import annotations

import pytest
import torch

from refimpl import DenseCache, LlamaModel, ModelConfig
from refimpl.eviction import MaskedCache
from refimpl.streaming import StreamingLLMCache, streaming_keep_mask


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def tiny_model(heads: int = 4, kv_heads: int = 2, seed: int = 0) -> LlamaModel:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256)
    return LlamaModel(cfg).eval()


def rand_ids(b: int, t: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 61, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kwargs, name", [
    ({"sink_tokens": -1, "recent_tokens": 8}, "sink_tokens"),
    ({"sink_tokens": 4, "recent_tokens": 0}, "recent_tokens"),
    ({"sink_tokens": 4, "recent_tokens": "8"}, "recent_tokens"),
])
def test_bad_arguments_name_the_parameter(kwargs, name):
    with pytest.raises(ValueError, match=name):
        StreamingLLMCache(num_layers=1, **kwargs)


def test_keep_mask_sinks_are_first_real_tokens():
    valid = torch.tensor([[True] * 8, [False, False, False] + [True] * 5])
    pos = torch.arange(8, dtype=torch.int32).expand(2, 8)
    keep = streaming_keep_mask(valid, pos, seen=8, sink_tokens=2, recent_tokens=3)
    assert keep[0].nonzero().flatten().tolist() == [0, 1, 5, 6, 7]
    assert keep[1].nonzero().flatten().tolist() == [3, 4, 5, 6, 7]


def test_budget_at_least_length_is_exactly_full_attention():
    model = tiny_model()
    ids = rand_ids(2, 30)
    assert torch.equal(model.generate(ids, 6, cache=StreamingLLMCache(2, 4, 64)),
                       model.generate(ids, 6, cache=DenseCache(2)))
    dense, c = DenseCache(2), StreamingLLMCache(2, 4, 64)
    assert torch.equal(model(ids, cache=dense).logits, model(ids, cache=c).logits)
    assert c.num_entries(0) == 30


@pytest.mark.parametrize("sinks, recent", [(4, 6), (0, 5), (2, 1)])
def test_decoding_matches_sink_plus_window_mask(sinks, recent):
    """Every decoding step attends to exactly the sinks + the last ``recent`` positions (the new one included)."""
    model = tiny_model()
    ids = rand_ids(2, 32)
    c, oracle = StreamingLLMCache(2, sinks, recent), MaskedCache(2)
    # the prompt is attended in full (causal prefill), then trimmed
    torch.testing.assert_close(model(ids[:, :20], cache=c).logits, model(ids[:, :20], cache=oracle).logits,
                               atol=1e-5, rtol=0)
    assert c.num_entries(0) == sinks + recent and c.seq_length(0) == 20
    for s in range(20, 32):  # the step feeds position s
        pos = torch.arange(s)
        for layer in range(2):
            oracle.hide(layer, ((pos < sinks) | (pos >= s + 1 - recent)).expand(2, 2, s))
        a = model(ids[:, s:s + 1], cache=c).logits
        b = model(ids[:, s:s + 1], cache=oracle).logits
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)  # also proves positions continue from s, not from N
        assert c.num_entries(1) == sinks + recent
        assert c.kept_positions(1)[0, 0].tolist() == list(range(sinks)) + list(range(s + 1 - recent, s + 1))
    assert c.nbytes() == 2 * 2 * 2 * 2 * (sinks + recent) * model.config.head_dim * 4


def test_padded_batch_row_equals_the_row_alone():
    model = tiny_model()
    ids = rand_ids(2, 30)
    am = torch.ones(2, 30, dtype=torch.long)
    am[1, :8] = 0
    batched, alone = StreamingLLMCache(2, 3, 6), StreamingLLMCache(2, 3, 6)
    out_b = model.generate(ids, max_new_tokens=6, cache=batched, attention_mask=am)
    out_a = model.generate(ids[1:, 8:], max_new_tokens=6, cache=alone)
    assert torch.equal(out_b[1], out_a[0])
    kept_b = batched.kept_positions(0)[1]
    assert torch.equal(kept_b[kept_b >= 0] - 8, alone.kept_positions(0)[0, 0].repeat(2))
    assert kept_b[0, :3].tolist() == [8, 9, 10]  # the sinks are row 1's first *real* tokens


def test_hf_generate_matches_refimpl_generate():
    from transformers import LlamaConfig, LlamaForCausalLM

    from refimpl.hf_bridge import cache_kwargs, enable_kvcourse_attention, make_hf_cache

    model = tiny_model()
    hf_cfg = LlamaConfig(**{k: v for k, v in model.config.to_hf().items() if k not in ("architectures", "dtype")})
    hf = LlamaForCausalLM(hf_cfg).eval()
    hf.load_state_dict(model.state_dict(), strict=False)
    hf.tie_weights()
    enable_kvcourse_attention(hf)  # the policy drops entries inside update: needs the kvcourse attention
    ids = rand_ids(2, 24)
    policy = StreamingLLMCache(2, 2, 7)
    got = hf.generate(ids, **cache_kwargs(hf, make_hf_cache(policy)), max_new_tokens=8, do_sample=False,
                      pad_token_id=0)[:, 24:]
    assert torch.equal(got, model.generate(ids, max_new_tokens=8, cache=StreamingLLMCache(2, 2, 7)))
    assert policy.num_entries(0) == 9 and policy.seq_length(0) == 31
