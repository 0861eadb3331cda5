"""SnapKV's observation-window votes without building the window's score matrix.

SnapKV (Li et al. 2024, arXiv 2404.14469) scores each prefix key j < T − w by the attention the last w prompt
queries give it (eqs. (1)–(2) of :mod:`refimpl.snapkv`):

    vote_{h,j} = Σ_{i < w} softmax_j( scale · q_{h,i} · K_{kv(h)}ᵀ + M_causal )               (1)

where window query i sits at position T − w + i and sees keys 0 … T − w + i.  The official code materialises the
``[B, H, w, T]`` scores and probabilities in fp32 (at T = 32k, H = 32, w = 32 that is 128 MiB per layer and
sequence, twice).  Here two passes keep only O(w) numbers per head:

* **pass 1 — row statistics**, one program per (row block, KV head, batch); the rows are the G·w (query head,
  window position) pairs of a GQA group, so each K tile is loaded once per row block for the whole group.  An
  online log-sum-exp over all T keys (causal per row, key mask) gives ``L_{h,i} = log2 Σ_j 2^{s_{h,i,j}}``.
* **pass 2 — votes**, one program per (prefix-key block, KV head, batch): load the K tile once, and for every
  query head of the group and every window row recompute ``s`` and add ``2^{s − L}`` (prefix keys are visible to
  every window row, so no causal mask is needed here).

Output ``votes [B, H_q, T − w]`` fp32 per query head; pooling, the GQA reduction and the top-k stay in PyTorch
(:func:`refimpl.snapkv.snapkv_keep_mask`), they are O(T).  PyTorch reference:
:func:`refimpl.snapkv.window_votes`.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._utils import cdiv, check_launchable, compute_in_fp32, interpreting, next_power_of_2

__all__ = ["snapkv_window_votes"]

_LOG2E = 1.4426950408889634
_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _window_lse_kernel(
    Q, K, KeyMask, Lse,
    stride_qb, stride_qh, stride_qw, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_mb, stride_mh, stride_mt,
    T, W, qk_scale_log2,
    G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr, HAS_MASK: tl.constexpr, FP32: tl.constexpr,
):
    rblk = tl.program_id(0)
    kvh = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    h_q = tl.num_programs(1) * G
    rows = rblk * BLOCK_R + tl.arange(0, BLOCK_R)  # flattened (g, i) of the group: g = r // W, i = r % W
    r_ok = rows < G * W
    g = rows // W
    i = rows % W
    heads = kvh * G + g
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    d_ok = offs_d < HEAD_DIM
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + i[:, None] * stride_qw
                + offs_d[None, :] * stride_qd, mask=r_ok[:, None] & d_ok[None, :], other=0.0)
    if FP32:
        q = q.to(tl.float32)
    last = T - W + i  # the last key position row i may see (causal inside the window)

    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    k_base = K + b * stride_kb + kvh * stride_kh
    for n0 in range(0, T, BLOCK_N):
        n = n0 + offs_n
        n_ok = n < T
        k = tl.load(k_base + n[:, None].to(tl.int64) * stride_kt + offs_d[None, :] * stride_kd,
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        if FP32:
            s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * qk_scale_log2
        valid = n_ok[None, :] & (n[None, :] <= last[:, None])
        if HAS_MASK:
            km = tl.load(KeyMask + b * stride_mb + kvh * stride_mh + n.to(tl.int64) * stride_mt, mask=n_ok, other=0)
            valid = valid & (km != 0)[None, :]
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), 1)
        m_i = m_new
    has = l_i > 0.0
    lse2 = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
    tl.store(Lse + (b * h_q + heads) * W + i, lse2, mask=r_ok)  # Lse is [B, H_q, W]


@triton.jit
def _window_votes_kernel(
    Q, K, KeyMask, Lse, Votes,
    stride_qb, stride_qh, stride_qw, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_mb, stride_mh, stride_mt,
    T, W, qk_scale_log2,
    G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_W: tl.constexpr,
    BLOCK_N: tl.constexpr, HAS_MASK: tl.constexpr, FP32: tl.constexpr,
):
    nblk = tl.program_id(0)
    kvh = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    h_q = tl.num_programs(1) * G
    prefix = T - W
    n = nblk * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < prefix
    offs_d = tl.arange(0, BLOCK_D)
    offs_w = tl.arange(0, BLOCK_W)
    d_ok = offs_d < HEAD_DIM
    k = tl.load(K + b * stride_kb + kvh * stride_kh + n[:, None].to(tl.int64) * stride_kt
                + offs_d[None, :] * stride_kd, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
    if FP32:
        k = k.to(tl.float32)
    key_ok = n_ok
    if HAS_MASK:
        km = tl.load(KeyMask + b * stride_mb + kvh * stride_mh + n.to(tl.int64) * stride_mt, mask=n_ok, other=0)
        key_ok = key_ok & (km != 0)
    for g in range(G):
        head = kvh * G + g
        vote = tl.zeros([BLOCK_N], tl.float32)
        for i0 in range(0, W, BLOCK_W):
            i = i0 + offs_w
            i_ok = i < W
            q = tl.load(Q + b * stride_qb + head * stride_qh + i[:, None] * stride_qw + offs_d[None, :] * stride_qd,
                        mask=i_ok[:, None] & d_ok[None, :], other=0.0)
            lse2 = tl.load(Lse + (b * h_q + head) * W + i, mask=i_ok, other=float("-inf"))
            if FP32:
                s = tl.dot(q.to(tl.float32), tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = s * qk_scale_log2
            ok = (i_ok & (lse2 != float("-inf")))[:, None] & key_ok[None, :]
            p = tl.where(ok, tl.exp2(tl.where(ok, s - lse2[:, None], 0.0)), 0.0)
            vote += tl.sum(p, 0)
        tl.store(Votes + (b * h_q + head) * prefix + n, vote, mask=n_ok)


def snapkv_window_votes(q_window: Tensor, k: Tensor, *, key_mask: Tensor | None = None,
                        scale: float | None = None) -> Tensor:
    """Eq. (1): votes ``[B, H_q, T - w]`` (fp32) of the w window queries for the T − w prefix keys.

    Args:
        q_window: ``[B, H_q, w, D]`` the last w queries (post-RoPE); k: ``[B, H_kv, T, D]``, ``H_kv | H_q``,
            ``1 <= w < T``; fp32, fp16 or bf16; any strides.
        key_mask: optional bool ``[B, T]`` or ``[B, H_kv, T]``, True = real token.
        scale: softmax scale, default ``1/sqrt(D)``.
    """
    for name, x in (("q_window", q_window), ("k", k)):
        if not isinstance(x, Tensor) or x.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor; got {getattr(x, 'shape', type(x))}")
        if x.dtype not in _SUPPORTED:
            raise TypeError(f"{name}.dtype must be one of {[str(s) for s in _SUPPORTED]}; got {x.dtype}")
    b, h_q, w, d = q_window.shape
    _, h_kv, t, d_k = k.shape
    if k.shape[0] != b or d_k != d or q_window.dtype != k.dtype or q_window.device != k.device:
        raise ValueError(f"q_window [B, H_q, w, D] and k [B, H_kv, T, D] must share batch, head_dim, dtype and "
                         f"device; got {tuple(q_window.shape)} {q_window.dtype} and {tuple(k.shape)} {k.dtype}")
    if h_kv == 0 or h_q % h_kv:
        raise ValueError(f"kv_heads (k.shape[1] = {h_kv}) must divide q_heads ({h_q})")
    if not 1 <= w < t:
        raise ValueError(f"the window must satisfy 1 <= w < T; got w = {w}, T = {t}")
    if key_mask is not None and (key_mask.dtype != torch.bool or tuple(key_mask.shape) not in ((b, t), (b, h_kv, t))):
        raise ValueError(f"key_mask must be bool [batch, tokens] = {(b, t)} or [batch, kv_heads, tokens] = "
                         f"{(b, h_kv, t)}; got {key_mask.dtype} {tuple(key_mask.shape)}")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite float or None (= 1/sqrt(head_dim)); got {scale!r}")
    check_launchable(*(x for x in (q_window, k, key_mask) if x is not None))

    g = h_q // h_kv
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    lse = torch.empty((b, h_q, w), dtype=torch.float32, device=k.device)
    votes = torch.empty((b, h_q, t - w), dtype=torch.float32, device=k.device)
    if key_mask is not None:
        mask = key_mask.view(torch.uint8)
        sm = (mask.stride(0), mask.stride(1), mask.stride(2)) if mask.dim() == 3 else (mask.stride(0), 0, mask.stride(1))
    else:
        mask, sm = k, (0, 0, 0)  # never read
    fp32 = compute_in_fp32(k.dtype)
    block_d = max(16, next_power_of_2(d))
    block_n = 32 if interpreting() else 64
    block_r = min(64, max(16, next_power_of_2(g * w)))
    block_w = min(64, max(16, next_power_of_2(w)))
    common = {"G": g, "HEAD_DIM": d, "BLOCK_D": block_d, "BLOCK_N": block_n, "HAS_MASK": key_mask is not None,
              "FP32": fp32}
    _window_lse_kernel[(cdiv(g * w, block_r), h_kv, b)](
        q_window, k, mask, lse, *q_window.stride(), *k.stride(), *sm, t, w, scale * _LOG2E,
        BLOCK_R=block_r, num_warps=4, **common,
    )
    _window_votes_kernel[(cdiv(t - w, block_n), h_kv, b)](
        q_window, k, mask, lse, votes, *q_window.stride(), *k.stride(), *sm, t, w, scale * _LOG2E,
        BLOCK_W=block_w, num_warps=4, **common,
    )
    return votes
