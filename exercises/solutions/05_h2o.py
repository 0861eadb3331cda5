"""Solutions to exercises/05_h2o.ipynb (checked by refimpl.exercises.lesson_05)."""

from __future__ import annotations

import torch
from torch import Tensor


def attention_mass(probs: Tensor, num_kv_heads: int) -> Tensor:
    b, h_q, t_q, t_k = probs.shape
    received = probs.sum(dim=2)  # [B, H_q, T_k]: attention each key received from this step's queries
    return received.view(b, num_kv_heads, h_q // num_kv_heads, t_k).mean(dim=2)


def h2o_keep(scores: Tensor, heavy: int, recent: int) -> Tensor:
    h, n = scores.shape
    keep = torch.zeros(h, n, dtype=torch.bool)
    keep[:, max(n - recent, 0):] = True  # the recent window
    older = n - recent
    if heavy > 0 and older > 0:
        top = scores[:, :older].topk(min(heavy, older), dim=-1).indices  # per head, among the older entries
        keep.scatter_(1, top, True)
    return keep


def streaming_keep(n: int, sink_tokens: int, recent_tokens: int) -> Tensor:
    pos = torch.arange(n)
    return (pos < sink_tokens) | (pos >= n - recent_tokens)
