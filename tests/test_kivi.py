"""refimpl.quant (asymmetric group quantization, int32 packing) and refimpl.kivi (KIVI and the naive per-token cache).

Known answers from the paper's rules (Liu et al. 2024, arXiv 2402.02750) and the official code (jy-yuan/KIVI):
hand-quantized groups, packed words, the prefill split of T = 300 with R = 128, G = 32, a byte count by hand,
and "residual ≥ every token ⇒ identical to the fp cache".
"""

from __future__ import annotations

import pytest
import torch

from refimpl import DenseCache, LlamaModel, ModelConfig
from refimpl.kivi import KIVICache, NaiveQuantCache, kivi_nbytes, kivi_split, naive_nbytes
from refimpl.quant import (
    check_quant_args,
    codes_per_word,
    dequantize,
    pack,
    quantize,
    quantize_pack,
    unpack,
    unpack_dequantize,
)

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny tensors: torch's thread pool only adds overhead (and stalls on shared CI cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# =========================================================================================================
# Quantization primitives
# =========================================================================================================
def test_hand_examples_two_bits():
    q, s, z = quantize(torch.tensor([[0.0, 1.0, 2.0, 3.0]]), bits=2, group_size=4)
    assert q.tolist() == [[0, 1, 2, 3]] and s.tolist() == [[1.0]] and z.tolist() == [[0.0]]
    assert dequantize(q, s, z, 4).tolist() == [[0.0, 1.0, 2.0, 3.0]]  # exact
    q, s, z = quantize(torch.tensor([[0.0, 0.4, 0.6, 3.0]]), bits=2, group_size=4)
    assert q.tolist() == [[0, 0, 1, 3]]
    # ties go to the even code (torch.round): 0.5 -> 0, 1.5 -> 2, 2.5 -> 2
    q, _, _ = quantize(torch.tensor([[0.0, 0.5, 1.5, 2.5, 3.0, 3.0, 3.0, 3.0]]), bits=2, group_size=8)
    assert q.tolist() == [[0, 0, 2, 2, 3, 3, 3, 3]]


def test_hand_example_four_bits_with_offset():
    x = torch.tensor([[-1.0, 0.0, 2.0, 14.0]])  # min -1, s = 15/15 = 1
    q, s, z = quantize(x, bits=4, group_size=4)
    assert q.tolist() == [[0, 1, 3, 15]] and s.item() == 1.0 and z.item() == -1.0


def test_groups_along_tokens_versus_channels():
    x = torch.tensor([[0.0, 3.0], [3.0, 6.0]])  # [tokens=2, channels=2]
    _, s_tok, z_tok = quantize(x, bits=2, group_size=2, dim=-1)  # one group per token (row)
    _, s_ch, z_ch = quantize(x, bits=2, group_size=2, dim=-2)  # one group per channel (column)
    assert s_tok.tolist() == [[1.0], [1.0]] and z_tok.tolist() == [[0.0], [3.0]]
    assert s_ch.tolist() == [[1.0, 1.0]] and z_ch.tolist() == [[0.0, 3.0]]


