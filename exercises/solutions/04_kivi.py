"""Solutions to exercises/04_kivi.ipynb (checked by refimpl.exercises.lesson_04)."""

from __future__ import annotations

import torch
from torch import Tensor


def fake_quantize(x: Tensor, bits: int, group_size: int) -> Tensor:
    qmax = 2**bits - 1
    g = x.float().reshape(*x.shape[:-1], x.shape[-1] // group_size, group_size)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    scale = (hi - lo) / qmax
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # constant group: codes 0, x̂ = lo
    q = torch.round((g - lo) / safe).clamp(0, qmax)
    return (q * scale + lo).reshape(x.shape).to(x.dtype)


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    f = 32 // bits
    c = codes.long().reshape(*codes.shape[:-1], codes.shape[-1] // f, f)
    word = (c << (bits * torch.arange(f))).sum(-1)  # first code in the lowest bits
    word = torch.where(word >= 2**31, word - 2**32, word)  # the 32-bit pattern as a signed int32
    return word.to(torch.int32)


def quantize_keys_per_channel(k: Tensor, bits: int, group_size: int) -> Tensor:
    # groups of tokens of one channel: make tokens the last dim, quantize, transpose back
    return fake_quantize(k.transpose(-1, -2), bits, group_size).transpose(-1, -2)


def kivi_split(tokens: int, residual_length: int) -> tuple[int, int, int, int]:
    n_k = tokens - tokens % residual_length
    n_v = max(tokens - residual_length, 0)
    return n_k, tokens - n_k, n_v, tokens - n_v
