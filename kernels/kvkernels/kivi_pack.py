"""Fused quantize-and-pack for KIVI (Liu et al. 2024, arXiv 2402.02750) in Triton.

One kernel reads a tile of keys or values once and writes the int32 codes with the fp16 scale and zero point of
every group — the same numbers as the PyTorch reference :func:`refimpl.quant.quantize_pack`:

    z = min X,   s = fp16((max X − min X)/(2^B − 1)),   q = clamp(round_half_even((x − fp16(z)) / s), 0, 2^B − 1)

with s = 0 for a constant group (the division then uses 1, every code is 0).  Codes are packed 32/B per int32
word along the channel (last) dim, first code in the lowest bits.  Two grouping modes (``dim``):

* ``dim=-1`` (values, per token): a group is G consecutive channels of one token.  A program owns BLOCK_N rows
  (tokens) and holds them as a ``[BLOCK_N, groups, words per group, codes per word]`` tile, so the min/max of a
  group is a reduction over the last two axes and the packing an OR-reduction over the last one — no reshapes.
* ``dim=-2`` (keys, per channel): a group is G consecutive tokens of one channel.  A program owns one group of G
  tokens × all channels as a ``[G, words, codes per word]`` tile; min/max reduce over axis 0.

Rounding: ``floor(y + 0.5)``, then ties (y + 0.5 an odd integer) are moved down to the even neighbour — the
``torch.round`` rule, spelled with operations the interpreter also has.  The division is ``div_rn`` (IEEE
round-to-nearest), so compiled and interpreted kernels give the reference's codes bit for bit.  All offsets that
scale with the number of rows are int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from refimpl.quant import check_quant_args, codes_per_word

from ._utils import cdiv, check_launchable, next_power_of_2

__all__ = ["quantize_pack"]

BLOCK_ROWS = 32  # tokens per program in the per-token (values) kernel


@triton.jit
def _bit_or(a, b):
    return a | b


@triton.jit
def _round_half_even(y):
    r = tl.floor(y + 0.5)
    tie = (r - y) == 0.5
    odd = (r.to(tl.int32) & 1) == 1
    return tl.where(tie & odd, r - 1.0, r)


@triton.jit
def _codes(x, zero, scale, QMAX: tl.constexpr):
    """Integer codes of ``x`` for broadcastable fp32 ``zero`` (already fp16-rounded) and ``scale``."""
    safe = tl.where(scale > 0.0, scale, 1.0)
    y = tl.div_rn(x - zero, safe)
    y = tl.minimum(tl.maximum(_round_half_even(y), 0.0), QMAX)
    return y.to(tl.int32)


@triton.jit
def _quant_pack_channel_groups(
    X, Words, Scale, Zero, n_rows, stride_x,
    NUM_GROUPS: tl.constexpr, BLOCK_GROUPS: tl.constexpr, WORDS_PER_GROUP: tl.constexpr,
    CODES_PER_WORD: tl.constexpr, BITS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Per-token groups: rows of X are tokens ``[n_rows, D]``; a group is G = WORDS_PER_GROUP·CODES_PER_WORD channels."""
    QMAX: tl.constexpr = (1 << BITS) - 1
    G: tl.constexpr = WORDS_PER_GROUP * CODES_PER_WORD
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    grp = tl.arange(0, BLOCK_GROUPS)
    wrd = tl.arange(0, WORDS_PER_GROUP)
    j = tl.arange(0, CODES_PER_WORD)
    ok2 = (rows < n_rows)[:, None] & (grp < NUM_GROUPS)[None, :]  # [BLOCK_N, BLOCK_GROUPS]
    ok4 = ok2[:, :, None, None]
    chan = grp[None, :, None, None] * G + wrd[None, None, :, None] * CODES_PER_WORD + j[None, None, None, :]
    x = tl.load(X + rows[:, None, None, None] * stride_x + chan, mask=ok4, other=0.0).to(tl.float32)

    lo = tl.min(tl.min(tl.where(ok4, x, float("inf")), axis=3), axis=2)  # [BLOCK_N, BLOCK_GROUPS]
    hi = tl.max(tl.max(tl.where(ok4, x, float("-inf")), axis=3), axis=2)
    lo = tl.where(ok2, lo, 0.0)  # padding rows/groups: keep them finite (never stored)
    hi = tl.where(ok2, hi, 0.0)
    scale16 = tl.div_rn(hi - lo, tl.full(hi.shape, QMAX, tl.float32)).to(tl.float16)  # IEEE, like torch
    zero16 = lo.to(tl.float16)
    scale = scale16.to(tl.float32)[:, :, None, None]
    zero = zero16.to(tl.float32)[:, :, None, None]
    q = _codes(x, zero, scale, QMAX)
    words = tl.reduce(q << (j * BITS)[None, None, None, :], 3, _bit_or)  # [BLOCK_N, BLOCK_GROUPS, WORDS_PER_GROUP]

    words_per_row: tl.constexpr = NUM_GROUPS * WORDS_PER_GROUP
    w_off = rows[:, None, None] * words_per_row + grp[None, :, None] * WORDS_PER_GROUP + wrd[None, None, :]
    tl.store(Words + w_off, words, mask=ok2[:, :, None])
    s_off = rows[:, None] * NUM_GROUPS + grp[None, :]
    tl.store(Scale + s_off, scale16, mask=ok2)
    tl.store(Zero + s_off, zero16, mask=ok2)