def test_pack_known_words():
    assert pack(torch.tensor([[1, 2, 3, 0] + [0] * 12]), 2).tolist() == [[57]]  # 1 + 2<<2 + 3<<4
    assert pack(torch.tensor([[0xF, 0, 0, 0, 0, 0, 0, 0x8]]), 4).tolist() == [[0xF - 2**31]]  # top nibble 8: sign bit
    assert pack(torch.tensor([[3] * 16]), 2).tolist() == [[-1]]  # all ones
    assert pack(torch.tensor([[1, 2, 3, 255]]), 8).tolist() == [[1 + (2 << 8) + (3 << 16) + (255 << 24) - 2**32]]


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_unpack_inverts_pack(bits):
    q = torch.randint(0, 2**bits, (3, 5, 64), generator=gen(bits), dtype=torch.int32)
    q[0, 0, :] = 2**bits - 1  # words with the sign bit set
    words = pack(q, bits)
    assert words.dtype == torch.int32 and words.shape == (3, 5, 64 // codes_per_word(bits))
    assert torch.equal(unpack(words, bits), q)


@pytest.mark.parametrize("dtype", [F32, F16, BF16])
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dim", [-1, -2])
def test_error_at_most_half_a_step(dtype, bits, dim):
    x = (torch.randn(2, 3, 64, 64, generator=gen(1)) * torch.linspace(0.1, 20, 64)).to(dtype)
    words, scale, zero = quantize_pack(x, bits, 32, dim)
    xhat = unpack_dequantize(words, scale, zero, bits, 32, dim)
    s = scale.float().repeat_interleave(32, dim=dim)
    z = zero.float().repeat_interleave(32, dim=dim)
    err = (xhat - x.float()).abs()
    # s/2, plus fp16 rounding of the stored zero (|z|·2^-11) and of the scale over up to 2^B-1 steps
    bound = s / 2 + z.abs() * 2**-11 + s * (2**bits - 1) * 2**-11 + 1e-6
    assert bool((err <= bound).all()), f"max excess {(err - bound).max().item():.3g}"
    assert scale.dtype == zero.dtype == F16


def test_constant_group_stays_finite_and_exact():
    x = torch.full((1, 1, 4, 32), 0.125)  # exactly representable in fp16
    x[0, 0, 1] = torch.linspace(-1, 1, 32)  # one non-constant token among constant ones
    for dim in (-1, -2):
        q, s, z = quantize(x, 2, 4 if dim == -2 else 32, dim)
        assert torch.isfinite(s).all() and torch.isfinite(z).all()
        xhat = dequantize(q, s, z, 4 if dim == -2 else 32, dim)
        assert torch.isfinite(xhat).all()
    q, s, z = quantize(torch.full((1, 32), 0.125), 2, 32)
    assert s.item() == 0.0 and q.abs().sum() == 0 and torch.equal(dequantize(q, s, z, 32), torch.full((1, 32), 0.125))


def test_bad_arguments_name_the_parameter():
    with pytest.raises(ValueError, match="bits must be one of"):
        quantize(torch.zeros(1, 32), bits=3, group_size=32)
    with pytest.raises(ValueError, match="dim must be -1"):
        quantize(torch.zeros(1, 32), bits=2, group_size=32, dim=0)
    with pytest.raises(ValueError, match="multiple of group_size"):
        quantize(torch.zeros(1, 30), bits=2, group_size=32)
    with pytest.raises(ValueError, match="floating-point"):
        quantize(torch.zeros(1, 32, dtype=torch.int32), bits=2, group_size=32)
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 3\]"):
        pack(torch.full((1, 16), 4), 2)
    with pytest.raises(ValueError, match="multiple of 32 // bits = 16"):
        pack(torch.zeros(1, 8, dtype=torch.int32), 2)
    with pytest.raises(ValueError, match=r"need scale and zero of shape \(1, 2\)"):
        dequantize(torch.zeros(1, 64, dtype=torch.int32), torch.zeros(1, 3), torch.zeros(1, 3), 32)
    with pytest.raises(ValueError, match="words must be int32"):
        unpack(torch.zeros(1, 2, dtype=torch.int64), 2)
    with pytest.raises(ValueError, match="power of two"):
        check_quant_args(2, 48)
    with pytest.raises(ValueError, match="multiple of 32 // bits = 16"):
        check_quant_args(2, 8)


# =========================================================================================================
# The KIVI state machine
# =========================================================================================================
def kv(b: int, h: int, t: int, d: int, seed: int, dtype: torch.dtype = F32) -> tuple[torch.Tensor, torch.Tensor]:
    g = gen(seed)
    return torch.randn(b, h, t, d, generator=g).to(dtype), torch.randn(b, h, t, d, generator=g).to(dtype)


