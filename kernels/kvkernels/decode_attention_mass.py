"""Decode attention that also emits every key's attention mass — H2O's accumulator update, fused.

H2O (Zhang et al. 2023, arXiv 2306.14048) scores each cached token by the attention it has received,
``score_j += Σ_{g in group} p_{g,j} / G`` after every decoding step (eq. (1) of :mod:`refimpl.h2o`, with the
GQA group mean of :mod:`refimpl.eviction`).  Done naively in PyTorch this needs the explicit probabilities:
``s = q Kᵀ`` → mask → ``softmax`` (fp32) → ``p V`` and ``p.sum`` — several full passes, and it rules out a fused
attention kernel.  Here one split-KV decode kernel (see :mod:`kvkernels.decode_attention` for the online softmax
and the split/combine algebra) produces both the output and the mass:

* **phase 1** is :mod:`kvkernels.decode_attention`'s phase-1 kernel with ``STORE_LOGITS``: one program per
  (split, KV head, batch), all G query heads of the group as rows of one tile, the usual online-softmax pass over
  its token range, which also stores the raw logit of every (query head, key) — ``s = scale · log2(e) · ⟨q, k⟩``
  in fp32, −∞ for masked keys.  That is 4 bytes per query head per key, against 2·D·bytes(dtype) for reading K
  and V (for D = 128 in fp16: 4·G bytes vs 512, i.e. ~3% at G = 4);
* **phase 2** is :mod:`kvkernels.decode_attention`'s combine kernel: output and log-sum-exp L per query head
  (with a single split, phase 1 writes them itself);
* **phase 3**, one program per (token block, KV head, batch): ``p = 2^{s − L·log2 e}`` for the G rows, reduced
  over the group (mean or max), optionally added in place to the running H2O scores.

The probabilities are never materialised and K is never read twice (re-reading K instead of storing logits
would cost another D·bytes(dtype) per key — 16× the logits for D = 128, fp16, G = 4).

Layout as in :mod:`refimpl.cache`: ``q [B, H_q, D]``, ``k, v [B, H_kv, N, D]`` (any strides), ``key_mask``
``[B, N]`` or ``[B, H_kv, N]`` bool (per-head holes left by eviction, padding).  PyTorch reference:
:func:`refimpl.h2o.decode_attention_with_mass`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from refimpl.attention import check_decode_inputs
from refimpl.eviction import GQA_REDUCTIONS, check_choice

from ._utils import cdiv, check_launchable, next_power_of_2
from .decode_attention import DecodeConfig, check_launch_options, launch_decode

__all__ = ["decode_attention_mass"]

_MASS_BLOCK_N = 128  # tokens per phase-3 program (it only reads G logits per token)


@triton.jit
def _mass_kernel(
    Logits, Lse, Mass,
    stride_ab, stride_ah, stride_at,
    T,
    G: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, REDUCE_MAX: tl.constexpr,
    ACCUMULATE: tl.constexpr,
):
    blk = tl.program_id(0)
    kvh = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    h_q = tl.num_programs(1) * G
    offs_g = tl.arange(0, BLOCK_G)
    offs_n = blk * BLOCK_N + tl.arange(0, BLOCK_N)
    g_ok = offs_g < G
    n_ok = offs_n < T
    heads = kvh * G + offs_g
    lse2 = tl.load(Lse + b * h_q + heads, mask=g_ok, other=float("-inf")) * 1.4426950408889634
    s = tl.load(Logits + (b * h_q + heads)[:, None] * T + offs_n[None, :], mask=g_ok[:, None] & n_ok[None, :],
                other=float("-inf"))
    # p = 2^(s - L); a row with no valid key has L = -inf and all s = -inf: give 0, not NaN
    ok = (s != float("-inf")) & (lse2 != float("-inf"))[:, None]
    p = tl.where(ok, tl.exp2(tl.where(ok, s, 0.0) - tl.where(ok, lse2[:, None], 0.0)), 0.0)
    if REDUCE_MAX:
        mass = tl.max(p, 0)
    else:
        mass = tl.sum(p, 0) / G
    a_ptrs = Mass + b * stride_ab + kvh * stride_ah + offs_n * stride_at
    if ACCUMULATE:
        mass += tl.load(a_ptrs, mask=n_ok, other=0.0)
    tl.store(a_ptrs, mass, mask=n_ok)


def decode_attention_mass(q: Tensor, k: Tensor, v: Tensor, *, key_mask: Tensor | None = None,
                          scale: float | None = None, gqa_reduce: str = "mean", accumulate_into: Tensor | None = None,
                          num_splits: int | None = None, config: DecodeConfig | None = None) -> tuple[Tensor, Tensor]:
    """One decode step of attention plus each key's attention mass per KV head.

    Args:
        q: ``[B, H_q, D]``; k, v: ``[B, H_kv, N, D]``, ``H_kv | H_q``; fp32, fp16 or bf16; any strides.
        key_mask: optional bool ``[B, N]`` or ``[B, H_kv, N]``, True = may attend.
        scale: softmax scale, default ``1/sqrt(D)``.
        gqa_reduce: ``"mean"`` or ``"max"`` over the G query heads of a KV head.
        accumulate_into: optional fp32 ``[B, H_kv, N]`` running scores; the mass is **added** to it in place
            and it is returned as the mass (H2O's accumulator update, no extra pass).
        num_splits, config: as in :func:`kvkernels.decode_attention.decode_attention`.

    Returns ``(out [B, H_q, D] in q's dtype, mass [B, H_kv, N] fp32)``; same contract as
    :func:`refimpl.h2o.decode_attention_with_mass`.
    """
    b, h_q, h_kv, n, d = check_decode_inputs(q, k, v, key_mask, None, scale)
    check_choice("gqa_reduce", gqa_reduce, GQA_REDUCTIONS)
    check_launch_options(b, h_q, h_kv, d, num_splits, config)
    g = h_q // h_kv
    if accumulate_into is not None and (
            not isinstance(accumulate_into, Tensor) or accumulate_into.dtype != torch.float32
            or tuple(accumulate_into.shape) != (b, h_kv, n) or accumulate_into.device != q.device):
        raise ValueError(f"accumulate_into must be a float32 tensor of shape {(b, h_kv, n)} on {q.device}; "
                         f"got {getattr(accumulate_into, 'dtype', type(accumulate_into))} "
                         f"{tuple(getattr(accumulate_into, 'shape', ()))}")
    check_launchable(*(x for x in (q, k, v, key_mask, accumulate_into) if x is not None))

    out = torch.empty((b, h_q, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, h_q), dtype=torch.float32, device=q.device)
    mass = accumulate_into if accumulate_into is not None else torch.empty((b, h_kv, n), dtype=torch.float32,
                                                                           device=q.device)
    if b == 0 or n == 0:
        out.zero_()
        return out, mass

    logits = torch.empty((b, h_q, n), dtype=torch.float32, device=q.device)
    launch_decode(q, k, v, out, lse, key_mask=key_mask, seq_lens=None, scale=scale, num_splits=num_splits,
                  config=config, logits=logits)  # decode_attention's phases, also storing the logits
    block_n = _MASS_BLOCK_N
    _mass_kernel[(cdiv(n, block_n), h_kv, b)](
        logits, lse, mass, *mass.stride(), n,
        G=g, BLOCK_G=next_power_of_2(g), BLOCK_N=block_n, REDUCE_MAX=gqa_reduce == "max",
        ACCUMULATE=accumulate_into is not None, num_warps=4,
    )
    return out, mass