@triton.jit
def _quant_pack_token_groups(
    X, Words, Scale, Zero, T, stride_xm, stride_xt,
    NUM_WORDS: tl.constexpr, BLOCK_WORDS: tl.constexpr, CODES_PER_WORD: tl.constexpr, BITS: tl.constexpr,
    G: tl.constexpr,
):
    """Per-channel groups: X is ``[M, T, D]``; program (m, g) quantizes tokens g·G … g·G+G−1 of slice m."""
    QMAX: tl.constexpr = (1 << BITS) - 1
    D: tl.constexpr = NUM_WORDS * CODES_PER_WORD
    m = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1).to(tl.int64)
    tok = g * G + tl.arange(0, G)  # [G] int64
    wrd = tl.arange(0, BLOCK_WORDS)
    j = tl.arange(0, CODES_PER_WORD)
    ok3 = (wrd < NUM_WORDS)[None, :, None]
    chan = wrd[None, :, None] * CODES_PER_WORD + j[None, None, :]  # [1, BLOCK_WORDS, CPW]
    x = tl.load(X + m * stride_xm + tok[:, None, None] * stride_xt + chan, mask=ok3, other=0.0).to(tl.float32)

    lo = tl.min(x, axis=0)  # [BLOCK_WORDS, CPW] one group per channel (padded channels hold 0, never stored)
    hi = tl.max(x, axis=0)
    scale16 = tl.div_rn(hi - lo, tl.full(hi.shape, QMAX, tl.float32)).to(tl.float16)  # IEEE, like torch
    zero16 = lo.to(tl.float16)
    q = _codes(x, zero16.to(tl.float32)[None, :, :], scale16.to(tl.float32)[None, :, :], QMAX)
    words = tl.reduce(q << (j * BITS)[None, None, :], 2, _bit_or)  # [G, BLOCK_WORDS]

    w_off = (m * T + tok)[:, None] * NUM_WORDS + wrd[None, :]
    tl.store(Words + w_off, words, mask=(wrd < NUM_WORDS)[None, :])
    n_groups = T // G
    chan2 = wrd[:, None] * CODES_PER_WORD + j[None, :]  # [BLOCK_WORDS, CPW]
    s_off = (m * n_groups + g) * D + chan2
    ok2 = (wrd < NUM_WORDS)[:, None]
    tl.store(Scale + s_off, scale16, mask=ok2)
    tl.store(Zero + s_off, zero16, mask=ok2)


def quantize_pack(x: Tensor, bits: int, group_size: int, dim: int = -1) -> tuple[Tensor, Tensor, Tensor]:
    """Triton version of :func:`refimpl.quant.quantize_pack` (same signature, same results).

    Args:
        x: ``[..., T, D]`` fp32/fp16/bf16 (any leading dims; copied to contiguous if it is not).
        bits: 2, 4 or 8.  group_size: power of two, multiple of 32 // bits.
        dim: -1 = groups of channels (per token, KIVI values); -2 = groups of tokens (per channel, KIVI keys).

    Returns:
        ``words`` int32 ``[..., T, D·bits/32]``, ``scale`` and ``zero`` fp16: ``[..., T, D/G]`` for ``dim=-1``,
        ``[..., T/G, D]`` for ``dim=-2``.
    """
    check_quant_args(bits, group_size)
    if dim not in (-1, -2):
        raise ValueError(f"dim must be -1 (per-token groups) or -2 (per-channel groups of tokens); got {dim!r}")
    if not isinstance(x, Tensor) or x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"x must be a float32/float16/bfloat16 tensor; got {getattr(x, 'dtype', type(x))}")
    if x.dim() < 2:
        raise ValueError(f"x must be [..., tokens, head_dim]; got shape {tuple(x.shape)}")
    check_launchable(x)
    f = codes_per_word(bits)
    *lead, t, d = x.shape
    if d % group_size and dim == -1:
        raise ValueError(f"head_dim ({d}) must be a multiple of group_size ({group_size}) for per-token groups")
    if d % f:
        raise ValueError(f"head_dim ({d}) must be a multiple of 32 // bits = {f} to pack {bits}-bit codes")
    if dim == -2 and t % group_size:
        raise ValueError(f"tokens ({t}) must be a multiple of group_size ({group_size}) for per-channel groups")
    x = x.contiguous()
    words = torch.empty((*lead, t, d // f), dtype=torch.int32, device=x.device)
    if dim == -1:
        scale = torch.empty((*lead, t, d // group_size), dtype=torch.float16, device=x.device)
    else:
        scale = torch.empty((*lead, t // group_size, d), dtype=torch.float16, device=x.device)
    zero = torch.empty_like(scale)
    if x.numel() == 0:
        return words, scale, zero
    if dim == -1:
        n_rows = x.numel() // d
        n_groups = d // group_size
        _quant_pack_channel_groups[(cdiv(n_rows, BLOCK_ROWS),)](
            x, words, scale, zero, n_rows, d,
            NUM_GROUPS=n_groups, BLOCK_GROUPS=next_power_of_2(n_groups), WORDS_PER_GROUP=group_size // f,
            CODES_PER_WORD=f, BITS=bits, BLOCK_N=BLOCK_ROWS, num_warps=4,
        )
    else:
        m = x.numel() // (t * d)
        _quant_pack_token_groups[(m, t // group_size)](
            x, words, scale, zero, t, t * d, d,
            NUM_WORDS=d // f, BLOCK_WORDS=next_power_of_2(d // f), CODES_PER_WORD=f, BITS=bits, G=group_size,
            num_warps=4 if group_size * d <= 4096 else 8,
        )
    return words, scale, zero
