"""The evaluation harness (refimpl/eval/) with known answers, on a refimpl model and its transformers twin."""

from __future__ import annotations

import math
from types import SimpleNamespace

import matplotlib.pyplot as plt
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, DynamicCache

from refimpl import DenseCache, KVCache, LayerKV, LlamaModel, ModelConfig
from refimpl.cache import tensor_bytes
from refimpl.eval import (
    decode_speed,
    divergence,
    kl_divergence,
    measured_kv_bytes,
    needle_correct,
    needle_grid,
    perplexity,
    theoretical_kv_bytes,
)
from refimpl.eval.perplexity import window_spans
from refimpl.hf_bridge import cache_kwargs, make_hf_cache

plt.switch_backend("Agg")
ATOL = 1e-5
L, V = 2, 89


class KeepLast(KVCache):
    """Toy eviction: attend to everything this step, then keep only the last ``budget`` entries."""

    def __init__(self, num_layers: int, budget: int):
        super().__init__(num_layers)
        self.budget, self.kv = budget, [None] * num_layers

    def update(self, i, k, v, key_mask=None) -> LayerKV:
        self._seen[i] += k.shape[2]
        if self.kv[i] is not None:
            k, v = torch.cat([self.kv[i][0], k], 2), torch.cat([self.kv[i][1], v], 2)
        self.kv[i] = (k[:, :, -self.budget :], v[:, :, -self.budget :])
        return LayerKV(k, v)

    def num_entries(self, i: int = 0) -> int:
        return 0 if self.kv[i] is None else self.kv[i][0].shape[2]

    def nbytes(self) -> int:
        return sum(tensor_bytes(*kv) for kv in self.kv if kv is not None)

    def reset(self) -> None:
        self.__init__(self.num_layers, self.budget)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A random refimpl model (GQA, odd sizes) and the same weights loaded by transformers."""
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=V,
        hidden_size=36,
        head_dim=6,
        intermediate_size=40,
        num_hidden_layers=L,
        num_attention_heads=6,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    ref = LlamaModel(cfg).eval()
    path = tmp_path_factory.mktemp("eval_model")
    ref.save_pretrained(path)
    return ref, AutoModelForCausalLM.from_pretrained(path).eval()


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, V, (37,), generator=torch.Generator().manual_seed(3))


# ---------------------------------------------------------------------------------------------------------
# Perplexity
# ---------------------------------------------------------------------------------------------------------
def test_window_spans_known_answer():
    assert window_spans(10, 4, 2) == [
        (0, 1, 4),
        (2, 4, 6),
        (4, 6, 8),
        (6, 8, 10),
    ]  # every token but the first
    assert window_spans(10, 4, 4) == [(0, 1, 4), (4, 5, 8), (8, 9, 10)]  # window starts are not scored
    assert window_spans(5, 8, 8) == [(0, 1, 5)]


@pytest.mark.parametrize("kind", ["refimpl", "hf"])
def test_dense_perplexity_equals_plain_full_forward(models, tokens, kind):
    model = models[0] if kind == "refimpl" else models[1]
    with torch.no_grad():
        logits = model(tokens[None]).logits[0].float()
    nll = F.cross_entropy(logits[:-1].double(), tokens[1:]).item()
    res = perplexity(model, tokens.tolist(), window=64)
    assert res.tokens == 36 and res.windows == 1
    assert res.nll == pytest.approx(nll, abs=ATOL)
    assert res.perplexity == pytest.approx(math.exp(nll), rel=ATOL)
    # token-by-token through the dense cache gives the same number
    assert perplexity(model, tokens, window=64, chunk=1).nll == pytest.approx(nll, abs=ATOL)


def test_windowed_perplexity_equals_forward_per_window(models, tokens):
    ref = models[0]
    total, count = 0.0, 0
    with torch.no_grad():
        for begin, first, end in window_spans(37, 16, 8):
            logits = ref(tokens[None, begin:end]).logits[0].double()
            total += F.cross_entropy(
                logits[first - begin - 1 : end - begin - 1], tokens[first:end], reduction="sum"
            )
            count += end - first
    res = perplexity(ref, tokens, window=16, stride=8, n_bytes=100)
    assert res.tokens == count == 36 and res.windows == 4
    assert res.nll == pytest.approx(total.item() / count, abs=ATOL)
    assert res.bits_per_byte == pytest.approx(total.item() / math.log(2) / 100, abs=ATOL)


def test_perplexity_through_an_evicting_cache(models, tokens):
    ref, hf = models
    dense = perplexity(ref, tokens, window=64).nll
    evict = perplexity(ref, tokens, window=64, cache_factory=lambda: KeepLast(L, 4))
    assert evict.nll != pytest.approx(dense, abs=1e-3)  # each scored token saw only 4 entries + itself
    assert perplexity(hf, tokens, window=64, cache_factory=lambda: KeepLast(L, 4)).nll == pytest.approx(
        evict.nll, abs=ATOL
    )  # same numbers through transformers + the bridge


# ---------------------------------------------------------------------------------------------------------
# Divergence
# ---------------------------------------------------------------------------------------------------------
def test_kl_known_answer():
    p, q = (
        torch.tensor([0.5, 0.5], dtype=torch.float64).log(),
        torch.tensor([0.9, 0.1], dtype=torch.float64).log(),
    )
    want = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    assert kl_divergence(p, q).item() == pytest.approx(want, abs=1e-12)
    assert kl_divergence(p, p).item() == 0


@pytest.mark.parametrize("factory", [None, lambda: DenseCache(L)], ids=["none", "dense"])
def test_divergence_is_zero_for_dense(models, tokens, factory):
    res = divergence(models[0], tokens[:12], tokens[12:20], factory)
    assert res.kl == [0.0] * 8 and res.top1 == [1.0] * 8
    assert res.mean_kl == 0.0 and res.top1_agreement == 1.0


def test_divergence_of_an_evicting_cache(models, tokens):
    ref, hf = models
    prompt = torch.stack([tokens[:12], tokens[12:24]])  # batch of 2
    res = divergence(ref, prompt, tokens[24:32], lambda: KeepLast(L, 3))
    assert res.kl[0] == 0.0  # the prefill attends to everything: the first prediction is untouched
    assert min(res.kl[1:]) > 0 and res.mean_kl > 0
    assert len(res.top1) == 8 and all(a in (0.0, 0.5, 1.0) for a in res.top1)
    via_hf = divergence(hf, prompt, tokens[24:32], lambda: KeepLast(L, 3))
    assert via_hf.kl == pytest.approx(res.kl, abs=ATOL)


# ---------------------------------------------------------------------------------------------------------
# Needle in a haystack
# ---------------------------------------------------------------------------------------------------------
def _fake_generator(model, calls):
    """Samples whose answer is the model's own greedy continuation — spoiled at depth 1.0 always and at depth
    0.5 for odd seeds — so the grid's accuracy is known: columns 1.0, 0.5, 0.0."""

    def make(tokenizer, filler_text, length, depth, seed, kind="passkey"):
        calls.append((length, depth, seed, kind))
        ids = torch.randint(1, V, (1, length), generator=torch.Generator().manual_seed(seed))
        answer = model.generate(ids, max_new_tokens=2)[0].tolist()
        if depth == 1.0 or (depth == 0.5 and seed % 2):
            answer[-1] = (answer[-1] + 1) % V
        return SimpleNamespace(input_ids=ids[0].tolist(), answer_ids=answer, depth=depth, length=length)

    return make


