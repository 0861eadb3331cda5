"""refimpl.kv_size: known answers on published configs, sliding windows, MLA, quantised formats, errors, CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from refimpl import LlamaModel, ModelConfig
from refimpl.kv_size import (
    bundled_configs,
    format_bytes,
    kv_bytes,
    kv_cache_size,
    main,
    read_kv_spec,
)

EXPECTED_BUNDLED = {"llama-2-7b", "llama-2-70b", "llama-3-8b", "mistral-7b", "qwen2.5-7b", "opt-30b",
                    "deepseek-v3", "gemma-2-9b"}


def test_bundled_configs_present():
    assert EXPECTED_BUNDLED <= set(bundled_configs())


# ------------------------------------------------------------------------------------------ known answers
def test_llama2_70b_known_answer():
    s = kv_cache_size("llama-2-70b", context=4096, batch=1, dtype="fp16")
    assert s.total_bytes == 2 * 80 * 4096 * 8 * 128 * 2 == 1_342_177_280
    assert s.human == "1.34 GB (1.25 GiB)"
    assert s.bytes_per_token == 327_680  # 320 KiB per token
    # the same model with multi-head attention (64 KV heads) would need 8x
    cfg = json.loads(bundled_configs()["llama-2-70b"].read_text())
    assert kv_cache_size({**cfg, "num_key_value_heads": 64}, 4096).total_bytes == 8 * s.total_bytes
    assert kv_cache_size({**cfg, "num_key_value_heads": 1}, 4096).total_bytes * 8 == s.total_bytes


@pytest.mark.parametrize("name,per_token", [
    ("llama-2-7b", 2 * 32 * 32 * 128 * 2),  # 512 KiB: MHA
    ("llama-3-8b", 2 * 32 * 8 * 128 * 2),  # 128 KiB: GQA 4 groups
    ("qwen2.5-7b", 2 * 28 * 4 * 128 * 2),  # 56 KiB: GQA 7 groups, use_sliding_window false -> all full
    ("opt-30b", 2 * 48 * 56 * 128 * 2),  # OPT has no num_key_value_heads: MHA, head_dim = 7168 / 56
    ("deepseek-v3", 61 * (512 + 64) * 2),  # MLA latent + decoupled RoPE key, no factor 2
])
def test_bytes_per_token_of_published_configs(name, per_token):
    for t, b in [(1, 1), (4096, 1), (1000, 3)]:
        s = kv_cache_size(name, context=t, batch=b)
        assert s.total_bytes == per_token * t * b
        assert s.per_sequence_bytes == per_token * t


def test_opt30b_180gb_needs_batch_128():
    # H2O (Zhang et al. 2023, §1): "a 30 billion-parameter model with an input batch size of 128 and a sequence
    # length of 1024 results in 180GB of KV cache"
    s = kv_cache_size("opt-30b", context=1024, batch=128, dtype="fp16")
    assert s.total_bytes == 180_388_626_432
    assert format_bytes(s.total_bytes) == "180 GB"
    assert format_bytes(kv_cache_size("opt-30b", context=1024, batch=1).total_bytes) == "1.41 GB"


def test_deepseek_v3_mla_latent_vs_expanded():
    lat = kv_cache_size("deepseek-v3", context=4096)
    exp = kv_cache_size("deepseek-v3", context=4096, mla="expanded")
    assert lat.total_bytes == 61 * 576 * 4096 * 2
    assert exp.total_bytes == 61 * 128 * (128 + 64 + 128) * 4096 * 2
    assert exp.total_bytes / lat.total_bytes == pytest.approx(40960 / 576)
    spec = read_kv_spec("deepseek-v3")
    assert spec.is_mla and spec.num_kv_heads == 1 and spec.head_dim == 576


def test_mistral_sliding_window_caps_every_layer():
    m = kv_cache_size("mistral-7b", context=32768)
    llama3 = kv_cache_size("llama-3-8b", context=4096)  # same layers/heads/head_dim, full attention
    assert m.total_bytes == llama3.total_bytes  # 32768 tokens held as min(32768, 4096)
    assert all(layer.kind == "sliding" and layer.tokens == 4096 for layer in m.layers)
    assert kv_cache_size("mistral-7b", context=1000).total_bytes == kv_cache_size("llama-3-8b", context=1000).total_bytes


def test_gemma2_alternates_starting_with_sliding():
    spec = read_kv_spec("gemma-2-9b")
    assert spec.layer_kinds[:4] == ("sliding", "full", "sliding", "full") and spec.layer_kinds.count("full") == 21
    s = kv_cache_size("gemma-2-9b", context=8192)
    per_tok_layer = 2 * 8 * 256 * 2
    assert s.total_bytes == 21 * per_tok_layer * 8192 + 21 * per_tok_layer * 4096


BASE = {"model_type": "toy", "num_hidden_layers": 6, "num_attention_heads": 4, "num_key_value_heads": 2,
        "hidden_size": 64}  # head_dim 16 -> 2*2*16 = 64 elements per token per layer


def test_layer_types_and_patterns():
    lt = ["sliding_attention", "sliding_attention", "full_attention"] * 2
    s = kv_cache_size({**BASE, "layer_types": lt, "sliding_window": 10}, context=100, dtype="fp32")
    assert [layer.tokens for layer in s.layers] == [10, 10, 100, 10, 10, 100]
    assert s.total_bytes == (4 * 10 + 2 * 100) * 64 * 4
    # Gemma-3 style pattern: every 3rd layer full
    p = read_kv_spec({**BASE, "sliding_window": 10, "sliding_window_pattern": 3})
    assert p.layer_kinds == ("sliding", "sliding", "full") * 2
    # Qwen2: the window applies to layers >= max_window_layers, only with use_sliding_window
    q = {**BASE, "model_type": "qwen2", "sliding_window": 10, "max_window_layers": 4}
    assert read_kv_spec({**q, "use_sliding_window": True}).layer_kinds == ("full",) * 4 + ("sliding",) * 2
    assert read_kv_spec({**q, "use_sliding_window": False}).layer_kinds == ("full",) * 6
    # a context shorter than the window: nothing is dropped
    assert kv_cache_size({**BASE, "sliding_window": 10}, context=7).total_bytes == kv_bytes(6, 2, 16, 7)


def test_aliases_head_dim_and_text_config():
    gpt2 = {"model_type": "gpt2", "n_layer": 12, "n_head": 12, "n_embd": 768}
    assert kv_cache_size(gpt2, 1024).total_bytes == 2 * 12 * 12 * 64 * 1024 * 2
    falcon_mqa = {"model_type": "falcon", "num_hidden_layers": 32, "num_attention_heads": 71, "hidden_size": 4544,
                  "multi_query": True}
    assert read_kv_spec(falcon_mqa).num_kv_heads == 1
    explicit = {**BASE, "head_dim": 40}  # head_dim given explicitly wins over hidden_size / heads
    assert read_kv_spec(explicit).head_dim == 40
    wrapped = {"model_type": "wrapper", "text_config": BASE}
    assert kv_cache_size(wrapped, 9).total_bytes == kv_cache_size(BASE, 9).total_bytes


def test_config_inputs_agree(tmp_path):
    path = bundled_configs()["llama-3-8b"]
    cfg = json.loads(path.read_text())
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    want = kv_cache_size(cfg, 123).total_bytes
    for src in ("llama-3-8b", path, str(path), tmp_path):
        assert kv_cache_size(src, 123).total_bytes == want
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in cfg.items() if not k.startswith("_")})
    assert kv_cache_size(hf_cfg, 123).total_bytes == want


def test_formula_matches_bytes_measured_from_a_real_cache():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, hidden_size=48, intermediate_size=32, num_hidden_layers=3,
                      num_attention_heads=6, num_key_value_heads=2)
    model = LlamaModel(cfg).eval()
    for b, t, dtype, name in [(1, 7, torch.float32, "fp32"), (3, 5, torch.bfloat16, "bf16")]:
        m = model.to(dtype)
        cache = m.new_cache()
        m(torch.randint(0, 50, (b, t)), cache=cache)
        assert kv_cache_size(cfg.to_hf(), context=t, batch=b, dtype=name).total_bytes == cache.nbytes()


# ------------------------------------------------------------------------------------- quantised formats
def test_dtypes_and_bit_widths():
    fp16 = kv_cache_size("llama-3-8b", 4096).total_bytes
    assert kv_cache_size("llama-3-8b", 4096, dtype="fp32").total_bytes == 2 * fp16
    assert kv_cache_size("llama-3-8b", 4096, dtype="bf16").total_bytes == fp16
    assert kv_cache_size("llama-3-8b", 4096, dtype="fp8").total_bytes * 2 == fp16
    assert kv_cache_size("llama-3-8b", 4096, dtype="int4").total_bytes * 4 == fp16
    assert kv_cache_size("llama-3-8b", 4096, dtype="2bit").total_bytes * 8 == fp16
    assert kv_cache_size("llama-3-8b", 4096, dtype=3).total_bytes * 16 == fp16 * 3


def test_group_scales_zero_points_and_residual():
    fp16 = kv_cache_size("llama-3-8b", 4096).total_bytes
    # int4 with one fp16 scale + one fp16 zero-point per 32 elements = 4 + 32/32 = 5 bits per element
    q = kv_cache_size("llama-3-8b", 4096, dtype="int4", group_size=32)
    assert q.total_bytes * 16 == fp16 * 5
    assert q.scale_bytes * 16 == fp16 * 1
    sym = kv_cache_size("llama-3-8b", 4096, dtype="int4", group_size=32, zero_point=False)
    assert sym.total_bytes * 32 == fp16 * 9  # 4 + 16/32 = 4.5 bits
    # KIVI residual: the last R tokens stay in 16 bits; R >= context means nothing is quantised
    assert kv_cache_size("llama-3-8b", 100, dtype="int2", group_size=32, residual_tokens=128).total_bytes == \
        kv_cache_size("llama-3-8b", 100).total_bytes
    r = kv_cache_size("llama-3-8b", 4096, dtype="int2", residual_tokens=128).total_bytes
    per_tok16 = 2 * 32 * 8 * 128 * 2
    assert r == per_tok16 * 128 + per_tok16 * (4096 - 128) // 8


# ----------------------------------------------------------------------------------------------- errors
def test_errors_are_clear():
    with pytest.raises(ValueError, match=r"dtype must be one of \[.*'fp16'.*\] or an int bit width 1..32; got 'fp12'"):
        kv_cache_size("llama-2-7b", dtype="fp12")
    with pytest.raises(ValueError, match="bit width must be in 1..32; got 0"):
        kv_cache_size("llama-2-7b", dtype=0)
    with pytest.raises(KeyError, match="missing 'num_hidden_layers'"):
        read_kv_spec({"model_type": "llama", "num_attention_heads": 4, "hidden_size": 64})
    with pytest.raises(KeyError, match="missing 'hidden_size'"):
        read_kv_spec({"num_hidden_layers": 2, "num_attention_heads": 4})
    with pytest.raises(KeyError, match="missing 'v_head_dim'"):
        read_kv_spec({**BASE, "kv_lora_rank": 8, "qk_rope_head_dim": 4, "qk_nope_head_dim": 4})
    with pytest.raises(ValueError, match="must divide num_attention_heads"):
        read_kv_spec({**BASE, "num_key_value_heads": 3})
    with pytest.raises(ValueError, match=r"layer_types entries must be one of \['full_attention', 'sliding_attention'\]"):
        read_kv_spec({**BASE, "layer_types": ["linear_attention"] * 6, "sliding_window": 4})
    with pytest.raises(ValueError, match="layer_types has 2 entries but num_hidden_layers is 6"):
        read_kv_spec({**BASE, "layer_types": ["full_attention"] * 2})
    with pytest.raises(ValueError, match="group_size .* at most 8 bits"):
        kv_cache_size(BASE, dtype="fp16", group_size=32)
    with pytest.raises(ValueError, match="context must be a non-negative int"):
        kv_cache_size(BASE, context=-1)
    with pytest.raises(ValueError, match="batch must be a positive int"):
        kv_cache_size(BASE, batch=0)
    with pytest.raises(ValueError, match=r"mla must be one of \('latent', 'expanded'\)"):
        kv_cache_size("deepseek-v3", mla="naive")
    with pytest.raises(FileNotFoundError, match="bundled configs: .*llama-2-70b"):
        kv_cache_size("no-such-model")


def test_format_bytes():
    assert format_bytes(512) == "512 B"
    assert format_bytes(1_342_177_280) == "1.34 GB"
    assert format_bytes(1_342_177_280, binary=True) == "1.25 GiB"
    assert format_bytes(180_388_626_432) == "180 GB"
    assert format_bytes(327_680, binary=True) == "320 KiB"


# -------------------------------------------------------------------------------------------------- CLI
def test_cli_table(capsys):
    assert main(["llama-2-70b", "--context", "4096", "--batch", "1", "--dtype", "fp16"]) == 0
    out = capsys.readouterr().out
    assert "total: 1,342,177,280 B = 1.34 GB (1.25 GiB)" in out
    assert "64 query heads, 8 KV heads, head_dim 128" in out
    assert main(["gemma-2-9b", "--per-layer", "--context", "8192"]) == 0
    out = capsys.readouterr().out
    assert sum(line.split()[1:2] == ["sliding"] for line in out.splitlines()) == 21
    assert main(["--list"]) == 0
    assert "deepseek-v3" in capsys.readouterr().out


def test_cli_errors(capsys):
    assert main(["llama-2-7b", "--dtype", "fp12"]) == 2
    assert "dtype must be one of" in capsys.readouterr().err
    assert main([]) == 2


def test_module_help_runs():
    r = subprocess.run([sys.executable, "-m", "refimpl.kv_size", "--help"], capture_output=True, text=True,
                       timeout=60, check=False)
    assert r.returncode == 0 and "--context" in r.stdout and "--dtype" in r.stdout
