"""Split-KV decode attention: the PyTorch reference (``refimpl.attention``) and the Triton kernel
(``kvkernels.decode_attention``).

In CI the kernel runs under ``TRITON_INTERPRET=1`` on the CPU at small sizes (odd token counts, every group size
of interest, head dims 16/64/128 and a non-power-of-two one), and one test compiles it ahead of time for sm_90 to
check the compiled-only code path; on a GPU the same tests run compiled, plus larger cases and the ``gpu``-marked
ones (64-bit offsets, CUDA-graph capture).

Tolerances, kernel vs the fp32 reference rounded to the input dtype (``KERNEL_TOL``): fp32 1e-5 abs / 1e-5 rel;
fp16 2e-3 / 2e-3 (output rounding 2^-11 plus probabilities rounded to fp16 before P·V); bf16 1.6e-2 / 1.6e-2
(2^-8 rounding, same reason).  Log-sum-exp (fp32 in every dtype): 2e-4 abs / 1e-5 rel.
"""

from __future__ import annotations

import math
import sys

import pytest
import torch
import torch.nn.functional as F
from kvkernels import _utils
from kvkernels._utils import cdiv, kernel_device, next_power_of_2
from kvkernels.decode_attention import (
    MAX_GROUP_SIZE,
    MAX_SPLITS,
    DecodeConfig,
    choose_num_splits,
    decode_attention,
    default_config,
    merge_block_s,
    merge_rows,
    pipeline_stages,
    stages_for,
)

from refimpl.attention import decode_attention as ref_attention

DEV = kernel_device()
ON_GPU = DEV.type == "cuda"

KERNEL_TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}
LSE_TOL = (2e-4, 1e-5)
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


