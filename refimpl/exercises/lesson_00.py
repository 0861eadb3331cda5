"""Checks for exercise 00: attention with and without a KV cache, and the cache-size formula.

The learner writes three functions:

``causal_attention(q, k, v)``
    ``q`` ``[B, H, T_q, D]``, ``k, v`` ``[B, H, T_k, D]`` → ``[B, H, T_q, D]``: softmax(q kᵀ / √D) v where the T_q
    queries are the *last* T_q of the T_k positions (prefill: T_q = T_k; a decode step: T_q = 1), so query i may
    see keys ``0 .. T_k − T_q + i``.
``attend_with_cache(q, k, v, cache_k, cache_v, cos, sin)``
    One step of a cached attention layer: rotate the new queries and keys with RoPE (``apply_rope``), append the
    rotated keys and the values to the cache along the token axis, attend, and return
    ``(out, new_cache_k, new_cache_v)``.  Keys are cached *after* RoPE (Su et al. 2021): each key is rotated once,
    by its own position.
``kv_cache_bytes(config, seq_len, batch, bytes_per_element)``
    ``2 · layers · kv_heads · head_dim · seq_len · batch · bytes_per_element`` from a Hugging Face config dict
    (``num_key_value_heads`` defaults to ``num_attention_heads``; ``head_dim`` defaults to hidden / heads).

References: :func:`refimpl.gqa.grouped_attention`, :class:`refimpl.cache.DenseCache`,
:func:`refimpl.model.apply_rope` and the model's own ``Attention`` layer, :func:`refimpl.kv_size.kv_cache_size`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..cache import DenseCache
from ..config import ModelConfig
from ..gqa import grouped_attention
from ..kv_size import kv_cache_size
from ..model import LlamaModel, rope_cos_sin
from . import CheckResult, Mismatch, compare, run_check

__all__ = ["CHECKS", "check_attend_with_cache", "check_causal_attention", "check_kv_cache_bytes"]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _qkv(b: int, h: int, t_q: int, t_k: int, d: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    g = _gen(seed)
    return (torch.randn(b, h, t_q, d, generator=g), torch.randn(b, h, t_k, d, generator=g),
            torch.randn(b, h, t_k, d, generator=g))


# ------------------------------------------------------------------------------------------ causal_attention
def check_causal_attention(fn: Callable[[Tensor, Tensor, Tensor], Tensor]) -> CheckResult:
    def body() -> None:
        for (b, h, t_q, t_k, d), hint in [
            ((2, 3, 5, 5, 8), ("Prefill (T_q = T_k): scale the scores by 1/sqrt(D), mask keys after each "
                               "query (causal), softmax over the keys (last dim).")),
            ((1, 2, 1, 7, 4), "One decode step (T_q = 1): the single query is the LAST position and sees every key."),
            ((2, 2, 3, 7, 6), ("T_q = 3 new queries after 4 cached keys: query i may see keys 0 .. 4 + i. A "
                               "top-left torch.tril(ones(T_q, T_k)) mask is only right when T_q = T_k.")),
        ]:
            q, k, v = _qkv(b, h, t_q, t_k, d, seed=t_q * 10 + t_k)
            compare(fn(q, k, v), grouped_attention(q, k, v), f"causal_attention with T_q={t_q}, T_k={t_k}", hint)
    return run_check("causal_attention", body)


# ----------------------------------------------------------------------------------------- attend_with_cache
def _tiny_attention(seed: int = 0):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=16, hidden_size=24, intermediate_size=16, num_hidden_layers=1,
                      num_attention_heads=3, max_position_embeddings=64)
    model = LlamaModel(cfg).eval()
    return model, model.model.layers[0].self_attn


def _split_heads(x: Tensor, h: int) -> Tensor:
    b, t, _ = x.shape
    return x.view(b, t, h, -1).transpose(1, 2)


def check_attend_with_cache(fn: Callable[..., tuple[Tensor, Tensor, Tensor]]) -> CheckResult:
    def body() -> None:
        model, attn = _tiny_attention()
        h, d = attn.h, attn.d
        x = torch.randn(2, 9, 24, generator=_gen(5))
        # the model itself, with refimpl's DenseCache: prefill 6 tokens, then 1 token, then 2 tokens
        ref_cache = DenseCache(1)
        cache_k = torch.zeros(2, h, 0, d)
        cache_v = torch.zeros(2, h, 0, d)
        for step, (start, stop) in enumerate([(0, 6), (6, 7), (7, 9)]):
            xs = x[:, start:stop]
            pos = torch.arange(start, stop)[None].expand(2, -1)
            cos, sin = rope_cos_sin(model.inv_freq, pos, xs.dtype)
            with torch.no_grad():
                want_out, _ = attn(xs, cos, sin, ref_cache, None, False)
                q, k, v = (_split_heads(p(xs), h) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
            res = fn(q, k, v, cache_k, cache_v, cos, sin)
            if not isinstance(res, tuple) or len(res) != 3:
                raise Mismatch("return a tuple (out, new_cache_k, new_cache_v).")
            out, cache_k, cache_v = res
            what = f"step {step + 1} (positions {start}..{stop - 1})"
            compare(cache_k, ref_cache.k[0], f"new_cache_k after {what}",
                    "The cache holds ROTATED keys, [B, H, T, D], new tokens appended along dim 2 (tokens). Rotate "
                    "k with apply_rope(k, cos, sin) BEFORE you store it; never rotate cached keys again.")
            compare(cache_v, ref_cache.v[0], f"new_cache_v after {what}",
                    "Values are not rotated; append them along dim 2 (tokens), not dim 1 (heads).")
            if not isinstance(out, Tensor) or out.shape != (2, h, stop - start, d):
                got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                raise Mismatch(f"out at {what} should be [B, H, T_new, D] = {(2, h, stop - start, d)}; got {got}.")
            merged = attn.o_proj(out.transpose(1, 2).reshape(2, stop - start, h * d))
            compare(merged.detach(), want_out, f"the attention output at {what}",
                    "Rotate q too; the T_new queries are the last positions of the cache (causal mask aligned "
                    "bottom-right); scale by 1/sqrt(D).")
    return run_check("attend_with_cache", body)


# -------------------------------------------------------------------------------------------- kv_cache_bytes
_CONFIGS = [
    ({"model_type": "llama", "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
      "hidden_size": 8192}, 4096, 1, 2, "Llama-2-70B (GQA: use num_key_value_heads, not num_attention_heads)"),
    ({"model_type": "opt", "num_hidden_layers": 48, "num_attention_heads": 56, "hidden_size": 7168}, 1024, 128, 2,
     "OPT-30B (no num_key_value_heads in the config: it is multi-head attention, kv_heads = num_attention_heads)"),
    ({"model_type": "gemma", "num_hidden_layers": 26, "num_attention_heads": 8, "num_key_value_heads": 4,
      "hidden_size": 2304, "head_dim": 256}, 1000, 3, 1,
     "a config with an explicit head_dim (256, not hidden_size / heads = 288): use config['head_dim'] when present"),
    ({"model_type": "llama", "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
      "hidden_size": 4096}, 8192, 4, 0.5, "Llama-3-8B at 4 bits (bytes_per_element = 0.5), batch 4"),
]


def check_kv_cache_bytes(fn: Callable[[dict, int, int, float], int]) -> CheckResult:
    def body() -> None:
        bits = {2: "fp16", 1: "fp8", 0.5: "int4", 4: "fp32"}
        for cfg, t, b, bpe, what in _CONFIGS:
            want = kv_cache_size(dict(cfg), context=t, batch=b, dtype=bits[bpe]).total_bytes
            got = fn(dict(cfg), t, b, bpe)
            if isinstance(got, Tensor):
                got = got.item()
            if not isinstance(got, (int, float)) or isinstance(got, bool):
                raise Mismatch(f"return a number of bytes; got {type(got).__name__}.")
            if got != want:
                ratio = got / want if want else float("nan")
                hint = " (off by 2: K AND V are both cached)" if ratio in (0.5, 2.0) else \
                    f" (off by the batch size {b})" if b > 1 and ratio in (b, 1 / b) else ""
                raise Mismatch(f"{what}, seq_len={t}, batch={b}, bytes_per_element={bpe}: expected {want:,} bytes, "
                               f"got {got:,}{hint}.")
    return run_check("kv_cache_bytes", body)


CHECKS = {
    "causal_attention": check_causal_attention,
    "attend_with_cache": check_attend_with_cache,
    "kv_cache_bytes": check_kv_cache_bytes,
}
