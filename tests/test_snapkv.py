"""refimpl.snapkv: window votes, pooling, per-head top-k, the window kept, positions after eviction, HF generate."""

from __future__ import annotations

import math

import pytest
import torch

from refimpl import DenseCache, LlamaModel, ModelConfig
from refimpl.eviction import MaskedCache, visible_positions
from refimpl.snapkv import SnapKVCache, pool_votes, snapkv_keep_mask, votes_from_probs, window_votes


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def tiny_model(heads: int = 4, kv_heads: int = 2, seed: int = 0) -> LlamaModel:
    """Random weights, q/k scaled ×3 so attention is peaked and heads disagree."""
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256)
    model = LlamaModel(cfg).eval()
    for layer in model.model.layers:
        layer.self_attn.q_proj.weight.mul_(3.0)
        layer.self_attn.k_proj.weight.mul_(3.0)
    return model


def rand_ids(b: int, t: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 61, (b, t), generator=torch.Generator().manual_seed(seed))


def replay(model, policy, ids, t0, attention_mask=None):
    """Prefill ids[:, :t0], then teacher-force the rest through ``policy`` and the masked oracle."""
    oracle = MaskedCache(model.config.num_hidden_layers)
    am = None if attention_mask is None else attention_mask[:, :t0]
    worst = (model(ids[:, :t0], attention_mask=am, cache=policy).logits
             - model(ids[:, :t0], attention_mask=am, cache=oracle).logits).abs().max().item()
    for s in range(t0, ids.shape[1]):
        for layer in range(model.config.num_hidden_layers):
            oracle.hide(layer, visible_positions(policy, layer))
        am = None if attention_mask is None else attention_mask[:, : s + 1]
        a = model(ids[:, s:s + 1], attention_mask=am, cache=policy).logits
        b = model(ids[:, s:s + 1], attention_mask=am, cache=oracle).logits
        worst = max(worst, (a - b).abs().max().item())
    return worst


