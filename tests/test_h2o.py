"""refimpl.h2o (and the shared refimpl.eviction base): known answers, real removal, GQA, padding, HF generate."""

from __future__ import annotations

import pytest
import torch

from refimpl import DenseCache, LlamaModel, ModelConfig
from refimpl.eviction import MaskedCache, attention_mass, compact_indices, group_reduce, visible_positions
from refimpl.h2o import H2OCache, decode_attention_with_mass, h2o_keep_mask


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


# ---------------------------------------------------------------------------------------------------------
# helpers: a tiny random model; the oracle is refimpl.eviction.MaskedCache (dense storage + a mask)
# ---------------------------------------------------------------------------------------------------------
def tiny_model(heads: int = 4, kv_heads: int = 2, layers: int = 2, seed: int = 0) -> LlamaModel:
    """Random weights, with q/k scaled ×3 so attention is peaked and heads disagree on what matters."""
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256)
    model = LlamaModel(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(3.0)
            layer.self_attn.k_proj.weight.mul_(3.0)
    return model


def rand_ids(b: int, t: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 61, (b, t), generator=torch.Generator().manual_seed(seed))


def replay(model, policy, ids, attention_mask=None, steps: int = 6):
    """Teacher-force ``ids`` (prompt = all but ``steps`` last tokens) through ``policy`` and the masked oracle.

    Returns the max |logit difference| over the prefill and every decoding step.
    """
    t0 = ids.shape[1] - steps
    oracle = MaskedCache(model.config.num_hidden_layers)
    am = None if attention_mask is None else attention_mask[:, :t0]
    a = model(ids[:, :t0], attention_mask=am, cache=policy).logits
    b = model(ids[:, :t0], attention_mask=am, cache=oracle).logits
    worst = (a - b).abs().max().item()
    for s in range(steps):
        for layer in range(model.config.num_hidden_layers):
            oracle.hide(layer, visible_positions(policy, layer))
        am = None if attention_mask is None else attention_mask[:, : t0 + s + 1]
        tok = ids[:, t0 + s: t0 + s + 1]
        a = model(tok, attention_mask=am, cache=policy).logits
        b = model(tok, attention_mask=am, cache=oracle).logits
        worst = max(worst, (a - b).abs().max().item())
    return worst


# ---------------------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, name", [
    ({"heavy_budget": -1, "recent_budget": 4}, "heavy_budget"),
    ({"heavy_budget": 2, "recent_budget": -3}, "recent_budget"),
    ({"heavy_budget": 2.5, "recent_budget": 4}, "heavy_budget"),
    ({"heavy_budget": True, "recent_budget": 4}, "heavy_budget"),
    ({"heavy_budget": 0, "recent_budget": 0}, "heavy_budget + recent_budget"),
    ({"heavy_budget": 2, "recent_budget": 2, "gqa_reduce": "sum"}, "gqa_reduce"),
])
def test_bad_arguments_name_the_parameter(kwargs, name):
    with pytest.raises(ValueError, match=name.replace("+", r"\+")):
        H2OCache(num_layers=2, **kwargs)


def test_observe_rejects_wrong_probs_shape():
    c = H2OCache(1, 2, 2)
    c.update(0, torch.zeros(1, 2, 5, 4), torch.zeros(1, 2, 5, 4))
    with pytest.raises(ValueError, match="probs must be"):
        c.observe(0, torch.zeros(1, 4, 5, 6))  # 6 keys but 5 stored
    with pytest.raises(IndexError, match="before update"):
        H2OCache(1, 2, 2).observe(0, torch.zeros(1, 1, 1, 1))


# ---------------------------------------------------------------------------------------------------------
# building blocks
# ---------------------------------------------------------------------------------------------------------
def test_compact_indices_keeps_order_and_marks_holes():
    keep = torch.tensor([[[True, False, True, True], [False, False, False, True]]])
    idx, valid = compact_indices(keep)
    assert idx.shape == (1, 2, 3)
    assert idx[0, 0].tolist() == [0, 2, 3] and valid[0, 0].tolist() == [True, True, True]
    assert idx[0, 1, 0].item() == 3 and valid[0, 1].tolist() == [True, False, False]