def make(b: int, h_kv: int, g: int, t: int, d: int, dtype: torch.dtype, q_scale: float = 2.0,
         device: torch.device = DEV) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seeded random q [B, H_kv*G, D], k, v [B, H_kv, T, D], drawn on the CPU so every device sees the same data."""
    q = torch.randn(b, h_kv * g, d) * q_scale  # ×2 makes the softmax peakier than N(0, 1) scores would
    k = torch.randn(b, h_kv, t, d)
    v = torch.randn(b, h_kv, t, d)
    return tuple(x.to(dtype).to(device) for x in (q, k, v))


def assert_matches_reference(q, k, v, out, lse=None, **kw) -> None:
    want, want_lse = ref_attention(q, k, v, return_lse=True, **kw)
    assert out.dtype == q.dtype and out.shape == want.shape and out.device == q.device
    atol, rtol = KERNEL_TOL[q.dtype]
    torch.testing.assert_close(out.float(), want.float(), atol=atol, rtol=rtol)
    if lse is not None:
        assert lse.dtype == torch.float32 and lse.shape == want_lse.shape
        torch.testing.assert_close(lse, want_lse, atol=LSE_TOL[0], rtol=LSE_TOL[1])


# =========================================================================================================
# The reference (pure PyTorch, fast)
# =========================================================================================================
@pytest.mark.parametrize("g", [1, 2, 3, 4, 8])
def test_reference_matches_sdpa_with_gqa(g):
    q, k, v = make(2, 2, g, 19, 32, F32, device=torch.device("cpu"))
    want = F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True)[:, :, 0]
    torch.testing.assert_close(ref_attention(q, k, v), want, atol=1e-5, rtol=1e-5)


def test_reference_lse_and_masks_match_explicit_scores():
    b, h_kv, g, t, d = 3, 2, 4, 23, 16
    q, k, v = make(b, h_kv, g, t, d, F32, device=torch.device("cpu"))
    key_mask = torch.rand(b, h_kv, t) < 0.7
    seq_lens = torch.tensor([23, 9, 1])
    out, lse = ref_attention(q, k, v, key_mask=key_mask, seq_lens=seq_lens, return_lse=True, scale=0.3)
    # Independent path: materialise K/V per query head (repeat_interleave) and mask explicitly.
    kk, vv = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    allowed = key_mask.repeat_interleave(g, 1) & (torch.arange(t)[None, None] < seq_lens[:, None, None])
    scores = torch.einsum("bhd,bhtd->bht", q, kk) * 0.3
    scores = scores.masked_fill(~allowed, float("-inf"))
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1), atol=1e-5, rtol=1e-5)
    want = torch.einsum("bht,bhtd->bhd", torch.softmax(scores, -1), vv)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def test_reference_lse_combines_splits():
    """The identity the kernel relies on: out = Σ_s e^{L_s - L} o_s with L = logsumexp_s L_s."""
    q, k, v = make(2, 2, 2, 30, 16, F32, device=torch.device("cpu"))
    o_all, l_all = ref_attention(q, k, v, return_lse=True)
    parts = [ref_attention(q, k[:, :, a:z], v[:, :, a:z], return_lse=True) for a, z in ((0, 7), (7, 30))]
    lse = torch.logsumexp(torch.stack([p[1] for p in parts]), 0)
    out = sum(torch.exp(p[1] - lse)[..., None] * p[0] for p in parts)
    torch.testing.assert_close(lse, l_all, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, o_all, atol=1e-5, rtol=1e-5)


def test_reference_empty_rows_give_zero_and_minus_inf():
    q, k, v = make(2, 1, 2, 5, 16, F32, device=torch.device("cpu"))
    out, lse = ref_attention(q, k, v, seq_lens=torch.tensor([0, 5]), return_lse=True)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and bool(torch.isneginf(lse[0]).all())
    assert bool(torch.isfinite(lse[1]).all())
    out, lse = ref_attention(q, k, v, key_mask=torch.tensor([[True] * 5, [False] * 5]), return_lse=True)
    assert torch.equal(out[1], torch.zeros_like(out[1])) and bool(torch.isneginf(lse[1]).all())


def test_reference_rejects_out_of_range_seq_lens():
    q, k, v = make(2, 1, 1, 5, 16, F32, device=torch.device("cpu"))
    with pytest.raises(ValueError, match=r"seq_lens values must be in \[0, 5\]"):
        ref_attention(q, k, v, seq_lens=torch.tensor([6, 1]))


# =========================================================================================================
# The kernel against the reference
# =========================================================================================================
# (B, H_kv, G, T, D, dtype): every T in {1, 7, 33, 257} and G in {1, 2, 3, 4, 8} meets every dtype, with head
# dims 16, 64, 128 and a non-power-of-two 80.
CASES = [
    (1, 1, 1, 1, 16, F32), (1, 3, 2, 1, 128, F16), (1, 2, 4, 1, 64, BF16),
    (2, 2, 1, 7, 64, BF16), (1, 2, 8, 7, 128, BF16), (2, 1, 2, 7, 16, F16), (2, 3, 3, 7, 64, F32),
    (1, 2, 2, 33, 128, F32), (2, 1, 3, 33, 64, F16), (1, 4, 1, 33, 16, BF16), (1, 1, 8, 33, 64, F32),
    (1, 2, 2, 33, 80, F16),
    (2, 2, 4, 257, 64, F16), (3, 1, 8, 257, 16, F32), (1, 2, 1, 257, 64, F16),
    pytest.param(2, 2, 3, 257, 128, BF16, marks=pytest.mark.slow),
    pytest.param(1, 1, 4, 257, 128, F32, marks=pytest.mark.slow),
]
GPU_CASES = [  # compiled only: long contexts, many splits, Llama-like head counts
    (4, 8, 4, 4097, 128, BF16), (3, 2, 8, 65537, 128, F16), (2, 4, 1, 12345, 64, BF16),
    (1, 8, 4, 131073, 128, BF16), (5, 4, 4, 3001, 128, F32), (2, 2, 16, 1000, 96, F16),
]


@pytest.mark.parametrize("b,h_kv,g,t,d,dtype", CASES + (GPU_CASES if ON_GPU else []))
def test_kernel_matches_reference(b, h_kv, g, t, d, dtype):
    q, k, v = make(b, h_kv, g, t, d, dtype)
    out, lse = decode_attention(q, k, v, return_lse=True)
    assert_matches_reference(q, k, v, out, lse)


@pytest.mark.parametrize("dtype", [F32, F16, BF16])
def test_kernel_single_token_returns_its_value_exactly(dtype):
    """Known answer: with one key the softmax weight is exactly 1, so out = v (bit-exact) and LSE = scale·q·k."""
    q, k, v = make(2, 2, 3, 1, 64, dtype)
    out, lse = decode_attention(q, k, v, return_lse=True)
    assert torch.equal(out, v[:, :, 0].repeat_interleave(3, dim=1))
    want_lse = torch.einsum("bhd,bhd->bh", q.float(), k[:, :, 0].float().repeat_interleave(3, 1)) / 8.0
    torch.testing.assert_close(lse, want_lse, atol=LSE_TOL[0], rtol=LSE_TOL[1])


def test_kernel_equal_keys_average_values():
    """Known answer: identical keys → uniform weights → out = mean of V and LSE = s + log T."""
    b, h_kv, g, t, d = 2, 2, 2, 45, 16
    q, _, v = make(b, h_kv, g, t, d, F32)
    k = torch.randn(b, h_kv, 1, d).to(DEV).expand(b, h_kv, t, d)  # stride 0 along tokens, too
    out, lse = decode_attention(q, k, v, return_lse=True, num_splits=4)
    torch.testing.assert_close(out, v.mean(2).repeat_interleave(g, 1), atol=1e-5, rtol=1e-5)
    s = torch.einsum("bhd,bhd->bh", q, k[:, :, 0].repeat_interleave(g, 1)) / 4.0
    torch.testing.assert_close(lse, s + math.log(t), atol=1e-5, rtol=1e-5)


def test_kernel_query_head_reads_kv_head_h_div_g():
    """Known answer for the GQA index map: if every value of KV head j equals j, query head h returns h // G."""
    b, h_kv, g, t, d = 1, 4, 3, 10, 16
    q, k, _ = make(b, h_kv, g, t, d, F32)
    v = torch.arange(h_kv, dtype=torch.float32, device=DEV)[None, :, None, None].expand(b, h_kv, t, d)
    out = decode_attention(q, k, v)
    want = (torch.arange(h_kv * g, device=DEV) // g).float()[None, :, None].expand(b, h_kv * g, d)
    torch.testing.assert_close(out, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("splits", [1, 2, 3, 9, 40])  # 40 ranges of 7 tokens: the last 3 are empty
def test_kernel_result_does_not_depend_on_num_splits(splits):
    q, k, v = make(2, 2, 4, 257, 32, F32)
    out, lse = decode_attention(q, k, v, num_splits=splits, return_lse=True)
    assert_matches_reference(q, k, v, out, lse)


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_kernel_ragged_seq_lens_with_empty_splits(dtype):
    """Rows of length 0, 1, partial and full; 4 splits of 9 tokens leave some splits with nothing to do."""
    q, k, v = make(4, 2, 2, 33, 64, dtype)
    seq_lens = torch.tensor([0, 1, 13, 33], dtype=torch.int32, device=DEV)
    out, lse = decode_attention(q, k, v, seq_lens=seq_lens, num_splits=4, return_lse=True)
    assert_matches_reference(q, k, v, out, lse, seq_lens=seq_lens)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and bool(torch.isneginf(lse[0]).all())
    # int64 lengths and the default split heuristic give the same answer
    out64 = decode_attention(q, k, v, seq_lens=seq_lens.long())
    assert_matches_reference(q, k, v, out64, seq_lens=seq_lens)


def test_kernel_clamps_out_of_range_seq_lens():
    q, k, v = make(3, 1, 2, 20, 16, F32)
    out = decode_attention(q, k, v, seq_lens=torch.tensor([-3, 25, 7], device=DEV))
    assert_matches_reference(q, k, v, out, seq_lens=torch.tensor([0, 20, 7], device=DEV))


@pytest.mark.parametrize("per_head", [False, True])
def test_kernel_key_mask_with_fully_masked_tiles_and_rows(per_head):
    """A fully masked first tile (and whole row) must give 0/−inf, never NaN from (−inf) − (−inf)."""
    b, h_kv, g, t, d = 3, 2, 2, 150, 32
    q, k, v = make(b, h_kv, g, t, d, F16)
    mask = torch.rand(b, h_kv, t) < 0.6 if per_head else (torch.rand(b, 1, t) < 0.6).expand(b, h_kv, t)
    mask = mask.clone()
    mask[:, :, :128] = False  # covers whole tiles for block_n ≤ 128
    mask[1] = False  # a row with nothing to attend to
    mask = (mask if per_head else mask[:, 0]).to(DEV)
    for splits in (1, 3, None):
        out, lse = decode_attention(q, k, v, key_mask=mask, num_splits=splits, return_lse=True)
        assert not bool(torch.isnan(out).any())
        assert_matches_reference(q, k, v, out, lse, key_mask=mask)
        assert bool(torch.isneginf(lse[1]).all())
    seq_lens = torch.tensor([150, 150, 140], device=DEV)
    out = decode_attention(q, k, v, key_mask=mask, seq_lens=seq_lens)
    assert_matches_reference(q, k, v, out, key_mask=mask, seq_lens=seq_lens)


def test_kernel_respects_strides_without_copies(monkeypatch):
    """Non-contiguous views (HF's [B, T, H, D] buffer transposed, a longer preallocated cache sliced, a strided
    head dim, a transposed q) are read in place: calling .contiguous() is an error inside the kernel call."""
    b, h_kv, g, t, t_max, d = 2, 2, 2, 37, 50, 32
    q_t = torch.randn(b, d, h_kv * g).to(DEV)
    q = q_t.transpose(1, 2)  # [B, H_q, D], stride_d = H_q
    k_buf = torch.randn(b, t_max, h_kv, d).to(DEV)
    k = k_buf.transpose(1, 2)[:, :, :t]  # [B, H_kv, T, D], stride_t = H_kv*D
    v_buf = torch.randn(b, h_kv, t_max, 2 * d).to(DEV)
    v = v_buf[:, :, :t, ::2]  # stride_d = 2
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    want = ref_attention(q, k, v)

    def no_copies(self, *args, **kwargs):
        raise AssertionError("decode_attention must not make contiguous copies of its inputs")

    monkeypatch.setattr(torch.Tensor, "contiguous", no_copies)
    out = decode_attention(q, k, v)
    monkeypatch.undo()
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    assert out.is_contiguous()


@pytest.mark.parametrize("scale", [0.05, 1.0])
def test_kernel_custom_scale(scale):
    q, k, v = make(1, 2, 2, 40, 16, F32)
    out, lse = decode_attention(q, k, v, scale=scale, return_lse=True)
    assert_matches_reference(q, k, v, out, lse, scale=scale)


def test_kernel_is_deterministic():
    q, k, v = make(2, 2, 4, 100, 64, BF16)
    a, la = decode_attention(q, k, v, return_lse=True)
    b, lb = decode_attention(q, k, v, return_lse=True)
    assert torch.equal(a, b) and torch.equal(la, lb)


def test_kernel_empty_cache_and_empty_batch():
    q, k, v = make(2, 1, 2, 0, 16, F16)
    out, lse = decode_attention(q, k, v, return_lse=True)
    assert out.shape == (2, 2, 16) and torch.equal(out, torch.zeros_like(out)) and bool(torch.isneginf(lse).all())
    q, k, v = make(0, 1, 2, 5, 16, F16)
    assert decode_attention(q, k, v).shape == (0, 2, 16)


@pytest.mark.parametrize("config", [DecodeConfig(block_n=16, num_warps=2, num_stages=1),
                                    DecodeConfig(block_n=128, num_warps=8, num_stages=2)])
def test_kernel_explicit_configs(config):
    q, k, v = make(1, 2, 4, 200, 64, F16)
    out = decode_attention(q, k, v, config=config)
    assert_matches_reference(q, k, v, out)


# =========================================================================================================
# Launch heuristics and helpers
# =========================================================================================================
@pytest.mark.parametrize("args,want", [
    ((1, 8, 4096, 64, 132), 16),  # 132 / 8 = 16.5, rounded down: 128 programs, one wave (64 tiles allow 32)
    ((1, 8, 512, 64, 132), 4),  # only 8 tiles: at least 2 per split
    ((8, 8, 32768, 64, 132), 2),  # 132 / 64 pairs = 2.06
    ((4, 8, 32768, 64, 132), 4),  # 132 / 32 = 4.1
    ((16, 8, 32768, 64, 132), 1),  # 128 pairs ≈ 132 SMs: no split (and no combine launch)
    ((32, 8, 4096, 64, 132), 1),  # 256 pairs more than fill the SMs
    ((1, 1, 1, 64, 132), 1),  # a single tile cannot be split
    ((1, 1, 1 << 24, 64, 1000), MAX_SPLITS),  # capped
])
def test_choose_num_splits_known_answers(args, want):
    assert choose_num_splits(*args) == want


@pytest.mark.parametrize("programs,stages,want", [(132, None, 3), (133, None, 2), (8, None, 3), (256, None, 2),
                                                  (8, 1, 1), (1000, 4, 4)])
def test_pipeline_stages_known_answers(programs, stages, want):
    """3 stages when every program has an SM to itself (132 here), 2 when they share; an explicit value wins."""
    assert pipeline_stages(DecodeConfig(num_stages=stages), programs, 132) == want
    assert pipeline_stages(DecodeConfig(num_stages=stages), programs, 132, "NVIDIA H100 80GB HBM3") == want


@pytest.mark.parametrize("programs,stages,want", [(132, None, 4), (133, None, 3), (8, 1, 1), (1000, 2, 2)])
def test_pipeline_stages_on_h200(programs, stages, want):
    """An H200 (faster memory: more bytes in flight) gets one stage more in each regime; an explicit value wins."""
    assert pipeline_stages(DecodeConfig(num_stages=stages), programs, 132, "NVIDIA H200") == want


@pytest.mark.parametrize("gpu,want", [("NVIDIA H200", (4, 3)), ("NVIDIA H200 NVL", (4, 3)),
                                      ("NVIDIA H100 80GB HBM3", (3, 2)), ("", (3, 2)), ("NVIDIA A100-SXM4-80GB", (3, 2))])
def test_stages_for_known_answers(gpu, want):
    assert stages_for(gpu) == want


@pytest.mark.parametrize("splits,most,want", [(1, 32, 1), (3, 32, 4), (17, 32, 32), (100, 32, 32), (17, 16, 16),
                                               (5, 16, 8)])
def test_merge_block_s_known_answers(splits, most, want):
    assert merge_block_s(splits, most) == want


@pytest.mark.parametrize("most", [0, 12])
def test_merge_block_s_rejects_a_cap_that_is_not_a_power_of_two(most):
    with pytest.raises(ValueError, match="most must be a power of two"):
        merge_block_s(4, most)


def test_which_calls_launch_the_combine_kernel(monkeypatch):
    """One split writes the answer itself; MERGE_MIN_SPLITS (3) or more merge in the split kernel; 2 splits, or
    any count with DECODE_MERGE_IN_KERNEL off, launch the combine kernel."""
    module = sys.modules["kvkernels.decode_attention"]  # the module (the package exports the function by that name)
    q, k, v = make(2, 2, 3, 40, 32, F16)
    want = decode_attention(q, k, v, num_splits=2)

    def no_combine(*args, **kwargs):
        raise AssertionError("this call must not launch the combine kernel")

    monkeypatch.setattr(module, "launch_combine", no_combine)
    out, lse = decode_attention(q, k, v, num_splits=1, return_lse=True)
    assert_matches_reference(q, k, v, out, lse)
    torch.testing.assert_close(out, want, atol=2e-3, rtol=0)
    monkeypatch.setattr(module, "DECODE_MERGE_IN_KERNEL", True)
    assert module.MERGE_MIN_SPLITS == 3
    with pytest.raises(AssertionError, match="must not launch"):  # 2 splits: the combine launch
        decode_attention(q, k, v, num_splits=2)
    for splits in (3, 4):  # merged in the split kernel
        assert_matches_reference(q, k, v, decode_attention(q, k, v, num_splits=splits))
    monkeypatch.setattr(module, "DECODE_MERGE_IN_KERNEL", False)
    with pytest.raises(AssertionError, match="must not launch"):
        decode_attention(q, k, v, num_splits=3)


def test_no_in_kernel_merge_while_a_graph_is_captured(monkeypatch):
    """While a CUDA graph is captured (``capturing`` patched to say so) 3+ splits launch the combine kernel."""
    module = sys.modules["kvkernels.decode_attention"]
    q, k, v = make(2, 2, 3, 40, 32, F16)
    calls = []
    real = module.launch_combine
    monkeypatch.setattr(module, "launch_combine", lambda *a, **kw: (calls.append(1), real(*a, **kw)))
    monkeypatch.setattr(module, "DECODE_MERGE_IN_KERNEL", True)
    assert_matches_reference(q, k, v, decode_attention(q, k, v, num_splits=4))
    assert calls == []  # not capturing: merged in the split kernel
    monkeypatch.setattr(module, "capturing", lambda device: True)
    assert_matches_reference(q, k, v, decode_attention(q, k, v, num_splits=4))
    assert calls == [1]


@pytest.mark.parametrize("splits", [3, 4, 5, 40])  # 40 ranges of 7 tokens: trailing ones empty
def test_in_kernel_merge_equals_combine_kernel(monkeypatch, splits):
    """The last program of each (batch, kv_head) merges the partials of its G query heads itself
    (DECODE_MERGE_IN_KERNEL): the same output and LSE as the separate combine kernel, both matching the reference,
    with ragged rows (one empty) and an odd group size."""
    module = sys.modules["kvkernels.decode_attention"]
    q, k, v = make(3, 2, 3, 270, 32, F32)
    seq_lens = torch.tensor([270, 0, 101], device=DEV)
    outs = {}
    for merge in (False, True):
        monkeypatch.setattr(module, "DECODE_MERGE_IN_KERNEL", merge)
        outs[merge] = decode_attention(q, k, v, seq_lens=seq_lens, num_splits=splits, return_lse=True)
        assert_matches_reference(q, k, v, *outs[merge], seq_lens=seq_lens)
    torch.testing.assert_close(outs[True], outs[False], atol=1e-6, rtol=1e-6)


def test_in_kernel_merge_in_steps_of_fewer_heads(monkeypatch):
    """With 32 partials of D = 128 a merge step holds MERGE_TILE // (32·128) = 2 of the group's 3 query heads:
    two steps (2 heads, then 1), the same answer as the combine kernel."""
    module = sys.modules["kvkernels.decode_attention"]
    assert merge_rows(3, 32, 128) == 2
    q, k, v = make(2, 1, 3, 200, 128, F32)
    outs = {}
    for merge in (False, True):
        monkeypatch.setattr(module, "DECODE_MERGE_IN_KERNEL", merge)
        outs[merge] = decode_attention(q, k, v, num_splits=40, return_lse=True)
        assert_matches_reference(q, k, v, *outs[merge])
    torch.testing.assert_close(outs[True], outs[False], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(("group", "block_s", "block_d", "want"), [(4, 16, 128, 4), (3, 2, 64, 4), (8, 32, 128, 2),
                                                                 (128, 32, 256, 1), (1, 1, 16, 1)])
def test_merge_rows_known_answers(group, block_s, block_d, want):
    """All of a group's heads per merge step while heads × partials × channels ≤ MERGE_TILE (8192), else fewer."""
    assert merge_rows(group, block_s, block_d) == want


def test_in_kernel_merge_counts_return_to_zero(monkeypatch):
    """Each launch leaves its per-(batch, kv_head) counts at zero, so the next call (same or more pairs) merges
    again; a count left behind would skip the merge and leave the output unwritten."""
    module = sys.modules["kvkernels.decode_attention"]
    monkeypatch.setattr(module, "DECODE_MERGE_IN_KERNEL", True)
    monkeypatch.setattr(module, "_COUNTERS", {})
    for b, h_kv, splits in ((1, 2, 4), (1, 2, 4), (3, 2, 5)):
        q, k, v = make(b, h_kv, 2, 100, 16, F32)
        out, lse = decode_attention(q, k, v, num_splits=splits, return_lse=True)
        assert_matches_reference(q, k, v, out, lse)
        (buf,) = module._COUNTERS.values()
        assert int(torch.count_nonzero(buf)) == 0


def test_default_config_and_helpers():
    cfg = default_config(128, torch.bfloat16)
    if _utils.interpreting():
        assert cfg == DecodeConfig(block_n=32, num_warps=4, num_stages=1)
    else:
        assert cfg.block_n * 128 * 2 == 16384  # ~16 KB K tiles
    assert [next_power_of_2(n) for n in (0, 1, 3, 16, 17)] == [1, 1, 4, 16, 32]
    assert [cdiv(a, 4) for a in (0, 1, 4, 5)] == [0, 1, 1, 2]


@pytest.mark.parametrize("value,want", [("1", True), ("true", True), ("0", False), ("", False)])
def test_interpreting_reads_the_environment(monkeypatch, value, want):
    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert _utils.interpreting() is want


def test_cpu_tensors_without_interpreter_get_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        _utils.check_launchable(torch.zeros(1))


# =========================================================================================================
# Bad input: clear errors naming the parameter, from both implementations
# =========================================================================================================
def _bad_inputs():
    q, k, v = make(2, 2, 2, 5, 16, F32, device=torch.device("cpu"))
    yield "q4d", (q[:, :, None], k, v), {}, ValueError, r"q must be \[batch, q_heads, head_dim\]"
    yield "k3d", (q, k[:, :, 0], v), {}, ValueError, r"k and v must be \[batch, kv_heads, tokens, head_dim\]"
    yield "kv_shape", (q, k, v[:, :, :4]), {}, ValueError, "k and v must have the same shape"
    yield "batch", (q[:1], k, v), {}, ValueError, "same batch size"
    yield "head_dim", (q[..., :8], k, v), {}, ValueError, "same head_dim"
    yield "groups", (q[:, :3], k, v), {}, ValueError, r"kv_heads \(k.shape\[1\] = 2\) must divide q_heads \(3\)"
    yield "int_dtype", (q.long(), k.long(), v.long()), {}, TypeError, "q.dtype must be one of"
    yield "mixed_dtype", (q, k.half(), v.half()), {}, TypeError, "q, k and v must share one dtype"
    yield "mask_dtype", (q, k, v), {"key_mask": torch.ones(2, 5)}, TypeError, "key_mask must be a bool tensor"
    yield "mask_shape", (q, k, v), {"key_mask": torch.ones(2, 4, dtype=torch.bool)}, ValueError, \
        r"key_mask must be \[batch, tokens\]"
    yield "lens_dtype", (q, k, v), {"seq_lens": torch.ones(2)}, TypeError, "seq_lens must be an int32 or int64"
    yield "lens_shape", (q, k, v), {"seq_lens": torch.ones(3, dtype=torch.long)}, ValueError, \
        r"seq_lens must be \[batch\]"
    yield "scale", (q, k, v), {"scale": -1.0}, ValueError, "scale must be a positive finite float"


BAD = list(_bad_inputs())


@pytest.mark.parametrize("impl", ["reference", "kernel"])
@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_inputs_raise_clear_errors(impl, case):
    _, args, kwargs, exc, match = case
    fn = ref_attention if impl == "reference" else decode_attention
    args = tuple(a.to(DEV) for a in args)
    kwargs = {key: val.to(DEV) if isinstance(val, torch.Tensor) else val for key, val in kwargs.items()}
    with pytest.raises(exc, match=match):
        fn(*args, **kwargs)


@pytest.mark.parametrize("kwargs,match", [
    ({"num_splits": 0}, "num_splits must be None or an int in"),
    ({"num_splits": 2.5}, "num_splits must be None or an int in"),
    ({"num_splits": True}, "num_splits must be None or an int in"),
    ({"config": {"block_n": 64}}, "config must be a DecodeConfig"),
])
def test_kernel_rejects_bad_launch_options(kwargs, match):
    q, k, v = make(1, 1, 2, 5, 16, F32)
    with pytest.raises((ValueError, TypeError), match=match):
        decode_attention(q, k, v, **kwargs)


def test_kernel_rejects_unsupported_sizes():
    q, k, v = make(1, 1, MAX_GROUP_SIZE + 1, 3, 16, F32)
    with pytest.raises(ValueError, match=f"group size q_heads/kv_heads = {MAX_GROUP_SIZE + 1}"):
        decode_attention(q, k, v)
    q, k, v = make(1, 1, 1, 3, 264, F32)
    with pytest.raises(ValueError, match="head_dim must be <= 256"):
        decode_attention(q, k, v)
    with pytest.raises(ValueError, match="block_n must be one of"):
        DecodeConfig(block_n=48)
    with pytest.raises(ValueError, match="num_warps must be one of"):
        DecodeConfig(num_warps=3)
    with pytest.raises(ValueError, match="num_stages must be None or an int in"):
        DecodeConfig(num_stages=0)


# =========================================================================================================
# The compiled code path, checked on a CPU: ahead-of-time compilation for an H100 (sm_90)
# =========================================================================================================
AOT_SCRIPT = r"""
import sys
from kvkernels._utils import compile_for_gpu, next_power_of_2
from kvkernels.decode_attention import _combine_kernel, _split_kv_kernel

def split_types(ptr):
    types = {}
    for a in (p.name for p in _split_kv_kernel.params if not p.is_constexpr):
        if a in ("Q", "K", "V", "Out"):
            types[a] = ptr
        elif a == "KeyMask":
            types[a] = "*u8"
        elif a == "SeqLens":
            types[a] = "*i64"
        elif a in ("MidO", "MidLse", "Logits", "Lse"):
            types[a] = "*fp32"
        elif a == "Done":
            types[a] = "*i32"
        elif a == "qk_scale_log2":
            types[a] = "fp32"
        else:
            types[a] = "i32"  # strides, T, tokens_per_split
    return types

# (pointer type, G, D, BLOCK_N, HAS_MASK, HAS_LENS, FP32, STORE_LOGITS): the tensor-core path (fp16/bf16), masks,
# an odd head dim, a large group, the IEEE fp32 path, and the logits-storing variant of decode_attention_mass.
for ptr, g, d, bn, mask, lens, fp32, logits in [("*bf16", 4, 128, 64, False, False, False, False),
                                                ("*fp16", 1, 64, 128, True, True, False, False),
                                                ("*bf16", 3, 80, 64, True, False, False, False),
                                                ("*fp16", 128, 128, 64, False, True, False, False),
                                                ("*fp32", 8, 128, 32, False, True, True, False),
                                                ("*bf16", 4, 128, 64, True, False, False, True)]:
    const = dict(G=g, BLOCK_G=max(16, next_power_of_2(g)), HEAD_DIM=d, BLOCK_D=max(16, next_power_of_2(d)),
                 BLOCK_N=bn, HAS_MASK=mask, HAS_LENS=lens, FP32=fp32, STORE_LOGITS=logits, stride_kd=1,
                 stride_vd=1, stride_qd=1)
    aligned = ("Q", "K", "V", "KeyMask", "SeqLens", "MidO", "MidLse", "Logits", "stride_qb", "stride_qh", "stride_kb",
               "stride_kh", "stride_kt", "stride_vb", "stride_vh", "stride_vt")  # as for contiguous inputs
    k = compile_for_gpu(_split_kv_kernel, split_types(ptr), const, divisible_by_16=aligned)
    assert "mma" in k.asm["ptx"] or fp32, "fp16/bf16 dots should use tensor cores"
    assert "cp.async" in k.asm["ptx"], "K/V tiles should be software-pipelined"
for ptr in ("*fp16", "*bf16", "*fp32"):
    types = {"MidO": "*fp32", "MidLse": "*fp32", "Out": ptr, "Lse": "*fp32", "stride_ob": "i32", "stride_oh": "i32",
             "stride_od": "i32", "num_splits": "i32"}
    wait = ptr == "*fp16"  # once with programmatic dependent launch (kvkernels._utils.use_pdl)
    k = compile_for_gpu(_combine_kernel, types, dict(HEAD_DIM=128, BLOCK_D=128, BLOCK_S=32, WAIT=wait), num_stages=1)
    assert ("griddepcontrol.wait" in k.asm["ptx"]) == wait
k = compile_for_gpu(_split_kv_kernel, split_types("*fp16"), dict(const, LAUNCH_DEPS=True), divisible_by_16=aligned)
assert "griddepcontrol.launch_dependents" in k.asm["ptx"]
assert "fence.acq_rel.gpu" not in k.asm["ptx"] and "atom.global" not in k.asm["ptx"]
# the in-kernel merge: partials fenced before an acq_rel count, the merge reading them through L2
k = compile_for_gpu(_split_kv_kernel, split_types("*fp16"), dict(const, MERGE=True, FENCE=True, BLOCK_S=16),
                    divisible_by_16=aligned)
ptx = k.asm["ptx"]
assert "griddepcontrol" not in ptx and "fence.acq_rel.gpu" in ptx and "atom.global.gpu.acq_rel" in ptx
assert "ld.global.cg" in ptx
# the one-split epilogue that writes Out and Lse directly
k = compile_for_gpu(_split_kv_kernel, split_types("*bf16"), dict(const, DIRECT=True), divisible_by_16=aligned)
assert "griddepcontrol" not in k.asm["ptx"] and k.asm["ptx"].count("st.global") >= 2
print("compiled ok")
"""


@pytest.mark.slow
def test_kernels_compile_for_hopper_without_a_gpu(compile_without_gpu):
    """The interpreter never runs the compiled path (tensor-core dots, pipelining, int64 pointer maths): compile
    it for sm_90 with Triton's bundled ptxas, in a process without TRITON_INTERPRET."""
    compile_without_gpu(AOT_SCRIPT)


# =========================================================================================================
# Compiled only
# =========================================================================================================
@pytest.mark.gpu
def test_gpu_batch_offsets_beyond_int32():
    """k and v of 2.2·10⁹ elements each (4.4 GB): the last batch row starts past 2³¹ elements."""
    b, h_kv, g, t, d = 33, 8, 4, 65536, 128
    assert b * h_kv * t * d > 2**31
    k = torch.zeros(b, h_kv, t, d, dtype=F16, device=DEV)
    v = torch.zeros_like(k)
    k[-1].normal_()
    v[-1].normal_()
    q = torch.randn(b, h_kv * g, d, dtype=F16, device=DEV)
    seq_lens = torch.zeros(b, dtype=torch.int32, device=DEV)
    seq_lens[-1] = t  # only the last row does work
    out, lse = decode_attention(q, k, v, seq_lens=seq_lens, return_lse=True)
    assert_matches_reference(q[-1:], k[-1:], v[-1:], out[-1:], lse[-1:])
    del k, v


@pytest.mark.gpu
def test_gpu_token_offsets_beyond_int32():
    """A [B, T, H, D] buffer viewed as [B, H, T, D]: token t sits t·H·D elements in, past 2³¹ for t ≥ 2²¹."""
    t, h_kv, g, d, tail = (1 << 21) + 5, 8, 2, 128, 300
    assert (t - 1) * h_kv * d > 2**31
    buf_k = torch.zeros(1, t, h_kv, d, dtype=BF16, device=DEV)
    buf_v = torch.zeros_like(buf_k)
    buf_k[:, -tail:].normal_()
    buf_v[:, -tail:].normal_()
    k, v = buf_k.transpose(1, 2), buf_v.transpose(1, 2)
    q = torch.randn(1, h_kv * g, d, dtype=BF16, device=DEV)
    mask = torch.zeros(1, t, dtype=torch.bool, device=DEV)
    mask[:, -tail:] = True
    out, lse = decode_attention(q, k, v, key_mask=mask, return_lse=True)
    assert_matches_reference(q, k[:, :, -tail:], v[:, :, -tail:], out, lse)
    del buf_k, buf_v


@pytest.mark.gpu
def test_gpu_call_is_cuda_graph_capturable():
    """No host synchronisation inside the call: it can be captured once and replayed on new data."""
    q, k, v = make(4, 8, 4, 3000, 128, BF16)
    seq_lens = torch.tensor([3000, 17, 2048, 1], device=DEV)
    decode_attention(q, k, v, seq_lens=seq_lens)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_attention(q, k, v, seq_lens=seq_lens)
    q.copy_(torch.randn_like(q))
    seq_lens.copy_(torch.tensor([5, 3000, 100, 2999], device=DEV))
    graph.replay()
    torch.cuda.synchronize()
    assert_matches_reference(q, k, v, out, seq_lens=seq_lens)


@pytest.mark.gpu
def test_gpu_graph_capture_with_many_splits():
    """16 splits (eager: merged in the split kernel) captured (the combine kernel runs in the graph): replays on
    new data are right, and so are eager calls after the capture."""
    q, k, v = make(1, 8, 4, 4096, 128, F16)
    decode_attention(q, k, v, num_splits=16)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_attention(q, k, v, num_splits=16)
    for seed in (1, 2):
        q.copy_(torch.randn(q.shape, generator=torch.Generator().manual_seed(seed)).to(DEV, F16))
        graph.replay()
        torch.cuda.synchronize()
        assert_matches_reference(q, k, v, out)
        assert_matches_reference(q, k, v, decode_attention(q, k, v, num_splits=16))


# =========================================================================================================
# The benchmark harness (its CPU-checkable parts)
# =========================================================================================================
@pytest.fixture
def bench_modules(monkeypatch):
    import os
    import sys

    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
    for name in ("common", "bench_decode_attention"):
        sys.modules.pop(name, None)
    import bench_decode_attention
    import common

    return common, bench_decode_attention


@pytest.mark.parametrize("name,slug,tbps", [
    ("NVIDIA H100 80GB HBM3", "h100-sxm", 3.35), ("NVIDIA H200", "h200", 4.8), ("NVIDIA H100 PCIe", "h100-pcie", 2.0),
    ("NVIDIA GeForce RTX 4090", "geforce-rtx-4090", None),
])
def test_bench_datasheet_lookup(bench_modules, name, slug, tbps):
    common, _ = bench_modules
    assert common.datasheet_tbps(name) == (slug, tbps)


def test_bench_interleaved_rounds_alternate_the_order(bench_modules):
    """Each contender is timed once per round, in the given order, then reversed, ...; each keeps its best round."""
    common, _ = bench_modules
    order, times = [], {"a": [3.0, 1.0, 2.0, 2.0], "b": [1.0, 4.0, 4.0, 0.5], "c": [2.0, 2.0, 2.0, 2.0]}
    fns = {name: name for name in times}

    def timer(fn, reps):
        order.append(fn)
        return {"median_ms": times[fn][sum(x == fn for x in order) - 1]}

    assert common.time_interleaved(fns, rounds=4, timer=timer) == {"a": 1.0, "b": 0.5, "c": 2.0}
    assert "".join(order) == "abccbaabccba"
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        common.time_interleaved(fns, rounds=0, timer=timer)


def test_bench_table_round_trip(bench_modules, tmp_path):
    common, _ = bench_modules
    table = common.Table("t", ["dtype", "B", "kvkernels µs"])
    table.add(dtype="bfloat16", B=4, **{"kvkernels µs": 12.345})
    gpu = common.GpuInfo("NVIDIA H200", "h200", 132, 150.0, 60.0, 4.8)
    path = table.write("bench_x", gpu, {"copy_bandwidth_tbps": "4.300"}, directory=str(tmp_path))
    assert path.endswith("bench_x_h200.md")
    meta, rows = common.read_markdown_table(path)
    assert meta["gpu"] == "NVIDIA H200" and meta["copy_bandwidth_tbps"] == "4.300" and meta["datasheet_tbps"] == "4.8"
    assert rows == [{"dtype": "bfloat16", "B": "4", "kvkernels µs": "12.3"}]
    with pytest.raises(KeyError, match="unknown columns"):
        table.add(batch=1)


def test_bench_grid_runs_end_to_end_on_tiny_shapes(bench_modules, monkeypatch):
    """The benchmark's bookkeeping (bytes, roofline, percentages, SDPA comparison, summary) on a CPU-sized grid."""
    if ON_GPU:
        pytest.skip("the real benchmark runs on the GPU: python benchmarks/bench_decode_attention.py")
    _, bench = bench_modules
    monkeypatch.setattr(bench, "H_Q", 4)
    monkeypatch.setattr(bench, "H_KV", 2)
    monkeypatch.setattr(bench, "HEAD_DIM", 16)

    def fake_timer(fn, reps):  # kvkernels (a functools.partial) 0.5 ms, every SDPA backend 2 ms
        fn()
        return {"median_ms": 0.5 if hasattr(fn, "keywords") else 2.0}

    table, recs = bench.run_grid([F16], (2,), (40,), copy_bw=1e9, datasheet=2.0, reps=1, device="cpu",
                                 timer=fake_timer)
    (rec,) = recs
    assert rec["nbytes"] == (2 * 2 * 4 * 16 + 2 * 2 * 2 * 40 * 16) * 2  # q + out + K + V, fp16
    assert rec["ours_us"] == 500.0 and rec["sdpa_best_us"] == 2000.0
    assert rec["roofline_us"] == pytest.approx(rec["nbytes"] / 1e9 * 1e6)
    assert rec["pct_copy"] == pytest.approx(100 * rec["roofline_us"] / 500.0)
    assert rec["speedup"] == pytest.approx(rec["sdpa_best_us"] / 500.0) and rec["max_diff"] < 2e-3
    assert "target >= 1.0" in bench.summary(recs)[-1] and len(table.rows) == 1
