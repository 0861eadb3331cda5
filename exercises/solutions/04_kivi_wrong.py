"""Plausible wrong answers for exercise 04; every one must FAIL its check (tests/test_exercises.py)."""

from __future__ import annotations

import torch
from torch import Tensor


# -------------------------------------------------------------------------------------------- fake_quantize
def _groups(x: Tensor, group_size: int) -> Tensor:
    return x.float().reshape(*x.shape[:-1], x.shape[-1] // group_size, group_size)


def fq_symmetric(x: Tensor, bits: int, group_size: int) -> Tensor:
    g = _groups(x, group_size)  # zero point fixed at 0, scale from max |x|: wastes half the levels
    scale = g.abs().amax(-1, keepdim=True) / (2 ** (bits - 1) - 1)
    q = torch.round(g / scale).clamp(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return (q * scale).reshape(x.shape).to(x.dtype)


def fq_steps_off_by_one(x: Tensor, bits: int, group_size: int) -> Tensor:
    g = _groups(x, group_size)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    scale = (hi - lo).clamp_min(1e-12) / 2**bits  # 2^B levels are 2^B - 1 steps
    q = torch.round((g - lo) / scale).clamp(0, 2**bits - 1)
    return (q * scale + lo).reshape(x.shape).to(x.dtype)


def fq_floor(x: Tensor, bits: int, group_size: int) -> Tensor:
    g = _groups(x, group_size)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    scale = (hi - lo).clamp_min(1e-12) / (2**bits - 1)
    q = torch.floor((g - lo) / scale).clamp(0, 2**bits - 1)  # truncation: error up to a whole step
    return (q * scale + lo).reshape(x.shape).to(x.dtype)


def fq_nan_on_constant_group(x: Tensor, bits: int, group_size: int) -> Tensor:
    g = _groups(x, group_size)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    scale = (hi - lo) / (2**bits - 1)  # the official code's 0/0 on a constant group
    q = torch.round((g - lo) / scale).clamp(0, 2**bits - 1)
    return (q * scale + lo).reshape(x.shape).to(x.dtype)


def fq_whole_row(x: Tensor, bits: int, group_size: int) -> Tensor:
    return fq_ok_grouping(x, bits, x.shape[-1])  # ignores group_size: one group per row


def fq_ok_grouping(x: Tensor, bits: int, group_size: int) -> Tensor:
    g = _groups(x, group_size)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    scale = (hi - lo) / (2**bits - 1)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round((g - lo) / safe).clamp(0, 2**bits - 1)
    return (q * scale + lo).reshape(x.shape).to(x.dtype)


# ----------------------------------------------------------------------------------------------- pack_codes
def pack_high_bits_first(codes: Tensor, bits: int) -> Tensor:
    f = 32 // bits
    c = codes.long().reshape(*codes.shape[:-1], -1, f)
    word = (c << (bits * torch.arange(f - 1, -1, -1))).sum(-1)  # first code in the HIGHEST bits
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


def pack_strided(codes: Tensor, bits: int) -> Tensor:
    f = 32 // bits
    c = codes.long().reshape(*codes.shape[:-1], f, -1).transpose(-1, -2)  # word w holds codes w, w+W, w+2W...
    word = (c << (bits * torch.arange(f))).sum(-1)
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


def pack_int64(codes: Tensor, bits: int) -> Tensor:
    f = 32 // bits
    c = codes.long().reshape(*codes.shape[:-1], -1, f)
    return (c << (bits * torch.arange(f))).sum(-1)  # right bits, but int64 words: twice the memory


# ---------------------------------------------------------------------------------- quantize_keys_per_channel
def keys_per_token(k: Tensor, bits: int, group_size: int) -> Tensor:
    return fq_ok_grouping(k, bits, group_size)  # groups of channels: the outlier channel ruins its token groups


def keys_reshape_not_transpose(k: Tensor, bits: int, group_size: int) -> Tensor:
    b, h, t, d = k.shape
    return fq_ok_grouping(k.reshape(b, h, d, t), bits, group_size).reshape(b, h, t, d)


def keys_whole_sequence(k: Tensor, bits: int, group_size: int) -> Tensor:
    return fq_ok_grouping(k.transpose(-1, -2), bits, k.shape[2]).transpose(-1, -2)  # one group of all T tokens


# ----------------------------------------------------------------------------------------------- kivi_split
def split_values_like_keys(tokens: int, residual_length: int) -> tuple[int, int, int, int]:
    n = tokens - tokens % residual_length
    return n, tokens - n, n, tokens - n


def split_keys_like_values(tokens: int, residual_length: int) -> tuple[int, int, int, int]:
    n = max(tokens - residual_length, 0)
    return n, tokens - n, n, tokens - n


def split_keep_full_residual(tokens: int, residual_length: int) -> tuple[int, int, int, int]:
    # quantizes keys only once R + 1 are waiting: keeps R fp keys when T is a multiple of R
    n_k = 0 if tokens == 0 else (tokens - 1) // residual_length * residual_length
    n_v = max(tokens - residual_length, 0)
    return n_k, tokens - n_k, n_v, tokens - n_v


WRONG = {
    "fake_quantize": [fq_symmetric, fq_steps_off_by_one, fq_floor, fq_nan_on_constant_group, fq_whole_row],
    "pack_codes": [pack_high_bits_first, pack_strided, pack_int64],
    "quantize_keys_per_channel": [keys_per_token, keys_reshape_not_transpose, keys_whole_sequence],
    "kivi_split": [split_values_like_keys, split_keys_like_values, split_keep_full_residual],
}