def test_prefill_split_known_answer():
    c = KIVICache(num_layers=1, bits=2, group_size=32, residual_length=128)
    k, v = kv(1, 2, 300, 64, 0)
    out = c.update(0, k, v)
    assert c.split(0) == (256, 44, 172, 128) == kivi_split(300, 128)
    st = c.layer_state(0)
    assert st.k_codes.shape == (1, 2, 256, 4) and st.k_scale.shape == (1, 2, 8, 64)  # 256/32 groups per channel
    assert st.v_codes.shape == (1, 2, 172, 4) and st.v_scale.shape == (1, 2, 172, 2)  # 64/32 groups per token
    assert torch.equal(st.k_res, k[:, :, 256:]) and torch.equal(st.v_res, v[:, :, 172:])
    # prefill attention sees the exact inputs (the official code attends before it quantizes)
    assert torch.equal(out.k, k) and torch.equal(out.v, v)


def test_decode_steps_follow_the_residual_rules():
    r, g = 64, 32
    c = KIVICache(num_layers=1, bits=2, group_size=g, residual_length=r)
    c.update(0, *kv(1, 1, 50, 32, 1))
    assert c.split(0) == (0, 50, 0, 50)
    for t in range(51, 200):
        c.update(0, *kv(1, 1, 1, 32, t))
        assert c.split(0) == kivi_split(t, r), t
        _, r_k, _, r_v = c.split(0)
        assert 0 <= r_k < r and r_v == min(t, r)  # keys keep 0..R-1, values exactly the last R
    assert c.split(0) == (192, 7, 135, 64)


def test_update_returns_dequantized_old_then_exact_new():
    c = KIVICache(num_layers=1, bits=4, group_size=32, residual_length=64)
    k, v = kv(2, 2, 100, 32, 2)
    c.update(0, k, v)
    st = c.layer_state(0)
    k_deq = unpack_dequantize(st.k_codes, st.k_scale, st.k_zero, 4, 32, -2)
    v_deq = unpack_dequantize(st.v_codes, st.v_scale, st.v_zero, 4, 32, -1)
    k1, v1 = kv(2, 2, 1, 32, 3)
    out = c.update(0, k1, v1)
    assert out.k.shape == (2, 2, 101, 32)
    assert torch.equal(out.k[:, :, :64], k_deq) and torch.equal(out.k[:, :, 64:100], k[:, :, 64:])
    assert torch.equal(out.v[:, :, :36], v_deq) and torch.equal(out.v[:, :, 36:100], v[:, :, 36:])
    assert torch.equal(out.k[:, :, 100:], k1) and torch.equal(out.v[:, :, 100:], v1)
    assert not torch.equal(k_deq, k[:, :, :64])  # it really was quantized
    assert c.split(0) == (64, 37, 37, 64)  # the oldest fp value left the FIFO after the step


def test_append_read_flush_equals_update():
    a = KIVICache(num_layers=1, bits=2, group_size=16, residual_length=32)
    b = KIVICache(num_layers=1, bits=2, group_size=16, residual_length=32)
    for step, t in enumerate([40, 1, 1, 30, 1]):
        k, v = kv(1, 2, t, 32, 10 + step)
        want = a.update(0, k, v)
        b.append(0, k, v)
        got = b.read(0)
        b.flush(0)
        assert torch.equal(got.k, want.k) and torch.equal(got.v, want.v)
    assert a.split(0) == b.split(0) == kivi_split(73, 32)


def test_nbytes_known_answer_and_formula():
    c = KIVICache(num_layers=1, bits=2, group_size=32, residual_length=128)
    c.update(0, *kv(1, 1, 300, 64, 0, F16))
    # keys 256·64·2/8 + (8·64)·2·2 + 44·64·2 ; values 172·64·2/8 + (172·2)·2·2 + 128·64·2  (by hand)
    assert c.nbytes() == 4096 + 2048 + 5632 + 2752 + 1376 + 16384 == 32288


