"""Solutions to exercises/00_kv_cache_fundamentals.ipynb (checked by refimpl.exercises.lesson_00)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from refimpl.model import apply_rope


def causal_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    t_q, t_k, d = q.shape[2], k.shape[2], q.shape[3]
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)  # [B, H, T_q, T_k]
    # query i sits at position t_k - t_q + i and may see keys 0 .. that position
    q_pos = torch.arange(t_k - t_q, t_k)[:, None]
    allowed = torch.arange(t_k)[None, :] <= q_pos
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def attend_with_cache(q: Tensor, k: Tensor, v: Tensor, cache_k: Tensor, cache_v: Tensor, cos: Tensor,
                      sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # rotate BEFORE caching
    cache_k = torch.cat([cache_k, k], dim=2)
    cache_v = torch.cat([cache_v, v], dim=2)
    return causal_attention(q, cache_k, cache_v), cache_k, cache_v


def kv_cache_bytes(config: dict, seq_len: int, batch: int, bytes_per_element: float) -> int:
    layers = config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    return math.ceil(2 * layers * kv_heads * head_dim * seq_len * batch * bytes_per_element)
