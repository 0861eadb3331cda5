"""scripts/model_structure.py: known answers for each statistic, and the whole pipeline on a tiny random model."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from refimpl import LlamaModel, ModelConfig
from refimpl.model import apply_rope, rope_cos_sin

_PATH = Path(__file__).resolve().parent.parent / "scripts" / "model_structure.py"
_spec = importlib.util.spec_from_file_location("model_structure", _PATH)
ms = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ms)

T = 40


def causal_uniform(b: int, h: int, t: int) -> torch.Tensor:
    i = torch.arange(t)
    a = (i[None, :] <= i[:, None]).double() / (i[:, None] + 1.0)
    return a.expand(b, h, t, t).clone()


def all_on_first(b: int, h: int, t: int) -> torch.Tensor:
    a = torch.zeros(b, h, t, t, dtype=torch.float64)
    a[..., 0] = 1.0
    return a


# ---------------------------------------------------------------------------------------------------------
# (a) sinks, (b) heavy hitters
# ---------------------------------------------------------------------------------------------------------
def test_sink_mass_known_answers():
    torch.testing.assert_close(ms.sink_mass(all_on_first(2, 3, T), 1, 8), torch.ones(2, 3, dtype=torch.float64))
    uni = ms.sink_mass(causal_uniform(1, 2, T), n_sink=1, min_query=8)
    expect = sum(1 / (i + 1) for i in range(8, T)) / (T - 8)
    torch.testing.assert_close(uni, torch.full((1, 2), expect, dtype=torch.float64))
    assert ms.uniform_sink_mass(T, 1, 8) == pytest.approx(expect)
    assert ms.uniform_sink_mass(T, 4, 8) == pytest.approx(float(ms.sink_mass(causal_uniform(1, 1, T), 4, 8)))


def test_local_and_class_mass_known_answers():
    diag = torch.eye(T, dtype=torch.float64).expand(1, 2, T, T)  # every query attends only to itself
    torch.testing.assert_close(ms.local_mass(diag, window=1, min_query=4), torch.ones(1, 2, dtype=torch.float64))
    assert float(ms.local_mass(all_on_first(1, 1, T), window=4, min_query=8)) == 0.0
    uni = ms.local_mass(causal_uniform(1, 1, T), window=5, min_query=8)
    assert float(uni) == pytest.approx(sum(5 / (i + 1) for i in range(8, T)) / (T - 8))
    cls = torch.zeros(1, T, dtype=torch.bool)
    cls[0, ::4] = True  # every 4th key, token 0 included
    mass, base = ms.key_class_mass(all_on_first(1, 2, T), cls, min_query=8)
    torch.testing.assert_close(mass, torch.ones(1, 2, dtype=torch.float64))
    mass, base = ms.key_class_mass(causal_uniform(1, 2, T), cls, min_query=8)
    torch.testing.assert_close(mass, base[:, None].expand(1, 2))  # uniform attention = the uniform baseline


def test_accumulated_attention_and_top_share():
    u = causal_uniform(1, 1, T)
    torch.testing.assert_close(ms.accumulated_attention(u)[0, 0], ms.uniform_accumulated_attention(T))
    assert float(ms.accumulated_attention(u).sum()) == pytest.approx(T)  # each row gives away exactly 1
    assert float(ms.top_share(torch.ones(50), 0.1)) == pytest.approx(0.1)
    assert float(ms.top_share(torch.tensor([5.0, 1, 1, 1, 1, 1, 0, 0, 0, 0]), 0.1)) == pytest.approx(0.5)
    assert float(ms.top_share(torch.tensor([1.0, 2, 3]), 0.5)) == pytest.approx(5 / 6)  # ceil(1.5) = 2 keys


def test_row_top_share_known_answers():
    torch.testing.assert_close(ms.row_top_share(all_on_first(1, 2, T), 0.1, 8), torch.ones(1, 2, dtype=torch.float64))
    uni = ms.row_top_share(causal_uniform(1, 1, T), 0.1, 8)
    assert float(uni) == pytest.approx(sum(math.ceil(0.1 * (i + 1)) / (i + 1) for i in range(8, T)) / (T - 8))


# ---------------------------------------------------------------------------------------------------------
# (c) channels, (d) spectra
# ---------------------------------------------------------------------------------------------------------
def test_channel_magnitude_and_outlier_ratio():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 50, 8, generator=g).sign()  # |x| = 1 everywhere
    x[:, 1, :, 5] *= 7.0  # one outlier channel in head 1
    mag = ms.channel_magnitude(x)
    assert mag.shape == (3, 8)
    torch.testing.assert_close(ms.outlier_ratio(mag), torch.tensor([1.0, 7.0, 1.0]))


def test_head_groups_layout():
    x = torch.arange(2 * 4 * 3 * 2, dtype=torch.float32).view(2, 4, 3, 2)  # [B, H, T, D]
    groups = ms.head_groups(x, 2)
    assert len(groups) == 2 and groups[0].shape == (6, 4)
    # row (batch 1, token 2) of group 1 = heads 2 and 3 of that token, side by side
    torch.testing.assert_close(groups[1][1 * 3 + 2], torch.cat([x[1, 2, 2], x[1, 3, 2]]))


def test_spectra_known_rank_and_gram_matches_svd():
    g = torch.Generator().manual_seed(1)
    low = torch.randn(30, 2, generator=g) @ torch.randn(2, 12, generator=g)  # rank 2 matrix
    cum = ms.cumulative_energy(low)
    assert ms.rank_for_energy(cum, 0.999999) == 2 and float(cum[-1]) == pytest.approx(1.0)
    assert ms.rank_for_energy(torch.tensor([0.5, 0.9, 1.0], dtype=torch.float64), 0.9) == 2
    x = torch.randn(2, 6, 20, 4, generator=g)
    for grp in (1, 3, 6):
        spec = ms.group_spectra(x, grp)
        assert spec.shape == (6 // grp, 4 * grp)
        for i, m in enumerate(ms.head_groups(x, grp)):
            torch.testing.assert_close(spec[i], ms.cumulative_energy(m), atol=1e-9, rtol=0)


# ---------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------
def test_bad_inputs_name_the_parameter():
    p = causal_uniform(1, 1, 8)
    with pytest.raises(ValueError, match="probs"):
        ms.sink_mass(p[0])
    with pytest.raises(ValueError, match="n_sink"):
        ms.sink_mass(p, n_sink=0)
    with pytest.raises(ValueError, match="min_query"):
        ms.sink_mass(p, min_query=8)
    with pytest.raises(ValueError, match="window"):
        ms.local_mass(p, window=0, min_query=2)
    with pytest.raises(ValueError, match="is_class"):
        ms.key_class_mass(p, torch.ones(1, 8), min_query=2)
    with pytest.raises(ValueError, match="frac"):
        ms.top_share(torch.ones(4), 0.0)
    with pytest.raises(ValueError, match="frac"):
        ms.row_top_share(p, 1.5, 2)
    with pytest.raises(ValueError, match="g must be a positive divisor"):
        ms.head_groups(torch.zeros(1, 6, 4, 2), 4)
    with pytest.raises(ValueError, match="g must be a positive divisor"):
        ms.group_spectra(torch.zeros(1, 6, 4, 2), 0)
    with pytest.raises(ValueError, match="threshold"):
        ms.rank_for_energy(torch.ones(3), 1.5)
    with pytest.raises(ValueError, match="n_windows"):
        ms.heldout_windows(None, "x" * 100, 0, 4)
    with pytest.raises(ValueError, match="too short"):
        ms.heldout_windows(None, "x" * 100, 2, 64)


# ---------------------------------------------------------------------------------------------------------
# Whole pipeline on a tiny random model
# ---------------------------------------------------------------------------------------------------------
class CharTok:
    def encode(self, text, add_special_tokens=False):
        return [ord(c) % 61 for c in text]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=61, hidden_size=24, head_dim=6, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4)
    return LlamaModel(cfg).eval()


def test_heldout_windows_seeded():
    text = "".join(f"line {i} of the text\n" for i in range(400))
    a, off_a = ms.heldout_windows(CharTok(), text, 3, 32, seed=5)
    b, off_b = ms.heldout_windows(CharTok(), text, 3, 32, seed=5)
    assert a.shape == (3, 32) and torch.equal(a, b) and off_a == off_b
    assert all(text[o - 1] == "\n" for o in off_a)  # windows start at a line start
    assert off_a == sorted(off_a)  # one per slice of the text


def test_measure_summarize_plot(tiny, tmp_path):
    ids = torch.randint(0, 61, (2, T), generator=torch.Generator().manual_seed(2))
    nl = torch.zeros(61, dtype=torch.bool)
    nl[10] = True
    res = ms.measure(tiny, ids, nl, min_query=8, local_window=4, profile_keys=6)
    assert res["sink"].shape == (2, 2, 4) and res["profile"].shape == (2, 6)
    assert res["k"][0].shape == (2, 4, T, 6)
    # the cached keys are the hooked pre-RoPE keys, rotated
    cos, sin = rope_cos_sin(tiny.inv_freq, torch.arange(T)[None], torch.float32)
    torch.testing.assert_close(res["k"][1], apply_rope(res["k_pre"][1], cos, sin), atol=1e-5, rtol=1e-5)
    # statistics agree with recomputing them from the attention of one window
    with torch.no_grad():
        probs = tiny(ids[1:2], output_attentions=True).attentions[1].double()
    torch.testing.assert_close(res["sink"][1, 1], ms.sink_mass(probs, 1, 8)[0])
    torch.testing.assert_close(res["top"][1, 1], ms.top_share(ms.accumulated_attention(probs)[0], 0.1))
    assert res["spectra"]["v"][4][0].shape == (1, 24)
    out = ms.summarize(res)
    assert len(out["sinks"]["first_token_mass_per_layer"]) == 2
    assert out["low_rank"]["groups"] == [1, 2, 4]
    ranks = out["low_rank"]["k_post_rope"]["g4"]["rank_per_layer"]
    assert all(1 <= r <= 24 for th in ranks.values() for r in th)
    assert all(a <= b <= c for a, b, c in zip(ranks["0.90"], ranks["0.95"], ranks["0.99"]))
    paths = ms.plot_all(res, tmp_path)
    assert [p.name for p in paths] == ["sinks.png", "heavy_hitters.png", "kv_channels.png", "kv_spectrum.png"]
    assert all(p.stat().st_size > 1000 for p in paths)


def test_sink_ablation_known_answer(tiny):
    ids = torch.randint(0, 61, (1, 24), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        logits = tiny(ids).logits[0].double()
    full = math.exp(torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:]).item())
    res = ms.sink_ablation(tiny, ids, budget=32, sinks=2, chunk=4)  # budget >= length: nothing is evicted
    assert list(res) == ["full", "window_32", "sinks_2_window_30"]
    assert all(v == pytest.approx(full, rel=1e-5) for v in res.values())
    short = ms.sink_ablation(tiny, ids, budget=6, sinks=2, chunk=4)
    assert short["window_6"] != pytest.approx(full, rel=1e-3)  # a small window does change the numbers
    with pytest.raises(ValueError, match="sinks"):
        ms.sink_ablation(tiny, ids, budget=6, sinks=6)
