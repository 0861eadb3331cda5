"""Plausible wrong answers for exercise 06; every one must FAIL its check (tests/test_exercises.py)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


# -------------------------------------------------------------------------------------------- window_votes
def votes_no_causal_mask(q_window: Tensor, k: Tensor) -> Tensor:
    w, d, t = q_window.shape[1], q_window.shape[2], k.shape[1]
    probs = torch.softmax(q_window @ k.transpose(1, 2) / math.sqrt(d), dim=-1)
    return probs[:, :, : t - w].sum(dim=1)


def votes_softmax_over_prefix_only(q_window: Tensor, k: Tensor) -> Tensor:
    w, d, t = q_window.shape[1], q_window.shape[2], k.shape[1]
    probs = torch.softmax(q_window @ k[:, : t - w].transpose(1, 2) / math.sqrt(d), dim=-1)
    return probs.sum(dim=1)


def votes_mean_not_sum(q_window: Tensor, k: Tensor) -> Tensor:
    w, d, t = q_window.shape[1], q_window.shape[2], k.shape[1]
    scores = q_window @ k.transpose(1, 2) / math.sqrt(d)
    causal = torch.arange(t)[None, :] <= torch.arange(t - w, t)[:, None]
    return torch.softmax(scores.masked_fill(~causal, float("-inf")), -1)[:, :, : t - w].mean(dim=1)


def votes_softmax_over_queries(q_window: Tensor, k: Tensor) -> Tensor:
    w, d, t = q_window.shape[1], q_window.shape[2], k.shape[1]
    scores = q_window @ k.transpose(1, 2) / math.sqrt(d)
    causal = torch.arange(t)[None, :] <= torch.arange(t - w, t)[:, None]
    return torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=1)[:, :, : t - w].sum(dim=1)


# ------------------------------------------------------------------------------------------- snapkv_select
def select_without_window(votes: Tensor, window: int, capacity: int, kernel_size: int) -> Tensor:
    pooled = F.max_pool1d(votes[:, None], kernel_size, stride=1, padding=kernel_size // 2)[:, 0]
    return pooled.topk(min(capacity, votes.shape[1]), dim=-1).indices.sort(dim=-1).values


def select_without_pooling(votes: Tensor, window: int, capacity: int, kernel_size: int) -> Tensor:
    h, prefix = votes.shape
    top = votes.topk(capacity - window, dim=-1).indices
    return torch.cat([top, torch.arange(prefix, prefix + window).expand(h, window)], -1).sort(dim=-1).values


def select_avg_pool(votes: Tensor, window: int, capacity: int, kernel_size: int) -> Tensor:
    h, prefix = votes.shape
    pooled = F.avg_pool1d(votes[:, None], kernel_size, stride=1, padding=kernel_size // 2)[:, 0]
    top = pooled.topk(capacity - window, dim=-1).indices
    return torch.cat([top, torch.arange(prefix, prefix + window).expand(h, window)], -1).sort(dim=-1).values


def select_shared_across_heads(votes: Tensor, window: int, capacity: int, kernel_size: int) -> Tensor:
    h, prefix = votes.shape
    pooled = F.max_pool1d(votes[:, None], kernel_size, stride=1, padding=kernel_size // 2)[:, 0]
    top = pooled.sum(0).topk(capacity - window).indices.expand(h, -1)
    return torch.cat([top, torch.arange(prefix, prefix + window).expand(h, window)], -1).sort(dim=-1).values


# ----------------------------------------------------------------------------------------- pyramid_budgets
def budgets_increasing(num_layers: int, capacity: int, window: int, prompt_len: int, beta: int = 20) -> list[int]:
    k = capacity - window
    if num_layers == 1 or prompt_len < 2 * k:
        return [capacity] * num_layers
    lo = k // beta
    hi = 2 * k - lo
    if hi >= prompt_len - window:
        hi, lo = prompt_len - window, 2 * k - (prompt_len - window)
    step = (hi - lo) // (num_layers - 1)
    return [lo + layer * step + window for layer in range(num_layers)]


def budgets_without_window(num_layers: int, capacity: int, window: int, prompt_len: int, beta: int = 20) -> list[int]:
    k = capacity - window
    if num_layers == 1 or prompt_len < 2 * k:
        return [capacity] * num_layers
    lo = k // beta
    hi = 2 * k - lo
    if hi >= prompt_len - window:
        hi, lo = prompt_len - window, 2 * k - (prompt_len - window)
    step = (hi - lo) // (num_layers - 1)
    return [hi - layer * step for layer in range(num_layers)]


def budgets_no_clamp(num_layers: int, capacity: int, window: int, prompt_len: int, beta: int = 20) -> list[int]:
    k = capacity - window
    if num_layers == 1 or prompt_len < 2 * k:
        return [capacity] * num_layers
    lo = k // beta
    hi = 2 * k - lo
    step = (hi - lo) // (num_layers - 1)
    return [hi - layer * step + window for layer in range(num_layers)]


def budgets_no_uniform_fallback(num_layers: int, capacity: int, window: int, prompt_len: int,
                                beta: int = 20) -> list[int]:
    k = capacity - window
    lo = k // beta
    hi = 2 * k - lo
    if hi >= prompt_len - window:
        hi, lo = prompt_len - window, 2 * k - (prompt_len - window)
    step = (hi - lo) // max(num_layers - 1, 1)
    return [hi - layer * step + window for layer in range(num_layers)]


WRONG = {
    "window_votes": [votes_no_causal_mask, votes_softmax_over_prefix_only, votes_mean_not_sum,
                     votes_softmax_over_queries],
    "snapkv_select": [select_without_window, select_without_pooling, select_avg_pool, select_shared_across_heads],
    "pyramid_budgets": [budgets_increasing, budgets_without_window, budgets_no_clamp, budgets_no_uniform_fallback],
}
