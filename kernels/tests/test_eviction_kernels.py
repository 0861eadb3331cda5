"""Eviction kernels against refimpl: decode attention + attention mass (H2O), SnapKV window votes.

In CI both run under ``TRITON_INTERPRET=1`` on the CPU (see ``conftest.py``) at small, odd sizes; on a GPU the
same tests run compiled, plus the ``gpu``-marked larger / CUDA-graph cases.

Tolerances (kernel vs the fp32 PyTorch reference):
  * attention output, rounded to the input dtype: fp32 1e-5 abs / 1e-5 rel, fp16 2e-3 / 2e-3, bf16 1.6e-2 / 1.6e-2
    (output rounding plus probabilities rounded to the input type before P·V, as in ``decode_attention``);
  * attention mass and SnapKV votes (fp32 sums of probabilities, computed from fp32 logits in every dtype):
    fp32 1e-5 abs, fp16/bf16 1e-4 abs (compiled half-precision dots round differently from the fp32 reference);
    relative 1e-4 (votes sum up to w probabilities).
"""

from __future__ import annotations

import pytest
import torch
from kvkernels._utils import kernel_device
from kvkernels.decode_attention import MAX_GRID_YZ, MAX_GROUP_SIZE, MAX_HEAD_DIM, decode_attention
from kvkernels.decode_attention_mass import decode_attention_mass
from kvkernels.snapkv_score import snapkv_window_votes

from refimpl.h2o import decode_attention_with_mass
from refimpl.snapkv import snapkv_keep_mask, window_votes

DEV = kernel_device()
ON_GPU = DEV.type == "cuda"
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
OUT_TOL = {F32: (1e-5, 1e-5), F16: (2e-3, 2e-3), BF16: (1.6e-2, 1.6e-2)}
MASS_TOL = {F32: (1e-5, 1e-4), F16: (1e-4, 1e-4), BF16: (1e-4, 1e-4)}


