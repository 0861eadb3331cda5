"""Calibration statistics: what the attention layers of a model see on real text.

Low-rank KV-head compression (Yu et al. 2024, "Effectively Compress KV Heads for LLM", arXiv 2406.07056) is
*data-aware*: it compresses the KV cache itself, ``K = X W_Kᵀ``, not the weight ``W_K``.  Everything it needs
about the cache of any linear projection ``W`` is one second-moment matrix per layer of the attention input
``x`` (the RMSNorm output that feeds ``q_proj``/``k_proj``/``v_proj``):

    S = Σ_t x̃_t x̃_tᵀ,   x̃_t = [x_t; 1]          (the 1 carries a projection bias, if there is one)

because for ``W̃ = [W | b]``,  ``KᵀK = Σ_t (W̃ x̃_t)(W̃ x̃_t)ᵀ = W̃ S W̃ᵀ``.  So one pass over the calibration text
gives the cache statistics of *every* head, every grouping and every candidate projection, and the
projection search runs on ``(hidden+1)²`` matrices instead of ``tokens × dims`` activations.

:func:`collect_kv` returns the activations themselves (pre-RoPE keys, post-RoPE keys, values) for plotting
spectra; :func:`attention_input_stats` returns ``S`` for the conversion.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .model import LlamaModel, apply_rope, rope_cos_sin

__all__ = ["AttentionInputStats", "LayerKVActivations", "attention_input_stats", "check_calibration_ids", "collect_kv"]


@dataclass
class AttentionInputStats:
    """Per-layer ``S = Σ x̃ x̃ᵀ`` (float64, ``[hidden+1, hidden+1]``, last coordinate = the constant 1)."""

    gram: list[Tensor]
    num_tokens: int

    @property
    def hidden_size(self) -> int:
        return self.gram[0].shape[0] - 1


@dataclass
class LayerKVActivations:
    """One layer's cache on the calibration text, ``[H_kv, N, head_dim]`` each (N = real tokens)."""

    k_pre_rope: Tensor
    k_post_rope: Tensor
    v: Tensor


def check_calibration_ids(model: LlamaModel, input_ids: Tensor, attention_mask: Tensor | None = None,
                          min_tokens: int | None = None) -> int:
    """Validate calibration token ids; return the number of real (unpadded) tokens.

    ``min_tokens`` defaults to the model's ``hidden_size``: with fewer tokens the input statistics ``S`` are
    rank-deficient and the PCA would fit the calibration text instead of the model's cache distribution.
    """
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            "calibration input_ids must be an integer tensor [batch, tokens]; got "
            f"{type(input_ids).__name__}{tuple(input_ids.shape) if isinstance(input_ids, Tensor) else ''}"
        )
    vocab = model.config.vocab_size
    if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab):
        raise ValueError(f"calibration input_ids must lie in [0, {vocab - 1}] (the vocabulary); got values in "
                         f"[{int(input_ids.min())}, {int(input_ids.max())}]")
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}; "
                         f"got {tuple(attention_mask.shape)}")
    n = int(attention_mask.sum()) if attention_mask is not None else input_ids.numel()
    need = model.config.hidden_size if min_tokens is None else min_tokens
    if n < need:
        raise ValueError(
            f"calibration holds {n} tokens but at least min_tokens={need} are needed (default: hidden_size, so "
            "that the per-layer input statistics are full rank); pass more calibration text"
        )
    return n


def _hook_attention_inputs(model: LlamaModel, sink: list):
    def make(i):
        def hook(module, args):
            sink.append((i, args[0].detach()))
        return hook
    return [layer.self_attn.register_forward_pre_hook(make(i)) for i, layer in enumerate(model.model.layers)]


@torch.no_grad()
def attention_input_stats(model: LlamaModel, input_ids: Tensor, attention_mask: Tensor | None = None,
                          batch_size: int = 8, min_tokens: int | None = None) -> AttentionInputStats:
    """Run ``model`` over ``input_ids`` ``[B, T]`` and accumulate ``S = Σ x̃ x̃ᵀ`` per layer (padding excluded)."""
    n = check_calibration_ids(model, input_ids, attention_mask, min_tokens)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int; got {batch_size!r}")
    hidden = model.config.hidden_size
    grams = [torch.zeros(hidden + 1, hidden + 1, dtype=torch.float64) for _ in model.model.layers]
    for s in range(0, input_ids.shape[0], batch_size):
        ids = input_ids[s:s + batch_size]
        mask = None if attention_mask is None else attention_mask[s:s + batch_size]
        sink: list = []
        handles = _hook_attention_inputs(model, sink)
        try:
            model(ids, attention_mask=mask, logits_to_keep=1, use_cache=False)
        finally:
            for h in handles:
                h.remove()
        for i, x in sink:
            x = x.reshape(-1, hidden).double().cpu()
            if mask is not None:
                x = x[mask.reshape(-1).bool().cpu()]
            xt = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)
            grams[i] += xt.T @ xt
    return AttentionInputStats(grams, n)


@torch.no_grad()
def collect_kv(model: LlamaModel, input_ids: Tensor, min_tokens: int | None = None) -> list[LayerKVActivations]:
    """Each layer's keys before and after RoPE and its values on ``input_ids`` ``[B, T]`` (no padding).

    Rows are tokens of all sequences concatenated (positions restart at 0 in every sequence).
    """
    check_calibration_ids(model, input_ids, None, min_tokens)
    cfg = model.config
    b, t = input_ids.shape
    sink: list = []
    handles = _hook_attention_inputs(model, sink)
    try:
        model(input_ids, logits_to_keep=1, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    pos = torch.arange(t, device=input_ids.device)[None].expand(b, -1)
    out = []
    for i, x in sink:
        attn = model.model.layers[i].self_attn
        k = attn.k_proj(x).view(b, t, cfg.num_key_value_heads, cfg.head_dim).transpose(1, 2)
        v = attn.v_proj(x).view(b, t, cfg.num_key_value_heads, cfg.head_dim).transpose(1, 2)
        cos, sin = rope_cos_sin(model.inv_freq, pos, k.dtype)
        kr = apply_rope(k, cos, sin)

        def flat(a: Tensor) -> Tensor:  # [B, H, T, D] -> [H, B*T, D]
            return a.transpose(0, 1).reshape(a.shape[1], b * t, a.shape[-1]).float().cpu()

        out.append(LayerKVActivations(flat(k), flat(kr), flat(v)))
    return out