@pytest.mark.parametrize("cls,formula", [(KIVICache, kivi_nbytes), (NaiveQuantCache, naive_nbytes)])
@pytest.mark.parametrize("bits,group,res,dtype", [(2, 32, 64, F16), (4, 16, 32, F32), (8, 32, 32, BF16)])
def test_nbytes_equals_formula_at_every_step(cls, formula, bits, group, res, dtype):
    c = cls(num_layers=2, bits=bits, group_size=group, residual_length=res)
    t = 0
    for step, n in enumerate([37, 1, 1, 60, 1, 1, 1, 33]):
        for layer in range(2):
            c.update(layer, *kv(3, 2, n, 64, step, dtype))
        t += n
        want = formula(t, batch=3, kv_heads=2, head_dim=64, num_layers=2, bits=bits, group_size=group,
                       residual_length=res, dtype_bytes=dtype.itemsize)
        assert c.nbytes() == want, (t, c.nbytes(), want)


def test_kivi2_stores_three_bits_per_element_asymptotically():
    fp16 = 2 * 64 * 2  # K and V bytes per token for one head, D = 64
    t = 1 << 16
    kivi = kivi_nbytes(t, batch=1, kv_heads=1, head_dim=64, num_layers=1, bits=2, group_size=32,
                       residual_length=128, dtype_bytes=2)
    assert kivi / (t * fp16) == pytest.approx(3 / 16, rel=0.02)  # (2 + 32/32) bits vs 16


def test_naive_cache_quantizes_keys_per_token():
    c = NaiveQuantCache(num_layers=1, bits=2, group_size=32, residual_length=0)
    k, v = kv(1, 1, 5, 64, 4)
    out = c.update(0, k, v)
    assert torch.equal(out.k, k)  # this step still sees its own tokens exactly
    st = c.layer_state(0)
    assert c.split(0) == (5, 0, 5, 0) and st.k_scale.shape == (1, 1, 5, 2)  # per token, 64/32 groups
    w, s, z = quantize_pack(k, 2, 32, -1)
    assert torch.equal(st.k_codes, w) and torch.equal(st.k_scale, s) and torch.equal(st.k_zero, z)


def test_per_channel_keys_beat_per_token_keys_on_outlier_channels():
    """The paper's observation on synthetic keys: a few channels are large in every token."""
    g = gen(5)
    k = torch.randn(1, 4, 256, 64, generator=g)
    k[..., [3, 17, 40]] = k[..., [3, 17, 40]] * 0.5 + torch.tensor([15.0, -12.0, 9.0])
    err = {}
    for dim in (-1, -2):
        w, s, z = quantize_pack(k, 2, 32, dim)
        err[dim] = (unpack_dequantize(w, s, z, 2, 32, dim) - k).pow(2).mean().item()
    assert err[-2] * 4 < err[-1], err  # per-channel is far better here


def test_key_mask_is_tracked_like_dense_cache():
    c, d = KIVICache(num_layers=1, bits=2, group_size=16, residual_length=16), DenseCache(1)
    k, v = kv(2, 2, 20, 32, 6)
    m = torch.ones(2, 20, dtype=torch.bool)
    m[1, :4] = False
    a, b = c.update(0, k, v, m), d.update(0, k, v, m)
    assert torch.equal(a.key_mask, b.key_mask)
    k1, v1 = kv(2, 2, 1, 32, 7)
    assert torch.equal(c.update(0, k1, v1).key_mask, d.update(0, k1, v1).key_mask)


