"""refimpl.gqa: repeat_kv, grouped attention by index, and MHA -> GQA conversion by mean-pooling (Ainslie et al. 2023)."""

from __future__ import annotations

import pytest
import torch

from refimpl import LlamaModel, ModelConfig
from refimpl.gqa import (
    _sdpa_reference,
    grouped_attention,
    mean_pool_heads,
    mean_pool_kv_heads,
    repeat_kv,
    valid_kv_head_counts,
)

TOL = {torch.float32: {"atol": 1e-5, "rtol": 1e-5}, torch.float16: {"atol": 2e-3, "rtol": 2e-3},
       torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2}}


def tiny_model(num_kv: int | None = None, heads: int = 6, seed: int = 0, qwen: bool = False) -> LlamaModel:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=67, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=heads, num_key_value_heads=num_kv, max_position_embeddings=64,
                      model_type="qwen2" if qwen else "llama", qkv_bias=qwen, tie_word_embeddings=not qwen)
    model = LlamaModel(cfg).eval()
    if qwen:  # give the biases non-zero values so pooling them is tested
        with torch.no_grad():
            for layer in model.model.layers:
                for lin in (layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.q_proj):
                    lin.bias.normal_()
    return model


def ids(b: int = 2, t: int = 11, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 67, (b, t), generator=torch.Generator().manual_seed(seed))


def make_groups_identical(model: LlamaModel, groups: int) -> None:
    """Overwrite K/V heads so every head in a contiguous group equals the group's first head."""
    h_kv, d = model.config.num_key_value_heads, model.config.head_dim
    r = h_kv // groups
    with torch.no_grad():
        for layer in model.model.layers:
            for lin in (layer.self_attn.k_proj, layer.self_attn.v_proj):
                for p in (lin.weight, lin.bias):
                    if p is None:
                        continue
                    heads = p.view(h_kv, d, *p.shape[1:])
                    first = heads[::r].repeat_interleave(r, dim=0)
                    heads.copy_(first)


