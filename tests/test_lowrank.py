"""Low-rank MHA→GQA conversion (refimpl.lowrank, refimpl.calibration; arXiv 2406.07056).

Known answers (techniques.md §2(d)): full rank reproduces the model; group caches that truly are rank-d (in the
RoPE-commuting sense) convert exactly; the retained-energy formula equals the measured reconstruction error;
the RoPE-unaware fold breaks under RoPE even when it keeps 100% of the energy.
"""

from __future__ import annotations

import pytest
import torch

from refimpl import LlamaModel, ModelConfig
from refimpl.calibration import attention_input_stats, check_calibration_ids, collect_kv
from refimpl.lowrank import (
    allowed_kv_heads,
    commuting_block,
    convert_to_gqa,
    cumulative_energy,
    pca_basis,
    plan_conversion,
    rope_aware_basis,
    rope_matrix,
    singular_values,
)
from refimpl.model import apply_rope, rope_cos_sin

VOCAB = 97


def tiny(heads: int = 6, kv_heads: int | None = None, head_dim: int = 8, layers: int = 2, seed: int = 0,
         **kw) -> LlamaModel:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                      max_position_embeddings=256, **kw)
    return LlamaModel(cfg).eval()


def calib_ids(seed: int = 1, batch: int = 4, tokens: int = 40) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, tokens), generator=g)


