"""SnapKV — "LLM knows what you are looking for before generation" (Li et al., NeurIPS 2024, arXiv 2404.14469;
code FasterDecoding/SnapKV, ``snapkv/monkeypatch/snapkv_utils.py`` ``SnapKVCluster.update_kv``).

Observation: the last few prompt tokens (usually the question/instruction) attend to nearly the same prompt
positions that generation will attend to.  So, **once, at the end of the prompt** (T tokens), SnapKV

1. takes the *observation window* — the last w queries — and their attention over all T keys, causal inside the
   window:  A = softmax(Q_{T-w:T} Kᵀ / √d + M_causal),  A ∈ R^{w×T};                         (1)
2. votes for each prefix key j < T - w:  vote_j = Σ_{i in window} A_ij;                              (2)
3. clusters the votes with a 1-D pooling of width ``kernel_size`` (stride 1, padding kernel_size // 2) so that
   neighbours of an important token survive with it:  pooled = pool(vote);                       (3)
4. keeps, per head, the top ``capacity - w`` prefix keys by ``pooled`` plus the w window tokens themselves.   (4)

Decoding then appends to the compressed cache as usual (it grows by one entry per step; no further eviction).
Positions continue from T because keys are cached after RoPE and the model counts tokens seen, not kept.

Settings: the official ``init_snapkv`` defaults are window 32 / kernel 5 / avgpool, the LongBench configs
window 32 / kernel 7 / maxpool (``experiments/LongBench/config/*_w32_k7_maxpool.json``); we default to the latter.
If T ≤ ``capacity`` nothing is evicted.

GQA: the official code expands K/V to query heads *before* compressing (``repeat_kv``), which stores the cache
G times larger.  We pool each query head's votes (as the official code does per head), then reduce over the G
heads of each KV head (mean by default, as NVIDIA kvpress does) and keep one set per KV head.

Batch > 1 with left padding: padding keys are never kept, padding query rows do not vote, and a sequence with
at most ``capacity`` real tokens keeps all of them.

``window_votes`` (eqs. 1–2 from queries and keys) is the PyTorch reference of ``kvkernels.snapkv_score``;
the cache itself gets the window's probabilities from the model through ``observe``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .eviction import GQA_REDUCTIONS, EvictionCache, check_choice, check_int, group_reduce

__all__ = ["POOLINGS", "SnapKVCache", "pool_votes", "snapkv_keep_mask", "votes_from_probs", "window_votes"]

POOLINGS = ("maxpool", "avgpool", "none")


def window_votes(q_window: Tensor, k: Tensor, key_mask: Tensor | None = None,
                 scale: float | None = None) -> Tensor:
    """Eqs. (1)–(2) from the window's queries: ``[B, H_q, T - w]`` float32 votes for the prefix keys.

    q_window: ``[B, H_q, w, D]`` the last w queries (post-RoPE), query i sits at position T - w + i.
    k:        ``[B, H_kv, T, D]`` all T keys; key_mask ``[B, T]`` or ``[B, H_kv, T]`` bool (False = padding).
    """
    if q_window.dim() != 4 or k.dim() != 4 or q_window.shape[0] != k.shape[0] or q_window.shape[3] != k.shape[3]:
        raise ValueError(f"expected q_window [B, H_q, w, D] and k [B, H_kv, T, D]; got {tuple(q_window.shape)} "
                         f"and {tuple(k.shape)}")
    b, h_q, w, d = q_window.shape
    h_kv, t = k.shape[1], k.shape[2]
    if h_q % h_kv:
        raise ValueError(f"query heads ({h_q}) must be a multiple of kv heads ({h_kv})")
    if not 1 <= w < t:
        raise ValueError(f"the window (w={w}) must be shorter than the sequence (T={t}) and non-empty")
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    qg = q_window.float().view(b, h_kv, h_q // h_kv, w, d)
    s = torch.einsum("bkgid,bkjd->bkgij", qg, k.float()) * scale
    q_pos = torch.arange(t - w, t, device=k.device)[:, None]
    allowed = torch.arange(t, device=k.device)[None, :] <= q_pos  # [w, T] causal
    allowed = allowed[None, None, None]
    if key_mask is not None:
        km = key_mask if key_mask.dim() == 3 else key_mask[:, None, :]
        allowed = allowed & km.to(torch.bool)[:, :, None, None, :]
    p = torch.softmax(s.masked_fill(~allowed, -math.inf), dim=-1).nan_to_num(0.0)
    return p[..., : t - w].sum(3).reshape(b, h_q, t - w)


def votes_from_probs(window_probs: Tensor, query_mask: Tensor | None = None) -> Tensor:
    """Eq. (2) from the model's probabilities of the window rows ``[B, H_q, w, T]`` → ``[B, H_q, T - w]``.

    query_mask ``[B, w]`` (False = padding query) removes padding rows from the vote.
    """
    p = window_probs.float()
    w, t = p.shape[2], p.shape[3]
    if query_mask is not None:
        p = p * query_mask[:, None, :, None].to(p.dtype)
    return p[..., : t - w].sum(2)


def pool_votes(votes: Tensor, kernel_size: int, pooling: str = "maxpool") -> Tensor:
    """Eq. (3): 1-D pooling along tokens, stride 1, padding ``kernel_size // 2`` (same length for odd sizes)."""
    check_choice("pooling", pooling, POOLINGS)
    if pooling == "none" or kernel_size == 1:
        return votes
    shape = votes.shape
    x = votes.reshape(-1, 1, shape[-1])
    if pooling == "avgpool":
        x = F.avg_pool1d(x, kernel_size, stride=1, padding=kernel_size // 2)
    else:
        x = F.max_pool1d(x, kernel_size, stride=1, padding=kernel_size // 2)
    return x.reshape(shape)


def snapkv_keep_mask(votes: Tensor, valid: Tensor, capacity: int, window: int, kernel_size: int = 7,
                     pooling: str = "maxpool", gqa_reduce: str = "mean") -> Tensor:
    """Eqs. (3)–(4): which of the T entries each KV head keeps.

    votes: ``[B, H_q, T - w]`` per-query-head votes for the prefix; valid: ``[B, H_kv, T]``.
    Returns a bool ``[B, H_kv, T]``: the top ``capacity - window`` pooled prefix keys plus the last ``window``.
    """
    _, h_kv, t = valid.shape
    if votes.shape[-1] != t - window:
        raise ValueError(f"votes cover {votes.shape[-1]} prefix tokens; expected T - window = {t - window}")
    pooled = group_reduce(pool_votes(votes.float(), kernel_size, pooling), h_kv, gqa_reduce)
    prefix_valid = valid[..., : t - window]
    pooled = pooled.masked_fill(~prefix_valid, -math.inf)
    n_select = min(capacity - window, t - window)
    top = pooled.topk(n_select, dim=-1).indices
    keep_prefix = torch.zeros_like(prefix_valid).scatter(-1, top, True) & prefix_valid
    return torch.cat([keep_prefix, valid[..., t - window:]], dim=-1)


class SnapKVCache(EvictionCache):
    """Compress the prompt once to ``capacity`` entries per KV head (``window`` of them the observation window).

    >>> c = SnapKVCache(num_layers=1, capacity=4, window=2, kernel_size=1)
    >>> _ = c.update(0, torch.zeros(1, 1, 8, 4), torch.zeros(1, 1, 8, 4))
    >>> c.observe(0, torch.full((1, 1, 8, 8), 1 / 8))
    >>> c.num_entries(0), c.seq_length(0)
    (4, 8)
    """

    def __init__(self, num_layers: int, capacity: int, window: int = 32, kernel_size: int = 7,
                 pooling: str = "maxpool", gqa_reduce: str = "mean"):
        super().__init__(num_layers)
        self.window = check_int("window", window, 1)
        self.capacity = check_int("capacity", capacity, 2)
        if capacity <= window:
            raise ValueError(f"capacity must be > window (it includes the {window} window tokens); got capacity="
                             f"{capacity}, window={window}")
        self.kernel_size = check_int("kernel_size", kernel_size, 1)
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd so that pooling keeps the length; got {kernel_size}")
        self.pooling = check_choice("pooling", pooling, POOLINGS)
        self.gqa_reduce = check_choice("gqa_reduce", gqa_reduce, GQA_REDUCTIONS)
        self.compressed = [False] * num_layers  # True once the prompt step of that layer was observed

    def capacity_for(self, layer_idx: int, prompt_len: int) -> int:
        """Entries ``layer_idx`` keeps after a prompt of ``prompt_len`` tokens (PyramidKV overrides this)."""
        return self.capacity

    def needs_attention(self, layer_idx: int) -> bool:
        return not self.compressed[layer_idx]  # only the prompt step; decoding runs without probabilities

    def observe(self, layer_idx: int, attn_probs: Tensor) -> None:
        self._check_layer(layer_idx)
        if self.compressed[layer_idx]:
            return
        self._check_probs(layer_idx, attn_probs)
        self.compressed[layer_idx] = True
        t = self.num_entries(layer_idx)
        cap = self.capacity_for(layer_idx, t)
        if t <= cap:
            return
        t_q = attn_probs.shape[2]
        if t_q < self.window:
            raise ValueError(f"the prompt step has {t_q} queries, fewer than window={self.window}, but {t} "
                             f"entries exceed capacity={cap}: SnapKV compresses at the end of the prompt step")
        qmask = self.query_mask[layer_idx]
        votes = votes_from_probs(attn_probs[:, :, -self.window:],
                                 None if qmask is None else qmask[:, -self.window:])
        keep = snapkv_keep_mask(votes, self.valid[layer_idx], cap, self.window, self.kernel_size, self.pooling,
                                self.gqa_reduce)
        self.select(layer_idx, keep)

    def _init_kwargs(self) -> dict:
        return {"num_layers": self.num_layers, "capacity": self.capacity, "window": self.window,
                "kernel_size": self.kernel_size, "pooling": self.pooling, "gqa_reduce": self.gqa_reduce}
