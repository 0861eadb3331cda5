"""Decode attention that reads KIVI's packed 2/4/8-bit codes directly (Liu et al. 2024, arXiv 2402.02750, §3.3:
"fuse the dequantization with the matrix multiplication").

A decode step is memory-bound: it streams the whole cache once per token (``kvkernels.decode_attention``).  KIVI-2
stores B + 32/G = 3 bits per element instead of 16 (G = 32), so a kernel that *reads the codes* and dequantizes in
registers moves ~5x fewer bytes.  Dequantizing to fp16 in memory first and then calling attention would read the
codes, write fp16, and read fp16 again: slower than not quantizing at all.

Cache layout (``refimpl.kivi``; F = 32/B codes per int32 word, packed along channels, token-major):

    keys   (per channel)  codes [B, H_kv, N_k, D/F]  scale, zero [B, H_kv, N_k/G, D]  residual [B, H_kv, T − N_k, D]
    values (per token)    codes [B, H_kv, N_v, D/F]  scale, zero [B, H_kv, N_v, D/G]  residual [B, H_kv, T − N_v, D]

Token t's key is quantized iff t < N_k (a multiple of G), its value iff t < N_v.

The algebra that keeps the unpacking short: one logic op and one multiply-add per code.  Compiled for sm_90 by
Triton 3.6 with the default launch (one warp, 8-token tiles, ≤ 128 registers) the bulk tile loop is ~208 SASS
instructions per thread per tile outside its rarely taken rescale branch (~3.3 per code, counting reductions, scale
math and the softmax).  It was ~234 while the value scales and zeros were loaded one per packed word: Triton gave
those loads a layout of their own, and converting them to the accumulator's cost shuffles, byte permutes and spills
in every tile; loaded one per (token, value group), they land where the accumulator needs them (three H100 runs,
``kivi_experiments_h100-sxm.md`` run 10: 1.8–3.7% faster at batch 4–16, 2.7–4.9% for KIVI-4, level at batch 1,
−1.7 to +2.3% at batch 32).  The version before that (the exponent-of-1.0 trick with one rotate per code, addresses
recomputed per tile, a warp-wide sum of the softmax denominator per tile) ran ~293, and this one is 11–19% faster
on an H100 (same run, side by side): the kernel is partly instruction-bound.  Before that, loading the next tile
during the current one (the register double buffer in the bulk loop) and fitting 16 one-warp programs per SM
gained 10–20%.  Then, once per key group, asking L2 to prefetch rows a little ahead (``prefetch.global.L2``: no
registers wait for them; ``KIVI_L2_PREFETCH_TOKENS``) gained 4–13% from batch 4 up, and giving the tail token
ranges of its own (``kivi_token_ranges``) 4–35% at batch 1–8, and merging the partials in-kernel (below) 2.6–5.4%
at batch 1 with 16k–64k tokens.  At 32k context it reads at 55–76% of the copy bandwidth, 2.98–3.94x faster than
fp16 SDPA decode (2.98–3.81x in a later run of the same code: benchmarks/results/bench_kivi_attention_h100-sxm.md)
— not yet the ≥ 4x that its 5.3x fewer bytes allow.  Before the L2 prefetch, instruction issue bound it at large batch
(benchmarks/results/kivi_experiments_h100-sxm.md): at batch 32 Nsight Compute counted 77% of issue slots busy, a
variant whose loads all hit L1 took only 23% less time, and prefetching 2 or 3 tiles ahead into registers instead
of 1 was slower (more registers, spills at the 128 cap).  With the prefetch and the tail ranges it issues in 73%
(batch 1) to 82% (batch 32) of scheduler cycles; two q·k chains per token instead of one, or each tile's value sums
overlapped with the next tile's keys (software pipelining by hand), measured level or up to 5% slower, 7–9% slower
together.  Keeping the tile addresses as stepped pointers (5% fewer instructions per tile) measured 0.6–2.4%
slower, and int32 token offsets within a head (7% fewer) level or up to 3% slower (run 10); capping registers below
128 to fit more warps, or a register buffer two or three tiles deep, slower still.  Short tail programs *added*
to the bulk ranges were slower (the batch-1 grid spilled into a second wave); the tail ranges that helped replace
bulk ranges, within the same count.
A tensor-core variant (codes unpacked to fp16 by inline PTX, dequantized with packed fp16 math, then ``tl.dot``;
git branch ``exp/kivi-tensor-core``) compiled to no fewer instructions per code: Triton's layout conversions between
the unpack and the dot (shared-memory round trips, register moves) ate the savings.

* **Codes as denormal floats.**  A word holds F = 32/B codes; code j of its low 16 bits, and code j of the word
  shifted right by 16 (one shift per word), sits at bits B·j … B·j + B − 1.  AND-ing everything else away and
  reading the 32 bits as an fp32 (exponent field 0) gives the denormal f = c·2^(B·j − 149) *exactly*: no shift
  per code, no int→float conversion, and — unlike setting the exponent of 1.0, which makes 1 + c·2^−B — no
  large constant to cancel later.  fp32 multiply-adds take denormal inputs at full speed (Triton emits
  ``fma.rn.f32``, not the flush-to-zero form); the factor 2^(149 − B·j) is folded into per-channel constants,
  split so that no product leaves fp32's normal range: products are 2^−K_KEY (keys) and 2^(K_VAL − 149)
  (values) times their true size, and one multiply per token (keys) or per program (values) puts it back.
  Finite while |q_d·s_d| < 2^42 (q including the softmax scale) and for any fp16 value scale.
* **Keys.**  Within a key group channel d has one scale s_d and zero z_d, and

      q·k̂_t = Σ_d q_d (s_d c_td + z_d) = 2^K_KEY Σ_d (q_d s_d 2^(149 − K_KEY − B·j_d)) f_td + Σ_d q_d z_d

  — the per-channel factor and the constant are computed once per group; each code costs one multiply-add.
* **Values** (per-token scale s_{t,g(d)}): p_t v̂_td = 2^(149 − K_VAL − B·j_d) (2^K_VAL p_t s_{t,g}) f_td + p_t z_{t,g}.
  The first term accumulates elementwise in a ``[BLOCK_T, D]`` register accumulator (one multiply-add per code),
  the second per value group; both are reduced over tokens once, at the end, as is the softmax denominator (kept
  per token slot).  The running softmax rescales the accumulators only when the running maximum grows.
* **Layout.**  Tiles are ``[tokens, words, 2, …, 2]``: the code-in-word axis is built with ``tl.join``, which keeps
  it inside one thread, so a word is unpacked where it was loaded and the q·k sum over channels is mostly in-thread
  (Triton's default layout would spread it over lanes and pay shuffles per token).

Parallelism is split-KV (Flash-Decoding): program (split, query head, batch) handles a token range and writes a
partial output with its log2-sum-exp, and the last of a (batch, head)'s programs to finish (an atomic count per head)
merges them in the same launch (``decode_attention._merge_rows``, the body of the separate combine kernel, which
``KIVI_MERGE_IN_KERNEL = False`` launches instead): on an H100 2.6-5.4% faster at batch 1 with 16k-64k tokens,
level within the run-to-run spread at 4k and from batch 4 up (kivi_experiments_h100-sxm.md, run 14).  In a CUDA
graph, where the merge costs a memset per replay, only ranges of ``GRAPH_MERGE_MIN_TOKENS`` or more are merged in
the kernel (run 16).  Each query head re-reads its KV head's codes (through L2 for GQA); MHA — where the authors
recommend KIVI-2 — reads each once.
Ranges are whole key groups, the bulk and the tail in ranges of their own by default (``kivi_token_ranges``).  The
bulk (tokens with both key and value quantized) runs a branch-free loop over key groups — the per-channel key
factors once per group — and their tiles, each tile's packed words and value scales loaded one tile ahead (and
asked of L2 earlier, in launches of more than one wave); the short tail (the residuals and the value-quantization
boundary) runs a general loop.  Offsets that scale with batch, heads or tokens are int64.  Accumulation is fp32;
under ``TRITON_INTERPRET=1`` everything is fp32 anyway.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.language.extra.cuda import gdc_launch_dependents

from refimpl.attention import decode_attention as ref_decode_attention
from refimpl.quant import check_quant_args, codes_per_word, unpack_dequantize

from ._utils import cdiv, check_launchable, interpreting, next_power_of_2, num_sms, use_pdl
from .decode_attention import (
    _last_to_arrive,
    _merge_rows,
    capturing,
    clamp_splits,
    launch_combine,
    merge_block_s,
    merge_counters,
)

__all__ = ["KIVIDecodeConfig", "choose_kivi_splits", "kivi_cache_attention", "kivi_decode_attention",
           "kivi_decode_attention_ref", "kivi_token_ranges"]

# Launch shape, from H100 sweeps (benchmarks/results/sweep_kivi_h100-sxm.md, KIVI-2, MHA H = 32, D = 128, 32k
# context), taken before the denormal unpacking (module docstring) and re-checked after it: a version then bound
# by memory latency gained nothing from 30% fewer instructions and 10-20% from loading the next tile during the
# current one (a register double buffer).  So: one warp per program (its reductions are shuffles only: no shared
# memory, no barriers), 8-token tiles with at most 128 registers so that 16 programs share an SM, and fine splits
# — whole waves of KIVI_PROGRAMS_PER_SM programs per SM, as many as bring each range nearest
# KIVI_TOKENS_PER_SPLIT tokens (choose_kivi_splits).
KIVI_PROGRAMS_PER_SM = 16
KIVI_TOKENS_PER_SPLIT = 1024

_LOG2E = 1.4426950408889634
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class KIVIDecodeConfig:
    """Launch parameters: tokens per tile (must divide group_size), warps per program, and a cap on registers per
    thread (``maxnreg``, None = the compiler's choice; ignored under the interpreter).  There is no pipelining
    depth: the bulk loop double-buffers its loads in registers itself (Triton's ``num_stages`` on top of that
    measured the same, ``benchmarks/results/sweep_kivi_h100-sxm.md``)."""

    block_t: int = 8
    num_warps: int = 1
    maxnreg: int | None = 128

    def __post_init__(self) -> None:
        if self.block_t not in (4, 8, 16, 32, 64, 128):
            raise ValueError(f"block_t must be one of (4, 8, 16, 32, 64, 128); got {self.block_t!r}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"num_warps must be one of (1, 2, 4, 8, 16); got {self.num_warps!r}")
        if self.maxnreg is not None and (not isinstance(self.maxnreg, int) or isinstance(self.maxnreg, bool)
                                         or not 24 <= self.maxnreg <= 255):
            raise ValueError(f"maxnreg must be None or an int in [24, 255]; got {self.maxnreg!r}")


def default_config(group_size: int) -> KIVIDecodeConfig:
    if interpreting():
        return KIVIDecodeConfig(block_t=min(group_size, 16), num_warps=4, maxnreg=None)
    # One warp, 8-token tiles, at most 128 registers (16 programs per SM): see KIVI_PROGRAMS_PER_SM.
    return KIVIDecodeConfig(block_t=min(group_size, 8), num_warps=1, maxnreg=128)


def choose_kivi_splits(batch: int, q_heads: int, tokens: int, block_t: int, sms: int) -> int:
    """Token ranges per (batch, query head), filling whole waves: a wave is ``KIVI_PROGRAMS_PER_SM`` programs per
    SM, counted in programs (``splits = waves · wave // (batch · q_heads)``: the programs never spill past the waves),
    with as many waves (at least one) as bring the ranges nearest ``KIVI_TOKENS_PER_SPLIT`` tokens; then at least
    ``MIN_TILES_PER_SPLIT`` tiles each, ≤ ``MAX_SPLITS``.

    Rounding a wave's share up instead (the rule before, ``cdiv(wave, batch · q_heads)`` splits at least) launched
    a second wave of a few programs: batch 4 with 4k-16k tokens got 17 splits, 2,176 programs for 2,112 slots on
    132 SMs, and took 1.25-1.34x the time of 16 splits on an H100 and on an H200 (kivi_experiments_h100-sxm.md,
    run 20)."""
    wave, heads = KIVI_PROGRAMS_PER_SM * sms, max(batch * q_heads, 1)
    tokens_per_wave = KIVI_TOKENS_PER_SPLIT * wave  # the tokens one wave of ranges of the target length covers
    waves = max(1, (2 * tokens * heads + tokens_per_wave) // (2 * tokens_per_wave))  # rounded to the nearest
    return clamp_splits(max(1, waves * wave // heads), tokens, block_t)


# The tail (tokens whose key or value is still full precision, or that share a key group with such a token;
# ~130-190 tokens in a decode step with R = 128) runs the general loop, whose SASS per tile is ~3.8x the bulk loop's
# and whose loads are not prefetched.  Ranges of its own (kivi_token_ranges), costed at KIVI_TAIL_COST bulk tokens
# per tail token, keep it off the critical path.  H100 (kivi_experiments_h100-sxm.md, run 7) against uniform ranges
# over all tokens: 16% faster at batch 1, 32k, 35% at batch 1, 4k, 4-9% at batch 4-8; costs 2, 3 and 4 alike.
KIVI_TAIL_COST = 3


def kivi_token_ranges(tokens: int, bulk: int, group_size: int, splits: int,
                      separate_tail: bool = True) -> tuple[int, int, int, int, int]:
    """How the kernel cuts a (batch, head)'s tokens into ranges: ``(first, tokens_per_split, mid,
    tail_tokens_per_split, total)``.  Ranges ``[i·tokens_per_split, min((i+1)·tokens_per_split, mid))`` for
    ``i < first``, then ``[mid + j·tail_tokens_per_split, …)`` up to ``tokens``; all start at multiples of
    ``group_size``; ``total`` ranges, at most ``splits``.  A range may hold bulk and tail tokens (the kernel runs
    its bulk loop, then its tail loop).

    ``separate_tail``: the bulk (the first ``bulk`` tokens, a multiple of ``group_size``) and the tail get ranges
    of their own, sized so that each range costs about the same, a tail token counting ``KIVI_TAIL_COST`` bulk
    tokens (uniform ranges over all tokens if ``splits`` leaves no range for the tail).  Else exactly ``splits``
    uniform ranges over all tokens (trailing ones may be empty), as an explicit ``num_splits`` asks."""
    uniform = cdiv(cdiv(tokens, group_size), splits) * group_size
    if not separate_tail:
        return splits, uniform, tokens, group_size, splits
    tail = tokens - bulk
    cost = bulk + KIVI_TAIL_COST * tail  # in bulk-token units
    tps = cdiv(cdiv(cost, splits), group_size) * group_size
    first = cdiv(bulk, tps)
    if tail == 0:
        return first, tps, bulk, group_size, first
    if first >= splits:  # no range left for the tail alone: uniform ranges, the last one holding bulk and tail
        return cdiv(tokens, uniform), uniform, tokens, group_size, cdiv(tokens, uniform)
    n_tail = min(splits - first, cdiv(tail, group_size))
    ttps = cdiv(cdiv(tail, n_tail), group_size) * group_size
    n_tail = cdiv(tail, ttps)
    return first, tps, bulk, ttps, first + n_tail


# How far ahead (tokens) the bulk loop asks L2 to fetch the codes and value scales: once per key group, G rows
# starting that many tokens past the group's first (one prefetch.global.L2 per tensor; no registers wait), on
# top of the register double buffer (one tile ahead).  H100, KIVI-2 at 32k (benchmarks/results/
# kivi_experiments_h100-sxm.md, run 6): 4-13% faster from batch 4 up (e.g. batch 16: 849 -> 767 µs), 8-32 tokens
# about equally good, 48-64 worse; in one-wave launches (batch 1) 0-3% slower, so only for launches of more than one
# wave (l2_prefetch_tokens).  Never under the interpreter (inline PTX).
KIVI_L2_PREFETCH_TOKENS = 16


def l2_prefetch_tokens(programs: int, sms: int) -> int:
    """``KIVI_L2_PREFETCH_TOKENS`` when ``programs`` exceed one wave (``KIVI_PROGRAMS_PER_SM`` per SM), else 0."""
    return KIVI_L2_PREFETCH_TOKENS if programs > KIVI_PROGRAMS_PER_SM * sms else 0


@triton.jit
def _prefetch_l2(ptrs):
    """Ask L2 to fetch the line of every element of ``ptrs`` (one ``prefetch.global.L2`` each, nothing waits)."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                              is_pure=False, pack=1)


# Power-of-two offsets of the denormal trick (module docstring): products code × factor are ~2^−K_KEY (keys) and
# ~2^(K_VAL − 149) (values) times their true size, far from fp32's underflow and overflow for any sane q and scales.
K_KEY = 64
K_VAL = 100


@triton.jit
def _split_words(x, CPW: tl.constexpr):
    """int32 words ``[..., W]`` → uint32 ``[..., W, 2, …, 2]`` (log2(CPW) axes of 2) for code j = Σ_l i_l·2^(L−l)
    at index (i_1, …, i_L): the word itself for codes in its low 16 bits, the word shifted right by 16 for the rest
    (one shift per word).  :func:`_unpack` masks out the code.

    ``tl.join`` adds a minor axis of 2 *within the thread*, so a thread unpacks whole words in its own registers —
    no data exchange between threads, no reshape."""
    x = x.to(tl.uint32, bitcast=True)
    for lvl in tl.static_range(0, 5):
        if (1 << lvl) < CPW:
            if lvl == 0:
                x = tl.join(x, x >> 16)
            else:
                x = tl.join(x, x)
    return x


@triton.jit
def _code_shifts(like, BITS: tl.constexpr, CPW: tl.constexpr):
    """int32 ``BITS·j'`` laid out like :func:`_split_words` of ``like`` (an int32 ``[..., W]``): where the code sits
    in its (shifted) word, j' being its index within its 16-bit half.  The same in every register of a thread, so
    everything computed from it folds into immediates."""
    e = like & 0
    for lvl in tl.static_range(0, 5):
        if (1 << lvl) < CPW:
            if lvl == 0:
                e = tl.join(e, e)
            else:
                e = tl.join(e, e + BITS * ((CPW // 2) >> lvl))
    return e


@triton.jit
def _pow2(e):
    """Exactly 2^e (fp32) for int32 ``e`` in [−126, 127]: the exponent bits, set directly."""
    return ((e + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _split_channels(d, CPW: tl.constexpr):
    """Channel index of code 0 of each word ``[..., W]`` → the channel of every code, laid out like
    :func:`_split_words`."""
    for lvl in tl.static_range(0, 5):
        if (1 << lvl) < CPW:
            d = tl.join(d, d + ((CPW // 2) >> lvl))
    return d


@triton.jit
def _expand_codes(x, CPW: tl.constexpr):
    """Add the log2(CPW) trailing axes of :func:`_split_words` (size 1, for broadcasting)."""
    for lvl in tl.static_range(0, 5):
        if (1 << lvl) < CPW:
            x = tl.expand_dims(x, len(x.shape))
    return x


@triton.jit
def _sum_codes(x, CPW: tl.constexpr):
    """Sum over the log2(CPW) trailing axes of :func:`_split_words` (in-thread adds)."""
    for lvl in tl.static_range(0, 5):
        if (1 << lvl) < CPW:
            x = tl.sum(x, len(x.shape) - 1)
    return x


@triton.jit
def _expand_groups(x, WPG: tl.constexpr):
    """``[T, NG]`` per-group values → ``[T, NG·WPG]`` per packed word (word w belongs to group w // WPG): each value
    repeated WPG times along the last axis by ``tl.join`` + reshape, in-thread."""
    for lvl in tl.static_range(0, 6):
        if (1 << lvl) < WPG:
            x = tl.reshape(tl.join(x, x), [x.shape[0], x.shape[1] * 2])
    return x


@triton.jit
def _unpack(words, BITS: tl.constexpr, CPW: tl.constexpr):
    """int32 words ``[T, W]`` → fp32 ``f = c·2^(BITS·j' − 149)`` for every code c, shaped like :func:`_split_words`.

    The code's bits, masked in place and read as an fp32 with a zero exponent field, *are* that denormal number:
    one AND per code, no shift, no int→float conversion.  Callers fold 2^(149 − BITS·j') into their per-channel or
    per-position factors (module docstring)."""
    mask = (((1 << BITS) - 1) << _code_shifts(words, BITS, CPW)).to(tl.uint32, bitcast=True)
    return (_split_words(words, CPW) & mask).to(tl.float32, bitcast=True)


@triton.jit
def _codes(words, BITS: tl.constexpr, CPW: tl.constexpr):
    """The codes c themselves (fp32), for the tail loop where speed does not matter:
    c = f · 2^(149 − BITS·j') in two exact steps (2^149 alone would overflow fp32)."""
    return _unpack(words, BITS, CPW) * 2.0 ** 100 * _pow2(49 - _code_shifts(words, BITS, CPW))


# Token counts change every decode step: without do_not_specialize Triton would compile a new variant whenever
# their divisibility by 16 changes (seconds of JIT inside a generation loop).
@triton.jit(do_not_specialize=["T", "NKQ", "NVQ", "BULK", "n_first", "tokens_per_split", "MID",
                               "tail_tokens_per_split"])
def _kivi_split_kernel(
    Q, KC, KS, KZ, KR, VC, VS, VZ, VR, MidO, MidLse, Out, Lse, Done,
    sq_b, sq_h, sq_d, so_b, so_h, so_d,
    skc_b, skc_h, skc_t, skc_w,
    sks_b, sks_h, sks_g, sks_d,
    skr_b, skr_h, skr_t, skr_d,
    svc_b, svc_h, svc_t, svc_w,
    svs_b, svs_h, svs_t, svs_g,
    svr_b, svr_h, svr_t, svr_d,
    T, NKQ, NVQ, BULK, n_first, tokens_per_split, MID, tail_tokens_per_split, qk_scale_log2,
    GQ: tl.constexpr, WORDS: tl.constexpr, BLOCK_W: tl.constexpr, CPW: tl.constexpr, BITS: tl.constexpr,
    G: tl.constexpr, WPG: tl.constexpr, BLOCK_T: tl.constexpr, K_K: tl.constexpr, K_V: tl.constexpr,
    LAUNCH_DEPS: tl.constexpr = False, L2_AHEAD: tl.constexpr = 0, MERGE: tl.constexpr = False,
    FENCE: tl.constexpr = False, BLOCK_S: tl.constexpr = 16,
):
    if LAUNCH_DEPS:  # let the combine kernel launch now (it waits for our results itself: _utils.use_pdl)
        gdc_launch_dependents()
    # Tiles are [BLOCK_T, BLOCK_W, 2, …, 2]: token, packed word, then the code's position in its word split
    # into binary axes by tl.join (see _split_words).  Every thread unpacks and multiplies whole words in its own
    # registers; q·k sums a word's codes in-thread before any cross-lane reduction.
    split = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    kvh = h // GQ
    num_splits = tl.num_programs(0)
    h_q = tl.num_programs(1)
    if split < n_first:  # token ranges: kivi_token_ranges
        start = split * tokens_per_split
        end = tl.minimum(start + tokens_per_split, MID)
    else:
        start = MID + (split - n_first) * tail_tokens_per_split
        end = tl.minimum(start + tail_tokens_per_split, T)

    tt = tl.arange(0, BLOCK_T)
    w1 = tl.arange(0, BLOCK_W)
    w2 = w1[None, :]  # [1, BLOCK_W]
    w_ok2 = w2 < WORDS
    dd = _split_channels(w2 * CPW, CPW)  # [1, BLOCK_W, 2, …] channel of every code
    d_ok = _expand_codes(w_ok2, CPW)
    vgrp2 = w2 // WPG  # value group of each word
    BLOCK_G: tl.constexpr = BLOCK_W // WPG
    g2 = tl.arange(0, BLOCK_G)[None, :]  # value groups [1, BLOCK_G]

    q = tl.load(Q + b * sq_b + h * sq_h + dd * sq_d, mask=d_ok, other=0.0).to(tl.float32) * qk_scale_log2
    # key factor per channel: 2^(149 − K_K − B·j') turns the denormal f = c·2^(B·j' − 149) into c·2^−K_K
    q_f = q * _pow2(149 - K_K - _code_shifts(w2, BITS, CPW))
    kc_base = KC + b * skc_b + kvh * skc_h
    ks_base = KS + b * sks_b + kvh * sks_h
    kz_base = KZ + b * sks_b + kvh * sks_h
    kr_base = KR + b * skr_b + kvh * skr_h
    vc_base = VC + b * svc_b + kvh * svc_h
    vs_base = VS + b * svs_b + kvh * svs_h
    vz_base = VZ + b * svs_b + kvh * svs_h
    vr_base = VR + b * svr_b + kvh * svr_h

    m_i = tl.max(tl.full([BLOCK_T], float("-inf"), tl.float32), 0)  # running max (log2 units), a scalar
    l_t = tl.zeros([BLOCK_T], tl.float32)  # running denominator per token slot, summed once at the end
    # running Σ_t p_t s_t f_t (scaled), reduced over t at the end; built by _unpack to get its register layout
    acc = _unpack(tl.zeros([BLOCK_T, BLOCK_W], tl.int32), BITS, CPW) * 0.0
    acc_z = tl.zeros([BLOCK_T, BLOCK_G], tl.float32)  # Σ_t p_t z_t per value group, added to its codes at the end

    # ---- bulk: key and value both quantized, whole key groups (start, BULK and split ends are multiples of G) ----
    # The per-channel key factors are computed once per group of G tokens and reused by its G / BLOCK_T tiles.
    bulk_end = tl.minimum(end, BULK)
    last = tl.maximum(bulk_end - BLOCK_T, start)  # the last bulk tile: prefetches past it re-read it (no mask)
    # Tile i's packed words are loaded while tile i − 1 is being computed (a register double buffer): one warp
    # per program only hides memory latency with loads already in flight.  A tile's addresses are a scalar base
    # (uniform registers) plus loop-invariant per-element offsets: one 64-bit add per load.
    # The first loads are masked off when this split has no bulk tokens (its rows may not exist); inside the loop
    # the next tile / group is clamped to the last one, which does exist.
    t64 = tt.to(tl.int64)[:, None]
    tg64 = tl.arange(0, G).to(tl.int64)
    off_kw = t64 * skc_t + w2 * skc_w
    off_vw = t64 * svc_t + w2 * svc_w
    off_vs = t64 * svs_t + g2 * svs_g
    t_s = start.to(tl.int64)
    n_w = WORDS * (start < bulk_end).to(tl.int32)  # WORDS, or 0 to mask everything
    w_ok1 = w2 < n_w
    kw_nx = tl.load(kc_base + t_s * skc_t + off_kw, mask=w_ok1, other=0)
    vw_nx = tl.load(vc_base + t_s * svc_t + off_vw, mask=w_ok1, other=0)
    g_ok1 = g2 * WPG < n_w
    g_ok2 = g2 * WPG < WORDS
    # value scales/zeros: one per (token, value group); _expand_groups repeats them per word in-thread.  Loaded per
    # word instead, they got a layout of their own and a conversion in every tile (module docstring).
    vs_nx = tl.load(vs_base + t_s * svs_t + off_vs, mask=g_ok1, other=0.0)
    vz_nx = tl.load(vz_base + t_s * svs_t + off_vs, mask=g_ok1, other=0.0)
    gl = tl.maximum(bulk_end - 1, start) // G  # the last bulk key group
    ks_nx = tl.load(ks_base + (start // G) * sks_g + dd * sks_d, mask=dd < n_w * CPW, other=0.0)
    kz_nx = tl.load(kz_base + (start // G) * sks_g + dd * sks_d, mask=dd < n_w * CPW, other=0.0)
    for g0 in range(start, bulk_end, G):
        ks = ks_nx.to(tl.float32)
        kz = kz_nx.to(tl.float32)
        gn = tl.minimum(g0 // G + 1, gl)
        ks_nx = tl.load(ks_base + gn * sks_g + dd * sks_d, mask=d_ok, other=0.0)
        kz_nx = tl.load(kz_base + gn * sks_g + dd * sks_d, mask=d_ok, other=0.0)
        # q·k̂ = Σ_d q_d (s_d c_d + z_d) = 2^K_K Σ_d (q_d s_d 2^(149 − K_K − B·j')) f_d + Σ_d q_d z_d
        qs = q_f * ks
        if L2_AHEAD > 0:  # G rows L2_AHEAD tokens ahead on their way to L2: one instruction per tensor
            rows = tl.minimum(g0 + L2_AHEAD, gl * G).to(tl.int64) + tg64
            _prefetch_l2(kc_base + rows * skc_t)
            _prefetch_l2(vc_base + rows * svc_t)
            _prefetch_l2(vs_base + rows * svs_t)
            _prefetch_l2(vz_base + rows * svs_t)
        bias = tl.sum(_sum_codes(q * kz, CPW), 1)  # [1]
        for t0 in range(g0, g0 + G, BLOCK_T):
            kw = kw_nx
            vw = vw_nx
            vs = vs_nx.to(tl.float32)
            vz = vz_nx.to(tl.float32)
            tn = tl.minimum(t0 + BLOCK_T, last).to(tl.int64)
            kw_nx = tl.load(kc_base + tn * skc_t + off_kw, mask=w_ok2, other=0)
            vw_nx = tl.load(vc_base + tn * svc_t + off_vw, mask=w_ok2, other=0)
            vs_nx = tl.load(vs_base + tn * svs_t + off_vs, mask=g_ok2, other=0.0)
            vz_nx = tl.load(vz_base + tn * svs_t + off_vs, mask=g_ok2, other=0.0)
            # one sum over all of a token's codes (a chain of multiply-adds in the thread, then lanes)
            s = tl.sum(tl.reshape(_unpack(kw, BITS, CPW) * qs, [BLOCK_T, BLOCK_W * CPW]), 1) * (2.0 ** K_K) + bias
            m_new = tl.maximum(m_i, tl.max(s, 0))
            if m_new > m_i:  # rescale the running sums only when the running max grows (rare after a few tiles)
                alpha = tl.exp2(m_i - m_new)
                l_t = l_t * alpha
                acc = acc * alpha
                acc_z = acc_z * alpha
                m_i = m_new
            p = tl.exp2(s - m_i)  # [BLOCK_T]
            l_t += p
            # p v̂ = p (s c + z) = 2^(149 − K_V − B·j') (2^K_V p s) f + p z: the first factor is applied at the end
            ps = _expand_groups(p[:, None] * vs * (2.0 ** K_V), WPG)  # [BLOCK_T, BLOCK_W]
            acc_z += p[:, None] * vz
            acc += _unpack(vw, BITS, CPW) * _expand_codes(ps, CPW)
    # the bulk accumulator in the true scale (2^(149 − K_V − B·j') per code position), so the tail can add to it
    acc = acc * _pow2(149 - K_V - _code_shifts(tl.zeros([BLOCK_T, BLOCK_W], tl.int32), BITS, CPW))

    # ---- tail: residual keys and/or values, and the tile where value quantization ends ------------------------
    for t0 in range(tl.maximum(start, BULK), end, BLOCK_T):
        t1 = (t0 + tt).to(tl.int64)  # [BLOCK_T]
        t = t1[:, None]
        t_ok1 = t1 < end
        t_ok = t_ok1[:, None]
        if t0 < NKQ:  # a whole quantized key tile (N_k is a multiple of G, tiles start at multiples of BLOCK_T)
            g = t0 // G
            ks = tl.load(ks_base + g * sks_g + dd * sks_d, mask=d_ok, other=0.0).to(tl.float32)
            kz = tl.load(kz_base + g * sks_g + dd * sks_d, mask=d_ok, other=0.0).to(tl.float32)
            kw = tl.load(kc_base + t * skc_t + w2 * skc_w, mask=w_ok2 & t_ok, other=0)
            s = tl.sum(_sum_codes(_codes(kw, BITS, CPW) * (q * ks), CPW), 1) + tl.sum(_sum_codes(q * kz, CPW), 1)
        else:
            k = tl.load(kr_base + _expand_codes((t - NKQ) * skr_t, CPW) + dd * skr_d,
                        mask=_expand_codes(t_ok & w_ok2, CPW), other=0.0).to(tl.float32)
            s = tl.sum(_sum_codes(k * q, CPW), 1)
        s = tl.where(t_ok1, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 0))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new)
        l_t = l_t * alpha + p
        is_q = t_ok & (t < NVQ)  # [BLOCK_T, 1]
        is_r = t_ok & (t >= NVQ)
        vw = tl.load(vc_base + t * svc_t + w2 * svc_w, mask=w_ok2 & is_q, other=0)
        vs = tl.load(vs_base + t * svs_t + vgrp2 * svs_g, mask=w_ok2 & is_q, other=0.0).to(tl.float32)
        vz = tl.load(vz_base + t * svs_t + vgrp2 * svs_g, mask=w_ok2 & is_q, other=0.0).to(tl.float32)
        vq = _codes(vw, BITS, CPW) * _expand_codes(vs, CPW) + _expand_codes(vz, CPW)
        vr = tl.load(vr_base + _expand_codes((t - NVQ) * svr_t, CPW) + dd * svr_d,
                     mask=_expand_codes(is_r & w_ok2, CPW), other=0.0).to(tl.float32)
        v = tl.where(_expand_codes(is_q, CPW), vq, vr)
        acc = acc * alpha + _expand_codes(p[:, None], CPW) * v
        acc_z = acc_z * alpha
        m_i = m_new

    # ---- partial result of this split: normalised output and log2-sum-exp (−inf for an empty split) -----------
    l_i = tl.sum(l_t, 0)
    has = l_i > 0.0
    o = tl.sum(acc + _expand_codes(_expand_groups(acc_z, WPG), CPW), 0) / tl.where(has, l_i, 1.0)  # [BLOCK_W, 2, …]
    lse2 = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
    row = (b * h_q + h) * num_splits + split  # MidLse [B, H_q, S]; MidO [B, H_q, S, D]
    tl.store(MidLse + row, lse2)
    tl.store(MidO + row * (WORDS * CPW) + _split_channels(w1 * CPW, CPW), o, mask=_expand_codes(w1 < WORDS, CPW))

    if MERGE:  # the last of this (batch, head)'s programs to finish merges the partials: no combine launch
        head = b * h_q + h
        if _last_to_arrive(Done + head, num_splits, tt, FENCE):
            D: tl.constexpr = WORDS * CPW
            BLOCK_D: tl.constexpr = BLOCK_W * CPW
            offs_d = tl.arange(0, BLOCK_D)
            rows = head + tl.arange(0, 1)  # this head's one row
            _merge_rows(MidO, MidLse, Out + b * so_b + h * so_h + offs_d[None, :] * so_d, Lse + rows, rows,
                        rows >= 0, num_splits, 1, D, BLOCK_D, BLOCK_S, ".cg")
            tl.store(Done + head, 0)  # zero again for the next call


# Merging the partials: the last program of each (batch, head) to finish merges its S partials itself (an atomic
# count per head says which one is last), instead of a second, combine kernel after the split kernel (module
# docstring; False = the combine kernel, with programmatic dependent launch on Hopper).
KIVI_MERGE_IN_KERNEL = True
# While a CUDA graph is captured the merge needs a fresh zeroed count buffer (decode_attention.merge_counters): a
# memset node per replay.  Graphs merge in the kernel only when the bulk ranges hold at least GRAPH_MERGE_MIN_TOKENS
# tokens, else they launch the combine kernel.  H100, KIVI-2 (H = 32, D = 128), CUDA-graph replays side by side with
# the order alternating (kivi_experiments_h100-sxm.md, run 16); time with the combine kernel / time merged in the
# graph: batch 1 with 32k and 64k tokens (512 and 1024 per range) 1.025 and 1.035; batch 1 with 4k and 16k tokens
# (96 and 256 per range) 0.927 and 0.993; batch 8 with 4k (480) 0.978; batch 4 and 8 with 32k (1024) 0.995 and
# 0.996 (this rule's one loss: 0.4-0.5%).
GRAPH_MERGE_MIN_TOKENS = 512
# Partials one step of the in-kernel merge holds (the split-KV kernel's merge holds up to 32): at 16 the one warp
# holds a step's 16 x D fp32 partials in D / 2 registers per lane.
KIVI_MERGE_BLOCK_S = 16


def _stand_ins(device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """int32 codes, fp16 scale and zero arguments for a cache that has no quantized tokens yet.  Never read (the
    kernel masks every access to them); ``torch.empty``, not zeros, so no fill kernel runs before a decode step."""
    half = torch.empty(1, dtype=torch.float16, device=device)
    return torch.empty(1, dtype=torch.int32, device=device), half, half


def _same_strides(scale: Tensor | None, zero: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    """The kernel reads a zero point at its scale's offset (one set of strides and offsets for both, fewer
    registers in the bulk loop).  ``refimpl.kivi`` allocates the two alike; if a caller's differ, both are copied
    contiguous here (correct, but a copy per call)."""
    if scale is None or zero is None or scale.stride() == zero.stride():
        return scale, zero
    return scale.contiguous(), zero.contiguous()


def _strides4(x: Tensor | None) -> tuple[int, int, int, int]:
    return (0, 0, 0, 0) if x is None else tuple(x.stride())  # type: ignore[return-value]


def _check(name: str, x: Tensor | None, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
    if x is None:
        return
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None; got {type(x).__name__}")
    if tuple(x.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}; got {tuple(x.shape)}")
    if x.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}; got {x.dtype}")
    if x.device != device:
        raise ValueError(f"{name} must be on {device}; got {x.device}")


def _validate(q, k_codes, k_scale, k_zero, k_res, v_codes, v_scale, v_zero, v_res, bits, group_size):
    check_quant_args(bits, group_size)
    if not isinstance(q, Tensor) or q.dim() != 3:
        raise ValueError(f"q must be a [batch, q_heads, head_dim] tensor; got {getattr(q, 'shape', type(q))}")
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"q.dtype must be one of {[str(d) for d in SUPPORTED_DTYPES]}; got {q.dtype}")
    for name, r in (("k_res", k_res), ("v_res", v_res)):
        if not isinstance(r, Tensor) or r.dim() != 4:
            raise ValueError(f"{name} must be a [batch, kv_heads, tokens, head_dim] tensor (possibly with 0 tokens)")
    b, h_q, d = q.shape
    h_kv = k_res.shape[1]
    f = codes_per_word(bits)
    if h_kv < 1 or h_q % h_kv:
        raise ValueError(f"kv_heads ({h_kv}) must divide q_heads ({h_q})")
    if d % group_size:
        raise ValueError(f"head_dim ({d}) must be a multiple of group_size ({group_size})")
    n_k = 0 if k_codes is None else k_codes.shape[2]
    n_v = 0 if v_codes is None else v_codes.shape[2]
    if n_k % group_size:
        raise ValueError(f"k_codes holds {n_k} tokens; it must be a multiple of group_size ({group_size})")
    t = n_k + k_res.shape[2]
    if n_v + v_res.shape[2] != t:
        raise ValueError(f"keys hold {n_k} + {k_res.shape[2]} tokens but values {n_v} + {v_res.shape[2]}; they must agree")
    dev = q.device
    _check("k_res", k_res, (b, h_kv, t - n_k, d), q.dtype, dev)
    _check("v_res", v_res, (b, h_kv, t - n_v, d), q.dtype, dev)
    if (k_codes is None) != (k_scale is None) or (k_codes is None) != (k_zero is None):
        raise ValueError("k_codes, k_scale and k_zero must be given together (or all None)")
    if (v_codes is None) != (v_scale is None) or (v_codes is None) != (v_zero is None):
        raise ValueError("v_codes, v_scale and v_zero must be given together (or all None)")
    _check("k_codes", k_codes, (b, h_kv, n_k, d // f), torch.int32, dev)
    _check("k_scale", k_scale, (b, h_kv, n_k // group_size, d), torch.float16, dev)
    _check("k_zero", k_zero, (b, h_kv, n_k // group_size, d), torch.float16, dev)
    _check("v_codes", v_codes, (b, h_kv, n_v, d // f), torch.int32, dev)
    _check("v_scale", v_scale, (b, h_kv, n_v, d // group_size), torch.float16, dev)
    _check("v_zero", v_zero, (b, h_kv, n_v, d // group_size), torch.float16, dev)
    return b, h_q, h_kv, t, d, n_k, n_v


def kivi_decode_attention(q: Tensor, k_codes: Tensor | None, k_scale: Tensor | None, k_zero: Tensor | None,
                          k_res: Tensor, v_codes: Tensor | None, v_scale: Tensor | None, v_zero: Tensor | None,
                          v_res: Tensor, *, bits: int, group_size: int, scale: float | None = None,
                          num_splits: int | None = None, return_lse: bool = False,
                          config: KIVIDecodeConfig | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """Attention of one decode query per head over a KIVI cache, reading the packed codes.

    Args:
        q: ``[B, H_q, D]`` fp32/fp16/bf16 (already rotated); ``H_kv`` must divide ``H_q``.
        k_codes, k_scale, k_zero, k_res, v_codes, v_scale, v_zero, v_res: the layer's KIVI storage (module
            docstring; :class:`refimpl.kivi.KIVILayerState`).  Codes/scales may be ``None`` (nothing quantized yet);
            residuals have ``q``'s dtype and may hold 0 tokens.  Any strides (a scale and its zero
            points with different strides are copied contiguous first).
        bits, group_size: how the codes were made.
        scale: softmax scale, default ``1/sqrt(D)``.
        num_splits: token ranges per (batch, head), uniform over all tokens; default: up to
            :func:`choose_kivi_splits` ranges, bulk and tail apart (:func:`kivi_token_ranges`).
        return_lse: also return the natural-log log-sum-exp ``[B, H_q]`` (fp32).
        config: :class:`KIVIDecodeConfig`; ``block_t`` must divide ``group_size``.

    Returns ``[B, H_q, D]`` in ``q.dtype`` (and the LSE).  Matches :func:`kivi_decode_attention_ref`.
    """
    b, h_q, h_kv, t, d, n_k, n_v = _validate(q, k_codes, k_scale, k_zero, k_res, v_codes, v_scale, v_zero, v_res,
                                             bits, group_size)
    if t == 0:
        raise ValueError("the cache is empty (0 tokens): nothing to attend to")
    if num_splits is not None and (not isinstance(num_splits, int) or isinstance(num_splits, bool)
                                   or not 1 <= num_splits <= 65535):
        raise ValueError(f"num_splits must be None or an int in [1, 65535]; got {num_splits!r}")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite float or None (= 1/sqrt(head_dim)); got {scale!r}")
    cfg = config or default_config(group_size)
    if not isinstance(cfg, KIVIDecodeConfig):
        raise TypeError(f"config must be a KIVIDecodeConfig or None; got {type(cfg).__name__}")
    if group_size % cfg.block_t:
        raise ValueError(f"config.block_t ({cfg.block_t}) must divide group_size ({group_size})")
    check_launchable(*(x for x in (q, k_codes, k_scale, k_zero, k_res, v_codes, v_scale, v_zero, v_res)
                       if x is not None))

    f = codes_per_word(bits)
    bt = cfg.block_t
    # Tokens whose key AND value are quantized, cut at a tile boundary: the branch-free bulk loop runs over them.
    bulk = min(n_k, n_v) // group_size * group_size
    sms = num_sms(q.device)
    hint = choose_kivi_splits(b, h_q, t, bt, sms) if num_splits is None else num_splits
    n_first, tokens_per_split, mid, tail_tokens_per_split, splits = kivi_token_ranges(
        t, bulk, group_size, hint, separate_tail=num_splits is None)
    sm_scale = 1.0 / math.sqrt(d) if scale is None else float(scale)

    k_scale, k_zero = _same_strides(k_scale, k_zero)
    v_scale, v_zero = _same_strides(v_scale, v_zero)
    kc, ks, kz = (k_codes, k_scale, k_zero) if k_codes is not None else _stand_ins(q.device)
    vc, vs, vz = (v_codes, v_scale, v_zero) if v_codes is not None else _stand_ins(q.device)
    mid_o = torch.empty((b, h_q, splits, d), dtype=torch.float32, device=q.device)
    mid_lse = torch.empty((b, h_q, splits), dtype=torch.float32, device=q.device)
    out = torch.empty((b, h_q, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, h_q), dtype=torch.float32, device=q.device)
    words = d // f
    merge = KIVI_MERGE_IN_KERNEL and (tokens_per_split >= GRAPH_MERGE_MIN_TOKENS or not capturing(q.device))
    pdl = use_pdl(q.device) and not merge
    done = merge_counters(q.device, b * h_q) if merge else mid_lse  # any pointer: not read without MERGE
    _kivi_split_kernel[(splits, h_q, b)](
        q, kc, ks, kz, k_res, vc, vs, vz, v_res, mid_o, mid_lse, out, lse, done,
        *q.stride(), *out.stride(),
        *_strides4(k_codes), *_strides4(k_scale), *k_res.stride(),
        *_strides4(v_codes), *_strides4(v_scale), *v_res.stride(),
        t, n_k, n_v, bulk, n_first, tokens_per_split, mid, tail_tokens_per_split, sm_scale * _LOG2E,
        GQ=h_q // h_kv, WORDS=words, BLOCK_W=next_power_of_2(words), CPW=f, BITS=bits, G=group_size,
        WPG=group_size // f, BLOCK_T=bt, K_K=K_KEY, K_V=K_VAL, LAUNCH_DEPS=pdl,
        L2_AHEAD=0 if interpreting() else l2_prefetch_tokens(splits * h_q * b, sms),
        MERGE=merge, FENCE=merge and not interpreting(), BLOCK_S=merge_block_s(splits, KIVI_MERGE_BLOCK_S),
        num_warps=cfg.num_warps, num_stages=1,
        **({} if cfg.maxnreg is None or interpreting() else {"maxnreg": cfg.maxnreg}),
    )
    if not merge:
        launch_combine(mid_o, mid_lse, out, lse, pdl=pdl)
    return (out, lse) if return_lse else out


def kivi_decode_attention_ref(q: Tensor, k_codes: Tensor | None, k_scale: Tensor | None, k_zero: Tensor | None,
                              k_res: Tensor, v_codes: Tensor | None, v_scale: Tensor | None, v_zero: Tensor | None,
                              v_res: Tensor, *, bits: int, group_size: int, scale: float | None = None,
                              return_lse: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """PyTorch reference: dequantize everything to fp32 (``refimpl.quant``) and run ``refimpl.attention``."""
    _validate(q, k_codes, k_scale, k_zero, k_res, v_codes, v_scale, v_zero, v_res, bits, group_size)
    k, v = k_res.float(), v_res.float()
    if k_codes is not None:
        k = torch.cat([unpack_dequantize(k_codes, k_scale, k_zero, bits, group_size, dim=-2), k], dim=2)
    if v_codes is not None:
        v = torch.cat([unpack_dequantize(v_codes, v_scale, v_zero, bits, group_size, dim=-1), v], dim=2)
    out, lse = ref_decode_attention(q.float(), k, v, scale=scale, return_lse=True)
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out


def kivi_cache_attention(q: Tensor, cache, layer_idx: int, **kwargs) -> Tensor:
    """:func:`kivi_decode_attention` over layer ``layer_idx`` of a :class:`refimpl.kivi.KIVICache`."""
    if getattr(cache, "per_channel_keys", None) is not True:
        raise TypeError(f"cache must be a refimpl.kivi.KIVICache (per-channel keys); got {type(cache).__name__}")
    st = cache.layer_state(layer_idx)
    if st.k_res is None:
        raise ValueError(f"layer {layer_idx} of the cache is empty: nothing to attend to")
    if st.mask is not None:
        raise NotImplementedError("the fused KIVI kernel does not take a padding mask; use cache.read() + attention")
    return kivi_decode_attention(q, st.k_codes, st.k_scale, st.k_zero, st.k_res, st.v_codes, st.v_scale, st.v_zero,
                                 st.v_res, bits=cache.bits, group_size=cache.group_size, **kwargs)