def max_logit_err(a: LlamaModel, b: LlamaModel, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return (a(ids).logits - b(ids).logits).abs().max().item()


def make_group_low_rank(model: LlamaModel, num_key_value_heads: int, seed: int = 3) -> None:
    """Rewrite k/v weights so each new group's cache is exactly rank d: W_K^s = A_s W_base with A_s commuting
    with RoPE (a complex scalar per frequency), W_V^s = M_s W_vbase with generic invertible M_s."""
    cfg = model.config
    d, n_src = cfg.head_dim, cfg.num_key_value_heads
    g = n_src // num_key_value_heads
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.model.layers:
            att = layer.self_attn
            for j in range(num_key_value_heads):
                kb = torch.randn(d, cfg.hidden_size, generator=gen) / cfg.hidden_size ** 0.5
                vb = torch.randn(d, cfg.hidden_size, generator=gen) / cfg.hidden_size ** 0.5
                for s in range(j * g, (j + 1) * g):
                    c = torch.complex(torch.randn(d // 2, generator=gen), torch.randn(d // 2, generator=gen)).to(torch.complex128)
                    a = commuting_block(c).float()
                    m = torch.randn(d, d, generator=gen) / d ** 0.5 + torch.eye(d)
                    att.k_proj.weight[s * d:(s + 1) * d] = a @ kb
                    att.v_proj.weight[s * d:(s + 1) * d] = m @ vb


# ---------------------------------------------------------------------------------------------------------
# RoPE algebra
# ---------------------------------------------------------------------------------------------------------
def test_rope_matrix_is_the_models_rope():
    model = tiny()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 1, 5, 8, generator=gen)
    pos = torch.tensor([[0, 3, 17, 101, 250]])
    cos, sin = rope_cos_sin(model.inv_freq, pos, torch.float32)
    want = apply_rope(x, cos, sin)[0, 0]
    got = torch.stack([rope_matrix(model.inv_freq, float(p)) @ x[0, 0, i].double() for i, p in enumerate(pos[0])])
    torch.testing.assert_close(got.float(), want, atol=1e-5, rtol=1e-5)


def test_rope_aware_key_basis_commutes_with_rope_at_random_positions():
    model = tiny(heads=4, kv_heads=4)
    stats = attention_input_stats(model, calib_ids())
    gen = torch.Generator().manual_seed(5)
    positions = (torch.rand(6, generator=gen) * 2000).tolist() + [1.0, 7.0]
    d = model.config.head_dim
    worst_aware, best_unaware = 0.0, float("inf")
    aware = plan_conversion(model, 2, stats, "rope_aware")[0].key_u[0]
    unaware = plan_conversion(model, 2, stats, "rope_unaware")[0].key_u[0]
    for n in positions:
        r = rope_matrix(model.inv_freq, n)
        for s in range(2):
            a, u = aware[s * d:(s + 1) * d], unaware[s * d:(s + 1) * d]
            worst_aware = max(worst_aware, (r @ a - a @ r).abs().max().item())
            best_unaware = min(best_unaware, (r @ u - u @ r).abs().max().item())
    assert worst_aware < 1e-12, worst_aware
    assert best_unaware > 1e-2, best_unaware
    # The score identity the fold relies on: <R_m A^T q, R_n k'> = <R_m q, R_n A k'> at random positions.
    q, kp = torch.randn(d, generator=gen).double(), torch.randn(d, generator=gen).double()
    for m, n in zip(positions, reversed(positions)):
        rm, rn = rope_matrix(model.inv_freq, m), rope_matrix(model.inv_freq, n)
        a, u = aware[:d], unaware[:d]
        assert torch.allclose((rm @ a.T @ q) @ (rn @ kp), (rm @ q) @ (rn @ a @ kp), atol=1e-10)
        assert not torch.allclose((rm @ u.T @ q) @ (rn @ kp), (rm @ q) @ (rn @ u @ kp), atol=1e-3)


def test_rope_aware_basis_has_orthonormal_columns_and_commuting_blocks():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(200, 3 * 8, generator=gen).double()
    c = x.T @ x
    for real in (False, True):
        u, e = rope_aware_basis(c, 3, 8, real=real)
        torch.testing.assert_close(u.T @ u, torch.eye(8, dtype=torch.float64), atol=1e-12, rtol=0)
        for s in range(3):
            blk = u[s * 8:(s + 1) * 8]
            assert torch.allclose(blk[:4, :4], blk[4:, 4:]) and torch.allclose(blk[:4, 4:], -blk[4:, :4])
            assert torch.count_nonzero(blk[:4, :4] - torch.diag(torch.diagonal(blk[:4, :4]))) == 0
        assert 0 < e < 1


def test_complex_pca_is_optimal_among_commuting_bases():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(300, 2 * 8, generator=gen).double() @ torch.randn(16, 16, generator=gen).double()
    c = x.T @ x
    _, best = rope_aware_basis(c, 2, 8)
    _, real = rope_aware_basis(c, 2, 8, real=True)
    assert best >= real - 1e-12
    for _ in range(20):  # random unit complex vectors per frequency: never better than the eigenvector
        z = torch.complex(torch.randn(4, 2, generator=gen).double(), torch.randn(4, 2, generator=gen).double())
        z = z / z.abs().pow(2).sum(1, keepdim=True).sqrt()
        u = torch.cat([commuting_block(z[:, s]) for s in range(2)])
        kept = torch.trace(u.T @ c @ u) / torch.trace(c)
        assert kept <= best + 1e-12


# ---------------------------------------------------------------------------------------------------------
# Known-answer conversions
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key_method", ["rope_aware", "rope_aware_real"])
@pytest.mark.parametrize("kw", [{}, {"model_type": "qwen2", "qkv_bias": True}, {"kv_heads": 3}])
def test_full_rank_reproduces_the_original_model(key_method, kw):
    model = tiny(**kw)
    if kw.get("model_type") == "qwen2":  # make the q/k/v biases non-trivial
        with torch.no_grad():
            for layer in model.model.layers:
                for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    lin.bias.normal_(0, 0.5)
    stats = attention_input_stats(model, calib_ids())
    n = model.config.num_key_value_heads
    conv = convert_to_gqa(model, n, stats, key_method)
    assert conv.config.num_key_value_heads == n
    # not a copy: the value basis (an arbitrary d×d rotation at full rank) moved v_proj and o_proj
    assert (conv.model.layers[0].self_attn.v_proj.weight - model.model.layers[0].self_attn.v_proj.weight).abs().max() > 1e-2
    assert max_logit_err(conv, model, calib_ids(seed=9)) < 1e-4


def test_full_rank_rope_unaware_breaks_only_because_of_rope():
    model = tiny()
    stats = attention_input_stats(model, calib_ids())
    conv = convert_to_gqa(model, 6, stats, "rope_unaware")
    assert all(p.key_energy > 1 - 1e-9 for p in plan_conversion(model, 6, stats, "rope_unaware"))
    assert max_logit_err(conv, model, calib_ids(seed=9)) > 1e-2  # rotation between W_K and the score
    single = calib_ids(seed=9)[:, :1]  # one token at position 0: R_0 = I, the fold is exact again
    assert max_logit_err(conv, model, single) < 1e-4


@pytest.mark.parametrize("heads,kv_src,kv_new", [(6, 6, 2), (6, 3, 1), (4, 4, 2)])
def test_rank_d_groups_convert_exactly_with_rope_aware_keys(heads, kv_src, kv_new):
    model = tiny(heads=heads, kv_heads=kv_src)
    make_group_low_rank(model, kv_new)
    stats = attention_input_stats(model, calib_ids())
    ids = calib_ids(seed=9)
    aware = convert_to_gqa(model, kv_new, stats, "rope_aware")
    assert aware.config.num_key_value_heads == kv_new
    assert max_logit_err(aware, model, ids) < 1e-4
    plans = plan_conversion(model, kv_new, stats, "rope_unaware")
    assert all(p.key_energy > 1 - 1e-9 and p.value_energy > 1 - 1e-9 for p in plans)
    assert max_logit_err(convert_to_gqa(model, kv_new, stats, "rope_unaware"), model, ids) > 1e-2


def test_retained_energy_equals_measured_reconstruction_error_before_and_after_rope():
    model = tiny()
    ids = calib_ids()
    stats = attention_input_stats(model, ids)
    acts = collect_kv(model, ids)
    d = model.config.head_dim
    for method in ("rope_aware", "rope_unaware"):
        plans = plan_conversion(model, 2, stats, method)
        for plan, act in zip(plans, acts):
            for which, u, energy in (("k", plan.key_u, plan.key_energy), ("v", plan.value_u, plan.value_energy)):
                x = act.k_pre_rope if which == "k" else act.v
                grp = x.double().view(2, 3, -1, d).permute(0, 2, 1, 3).reshape(2, -1, 3 * d)  # [new head, N, g·d]
                rec = grp @ u @ u.transpose(1, 2)
                measured = 1 - (grp - rec).pow(2).sum() / grp.pow(2).sum()
                assert abs(measured.item() - energy) < 1e-6, (method, which)
            if method == "rope_aware":  # the same basis keeps the same energy of the post-RoPE cache
                grp = act.k_post_rope.double().view(2, 3, -1, d).permute(0, 2, 1, 3).reshape(2, -1, 3 * d)
                rec = grp @ plan.key_u @ plan.key_u.transpose(1, 2)
                measured = 1 - (grp - rec).pow(2).sum() / grp.pow(2).sum()
                assert abs(measured.item() - plan.key_energy) < 1e-5


def test_fewer_heads_keep_less_energy_and_unaware_keeps_most():
    model = tiny()
    stats = attention_input_stats(model, calib_ids())
    energy = {(m, n): sum(p.key_energy for p in plan_conversion(model, n, stats, m))
              for m in ("rope_aware", "rope_aware_real", "rope_unaware") for n in (3, 2, 1)}
    for m in ("rope_aware", "rope_aware_real", "rope_unaware"):
        assert energy[(m, 3)] > energy[(m, 2)] > energy[(m, 1)]
    for n in (3, 2, 1):  # unconstrained PCA ≥ complex per-frequency ≥ real per-frequency
        assert energy[("rope_unaware", n)] > energy[("rope_aware", n)] > energy[("rope_aware_real", n)]


def test_conversion_is_deterministic():
    model = tiny()
    stats = attention_input_stats(model, calib_ids())
    a, b = convert_to_gqa(model, 2, stats), convert_to_gqa(model, 2, stats)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


# ---------------------------------------------------------------------------------------------------------
# Calibration statistics
# ---------------------------------------------------------------------------------------------------------
def test_stats_give_the_cache_second_moment_and_ignore_padding():
    model = tiny()
    ids = calib_ids()
    stats = attention_input_stats(model, ids)
    acts = collect_kv(model, ids)
    for layer, s, act in zip(model.model.layers, stats.gram, acts):
        w = layer.self_attn.k_proj.weight.double()
        wt = torch.cat([w, torch.zeros(w.shape[0], 1, dtype=w.dtype)], 1)
        k = act.k_pre_rope.double().transpose(0, 1).reshape(-1, w.shape[0])  # [N, H·d]
        torch.testing.assert_close(wt @ s @ wt.T, k.T @ k, rtol=1e-4, atol=1e-5)  # k is fp32
    # Left padding: the padded batch yields exactly the statistics of the real tokens.
    short = ids[:2, 10:]
    padded = torch.cat([torch.zeros(2, 10, dtype=ids.dtype), short], 1)
    mask = torch.cat([torch.zeros(2, 10, dtype=torch.long), torch.ones_like(short)], 1)
    a = attention_input_stats(model, padded, attention_mask=mask, min_tokens=1)
    b = attention_input_stats(model, short, min_tokens=1)
    assert a.num_tokens == b.num_tokens == short.numel()
    for ga, gb in zip(a.gram, b.gram):
        torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-5)


def test_spectrum_helpers_known_answers():
    torch.testing.assert_close(cumulative_energy(torch.tensor([4.0, 3.0])), torch.tensor([16 / 25, 1.0]).double())
    x = torch.outer(torch.arange(1.0, 6.0), torch.tensor([1.0, 2.0, 2.0]))  # rank 1, σ = |a|·|b| = √55 · 3
    s = singular_values(x)
    assert abs(s[0].item() - 55 ** 0.5 * 3) < 1e-9 and s[1:].abs().max() < 1e-9
    u, e = pca_basis(torch.diag(torch.tensor([1.0, 5.0, 4.0])), 2)
    assert abs(e - 0.9) < 1e-12 and torch.allclose(u.abs(), torch.tensor([[0.0, 0], [1, 0], [0, 1]]).double())


# ---------------------------------------------------------------------------------------------------------
# Export → reload
# ---------------------------------------------------------------------------------------------------------
def test_export_reloads_in_plain_transformers_and_refimpl(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    transformers = pytest.importorskip("transformers")
    model = tiny()
    stats = attention_input_stats(model, calib_ids())
    conv = convert_to_gqa(model, 2, stats)
    conv.save_pretrained(tmp_path)
    ids = calib_ids(seed=9)[:2, :24]
    with torch.no_grad():
        want = conv(ids).logits
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
        assert type(hf).__name__ == "LlamaForCausalLM" and hf.config.num_key_value_heads == 2
        assert hf.model.layers[0].self_attn.k_proj.weight.shape[0] == 2 * model.config.head_dim
        torch.testing.assert_close(hf(ids).logits, want, atol=1e-4, rtol=1e-4)
        back = LlamaModel.from_pretrained(tmp_path)
        assert back.config.num_key_value_heads == 2
        torch.testing.assert_close(back(ids).logits, want, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------
def test_bad_head_counts_are_rejected_with_allowed_values():
    model = tiny()
    stats = attention_input_stats(model, calib_ids())
    assert allowed_kv_heads(model) == [1, 2, 3, 6]
    for bad in (4, 5, 0, 7, 12, -2, 2.0, True, "2"):
        with pytest.raises(ValueError, match=r"num_key_value_heads.*allowed values: \[1, 2, 3, 6\]"):
            convert_to_gqa(model, bad, stats)
    with pytest.raises(ValueError, match="key_method must be one of"):
        convert_to_gqa(model, 2, stats, key_method="svd")
    gqa = tiny(kv_heads=2)
    with pytest.raises(ValueError, match=r"allowed values: \[1, 2\]"):
        plan_conversion(gqa, 3, attention_input_stats(gqa, calib_ids()))


def test_bad_calibration_is_rejected():
    model = tiny()
    with pytest.raises(ValueError, match=r"calibration holds 20 tokens.*min_tokens=48"):
        attention_input_stats(model, calib_ids(tokens=10, batch=2))
    with pytest.raises(ValueError, match="integer tensor"):
        attention_input_stats(model, calib_ids().float())
    with pytest.raises(ValueError, match="integer tensor"):
        attention_input_stats(model, calib_ids()[0])
    with pytest.raises(ValueError, match=r"must lie in \[0, 96\]"):
        attention_input_stats(model, calib_ids() + VOCAB)
    with pytest.raises(ValueError, match="attention_mask must have the shape"):
        check_calibration_ids(model, calib_ids(), torch.ones(4, 3))
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        attention_input_stats(model, calib_ids(), batch_size=0)
    other = tiny(layers=3)
    with pytest.raises(ValueError, match="stats were collected on a model with 3 layers"):
        plan_conversion(model, 2, attention_input_stats(other, calib_ids()))
