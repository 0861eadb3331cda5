"""One KV-cache interface for every technique in the course, and the dense baseline.

During autoregressive decoding a transformer layer computes, for every new token t,

    k_t = RoPE(W_K x_t, t),   v_t = W_V x_t                         (Vaswani et al. 2017; Su et al. 2021)

and attends from the new query to *all* previous keys and values.  A KV cache stores k_{1..t}, v_{1..t}
so they are not recomputed.  Its size per sequence is

    bytes = 2 (K and V) * n_layers * n_kv_heads * head_dim * T * bytes_per_element,

and every technique in the course shrinks one factor of that product.  They plug in here:

* **fewer KV heads** (GQA, low-rank) change ``n_kv_heads`` in the model config; the cache is unchanged;
* **quantized storage** (KIVI) overrides how ``update`` stores and reads tensors and how ``nbytes`` counts;
* **eviction** (H2O, SnapKV, StreamingLLM, PyramidKV) drops entries in ``update`` or ``observe``;
* **cross-layer sharing** (LC-KV, CLA) is a model-level map ``layer -> cache layer``; the cache only
  holds the layers that compute KV.

Contract (``KVCache``), per layer ``i``:

``update(i, k, v, key_mask)``
    Append the new keys/values ``[B, H_kv, T_new, D]`` (post-RoPE) and return a :class:`LayerKV` with
    everything attention should see *this step*, the new entries last and in order.  ``key_mask``
    ``[B, T_new]`` marks real tokens (False = padding).
``needs_attention(i)`` / ``observe(i, probs)``
    Policies that score tokens by attention (H2O, SnapKV) return True; the model then computes explicit
    probabilities ``[B, H_q, T_q, T_k]`` for that layer and hands them over after attention.  Eviction
    happens there, *after* the step's attention was computed with every entry.
``seq_length()``
    Number of positions consumed so far (not the number of entries kept).
``nbytes()``
    Bytes of the tensors the cache holds, measured from the tensors themselves.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["DenseCache", "KVCache", "LayerKV", "tensor_bytes"]


def tensor_bytes(*tensors: Tensor | None) -> int:
    """Bytes held by ``tensors`` (``None`` counts 0): ``numel * element_size`` of each."""
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


@dataclass
class LayerKV:
    """What attention reads for one layer in one step.

    k, v:      ``[B, H_kv, T_k, D]`` keys (already rotated) and values, in the compute dtype.
    key_mask:  ``[B, H_kv, T_k]`` bool, True where the entry may be attended to; ``None`` = all valid.
    """

    k: Tensor
    v: Tensor
    key_mask: Tensor | None = None


def _check_kv(k: Tensor, v: Tensor, key_mask: Tensor | None) -> None:
    if k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"k and v must be [batch, kv_heads, tokens, head_dim]; got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k and v must agree on batch, kv_heads and tokens; got {tuple(k.shape)} and {tuple(v.shape)}")
    if key_mask is not None and tuple(key_mask.shape) != (k.shape[0], k.shape[2]):
        raise ValueError(
            f"key_mask must be [batch, new_tokens] = {(k.shape[0], k.shape[2])}; got {tuple(key_mask.shape)}"
        )


class KVCache:
    """Base class: per-layer storage of keys, values and the key-validity mask.

    Subclasses override :meth:`update` (how entries are stored and read back), :meth:`nbytes`, and
    optionally :meth:`needs_attention` / :meth:`observe` (attention-scored eviction).
    """

    def __init__(self, num_layers: int):
        if not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"num_layers must be a positive int; got {num_layers!r}")
        self.num_layers = num_layers
        self._seen = [0] * num_layers

    # -- bookkeeping shared by all policies ------------------------------------------------------
    def _check_layer(self, layer_idx: int) -> None:
        if not 0 <= layer_idx < self.num_layers:
            raise IndexError(f"layer_idx must be in [0, {self.num_layers - 1}]; got {layer_idx}")

    def seq_length(self, layer_idx: int = 0) -> int:
        """Positions consumed by ``layer_idx`` so far (tokens seen, whether or not they are still kept)."""
        self._check_layer(layer_idx)
        return self._seen[layer_idx]

    # -- the contract ----------------------------------------------------------------------------
    def update(self, layer_idx: int, k: Tensor, v: Tensor, key_mask: Tensor | None = None) -> LayerKV:
        raise NotImplementedError

    def needs_attention(self, layer_idx: int) -> bool:
        """True if this policy wants the step's attention probabilities for ``layer_idx``."""
        return False

    def observe(self, layer_idx: int, attn_probs: Tensor) -> None:
        """Receive ``[B, H_q, T_q, T_k]`` attention probabilities of the step just computed."""

    def nbytes(self) -> int:
        raise NotImplementedError

    def num_entries(self, layer_idx: int = 0) -> int:
        """Entries (tokens) currently stored for ``layer_idx`` (≤ :meth:`seq_length` for eviction)."""
        raise NotImplementedError

    def reset(self) -> None:
        raise NotImplementedError