def test_group_reduce_uses_contiguous_groups():
    # query head h belongs to KV head h // G (G = 3 here)
    x = torch.arange(6.0).view(1, 6, 1)
    assert group_reduce(x, 2, "mean").flatten().tolist() == [1.0, 4.0]
    assert group_reduce(x, 2, "max").flatten().tolist() == [2.0, 5.0]


def test_attention_mass_ignores_padding_queries_and_sums_rows():
    probs = torch.softmax(torch.randn(2, 4, 3, 5, generator=torch.Generator().manual_seed(0)), -1)
    qmask = torch.tensor([[True, True, True], [False, True, True]])
    got = attention_mass(probs, 2, qmask, "mean")
    want = torch.stack([probs[0].sum(1), probs[1, :, 1:].sum(1)]).view(2, 2, 2, 5).mean(2)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got.sum(-1), torch.tensor([[3.0, 3.0], [2.0, 2.0]]))


def test_hand_example_keeps_heavy_hitter_and_recent():
    """One head, 4 prompt tokens: column sums [1.7, 1.9, .2, .2]; heavy=1, recent=1 keeps {1, 3}."""
    c = H2OCache(num_layers=1, heavy_budget=1, recent_budget=1)
    c.update(0, torch.randn(1, 1, 4, 2), torch.randn(1, 1, 4, 2))
    probs = torch.tensor([[1, 0, 0, 0], [.5, .5, 0, 0], [.1, .8, .1, 0], [.1, .6, .1, .2]]).view(1, 1, 4, 4)
    c.observe(0, probs)
    assert c.kept_positions(0).flatten().tolist() == [1, 3]
    torch.testing.assert_close(c.score[0].flatten(), torch.tensor([1.9, 0.2]))
    # a decoding step: keys (1, 3, new 4) get (.3, .3, .4) -> scores (2.2, .5, .4); recent {4}, heavy argmax -> 1
    c.update(0, torch.randn(1, 1, 1, 2), torch.randn(1, 1, 1, 2))
    c.observe(0, torch.tensor([.3, .3, .4]).view(1, 1, 1, 3))
    assert c.kept_positions(0).flatten().tolist() == [1, 4]
    torch.testing.assert_close(c.score[0].flatten(), torch.tensor([2.2, 0.4]))
    assert c.seq_length(0) == 5 and c.num_entries(0) == 2


def test_keep_mask_is_per_head():
    score = torch.tensor([[[5.0, 0.0, 1.0, 0.0], [0.0, 5.0, 1.0, 0.0]]])
    pos = torch.arange(4, dtype=torch.int32).expand(1, 2, 4)
    keep = h2o_keep_mask(score, pos, torch.ones(1, 2, 4, dtype=torch.bool), seen=4, heavy_budget=1, recent_budget=1)
    assert keep[0, 0].tolist() == [True, False, False, True]
    assert keep[0, 1].tolist() == [False, True, False, True]


def test_planted_high_attention_key_is_always_kept():
    """Key 3 gets a large logit from every query; over 30 decoding steps it is never evicted in any head."""
    g = torch.Generator().manual_seed(0)
    b, h_q, h_kv, t0 = 2, 4, 2, 12
    c = H2OCache(num_layers=1, heavy_budget=3, recent_budget=3)
    c.update(0, torch.randn(b, h_kv, t0, 4), torch.randn(b, h_kv, t0, 4))
    logits = torch.randn(b, h_q, t0, t0, generator=g)
    logits[..., 3] += 6.0
    causal = torch.ones(t0, t0, dtype=torch.bool).tril()
    c.observe(0, torch.softmax(logits.masked_fill(~causal, float("-inf")), -1))
    for _ in range(30):
        c.update(0, torch.randn(b, h_kv, 1, 4), torch.randn(b, h_kv, 1, 4))
        n = c.num_entries(0)
        logits = torch.randn(b, h_q, 1, n, generator=g)
        planted = c.kept_positions(0) == 3  # [B, H_kv, n]
        logits = logits + 6.0 * planted.repeat_interleave(2, dim=1)[:, :, None, :]
        c.observe(0, torch.softmax(logits, -1))
        assert bool((c.kept_positions(0) == 3).any(-1).all())
    assert c.num_entries(0) == 6


