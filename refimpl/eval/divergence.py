"""How far a compressed cache moves the model's next-token distribution from the full cache.

Prefill the same prompt into the full cache and into the compressed one, then teacher-force the same
continuation y_1..y_n token by token through both.  At step i, with p = softmax(logits_full) and
q = softmax(logits_compressed) predicting y_i,

    KL_i(p ‖ q) = Σ_v p(v) (ln p(v) − ln q(v))            (Kullback & Leibler 1951; nats)
    agree_i     = [argmax p = argmax q]

Both are averaged over the batch per step, then over steps.  Teacher forcing isolates the cache's effect: both
runs see identical inputs, so any difference comes from what the policy kept (or how it stored it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ._runner import CacheFactory, Runner, as_batch

__all__ = ["DivergenceResult", "divergence", "kl_divergence"]


@dataclass
class DivergenceResult:
    kl: list[float]  # per step, KL(full ‖ compressed) in nats, mean over the batch
    top1: list[float]  # per step, fraction of rows whose argmax agrees
    mean_kl: float
    top1_agreement: float


def kl_divergence(logits_p: Tensor, logits_q: Tensor) -> Tensor:
    """``KL(softmax(p) ‖ softmax(q))`` over the last dim, computed in fp64; shape = leading dims."""
    lp, lq = torch.log_softmax(logits_p.double(), -1), torch.log_softmax(logits_q.double(), -1)
    return (lp.exp() * (lp - lq)).sum(-1)


@torch.no_grad()
def divergence(
    model: nn.Module,
    prompt_ids: Sequence[int] | Tensor,
    continuation_ids: Sequence[int] | Tensor,
    cache_factory: CacheFactory | None,
    progress: bool = False,
) -> DivergenceResult:
    """Per-step KL(full ‖ compressed) and top-1 agreement along a teacher-forced continuation.

    prompt_ids:       ``list[int]``, ``[T]`` or ``[B, T]`` — prefilled into both caches.
    continuation_ids: ``list[int]``, ``[n]`` or ``[B, n]`` — the n tokens whose predictions are compared.
    cache_factory:    fresh compressed :class:`refimpl.cache.KVCache` per call; ``None`` compares dense to dense
                      (KL 0, agreement 1 — a sanity check).
    """
    runner = Runner(model)
    prompt = as_batch(prompt_ids, "prompt_ids", runner.device)
    cont = as_batch(continuation_ids, "continuation_ids", runner.device)
    if cont.shape[0] != prompt.shape[0]:
        if cont.shape[0] == 1:
            cont = cont.expand(prompt.shape[0], -1)
        else:
            raise ValueError(
                f"continuation_ids batch ({cont.shape[0]}) must match prompt_ids batch "
                f"({prompt.shape[0]}) or be 1"
            )
    full, comp = runner.new_cache(None), runner.new_cache(cache_factory)
    lf = runner.logits(prompt, full, last_only=True)[:, -1]
    lc = runner.logits(prompt, comp, last_only=True)[:, -1]
    kl, top1 = [], []
    n = cont.shape[1]
    for i in tqdm(range(n), desc="divergence", disable=not progress):
        kl.append(kl_divergence(lf, lc).clamp_min(0).mean().item())
        top1.append((lf.argmax(-1) == lc.argmax(-1)).double().mean().item())
        if i + 1 < n:
            tok = cont[:, i : i + 1]
            lf = runner.logits(tok, full, last_only=True)[:, -1]
            lc = runner.logits(tok, comp, last_only=True)[:, -1]
    return DivergenceResult(kl=kl, top1=top1, mean_kl=sum(kl) / n, top1_agreement=sum(top1) / n)
