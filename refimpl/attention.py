"""Reference decode attention: one new query per sequence against the whole KV cache, with GQA by index.

During decoding every layer computes, for the single new query q of each of the H_q heads,

    s_t   = scale · ⟨q, k_t⟩,          scale = 1/√d                          (Vaswani et al. 2017, eq. 1)
    p_t   = exp(s_t − LSE) ,           LSE = log Σ_{t valid} exp(s_t)
    out   = Σ_t p_t v_t

over the valid cached positions t only.  With grouped-query attention (Ainslie et al. 2023, arXiv 2305.13245)
query head h reads KV head ``h // G`` with G = H_q / H_kv; we share by index — q is viewed as
``[B, H_kv, G, D]`` — and never copy K or V per query head.

The log-sum-exp LSE (natural log) is what makes attention *splittable*: for two disjoint sets of keys A and B
with partial outputs o_A, o_B and log-sum-exps L_A, L_B,

    L   = log(e^{L_A} + e^{L_B}),      out = e^{L_A − L} o_A + e^{L_B − L} o_B                (Dao et al. 2023,
                                                                                        "Flash-Decoding")

which is how the split-KV kernel in ``kvkernels.decode_attention`` combines its splits, and why this reference
returns it on request.

Which positions are valid:

* ``seq_lens`` ``[B]`` — row b sees positions ``0 .. seq_lens[b]-1`` (ragged batches, eviction caches that
  fill a preallocated buffer from the left);
* ``key_mask`` ``[B, T]`` or ``[B, H_kv, T]`` bool — True where the entry may be attended to (the
  :class:`refimpl.cache.LayerKV` convention; left padding, per-head eviction);
* both may be given; a position is valid when both allow it.  A row with no valid position returns output 0
  and LSE −inf (rather than NaN).

Everything is computed in fp32 and the output is cast back to ``q.dtype``; this is the oracle the kernels are
tested against, so it favours clarity and accuracy over speed and memory.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["SUPPORTED_DTYPES", "check_decode_inputs", "decode_attention", "valid_key_mask"]

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_decode_inputs(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None = None,
                        seq_lens: Tensor | None = None, scale: float | None = None) -> tuple[int, int, int, int, int]:
    """Validate the decode-attention inputs; return ``(B, H_q, H_kv, T, D)``.

    Raises ``ValueError`` / ``TypeError`` naming the offending parameter and what is allowed.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if q.dim() != 3:
        raise ValueError(f"q must be [batch, q_heads, head_dim] (one decode query per head); got shape {tuple(q.shape)}")
    if k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"k and v must be [batch, kv_heads, tokens, head_dim]; got k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape; got k {tuple(k.shape)} and v {tuple(v.shape)}")
    b, h_q, d = q.shape
    _, h_kv, t, d_k = k.shape
    if k.shape[0] != b:
        raise ValueError(f"q and k must have the same batch size; got q {b} and k {k.shape[0]}")
    if d_k != d:
        raise ValueError(f"q and k must have the same head_dim; got q {d} and k {d_k}")
    if h_kv == 0 or h_q % h_kv:
        allowed = [x for x in range(1, h_q + 1) if h_q % x == 0]
        raise ValueError(f"kv_heads (k.shape[1] = {h_kv}) must divide q_heads ({h_q}); allowed kv_heads: {allowed}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name}.dtype must be one of {[str(s) for s in SUPPORTED_DTYPES]}; got {x.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share one dtype; got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device; got q {q.device}, k {k.device}, v {v.device}")
    if key_mask is not None:
        if not isinstance(key_mask, Tensor) or key_mask.dtype != torch.bool:
            raise TypeError(f"key_mask must be a bool tensor; got {getattr(key_mask, 'dtype', type(key_mask))}")
        if tuple(key_mask.shape) not in ((b, t), (b, h_kv, t)):
            raise ValueError(
                f"key_mask must be [batch, tokens] = {(b, t)} or [batch, kv_heads, tokens] = {(b, h_kv, t)}; "
                f"got {tuple(key_mask.shape)}"
            )
        if key_mask.device != q.device:
            raise ValueError(f"key_mask must be on {q.device}; got {key_mask.device}")
    if seq_lens is not None:
        if not isinstance(seq_lens, Tensor) or seq_lens.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"seq_lens must be an int32 or int64 tensor; got {getattr(seq_lens, 'dtype', type(seq_lens))}")
        if tuple(seq_lens.shape) != (b,):
            raise ValueError(f"seq_lens must be [batch] = ({b},); got {tuple(seq_lens.shape)}")
        if seq_lens.device != q.device:
            raise ValueError(f"seq_lens must be on {q.device}; got {seq_lens.device}")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite float or None (= 1/sqrt(head_dim)); got {scale!r}")
    return b, h_q, h_kv, t, d