# --------------------------------------------------------------------------------------------------- repeat_kv
@pytest.mark.parametrize("n_rep", [1, 2, 3])
def test_repeat_kv_equals_repeat_interleave(n_rep):
    x = torch.randn(2, 3, 5, 4, generator=torch.Generator().manual_seed(0))
    out = repeat_kv(x, n_rep)
    assert torch.equal(out, torch.repeat_interleave(x, n_rep, dim=1))
    # known answer: output head h is input head h // n_rep (not h % H_kv, which is tiling)
    for h in range(3 * n_rep):
        assert torch.equal(out[:, h], x[:, h // n_rep])


def test_repeat_kv_errors():
    with pytest.raises(ValueError, match="n_rep must be a positive int"):
        repeat_kv(torch.zeros(1, 2, 3, 4), 0)
    with pytest.raises(ValueError, match=r"x must be \[batch, kv_heads, tokens, head_dim\]"):
        repeat_kv(torch.zeros(2, 3, 4), 2)


# ---------------------------------------------------------------------------------------- grouped attention
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("h,h_kv,t_q,t_k", [(6, 6, 7, 7), (6, 2, 7, 7), (6, 1, 1, 9), (4, 2, 3, 13), (5, 1, 5, 5)])
def test_grouped_attention_matches_sdpa_and_repeat_kv(dtype, h, h_kv, t_q, t_k):
    g = torch.Generator().manual_seed(h * 100 + h_kv * 10 + t_q)
    q = torch.randn(2, h, t_q, 6, generator=g).to(dtype)
    k = torch.randn(2, h_kv, t_k, 6, generator=g).to(dtype)
    v = torch.randn(2, h_kv, t_k, 6, generator=g).to(dtype)
    out = grouped_attention(q, k, v)
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out, _sdpa_reference(q, k, v), **TOL[dtype])
    # sharing by index == attention over materialised copies
    mha = grouped_attention(q, repeat_kv(k, h // h_kv), repeat_kv(v, h // h_kv))
    torch.testing.assert_close(out, mha, **TOL[dtype])


def test_grouped_attention_is_causal_and_decode_step_matches_prefill():
    g = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(1, 4, 6, 8, generator=g), torch.randn(1, 2, 6, 8, generator=g), torch.randn(1, 2, 6, 8, generator=g)
    full = grouped_attention(q, k, v)
    # the last query alone against all keys (a decode step) equals the last row of the prefill
    torch.testing.assert_close(grouped_attention(q[:, :, -1:], k, v), full[:, :, -1:])
    # the first query sees only the first key: output = v[0] of its KV head
    torch.testing.assert_close(full[:, :, 0], repeat_kv(v, 2)[:, :, 0])
    # without the mask the first row changes
    assert not torch.allclose(grouped_attention(q, k, v, causal=False)[:, :, 0], full[:, :, 0])


def test_grouped_attention_errors():
    with pytest.raises(ValueError, match=r"allowed kv_heads: \[1, 2, 3, 6\]"):
        grouped_attention(torch.zeros(1, 6, 2, 4), torch.zeros(1, 4, 2, 4), torch.zeros(1, 4, 2, 4))
    with pytest.raises(ValueError, match="at least as many keys as queries"):
        grouped_attention(torch.zeros(1, 2, 3, 4), torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 2, 4))


# ---------------------------------------------------------------------------------------------- mean pooling
def test_mean_pool_heads_known_answer():
    # 4 heads of dim 2, in_features 1: head i holds the value i in both rows
    w = torch.arange(4.0).repeat_interleave(2)[:, None]
    assert torch.equal(mean_pool_heads(w, 4, 2), torch.tensor([[0.5], [0.5], [2.5], [2.5]]))
    assert torch.equal(mean_pool_heads(w, 4, 1), torch.full((2, 1), 1.5))
    assert torch.equal(mean_pool_heads(w, 4, 4), w)
    b = torch.tensor([1.0, 2.0, 3.0, 5.0, 7.0, 11.0])  # bias of 3 heads, dim 2
    assert torch.equal(mean_pool_heads(b, 3, 1), torch.tensor([11 / 3, 6.0]))
    assert mean_pool_heads(w.half(), 4, 2).dtype == torch.float16


def test_valid_kv_head_counts():
    assert valid_kv_head_counts(6) == [1, 2, 3, 6]
    assert valid_kv_head_counts(32) == [1, 2, 4, 8, 16, 32]
    with pytest.raises(ValueError, match="num_heads must be a positive int"):
        valid_kv_head_counts(0)


def test_g1_is_identity_and_input_untouched():
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    same = mean_pool_kv_heads(model, 6)
    x = ids()
    assert torch.equal(same(x).logits, model(x).logits)
    assert same is not model
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert model.config.num_key_value_heads == 6


@pytest.mark.parametrize("qwen", [False, True])
@pytest.mark.parametrize("groups", [1, 2, 3])
def test_exact_when_heads_in_a_group_are_identical(groups, qwen):
    model = tiny_model(qwen=qwen)
    make_groups_identical(model, groups)
    conv = mean_pool_kv_heads(model, groups)
    assert conv.config.num_key_value_heads == groups and conv.config.num_groups == 6 // groups
    assert conv.model.layers[0].self_attn.k_proj.weight.shape == (groups * 8, 48)
    x = ids()
    torch.testing.assert_close(conv(x).logits, model(x).logits, atol=1e-5, rtol=1e-5)


def test_conversion_changes_logits_when_heads_differ_and_shrinks_cache():
    model = tiny_model()
    conv = mean_pool_kv_heads(model, 2)
    x = ids()
    out_m, out_c = model(x), conv(x)
    assert (out_m.logits - out_c.logits).abs().max() > 1e-3  # lossy in general: that is why uptraining exists
    assert out_m.cache.nbytes() == 3 * out_c.cache.nbytes()  # G = 3: the cache holds 3x fewer heads


def test_gqa_to_fewer_heads_keeps_query_to_group_map():
    # start from a GQA model (6 query heads, 3 KV heads; query head h reads KV head h // 2) and pool to MQA
    model = tiny_model(num_kv=3)
    make_groups_identical(model, 1)
    conv = mean_pool_kv_heads(model, 1)
    torch.testing.assert_close(conv(ids()).logits, model(ids()).logits, atol=1e-5, rtol=1e-5)
    # and a known pooling: the 1-head K weight is the mean of the 3 old heads
    w = model.model.layers[1].self_attn.k_proj.weight.view(3, 8, 48).mean(0)
    torch.testing.assert_close(conv.model.layers[1].self_attn.k_proj.weight, w)


def test_errors_list_valid_counts():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"allowed values: \[1, 2, 3, 6\]; got 4"):
        mean_pool_kv_heads(model, 4)
    with pytest.raises(ValueError, match=r"allowed values: \[1, 2, 3, 6\]; got 12"):
        mean_pool_kv_heads(model, 12)
    with pytest.raises(ValueError, match="allowed values"):
        mean_pool_kv_heads(model, 2.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"allowed values: \[1, 3\]"):
        mean_pool_kv_heads(tiny_model(num_kv=3), 2)
    with pytest.raises(TypeError, match="refimpl LlamaModel"):
        mean_pool_kv_heads(torch.nn.Linear(2, 2), 1)  # type: ignore[arg-type]


def test_converted_model_decodes_with_cache_like_without():
    conv = mean_pool_kv_heads(tiny_model(), 2)
    x = ids(1, 9)
    full = conv(x).logits[:, -1]
    cache = conv.new_cache()
    conv(x[:, :-1], cache=cache)
    step = conv(x[:, -1:], cache=cache).logits[:, -1]
    torch.testing.assert_close(step, full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("qwen", [False, True])
def test_save_and_reload_with_plain_transformers(tmp_path, qwen):
    transformers = pytest.importorskip("transformers")
    conv = mean_pool_kv_heads(tiny_model(qwen=qwen), 2)
    conv.save_pretrained(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert hf.config.num_key_value_heads == 2
    x = ids()
    with torch.no_grad():
        want = hf(x).logits
    torch.testing.assert_close(conv(x).logits, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(LlamaModel.from_pretrained(tmp_path)(x).logits, want, atol=1e-5, rtol=1e-5)
