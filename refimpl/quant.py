"""Group-wise asymmetric integer quantization and int32 bit-packing: the primitives KIVI is built from.

Asymmetric ("zero-point") uniform quantization to B bits of a group of numbers X (KIVI, Liu et al. 2024,
arXiv 2402.02750, §3.1):

    z = min X,    s = (max X − min X) / (2^B − 1),    q = clamp(round((x − z) / s), 0, 2^B − 1),    x̂ = q·s + z

so every element is reconstructed to within s/2 (plus the fp16 rounding of s and z, which are stored in fp16 as in
the official code).  ``round`` is round-half-to-even (``torch.round``); the Triton kernels use the same rule.

*Which* numbers form a group is the whole point of KIVI: ``dim=-1`` groups ``group_size`` consecutive channels of
one token (per-token, KIVI's choice for values), ``dim=-2`` groups ``group_size`` consecutive tokens of one channel
(per-channel, KIVI's choice for keys).

A constant group (max = min) has s = 0.  The official code divides by s and gets NaN; here the stored scale is 0,
the division uses 1 instead, every code is 0 and x̂ = z exactly (up to fp16 rounding of z): always finite.

Packing: 32/B codes per int32 word along the last dim, the first code in the lowest bits (``word |= q_j << B·j``),
the layout of the official ``pack_tensor``.  We always pack along the channel (last) dim, for keys too, so keys and
values share one token-major layout ``[B, H, T, D·B/32]``; the official code packs keys along tokens instead.  The
byte count is the same.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "SUPPORTED_BITS",
    "QuantizeFn",
    "check_quant_args",
    "codes_per_word",
    "dequantize",
    "pack",
    "quantize",
    "quantize_pack",
    "unpack",
    "unpack_dequantize",
]

SUPPORTED_BITS = (2, 4, 8)
SCALE_DTYPE = torch.float16

#: ``(x, bits, group_size, dim) -> (words, scale, zero)``: a quantize-and-pack implementation
#: (:func:`quantize_pack` here, ``kvkernels.kivi_pack.quantize_pack`` in Triton).
QuantizeFn = Callable[[Tensor, int, int, int], tuple[Tensor, Tensor, Tensor]]


def codes_per_word(bits: int) -> int:
    """How many B-bit codes one int32 word holds (16 for 2 bits, 8 for 4 bits, 4 for 8 bits)."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}; got {bits!r}")
    return 32 // bits


def check_quant_args(bits: int, group_size: int) -> None:
    """Validate ``bits`` and ``group_size`` (a power of two that is a multiple of 32/bits, so that a word never
    straddles two groups)."""
    f = codes_per_word(bits)
    if not isinstance(group_size, int) or group_size < 1 or group_size & (group_size - 1):
        raise ValueError(f"group_size must be a positive power of two; got {group_size!r}")
    if group_size % f:
        raise ValueError(
            f"group_size must be a multiple of 32 // bits = {f} for bits={bits} (a packed word may not straddle "
            f"two groups); got {group_size}. Allowed: {[f * 2**i for i in range(6)]}"
        )


def _check_dim(dim: int) -> int:
    if dim not in (-1, -2):
        raise ValueError(f"dim must be -1 (groups of channels: per-token) or -2 (groups of tokens: per-channel); got {dim!r}")
    return dim


