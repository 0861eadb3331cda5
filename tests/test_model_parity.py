"""refimpl.LlamaModel against transformers on random-weight checkpoints, logit for logit.

Every config is saved by transformers (``save_pretrained``) and loaded by ``LlamaModel.from_pretrained``; weights
are re-drawn with a larger scale than transformers' init (std 0.02 makes logits ~0 and attention ~uniform, which
would hide layout and masking bugs), so a wrong head layout, RoPE or mask moves the logits by O(1).
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from refimpl import DenseCache, LlamaModel
from refimpl.model import rope_frequencies

ATOL = 1e-5  # fp32 bound for full forward and cached decoding against transformers
# Padded vs. alone changes the softmax/sdpa summation length, so fp32 rounding differs slightly more (logits
# reach |6| here; observed up to 1.3e-5): allow 1e-5 absolute + 1e-5 relative.
PAD_TOL = {"atol": 1e-5, "rtol": 1e-5}

_COMMON = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": 0, "max_position_embeddings": 128}
CONFIGS = {
    "mha_tied": (
        LlamaConfig,
        {
            "hidden_size": 32,
            "intermediate_size": 48,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "vocab_size": 97,
            "tie_word_embeddings": True,
        },
    ),
    "gqa_untied": (
        LlamaConfig,
        {
            "hidden_size": 32,
            "intermediate_size": 48,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": 97,
            "tie_word_embeddings": False,
            "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
        },
    ),
    "mqa_bias": (
        LlamaConfig,
        {
            "hidden_size": 32,
            "intermediate_size": 48,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 1,
            "vocab_size": 97,
            "tie_word_embeddings": False,
            "attention_bias": True,
            "rms_norm_eps": 1e-6,
        },
    ),
    "odd_sizes": (
        LlamaConfig,
        {
            "hidden_size": 40,
            "head_dim": 10,
            "intermediate_size": 37,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": 101,
            "tie_word_embeddings": True,
        },
    ),
    "qwen2_qkv_bias": (
        Qwen2Config,
        {
            "hidden_size": 32,
            "intermediate_size": 48,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": 97,
            "tie_word_embeddings": False,
        },
    ),
    "mistral_no_window": (
        MistralConfig,
        {
            "hidden_size": 32,
            "intermediate_size": 48,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": 97,
            "tie_word_embeddings": False,
            "sliding_window": None,
        },
    ),
    # head_dim 16, base 1e4: wavelengths 6.3 … 2e4 fall in all three llama3 bands for original context 256
    "llama3_rope": (
        LlamaConfig,
        {
            "hidden_size": 32,
            "head_dim": 16,
            "intermediate_size": 48,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "vocab_size": 97,
            "tie_word_embeddings": False,
            "max_position_embeddings": 2048,
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 10000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 256,
            },
        },
    ),
}
_CLASSES = {LlamaConfig: LlamaForCausalLM, MistralConfig: MistralForCausalLM, Qwen2Config: Qwen2ForCausalLM}


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Weights ~ N(0, 1.5²/fan_in), norms 1 + N(0, 0.2²), biases N(0, 0.5²): O(1) logits, peaked attention."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.dim() == 2:
                p.copy_(noise * 1.5 / p.shape[1] ** 0.5)
            elif name.endswith("bias"):
                p.copy_(0.5 * noise)
            else:
                p.copy_(1 + 0.2 * noise)


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    """(name, transformers model, refimpl model loaded from its save_pretrained directory, that directory)."""
    cfg_cls, kw = CONFIGS[request.param]
    torch.manual_seed(0)
    hf = _CLASSES[cfg_cls](cfg_cls(**{**_COMMON, **kw})).eval()
    randomize_(hf, seed=len(request.param))
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return request.param, hf, LlamaModel.from_pretrained(path), path


def _ids(vocab: int, shape: tuple[int, int], seed: int) -> torch.Tensor:
    return torch.randint(1, vocab, shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_full_forward_matches_transformers(pair):
    _name, hf, ref, _ = pair
    ids = _ids(hf.config.vocab_size, (2, 13), seed=1)
    want = hf(ids).logits
    assert want.std() > 0.5, "logits too flat for the comparison to mean anything"
    torch.testing.assert_close(ref(ids).logits, want, atol=ATOL, rtol=0)
    torch.testing.assert_close(ref(ids, use_cache=False).logits, want, atol=ATOL, rtol=0)  # no-cache path


@torch.no_grad()
def test_token_by_token_decoding_matches_full_forward(pair):
    _name, hf, ref, _ = pair
    ids = _ids(hf.config.vocab_size, (2, 12), seed=2)
    want = hf(ids).logits
    cache = DenseCache(ref.config.num_hidden_layers)
    got = [ref(ids[:, :5], cache=cache).logits]  # prefill 5, then one token at a time
    for t in range(5, 12):
        got.append(ref(ids[:, t : t + 1], cache=cache).logits)
    torch.testing.assert_close(torch.cat(got, 1), want, atol=ATOL, rtol=0)
    assert cache.seq_length() == 12 and cache.num_entries() == 12


@torch.no_grad()
def test_greedy_generation_token_identical_to_hf_generate(pair):
    name, hf, ref, _ = pair
    ids = _ids(hf.config.vocab_size, (2, 7), seed=3)
    want = hf.generate(ids, max_new_tokens=12, do_sample=False)[:, 7:]
    got = ref.generate(ids, max_new_tokens=12)
    assert torch.equal(got, want), f"{name}: refimpl {got.tolist()} vs transformers {want.tolist()}"


@torch.no_grad()
def test_left_padding_matches_each_sequence_alone(pair):
    _name, hf, ref, _ = pair
    v = hf.config.vocab_size
    long, short = _ids(v, (1, 11), seed=4), _ids(v, (1, 7), seed=5)
    pad = 4
    batch = torch.cat([long, torch.cat([torch.full((1, pad), 3), short], 1)])
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, :pad] = 0
    cache = DenseCache(ref.config.num_hidden_layers)
    out = ref(batch, attention_mask=mask, cache=cache).logits
    alone = [ref(long).logits[0], ref(short).logits[0]]
    torch.testing.assert_close(out[0], alone[0], **PAD_TOL)
    torch.testing.assert_close(out[1, pad:], alone[1], **PAD_TOL)
    # the mask matters: without it the padded row attends to the pad tokens and its logits move
    assert (ref(batch).logits[1, pad:] - alone[1]).abs().max() > 1e-2

    # three decode steps on both rows, with the mask grown by one column per step
    caches = [DenseCache(ref.config.num_hidden_layers) for _ in range(2)]
    ref(long, cache=caches[0])
    ref(short, cache=caches[1])
    new = _ids(v, (2, 3), seed=6)
    for t in range(3):
        mask = torch.cat([mask, mask.new_ones(2, 1)], 1)
        step = ref(new[:, t : t + 1], attention_mask=mask, cache=cache).logits
        for row in range(2):
            solo = ref(new[row : row + 1, t : t + 1], cache=caches[row]).logits
            torch.testing.assert_close(step[row], solo[0], **PAD_TOL)


def test_llama3_rope_frequencies_match_and_cover_all_bands(pair):
    name, hf, ref, _ = pair
    torch.testing.assert_close(ref.inv_freq, hf.model.rotary_emb.inv_freq.float(), atol=1e-7, rtol=1e-6)
    if name != "llama3_rope":
        return
    cfg = ref.config
    default = rope_frequencies(type(cfg)(**{**cfg.__dict__, "rope_scaling": None}))
    ratio = ref.inv_freq / default
    factor = cfg.rope_scaling["factor"]
    assert (ratio == 1).any(), "no high-frequency band kept unchanged"
    assert torch.isclose(ratio, torch.tensor(1 / factor)).any(), "no low-frequency band divided by factor"
    assert ((ratio < 1) & (ratio > 1 / factor + 1e-6)).any(), "no smoothly interpolated middle band"


@torch.no_grad()
def test_save_pretrained_roundtrip_through_auto_model(pair, tmp_path):
    _name, hf, ref, _ = pair
    ids = _ids(hf.config.vocab_size, (1, 9), seed=7)
    want = ref(ids).logits
    ref.save_pretrained(tmp_path / "single")
    auto = AutoModelForCausalLM.from_pretrained(tmp_path / "single").eval()
    torch.testing.assert_close(auto(ids).logits, want, atol=ATOL, rtol=0)

    ref.save_pretrained(tmp_path / "sharded", max_shard_bytes=20_000)
    files = sorted(os.listdir(tmp_path / "sharded"))
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 1 and "model.safetensors.index.json" in files, files
    with open(tmp_path / "sharded" / "model.safetensors.index.json") as f:
        assert set(json.load(f)["weight_map"].values()) == set(shards)
    auto = AutoModelForCausalLM.from_pretrained(tmp_path / "sharded").eval()
    torch.testing.assert_close(auto(ids).logits, want, atol=ATOL, rtol=0)
    torch.testing.assert_close(
        LlamaModel.from_pretrained(tmp_path / "sharded")(ids).logits, want, atol=0, rtol=0
    )


@torch.no_grad()
def test_loads_checkpoints_sharded_by_transformers(pair, tmp_path):
    _name, hf, _ref, _ = pair
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert sum(f.endswith(".safetensors") for f in os.listdir(tmp_path)) > 1
    ids = _ids(hf.config.vocab_size, (1, 9), seed=8)
    torch.testing.assert_close(
        LlamaModel.from_pretrained(tmp_path)(ids).logits, hf(ids).logits, atol=ATOL, rtol=0
    )
