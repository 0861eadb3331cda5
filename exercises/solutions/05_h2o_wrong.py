"""Plausible wrong answers for exercise 05; every one must FAIL its check (tests/test_exercises.py)."""

from __future__ import annotations

import torch
from torch import Tensor


# ------------------------------------------------------------------------------------------ attention_mass
def mass_sum_over_keys(probs: Tensor, num_kv_heads: int) -> Tensor:
    b, h_q, t_q, t_k = probs.shape
    return probs.sum(dim=3).view(b, num_kv_heads, h_q // num_kv_heads, t_q).mean(dim=2)  # attention *given*


def mass_strided_groups(probs: Tensor, num_kv_heads: int) -> Tensor:
    b, h_q, t_q, t_k = probs.shape
    return probs.sum(dim=2).view(b, h_q // num_kv_heads, num_kv_heads, t_k).mean(dim=1)  # head h -> h % H_kv


def mass_group_sum(probs: Tensor, num_kv_heads: int) -> Tensor:
    b, h_q, t_q, t_k = probs.shape
    return probs.sum(dim=2).view(b, num_kv_heads, h_q // num_kv_heads, t_k).sum(dim=2)


def mass_mean_over_queries(probs: Tensor, num_kv_heads: int) -> Tensor:
    b, h_q, t_q, t_k = probs.shape
    return probs.mean(dim=2).view(b, num_kv_heads, h_q // num_kv_heads, t_k).mean(dim=2)


# ------------------------------------------------------------------------------------------------ h2o_keep
def keep_topk_including_recent(scores: Tensor, heavy: int, recent: int) -> Tensor:
    h, n = scores.shape
    keep = torch.zeros(h, n, dtype=torch.bool)
    keep[:, max(n - recent, 0):] = True
    if heavy > 0:
        keep.scatter_(1, scores.topk(min(heavy, n), dim=-1).indices, True)  # may pick recent ones again
    return keep


def keep_shared_across_heads(scores: Tensor, heavy: int, recent: int) -> Tensor:
    h, n = scores.shape
    keep = torch.zeros(h, n, dtype=torch.bool)
    keep[:, max(n - recent, 0):] = True
    older = n - recent
    if heavy > 0 and older > 0:
        top = scores[:, :older].sum(0).topk(min(heavy, older)).indices
        keep[:, top] = True
    return keep


def keep_lowest_scores(scores: Tensor, heavy: int, recent: int) -> Tensor:
    h, n = scores.shape
    keep = torch.zeros(h, n, dtype=torch.bool)
    keep[:, max(n - recent, 0):] = True
    older = n - recent
    if heavy > 0 and older > 0:
        keep.scatter_(1, scores[:, :older].topk(min(heavy, older), dim=-1, largest=False).indices, True)
    return keep


def keep_no_recent_window(scores: Tensor, heavy: int, recent: int) -> Tensor:
    h, n = scores.shape
    keep = torch.zeros(h, n, dtype=torch.bool)
    keep.scatter_(1, scores.topk(min(heavy + recent, n), dim=-1).indices, True)
    return keep


# ------------------------------------------------------------------------------------------ streaming_keep
def streaming_no_sinks(n: int, sink_tokens: int, recent_tokens: int) -> Tensor:
    return torch.arange(n) >= n - recent_tokens


def streaming_off_by_one(n: int, sink_tokens: int, recent_tokens: int) -> Tensor:
    pos = torch.arange(n)
    return (pos <= sink_tokens) | (pos > n - recent_tokens)


def streaming_window_includes_sinks(n: int, sink_tokens: int, recent_tokens: int) -> Tensor:
    pos = torch.arange(n)
    return (pos < sink_tokens) | (pos >= n - max(recent_tokens - sink_tokens, 0))


WRONG = {
    "attention_mass": [mass_sum_over_keys, mass_strided_groups, mass_group_sum, mass_mean_over_queries],
    "h2o_keep": [keep_topk_including_recent, keep_shared_across_heads, keep_lowest_scores, keep_no_recent_window],
    "streaming_keep": [streaming_no_sinks, streaming_off_by_one, streaming_window_includes_sinks],
}