# ---------------------------------------------------------------------------------------------------------
# in the model
# ---------------------------------------------------------------------------------------------------------
def test_budget_at_least_length_is_exactly_full_attention():
    model = tiny_model()
    ids = rand_ids(2, 24)
    full = model(ids, cache=DenseCache(2), output_attentions=True).logits  # same explicit attention path
    h2o = H2OCache(2, heavy_budget=16, recent_budget=8)
    assert torch.equal(model(ids, cache=h2o).logits, full)
    dense, h2o_out = DenseCache(2), H2OCache(2, heavy_budget=20, recent_budget=20)
    model(ids, cache=dense, output_attentions=True)
    model(ids, cache=h2o_out)
    for tok in rand_ids(2, 8, seed=5).T:
        a = model(tok[:, None], cache=dense, output_attentions=True).logits
        bb = model(tok[:, None], cache=h2o_out).logits
        assert torch.equal(a, bb)
    assert h2o_out.num_entries(0) == 32


def test_scores_sum_to_queries_seen_before_eviction_with_padding():
    model = tiny_model()
    ids = rand_ids(2, 20)
    am = torch.ones(2, 20, dtype=torch.long)
    am[1, :7] = 0  # left padding: row 1 has 13 real tokens
    c = H2OCache(2, heavy_budget=64, recent_budget=64)
    model.generate(ids, max_new_tokens=5, cache=c, attention_mask=am)
    # every query attended so far: the prompt's (13 real ones in row 1) and each generated token fed back
    seen = c.seq_length(0)
    assert seen >= 24
    want = torch.tensor([[seen, seen], [seen - 7, seen - 7]], dtype=torch.float32)
    for layer in range(2):
        torch.testing.assert_close(c.score[layer].sum(-1), want,
                                   atol=1e-4, rtol=0)


@pytest.mark.parametrize("kv_heads, reduce", [(2, "mean"), (4, "mean"), (1, "max")])
def test_real_drop_matches_masking_oracle(kv_heads, reduce):
    """Eviction + compaction + positions: logits equal a dense cache that only *hides* what H2O dropped."""
    model = tiny_model(kv_heads=kv_heads)
    ids = rand_ids(2, 30)
    c = H2OCache(2, heavy_budget=5, recent_budget=4, gqa_reduce=reduce)
    assert replay(model, c, ids, steps=6) < 1e-4  # fp32, logits of size ~30
    assert c.num_entries(0) == 9 and c.seq_length(0) == 30
    # different heads kept different tokens (otherwise per-head eviction is untested)
    pos = c.kept_positions(0)
    assert kv_heads == 1 or not bool((pos == pos[:, :1]).all())


def test_padded_batch_matches_masking_oracle_and_single_sequence():
    model = tiny_model()
    ids = rand_ids(2, 30)
    am = torch.ones(2, 30, dtype=torch.long)
    am[1, :9] = 0
    c = H2OCache(2, heavy_budget=5, recent_budget=4)
    assert replay(model, c, ids, attention_mask=am, steps=6) < 1e-4
    assert bool((c.valid[0].sum(-1) == 9).all())
    # row 1 alone (no padding) makes the same choices and the same predictions
    alone = H2OCache(2, heavy_budget=5, recent_budget=4)
    batched = H2OCache(2, heavy_budget=5, recent_budget=4)
    out_alone = model.generate(ids[1:, 9:], max_new_tokens=6, cache=alone)
    out_batched = model.generate(ids, max_new_tokens=6, cache=batched, attention_mask=am)
    assert torch.equal(out_alone[0], out_batched[1])
    got = batched.kept_positions(0)[1] - 9
    assert torch.equal(got.masked_fill(~batched.valid[0][1], -99), alone.kept_positions(0)[0])