def test_reset_and_errors():
    with pytest.raises(ValueError, match="bits must be one of"):
        KIVICache(1, bits=3)
    with pytest.raises(ValueError, match="group_size must be a positive power of two"):
        KIVICache(1, bits=2, group_size=24)
    with pytest.raises(ValueError, match="residual_length must be a positive multiple of group_size = 32"):
        KIVICache(1, bits=2, group_size=32, residual_length=48)
    with pytest.raises(ValueError, match="residual_length must be an int >= 0"):
        NaiveQuantCache(1, residual_length=-1)
    c = KIVICache(1, bits=2, group_size=32, residual_length=32)
    with pytest.raises(ValueError, match=r"head_dim \(48\) must be a multiple of group_size \(32\)"):
        c.update(0, *kv(1, 1, 4, 48, 0))
    c.update(0, *kv(1, 1, 4, 64, 0))
    with pytest.raises(ValueError, match="does not match cached"):
        c.update(0, *kv(1, 2, 1, 64, 0))
    with pytest.raises(ValueError, match="dtype"):
        c.update(0, *kv(1, 1, 1, 64, 0, F16))
    with pytest.raises(IndexError, match="layer_idx"):
        c.update(1, *kv(1, 1, 1, 64, 0))
    c.reset()
    assert c.nbytes() == 0 and c.seq_length() == 0 and c.split(0) == (0, 0, 0, 0)


# =========================================================================================================
# In the model (refimpl) and in transformers' generate
# =========================================================================================================
def tiny_model(seed: int = 0) -> LlamaModel:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=2, head_dim=32, max_position_embeddings=256)
    model = LlamaModel(cfg).eval()
    g = gen(seed + 1)
    with torch.no_grad():  # larger weights than the default init: peaked attention, keys with structure
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 1.5 / p.shape[-1] ** 0.5)
    return model


@torch.no_grad()
def decode_logits(model: LlamaModel, ids: torch.Tensor, cache, prefill: int) -> torch.Tensor:
    """Prefill ``prefill`` tokens, then feed the rest one by one; logits of every fed token after the prefill."""
    model(ids[:, :prefill], cache=cache)
    return torch.cat([model(ids[:, t:t + 1], cache=cache).logits for t in range(prefill, ids.shape[1])], dim=1)


def test_residual_covering_every_token_is_bit_identical_to_dense():
    model = tiny_model()
    ids = torch.randint(0, 97, (2, 40), generator=gen(9))
    want = decode_logits(model, ids, DenseCache(2), prefill=20)
    got = decode_logits(model, ids, KIVICache(2, bits=2, group_size=32, residual_length=64), prefill=20)
    assert torch.equal(got, want)
    assert torch.equal(model.generate(ids[:, :20], 8, cache=KIVICache(2, 2, 32, 64)),
                       model.generate(ids[:, :20], 8, cache=DenseCache(2)))


def test_logit_error_shrinks_with_more_bits():
    model = tiny_model()
    ids = torch.randint(0, 97, (1, 112), generator=gen(11))
    dense = decode_logits(model, ids, DenseCache(2), prefill=64)
    err = {}
    for bits in (2, 4, 8):
        cache = KIVICache(2, bits, 16, 16)
        err[bits] = (decode_logits(model, ids, cache, prefill=64) - dense).abs().mean().item()
    # each extra bit halves the step: 4x smaller steps per 2 bits, far below 2-bit error at 8 bits
    assert err[8] < err[4] / 4 < err[2] / 8, err


def test_generate_in_transformers_matches_refimpl(tmp_path):
    from transformers import LlamaForCausalLM

    from refimpl.hf_bridge import cache_kwargs, make_hf_cache

    model = tiny_model()
    model.save_pretrained(tmp_path)
    hf = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 97, (2, 45), generator=gen(12))
    want = model.generate(ids, 24, cache=KIVICache(2, bits=2, group_size=16, residual_length=16))
    policy = KIVICache(2, bits=2, group_size=16, residual_length=16)
    got = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **cache_kwargs(hf, make_hf_cache(policy)),
                      max_new_tokens=24, do_sample=False)[:, ids.shape[1]:]
    assert torch.equal(got, want)
    t = 45 + 24 - 1
    assert policy.split(0) == kivi_split(t, 16)
    assert policy.nbytes() == kivi_nbytes(t, batch=2, kv_heads=2, head_dim=32, num_layers=2, bits=2,
                                          group_size=16, residual_length=16, dtype_bytes=4)