def valid_key_mask(batch: int, kv_heads: int, tokens: int, key_mask: Tensor | None, seq_lens: Tensor | None,
                   device: torch.device | str) -> Tensor | None:
    """``[B, H_kv, T]`` bool of the positions a decode query may attend to, or ``None`` when all are valid."""
    valid = None
    if seq_lens is not None:
        pos = torch.arange(tokens, device=device)
        valid = (pos[None, :] < seq_lens[:, None].to(device))[:, None, :].expand(batch, kv_heads, tokens)
    if key_mask is not None:
        km = key_mask if key_mask.dim() == 3 else key_mask[:, None, :]
        km = km.expand(batch, kv_heads, tokens)
        valid = km if valid is None else valid & km
    return valid


def decode_attention(q: Tensor, k: Tensor, v: Tensor, *, key_mask: Tensor | None = None,
                     seq_lens: Tensor | None = None, scale: float | None = None,
                     return_lse: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Attention of one decode query per head over a KV cache.

    Args:
        q: ``[B, H_q, D]`` queries (already rotated by RoPE).
        k, v: ``[B, H_kv, T, D]`` cached keys (post-RoPE) and values; ``H_kv`` must divide ``H_q``.
        key_mask: optional ``[B, T]`` or ``[B, H_kv, T]`` bool, True = may attend.
        seq_lens: optional ``[B]`` int; row b attends to positions ``< seq_lens[b]`` (``0 ≤ seq_lens ≤ T``).
        scale: softmax scale; default ``1/sqrt(D)``.
        return_lse: also return the natural-log log-sum-exp of the scaled scores, ``[B, H_q]`` fp32.

    Returns:
        ``out`` ``[B, H_q, D]`` in ``q.dtype`` (and ``lse`` if requested).  Rows with no valid key give 0 and −inf.

    >>> q = torch.zeros(1, 2, 4); k = torch.zeros(1, 1, 3, 4); v = torch.arange(12.).view(1, 1, 3, 4)
    >>> decode_attention(q, k, v)[0, 0]          # equal scores → the mean of the three values
    tensor([4., 5., 6., 7.])
    """
    b, h_q, h_kv, t, d = check_decode_inputs(q, k, v, key_mask, seq_lens, scale)
    if seq_lens is not None and bool(((seq_lens < 0) | (seq_lens > t)).any()):
        raise ValueError(f"seq_lens values must be in [0, {t}] (tokens in k); got {seq_lens.tolist()}")
    g = h_q // h_kv
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    qg = q.float().reshape(b, h_kv, g, d)
    scores = torch.einsum("bkgd,bktd->bkgt", qg, k.float()) * scale  # [B, H_kv, G, T]
    valid = valid_key_mask(b, h_kv, t, key_mask, seq_lens, q.device)
    if valid is not None:
        scores = scores.masked_fill(~valid[:, :, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [B, H_kv, G]; −inf where nothing is valid (or T = 0)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    probs = torch.exp(scores - safe[..., None])  # exactly 0 at masked positions
    out = torch.einsum("bkgt,bktd->bkgd", probs, v.float()).reshape(b, h_q, d).to(q.dtype)
    if return_lse:
        return out, lse.reshape(b, h_q)
    return out