# ---------------------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, name", [
    ({"capacity": 8, "window": 8}, "capacity must be > window"),
    ({"capacity": 8, "window": 0}, "window"),
    ({"capacity": -1, "window": 4}, "capacity"),
    ({"capacity": 16, "window": 4, "kernel_size": 4}, "kernel_size must be odd"),
    ({"capacity": 16, "window": 4, "kernel_size": 0}, "kernel_size"),
    ({"capacity": 16, "window": 4, "pooling": "median"}, "pooling"),
    ({"capacity": 16, "window": 4, "gqa_reduce": "sum"}, "gqa_reduce"),
])
def test_bad_arguments_name_the_parameter(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SnapKVCache(num_layers=1, **kwargs)


# ---------------------------------------------------------------------------------------------------------
# the scoring pieces
# ---------------------------------------------------------------------------------------------------------
def naive_votes(q_win, k, key_mask):
    """Row by row, head by head, as eqs. (1)-(2) read."""
    b, h_q, w, d = q_win.shape
    h_kv, t = k.shape[1], k.shape[2]
    out = torch.zeros(b, h_q, t - w)
    for bi in range(b):
        for h in range(h_q):
            kh = k[bi, h // (h_q // h_kv)]
            for i in range(w):
                n = t - w + i + 1  # keys visible to window query i
                s = (kh[:n] @ q_win[bi, h, i]) / math.sqrt(d)
                s = s.masked_fill(~key_mask[bi, h // (h_q // h_kv), :n], float("-inf"))
                out[bi, h] += torch.softmax(s, 0)[: t - w]
    return out


def test_window_votes_match_naive_loop_and_model_probs():
    g = torch.Generator().manual_seed(0)
    b, h_q, h_kv, t, w, d = 2, 4, 2, 13, 4, 8
    q = torch.randn(b, h_q, t, d, generator=g)
    k = torch.randn(b, h_kv, t, d, generator=g)
    mask = torch.ones(b, h_kv, t, dtype=torch.bool)
    mask[1, :, :3] = False  # left padding of row 1
    got = window_votes(q[:, :, -w:], k, mask)
    torch.testing.assert_close(got, naive_votes(q[:, :, -w:], k, mask))
    # the same votes from full causal probabilities (what the model hands to observe)
    s = torch.einsum("bhtd,bhsd->bhts", q, k.repeat_interleave(2, 1)) / math.sqrt(d)
    allowed = torch.ones(t, t, dtype=torch.bool).tril() & mask.repeat_interleave(2, 1)[:, :, None, :]
    probs = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1)
    torch.testing.assert_close(votes_from_probs(probs[:, :, -w:]), got)


def test_pooling_keeps_length_and_spreads_a_peak():
    votes = torch.zeros(1, 1, 9)
    votes[0, 0, 4] = 7.0
    assert pool_votes(votes, 3, "maxpool").flatten().tolist() == [0, 0, 0, 7, 7, 7, 0, 0, 0]
    torch.testing.assert_close(pool_votes(votes, 7, "avgpool").flatten()[1:8], torch.ones(7))
    assert torch.equal(pool_votes(votes, 5, "none"), votes)


def test_planted_key_and_its_neighbours_are_kept_in_every_head():
    """Key j aligned with every window query: j and j ± kernel//2 survive in every KV head."""
    g = torch.Generator().manual_seed(0)
    b, h_q, h_kv, t, w, d, j = 2, 4, 2, 40, 4, 16, 17
    q = torch.randn(b, h_q, t, d, generator=g)
    k = torch.randn(b, h_kv, t, d, generator=g)
    k[:, :, j] = 4.0 * q[:, :, -w:].reshape(b, h_kv, -1, d).mean(2)  # one direction shared by the group
    c = SnapKVCache(1, capacity=12, window=w, kernel_size=5, pooling="maxpool")
    c.update(0, k, torch.randn(b, h_kv, t, d, generator=g))
    s = torch.einsum("bhtd,bhsd->bhts", q, k.repeat_interleave(2, 1)) / math.sqrt(d)
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    c.observe(0, torch.softmax(s.masked_fill(~causal, float("-inf")), -1))
    kept = c.kept_positions(0)
    for pos in range(j - 2, j + 3):
        assert bool((kept == pos).any(-1).all()), f"position {pos} was evicted in some head"
    assert c.num_entries(0) == 12


def test_keep_mask_window_always_kept_and_prefix_topk_per_head():
    votes = torch.tensor([[[0.0, 5.0, 1.0, 0.0, 0.0, 3.0], [4.0, 0.0, 0.0, 0.0, 2.0, 0.0]]])  # G = 1
    valid = torch.ones(1, 2, 8, dtype=torch.bool)
    keep = snapkv_keep_mask(votes, valid, capacity=4, window=2, kernel_size=1, pooling="none")
    assert keep[0, 0].nonzero().flatten().tolist() == [1, 5, 6, 7]
    assert keep[0, 1].nonzero().flatten().tolist() == [0, 4, 6, 7]


# ---------------------------------------------------------------------------------------------------------
# in the model
# ---------------------------------------------------------------------------------------------------------
def test_prompt_not_longer_than_capacity_is_exactly_full_attention():
    model = tiny_model()
    ids = rand_ids(2, 24)
    dense, c = DenseCache(2), SnapKVCache(2, capacity=24, window=4)
    assert torch.equal(model(ids, cache=c).logits, model(ids, cache=dense, output_attentions=True).logits)
    for tok in rand_ids(2, 6, seed=3).T:  # decoding runs the same (fast) path on the same entries
        assert torch.equal(model(tok[:, None], cache=c).logits, model(tok[:, None], cache=dense).logits)
    assert c.num_entries(0) == 30 and not c.needs_attention(0)


@pytest.mark.parametrize("kv_heads, pooling", [(2, "maxpool"), (4, "avgpool"), (1, "none")])
def test_compression_matches_masking_oracle_and_positions_continue(kv_heads, pooling):
    model = tiny_model(kv_heads=kv_heads)
    ids = rand_ids(2, 36)
    c = SnapKVCache(2, capacity=10, window=4, kernel_size=3, pooling=pooling)
    assert replay(model, c, ids, t0=30) < 1e-4  # fp32, logits of size ~30
    assert c.num_entries(0) == 10 + 6 and c.seq_length(0) == 36
    kept = c.kept_positions(0)
    assert bool((kept[..., 6:10] == torch.arange(26, 30, dtype=torch.int32)).all())  # the window
    assert bool((kept[..., 10:] == torch.arange(30, 36, dtype=torch.int32)).all())  # decoding appends
    assert kv_heads == 1 or not bool((kept == kept[:, :1]).all())  # heads chose differently
    assert tuple(c.k[0].shape) == (2, kv_heads, 16, model.config.head_dim)  # stored per KV head


def test_padded_batch_row_equals_the_row_alone_and_short_rows_keep_everything():
    model = tiny_model()
    ids = rand_ids(3, 30)
    am = torch.ones(3, 30, dtype=torch.long)
    am[1, :7] = 0
    am[2, :22] = 0  # 8 real tokens <= capacity: nothing of row 2 may be evicted
    batched = SnapKVCache(2, capacity=10, window=4, kernel_size=3)
    assert replay(model, batched, ids, t0=26, attention_mask=am) < 1e-4
    alone = SnapKVCache(2, capacity=10, window=4, kernel_size=3)
    model(ids[1:2, 7:26], cache=alone)
    for layer in range(2):
        kept_b = batched.kept_positions(layer)[1, :, :10]
        assert torch.equal(kept_b - 7, alone.kept_positions(layer)[0])
        assert bool((batched.kept_positions(layer)[2, :, :4] == torch.arange(22, 26)).all())
        assert batched.num_valid(layer)[2].tolist() == [4 + 4, 4 + 4]  # 4 prompt tokens of row 2 + 4 decoded


def test_needs_attention_only_for_the_prompt_step():
    c = SnapKVCache(1, capacity=6, window=2)
    assert c.needs_attention(0)
    c.update(0, torch.zeros(1, 1, 10, 4), torch.zeros(1, 1, 10, 4))
    c.observe(0, torch.full((1, 1, 10, 10), 0.1))
    assert not c.needs_attention(0) and c.num_entries(0) == 6
    c.update(0, torch.zeros(1, 1, 1, 4), torch.zeros(1, 1, 1, 4))
    c.observe(0, torch.full((1, 1, 1, 7), 1 / 7))  # ignored: no eviction after the prompt
    assert c.num_entries(0) == 7 and c.seq_length(0) == 11
    c.reset()
    assert c.needs_attention(0) and c.num_entries(0) == 0 and c.capacity == 6


def test_hf_generate_matches_refimpl_generate():
    from transformers import LlamaConfig, LlamaForCausalLM

    from refimpl.hf_bridge import cache_kwargs, enable_kvcourse_attention, make_hf_cache

    model = tiny_model()
    hf_cfg = LlamaConfig(**{k: v for k, v in model.config.to_hf().items() if k not in ("architectures", "dtype")})
    hf = LlamaForCausalLM(hf_cfg).eval()
    hf.load_state_dict(model.state_dict(), strict=False)
    hf.tie_weights()
    enable_kvcourse_attention(hf)
    ids = rand_ids(2, 24)
    am = torch.ones(2, 24, dtype=torch.long)
    am[0, :3] = 0
    policy, ours = SnapKVCache(2, 10, 4, 3), SnapKVCache(2, 10, 4, 3)
    got = hf.generate(ids, attention_mask=am, **cache_kwargs(hf, make_hf_cache(policy)), max_new_tokens=6,
                      do_sample=False, pad_token_id=0)[:, 24:]
    assert torch.equal(got, model.generate(ids, max_new_tokens=6, cache=ours, attention_mask=am))
    assert policy.num_entries(0) == 10 + 5 and policy.seq_length(0) == 29
    assert torch.equal(policy.kept_positions(1)[..., :10], ours.kept_positions(1)[..., :10])
