"""KIVI: 2/4-bit asymmetric KV-cache quantization with a full-precision residual (Liu et al., ICML 2024,
arXiv 2402.02750; official code jy-yuan/KIVI, ``models/llama_kivi.py`` and ``quant/new_pack.py``).

The observation (§3 of the paper): keys have a few *channels* with large magnitude in every token, values have no
such fixed structure.  So quantize keys **per channel** (a group is G consecutive tokens of one channel, so an
outlier channel gets its own scale) and values **per token** (a group is G consecutive channels of one token).
Each group is quantized asymmetrically (``refimpl.quant``: x̂ = round((x − z)/s)·s + z, z = min, s = (max − min)/(2^B − 1)).

Per-channel groups need G tokens before they can be quantized, so keys wait in a full-precision **residual**
(Algorithm 1 of the paper; the official decode branch):

* keys: new keys go to the residual; whenever it holds R tokens (R = ``residual_length``, a multiple of G),
  those R tokens are quantized (R/G groups per channel) and the residual empties.  0 … R−1 keys stay fp.
* values: new values go to a FIFO of the last R tokens; the oldest leaves it, quantized per token, as soon as the
  FIFO holds more than R.  Exactly min(T, R) values stay fp.
* prefill of T tokens: the first T − (T mod R) keys and the first T − R values are quantized.
  E.g. T = 300, R = 128, G = 32: 256 quantized + 44 fp keys, 172 quantized + 128 fp values.

Attention in a step sees, in order, dequantized old entries, then the fp residual, then the new entries in full
precision; only *then* does the overflow get quantized (the official code attends first and quantizes after; in
particular prefill attention is exact).  :meth:`KIVICache.update` returns exactly that; a fused kernel uses
:meth:`KIVICache.append`, attends over :meth:`KIVICache.layer_state` (packed codes + residual), then calls
:meth:`KIVICache.flush`.

Bytes per (layer, batch row, KV head) after T tokens, with e bytes per fp element and fp16 scale and zero
(see :func:`kivi_nbytes`):

    n_k = T − (T mod R),  n_v = max(T − R, 0)
    (n_k + n_v)·D·B/8  +  (n_k/G·D + n_v·D/G)·2·2  +  ((T mod R) + min(T, R))·D·e

i.e. B + 32/G bits per element for the quantized part: 3 bits for KIVI-2 at G = 32, 5.3x less than fp16.

:class:`NaiveQuantCache` is the baseline KIVI argues against: keys *and* values quantized per token (what a
straightforward KV quantizer does), same bits, G and value-style residual.

Storage layout (one layer): codes are packed along channels, token-major, for keys and values alike:

    k_codes [B, H_kv, n_k, D·B/32] int32   k_scale, k_zero [B, H_kv, n_k/G, D] fp16   k_res [B, H_kv, T mod R, D]
    v_codes [B, H_kv, n_v, D·B/32] int32   v_scale, v_zero [B, H_kv, n_v, D/G] fp16   v_res [B, H_kv, min(T,R), D]

Padding (``key_mask``) is tracked and returned like :class:`~refimpl.cache.DenseCache` does; padded entries are
quantized with their group like any other (as in the official code), so batch rows should be padded sparingly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .cache import KVCache, LayerKV, _check_kv, tensor_bytes
from .quant import QuantizeFn, check_quant_args, quantize_pack, unpack_dequantize

__all__ = ["KIVICache", "KIVILayerState", "NaiveQuantCache", "kivi_nbytes", "kivi_split", "naive_nbytes"]

SCALE_BYTES = 2  # fp16 scale and fp16 zero point


@dataclass
class KIVILayerState:
    """Everything one layer stores (see the module docstring for shapes); ``None`` where nothing is stored yet."""

    k_codes: Tensor | None = None
    k_scale: Tensor | None = None
    k_zero: Tensor | None = None
    k_res: Tensor | None = None
    v_codes: Tensor | None = None
    v_scale: Tensor | None = None
    v_zero: Tensor | None = None
    v_res: Tensor | None = None
    mask: Tensor | None = None  # [B, T] bool; None while every entry is valid

    def tensors(self) -> list[Tensor | None]:
        return [self.k_codes, self.k_scale, self.k_zero, self.k_res, self.v_codes, self.v_scale, self.v_zero,
                self.v_res]

    @property
    def n_quant_keys(self) -> int:
        return 0 if self.k_codes is None else self.k_codes.shape[2]

    @property
    def n_quant_values(self) -> int:
        return 0 if self.v_codes is None else self.v_codes.shape[2]

    @property
    def n_res_keys(self) -> int:
        return 0 if self.k_res is None else self.k_res.shape[2]

    @property
    def n_res_values(self) -> int:
        return 0 if self.v_res is None else self.v_res.shape[2]


def kivi_split(tokens: int, residual_length: int) -> tuple[int, int, int, int]:
    """``(quantized keys, fp keys, quantized values, fp values)`` that KIVI holds after ``tokens`` tokens.

    >>> kivi_split(300, 128)
    (256, 44, 172, 128)
    """
    if tokens < 0 or residual_length < 1:
        raise ValueError(f"tokens must be >= 0 and residual_length >= 1; got {tokens}, {residual_length}")
    n_k = tokens - tokens % residual_length
    n_v = max(tokens - residual_length, 0)
    return n_k, tokens - n_k, n_v, tokens - n_v


def _quant_bytes(n: int, head_dim: int, bits: int, n_groups: int) -> int:
    return n * head_dim * bits // 8 + n_groups * 2 * SCALE_BYTES


def kivi_nbytes(tokens: int, *, batch: int, kv_heads: int, head_dim: int, num_layers: int, bits: int,
                group_size: int, residual_length: int, dtype_bytes: int) -> int:
    """Bytes a :class:`KIVICache` holds after ``tokens`` tokens (the formula in the module docstring)."""
    n_k, r_k, n_v, r_v = kivi_split(tokens, residual_length)
    per_head = (_quant_bytes(n_k, head_dim, bits, n_k // group_size * head_dim)
                + _quant_bytes(n_v, head_dim, bits, n_v * head_dim // group_size)
                + (r_k + r_v) * head_dim * dtype_bytes)
    return per_head * batch * kv_heads * num_layers


def naive_nbytes(tokens: int, *, batch: int, kv_heads: int, head_dim: int, num_layers: int, bits: int,
                 group_size: int, residual_length: int, dtype_bytes: int) -> int:
    """Bytes a :class:`NaiveQuantCache` holds after ``tokens`` tokens (keys stored like values)."""
    n = max(tokens - residual_length, 0)
    per_head = 2 * (_quant_bytes(n, head_dim, bits, n * head_dim // group_size) + (tokens - n) * head_dim * dtype_bytes)
    return per_head * batch * kv_heads * num_layers


def _cat(old: Tensor | None, new: Tensor) -> Tensor:
    return new if old is None else torch.cat([old, new], dim=2)


class KIVICache(KVCache):
    """KIVI cache: keys per-channel, values per-token, ``bits`` ∈ {2, 4, 8}, group size G, residual R.

    ``quantizer`` computes ``(words, scale, zero)`` (default: the PyTorch :func:`refimpl.quant.quantize_pack`;
    ``kvkernels.kivi_pack.quantize_pack`` is the Triton version with the same results).

    >>> c = KIVICache(num_layers=1, bits=2, group_size=32, residual_length=128)
    >>> kv = c.update(0, torch.randn(1, 2, 300, 64), torch.randn(1, 2, 300, 64))
    >>> tuple(kv.k.shape), c.split(0)
    ((1, 2, 300, 64), (256, 44, 172, 128))
    """

    per_channel_keys = True  # KIVI's key rule; NaiveQuantCache sets False

    def __init__(self, num_layers: int, bits: int = 2, group_size: int = 32, residual_length: int = 128,
                 quantizer: QuantizeFn | None = None):
        super().__init__(num_layers)
        check_quant_args(bits, group_size)
        self._check_residual(residual_length, group_size)
        self.bits, self.group_size, self.residual_length = bits, group_size, residual_length
        self.quantizer: QuantizeFn = quantizer if quantizer is not None else quantize_pack
        self.layers = [KIVILayerState() for _ in range(num_layers)]

    def _check_residual(self, residual_length: int, group_size: int) -> None:
        if not isinstance(residual_length, int) or residual_length < group_size or residual_length % group_size:
            raise ValueError(
                f"residual_length must be a positive multiple of group_size = {group_size} (keys are quantized in "
                f"groups of group_size tokens when the residual fills); got {residual_length!r}"
            )

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(num_layers={self.num_layers}, bits={self.bits}, group_size={self.group_size}, "
                f"residual_length={self.residual_length})")

    # -- the three steps of one update ---------------------------------------------------------------------
    def append(self, layer_idx: int, k: Tensor, v: Tensor, key_mask: Tensor | None = None) -> None:
        """Add new keys/values ``[B, H_kv, T_new, D]`` to the full-precision residuals (nothing is quantized)."""
        self._check_layer(layer_idx)
        _check_kv(k, v, key_mask)
        st = self.layers[layer_idx]
        if k.shape[3] % self.group_size:
            raise ValueError(f"head_dim ({k.shape[3]}) must be a multiple of group_size ({self.group_size}): values "
                             f"are quantized in groups of group_size channels")
        if st.k_res is not None:  # later appends must match the geometry and dtype of the first one
            ref = st.k_res
            if (k.shape[0], k.shape[1], k.shape[3]) != (ref.shape[0], ref.shape[1], ref.shape[3]):
                raise ValueError(f"layer {layer_idx}: new k {tuple(k.shape)} does not match cached [batch, kv_heads, "
                                 f"*, head_dim] = [{ref.shape[0]}, {ref.shape[1]}, *, {ref.shape[3]}]")
            if k.dtype != ref.dtype or v.dtype != ref.dtype:
                raise ValueError(f"layer {layer_idx}: k/v dtype {k.dtype}/{v.dtype} differs from the cached {ref.dtype}")
        prev_t = self._seen[layer_idx]
        self._append_residual(layer_idx, "k", k)
        self._append_residual(layer_idx, "v", v)
        if key_mask is not None or st.mask is not None:
            b = k.shape[0]
            old = st.mask if st.mask is not None else torch.ones(b, prev_t, dtype=torch.bool, device=k.device)
            new = key_mask.to(torch.bool) if key_mask is not None else torch.ones(b, k.shape[2], dtype=torch.bool,
                                                                                  device=k.device)
            st.mask = torch.cat([old, new], dim=1)
        self._seen[layer_idx] += k.shape[2]

    def flush(self, layer_idx: int) -> None:
        """Quantize what overflows the residuals: R-token blocks of keys (per channel), values older than the last R
        (per token)."""
        self._check_layer(layer_idx)
        st = self.layers[layer_idx]
        r, g = self.residual_length, self.group_size
        if st.k_res is not None:
            n = st.k_res.shape[2] - st.k_res.shape[2] % r if self.per_channel_keys else max(st.k_res.shape[2] - r, 0)
            if n:
                quantized = self.quantizer(st.k_res[:, :, :n].contiguous(), self.bits, g,
                                           -2 if self.per_channel_keys else -1)
                self._store_quantized(layer_idx, "k", *quantized)
                self._drop_residual(layer_idx, "k", n)
        if st.v_res is not None:
            n = max(st.v_res.shape[2] - r, 0)
            if n:
                self._store_quantized(layer_idx, "v", *self.quantizer(st.v_res[:, :, :n].contiguous(), self.bits, g, -1))
                self._drop_residual(layer_idx, "v", n)

    # -- storage: three hooks, so that an inference stack can swap concatenation for preallocated buffers --------
    # (benchmarks/bench_kivi.py does); the KIVI rules above never touch tensors directly.
    def _append_residual(self, layer_idx: int, which: str, new: Tensor) -> None:
        """Append ``new`` (``which`` = "k" or "v") after the full-precision residual, along the token dim."""
        st = self.layers[layer_idx]
        setattr(st, f"{which}_res", _cat(getattr(st, f"{which}_res"), new))

    def _drop_residual(self, layer_idx: int, which: str, n: int) -> None:
        """Forget the ``n`` oldest residual entries (they were just quantized); copy so their memory is freed."""
        st = self.layers[layer_idx]
        setattr(st, f"{which}_res", getattr(st, f"{which}_res")[:, :, n:].contiguous())

    def _store_quantized(self, layer_idx: int, which: str, words: Tensor, scale: Tensor, zero: Tensor) -> None:
        """Append freshly quantized entries (``which`` = "k" or "v") after the stored ones, along the token dim."""
        st = self.layers[layer_idx]
        for name, new in (("codes", words), ("scale", scale), ("zero", zero)):
            field = f"{which}_{name}"
            setattr(st, field, _cat(getattr(st, field), new))

    def read(self, layer_idx: int) -> LayerKV:
        """All keys/values of ``layer_idx`` in order: dequantized codes, then the full-precision residual."""
        self._check_layer(layer_idx)
        st = self.layers[layer_idx]
        if st.k_res is None:
            raise IndexError(f"layer {layer_idx} of the cache is empty: nothing was written yet")
        dtype = st.k_res.dtype
        k, v = st.k_res, st.v_res
        if st.k_codes is not None:
            kd = -2 if self.per_channel_keys else -1
            k = torch.cat([unpack_dequantize(st.k_codes, st.k_scale, st.k_zero, self.bits, self.group_size, kd, dtype), k], 2)
        if st.v_codes is not None:
            v = torch.cat([unpack_dequantize(st.v_codes, st.v_scale, st.v_zero, self.bits, self.group_size, -1, dtype), v], 2)
        mask = None if st.mask is None else st.mask[:, None, :].expand(-1, k.shape[1], -1)
        return LayerKV(k, v, mask)

    # -- the KVCache contract --------------------------------------------------------------------------------
    def update(self, layer_idx: int, k: Tensor, v: Tensor, key_mask: Tensor | None = None) -> LayerKV:
        """Append, return what attention sees this step (new entries in full precision), then quantize overflow."""
        self.append(layer_idx, k, v, key_mask)
        out = self.read(layer_idx)
        self.flush(layer_idx)
        return out

    def layer_state(self, layer_idx: int) -> KIVILayerState:
        """The stored tensors of ``layer_idx`` (packed codes, fp16 scales/zeros, fp residuals) for fused kernels."""
        self._check_layer(layer_idx)
        return self.layers[layer_idx]

    def split(self, layer_idx: int = 0) -> tuple[int, int, int, int]:
        """``(quantized keys, fp keys, quantized values, fp values)`` held by ``layer_idx``."""
        st = self.layer_state(layer_idx)
        return st.n_quant_keys, st.n_res_keys, st.n_quant_values, st.n_res_values

    def num_entries(self, layer_idx: int = 0) -> int:
        st = self.layer_state(layer_idx)
        return st.n_quant_keys + st.n_res_keys

    def nbytes(self) -> int:
        """Bytes of every stored tensor: packed codes, fp16 scales and zeros, fp residuals (not the padding mask)."""
        return sum(tensor_bytes(*st.tensors()) for st in self.layers)

    def reset(self) -> None:
        self._seen = [0] * self.num_layers
        self.layers = [KIVILayerState() for _ in range(self.num_layers)]


class NaiveQuantCache(KIVICache):
    """The baseline: keys *and* values quantized per token (groups of G channels), with a FIFO residual of the last
    R tokens for both (R = 0 allowed).  Same bits and bytes as KIVI; only the key grouping differs."""

    per_channel_keys = False

    def __init__(self, num_layers: int, bits: int = 2, group_size: int = 32, residual_length: int = 0,
                 quantizer: QuantizeFn | None = None):
        super().__init__(num_layers, bits, group_size, residual_length, quantizer)

    def _check_residual(self, residual_length: int, group_size: int) -> None:
        if not isinstance(residual_length, int) or residual_length < 0:
            raise ValueError(f"residual_length must be an int >= 0; got {residual_length!r}")
