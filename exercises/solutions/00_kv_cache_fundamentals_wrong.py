"""Plausible wrong answers for exercise 00; every one must FAIL its check (tests/test_exercises.py)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from refimpl.model import apply_rope


# ---------------------------------------------------------------------------------------- causal_attention
def attention_no_causal_mask(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1) @ v


def attention_top_left_mask(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    # right for prefill, wrong as soon as there are cached keys: the queries are the LAST positions
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    mask = torch.tril(torch.ones(q.shape[2], k.shape[2], dtype=torch.bool))
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1) @ v


def attention_scale_by_d(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    t_q, t_k = q.shape[2], k.shape[2]
    scores = q @ k.transpose(-1, -2) / q.shape[-1]
    allowed = torch.arange(t_k)[None, :] <= torch.arange(t_k - t_q, t_k)[:, None]
    return torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1) @ v


def attention_softmax_over_queries(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    t_q, t_k = q.shape[2], k.shape[2]
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    allowed = torch.arange(t_k)[None, :] <= torch.arange(t_k - t_q, t_k)[:, None]
    return torch.softmax(scores.masked_fill(~allowed, -1e9), dim=-2) @ v


def _attn(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    t_q, t_k = q.shape[2], k.shape[2]
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    allowed = torch.arange(t_k)[None, :] <= torch.arange(t_k - t_q, t_k)[:, None]
    return torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1) @ v


# --------------------------------------------------------------------------------------- attend_with_cache
def cache_rope_after_caching(q, k, v, cache_k, cache_v, cos, sin):
    # stores UNrotated keys and rotates the whole cache with the current step's angles at read time
    cache_k = torch.cat([cache_k, k], dim=2)
    cache_v = torch.cat([cache_v, v], dim=2)
    t_new = k.shape[2]
    cos_all = torch.cat([cos[:, :1].expand(-1, cache_k.shape[2] - t_new, -1), cos], dim=1)
    sin_all = torch.cat([sin[:, :1].expand(-1, cache_k.shape[2] - t_new, -1), sin], dim=1)
    out = _attn(apply_rope(q, cos, sin), apply_rope(cache_k, cos_all, sin_all), cache_v)
    return out, cache_k, cache_v


def cache_unrotated_keys(q, k, v, cache_k, cache_v, cos, sin):
    # attends correctly this step but caches the keys before RoPE
    out = _attn(apply_rope(q, cos, sin), torch.cat([cache_k, apply_rope(k, cos, sin)], 2), torch.cat([cache_v, v], 2))
    return out, torch.cat([cache_k, k], dim=2), torch.cat([cache_v, v], dim=2)


def cache_no_causal_mask(q, k, v, cache_k, cache_v, cos, sin):
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    cache_k, cache_v = torch.cat([cache_k, k], 2), torch.cat([cache_v, v], 2)
    return attention_no_causal_mask(q, cache_k, cache_v), cache_k, cache_v


def cache_transposed_layout(q, k, v, cache_k, cache_v, cos, sin):
    # treats the tensors as [B, T, H, D]: appends along dim 1 (heads) instead of dim 2 (tokens)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    cache_k, cache_v = torch.cat([cache_k, k], 1), torch.cat([cache_v, v], 1)
    return _attn(q, k, v), cache_k, cache_v


def cache_query_not_rotated(q, k, v, cache_k, cache_v, cos, sin):
    k = apply_rope(k, cos, sin)
    cache_k, cache_v = torch.cat([cache_k, k], 2), torch.cat([cache_v, v], 2)
    return _attn(q, cache_k, cache_v), cache_k, cache_v


# ------------------------------------------------------------------------------------------ kv_cache_bytes
def bytes_forgot_k_and_v(config, seq_len, batch, bytes_per_element):
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    hd = config.get("head_dim") or config["hidden_size"] // heads
    return math.ceil(config["num_hidden_layers"] * kv * hd * seq_len * batch * bytes_per_element)


def bytes_query_heads(config, seq_len, batch, bytes_per_element):
    heads = config["num_attention_heads"]
    hd = config.get("head_dim") or config["hidden_size"] // heads
    return math.ceil(2 * config["num_hidden_layers"] * heads * hd * seq_len * batch * bytes_per_element)


def bytes_ignores_head_dim(config, seq_len, batch, bytes_per_element):
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    return math.ceil(2 * config["num_hidden_layers"] * kv * (config["hidden_size"] // heads) * seq_len * batch
                     * bytes_per_element)


def bytes_ignores_batch(config, seq_len, batch, bytes_per_element):
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    hd = config.get("head_dim") or config["hidden_size"] // heads
    return math.ceil(2 * config["num_hidden_layers"] * kv * hd * seq_len * bytes_per_element)


def bytes_requires_kv_key(config, seq_len, batch, bytes_per_element):
    heads = config["num_attention_heads"]
    hd = config.get("head_dim") or config["hidden_size"] // heads
    return math.ceil(2 * config["num_hidden_layers"] * config["num_key_value_heads"] * hd * seq_len * batch
                     * bytes_per_element)


WRONG = {
    "causal_attention": [attention_no_causal_mask, attention_top_left_mask, attention_scale_by_d,
                         attention_softmax_over_queries],
    "attend_with_cache": [cache_rope_after_caching, cache_unrotated_keys, cache_no_causal_mask,
                          cache_transposed_layout, cache_query_not_rotated],
    "kv_cache_bytes": [bytes_forgot_k_and_v, bytes_query_heads, bytes_ignores_head_dim, bytes_ignores_batch,
                       bytes_requires_kv_key],
}