def test_heavy_zero_is_a_sliding_window():
    model = tiny_model()
    ids = rand_ids(1, 26)
    c = H2OCache(2, heavy_budget=0, recent_budget=5)
    model(ids[:, :20], cache=c)
    dense = MaskedCache(2)
    model(ids[:, :20], cache=dense)
    for s in range(20, 26):
        for layer in range(2):
            dense.hide(layer, (torch.arange(s) >= s - 5).expand(1, 2, s))
        a = model(ids[:, s:s + 1], cache=c).logits
        b = model(ids[:, s:s + 1], cache=dense).logits
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
        assert c.kept_positions(0)[0, 0].tolist() == list(range(s - 4, s + 1))


def test_memory_really_shrinks_and_stays_per_kv_head():
    model = tiny_model(heads=4, kv_heads=2)
    ids = rand_ids(3, 40)
    dense, c = DenseCache(2), H2OCache(2, heavy_budget=6, recent_budget=4)
    model.generate(ids, max_new_tokens=4, cache=dense)
    model.generate(ids, max_new_tokens=4, cache=c)
    d = model.config.head_dim
    for layer in range(2):
        assert tuple(c.k[layer].shape) == (3, 2, 10, d)  # KV heads, not query heads
    assert c.nbytes() == 2 * 2 * 3 * 2 * 10 * d * 4
    seen = dense.seq_length()
    assert seen >= 43 and c.seq_length() == seen
    assert dense.nbytes() == 2 * 2 * 3 * 2 * seen * d * 4
    assert c.metadata_nbytes() == 2 * 3 * 2 * 10 * (1 + 4 + 4)  # valid (bool) + pos (int32) + score (fp32)
    c.reset()
    assert c.nbytes() == 0 and c.seq_length() == 0 and c.heavy_budget == 6


def test_decode_attention_with_mass_reference():
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 6, 8, generator=g), torch.randn(2, 3, 9, 8, generator=g), torch.randn(2, 3, 9, 8, generator=g)
    mask = torch.rand(2, 3, 9, generator=g) > 0.3
    o, mass = decode_attention_with_mass(q, k, v, key_mask=mask)
    s = torch.einsum("bhd,bhnd->bhn", q, k.repeat_interleave(2, 1)) / 8 ** 0.5
    p = torch.softmax(s.masked_fill(~mask.repeat_interleave(2, 1), float("-inf")), -1)
    torch.testing.assert_close(o, torch.einsum("bhn,bhnd->bhd", p, v.repeat_interleave(2, 1)))
    torch.testing.assert_close(mass, p.view(2, 3, 2, 9).mean(2))
    torch.testing.assert_close(mass.sum(-1), torch.ones(2, 3))


def test_hf_generate_matches_refimpl_generate():
    """The same H2O policy behind transformers' generate (kvcourse attention) and refimpl's generate."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from refimpl.hf_bridge import cache_kwargs, enable_kvcourse_attention, make_hf_cache

    model = tiny_model()
    cfg = model.config
    hf_cfg = LlamaConfig(**{k: v for k, v in cfg.to_hf().items() if k not in ("architectures", "dtype")})
    hf = LlamaForCausalLM(hf_cfg).eval()
    hf.load_state_dict(model.state_dict(), strict=False)
    hf.tie_weights()
    enable_kvcourse_attention(hf)
    ids = rand_ids(2, 24)
    am = torch.ones(2, 24, dtype=torch.long)
    am[1, :5] = 0
    ours, theirs = H2OCache(2, 5, 4), H2OCache(2, 5, 4)
    want = model.generate(ids, max_new_tokens=8, cache=ours, attention_mask=am)
    got = hf.generate(ids, attention_mask=am, **cache_kwargs(hf, make_hf_cache(theirs)), max_new_tokens=8,
                      do_sample=False, pad_token_id=0)[:, 24:]
    assert torch.equal(got, want)
    assert theirs.num_entries(0) == 9 and theirs.seq_length(0) == ours.seq_length(0)
    for layer in range(2):
        assert torch.equal(theirs.kept_positions(layer), ours.kept_positions(layer))
