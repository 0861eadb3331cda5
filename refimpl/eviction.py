"""Shared machinery for token-eviction caches: H2O, SnapKV, StreamingLLM, PyramidKV.

An eviction policy keeps, per layer and per KV head h, a subset S_t(h) of the t tokens seen so far and
attends only to it:

    o_t = Σ_{j ∈ S_t(h)} softmax_j(q_t · k_j / √d) v_j                                   (1)

so the cache holds |S_t| entries instead of t.  Policies differ only in *which* entries they keep:

* StreamingLLM (Xiao et al. 2024, arXiv 2309.17453): the first few tokens ("attention sinks") + a recent window;
* H2O (Zhang et al. 2023, arXiv 2306.14048): the recent window + the "heavy hitters" with the largest
  accumulated attention  score_j = Σ_i A_ij  (eq. (2) below);
* SnapKV (Li et al. 2024, arXiv 2404.14469): once, after the prompt, the top keys voted by the last w queries;
* PyramidKV (Cai et al. 2024, arXiv 2406.02069): SnapKV with a budget that shrinks with depth.

This module holds what they share.

Storage (per layer; the model sees only ``k``, ``v`` and ``key_mask``)::

    k, v    [B, H_kv, N, D]   kept keys (post-RoPE, rotated at their ORIGINAL position) and values, oldest first
    valid   [B, H_kv, N]      False for padding tokens and for holes left when heads keep different counts
    pos     [B, H_kv, N]      int32 index of the entry in the sequence (0 … seen-1; padding slots count)
    score   [B, H_kv, N]      float32 accumulated attention (H2O only)

Entries are stored **per KV head** and never expanded per query head: with grouped-query attention the G query
heads that share a KV head must agree on one kept set, so their scores are reduced over the group
(:func:`group_reduce`; mean by default, as NVIDIA kvpress does).

Eviction **removes** entries (:meth:`EvictionCache.select` gathers the kept ones into new, smaller tensors);
nothing is merely masked, so :meth:`EvictionCache.nbytes` really shrinks.  Because keys are cached after RoPE and
the model takes positions from :meth:`~refimpl.cache.KVCache.seq_length` (tokens *seen*, not entries kept), new
tokens keep their true positions after eviction and no re-rotation is needed.

The attention mass a step gives each key (H2O's per-step update) is

    m_j = R_g ( Σ_{i real query of this step} A^{(g)}_ij ),    A^{(g)} = softmax(q^{(g)} Kᵀ/√d + causal/padding mask)   (2)

with R_g the reduction over the G query heads of a KV head.  Each real query row sums to 1, so before any
eviction Σ_j score_j = number of real queries seen, per head — a known answer the tests check.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .cache import DenseCache, KVCache, LayerKV, tensor_bytes

__all__ = [
    "GQA_REDUCTIONS",
    "EvictionCache",
    "MaskedCache",
    "attention_mass",
    "check_choice",
    "check_int",
    "compact_indices",
    "gather_tokens",
    "group_reduce",
    "visible_positions",
]

GQA_REDUCTIONS = ("mean", "max")


# ---------------------------------------------------------------------------------------------------------
# Argument checks with clear messages
# ---------------------------------------------------------------------------------------------------------
def check_int(name: str, value: object, minimum: int) -> int:
    """Return ``value`` if it is an int ``>= minimum``; otherwise raise ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}; got {value!r}")
    return value


def check_choice(name: str, value: object, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}; got {value!r}")
    return value  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------------------
