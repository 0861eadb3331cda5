"""Perplexity and bits per byte of a token stream, evaluated through a KV-cache policy.

For tokens x_1..x_N the model assigns p(x_t | x_<t); the mean negative log-likelihood over the scored set S is

    NLL = −(1/|S|) Σ_{t∈S} ln p(x_t | x_<t),      PPL = exp(NLL),      BPB = Σ_{t∈S} −log₂ p(x_t | x_<t) / n_bytes

(bits per byte divides the total code length by the UTF-8 size of the text, which makes models with different
tokenizers comparable; used e.g. by Gao et al. 2020, "The Pile").

Long streams are evaluated in windows of ``window`` tokens that start every ``stride`` tokens (the usual
sliding-window recipe): window ``[b, e)`` scores the tokens not scored by an earlier window; the tokens in front
of them are context.  Each window starts with a fresh cache from ``cache_factory``; its context is *prefilled
through the cache* (one forward), then the tokens to score are fed ``chunk`` at a time, so with a compressing
policy every scored token only sees what the policy kept.  The first token of each window has no context inside
the window and is not scored (as in the Hugging Face recipe).  With the dense cache the result equals one plain
forward over each window.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ._runner import CacheFactory, Runner, as_batch

__all__ = ["PerplexityResult", "perplexity", "window_spans"]


@dataclass
class PerplexityResult:
    nll: float  # mean negative log-likelihood per scored token, in nats
    perplexity: float  # exp(nll)
    tokens: int  # number of scored tokens
    bits_per_byte: float | None  # total bits / n_bytes, when n_bytes was given
    windows: int  # number of windows evaluated


def window_spans(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, first_scored, end)`` of every window: tokens ``[first_scored, end)`` are scored in it."""
    spans, prev_end, begin = [], 0, 0
    while True:
        end = min(begin + window, n_tokens)
        first = max(begin + 1, prev_end)
        if first < end:
            spans.append((begin, first, end))
        prev_end = end
        if end == n_tokens:
            return spans
        begin += stride


@torch.no_grad()
def perplexity(
    model: nn.Module,
    token_ids: Sequence[int] | Tensor,
    window: int,
    stride: int | None = None,
    cache_factory: CacheFactory | None = None,
    n_bytes: int | None = None,
    chunk: int | None = None,
    progress: bool = False,
) -> PerplexityResult:
    """Perplexity of ``token_ids`` (``list[int]`` or ``[T]``; one stream) under ``model`` with a cache policy.

    window:        tokens per window (the model's context for the first scored token of a window).
    stride:        start of consecutive windows; ``None`` = ``window`` (no overlap).  ``stride < window`` gives
                   each window ``window - stride`` tokens of already-scored context.
    cache_factory: zero-argument callable returning a fresh :class:`refimpl.cache.KVCache`; ``None`` = dense.
    n_bytes:       UTF-8 byte count of the text the tokens encode, for bits per byte.
    chunk:         tokens fed per forward after the context prefill.  ``None`` = 1 when ``cache_factory`` is
                   given (every scored token sees only the kept entries, as in generation) and the whole window
                   for the dense baseline (same numbers, one forward).
    """
    if not isinstance(window, int) or window < 2:
        raise ValueError(f"window must be an int >= 2; got {window!r}")
    stride = window if stride is None else stride
    if not isinstance(stride, int) or not 1 <= stride <= window:
        raise ValueError(f"stride must be an int in [1, window={window}]; got {stride!r}")
    if chunk is not None and (not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"chunk must be a positive int or None; got {chunk!r}")
    if n_bytes is not None and (not isinstance(n_bytes, int) or n_bytes < 1):
        raise ValueError(f"n_bytes must be a positive int or None; got {n_bytes!r}")
    runner = Runner(model)
    ids = as_batch(token_ids, "token_ids", runner.device)
    if ids.shape[0] != 1:
        raise ValueError(f"token_ids must be one stream (list[int] or [T]); got shape {tuple(ids.shape)}")
    ids = ids[0]
    if ids.numel() < 2:
        raise ValueError(f"token_ids must hold at least 2 tokens; got {ids.numel()}")
    if chunk is None:
        chunk = 1 if cache_factory is not None else window

    total, count = 0.0, 0
    spans = window_spans(ids.numel(), window, stride)
    for begin, first, end in tqdm(spans, desc="perplexity", disable=not progress):
        cache = runner.new_cache(cache_factory)
        # context [begin, first): its last logit predicts token `first`
        logits = runner.logits(ids[None, begin:first], cache, last_only=True)[0]
        total += _nll_sum(logits, ids[first : first + 1])
        # feed [first, end - 1) in chunks; the logit at position p predicts token p + 1
        for p in range(first, end - 1, chunk):
            q = min(p + chunk, end - 1)
            logits = runner.logits(ids[None, p:q], cache)[0]
            total += _nll_sum(logits, ids[p + 1 : q + 1])
        count += end - first
    nll = total / count
    bpb = None if n_bytes is None else total / math.log(2) / n_bytes
    return PerplexityResult(
        nll=nll, perplexity=math.exp(nll), tokens=count, bits_per_byte=bpb, windows=len(spans)
    )


def _nll_sum(logits: Tensor, targets: Tensor) -> float:
    return F.cross_entropy(logits.double(), targets, reduction="sum").item()
