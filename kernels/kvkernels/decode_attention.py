"""Split-KV ("flash-decoding") GQA decode attention in Triton — the baseline every compressed kernel is compared with.

Decoding computes, for one new query per head, ``out = softmax(scale · q Kᵀ) V`` over T cached tokens
(``refimpl.attention`` is the PyTorch reference).  Per step this reads the whole cache once — 2·H_kv·T·D
elements — and does only ~4·H_q·T·D flops, so it is **memory-bound**: the best possible time is
``bytes(K) + bytes(V)`` divided by the memory bandwidth.  Two ideas get there:

1. **Online softmax** (Milakov & Gimelshein 2018; FlashAttention, Dao et al. 2022, Alg. 1).  Walk the keys in
   tiles of BLOCK_N, keeping per query row a running max m, running denominator ℓ and running output a:

       m' = max(m, max_j s_j),   ℓ' = e^{m − m'} ℓ + Σ_j e^{s_j − m'},   a' = e^{m − m'} a + Σ_j e^{s_j − m'} v_j

   so each K/V tile is read exactly once and never written back.  We work in base 2 (``exp2``) with the scale
   folded into ``log2(e) · scale``; the log-sum-exp is ``(m + log2 ℓ) · ln 2``.

2. **Split-KV** (Flash-Decoding, Dao, Haziza, Massa & Sizov 2023).  One query row per (batch, head) is far too
   little parallelism to fill a GPU, so the T tokens are cut into ``num_splits`` ranges handled by different
   programs (phase 1), each writing a partial output o_s and its log-sum-exp L_s; phase 2 combines them with

       L = log Σ_s e^{L_s},     out = Σ_s e^{L_s − L} o_s.

   With 3 or more splits phase 2 runs inside the phase-1 launch: each program stores its partial, fences, and
   bumps an atomic count per (batch, kv_head); the program that finds itself last merges that group's partials
   (all its query heads at once) and resets the count.  On an H100 this was up to 6% faster than a second,
   combine launch with 3, 4 and 16 splits (the most at the shortest calls; level with 3 splits at 16k tokens and
   with 4 at 64k+), and up to 2.7% slower with 2 (``DECODE_MERGE_IN_KERNEL``).  Otherwise phase 2 is a second
   launch, which on Hopper overlaps its start with phase 1 (programmatic dependent launch,
   ``kvkernels._utils.use_pdl``): that had saved 0.2–3.1 µs per call on 15 of 16 shapes.

**GQA** (Ainslie et al. 2023): a phase-1 program owns one (batch, kv_head, split) and *all G query heads of that
group*: the G queries form the rows of a ``[BLOCK_G, D]`` tile, so every K/V tile is loaded once for the whole
group and multiplied with ``tl.dot``.  Loading K/V once per query head instead would multiply memory traffic by G.

Layout: ``q [B, H_q, D]``, ``k, v [B, H_kv, T, D]`` (the ``refimpl.cache`` layout), any strides — no
``.contiguous()`` copies.  Offsets that can exceed 2³¹ elements (batch and head offsets, token offsets times a
large stride) are formed in int64.  ``seq_lens [B]`` gives per-row lengths (ragged batches, eviction caches);
values outside ``[0, T]`` are clamped (no host synchronisation, so the call can be captured in a CUDA graph).
``key_mask [B, T]`` or ``[B, H_kv, T]`` (bool) masks individual entries.  A row with no valid key returns 0 and
LSE −inf, like the reference.

Numerics: fp32 accumulation and softmax statistics always.  Compiled fp16/bf16 kernels feed K, V (and the
probabilities, rounded to the input type, as FlashAttention does) to tensor-core ``tl.dot``; fp32 inputs use
IEEE fp32 dots.  Under ``TRITON_INTERPRET=1`` fp16 takes the same path, bf16 tiles are upcast to fp32 (NumPy has
no bf16 arithmetic).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from refimpl.attention import check_decode_inputs

from ._utils import (
    cdiv,
    check_launchable,
    compute_in_fp32,
    device_name,
    interpreting,
    next_power_of_2,
    num_sms,
    use_pdl,
)

__all__ = [
    "MAX_GROUP_SIZE",
    "MAX_HEAD_DIM",
    "DecodeConfig",
    "choose_num_splits",
    "decode_attention",
    "default_config",
    "pipeline_stages",
    "stages_for",
]

MAX_GROUP_SIZE = 128  # query heads per KV head held as rows of one tile
MAX_HEAD_DIM = 256
MAX_GRID_YZ = 65535  # CUDA limit on grid dimensions 1 and 2 (kv_heads, batch)

# Split heuristic: about PROGRAMS_PER_SM phase-1 programs per SM, rounded down (never more programs than fit in
# one wave), but at least MIN_TILES_PER_SPLIT tiles per split so the fixed cost per program (load q, write a
# partial row) stays small next to the K/V it streams.  When the programs fit in one wave, each gets
# ONE_WAVE_STAGES pipeline stages: alone on its SM, it must keep enough loads in flight by itself.  A single split
# writes the answer itself (no combine launch).  H100 sweep (benchmarks/results/sweep_decode_attention_h100-sxm.md,
# fp16, 64-token tiles): this rule's choice was the fastest at 8 of 9 shapes (batch 4, 16k tokens: 95.3 µs vs
# 94.5 µs with 2 programs per SM); e.g. batch 16, 16k tokens: 349 µs with 1 split vs 354 µs with 2 splits and
# 2 stages (the previous heuristic), 418 µs with 1 split and 2 stages; batch 1, 128k tokens: 182 µs with 16 splits
# vs 187 µs with 33 splits and 2 stages.  Several splits are merged in the same launch (DECODE_MERGE_IN_KERNEL).
PROGRAMS_PER_SM = 1
ONE_WAVE_STAGES = 3
MANY_WAVES_STAGES = 2
# A faster memory needs more bytes in flight per SM (Little's law: bandwidth × latency), so GPUs whose name contains
# a key here get their own depths (one wave, many waves).  H200 (4.8 TB/s datasheet against the H100's 3.35), fp16,
# side by side (benchmarks/results/decode_attention_h200.md): 4 stages instead of 3 in one wave were 3.3-4.8%
# faster (batch 16 × 16k: 254.1 → 242.7 µs; batch 1 × 128k: 133.6 → 127.9 µs), 3 instead of 2 in several waves 5.6-6.4%
# (batch 32 × 16k: 507.5 → 479.1 µs).  On an H100 those depths were 0.2-1.3% slower (4 stages in one wave,
# decode_attention_repeats_h100-sxm.md, first section) and 0.6% slower (3 in several waves, batch 32 × 16k,
# sweep_decode_attention_h100-sxm.md), so other GPUs keep the constants above.
STAGES_BY_GPU: tuple[tuple[str, int, int], ...] = (("H200", 4, 3),)
MIN_TILES_PER_SPLIT = 2
MAX_SPLITS = 128
# With at least MERGE_MIN_SPLITS splits, the last program of each (batch, kv_head) to finish merges the partials of
# its G query heads (an atomic count per pair says which one is last) instead of a second, combine launch (the
# combine kernel, with programmatic dependent launch on Hopper, otherwise and when DECODE_MERGE_IN_KERNEL is False).
# H100, side by side (benchmarks/results/decode_attention_repeats_h100-sxm.md), H_q = 32, H_kv = 8, merged time /
# combine time: 16 splits (batch 1): 0.940-0.957 with 4k tokens, 0.976-0.984 at 16k, 0.991-0.997 at 64k-128k;
# 4 splits (batch 4): 0.968-0.975 at 4k, 0.989-0.992 at 16k, level at 64k-128k (run 15, the combine launch always
# timed first); 3 splits (batch 5): 0.957-0.965 at 1.6k, 0.984-0.992 at 4k, 0.986-0.993 at 8k, 0.995-1.000 at 16k;
# 2 splits (batch 6 and 8): 0.998-1.027 at 1.6k-16k, batch 16 × 16k 1.009-1.011 (run 17, the order alternating;
# two copies of the combine launch timed as A/A came out 0.979-1.014, the widest at the ~20 µs calls).
# While a CUDA graph is captured the combine launch is used too: the merge's count buffer must start at zero, and
# zeroing it in the graph (a memset node per call) cost ~1 µs per call (batch 8).  Merging the G heads one after
# another instead of all at once was 0.4-22% slower than the combine launch.
DECODE_MERGE_IN_KERNEL = True
MERGE_MIN_SPLITS = 3
MERGE_TILE = 8192  # fp32 partial values one merge step holds (rows × splits × head dim): 64 per thread at 4 warps

_LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class DecodeConfig:
    """Launch parameters of phase 1: tokens per tile, warps per program, software-pipelining depth (None: from the
    grid, :func:`pipeline_stages`)."""

    block_n: int = 64
    num_warps: int = 4
    num_stages: int | None = None

    def __post_init__(self) -> None:
        if self.block_n not in (16, 32, 64, 128, 256):
            raise ValueError(f"block_n must be one of (16, 32, 64, 128, 256); got {self.block_n!r}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"num_warps must be one of (1, 2, 4, 8, 16); got {self.num_warps!r}")
        if self.num_stages is not None and (not isinstance(self.num_stages, int) or isinstance(self.num_stages, bool)
                                            or not 1 <= self.num_stages <= 8):
            raise ValueError(f"num_stages must be None or an int in [1, 8]; got {self.num_stages!r}")


def default_config(head_dim: int, dtype: torch.dtype) -> DecodeConfig:
    """One fixed configuration per head size / dtype (a single small one under the interpreter).

    Tiles of ~16 KB per K (or V) tile: BLOCK_N · D · bytes ≈ 16 KB; pipeline depth from the grid
    (:func:`pipeline_stages`).
    """
    if interpreting():
        return DecodeConfig(block_n=32, num_warps=4, num_stages=1)
    elem = torch.empty((), dtype=dtype).element_size()
    block_d = max(16, next_power_of_2(head_dim))
    block_n = max(16, min(128, 16384 // (block_d * elem)))
    return DecodeConfig(block_n=block_n, num_warps=4)


def stages_for(gpu: str) -> tuple[int, int]:
    """Pipeline depths (one wave, many waves) for the GPU named ``gpu``: the first ``STAGES_BY_GPU`` entry whose key
    is in the name, else ``(ONE_WAVE_STAGES, MANY_WAVES_STAGES)``."""
    for key, one_wave, many_waves in STAGES_BY_GPU:
        if key in gpu:
            return one_wave, many_waves
    return ONE_WAVE_STAGES, MANY_WAVES_STAGES


def pipeline_stages(config: DecodeConfig, programs: int, sms: int, gpu: str = "") -> int:
    """``config.num_stages``, or if None: the one-wave depth of :func:`stages_for` (``gpu``, a device name) when
    ``programs`` ≤ ``sms`` (one program per SM must keep enough loads in flight on its own), else the many-waves
    depth."""
    if config.num_stages is not None:
        return config.num_stages
    one_wave, many_waves = stages_for(gpu)
    return one_wave if programs <= sms else many_waves


def choose_num_splits(batch: int, kv_heads: int, tokens: int, block_n: int, sms: int) -> int:
    """How many token ranges to cut each (batch, kv_head) into: about ``PROGRAMS_PER_SM`` programs per SM."""
    pairs = max(batch * kv_heads, 1)
    return clamp_splits(PROGRAMS_PER_SM * sms // pairs, tokens, block_n)  # rounded down: never a second wave


def clamp_splits(want: int, tokens: int, tile: int) -> int:
    """A split count ``want`` limited to [1, ``MAX_SPLITS``] and to at least ``MIN_TILES_PER_SPLIT`` tiles of
    ``tile`` tokens per split (shared by the split heuristics of every split-KV kernel here)."""
    return max(1, min(want, cdiv(cdiv(max(tokens, 1), tile), MIN_TILES_PER_SPLIT), MAX_SPLITS))


def key_mask_args(key_mask: Tensor | None, dummy: Tensor) -> tuple[Tensor, tuple[int, int, int]]:
    """The phase-1 kernel's KeyMask argument and its (batch, head, token) strides: a ``[B, T]`` or ``[B, H_kv, T]``
    bool mask viewed as uint8 (same bytes; Triton loads uint8 portably; head stride 0 for ``[B, T]``), or
    ``dummy`` and zero strides when there is no mask (never read: HAS_MASK=False)."""
    if key_mask is None:
        return dummy, (0, 0, 0)
    mask = key_mask.view(torch.uint8)
    return mask, ((mask.stride(0), mask.stride(1), mask.stride(2)) if mask.dim() == 3
                  else (mask.stride(0), 0, mask.stride(1)))


# ---------------------------------------------------------------------------------------------------------
# Phase 1: one program per (split, kv_head, batch) streams its token range for all G query heads.
# ---------------------------------------------------------------------------------------------------------
@triton.jit
def _split_kv_kernel(
    Q, K, V, KeyMask, SeqLens, MidO, MidLse, Logits, Out, Lse, Done,
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_mb, stride_mh, stride_mt,
    T, tokens_per_split, qk_scale_log2,
    G: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, HAS_MASK: tl.constexpr, HAS_LENS: tl.constexpr, FP32: tl.constexpr,
    STORE_LOGITS: tl.constexpr, LAUNCH_DEPS: tl.constexpr = False, DIRECT: tl.constexpr = False,
    MERGE: tl.constexpr = False, FENCE: tl.constexpr = False, BLOCK_S: tl.constexpr = 16,
    MERGE_ROWS: tl.constexpr = 1,
):
    # STORE_LOGITS (used by kvkernels.decode_attention_mass for H2O) also writes every scaled logit s to
    # Logits [B, H_q, T] (contiguous fp32): the only difference from plain decoding.
    # DIRECT (one split): write the final Out [B, H_q, D] and natural-log Lse [B, H_q] here; no combine launch.
    # MERGE (several splits): the last program of each (batch, kv_head) to finish merges the partials of its G
    # query heads into Out and Lse, MERGE_ROWS heads at a time (counted in Done [B·H_kv], int32, zero on entry
    # and left zero); FENCE orders the partial stores before the count (compiled only: inline PTX).
    if LAUNCH_DEPS:  # let the combine kernel launch now (it waits for our results itself: _utils.use_pdl)
        gdc_launch_dependents()
    split = tl.program_id(0)
    kvh = tl.program_id(1).to(tl.int64)  # int64 before any multiplication by a stride
    b = tl.program_id(2).to(tl.int64)
    num_splits = tl.num_programs(0)
    h_q = tl.num_programs(1) * G

    length = T
    if HAS_LENS:
        length = tl.minimum(tl.maximum(tl.load(SeqLens + b).to(tl.int32), 0), T)
    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, length)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    g_ok = offs_g < G
    d_ok = offs_d < HEAD_DIM

    # The G query heads of this KV head are rows kvh*G .. kvh*G+G-1 of q[b]: one [BLOCK_G, BLOCK_D] tile.
    heads = kvh * G + offs_g
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                mask=g_ok[:, None] & d_ok[None, :], other=0.0)
    if FP32:
        q = q.to(tl.float32)

    # Pointers to the first tile of this split; the scalar int64 part carries the large offsets.
    start64 = start.to(tl.int64)
    k_ptrs = (K + b * stride_kb + kvh * stride_kh + start64 * stride_kt
              + offs_n[:, None] * stride_kt + offs_d[None, :] * stride_kd)
    v_ptrs = (V + b * stride_vb + kvh * stride_vh + start64 * stride_vt
              + offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd)
    m_ptrs = KeyMask + b * stride_mb + kvh * stride_mh + start64 * stride_mt + offs_n * stride_mt
    l_ptrs = Logits + (b * h_q + heads)[:, None] * T + start64 + offs_n[None, :]  # row (b, head) of Logits

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)  # running max (base 2)
    l_i = tl.zeros([BLOCK_G], tl.float32)  # running denominator
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)  # running un-normalised output
    for n0 in range(start, end, BLOCK_N):
        n_ok = (n0 + offs_n) < end
        k = tl.load(k_ptrs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        v = tl.load(v_ptrs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        if FP32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * qk_scale_log2  # [BLOCK_G, BLOCK_N], log2 units
        valid = n_ok
        if HAS_MASK:
            valid = valid & (tl.load(m_ptrs, mask=n_ok, other=0) != 0)
        s = tl.where(valid[None, :], s, float("-inf"))
        if STORE_LOGITS:
            tl.store(l_ptrs, s, mask=g_ok[:, None] & n_ok[None, :])
            l_ptrs += BLOCK_N
        m_new = tl.maximum(m_i, tl.max(s, 1))
        if HAS_MASK:  # a fully masked tile leaves m_new = -inf; shift by 0 instead to avoid inf - inf
            m_new_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new_safe = m_new
        alpha = tl.exp2(m_i - m_new_safe)
        p = tl.exp2(s - m_new_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if FP32:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
        k_ptrs += BLOCK_N * stride_kt
        v_ptrs += BLOCK_N * stride_vt
        m_ptrs += BLOCK_N * stride_mt

    # Partial result of this split: normalised output and its log2-sum-exp (-inf for an empty split).
    has = l_i > 0.0
    o = acc / tl.where(has, l_i, 1.0)[:, None]
    lse2 = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
    if DIRECT:  # the only split: this is the answer (Out [B, H_q, D] contiguous, Lse [B, H_q] in natural log)
        rows = b * h_q + heads
        tl.store(Lse + rows, lse2 * 0.6931471805599453, mask=g_ok)
        tl.store(Out + rows[:, None] * HEAD_DIM + offs_d[None, :], o.to(Out.dtype.element_ty),
                 mask=g_ok[:, None] & d_ok[None, :])
    else:
        rows = (b * h_q + heads) * num_splits + split  # MidLse is [B, H_q, num_splits], MidO adds HEAD_DIM
        tl.store(MidLse + rows, lse2, mask=g_ok)
        tl.store(MidO + rows[:, None] * HEAD_DIM + offs_d[None, :], o, mask=g_ok[:, None] & d_ok[None, :])
        if MERGE:  # the last of this (batch, kv_head)'s programs to finish merges the partials: no combine launch
            pair = b * tl.num_programs(1) + kvh
            if _last_to_arrive(Done + pair, num_splits, offs_g, FENCE):
                offs_r = tl.arange(0, MERGE_ROWS)
                for r0 in range(0, G, MERGE_ROWS):  # MERGE_ROWS query heads at a time, all their loads at once
                    out_rows = b * h_q + kvh * G + r0 + offs_r  # Out [B, H_q, D] contiguous
                    _merge_rows(MidO, MidLse, Out + out_rows[:, None] * HEAD_DIM + offs_d[None, :], Lse + out_rows,
                                out_rows, (r0 + offs_r) < G, num_splits, MERGE_ROWS, HEAD_DIM, BLOCK_D, BLOCK_S, ".cg")
                tl.store(Done + pair, 0)  # zero again for the next call


# ---------------------------------------------------------------------------------------------------------
# Phase 2: one program per (query head, batch) merges the num_splits partial results.
# ---------------------------------------------------------------------------------------------------------
@triton.jit
def _merge_rows(MidO, MidLse, out_ptrs, lse_ptrs, rows, r_ok, num_splits, BLOCK_R: tl.constexpr,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, CACHE: tl.constexpr):
    """Merge the ``num_splits`` partials of each partial row in ``rows`` (``[BLOCK_R]``; ``MidO``/``MidLse`` at
    rows ``row·num_splits + s``; only where ``r_ok``) into ``out_ptrs`` (``[BLOCK_R, BLOCK_D]`` pointers, the
    output's dtype) and the natural-log LSE at ``lse_ptrs`` (``[BLOCK_R]``), every load of a step issued together.
    The combine kernel and KIVI's in-kernel merge take one row; the split kernel's in-kernel merge a KV head's G
    query heads at once.
    ``CACHE``: the loads' cache modifier — ``""`` (default), or ``".cg"`` (through L2 only) for partials that other
    programs of the *same* launch wrote (L1 is not coherent between SMs).  (No default value: Triton 3.6's compiler
    rejects a defaulted string constexpr in a helper.)"""
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)  # running max of the L_s
    den = tl.zeros([BLOCK_R], tl.float32)  # running Σ e^{L_s - m}
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)  # running Σ e^{L_s - m} o_s
    for s0 in range(0, num_splits, BLOCK_S):
        ok = r_ok[:, None] & ((s0 + offs_s) < num_splits)[None, :]
        idx = rows[:, None] * num_splits + s0 + offs_s[None, :]  # [BLOCK_R, BLOCK_S]
        lse = tl.load(MidLse + idx, mask=ok, other=float("-inf"), cache_modifier=CACHE)  # log2 units
        o = tl.load(MidO + idx[:, :, None] * HEAD_DIM + offs_d[None, None, :],
                    mask=ok[:, :, None] & d_ok[None, None, :], other=0.0, cache_modifier=CACHE)
        m_new = tl.maximum(m, tl.max(lse, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all splits so far empty: avoid inf - inf
        alpha = tl.exp2(m - m_safe)
        w = tl.exp2(lse - m_safe[:, None])  # 0 for empty splits
        den = den * alpha + tl.sum(w, 1)
        acc = acc * alpha[:, None] + tl.sum(w[:, :, None] * o, 1)
        m = m_new
    has = den > 0.0
    out = acc / tl.where(has, den, 1.0)[:, None]
    tl.store(out_ptrs, out.to(out_ptrs.dtype.element_ty), mask=r_ok[:, None] & d_ok[None, :])
    tl.store(lse_ptrs, tl.where(has, (m + tl.log2(tl.where(has, den, 1.0))) * 0.6931471805599453, float("-inf")),
             mask=r_ok)


@triton.jit
def _fence_gpu(like):
    """``fence.acq_rel.gpu`` in every thread (one per element of ``like``; executing it twice is harmless)."""
    tl.inline_asm_elementwise("fence.acq_rel.gpu;\n\tmov.u32 $0, 0;", "=r,r", [like], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def _last_to_arrive(count_ptr, n, like, FENCE: tl.constexpr):
    """For an in-kernel merge, after this program stored its partial: count it at ``count_ptr`` and return whether
    it was the last of the ``n`` programs sharing the count.  Every thread fences first (``FENCE``; its partial is
    visible GPU-wide before the count moves), one thread adds with acq_rel and all receive the old count, and the
    last program fences again before it reads the others' partials (through L2: ``.cg``).  The caller sets the
    count back to 0 after merging, so the next launch finds it zero."""
    if FENCE:
        _fence_gpu(like)
    tl.debug_barrier()
    last = tl.atomic_add(count_ptr, 1, sem="acq_rel") == n - 1
    if FENCE:  # noqa: SIM102 (a compile-time branch around a run-time one)
        if last:
            _fence_gpu(like)
    return last


@triton.jit
def _combine_kernel(
    MidO, MidLse, Out, Lse,
    stride_ob, stride_oh, stride_od,
    num_splits,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, WAIT: tl.constexpr = False,
):
    if WAIT:  # launched early (programmatic dependent launch): wait for the split kernel's results
        gdc_wait()
    h = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    rows = b * tl.num_programs(0) + h + tl.arange(0, 1)  # this program's one row
    offs_d = tl.arange(0, BLOCK_D)
    _merge_rows(MidO, MidLse, Out + b * stride_ob + h * stride_oh + offs_d[None, :] * stride_od, Lse + rows, rows,
                rows >= 0, num_splits, 1, HEAD_DIM, BLOCK_D, BLOCK_S, "")


_COUNTERS: dict[tuple[torch.device, int], Tensor] = {}


def merge_block_s(splits: int, most: int = 32) -> int:
    """Partials one merge step holds (``BLOCK_S``): all ``splits`` of them (a power of two ≥ it), at most ``most`` —
    32 for the combine kernel and the split kernel's in-kernel merge; the one-warp KIVI kernel passes 16."""
    if most < 1 or most & (most - 1):
        raise ValueError(f"most must be a power of two >= 1, got {most}")
    return min(most, next_power_of_2(splits))


def merge_rows(group: int, block_s: int, block_d: int) -> int:
    """Query heads the in-kernel merge takes per step: all ``group`` of them (a power of two ≥ it) while
    rows × ``block_s`` partials × ``block_d`` channels stay within ``MERGE_TILE`` fp32 values, else fewer."""
    return min(next_power_of_2(group), max(1, MERGE_TILE // (block_s * block_d)))


def capturing(device: torch.device) -> bool:
    """Whether a CUDA graph is being captured on ``device``'s current stream."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def merge_counters(device: torch.device, n: int) -> Tensor:
    """``n`` int32 zeros for an in-kernel merge's per-row counts (this module's split kernel and the KIVI kernel).
    Every launch sets each count back to zero when it has merged, so one zeroed buffer per (device, stream) serves
    every later call on that stream without a fill kernel (calls on one stream run one after another).  While a
    CUDA graph is being captured a fresh zeroed buffer is made (and captured) instead: one allocated inside the
    capture belongs to the graph's memory pool."""
    if capturing(device):
        return torch.zeros(n, dtype=torch.int32, device=device)
    key = (device, torch.cuda.current_stream(device).stream_id if device.type == "cuda" else 0)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < n:
        buf = torch.zeros(max(n, 1024), dtype=torch.int32, device=device)
        _COUNTERS[key] = buf
    return buf


def launch_combine(mid_o: Tensor, mid_lse: Tensor, out: Tensor, lse: Tensor, *, pdl: bool = False) -> None:
    """Phase 2 for any split kernel that writes this module's partial layout (``mid_o [B, H_q, S, D]``,
    ``mid_lse [B, H_q, S]`` fp32, log2 units): merges the S partials into ``out [B, H_q, D]`` and the natural-log
    ``lse [B, H_q]``.  ``pdl``: the split kernel was launched with ``LAUNCH_DEPS`` (``_utils.use_pdl``), so this
    one launches early and waits on the device."""
    b, h_q, splits, d = mid_o.shape
    _combine_kernel[(h_q, b)](
        mid_o, mid_lse, out, lse, *out.stride(), splits,
        HEAD_DIM=d, BLOCK_D=max(16, next_power_of_2(d)), BLOCK_S=merge_block_s(splits), WAIT=pdl,
        num_warps=4 if d >= 128 else 2, **({"launch_pdl": True} if pdl else {}),
    )


# ---------------------------------------------------------------------------------------------------------
# Launching the two phases (shared with kvkernels.decode_attention_mass)
# ---------------------------------------------------------------------------------------------------------
def check_launch_options(batch: int, q_heads: int, kv_heads: int, head_dim: int, num_splits: int | None,
                         config: DecodeConfig | None) -> None:
    """What :func:`launch_decode` supports beyond ``refimpl.attention.check_decode_inputs``: group size and head
    dim (one tile holds them), the CUDA grid limits, ``num_splits`` and ``config`` (raises naming the parameter)."""
    g = q_heads // kv_heads
    if g > MAX_GROUP_SIZE:
        raise ValueError(f"group size q_heads/kv_heads = {g} is not supported; it must be <= {MAX_GROUP_SIZE}")
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be <= {MAX_HEAD_DIM}; got {head_dim}")
    if batch > MAX_GRID_YZ or q_heads > MAX_GRID_YZ:  # kv_heads <= q_heads
        raise ValueError(f"batch and q_heads must each be <= {MAX_GRID_YZ} (CUDA grid limit); got batch {batch}, "
                         f"q_heads {q_heads}")
    if num_splits is not None and (not isinstance(num_splits, int) or isinstance(num_splits, bool)
                                   or not 1 <= num_splits <= 65535):
        raise ValueError(f"num_splits must be None or an int in [1, 65535]; got {num_splits!r}")
    if config is not None and not isinstance(config, DecodeConfig):
        raise TypeError(f"config must be a DecodeConfig or None; got {type(config).__name__}")


def launch_decode(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, *, key_mask: Tensor | None,
                  seq_lens: Tensor | None, scale: float | None, num_splits: int | None, config: DecodeConfig | None,
                  logits: Tensor | None = None) -> None:
    """Phase 1 (and phase 2 unless there is one split) on checked, non-empty inputs: writes ``out`` (contiguous
    ``[B, H_q, D]``) and ``lse`` (natural log, ``[B, H_q]``), and every scaled logit (log2 units) into ``logits``
    (contiguous fp32 ``[B, H_q, T]``) when given."""
    (b, h_q, d), (h_kv, t) = q.shape, k.shape[1:3]
    g = h_q // h_kv
    cfg = config or default_config(d, q.dtype)
    block_d = max(16, next_power_of_2(d))
    sms = num_sms(q.device)
    if num_splits is None:
        splits = choose_num_splits(b, h_kv, t, cfg.block_n, sms)
        tokens_per_split = cdiv(cdiv(t, cfg.block_n), splits) * cfg.block_n  # tile-aligned ranges
        splits = cdiv(t, tokens_per_split)
    else:
        splits = num_splits
        tokens_per_split = cdiv(t, splits)  # exactly num_splits ranges; trailing ones may be empty
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)

    direct = splits == 1  # phase 1 writes out and lse itself: no partials, no combine launch
    merge = DECODE_MERGE_IN_KERNEL and splits >= MERGE_MIN_SPLITS and not capturing(q.device)
    mid_o = out if direct else torch.empty((b, h_q, splits, d), dtype=torch.float32, device=q.device)
    mid_lse = lse if direct else torch.empty((b, h_q, splits), dtype=torch.float32, device=q.device)
    mask, sm = key_mask_args(key_mask, q)
    pdl = use_pdl(q.device) and not direct and not merge
    done = merge_counters(q.device, b * h_kv) if merge else mid_lse  # any pointer: not read without MERGE
    block_s = merge_block_s(splits)
    _split_kv_kernel[(splits, h_kv, b)](
        q, k, v, mask, q if seq_lens is None else seq_lens, mid_o, mid_lse, mid_lse if logits is None else logits,
        out, lse, done, *q.stride(), *k.stride(), *v.stride(), *sm,
        t, tokens_per_split, scale * _LOG2E,
        G=g, BLOCK_G=max(16, next_power_of_2(g)), HEAD_DIM=d, BLOCK_D=block_d, BLOCK_N=cfg.block_n,
        HAS_MASK=key_mask is not None, HAS_LENS=seq_lens is not None, FP32=compute_in_fp32(q.dtype),
        STORE_LOGITS=logits is not None, LAUNCH_DEPS=pdl, DIRECT=direct, MERGE=merge,
        FENCE=merge and not interpreting(), BLOCK_S=block_s if merge else 16,  # (unused without MERGE: no respecializing)
        MERGE_ROWS=merge_rows(g, block_s, block_d) if merge else 1,
        num_warps=cfg.num_warps,
        num_stages=pipeline_stages(cfg, splits * h_kv * b, sms, device_name(q.device)),
    )
    if not direct and not merge:
        launch_combine(mid_o, mid_lse, out, lse, pdl=pdl)


# ---------------------------------------------------------------------------------------------------------
# Python entry point
# ---------------------------------------------------------------------------------------------------------
def decode_attention(q: Tensor, k: Tensor, v: Tensor, *, key_mask: Tensor | None = None,
                     seq_lens: Tensor | None = None, scale: float | None = None, num_splits: int | None = None,
                     return_lse: bool = False, config: DecodeConfig | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """Split-KV decode attention; same contract as :func:`refimpl.attention.decode_attention`.

    Args:
        q: ``[B, H_q, D]``; k, v: ``[B, H_kv, T, D]`` with ``H_kv | H_q``; fp32, fp16 or bf16; any strides.
        key_mask: optional bool ``[B, T]`` or ``[B, H_kv, T]``, True = may attend.
        seq_lens: optional int ``[B]``; row b attends to positions ``< seq_lens[b]`` (clamped to ``[0, T]``).
        scale: softmax scale, default ``1/sqrt(D)``.
        num_splits: token ranges per (batch, kv_head); default from :func:`choose_num_splits`.
        return_lse: also return the natural-log log-sum-exp ``[B, H_q]`` (fp32).
        config: launch parameters; default :func:`default_config`.
    """
    b, h_q, h_kv, t, d = check_decode_inputs(q, k, v, key_mask, seq_lens, scale)
    check_launch_options(b, h_q, h_kv, d, num_splits, config)
    check_launchable(*(x for x in (q, k, v, key_mask, seq_lens) if x is not None))

    out = torch.empty((b, h_q, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, h_q), dtype=torch.float32, device=q.device)
    if b == 0 or t == 0:  # nothing to attend to
        out.zero_()
        lse.fill_(float("-inf"))
        return (out, lse) if return_lse else out

    launch_decode(q, k, v, out, lse, key_mask=key_mask, seq_lens=seq_lens, scale=scale, num_splits=num_splits,
                  config=config)
    return (out, lse) if return_lse else out
