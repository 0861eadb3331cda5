"""Checks for exercise 05: H2O heavy hitters and StreamingLLM sinks (arXiv 2306.14048, 2309.17453).

The learner writes three functions:

``attention_mass(probs, num_kv_heads)``
    ``[B, H_q, T_q, T_k]`` attention probabilities → ``[B, H_kv, T_k]``: the attention each key received, summed
    over the query rows, averaged over the G = H_q / H_kv query heads that share a KV head (query head h reads KV
    head ``h // G``).  H2O adds this to every key's running score after each step.
``h2o_keep(scores, heavy, recent)``
    ``scores [H, N]`` accumulated attention of N cached entries (oldest first) → bool ``[H, N]``: per head, the last
    ``recent`` entries plus the ``heavy`` entries with the largest score among the *older* ones.
``streaming_keep(n, sink_tokens, recent_tokens)``
    bool ``[n]``: the first ``sink_tokens`` entries (attention sinks) and the last ``recent_tokens``.

References: :func:`refimpl.eviction.attention_mass`, :func:`refimpl.h2o.h2o_keep_mask`,
:func:`refimpl.streaming.streaming_keep_mask`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..eviction import attention_mass as _attention_mass
from ..h2o import h2o_keep_mask
from ..streaming import streaming_keep_mask
from . import CheckResult, compare, run_check

__all__ = ["CHECKS", "check_attention_mass", "check_h2o_keep", "check_streaming_keep"]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _causal_probs(b: int, h: int, t_q: int, t_k: int, seed: int) -> Tensor:
    logits = torch.randn(b, h, t_q, t_k, generator=_gen(seed)) * 2
    q_pos = torch.arange(t_k - t_q, t_k)[:, None]
    allowed = torch.arange(t_k)[None, :] <= q_pos
    return torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)


def check_attention_mass(fn: Callable[[Tensor, int], Tensor]) -> CheckResult:
    def body() -> None:
        # known answer: one head, the lower-triangular rows of the lesson -> column sums [1.7, 1.9, 0.2, 0.2]
        probs = torch.tensor([[1, 0, 0, 0], [.5, .5, 0, 0], [.1, .8, .1, 0], [.1, .6, .1, .2]]).view(1, 1, 4, 4)
        compare(fn(probs, 1), torch.tensor([[[1.7, 1.9, 0.2, 0.2]]]), "attention_mass of the 4-token example",
                "Sum over the QUERY rows (dim 2): each key's score is the attention it *received*.")
        for b, h_q, h_kv, t_q, t_k in [(2, 4, 2, 5, 5), (1, 6, 2, 1, 9), (2, 6, 3, 3, 7), (1, 4, 4, 4, 6)]:
            p = _causal_probs(b, h_q, t_q, t_k, seed=h_q * 10 + t_k)
            compare(fn(p, h_kv), _attention_mass(p, h_kv), f"attention_mass with H_q={h_q}, H_kv={h_kv}, "
                    f"T_q={t_q}, T_k={t_k}",
                    "Query head h belongs to KV head h // G (contiguous groups: view as [B, H_kv, G, ...]), and "
                    "the group is AVERAGED so that each KV head's scores still sum to the number of queries.")
    return run_check("attention_mass", body)


def _h2o_ref(scores: Tensor, heavy: int, recent: int) -> Tensor:
    n = scores.shape[-1]
    pos = torch.arange(n).expand_as(scores)
    return h2o_keep_mask(scores, pos, torch.ones_like(scores, dtype=torch.bool), n, heavy, recent)


def check_h2o_keep(fn: Callable[[Tensor, int, int], Tensor]) -> CheckResult:
    def body() -> None:
        scores = torch.tensor([[1.7, 1.9, 0.2, 0.2]])
        compare(fn(scores, 1, 1), torch.tensor([[False, True, False, True]]), "h2o_keep(column sums, heavy=1, "
                "recent=1)", "Keep the last `recent` entries, and the top-`heavy` scores among the OLDER ones.")
        for h, n, heavy, recent in [(3, 12, 3, 4), (2, 9, 4, 2), (4, 20, 5, 5), (1, 6, 0, 3), (2, 7, 3, 0)]:
            s = torch.rand(h, n, generator=_gen(n * 7 + heavy)) * 4
            s[:, -recent or n:] += 3.0  # recent entries often score high: they must not use up the heavy budget
            compare(fn(s, heavy, recent), _h2o_ref(s, heavy, recent), f"h2o_keep on [{h}, {n}] with heavy={heavy}, "
                    f"recent={recent}", "Each head chooses its own heavy hitters (top-k along the last dim, per "
                    "row), only among entries OUTSIDE the recent window; the result has heavy + recent True.")
        compare(fn(torch.rand(2, 5, generator=_gen(1)), 4, 4), torch.ones(2, 5, dtype=torch.bool),
                "h2o_keep with a budget larger than the cache", "When heavy + recent >= N, keep everything.")
    return run_check("h2o_keep", body)


def check_streaming_keep(fn: Callable[[int, int, int], Tensor]) -> CheckResult:
    def body() -> None:
        compare(fn(10, 2, 3), torch.tensor([1, 1, 0, 0, 0, 0, 0, 1, 1, 1], dtype=torch.bool),
                "streaming_keep(10, sink_tokens=2, recent_tokens=3)", "The first 2 tokens are the sinks; the last "
                "3 are the recent window.")
        for n, s, r in [(9, 4, 4), (5, 4, 8), (12, 0, 5), (7, 1, 1)]:
            valid = torch.ones(n, dtype=torch.bool)
            compare(fn(n, s, r), streaming_keep_mask(valid, torch.arange(n), n, s, r),
                    f"streaming_keep({n}, {s}, {r})", "Return a bool tensor of length n; sinks and window may overlap.")
    return run_check("streaming_keep", body)


CHECKS = {
    "attention_mass": check_attention_mass,
    "h2o_keep": check_h2o_keep,
    "streaming_keep": check_streaming_keep,
}