# Scores
# ---------------------------------------------------------------------------------------------------------
def group_reduce(x: Tensor, num_kv_heads: int, reduce: str = "mean") -> Tensor:
    """Reduce ``x [B, H_q, ...]`` over the G = H_q / H_kv query heads of each KV head → ``[B, H_kv, ...]``.

    Query head h reads KV head ``h // G`` (the layout of ``refimpl.model``), so the group is a contiguous block.
    """
    check_choice("gqa_reduce", reduce, GQA_REDUCTIONS)
    b, h_q = x.shape[:2]
    if h_q % num_kv_heads:
        raise ValueError(f"query heads ({h_q}) must be a multiple of num_kv_heads ({num_kv_heads})")
    xg = x.reshape(b, num_kv_heads, h_q // num_kv_heads, *x.shape[2:])
    return xg.mean(2) if reduce == "mean" else xg.amax(2)


def attention_mass(probs: Tensor, num_kv_heads: int, query_mask: Tensor | None = None,
                   reduce: str = "mean") -> Tensor:
    """Eq. (2): attention each key received from this step's real queries, per KV head, in float32.

    probs:      ``[B, H_q, T_q, T_k]`` softmax probabilities (rows of padding queries are ignored).
    query_mask: ``[B, T_q]`` bool, True for real query tokens; ``None`` = all real.
    Returns ``[B, H_kv, T_k]``.
    """
    if probs.dim() != 4:
        raise ValueError(f"probs must be [batch, q_heads, q_tokens, k_tokens]; got shape {tuple(probs.shape)}")
    p = probs.float()
    if query_mask is not None:
        if tuple(query_mask.shape) != (p.shape[0], p.shape[2]):
            raise ValueError(f"query_mask must be [batch, q_tokens] = {(p.shape[0], p.shape[2])}; "
                             f"got {tuple(query_mask.shape)}")
        p = p * query_mask[:, None, :, None].to(p.dtype)
    return group_reduce(p.sum(2), num_kv_heads, reduce)


# ---------------------------------------------------------------------------------------------------------
# Compaction: move the kept entries of every (batch, head) to the front, in order, and cut the rest
# ---------------------------------------------------------------------------------------------------------
def compact_indices(keep: Tensor) -> tuple[Tensor, Tensor]:
    """For ``keep [B, H, N]`` bool return ``(idx, valid)``, both ``[B, H, N']`` with N' = max kept count.

    ``idx[b, h, :c]`` are the kept positions of (b, h) in increasing order (c = its count); the remaining
    ``N' - c`` slots point at dropped entries and are marked ``valid = False``.

    >>> idx, valid = compact_indices(torch.tensor([[[True, False, True, False]]]))
    >>> idx.tolist(), valid.tolist()
    ([[[0, 2]]], [[[True, True]]])
    """
    counts = keep.sum(-1)
    n = int(counts.max()) if keep.numel() else 0
    # a stable sort of "dropped?" puts kept entries first and keeps their order
    order = torch.sort((~keep).to(torch.uint8), dim=-1, stable=True).indices[..., :n]
    valid = torch.arange(n, device=keep.device) < counts[..., None]
    return order, valid


def gather_tokens(x: Tensor, idx: Tensor) -> Tensor:
    """``x [B, H, N, *rest]`` gathered along tokens at ``idx [B, H, N']`` → ``[B, H, N', *rest]``."""
    index = idx.reshape(*idx.shape, *([1] * (x.dim() - 3))).expand(*idx.shape, *x.shape[3:])
    return torch.gather(x, 2, index)


# ---------------------------------------------------------------------------------------------------------
# The cache
# ---------------------------------------------------------------------------------------------------------
class EvictionCache(KVCache):
    """Per-KV-head storage with real removal.  Subclasses decide *what* to keep via :meth:`select`.

    Hooks for subclasses: :meth:`_before_append` (make room before a step — StreamingLLM),
    :meth:`_after_append` (trim what is stored after the step's entries were handed to attention), and
    :meth:`~refimpl.cache.KVCache.observe` (attention-scored policies).
    """

    tracks_scores = False  # True → keep an accumulated-attention score per entry (H2O)

    def __init__(self, num_layers: int):
        super().__init__(num_layers)
        n = num_layers
        self.k: list[Tensor | None] = [None] * n
        self.v: list[Tensor | None] = [None] * n
        self.valid: list[Tensor | None] = [None] * n
        self.pos: list[Tensor | None] = [None] * n
        self.score: list[Tensor | None] = [None] * n
        self.query_mask: list[Tensor | None] = [None] * n  # [B, T_new] of the last step (None = all real)

    # -- the contract ----------------------------------------------------------------------------
    def update(self, layer_idx: int, k: Tensor, v: Tensor, key_mask: Tensor | None = None) -> LayerKV:
        self._check_layer(layer_idx)
        _check_new(self.k[layer_idx], k, v, key_mask, layer_idx)
        b, h, t, _ = k.shape
        if self.k[layer_idx] is not None:
            self._before_append(layer_idx, t)
        seen = self._seen[layer_idx]
        new_valid = (torch.ones(b, h, t, dtype=torch.bool, device=k.device) if key_mask is None
                     else key_mask.to(torch.bool)[:, None, :].expand(b, h, t))
        new_pos = torch.arange(seen, seen + t, dtype=torch.int32, device=k.device).expand(b, h, t)
        new_score = torch.zeros(b, h, t, dtype=torch.float32, device=k.device) if self.tracks_scores else None
        self.k[layer_idx] = _cat(self.k[layer_idx], k)
        self.v[layer_idx] = _cat(self.v[layer_idx], v)
        self.valid[layer_idx] = _cat(self.valid[layer_idx], new_valid)
        self.pos[layer_idx] = _cat(self.pos[layer_idx], new_pos)
        self.score[layer_idx] = _cat(self.score[layer_idx], new_score)
        self.query_mask[layer_idx] = None if key_mask is None else key_mask.to(torch.bool)
        self._seen[layer_idx] = seen + t
        out = self.read(layer_idx)  # what attention sees this step: every kept entry + the new ones, last
        self._after_append(layer_idx)
        return out

    def read(self, layer_idx: int) -> LayerKV:
        """The kept keys/values of ``layer_idx`` with their validity mask (``None`` when all are valid)."""
        self._check_layer(layer_idx)
        if self.k[layer_idx] is None:
            raise IndexError(f"layer {layer_idx} of the cache is empty: nothing was written yet")
        valid = self.valid[layer_idx]
        return LayerKV(self.k[layer_idx], self.v[layer_idx], None if bool(valid.all()) else valid)

    def num_entries(self, layer_idx: int = 0) -> int:
        """Token slots held for ``layer_idx`` (the N of ``[B, H_kv, N, D]``; holes from padding included)."""
        self._check_layer(layer_idx)
        k = self.k[layer_idx]
        return 0 if k is None else k.shape[2]

    def num_valid(self, layer_idx: int = 0) -> Tensor:
        """``[B, H_kv]`` number of real (non-padding, non-hole) entries kept per sequence and KV head."""
        self._check_layer(layer_idx)
        if self.valid[layer_idx] is None:
            raise IndexError(f"layer {layer_idx} of the cache is empty: nothing was written yet")
        return self.valid[layer_idx].sum(-1)

    def kept_positions(self, layer_idx: int = 0) -> Tensor:
        """``[B, H_kv, N]`` sequence positions of the kept entries, ``-1`` for invalid slots."""
        self._check_layer(layer_idx)
        if self.pos[layer_idx] is None:
            raise IndexError(f"layer {layer_idx} of the cache is empty: nothing was written yet")
        return self.pos[layer_idx].masked_fill(~self.valid[layer_idx], -1)

    def nbytes(self) -> int:
        """Bytes of the kept keys and values (comparable with :meth:`refimpl.cache.DenseCache.nbytes`)."""
        return sum(tensor_bytes(k, v) for k, v in zip(self.k, self.v))

    def metadata_nbytes(self) -> int:
        """Bytes of the bookkeeping tensors (validity, positions, scores) — reported separately, not hidden."""
        return sum(tensor_bytes(*t) for t in zip(self.valid, self.pos, self.score))

    def reset(self) -> None:
        self.__init__(**self._init_kwargs())

    # -- eviction primitive ----------------------------------------------------------------------
    def select(self, layer_idx: int, keep: Tensor) -> None:
        """Keep the entries of ``layer_idx`` where ``keep [B, H_kv, N]`` is True (and valid); drop the rest.

        The kept entries stay in sequence order; every tensor of the layer is rebuilt at the new, smaller size.
        """
        self._check_layer(layer_idx)
        valid = self.valid[layer_idx]
        if valid is None:
            raise IndexError(f"layer {layer_idx} of the cache is empty: nothing was written yet")
        if keep.shape != valid.shape or keep.dtype != torch.bool:
            raise ValueError(f"keep must be a bool tensor of shape {tuple(valid.shape)}; got "
                             f"{keep.dtype} {tuple(keep.shape)}")
        idx, new_valid = compact_indices(keep & valid)
        self.k[layer_idx] = gather_tokens(self.k[layer_idx], idx)
        self.v[layer_idx] = gather_tokens(self.v[layer_idx], idx)
        self.pos[layer_idx] = gather_tokens(self.pos[layer_idx], idx)
        if self.score[layer_idx] is not None:
            self.score[layer_idx] = gather_tokens(self.score[layer_idx], idx)
        self.valid[layer_idx] = new_valid

    # -- hooks -----------------------------------------------------------------------------------
    def _before_append(self, layer_idx: int, num_new: int) -> None:
        """Called before ``num_new`` entries are appended to a non-empty layer."""

    def _after_append(self, layer_idx: int) -> None:
        """Called after the step's entries were appended and handed to attention."""

    def _init_kwargs(self) -> dict:
        return {"num_layers": self.num_layers}

    def _check_probs(self, layer_idx: int, probs: Tensor) -> None:
        k = self.k[layer_idx]
        if k is None:
            raise IndexError(f"observe({layer_idx}) before update({layer_idx}): nothing is stored for that layer")
        b, h_kv, n, _ = k.shape
        if probs.dim() != 4 or probs.shape[0] != b or probs.shape[3] != n or probs.shape[1] % h_kv:
            raise ValueError(f"probs must be [batch={b}, q_heads (multiple of {h_kv}), q_tokens, k_tokens={n}]; "
                             f"got {tuple(probs.shape)}")


class MaskedCache(KVCache):
    """*Simulated* eviction: keep every entry and hide the ones a policy would have dropped.

    This is how the H2O paper's accuracy experiments were run (``h2o_hf/utils_hh``: a mask, no memory saved).
    Attention over the visible entries equals attention over a really compacted cache — which makes this the
    oracle the tests hold every policy to — but :meth:`nbytes` stays the full cache's.

    Set ``hide(layer, visible)`` with ``visible [B, H_kv, seen]`` bool before a step; entries appended in the
    step are always visible.
    """

    def __init__(self, num_layers: int):
        super().__init__(num_layers)
        self.dense = DenseCache(num_layers)
        self.visible: list[Tensor | None] = [None] * num_layers

    def hide(self, layer_idx: int, visible: Tensor) -> None:
        self._check_layer(layer_idx)
        if visible.dim() != 3 or visible.shape[-1] != self._seen[layer_idx] or visible.dtype != torch.bool:
            raise ValueError(f"visible must be a bool [batch, kv_heads, seen={self._seen[layer_idx]}] tensor; got "
                             f"{visible.dtype} {tuple(visible.shape)}")
        self.visible[layer_idx] = visible

    def update(self, layer_idx: int, k: Tensor, v: Tensor, key_mask: Tensor | None = None) -> LayerKV:
        kv = self.dense.update(layer_idx, k, v, key_mask)
        self._seen[layer_idx] += k.shape[2]
        b, h, t = kv.k.shape[:3]
        mask = (torch.ones(b, h, t, dtype=torch.bool, device=k.device) if kv.key_mask is None
                else kv.key_mask.clone())
        vis = self.visible[layer_idx]
        if vis is not None:
            mask[..., : vis.shape[-1]] &= vis
        return LayerKV(kv.k, kv.v, mask)

    def num_entries(self, layer_idx: int = 0) -> int:
        return self.dense.num_entries(layer_idx)

    def nbytes(self) -> int:
        return self.dense.nbytes()

    def reset(self) -> None:
        self.__init__(self.num_layers)


def visible_positions(cache: EvictionCache, layer_idx: int) -> Tensor:
    """``[B, H_kv, seen]`` bool: which positions ``cache`` still holds for ``layer_idx`` (for :class:`MaskedCache`)."""
    pos = cache.kept_positions(layer_idx).long()
    b, h, _ = pos.shape
    seen = cache.seq_length(layer_idx)
    vis = torch.zeros(b, h, seen + 1, dtype=torch.bool, device=pos.device)
    vis.scatter_(-1, pos.masked_fill(pos < 0, seen), True)  # invalid slots land in the extra column
    return vis[..., :seen]


def _cat(old: Tensor | None, new: Tensor | None) -> Tensor | None:
    if new is None:
        return None
    return new if old is None else torch.cat([old, new], dim=2)


def _check_kv_shape(k: Tensor, v: Tensor, key_mask: Tensor | None) -> None:
    if k.dim() != 4 or v.dim() != 4 or k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k and v must be [batch, kv_heads, tokens, head_dim] and agree on the first three; "
                         f"got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if key_mask is not None and tuple(key_mask.shape) != (k.shape[0], k.shape[2]):
        raise ValueError(f"key_mask must be [batch, new_tokens] = {(k.shape[0], k.shape[2])}; "
                         f"got {tuple(key_mask.shape)}")


def _check_new(old_k: Tensor | None, k: Tensor, v: Tensor, key_mask: Tensor | None, layer_idx: int) -> None:
    _check_kv_shape(k, v, key_mask)
    if old_k is not None and (old_k.shape[0], old_k.shape[1], old_k.shape[3]) != (k.shape[0], k.shape[1], k.shape[3]):
        raise ValueError(f"layer {layer_idx}: new k {tuple(k.shape)} does not match cached "
                         f"[batch, kv_heads, *, head_dim] {tuple(old_k.shape)}")
