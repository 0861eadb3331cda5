"""One small interface over the two kinds of model the harness accepts.

Every evaluation in :mod:`refimpl.eval` drives a model through a KV-cache *policy* (a
:class:`refimpl.cache.KVCache`): feed a chunk of tokens, get next-token logits, the policy keeps what it wants.
Two model kinds are supported with the same calls:

* :class:`refimpl.model.LlamaModel` — ``model(ids, cache=policy)``;
* any transformers causal LM — ``model(input_ids=ids, **cache_kwargs(model, make_hf_cache(policy)))`` through
  :mod:`refimpl.hf_bridge` (policies that need attention probabilities require
  :func:`refimpl.hf_bridge.enable_kvcourse_attention` on the model first).

Positions come from ``policy.seq_length()`` in both, so a chunk fed after an evicting prefill gets the right
RoPE positions.  Batches here are unpadded (all rows the same length).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from ..cache import DenseCache, KVCache
from ..model import LlamaModel

__all__ = ["CacheFactory", "Runner", "as_batch"]

CacheFactory = Callable[[], KVCache]


def as_batch(token_ids: Sequence[int] | Tensor, name: str, device: torch.device | str) -> Tensor:
    """``list[int]`` / 1-D / 2-D integer tensor → ``[B, T]`` long tensor on ``device``; errors name ``name``."""
    ids = token_ids if isinstance(token_ids, Tensor) else torch.as_tensor(list(token_ids), dtype=torch.long)
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer token ids; got dtype {ids.dtype}")
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.shape[1] == 0:
        raise ValueError(
            f"{name} must be a non-empty list[int], [T] or [B, T] tensor; got shape {tuple(ids.shape)}"
        )
    return ids.to(device=device, dtype=torch.long)


class Runner:
    """Feeds token chunks through ``model`` with a policy cache and returns fp32 logits."""

    def __init__(self, model: nn.Module):
        if isinstance(model, LlamaModel):
            self.kind = "refimpl"
            cfg = model.config
        elif (
            hasattr(model, "config")
            and hasattr(model, "generate")
            and hasattr(model.config, "num_hidden_layers")
        ):
            from ..hf_bridge import cache_arg_name

            self.kind = "hf"
            cfg = model.config.get_text_config(decoder=True)
            self._cache_arg = cache_arg_name(model)  # looked up once, not per forward
        else:
            raise TypeError(
                f"model must be a refimpl.LlamaModel or a transformers causal LM; got {type(model).__name__}"
            )
        self.model = model
        self.num_layers: int = cfg.num_hidden_layers
        self.vocab_size: int = cfg.vocab_size
        self.device: torch.device = next(model.parameters()).device

    def new_cache(self, cache_factory: CacheFactory | None) -> KVCache:
        """A fresh policy: ``cache_factory()`` or the dense baseline when it is ``None``."""
        if cache_factory is None:
            return DenseCache(self.num_layers)
        if not callable(cache_factory):
            raise TypeError(
                f"cache_factory must be a zero-argument callable returning a KVCache, or None; "
                f"got {type(cache_factory).__name__}"
            )
        cache = cache_factory()
        if not isinstance(cache, KVCache):
            raise TypeError(
                f"cache_factory must return a refimpl.cache.KVCache; it returned {type(cache).__name__}"
            )
        if cache.num_layers != self.num_layers:
            raise ValueError(
                f"cache_factory built a cache with num_layers={cache.num_layers}; the model has "
                f"{self.num_layers} layers"
            )
        if cache.seq_length(0) != 0:
            raise ValueError(
                "cache_factory must return a fresh cache each call (seq_length() == 0); got one that "
                f"already holds {cache.seq_length(0)} positions"
            )
        return cache

    @torch.no_grad()
    def logits(self, ids: Tensor, cache: KVCache, last_only: bool = False) -> Tensor:
        """Append ``ids`` ``[B, T]`` to ``cache`` and return logits ``[B, T or 1, V]`` in fp32."""
        keep = 1 if last_only else 0
        if self.kind == "refimpl":
            out = self.model(ids, cache=cache, logits_to_keep=keep).logits
        else:
            from ..hf_bridge import make_hf_cache

            hf_cache = {self._cache_arg: make_hf_cache(cache)}
            out = self.model(input_ids=ids, **hf_cache, use_cache=True, logits_to_keep=keep).logits
        return out.float()

    @torch.no_grad()
    def greedy(self, ids: Tensor, new_tokens: int, cache: KVCache) -> Tensor:
        """Prefill ``ids`` and greedily decode ``new_tokens`` tokens ``[B, new_tokens]``."""
        out = []
        logits = self.logits(ids, cache, last_only=True)
        for i in range(new_tokens):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            out.append(nxt)
            if i + 1 < new_tokens:
                logits = self.logits(nxt, cache, last_only=True)
        return torch.cat(out, 1) if out else ids.new_zeros(ids.shape[0], 0)