class DenseCache(KVCache):
    """The full-precision baseline: keep every key and value, grow by concatenation.

    >>> c = DenseCache(num_layers=1)
    >>> kv = c.update(0, torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4))
    >>> tuple(kv.k.shape), c.nbytes()
    ((1, 2, 3, 4), 192)
    """

    def __init__(self, num_layers: int):
        super().__init__(num_layers)
        self.k: list[Tensor | None] = [None] * num_layers
        self.v: list[Tensor | None] = [None] * num_layers
        self.mask: list[Tensor | None] = [None] * num_layers  # [B, T] bool; None while all valid

    def update(self, layer_idx: int, k: Tensor, v: Tensor, key_mask: Tensor | None = None) -> LayerKV:
        self._check_layer(layer_idx)
        _check_kv(k, v, key_mask)
        old_k = self.k[layer_idx]
        if old_k is not None and (old_k.shape[0], old_k.shape[1], old_k.shape[3]) != (k.shape[0], k.shape[1], k.shape[3]):
            raise ValueError(
                f"layer {layer_idx}: new k {tuple(k.shape)} does not match cached [batch, kv_heads, *, head_dim] "
                f"{tuple(old_k.shape)}"
            )
        prev_t = 0 if old_k is None else old_k.shape[2]
        self.k[layer_idx] = k if old_k is None else torch.cat([old_k, k], dim=2)
        self.v[layer_idx] = v if old_k is None else torch.cat([self.v[layer_idx], v], dim=2)
        old_m = self.mask[layer_idx]
        if key_mask is not None or old_m is not None:
            bsz = k.shape[0]
            if old_m is None:
                old_m = torch.ones(bsz, prev_t, dtype=torch.bool, device=k.device)
            if key_mask is None:
                key_mask = torch.ones(bsz, k.shape[2], dtype=torch.bool, device=k.device)
            self.mask[layer_idx] = torch.cat([old_m, key_mask.to(torch.bool)], dim=1)
        self._seen[layer_idx] += k.shape[2]
        m = self.mask[layer_idx]
        hk = k.shape[1]
        full_mask = None if m is None else m[:, None, :].expand(-1, hk, -1)
        return LayerKV(self.k[layer_idx], self.v[layer_idx], full_mask)

    def read(self, layer_idx: int) -> LayerKV:
        """Everything stored for ``layer_idx`` without appending (errors if nothing was written)."""
        self._check_layer(layer_idx)
        if self.k[layer_idx] is None:
            raise IndexError(f"layer {layer_idx} of the cache is empty: nothing was written yet")
        m = self.mask[layer_idx]
        hk = self.k[layer_idx].shape[1]
        return LayerKV(self.k[layer_idx], self.v[layer_idx], None if m is None else m[:, None, :].expand(-1, hk, -1))

    def get(self, layer_idx: int, start: int, stop: int) -> tuple[Tensor, Tensor]:
        """Keys and values of positions ``[start, stop)``; reading past what was written is an error."""
        self._check_layer(layer_idx)
        n = self.num_entries(layer_idx)
        if not (0 <= start <= stop <= n):
            raise IndexError(f"requested positions [{start}, {stop}) but layer {layer_idx} holds {n} entries")
        return self.k[layer_idx][:, :, start:stop], self.v[layer_idx][:, :, start:stop]

    def num_entries(self, layer_idx: int = 0) -> int:
        self._check_layer(layer_idx)
        k = self.k[layer_idx]
        return 0 if k is None else k.shape[2]

    def nbytes(self) -> int:
        return sum(tensor_bytes(k, v) for k, v in zip(self.k, self.v))

    def reset(self) -> None:
        self.__init__(self.num_layers)
