"""Plausible wrong answers for exercise 01; every one must FAIL its check (tests/test_exercises.py)."""

from __future__ import annotations

import math

import torch
from torch import Tensor


# ----------------------------------------------------------------------------------------------- repeat_kv
def repeat_kv_tiled(x: Tensor, n_rep: int) -> Tensor:
    return x.repeat(1, n_rep, 1, 1)  # [k0, k1, k0, k1]: head h reads h % H_kv


def repeat_kv_token_axis(x: Tensor, n_rep: int) -> Tensor:
    return torch.repeat_interleave(x, n_rep, dim=2)


def repeat_kv_expand_wrong_axis(x: Tensor, n_rep: int) -> Tensor:
    b, h_kv, t, d = x.shape
    return x[:, None].expand(b, n_rep, h_kv, t, d).reshape(b, h_kv * n_rep, t, d)


# ----------------------------------------------------------------------------------------- grouped attention
def _attend(qg: Tensor, k: Tensor, v: Tensor, causal: bool = True) -> Tensor:
    t, d = qg.shape[-2], qg.shape[-1]
    scores = torch.einsum("bkgtd,bksd->bkgts", qg, k) / math.sqrt(d)
    if causal:
        scores = scores.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
    return torch.einsum("bkgts,bksd->bkgtd", torch.softmax(scores, dim=-1), v)


def gqa_tiled_grouping(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    b, h, t, d = q.shape
    h_kv = k.shape[1]
    g = h // h_kv
    qg = q.view(b, g, h_kv, t, d).transpose(1, 2)  # pairs query head h with KV head h % H_kv
    return _attend(qg, k, v).transpose(1, 2).reshape(b, h, t, d)


def gqa_no_causal_mask(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    b, h, t, d = q.shape
    h_kv = k.shape[1]
    return _attend(q.view(b, h_kv, h // h_kv, t, d), k, v, causal=False).reshape(b, h, t, d)


def gqa_transposed_head_layout(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    # treats q as [B, T, H, D] when grouping the heads
    b, h, t, d = q.shape
    h_kv = k.shape[1]
    qg = q.transpose(1, 2).reshape(b, h_kv, h // h_kv, t, d)
    return _attend(qg, k, v).reshape(b, h, t, d)


def gqa_no_scale(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    b, h, t, d = q.shape
    h_kv = k.shape[1]
    return _attend(q.view(b, h_kv, h // h_kv, t, d) * math.sqrt(d), k, v).reshape(b, h, t, d)


# --------------------------------------------------------------------------------------------- mean pooling
def pool_first_head(weight: Tensor, num_kv_heads: int, new_kv_heads: int) -> Tensor:
    d = weight.shape[0] // num_kv_heads
    r = num_kv_heads // new_kv_heads
    return weight.view(new_kv_heads, r, d, -1)[:, 0].reshape(new_kv_heads * d, -1)


def pool_strided_groups(weight: Tensor, num_kv_heads: int, new_kv_heads: int) -> Tensor:
    d = weight.shape[0] // num_kv_heads
    r = num_kv_heads // new_kv_heads
    return weight.view(r, new_kv_heads, d, -1).mean(dim=0).reshape(new_kv_heads * d, -1)


def pool_transposed_layout(weight: Tensor, num_kv_heads: int, new_kv_heads: int) -> Tensor:
    d = weight.shape[0] // num_kv_heads
    r = num_kv_heads // new_kv_heads
    return weight.view(d, new_kv_heads, r, -1).mean(dim=2).reshape(new_kv_heads * d, -1)


def pool_sum(weight: Tensor, num_kv_heads: int, new_kv_heads: int) -> Tensor:
    d = weight.shape[0] // num_kv_heads
    r = num_kv_heads // new_kv_heads
    return weight.view(new_kv_heads, r, d, -1).sum(dim=1).reshape(new_kv_heads * d, -1)


WRONG = {
    "repeat_kv": [repeat_kv_tiled, repeat_kv_token_axis, repeat_kv_expand_wrong_axis],
    "grouped_query_attention": [gqa_tiled_grouping, gqa_no_causal_mask, gqa_transposed_head_layout, gqa_no_scale],
    "mean_pool_kv_weight": [pool_first_head, pool_strided_groups, pool_transposed_layout, pool_sum],
}