@pytest.mark.parametrize("kind", ["refimpl", "hf"])
def test_needle_grid_known_accuracy(models, kind):
    calls = []
    model = models[0] if kind == "refimpl" else models[1]
    grid = needle_grid(
        model,
        tokenizer=None,
        filler_text="",
        lengths=[6, 9],
        depths=[0.0, 0.5, 1.0],
        n_per_cell=2,
        seed=10,
        make_sample=_fake_generator(models[0], calls),
    )
    assert grid.accuracy.tolist() == [[1.0, 0.5, 0.0], [1.0, 0.5, 0.0]]
    assert grid.mean == pytest.approx(0.5)
    assert [c[2] for c in calls] == list(range(10, 22))  # sample k uses seed + k
    assert {c[3] for c in calls} == {"passkey"}
    fig = plt.figure()
    ax = grid.plot(fig.gca())
    assert ax.images[0].get_array().tolist() == grid.accuracy.tolist()
    plt.close(fig)


class _CharTokenizer:
    """Character-level stand-in for a real tokenizer (ids = code point mod V)."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ord(c) % V for c in text]


def test_needle_grid_with_the_course_generator(models):
    """Wiring to refimpl.synthetic.make_needle_sample: exact lengths, seeds seed + k, accuracy = per-sample scores."""
    from refimpl.synthetic import make_needle_sample

    tok, filler = _CharTokenizer(), "The grass is green. The sky is blue. " * 20
    grid = needle_grid(models[0], tok, filler, lengths=[130, 160], depths=[0.0, 1.0], n_per_cell=2, seed=5)
    k, want = 0, []
    for length in (130, 160):
        row = []
        for depth in (0.0, 1.0):
            hits = 0
            for _ in range(2):
                sample = make_needle_sample(tok, filler, length, depth, 5 + k)
                assert len(sample.input_ids) == length
                hits += needle_correct(models[0], sample)
                k += 1
            row.append(hits / 2)
        want.append(row)
    assert grid.accuracy.tolist() == want


# ---------------------------------------------------------------------------------------------------------
# Memory and speed
# ---------------------------------------------------------------------------------------------------------
def test_theoretical_kv_bytes_known_answers(models):
    llama2_7b = ModelConfig(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
    )
    assert theoretical_kv_bytes(llama2_7b, tokens=1) == 512 * 1024  # 2*32*32*128*2 bytes per token in fp16
    assert theoretical_kv_bytes(llama2_7b, 4096, batch=2, bytes_per_elem=torch.float32) == 2 * 4 * 2**30
    assert theoretical_kv_bytes(llama2_7b, 1, bytes_per_elem=0.5) == 128 * 1024  # 4-bit
    ref, hf = models
    assert (
        theoretical_kv_bytes(hf.config, 10) == theoretical_kv_bytes(ref.config, 10) == 2 * L * 2 * 6 * 10 * 2
    )


def test_measured_equals_theoretical_for_dense_after_forward(models, tokens):
    ref, hf = models
    ids = torch.stack([tokens[:11], tokens[11:22]])
    want = theoretical_kv_bytes(ref.config, tokens=11, batch=2, bytes_per_elem=4)
    caches = [DenseCache(L), DynamicCache(), make_hf_cache(DenseCache(L))]
    with torch.no_grad():
        ref(ids, cache=caches[0])
        hf(ids, **cache_kwargs(hf, caches[1]))
        hf(ids, **cache_kwargs(hf, caches[2]))
    assert [measured_kv_bytes(c) for c in caches] == [want] * 3
    evicting = KeepLast(L, 4)
    with torch.no_grad():
        ref(ids, cache=evicting)
    assert measured_kv_bytes(evicting) == theoretical_kv_bytes(
        ref.config, tokens=4, batch=2, bytes_per_elem=4
    )


@pytest.mark.parametrize("kind", ["refimpl", "hf"])
def test_decode_speed_reports_consistent_numbers(models, kind):
    model = models[0] if kind == "refimpl" else models[1]
    res = decode_speed(model, prompt_len=8, new_tokens=4, batch=2, warmup=1)
    assert res.tokens_per_s > 0 and res.ms_per_step > 0 and res.prefill_s > 0
    assert res.tokens_per_s == pytest.approx(2 * 1000 / res.ms_per_step)
    assert res.kv_bytes == theoretical_kv_bytes(models[0].config, tokens=8 + 4, batch=2, bytes_per_elem=4)
    assert res.device == "cpu" and res.memory_method.startswith("cpu") and res.peak_memory_bytes >= 0
    small = decode_speed(model, prompt_len=8, new_tokens=4, batch=2, cache_factory=lambda: KeepLast(L, 3))
    assert small.kv_bytes == theoretical_kv_bytes(models[0].config, tokens=3, batch=2, bytes_per_elem=4)
