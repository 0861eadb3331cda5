"""Checks for exercise 04: KIVI (Liu et al. 2024, arXiv 2402.02750).

The learner writes four functions:

``fake_quantize(x, bits, group_size)``
    asymmetric B-bit quantize-then-dequantize of ``x`` in groups of ``group_size`` consecutive elements of the last
    dim: z = min, s = (max − min)/(2^B − 1), q = clamp(round((x − z)/s), 0, 2^B − 1), x̂ = q·s + z, computed in
    float32 and returned in ``x``'s dtype; a constant group (s = 0) comes back exactly, never NaN.
``pack_codes(codes, bits)``
    integer codes in [0, 2^B) → int32 words along the last dim, 32/B codes per word, the first code in the lowest
    bits (``word = Σ_j codes[j] << (B·j)``).
``quantize_keys_per_channel(k, bits, group_size)``
    KIVI's key rule on ``k`` ``[B, H, T, D]``: every channel d is quantized in groups of ``group_size``
    consecutive *tokens* (returns the fake-quantized keys, same shape and dtype).
``kivi_split(tokens, residual_length)``
    ``(quantized keys, fp keys, quantized values, fp values)`` that a KIVI cache holds after ``tokens`` tokens.

References: :mod:`refimpl.quant` (``quantize``, ``dequantize``, ``pack``) and :mod:`refimpl.kivi` (``kivi_split``).
The reference scales here are float32 (``refimpl.kivi`` stores them in fp16).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..kivi import kivi_split
from ..quant import dequantize, pack, quantize
from . import CheckResult, Mismatch, compare, run_check

__all__ = [
    "CHECKS",
    "check_fake_quantize",
    "check_kivi_split",
    "check_pack_codes",
    "check_quantize_keys_per_channel",
]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _fake(x: Tensor, bits: int, group_size: int, dim: int) -> Tensor:
    q, s, z = quantize(x, bits, group_size, dim, scale_dtype=torch.float32)
    return dequantize(q, s, z, group_size, dim, dtype=x.dtype)


def check_fake_quantize(fn: Callable[[Tensor, int, int], Tensor]) -> CheckResult:
    def body() -> None:
        hand = torch.tensor([[0.0, 0.4, 0.6, 3.0, -1.0, 0.0, 2.0, 14.0]])
        compare(fn(hand, 2, 4), torch.tensor([[0.0, 0.0, 1.0, 3.0, -1.0, -1.0, 4.0, 14.0]]),
                "fake_quantize([[0, 0.4, 0.6, 3,  -1, 0, 2, 14]], bits=2, group_size=4)",
                "Group 1: z = 0, s = (3 - 0)/3 = 1, codes 0, 0, 1, 3. Group 2: z = -1, s = (14 + 1)/3 = 5, codes "
                "0, 0, 1, 3 -> -1, -1, 4, 14 (round to nearest, not floor; 2 bits give 2**2 - 1 = 3 steps).")
        for shape, bits, g in [((2, 3, 5, 64), 2, 32), ((4, 32), 4, 16), ((3, 7, 128), 2, 64), ((2, 64), 8, 32)]:
            x = torch.randn(shape, generator=_gen(sum(shape) + bits)) * 3
            compare(fn(x, bits, g), _fake(x, bits, g, -1), f"fake_quantize(x of {shape}, bits={bits}, group_size={g})",
                    "Groups are consecutive elements of the LAST dim; zero point = group min, scale = (max - min) / "
                    "(2**bits - 1) (asymmetric, not max|x|); round to nearest, then clamp to [0, 2**bits - 1].")
        const = torch.full((2, 32), 0.75)
        const[1] = torch.linspace(-1, 1, 32)
        compare(fn(const, 2, 16), _fake(const, 2, 16, -1), "fake_quantize with a constant group (max = min)",
                "A constant group has scale 0: divide by 1 instead (every code is 0) so the group comes back "
                "exactly instead of NaN.")
    return run_check("fake_quantize", body)


def check_pack_codes(fn: Callable[[Tensor, int], Tensor]) -> CheckResult:
    def body() -> None:
        got = fn(torch.tensor([[1, 2, 3, 0] + [0] * 12]), 2)
        compare(got, torch.tensor([[57]], dtype=torch.int32), "pack_codes([1, 2, 3, 0, 0, ...], bits=2)",
                "Word = 1 + (2 << 2) + (3 << 4) = 57: the FIRST code goes in the LOWEST bits; store int32.")
        for shape, bits in [((2, 3, 64), 2), ((5, 32), 4), ((2, 2, 16), 8), ((3, 48), 2)]:
            codes = torch.randint(0, 2**bits, shape, generator=_gen(sum(shape) * bits))
            codes[..., -1] = 2**bits - 1  # last word's top field set: the int32 is negative
            compare(fn(codes, bits), pack(codes, bits), f"pack_codes(codes of {shape}, bits={bits})",
                    "Pack 32 // bits consecutive codes of the last dim into one int32, code j shifted by bits*j; a "
                    "top field that sets bit 31 makes a negative int32 (compute in int64, then wrap to int32).")
    return run_check("pack_codes", body)


def check_quantize_keys_per_channel(fn: Callable[[Tensor, int, int], Tensor]) -> CheckResult:
    def body() -> None:
        for b, h, t, d, bits, g in [(1, 2, 64, 32, 2, 32), (2, 1, 48, 16, 4, 16), (1, 3, 128, 64, 2, 64)]:
            k = torch.randn(b, h, t, d, generator=_gen(t + d + bits))
            k[..., 1] = k[..., 1] * 0.5 + 12.0  # an outlier channel, as in real keys
            compare(fn(k, bits, g), _fake(k, bits, g, -2),
                    f"quantize_keys_per_channel(k of {(b, h, t, d)}, bits={bits}, group_size={g})",
                    "Per-CHANNEL: one group = group_size consecutive TOKENS (dim -2) of one channel, so an outlier "
                    "channel gets its own scale. Transpose to [B, H, D, T] (do not reshape/view) before grouping the "
                    "last dim, and transpose back.")
    return run_check("quantize_keys_per_channel", body)


def check_kivi_split(fn: Callable[[int, int], tuple[int, int, int, int]]) -> CheckResult:
    def body() -> None:
        for t, r in [(300, 128), (0, 32), (20, 32), (128, 128), (129, 128), (256, 128), (1000, 32), (31, 32)]:
            got = fn(t, r)
            want = kivi_split(t, r)
            if not isinstance(got, tuple) or len(got) != 4:
                raise Mismatch(f"kivi_split({t}, {r}) should return a tuple of 4 ints; got {got!r}")
            if tuple(int(x) for x in got) != want:
                raise Mismatch(
                    f"kivi_split({t}, {r}) returned {tuple(got)} but should be {want}. Keys are quantized in whole "
                    f"blocks of R tokens when the residual fills (T - T % R quantized); values leave a FIFO of the "
                    f"last R as soon as there are more (max(T - R, 0) quantized)."
                )
    return run_check("kivi_split", body)


CHECKS = {
    "fake_quantize": check_fake_quantize,
    "pack_codes": check_pack_codes,
    "quantize_keys_per_channel": check_quantize_keys_per_channel,
    "kivi_split": check_kivi_split,
}
