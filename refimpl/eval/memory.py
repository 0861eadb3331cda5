"""KV-cache size: the formula, and what a cache actually holds.

Every layer stores one key and one value vector per KV head per token, so for a batch of B sequences of T tokens

    bytes = 2 · L · H_kv · d · T · B · bytes_per_element                    (K and V; L layers, H_kv heads of size d)

e.g. Llama-2-7B (L = 32, H_kv = 32, d = 128) in fp16 holds 2·32·32·128·2 = 512 KiB per token.  GQA shrinks H_kv
(Ainslie et al. 2023), quantization shrinks bytes_per_element (KIVI, Liu et al. 2024), eviction shrinks T.
:func:`measured_kv_bytes` reads the bytes from the tensors a cache holds, so a policy's claimed savings can be
checked against the formula.
"""

from __future__ import annotations

from typing import Any

import torch

from ..cache import KVCache, tensor_bytes
from ..kv_size import kv_bytes

__all__ = ["kv_shape", "measured_kv_bytes", "theoretical_kv_bytes"]


def kv_shape(config: Any) -> tuple[int, int, int]:
    """``(L, H_kv, d)`` of a :class:`refimpl.ModelConfig` or a transformers config."""
    if hasattr(config, "get_text_config"):
        config = config.get_text_config(decoder=True)
    try:
        layers, heads = config.num_hidden_layers, config.num_attention_heads
    except AttributeError as e:
        raise TypeError(
            f"config must be a refimpl.ModelConfig or a transformers config with num_hidden_layers and "
            f"num_attention_heads; got {type(config).__name__}"
        ) from e
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return layers, kv_heads, head_dim


def theoretical_kv_bytes(
    config: Any, tokens: int, batch: int = 1, bytes_per_elem: float | torch.dtype = 2
) -> int:
    """``2 · L · H_kv · d · tokens · batch · bytes_per_elem``, rounded up to whole bytes.

    bytes_per_elem: bytes per stored number (2 = fp16/bf16, 4 = fp32, 0.5 = 4-bit) or a ``torch.dtype``.
    """
    if not isinstance(tokens, int) or tokens < 0:
        raise ValueError(f"tokens must be a non-negative int; got {tokens!r}")
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive int; got {batch!r}")
    if isinstance(bytes_per_elem, torch.dtype):
        bytes_per_elem = torch.empty((), dtype=bytes_per_elem).element_size()
    if (
        isinstance(bytes_per_elem, bool)
        or not isinstance(bytes_per_elem, (int, float))
        or bytes_per_elem <= 0
    ):
        raise ValueError(f"bytes_per_elem must be a positive number or a torch.dtype; got {bytes_per_elem!r}")
    layers, kv_heads, head_dim = kv_shape(config)
    return kv_bytes(layers, kv_heads, head_dim, tokens, batch, bytes_per_elem)  # the one copy of the equation


def measured_kv_bytes(cache: Any) -> int:
    """Bytes held by ``cache``: a refimpl :class:`KVCache` (``cache.nbytes()``), the Hugging Face adapter from
    :func:`refimpl.hf_bridge.make_hf_cache` (its policy's bytes), or a transformers ``DynamicCache``-like cache
    (the ``keys``/``values`` tensors of its layers)."""
    if isinstance(cache, KVCache):
        return cache.nbytes()
    policy = getattr(cache, "policy", None)
    if isinstance(policy, KVCache):
        return policy.nbytes()
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise TypeError(
            f"cache must be a refimpl KVCache or a transformers Cache; got {type(cache).__name__}"
        )
    return sum(tensor_bytes(getattr(layer, "keys", None), getattr(layer, "values", None)) for layer in layers)
