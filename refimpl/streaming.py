"""StreamingLLM — attention sinks + a recent window (Xiao et al., ICLR 2024, arXiv 2309.17453;
code mit-han-lab/streaming-llm, ``streaming_llm/kv_cache.py`` ``StartRecentKVCache``).

Observation: softmax must put its mass somewhere, and LLMs park the surplus on the first few tokens whatever
they say — the *attention sinks*.  A plain sliding window evicts them and perplexity explodes; keeping them
fixes it.  The cache is

    S_t = {first ``sink_tokens`` tokens} ∪ {t - recent_tokens < j ≤ t}                       (1)

(the paper uses 4 sinks).  Before each step the cache makes room (``evict_for_space``) so that, during
decoding, attention sees exactly ``sink_tokens + recent_tokens`` entries including the new one.  A prompt
longer than the window is attended in full within its own step (the causal prefill is not banded) and
trimmed to (1) right after.

RoPE: the official code caches keys *before* RoPE and re-rotates them at their cache slot ("position shift")
so that relative distances never exceed the pre-training window.  We cache keys after RoPE at their true
positions, like every other policy here; the two agree in spirit while the text fits the model's context
(the course model's 2048 tokens) and differ beyond it, where only the position shift stays in-distribution.

With left padding the sinks are each sequence's first ``sink_tokens`` *real* tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .eviction import EvictionCache, check_int

__all__ = ["StreamingLLMCache", "streaming_keep_mask"]


def streaming_keep_mask(valid: Tensor, pos: Tensor, seen: int, sink_tokens: int, recent_tokens: int) -> Tensor:
    """Eq. (1): keep the first ``sink_tokens`` valid entries and those with ``pos >= seen - recent_tokens``.

    valid, pos: ``[..., N]`` validity and sequence position of the stored entries (oldest first).
    """
    rank = torch.cumsum(valid.to(torch.int32), dim=-1)  # 1-based rank among valid entries
    sinks = valid & (rank <= sink_tokens)
    recent = valid & (pos >= seen - recent_tokens)
    return sinks | recent


class StreamingLLMCache(EvictionCache):
    """``sink_tokens`` attention sinks + the last ``recent_tokens`` tokens, the same for every head.

    >>> c = StreamingLLMCache(num_layers=1, sink_tokens=1, recent_tokens=2)
    >>> _ = c.update(0, torch.zeros(1, 1, 5, 4), torch.zeros(1, 1, 5, 4))
    >>> c.kept_positions(0).tolist()
    [[[0, 3, 4]]]
    """

    def __init__(self, num_layers: int, sink_tokens: int = 4, recent_tokens: int = 256):
        super().__init__(num_layers)
        self.sink_tokens = check_int("sink_tokens", sink_tokens, 0)
        self.recent_tokens = check_int("recent_tokens", recent_tokens, 1)

    @property
    def budget(self) -> int:
        return self.sink_tokens + self.recent_tokens

    def _trim(self, layer_idx: int, seen_after: int) -> None:
        keep = streaming_keep_mask(self.valid[layer_idx], self.pos[layer_idx], seen_after, self.sink_tokens,
                                   self.recent_tokens)
        if not bool(keep.all()):
            self.select(layer_idx, keep)

    def _before_append(self, layer_idx: int, num_new: int) -> None:
        # evict_for_space: drop what will have left the window once the new tokens are in
        self._trim(layer_idx, self._seen[layer_idx] + num_new)

    def _after_append(self, layer_idx: int) -> None:
        # only matters when a step brings more than `recent_tokens` tokens (a long prompt)
        self._trim(layer_idx, self._seen[layer_idx])

    def _init_kwargs(self) -> dict:
        return {"num_layers": self.num_layers, "sink_tokens": self.sink_tokens, "recent_tokens": self.recent_tokens}
