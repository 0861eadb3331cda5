"""H2O — Heavy-Hitter Oracle (Zhang et al., NeurIPS 2023, arXiv 2306.14048; code FMInference/H2O).

Observation: the attention a token *receives*, accumulated over all queries so far,

    score_t(j) = Σ_{i ≤ t} A_ij ,                                                        (1)

follows a power law — a few "heavy hitters" collect most of it.  H2O keeps, per head, a budget of

    k = heavy + recent

entries: the ``recent`` most recent tokens, plus the ``heavy`` older tokens with the largest accumulated score
(1); everything else is evicted together with its score.  The paper's Algorithm 1 is the greedy step
``S_t = (S_{t-1} ∪ {t}) \\ {argmin_{j ∈ S_{t-1} ∪ {t}} score_t(j)}`` (one eviction per decoding step), framed as
dynamic submodular maximisation; the real-drop code (``h2o_hf/utils_real_drop/modify_llama.py``) keeps the
recent window explicitly and takes the top-``heavy`` of the rest, which is what we implement.

Scores are accumulated over the prompt (every prefill row) *and* every decoding step (eq. (1)), after each
step's attention, so the new tokens' own scores include the attention they received within that step.  The
prompt is attended in full and evicted right after it (as in the real-drop code), so the budget bounds the cache
during decoding, not prefill's peak.

Differences from the official code, on purpose:

* per **KV head** with GQA: the G query heads of a KV head must share one kept set, so their scores are averaged
  (``gqa_reduce="mean"``, NVIDIA kvpress's choice) or maxed (``"max"``); the official code assumes MHA;
* **batch > 1** with left padding: padding keys are never kept, padding query rows add no score (the official
  code sums scores over the batch and assumes batch size 1);
* the budget is in tokens (``heavy_budget``, ``recent_budget``); the paper's ratios are
  ``heavy = heavy_ratio · prompt_len`` etc. (README: 0.1 + 0.1 = a 20% cache).

Known answers (tests): a budget ≥ the sequence length reproduces full attention exactly; ``heavy_budget=0`` is a
sliding window of ``recent_budget`` tokens; before any eviction Σ_j score(j) = number of real queries seen.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .attention import check_decode_inputs, valid_key_mask
from .eviction import GQA_REDUCTIONS, EvictionCache, attention_mass, check_choice, check_int, group_reduce

__all__ = ["H2OCache", "decode_attention_with_mass", "h2o_keep_mask"]


def h2o_keep_mask(score: Tensor, pos: Tensor, valid: Tensor, seen: int, heavy_budget: int,
                  recent_budget: int) -> Tensor:
    """Which entries H2O keeps: the recent window plus the top-``heavy_budget`` older entries by ``score``.

    score, pos, valid: ``[..., N]`` accumulated attention, sequence position and validity of the stored entries.
    seen:              tokens consumed so far; an entry is *recent* if ``pos >= seen - recent_budget``.
    Returns a bool ``[..., N]`` mask (only valid entries are ever kept).
    """
    recent = valid & (pos >= seen - recent_budget)
    candidates = valid & ~recent
    keep = recent
    if heavy_budget > 0 and bool(candidates.any()):
        masked = score.float().masked_fill(~candidates, -math.inf)
        top = masked.topk(min(heavy_budget, score.shape[-1]), dim=-1).indices
        heavy = torch.zeros_like(valid).scatter(-1, top, True) & candidates
        keep = keep | heavy
    return keep


class H2OCache(EvictionCache):
    """Heavy hitters + recent window, per layer and per KV head.

    >>> c = H2OCache(num_layers=1, heavy_budget=2, recent_budget=2)
    >>> _ = c.update(0, torch.zeros(1, 1, 6, 4), torch.zeros(1, 1, 6, 4))
    >>> c.observe(0, torch.full((1, 1, 6, 6), 1 / 6))
    >>> c.num_entries(0), c.seq_length(0)
    (4, 6)
    """

    tracks_scores = True

    def __init__(self, num_layers: int, heavy_budget: int, recent_budget: int, gqa_reduce: str = "mean"):
        super().__init__(num_layers)
        self.heavy_budget = check_int("heavy_budget", heavy_budget, 0)
        self.recent_budget = check_int("recent_budget", recent_budget, 0)
        if heavy_budget + recent_budget < 1:
            raise ValueError(f"heavy_budget + recent_budget must be >= 1 (the cache must keep something); "
                             f"got {heavy_budget} + {recent_budget}")
        self.gqa_reduce = check_choice("gqa_reduce", gqa_reduce, GQA_REDUCTIONS)

    @property
    def budget(self) -> int:
        return self.heavy_budget + self.recent_budget

    def needs_attention(self, layer_idx: int) -> bool:
        return True

    def observe(self, layer_idx: int, attn_probs: Tensor) -> None:
        """Accumulate this step's attention (eq. 1) into the scores, then evict down to the budget."""
        self._check_layer(layer_idx)
        self._check_probs(layer_idx, attn_probs)
        h_kv = self.k[layer_idx].shape[1]
        qmask = self.query_mask[layer_idx]
        if qmask is not None and qmask.shape[1] != attn_probs.shape[2]:
            raise ValueError(f"probs cover {attn_probs.shape[2]} query tokens but the last update() of layer "
                             f"{layer_idx} added {qmask.shape[1]}")
        mass = attention_mass(attn_probs, h_kv, qmask, self.gqa_reduce)
        valid = self.valid[layer_idx]
        self.score[layer_idx] = self.score[layer_idx] + mass.masked_fill(~valid, 0.0)
        if self.num_entries(layer_idx) > self.budget:
            keep = h2o_keep_mask(self.score[layer_idx], self.pos[layer_idx], valid, self._seen[layer_idx],
                                 self.heavy_budget, self.recent_budget)
            self.select(layer_idx, keep)

    def _init_kwargs(self) -> dict:
        return {"num_layers": self.num_layers, "heavy_budget": self.heavy_budget,
                "recent_budget": self.recent_budget, "gqa_reduce": self.gqa_reduce}


def decode_attention_with_mass(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None = None,
                               scale: float | None = None, gqa_reduce: str = "mean") -> tuple[Tensor, Tensor]:
    """One decoding step of attention that also returns each key's attention mass (H2O's per-step update).

    q: ``[B, H_q, D]`` (one new query per head); k, v: ``[B, H_kv, N, D]``; key_mask ``[B, N]`` or
    ``[B, H_kv, N]`` bool (True = may attend).  Returns ``o [B, H_q, D]`` (dtype of q) and
    ``mass [B, H_kv, N]`` float32 = R_g softmax(scale · q kᵀ) (eq. (2) of :mod:`refimpl.eviction` for one query).

    This is the PyTorch reference of ``kvkernels.decode_attention_mass``; it builds the probabilities
    explicitly in fp32, the kernel does not.
    """
    b, h_q, h_kv, n, d = check_decode_inputs(q, k, v, key_mask, None, scale)
    check_choice("gqa_reduce", gqa_reduce, GQA_REDUCTIONS)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    qg = q.float().view(b, h_kv, h_q // h_kv, d)
    s = torch.einsum("bkgd,bknd->bkgn", qg, k.float()) * scale
    valid = valid_key_mask(b, h_kv, n, key_mask, None, q.device)
    if valid is not None:
        s = s.masked_fill(~valid[:, :, None, :], -math.inf)
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # a head with no valid key gives zeros, not NaN
    o = torch.einsum("bkgn,bknd->bkgd", p, v.float()).reshape(b, h_q, d).to(q.dtype)
    return o, group_reduce(p.reshape(b, h_q, n), h_kv, gqa_reduce)