def rand(*shape: int, dtype: torch.dtype, seed: int, scale: float = 1.0) -> torch.Tensor:
    """Seeded on the CPU so every device sees the same data."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEV)


def rand_mask(*shape: int, seed: int, p: float = 0.75) -> torch.Tensor:
    return (torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) < p).to(DEV)


def check_mass(q, k, v, mask=None, reduce="mean", **kw):
    out, mass = decode_attention_mass(q, k, v, key_mask=mask, gqa_reduce=reduce, **kw)
    want_out, want_mass = decode_attention_with_mass(q, k, v, key_mask=mask, gqa_reduce=reduce)
    assert out.dtype == q.dtype and mass.dtype == F32 and mass.shape == (k.shape[0], k.shape[1], k.shape[2])
    torch.testing.assert_close(out.float(), want_out.float(), atol=OUT_TOL[q.dtype][0], rtol=OUT_TOL[q.dtype][1])
    torch.testing.assert_close(mass, want_mass, atol=MASS_TOL[q.dtype][0], rtol=MASS_TOL[q.dtype][1])
    return out, mass


# =========================================================================================================
# decode attention + mass
# =========================================================================================================
@pytest.mark.parametrize("dtype", [F32, F16, BF16])
@pytest.mark.parametrize("b, h_kv, g, n, d, splits", [
    (1, 1, 1, 1, 16, None),      # a single key
    (2, 2, 3, 77, 24, 3),        # odd everything, non-power-of-two head dim, forced splits
    (1, 4, 1, 130, 64, None),    # MHA, several tiles
    (2, 1, 8, 45, 32, 2),        # MQA-like group of 8
])
def test_decode_mass_matches_refimpl(dtype, b, h_kv, g, n, d, splits):
    seed = n * 7 + d
    q = rand(b, h_kv * g, d, dtype=dtype, seed=seed, scale=2.0)
    k, v = rand(b, h_kv, n, d, dtype=dtype, seed=seed + 1), rand(b, h_kv, n, d, dtype=dtype, seed=seed + 2)
    _, mass = check_mass(q, k, v, num_splits=splits)
    torch.testing.assert_close(mass.sum(-1), torch.ones(b, h_kv, device=DEV), atol=1e-4, rtol=0)


@pytest.mark.parametrize("mask_shape", ["per_head", "per_row"])
@pytest.mark.parametrize("reduce", ["mean", "max"])
def test_decode_mass_with_masks_and_reductions(mask_shape, reduce):
    b, h_kv, g, n, d = 2, 2, 2, 53, 16
    q = rand(b, h_kv * g, d, dtype=F32, seed=0, scale=2.0)
    k, v = rand(b, h_kv, n, d, dtype=F32, seed=1), rand(b, h_kv, n, d, dtype=F32, seed=2)
    mask = rand_mask(b, h_kv, n, seed=3) if mask_shape == "per_head" else rand_mask(b, n, seed=3)
    _, mass = check_mass(q, k, v, mask, reduce, num_splits=2)
    full = mask if mask.dim() == 3 else mask[:, None].expand(b, h_kv, n)
    assert bool((mass[~full] == 0).all())  # masked (evicted / padding) slots get exactly nothing


def test_decode_mass_accumulates_in_place_and_fully_masked_head_is_zero():
    b, h_kv, g, n, d = 1, 2, 2, 40, 16
    q = rand(b, h_kv * g, d, dtype=F32, seed=0)
    k, v = rand(b, h_kv, n, d, dtype=F32, seed=1), rand(b, h_kv, n, d, dtype=F32, seed=2)
    mask = torch.ones(b, h_kv, n, dtype=torch.bool, device=DEV)
    mask[:, 1] = False  # head 1 has nothing to attend to
    acc = rand(b, h_kv, n, dtype=F32, seed=4).abs()
    before = acc.clone()
    out, mass = decode_attention_mass(q, k, v, key_mask=mask, accumulate_into=acc)
    assert mass is acc
    want_out, want_mass = decode_attention_with_mass(q, k, v, key_mask=mask)
    torch.testing.assert_close(acc, before + want_mass, atol=1e-5, rtol=1e-5)
    assert bool((out[:, 2:] == 0).all()) and not bool(out.isnan().any())
    torch.testing.assert_close(out, want_out, atol=1e-5, rtol=1e-5)


def test_decode_mass_reads_a_strided_slice_of_a_preallocated_buffer():
    """An inference cache writes into a buffer larger than what is filled: no copies needed."""
    b, h_kv, g, cap, n, d = 2, 2, 2, 64, 37, 32
    kbuf, vbuf = rand(b, h_kv, cap, d, dtype=F16, seed=1), rand(b, h_kv, cap, d, dtype=F16, seed=2)
    q = rand(b, h_kv * g, d, dtype=F16, seed=0, scale=2.0)
    check_mass(q, kbuf[:, :, :n], vbuf[:, :, :n])


def test_decode_mass_rejects_bad_arguments():
    q, k = rand(1, 2, 16, dtype=F32, seed=0), rand(1, 1, 5, 16, dtype=F32, seed=1)
    with pytest.raises(ValueError, match="gqa_reduce"):
        decode_attention_mass(q, k, k, gqa_reduce="sum")
    with pytest.raises(ValueError, match="accumulate_into"):
        decode_attention_mass(q, k, k, accumulate_into=torch.zeros(1, 1, 4, device=DEV))
    with pytest.raises(ValueError, match="accumulate_into"):
        decode_attention_mass(q, k, k, accumulate_into=torch.zeros(1, 1, 5, dtype=F16, device=DEV))
    with pytest.raises(TypeError, match="share one dtype"):
        decode_attention_mass(q.half(), k, k)
    with pytest.raises(ValueError, match="num_splits"):
        decode_attention_mass(q, k, k, num_splits=0)
    with pytest.raises(TypeError, match="config must be a DecodeConfig"):
        decode_attention_mass(q, k, k, config={"block_n": 64})


@pytest.mark.parametrize("fn", [decode_attention, decode_attention_mass], ids=lambda f: f.__name__)
@pytest.mark.parametrize("b,h_kv,g,d,match", [
    (1, 1, MAX_GROUP_SIZE + 1, 16, "group size q_heads/kv_heads"),
    (1, 1, 1, MAX_HEAD_DIM + 8, "head_dim must be <= "),
    (MAX_GRID_YZ + 1, 1, 1, 16, "batch and q_heads must each be <= 65535"),
    (1, 4 * 1024 + 1, 16, 16, "batch and q_heads must each be <= 65535"),  # 65,552 query heads
])
def test_decode_and_mass_share_launch_limits(fn, b, h_kv, g, d, match):
    """decode_attention and decode_attention_mass launch the same phase 1: the same limits, the same messages
    (checked before any launch, so these shapes cost only their few-MB tensors)."""
    q = torch.zeros(b, h_kv * g, d, device=DEV)
    k = torch.zeros(b, h_kv, 2, d, device=DEV)
    with pytest.raises(ValueError, match=match):
        fn(q, k, k)


# =========================================================================================================
# SnapKV window votes
# =========================================================================================================
@pytest.mark.parametrize("dtype", [F32, F16, BF16])
@pytest.mark.parametrize("b, h_kv, g, t, w, d", [
    (1, 1, 1, 2, 1, 16),      # smallest: one prefix key, one window query
    (2, 2, 3, 77, 5, 24),     # odd sizes, non-power-of-two head dim
    (1, 2, 2, 100, 70, 32),   # window longer than a row block: several blocks in both passes
    (2, 1, 4, 33, 32, 16),    # w = T - 1
])
def test_window_votes_match_refimpl(dtype, b, h_kv, g, t, w, d):
    seed = t * 3 + w
    q = rand(b, h_kv * g, w, d, dtype=dtype, seed=seed, scale=2.0)
    k = rand(b, h_kv, t, d, dtype=dtype, seed=seed + 1)
    mask = rand_mask(b, h_kv, t, seed=seed + 2, p=0.85)
    got = snapkv_window_votes(q, k, key_mask=mask)
    want = window_votes(q, k, mask)
    assert got.shape == (b, h_kv * g, t - w) and got.dtype == F32
    torch.testing.assert_close(got, want, atol=MASS_TOL[dtype][0], rtol=MASS_TOL[dtype][1])


def test_window_votes_without_mask_and_with_row_mask_give_the_same_selection():
    b, h_kv, g, t, w, d = 2, 2, 2, 90, 8, 32
    q = rand(b, h_kv * g, w, d, dtype=F32, seed=0, scale=2.0)
    k = rand(b, h_kv, t, d, dtype=F32, seed=1)
    torch.testing.assert_close(snapkv_window_votes(q, k), window_votes(q, k), atol=1e-5, rtol=1e-4)
    row_mask = torch.ones(b, t, dtype=torch.bool, device=DEV)
    row_mask[1, :11] = False  # left padding
    got = snapkv_window_votes(q, k, key_mask=row_mask)
    torch.testing.assert_close(got, window_votes(q, k, row_mask), atol=1e-5, rtol=1e-4)
    valid = row_mask[:, None].expand(b, h_kv, t)
    keep_kernel = snapkv_keep_mask(got, valid, capacity=24, window=w, kernel_size=5, pooling="maxpool")
    keep_ref = snapkv_keep_mask(window_votes(q, k, row_mask), valid, capacity=24, window=w, kernel_size=5,
                                pooling="maxpool")
    assert torch.equal(keep_kernel, keep_ref)


def test_window_votes_reject_bad_arguments():
    q, k = rand(1, 2, 4, 16, dtype=F32, seed=0), rand(1, 1, 4, 16, dtype=F32, seed=1)
    with pytest.raises(ValueError, match="1 <= w < T"):
        snapkv_window_votes(q, k)
    k = rand(1, 1, 9, 16, dtype=F32, seed=1)
    with pytest.raises(ValueError, match="key_mask"):
        snapkv_window_votes(q, k, key_mask=torch.ones(1, 8, dtype=torch.bool, device=DEV))
    with pytest.raises(ValueError, match="share batch, head_dim, dtype"):
        snapkv_window_votes(q.half(), k)


# =========================================================================================================
# GPU only: realistic sizes and CUDA-graph capture (what the benchmark relies on)
# =========================================================================================================
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F16, BF16])
def test_gpu_large_shapes(dtype):
    b, h_kv, g, n, d = 2, 8, 4, 8191, 128
    q = rand(b, h_kv * g, d, dtype=dtype, seed=0, scale=2.0)
    k, v = rand(b, h_kv, n, d, dtype=dtype, seed=1), rand(b, h_kv, n, d, dtype=dtype, seed=2)
    check_mass(q, k, v, rand_mask(b, h_kv, n, seed=3))
    qw = rand(b, h_kv * g, 32, d, dtype=dtype, seed=4, scale=2.0)
    torch.testing.assert_close(snapkv_window_votes(qw, k), window_votes(qw, k), atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
def test_gpu_decode_mass_is_graph_capturable():
    b, h_kv, g, n, d = 2, 4, 4, 2048, 128
    q = rand(b, h_kv * g, d, dtype=F16, seed=0)
    k, v = rand(b, h_kv, n, d, dtype=F16, seed=1), rand(b, h_kv, n, d, dtype=F16, seed=2)
    acc = torch.zeros(b, h_kv, n, device=DEV)
    decode_attention_mass(q, k, v, accumulate_into=acc)  # compile outside the capture
    acc.zero_()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, _ = decode_attention_mass(q, k, v, accumulate_into=acc)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    want_out, want_mass = decode_attention_with_mass(q, k, v)
    torch.testing.assert_close(acc, 3 * want_mass, atol=3e-4, rtol=1e-4)
    torch.testing.assert_close(out.float(), want_out.float(), atol=2e-3, rtol=2e-3)
