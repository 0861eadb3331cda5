"""refimpl.pyramidkv: the layer-wise budget schedule (known answers) and the cache in the model."""

from __future__ import annotations

import itertools

import pytest
import torch

from refimpl import DenseCache, LlamaModel, ModelConfig
from refimpl.eviction import MaskedCache, visible_positions
from refimpl.pyramidkv import PyramidKVCache, pyramid_budgets


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def tiny_model(layers: int = 3, seed: int = 0) -> LlamaModel:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = LlamaModel(cfg).eval()
    for layer in model.model.layers:
        layer.self_attn.q_proj.weight.mul_(3.0)
        layer.self_attn.k_proj.weight.mul_(3.0)
    return model


def rand_ids(b: int, t: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 61, (b, t), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------------
# the schedule
# ---------------------------------------------------------------------------------------------------------
def test_hand_examples():
    # k = 32, min = 32 // 4 = 8, max = 56, step = 16  ->  56, 40, 24, 8 (+ window 8)
    assert pyramid_budgets(4, capacity=40, window=8, prompt_len=1000, beta=4) == [64, 48, 32, 16]
    # max = 32 would exceed T - w = 30: clamp max = 30, min = 2k - max = 2, step = 14
    assert pyramid_budgets(3, capacity=20, window=4, prompt_len=34, beta=20) == [34, 20, 6]
    # T < 2k: not enough tokens for a pyramid -> uniform (the official code's fallback)
    assert pyramid_budgets(3, capacity=20, window=4, prompt_len=31) == [20, 20, 20]
    assert pyramid_budgets(1, capacity=20, window=4, prompt_len=500) == [20]


@pytest.mark.parametrize("layers, capacity, window, prompt_len, beta",
                         list(itertools.product([2, 6, 32], [40, 129], [8, 32], [100, 300, 4000], [1, 20])))
def test_budgets_sum_to_uniform_and_never_increase(layers, capacity, window, prompt_len, beta):
    if capacity <= window:
        pytest.skip("capacity must exceed window")
    b = pyramid_budgets(layers, capacity, window, prompt_len, beta)
    assert len(b) == layers
    assert all(x >= y for x, y in itertools.pairwise(b))
    assert all(window <= x for x in b) and max(b) <= max(capacity, prompt_len)
    # with step = (max - min) / (L - 1) exactly, Σ = L (max + min) / 2 + L w = L · capacity; the floor adds
    # r · L / 2 with r = (max - min) mod (L - 1) < L - 1
    excess = sum(b) - layers * capacity
    assert 0 <= excess <= max(0, (layers - 2) * layers // 2)


@pytest.mark.parametrize("kwargs, name", [
    ({"num_layers": 0, "capacity": 20, "window": 4, "prompt_len": 50}, "num_layers"),
    ({"num_layers": 2, "capacity": 4, "window": 4, "prompt_len": 50}, "capacity"),
    ({"num_layers": 2, "capacity": 20, "window": 4, "prompt_len": 50, "beta": 0}, "beta"),
    ({"num_layers": 2, "capacity": 20, "window": 4, "prompt_len": -1}, "prompt_len"),
])
def test_bad_arguments_name_the_parameter(kwargs, name):
    with pytest.raises(ValueError, match=name):
        pyramid_budgets(**kwargs)


def test_cache_rejects_bad_beta():
    with pytest.raises(ValueError, match="beta"):
        PyramidKVCache(2, capacity=20, window=4, beta=-2)


# ---------------------------------------------------------------------------------------------------------
# in the model
# ---------------------------------------------------------------------------------------------------------
def test_short_prompt_is_exactly_full_attention():
    model = tiny_model()
    ids = rand_ids(2, 20)
    c = PyramidKVCache(3, capacity=20, window=4)
    assert torch.equal(model(ids, cache=c).logits, model(ids, cache=DenseCache(3), output_attentions=True).logits)
    assert [c.num_entries(i) for i in range(3)] == [20, 20, 20]


def test_layers_keep_their_budgets_and_match_the_masking_oracle():
    model = tiny_model()
    ids = rand_ids(2, 40)
    t0, budgets = 34, pyramid_budgets(3, capacity=12, window=4, prompt_len=34, beta=20)
    assert budgets == [20, 12, 4]  # k = 8, min = 0, max = 16, step = 8
    c, oracle = PyramidKVCache(3, capacity=12, window=4, kernel_size=3), MaskedCache(3)
    torch.testing.assert_close(model(ids[:, :t0], cache=c).logits, model(ids[:, :t0], cache=oracle).logits,
                               atol=1e-4, rtol=0)
    assert [c.num_entries(i) for i in range(3)] == budgets
    for s in range(t0, 40):
        for layer in range(3):
            oracle.hide(layer, visible_positions(c, layer))
        torch.testing.assert_close(model(ids[:, s:s + 1], cache=c).logits,
                                   model(ids[:, s:s + 1], cache=oracle).logits, atol=1e-4, rtol=0)
    assert [c.num_entries(i) for i in range(3)] == [x + 6 for x in budgets]
    assert c.nbytes() == sum(2 * 2 * 2 * (x + 6) * model.config.head_dim * 4 for x in budgets)


def test_hf_generate_matches_refimpl_generate():
    """Per-layer entry counts differ: transformers' generate needs (and gets) the kvcourse attention."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from refimpl.hf_bridge import cache_kwargs, enable_kvcourse_attention, make_hf_cache

    model = tiny_model()
    hf_cfg = LlamaConfig(**{k: v for k, v in model.config.to_hf().items() if k not in ("architectures", "dtype")})
    hf = LlamaForCausalLM(hf_cfg).eval()
    hf.load_state_dict(model.state_dict(), strict=False)
    hf.tie_weights()
    enable_kvcourse_attention(hf)
    ids = rand_ids(2, 34)
    policy = PyramidKVCache(3, capacity=12, window=4, kernel_size=3)
    got = hf.generate(ids, **cache_kwargs(hf, make_hf_cache(policy)), max_new_tokens=5, do_sample=False,
                      pad_token_id=0)[:, 34:]
    ours = PyramidKVCache(3, capacity=12, window=4, kernel_size=3)
    assert torch.equal(got, model.generate(ids, max_new_tokens=5, cache=ours))
    # the last generated token is returned, not fed back: 4 decoded entries per layer
    assert [policy.num_entries(i) for i in range(3)] == [20 + 4, 12 + 4, 4 + 4]
    assert [ours.num_entries(i) for i in range(3)] == [20 + 4, 12 + 4, 4 + 4]
    for layer, budget in enumerate([20, 12, 4]):  # the window (30..33) and the decoded tokens, in every head
        assert bool((policy.kept_positions(layer)[..., budget - 4:] == torch.arange(30, 38)).all())
    # (which prefix positions win can differ between the two models: their probabilities differ by ~1e-7 and
    # max-pooling makes exact ties, so the comparison of selections is done against refimpl's own oracle above)
