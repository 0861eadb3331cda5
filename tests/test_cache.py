"""The KV-cache contract (refimpl/cache.py) and its dense baseline, with known answers."""

from __future__ import annotations

import doctest

import pytest
import torch

import refimpl.cache
from refimpl import DenseCache, KVCache, LlamaModel, ModelConfig
from refimpl.model import apply_rope, rope_cos_sin

B, H_KV, D = 2, 3, 4

# Policies that must satisfy the generic part of the contract; techniques append their factories here
# (num_layers -> fresh cache).
CONTRACT_POLICIES = {"dense": DenseCache}


def _kv(t: int, start: float = 0.0, dtype=torch.float32):
    """Keys/values whose every element encodes its token index: k[..., j, :] = start + j, v = -(start + j)."""
    idx = torch.arange(t, dtype=dtype).add(start)[None, None, :, None].expand(B, H_KV, t, D).contiguous()
    return idx, -idx


def test_cache_module_doctest():
    assert doctest.testmod(refimpl.cache, raise_on_error=False).failed == 0


def test_update_appends_in_order_and_returns_everything():
    c = DenseCache(num_layers=2)
    kv = c.update(0, *_kv(3))
    assert kv.k.shape == (B, H_KV, 3, D) and kv.key_mask is None
    kv = c.update(0, *_kv(2, start=3))
    assert kv.k[0, 0, :, 0].tolist() == [0, 1, 2, 3, 4]  # old first, new last, in order
    assert kv.v[1, 2, :, 3].tolist() == [0, -1, -2, -3, -4]
    assert (c.seq_length(0), c.num_entries(0), c.seq_length(1), c.num_entries(1)) == (5, 5, 0, 0)
    assert torch.equal(c.read(0).k, kv.k)


def test_nbytes_known_answer_per_dtype():
    c = DenseCache(num_layers=2)
    c.update(0, *_kv(5))  # fp32: 2 tensors * 2*3*5*4 elements * 4 bytes
    c.update(1, *_kv(5, dtype=torch.float16))  # fp16: half of it
    assert c.nbytes() == 2 * (B * H_KV * 5 * D) * 4 + 2 * (B * H_KV * 5 * D) * 2 == 1440
    assert c.read(1).k.dtype == torch.float16  # stored as given


def test_key_mask_merges_with_unmasked_updates():
    c = DenseCache(num_layers=1)
    c.update(0, *_kv(2))  # no mask: everything valid
    m = torch.tensor([[True, False, True], [False, True, True]])
    kv = c.update(0, *_kv(3, start=2), key_mask=m)
    assert kv.key_mask.shape == (B, H_KV, 5)
    assert kv.key_mask[:, 0].tolist() == [[True, True, True, False, True], [True, True, False, True, True]]
    assert torch.equal(kv.key_mask[:, 0], kv.key_mask[:, 2])  # same for every KV head
    kv = c.update(0, *_kv(1, start=5))  # later unmasked tokens are valid
    assert kv.key_mask[:, 0, -1].all() and kv.key_mask.shape[-1] == 6


def test_get_returns_slices_and_reset_empties():
    c = DenseCache(num_layers=1)
    c.update(0, *_kv(6))
    k, v = c.get(0, 2, 5)
    assert k[0, 0, :, 0].tolist() == [2, 3, 4] and v[0, 0, :, 0].tolist() == [-2, -3, -4]
    assert c.get(0, 6, 6)[0].shape[2] == 0
    c.reset()
    assert (c.seq_length(), c.num_entries(), c.nbytes()) == (0, 0, 0)
    with pytest.raises(IndexError, match="empty"):
        c.read(0)


def test_cache_stores_keys_after_rope():
    """The model caches rotated keys: layer 0's cached k equals RoPE(W_K RMSNorm(embed(x)), positions)."""
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=50,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = LlamaModel(cfg).eval()
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    cache = DenseCache(1)
    with torch.no_grad():
        model(ids, cache=cache)
        x = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids))
        k = model.model.layers[0].self_attn.k_proj(x).view(1, 5, 2, 4).transpose(1, 2)
        cos, sin = rope_cos_sin(model.inv_freq, torch.arange(5)[None], k.dtype)
        rotated = apply_rope(k, cos, sin)
    torch.testing.assert_close(cache.read(0).k, rotated, atol=1e-6, rtol=0)
    assert not torch.allclose(cache.read(0).k, k, atol=1e-3)  # and rotation did change them


@pytest.mark.parametrize("name", list(CONTRACT_POLICIES))
def test_contract_through_the_model(name):
    """Generic contract: positions counted, entries ≤ positions, bytes measured, fresh after reset."""
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=50,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = LlamaModel(cfg).eval()
    cache = CONTRACT_POLICIES[name](cfg.num_hidden_layers)
    assert isinstance(cache, KVCache)
    with torch.no_grad():
        model(torch.randint(0, 50, (2, 7)), cache=cache)
        model(torch.randint(0, 50, (2, 1)), cache=cache)
    for layer in range(2):
        assert cache.seq_length(layer) == 8
        assert 0 < cache.num_entries(layer) <= 8
    dense_bytes = 2 * 2 * 2 * 4 * 8 * 2 * 4  # K,V * layers * H_kv * d * T * B * fp32
    assert 0 < cache.nbytes() <= dense_bytes
    cache.reset()
    assert cache.seq_length() == 0 and cache.nbytes() == 0
