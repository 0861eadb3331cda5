"""Solutions to exercises/01_mqa_gqa.ipynb (checked by refimpl.exercises.lesson_01)."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def repeat_kv(x: Tensor, n_rep: int) -> Tensor:
    b, h_kv, t, d = x.shape
    return x[:, :, None].expand(b, h_kv, n_rep, t, d).reshape(b, h_kv * n_rep, t, d)


def grouped_query_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    b, h, t, d = q.shape
    h_kv = k.shape[1]
    g = h // h_kv
    qg = q.view(b, h_kv, g, t, d)  # query head h = (h // g, h % g): group first
    scores = torch.einsum("bkgtd,bksd->bkgts", qg, k) / math.sqrt(d)
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    scores = scores.masked_fill(~causal, float("-inf"))
    out = torch.einsum("bkgts,bksd->bkgtd", torch.softmax(scores, dim=-1), v)
    return out.reshape(b, h, t, d)


def mean_pool_kv_weight(weight: Tensor, num_kv_heads: int, new_kv_heads: int) -> Tensor:
    d = weight.shape[0] // num_kv_heads
    r = num_kv_heads // new_kv_heads
    return weight.view(new_kv_heads, r, d, -1).mean(dim=1).reshape(new_kv_heads * d, -1)