def quantize(x: Tensor, bits: int, group_size: int, dim: int = -1,
             scale_dtype: torch.dtype = SCALE_DTYPE) -> tuple[Tensor, Tensor, Tensor]:
    """Quantize ``x`` in groups of ``group_size`` consecutive elements along ``dim`` (−1 or −2).

    Returns ``(codes, scale, zero)``: int32 codes in ``[0, 2^bits − 1]`` shaped like ``x``, and ``scale``/``zero``
    (the group minimum) in ``scale_dtype``, shaped like ``x`` with ``dim`` shrunk to ``x.shape[dim] // group_size``.

    >>> q, s, z = quantize(torch.tensor([[0.0, 0.4, 0.6, 3.0]]), bits=2, group_size=4)
    >>> q.tolist(), s.tolist(), z.tolist()
    ([[0, 0, 1, 3]], [[1.0]], [[0.0]])
    """
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}; got {bits!r}")
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int; got {group_size!r}")
    dim = _check_dim(dim)
    if x.dim() < -dim:
        raise ValueError(f"x must have at least {-dim} dims to group along dim={dim}; got shape {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise ValueError(f"x must be a floating-point tensor; got {x.dtype}")
    n = x.shape[dim]
    if n % group_size:
        raise ValueError(f"x.shape[{dim}] = {n} must be a multiple of group_size = {group_size}")
    qmax = 2**bits - 1
    xt = x.float().movedim(dim, -1)  # group along the last dim of this view
    g = xt.reshape(*xt.shape[:-1], n // group_size, group_size)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    scale = ((hi - lo) / qmax).to(scale_dtype)
    zero = lo.to(scale_dtype)
    s = scale.float()
    safe = torch.where(s > 0, s, torch.ones_like(s))  # constant group: s = 0, every code 0, x̂ = zero
    q = torch.round((g - zero.float()) / safe).clamp_(0, qmax).to(torch.int32)
    codes = q.reshape(xt.shape).movedim(-1, dim)
    return codes, scale.squeeze(-1).movedim(-1, dim), zero.squeeze(-1).movedim(-1, dim)


def dequantize(codes: Tensor, scale: Tensor, zero: Tensor, group_size: int, dim: int = -1,
               dtype: torch.dtype = torch.float32) -> Tensor:
    """x̂ = q·s + z, each group's ``scale``/``zero`` broadcast over its ``group_size`` elements along ``dim``."""
    dim = _check_dim(dim)
    shape = codes.shape
    n = shape[dim]
    want = (*shape[:-1], n // group_size) if dim == -1 else (*shape[:-2], n // group_size, shape[-1])
    if n % group_size or tuple(scale.shape) != want or tuple(zero.shape) != want:
        raise ValueError(
            f"codes {tuple(shape)} in groups of {group_size} along dim {dim} need scale and zero of shape {want}; "
            f"got {tuple(scale.shape)} and {tuple(zero.shape)}"
        )
    if dim == -1:  # view the groups as their own axis and broadcast one scale over each
        q = codes.reshape(*shape[:-1], n // group_size, group_size)
        s, z = scale[..., None], zero[..., None]
    else:
        q = codes.reshape(*shape[:-2], n // group_size, group_size, shape[-1])
        s, z = scale[..., None, :], zero[..., None, :]
    return (q.float() * s.float() + z.float()).reshape(shape).to(dtype)


def pack(codes: Tensor, bits: int) -> Tensor:
    """Pack integer codes in ``[0, 2^bits)`` along the last dim into int32 words, 32/bits per word, first code in
    the lowest bits.

    >>> pack(torch.tensor([[1, 2, 3, 0] + [0] * 12]), bits=2).tolist()   # 1 + 2·4 + 3·16
    [[57]]
    """
    f = codes_per_word(bits)
    if codes.dtype.is_floating_point:
        raise ValueError(f"codes must be an integer tensor; got {codes.dtype}")
    n = codes.shape[-1]
    if n % f:
        raise ValueError(f"the last dim ({n}) must be a multiple of 32 // bits = {f} to pack {bits}-bit codes")
    c = codes.to(torch.int64).reshape(*codes.shape[:-1], n // f, f)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= 2**bits):
        raise ValueError(f"codes must lie in [0, {2**bits - 1}] for bits={bits}")
    shifts = torch.arange(f, device=codes.device, dtype=torch.int64) * bits
    word = (c << shifts).sum(-1)  # fields do not overlap: sum == bitwise or; < 2^32
    word = torch.where(word >= 2**31, word - 2**32, word)  # reinterpret the unsigned 32-bit pattern as int32
    return word.to(torch.int32)


def unpack(words: Tensor, bits: int) -> Tensor:
    """Inverse of :func:`pack`: int32 words ``[..., W]`` → int32 codes ``[..., W·32/bits]``."""
    f = codes_per_word(bits)
    if words.dtype != torch.int32:
        raise ValueError(f"words must be int32 (as produced by pack); got {words.dtype}")
    shifts = torch.arange(f, device=words.device, dtype=torch.int32) * bits
    q = (words[..., None] >> shifts) & (2**bits - 1)  # arithmetic shift; the mask drops the sign bits
    return q.reshape(*words.shape[:-1], words.shape[-1] * f)


def quantize_pack(x: Tensor, bits: int, group_size: int, dim: int = -1) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`quantize` along ``dim`` then :func:`pack` along the last dim → ``(words, scale, zero)``."""
    codes, scale, zero = quantize(x, bits, group_size, dim)
    return pack(codes, bits), scale, zero


def unpack_dequantize(words: Tensor, scale: Tensor, zero: Tensor, bits: int, group_size: int, dim: int = -1,
                      dtype: torch.dtype = torch.float32) -> Tensor:
    """Inverse of :func:`quantize_pack` (up to the quantization error)."""
    return dequantize(unpack(words, bits), scale, zero, group_size, dim, dtype)
