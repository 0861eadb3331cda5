"""Solutions to exercises/06_snapkv.ipynb (checked by refimpl.exercises.lesson_06)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def window_votes(q_window: Tensor, k: Tensor) -> Tensor:
    h, w, d = q_window.shape
    t = k.shape[1]
    scores = q_window @ k.transpose(1, 2) / math.sqrt(d)  # [H, w, T]
    q_pos = torch.arange(t - w, t)[:, None]
    causal = torch.arange(t)[None, :] <= q_pos  # window query i sees keys 0 .. T-w+i
    probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
    return probs[:, :, : t - w].sum(dim=1)


def snapkv_select(votes: Tensor, window: int, capacity: int, kernel_size: int) -> Tensor:
    h, prefix = votes.shape
    pooled = F.max_pool1d(votes[:, None], kernel_size, stride=1, padding=kernel_size // 2)[:, 0]
    top = pooled.topk(min(capacity - window, prefix), dim=-1).indices
    win = torch.arange(prefix, prefix + window).expand(h, window)
    return torch.cat([top, win], dim=-1).sort(dim=-1).values


def pyramid_budgets(num_layers: int, capacity: int, window: int, prompt_len: int, beta: int = 20) -> list[int]:
    k = capacity - window
    if num_layers == 1 or prompt_len < 2 * k:
        return [capacity] * num_layers
    lo = k // beta
    hi = 2 * k - lo
    if hi >= prompt_len - window:
        hi = prompt_len - window
        lo = 2 * k - hi
    step = (hi - lo) // (num_layers - 1)
    return [hi - layer * step + window for layer in range(num_layers)]
