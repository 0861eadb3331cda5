"""Multi-query and grouped-query attention, and converting a multi-head checkpoint to GQA by mean-pooling.

Multi-head attention (MHA) gives every one of the H query heads its own key and value head.  Multi-query
attention (MQA, Shazeer 2019, arXiv 1911.02150) keeps H query heads but a single K/V head; grouped-query
attention (GQA, Ainslie et al. 2023, arXiv 2305.13245, §2.2) sits in between: H_kv key/value heads, each shared
by a group of G = H / H_kv query heads.  Query head h reads KV head

    kv(h) = h // G                                                       (query heads are grouped contiguously)

so MHA is G = 1 and MQA is H_kv = 1.  The KV cache shrinks by the factor G, because it stores H_kv heads.

Sharing is done *by index* (the query viewed as ``[B, H_kv, G, T, D]``, see :func:`grouped_attention`); the
equivalent :func:`repeat_kv` copies each KV head G times and is what Hugging Face's ``modeling_llama`` does.

Converting an MHA checkpoint (GQA paper §2.1, "uptraining"): the key and value projection of each new group is
the *mean* of the projections of the heads in that group,

    W_K^{(j)} = (1/G') Σ_{h ∈ group j} W_K^{(h)},      W_V^{(j)} likewise (and the biases, if any),

with G' = H_kv_old / H_kv_new old KV heads per new one; the paper then continues pre-training for a small
fraction (α = 0.05) of the original steps.  Mean-pooling beat keeping the first head of each group and random
initialisation (paper Fig. 4).  RoPE needs no special handling: it is applied to the pooled key as before.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .model import LlamaModel, causal_mask

__all__ = [
    "grouped_attention",
    "mean_pool_heads",
    "mean_pool_kv_heads",
    "repeat_kv",
    "valid_kv_head_counts",
]


def valid_kv_head_counts(num_heads: int) -> list[int]:
    """Every KV-head count a model with ``num_heads`` (query or current KV) heads can be pooled to: its divisors."""
    if not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive int; got {num_heads!r}")
    return [d for d in range(1, num_heads + 1) if num_heads % d == 0]


def repeat_kv(x: Tensor, n_rep: int) -> Tensor:
    """``[B, H_kv, T, D] -> [B, H_kv * n_rep, T, D]`` with output head h = input head ``h // n_rep``.

    Equal to ``torch.repeat_interleave(x, n_rep, dim=1)``; it materialises the copies (GQA without the saving
    in attention's memory traffic), which is why :func:`grouped_attention` and the kernels index instead.
    """
    if x.dim() != 4:
        raise ValueError(f"x must be [batch, kv_heads, tokens, head_dim]; got shape {tuple(x.shape)}")
    if not isinstance(n_rep, int) or n_rep < 1:
        raise ValueError(f"n_rep must be a positive int; got {n_rep!r}")
    if n_rep == 1:
        return x
    b, h_kv, t, d = x.shape
    return x[:, :, None].expand(b, h_kv, n_rep, t, d).reshape(b, h_kv * n_rep, t, d)


def grouped_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = True) -> Tensor:
    """Softmax attention where query head h reads KV head ``h // G``, without copying K or V.

    q: ``[B, H, T_q, D]``; k, v: ``[B, H_kv, T_k, D]`` with H_kv dividing H.  With ``causal`` the T_q queries
    are the *last* T_q positions of the T_k keys (prefill: T_q = T_k; one decode step: T_q = 1).
    Returns ``[B, H, T_q, D]`` in q's dtype; the softmax is computed in fp32.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be 4-D [batch, heads, tokens, head_dim]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    b, h, t_q, d = q.shape
    h_kv, t_k = k.shape[1], k.shape[2]
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"k and v must be [batch={b}, kv_heads, tokens, head_dim={d}] and equal; got "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")
    if h % h_kv:
        raise ValueError(f"kv_heads ({h_kv}) must divide query heads ({h}); allowed kv_heads: {valid_kv_head_counts(h)}")
    if causal and t_q > t_k:
        raise ValueError(f"causal attention needs at least as many keys as queries; got T_q={t_q}, T_k={t_k}")
    g = h // h_kv
    qg = q.reshape(b, h_kv, g, t_q, d)
    scores = torch.einsum("bkgtd,bksd->bkgts", qg.float(), k.float()) / math.sqrt(d)
    if causal:
        scores = scores.masked_fill(~causal_mask(t_q, t_k, q.device), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("bkgts,bksd->bkgtd", probs, v.float())
    return out.reshape(b, h, t_q, d).to(q.dtype)


def mean_pool_heads(weight: Tensor, num_heads: int, num_groups: int) -> Tensor:
    """Average a per-head projection over contiguous groups of heads.

    ``weight`` is a K or V projection weight ``[num_heads * D, in_features]`` (``nn.Linear`` layout, head-major
    rows) or its bias ``[num_heads * D]``; the result has ``num_groups`` heads: new head j is the mean of old
    heads ``j * r ... (j + 1) * r - 1`` with r = num_heads / num_groups.  Computed in fp32, returned in the
    input dtype.
    """
    if num_groups < 1 or num_heads % num_groups:
        raise ValueError(f"num_groups must divide num_heads={num_heads}; allowed: {valid_kv_head_counts(num_heads)}; "
                         f"got {num_groups}")
    if weight.shape[0] % num_heads:
        raise ValueError(f"weight's first dim ({weight.shape[0]}) must be num_heads ({num_heads}) x head_dim")
    d = weight.shape[0] // num_heads
    r = num_heads // num_groups
    rest = tuple(weight.shape[1:])
    pooled = weight.float().reshape(num_groups, r, d, *rest).mean(dim=1)
    return pooled.reshape(num_groups * d, *rest).to(weight.dtype)


def _pooled_linear(lin: nn.Linear, num_heads: int, num_groups: int) -> nn.Linear:
    w = lin.weight.detach()
    new = nn.Linear(lin.in_features, lin.out_features // num_heads * num_groups, bias=lin.bias is not None,
                    device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(mean_pool_heads(w, num_heads, num_groups))
        if lin.bias is not None:
            new.bias.copy_(mean_pool_heads(lin.bias.detach(), num_heads, num_groups))
    new.weight.requires_grad_(lin.weight.requires_grad)
    if new.bias is not None:
        new.bias.requires_grad_(lin.bias.requires_grad)
    return new


def mean_pool_kv_heads(model: LlamaModel, num_key_value_heads: int) -> LlamaModel:
    """A copy of ``model`` with ``num_key_value_heads`` KV heads, each the mean of the heads in its group.

    Works from MHA or from an existing GQA model; ``num_key_value_heads`` must divide the model's current KV-head
    count (so every new group is a union of old groups and query head h keeps reading the pool that contains
    its old KV head ``h // G_old``).  The input model is not modified.  ``num_key_value_heads`` equal to the
    current count returns an identical copy; 1 gives MQA.
    """
    if not isinstance(model, LlamaModel):
        raise TypeError(f"model must be a refimpl LlamaModel; got {type(model).__name__}")
    cur = model.config.num_key_value_heads
    allowed = valid_kv_head_counts(cur)
    if not isinstance(num_key_value_heads, int) or isinstance(num_key_value_heads, bool) \
            or num_key_value_heads not in allowed:
        raise ValueError(
            f"num_key_value_heads must divide the model's current num_key_value_heads={cur} "
            f"(num_attention_heads={model.config.num_attention_heads}); allowed values: {allowed}; "
            f"got {num_key_value_heads!r}"
        )
    new = copy.deepcopy(model)
    new.config = dataclasses.replace(model.config, num_key_value_heads=num_key_value_heads,
                                     extra=dict(model.config.extra))
    for layer in new.model.layers:
        attn = layer.self_attn
        attn.k_proj = _pooled_linear(attn.k_proj, cur, num_key_value_heads)
        attn.v_proj = _pooled_linear(attn.v_proj, cur, num_key_value_heads)
        attn.h_kv = num_key_value_heads
    return new


def _sdpa_reference(q: Tensor, k: Tensor, v: Tensor, causal: bool = True) -> Tensor:
    """PyTorch's fused attention with ``enable_gqa`` (an independent reference for tests and checks)."""
    t_q, t_k = q.shape[2], k.shape[2]
    mask = causal_mask(t_q, t_k, q.device) if causal else None
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                          enable_gqa=q.shape[1] != k.shape[1]).to(q.dtype)
