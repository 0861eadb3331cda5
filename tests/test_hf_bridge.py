"""refimpl cache policies inside transformers' ``generate`` (refimpl/hf_bridge.py).

Ground truth is twofold: transformers' own ``DynamicCache`` for the dense baseline, and refimpl's
``LlamaModel`` (which implements the KVCache contract directly) for policies that evict or observe attention.
Both models share the same random weights, so any disagreement comes from the adapter.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from refimpl import DenseCache, KVCache, LayerKV, LlamaModel
from refimpl.cache import tensor_bytes
from refimpl.hf_bridge import (
    cache_kwargs,
    disable_kvcourse_attention,
    enable_kvcourse_attention,
    is_kvcourse_enabled,
    load_hf_with_kvcourse_attention,
    make_hf_cache,
)

ATOL = 1e-5  # fp32 logits, same weights
NEW = 6  # tokens generated per test


# ---------------------------------------------------------------------------------------------------------
# Two toy policies that exercise the contract: eviction after the step, and attention observation
# ---------------------------------------------------------------------------------------------------------
class RecentWindow(KVCache):
    """Keep the last ``budget[layer]`` entries.  ``evict_in_update=False``: return everything this step and drop
    afterwards (what sdpa needs); True: return only the kept window (needs the kvcourse attention)."""

    def __init__(self, num_layers: int, budget: int | list[int], evict_in_update: bool = False):
        super().__init__(num_layers)
        self.budget = [budget] * num_layers if isinstance(budget, int) else list(budget)
        self.evict_in_update = evict_in_update
        self.reset()

    def reset(self) -> None:
        self._seen = [0] * self.num_layers
        self.kv: list[tuple | None] = [None] * self.num_layers

    def update(self, i, k, v, key_mask=None) -> LayerKV:
        self._seen[i] += k.shape[2]
        m = key_mask if key_mask is not None else torch.ones(k.shape[0], k.shape[2], dtype=torch.bool)
        if self.kv[i] is not None:
            ok, ov, om = self.kv[i]
            k, v, m = torch.cat([ok, k], 2), torch.cat([ov, v], 2), torch.cat([om, m], 1)
        b = self.budget[i]
        self.kv[i] = (k[:, :, -b:], v[:, :, -b:], m[:, -b:])
        k, v, m = self.kv[i] if self.evict_in_update else (k, v, m)
        return LayerKV(k, v, m[:, None, :].expand(-1, k.shape[1], -1))

    def num_entries(self, i: int = 0) -> int:
        return 0 if self.kv[i] is None else self.kv[i][0].shape[2]

    def nbytes(self) -> int:
        return sum(tensor_bytes(*kv[:2]) for kv in self.kv if kv is not None)


class Recorder(DenseCache):
    """Dense, but asks for attention probabilities and records them (what H2O/SnapKV consume)."""

    def __init__(self, num_layers: int):
        super().__init__(num_layers)
        self.seen_probs: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]

    def needs_attention(self, i: int) -> bool:
        return True

    def observe(self, i: int, probs: torch.Tensor) -> None:
        self.seen_probs[i].append(probs.clone())


# ---------------------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A random GQA LlamaForCausalLM (sdpa) and its refimpl twin (same weights)."""
    cfg = LlamaConfig(
        vocab_size=101,
        hidden_size=40,
        head_dim=10,
        intermediate_size=56,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=0,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    hf = LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # larger than the default init so attention is peaked and masks matter
        for p in hf.parameters():
            p.copy_(
                torch.randn(p.shape, generator=g) * 1.5 / p.shape[-1] ** 0.5
                if p.dim() == 2
                else 1 + 0.2 * torch.randn(p.shape, generator=g)
            )
    path = tmp_path_factory.mktemp("bridge")
    hf.save_pretrained(path)
    return hf, LlamaModel.from_pretrained(path)


@pytest.fixture
def kvcourse(models):
    hf, _ = models
    enable_kvcourse_attention(hf)
    yield hf
    disable_kvcourse_attention(hf)


def _batch(vocab: int, left_pad: bool):
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(1, vocab, (2, 9), generator=g)
    mask = torch.ones(2, 9, dtype=torch.long)
    if left_pad:
        ids[1, :3], mask[1, :3] = 0, 0
    return ids, mask


def _generate(hf, ids, mask, cache):
    out = hf.generate(
        input_ids=ids, attention_mask=mask, **cache_kwargs(hf, cache), max_new_tokens=NEW, do_sample=False
    )
    return out[:, ids.shape[1] :]


# ---------------------------------------------------------------------------------------------------------
# Dense baseline: the adapter around DenseCache is DynamicCache
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("attention", ["sdpa", "kvcourse"])
def test_generate_with_dense_adapter_equals_dynamic_cache(models, batch, attention):
    hf, _ = models
    ids, mask = _batch(hf.config.vocab_size, left_pad=batch == 2)
    ids, mask = ids[:batch], mask[:batch]
    want = _generate(hf, ids, mask, DynamicCache())  # reference: sdpa + DynamicCache
    if attention == "kvcourse":
        enable_kvcourse_attention(hf)
    try:
        policy = DenseCache(hf.config.num_hidden_layers)
        got = _generate(hf, ids, mask, make_hf_cache(policy))
    finally:
        disable_kvcourse_attention(hf)
    assert torch.equal(got, want), f"{got.tolist()} != {want.tolist()}"
    # the policy really held the sequence: positions = prompt + generated - 1 (last token is not fed back)
    assert policy.seq_length() == ids.shape[1] + NEW - 1
    assert policy.nbytes() == 2 * 2 * 2 * 10 * (ids.shape[1] + NEW - 1) * batch * 4


@torch.no_grad()
def test_kvcourse_attention_logits_equal_sdpa(models, kvcourse):
    hf, _ = models
    ids, mask = _batch(hf.config.vocab_size, left_pad=True)
    real = mask.bool()
    disable_kvcourse_attention(hf)
    sdpa_full = hf(ids, attention_mask=mask).logits
    sdpa_cache = DynamicCache()
    hf(ids[:, :6], attention_mask=mask[:, :6], **cache_kwargs(hf, sdpa_cache))
    sdpa_step = hf(ids[:, 6:], attention_mask=mask, **cache_kwargs(hf, sdpa_cache)).logits
    enable_kvcourse_attention(hf)
    got_full = hf(ids, attention_mask=mask).logits  # no cache
    torch.testing.assert_close(got_full[real], sdpa_full[real], atol=ATOL, rtol=0)
    for cache in (DynamicCache(), make_hf_cache(DenseCache(2))):  # contiguous HF cache and the adapter
        hf(ids[:, :6], attention_mask=mask[:, :6], **cache_kwargs(hf, cache))
        got_step = hf(ids[:, 6:], attention_mask=mask, **cache_kwargs(hf, cache)).logits
        torch.testing.assert_close(got_step, sdpa_step, atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------------------
# Eviction: Hugging Face's masks must stay right when fewer entries are kept than positions seen
# ---------------------------------------------------------------------------------------------------------
@torch.no_grad()
def _decode_logits(model, ids, policy, steps=3):
    """Prefill ``ids``, feed ``steps`` single tokens, then a 3-token chunk (a causal mask over kept + new
    entries is needed only when several queries arrive after eviction); all logits, ``[B, 1 + steps + 3, V]``."""
    b = ids.shape[0]
    feed = [ids] + [torch.full((b, 1), 5 + t) for t in range(steps)] + [torch.tensor([[7, 8, 9]] * b)]
    out = []
    for x in feed:
        if isinstance(model, LlamaModel):
            logits = model(x, cache=policy).logits
        else:
            logits = model(input_ids=x, **cache_kwargs(model, make_hf_cache(policy))).logits
        out.append(logits[:, -1:] if x is ids else logits)
    return torch.cat(out, 1)


@pytest.mark.parametrize("attention", ["sdpa", "kvcourse"])
def test_eviction_after_step_matches_refimpl(models, attention):
    hf, ref = models
    ids, _ = _batch(hf.config.vocab_size, left_pad=False)
    want = _decode_logits(ref, ids, RecentWindow(2, 5))
    dense = _decode_logits(ref, ids, DenseCache(2))
    assert (want[:, 1:] - dense[:, 1:]).abs().max() > 1e-2, (
        "the window must change the logits for this test to bite"
    )
    if attention == "kvcourse":
        enable_kvcourse_attention(hf)
    try:
        policy = RecentWindow(2, 5)
        got = _decode_logits(hf, ids, policy)
    finally:
        disable_kvcourse_attention(hf)
    assert policy.seq_length() == 9 + 3 + 3 and policy.num_entries() == 5  # it did evict
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_get_mask_sizes_after_eviction(models):
    hf, _ = models
    policy = RecentWindow(2, 5)
    cache = make_hf_cache(policy)
    with torch.no_grad():
        hf(torch.arange(1, 10)[None], **cache_kwargs(hf, cache))
    assert cache.get_seq_length() == 9  # positions (RoPE continues from 9)
    assert cache.get_mask_sizes(1, 0) == (6, 4)  # 5 kept + 1 new, treated as positions 4..9
    assert cache.get_mask_sizes(3, 1) == (8, 4)


def test_cache_kwargs_uses_the_name_forward_declares(models):
    """``cache`` from transformers 5.24 on, ``past_key_values`` before: whichever hf.forward declares."""
    hf, _ = models
    c = make_hf_cache(DenseCache(2))
    (name, value), = cache_kwargs(hf, c).items()
    assert value is c and name in ("cache", "past_key_values")
    assert name in inspect.signature(hf.forward).parameters
    with pytest.raises(TypeError, match=r"Linear.forward takes neither of \('cache', 'past_key_values'\)"):
        cache_kwargs(torch.nn.Linear(2, 2), c)


def test_padded_batch_with_eviction_and_per_layer_budgets(models, kvcourse):
    """kvcourse path: padding reaches the policy as key_mask; per-layer budgets and in-update eviction work."""
    hf, ref = kvcourse, models[1]
    ids, mask = _batch(hf.config.vocab_size, left_pad=True)
    make = lambda: RecentWindow(2, [5, 4], evict_in_update=True)
    got = _generate(hf, ids, mask, make_hf_cache(make()))
    assert torch.equal(got, ref.generate(ids, NEW, cache=make(), attention_mask=mask))
    for row in range(2):  # the kept windows hold only real tokens, so each row equals itself alone
        real = ids[row : row + 1, mask[row].bool()]
        alone = _generate(hf, real, torch.ones_like(real), make_hf_cache(make()))
        assert torch.equal(got[row : row + 1], alone)
    assert not torch.equal(got, _generate(hf, ids, mask, make_hf_cache(DenseCache(2)))), (
        "eviction had no effect"
    )


# ---------------------------------------------------------------------------------------------------------
# Attention-scored policies receive the same probabilities as inside refimpl
# ---------------------------------------------------------------------------------------------------------
@torch.no_grad()
def test_observe_receives_same_probabilities_as_refimpl(models, kvcourse):
    hf, ref = kvcourse, models[1]
    ids, mask = _batch(hf.config.vocab_size, left_pad=True)
    a, b = Recorder(2), Recorder(2)
    ref(ids, attention_mask=mask, cache=a)
    ref(torch.tensor([[5], [6]]), attention_mask=torch.cat([mask, mask.new_ones(2, 1)], 1), cache=a)
    hf(ids, attention_mask=mask, **cache_kwargs(hf, make_hf_cache(b)))
    hf(
        torch.tensor([[5], [6]]),
        attention_mask=torch.cat([mask, mask.new_ones(2, 1)], 1),
        **cache_kwargs(hf, make_hf_cache(b)),
    )
    real = mask.bool()
    for layer in range(2):
        assert len(b.seen_probs[layer]) == 2
        for pa, pb in zip(a.seen_probs[layer], b.seen_probs[layer]):
            assert pb.shape == pa.shape  # [B, H, T_q, T_k]
            rows = real[:, -pa.shape[2] :]  # padded query rows hold arbitrary (uniform) probabilities
            torch.testing.assert_close(
                pb.permute(0, 2, 1, 3)[rows], pa.permute(0, 2, 1, 3)[rows], atol=1e-6, rtol=0
            )
        assert b.seen_probs[layer][1][1, :, 0, :3].abs().max() == 0  # padding gets no attention


@torch.no_grad()
def test_load_enable_disable_round_trip(models, tmp_path):
    hf, _ = models
    hf.save_pretrained(tmp_path)
    loaded = load_hf_with_kvcourse_attention(tmp_path)
    assert is_kvcourse_enabled(loaded) and loaded.config._attn_implementation == "kvcourse"
    ids = torch.arange(1, 12)[None]
    torch.testing.assert_close(loaded(ids).logits, hf(ids).logits, atol=ATOL, rtol=0)
    enable_kvcourse_attention(loaded)  # idempotent: one hook only
    assert len(loaded.model._forward_pre_hooks) == 1
    disable_kvcourse_attention(loaded)
    assert not is_kvcourse_enabled(loaded) and loaded.config._attn_implementation == "sdpa"
    assert len(loaded.model._forward_pre_hooks) == 0
