"""Bad input gets a clear error that names the parameter (and the allowed values where there is a finite set)."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
)

from refimpl import DenseCache, LayerKV, LlamaModel, ModelConfig
from refimpl.eval import (
    decode_speed,
    divergence,
    measured_kv_bytes,
    needle_grid,
    perplexity,
    theoretical_kv_bytes,
)
from refimpl.hf_bridge import (
    cache_kwargs,
    disable_kvcourse_attention,
    enable_kvcourse_attention,
    make_hf_cache,
)

SMALL = {
    "vocab_size": 50,
    "hidden_size": 16,
    "intermediate_size": 24,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}


@pytest.fixture(scope="module")
def ref():
    torch.manual_seed(0)
    return LlamaModel(ModelConfig(**SMALL)).eval()


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(**SMALL, bos_token_id=None, eos_token_id=None, pad_token_id=0)
    ).eval()
    model.save_pretrained(tmp_path_factory.mktemp("bad_hf"))
    return model


# ---------------------------------------------------------------------------------------------------------
# The lead's foundation: config, checkpoints, dtype, cache
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw, match",
    [
        (
            {"num_attention_heads": 6, "num_key_value_heads": 4, "hidden_size": 24},
            r"num_attention_heads \(6\) must be divisible by num_key_value_heads \(4\).*\[1, 2, 3, 6\]",
        ),
        ({"hidden_size": 30, "num_attention_heads": 4}, "hidden_size .* divisible by num_attention_heads"),
        ({"head_dim": 5, "hidden_size": 20, "num_attention_heads": 4}, "head_dim must be even"),
        ({"model_type": "gpt2"}, r"model_type must be one of \('llama', 'mistral', 'qwen2'\)"),
        ({"rope_scaling": {"rope_type": "yarn"}}, r"rope_type must be one of \('default', 'llama3'\)"),
        ({"num_hidden_layers": 0}, "num_hidden_layers must be a positive int"),
    ],
)
def test_model_config_rejects(kw, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**{**SMALL, **kw})


def test_non_llama_checkpoint_is_rejected(tmp_path):
    GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=10).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"model_type 'gpt2'.*supported model_type values: \('llama'"):
        LlamaModel.from_pretrained(tmp_path)


def test_missing_checkpoint_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        LlamaModel.from_pretrained(tmp_path / "nope")


@pytest.mark.parametrize("dtype", ["float8", "int8", torch.int8, torch.float64])
def test_unknown_dtype_names_allowed_values(ref, tmp_path, dtype):
    with pytest.raises(ValueError, match=r"dtype must be one of \['bf16', 'bfloat16', 'float16', 'float32'"):
        ref.save_pretrained(tmp_path, dtype=dtype)
    ref.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="dtype must be one of"):
        LlamaModel.from_pretrained(tmp_path, dtype=dtype)


def test_dense_cache_read_past_written():
    c = DenseCache(num_layers=2)
    c.update(0, torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4))
    with pytest.raises(IndexError, match=r"requested positions \[1, 5\) but layer 0 holds 3 entries"):
        c.get(0, 1, 5)
    with pytest.raises(IndexError, match="holds 0 entries"):
        c.get(1, 0, 1)
    with pytest.raises(IndexError, match=r"\[2, 1\)"):
        c.get(0, 2, 1)


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (
            lambda c: c.update(2, torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4)),
            IndexError,
            r"layer_idx must be in \[0, 1\]",
        ),
        (
            lambda c: c.update(0, torch.zeros(2, 3, 4), torch.zeros(2, 3, 4)),
            ValueError,
            "batch, kv_heads, tokens, head_dim",
        ),
        (lambda c: c.update(0, torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 2, 4)), ValueError, "must agree"),
        (
            lambda c: c.update(
                0, torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4), torch.ones(1, 2, dtype=torch.bool)
            ),
            ValueError,
            r"key_mask must be \[batch, new_tokens\] = \(1, 3\)",
        ),
        (
            lambda c: (
                c.update(0, torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4)),
                c.update(0, torch.zeros(1, 1, 3, 4), torch.zeros(1, 1, 3, 4)),
            ),
            ValueError,
            "does not match cached",
        ),
        (lambda c: DenseCache(0), ValueError, "num_layers must be a positive int"),
    ],
)
def test_dense_cache_rejects(call, exc, match):
    with pytest.raises(exc, match=match):
        call(DenseCache(num_layers=2))


def test_model_forward_rejects(ref):
    with pytest.raises(ValueError, match=r"input_ids must be \[batch, tokens\]"):
        ref(torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match=r"attention_mask must be \[batch, past \+ new tokens\] = \(1, 3\)"):
        ref(torch.tensor([[1, 2, 3]]), attention_mask=torch.ones(1, 4))
    with pytest.raises(ValueError, match="max_new_tokens must be >= 0"):
        ref.generate(torch.tensor([[1, 2]]), max_new_tokens=-1)


# ---------------------------------------------------------------------------------------------------------
# refimpl.hf_bridge
# ---------------------------------------------------------------------------------------------------------
class _NeedsAttention(DenseCache):
    def needs_attention(self, layer_idx: int) -> bool:
        return True


class _TrimAfterStep(DenseCache):
    """Attends to everything this step, then keeps only the last ``budget[layer]`` entries (eviction after the
    step; different budgets per layer as in PyramidKV)."""

    def __init__(self, num_layers: int, budget: list[int]):
        super().__init__(num_layers)
        self.budget = budget

    def update(self, i, k, v, key_mask=None) -> LayerKV:
        kv = super().update(i, k, v, key_mask)
        n = self.budget[i]
        self.k[i], self.v[i] = self.k[i][:, :, -n:], self.v[i][:, :, -n:]
        if self.mask[i] is not None:
            self.mask[i] = self.mask[i][:, -n:]
        return kv

    def reset(self) -> None:
        self.__init__(self.num_layers, self.budget)


def test_make_hf_cache_needs_a_refimpl_policy():
    with pytest.raises(TypeError, match="policy must be a refimpl.cache.KVCache; got dict"):
        make_hf_cache({})


def test_policy_with_wrong_layer_count(hf):
    with pytest.raises(
        ValueError, match="num_layers=1; build the policy with num_layers = config.num_hidden_layers"
    ):
        hf(torch.tensor([[1, 2, 3]]), **cache_kwargs(hf, make_hf_cache(DenseCache(1))))


def test_attention_scored_policy_without_kvcourse_attention(hf):
    with pytest.raises(
        RuntimeError, match=r"needs_attention\(0\) is True.*enable_kvcourse_attention\(model\)"
    ):
        hf(torch.tensor([[1, 2, 3]]), **cache_kwargs(hf, make_hf_cache(_NeedsAttention(2))))


def test_per_layer_budgets_under_sdpa(hf):
    policy = _TrimAfterStep(2, budget=[3, 2])
    hf(torch.tensor([[1, 2, 3, 4]]), **cache_kwargs(hf, make_hf_cache(policy)))
    with pytest.raises(
        RuntimeError, match="layer 1: .*returned 3 entries but the attention mask was built for 4"
    ):
        hf(torch.tensor([[5]]), **cache_kwargs(hf, make_hf_cache(policy)))


def test_padding_after_eviction_under_sdpa_is_refused(hf):
    enable_kvcourse_attention(hf)
    try:
        hf.set_attn_implementation("sdpa")  # hook installed, attention switched back by hand
        policy, mask = _TrimAfterStep(2, budget=[3, 3]), torch.tensor([[0, 1, 1, 1, 1]])
        hf(torch.tensor([[0, 1, 2, 3, 4]]), attention_mask=mask, **cache_kwargs(hf, make_hf_cache(policy)))
        with pytest.raises(RuntimeError, match=r"padded batch after eviction \(3 of 5 positions kept\)"):
            hf(
                torch.tensor([[5]]),
                attention_mask=torch.cat([mask, mask.new_ones(1, 1)], 1),
                **cache_kwargs(hf, make_hf_cache(policy)),
            )
    finally:
        disable_kvcourse_attention(hf)


def test_kvcourse_attention_without_the_hook(hf, tmp_path):
    hf.save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="kvcourse")
    with pytest.raises(RuntimeError, match=r"enable_kvcourse_attention\(model\)"):
        model(torch.tensor([[1, 2, 3]]))


def test_kvcourse_rejects_4d_masks_and_beam_search(hf):
    enable_kvcourse_attention(hf)
    try:
        with pytest.raises(ValueError, match="attention_mask must be 2-D"):
            hf(torch.tensor([[1, 2]]), attention_mask=torch.ones(1, 1, 2, 2))
        with pytest.raises(NotImplementedError, match="beam search and assisted decoding"):
            hf.generate(
                torch.tensor([[1, 2, 3]]),
                num_beams=2,
                max_new_tokens=2,
                do_sample=False,
                **cache_kwargs(hf, make_hf_cache(DenseCache(2))),
            )
    finally:
        disable_kvcourse_attention(hf)


def test_enable_rejects_sliding_window_and_non_hf_models():
    mistral = MistralForCausalLM(MistralConfig(**SMALL, sliding_window=4))
    with pytest.raises(ValueError, match="sliding_window must be None for the kvcourse attention; got 4"):
        enable_kvcourse_attention(mistral)
    with pytest.raises(TypeError, match="transformers PreTrainedModel; got Linear"):
        enable_kvcourse_attention(torch.nn.Linear(2, 2))


# ---------------------------------------------------------------------------------------------------------
# refimpl.eval
# ---------------------------------------------------------------------------------------------------------
IDS = list(range(1, 20))


@pytest.mark.parametrize(
    "kw, exc, match",
    [
        ({"window": 1}, ValueError, "window must be an int >= 2; got 1"),
        ({"window": 8, "stride": 9}, ValueError, r"stride must be an int in \[1, window=8\]; got 9"),
        ({"window": 8, "stride": 0}, ValueError, r"stride must be an int in \[1, window=8\]"),
        ({"window": 8, "chunk": 0}, ValueError, "chunk must be a positive int or None; got 0"),
        ({"window": 8, "n_bytes": 0}, ValueError, "n_bytes must be a positive int or None"),
        ({"window": 8, "token_ids": [1]}, ValueError, "token_ids must hold at least 2 tokens; got 1"),
        (
            {"window": 8, "token_ids": torch.ones(2, 5, dtype=torch.long)},
            ValueError,
            "token_ids must be one stream",
        ),
        ({"window": 8, "token_ids": torch.rand(5)}, ValueError, "token_ids must hold integer token ids"),
        (
            {"window": 8, "cache_factory": lambda: "dense"},
            TypeError,
            "cache_factory must return a refimpl.cache.KVCache",
        ),
        (
            {"window": 8, "cache_factory": lambda: DenseCache(3)},
            ValueError,
            "num_layers=3; the model has 2 layers",
        ),
        (
            {"window": 8, "cache_factory": DenseCache(2)},
            TypeError,
            "cache_factory must be a zero-argument callable",
        ),
    ],
)
def test_perplexity_rejects(ref, kw, exc, match):
    kw = {"token_ids": IDS, **kw}
    with pytest.raises(exc, match=match):
        perplexity(ref, **kw)


def test_cache_factory_must_return_fresh_caches(ref):
    used = DenseCache(2)
    ref(torch.tensor([[1, 2]]), cache=used)
    with pytest.raises(ValueError, match="fresh cache each call"):
        perplexity(ref, IDS, window=8, cache_factory=lambda: used)


def test_eval_rejects_non_models():
    with pytest.raises(
        TypeError, match="model must be a refimpl.LlamaModel or a transformers causal LM; got Linear"
    ):
        perplexity(torch.nn.Linear(2, 2), IDS, window=8)


def test_divergence_rejects(ref):
    with pytest.raises(
        ValueError, match=r"continuation_ids batch \(3\) must match prompt_ids batch \(2\) or be 1"
    ):
        divergence(ref, torch.ones(2, 4, dtype=torch.long), torch.ones(3, 2, dtype=torch.long), None)
    with pytest.raises(ValueError, match="continuation_ids must be a non-empty"):
        divergence(ref, [1, 2], [], None)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"lengths": []}, "lengths must be a non-empty list of positive ints"),
        ({"lengths": [0]}, "lengths must be a non-empty list of positive ints"),
        ({"depths": [1.5]}, r"depths must be a non-empty list of floats in \[0, 1\]"),
        ({"n_per_cell": 0}, "n_per_cell must be a positive int"),
    ],
)
def test_needle_grid_rejects(ref, kw, match):
    kw = {"lengths": [8], "depths": [0.5], **kw}
    with pytest.raises(ValueError, match=match):
        needle_grid(ref, None, "", make_sample=lambda *a, **k: None, **kw)


def test_memory_rejects(ref):
    with pytest.raises(ValueError, match="tokens must be a non-negative int"):
        theoretical_kv_bytes(ref.config, -1)
    with pytest.raises(ValueError, match="batch must be a positive int"):
        theoretical_kv_bytes(ref.config, 1, batch=0)
    with pytest.raises(ValueError, match="bytes_per_elem must be a positive number or a torch.dtype"):
        theoretical_kv_bytes(ref.config, 1, bytes_per_elem=0)
    with pytest.raises(TypeError, match="config must be a refimpl.ModelConfig or a transformers config"):
        theoretical_kv_bytes(object(), 1)
    with pytest.raises(TypeError, match="cache must be a refimpl KVCache or a transformers Cache; got dict"):
        measured_kv_bytes({})


def test_decode_speed_rejects(ref):
    with pytest.raises(ValueError, match="new_tokens must be an int >= 1; got 0"):
        decode_speed(ref, prompt_len=4, new_tokens=0)
    with pytest.raises(ValueError, match=r"device must be where the model lives \(cpu\); got meta"):
        decode_speed(ref, prompt_len=4, new_tokens=1, device="meta")


def test_from_pretrained_rejects_unexpected_tensors(tmp_path):
    """A qwen2 checkpoint relabelled as llama must not load with its q/k/v biases silently dropped."""
    import json

    from refimpl import LlamaModel, ModelConfig

    torch.manual_seed(0)
    m = LlamaModel(ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                               num_attention_heads=4, model_type="qwen2", qkv_bias=True, tie_word_embeddings=False))
    m.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["model_type"] = "llama"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unexpected"):
        LlamaModel.from_pretrained(tmp_path)
