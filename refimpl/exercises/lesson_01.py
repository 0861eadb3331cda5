"""Checks for exercise 01: MQA and GQA (Shazeer 2019; Ainslie et al. 2023, arXiv 2305.13245).

The learner writes three functions:

``repeat_kv(x, n_rep)``
    ``[B, H_kv, T, D]`` → ``[B, H_kv·n_rep, T, D]`` where output head h is input head ``h // n_rep`` (each KV head
    copied to the n_rep query heads of its group, *contiguously*).
``grouped_query_attention(q, k, v)``
    causal attention with ``q`` ``[B, H, T, D]`` and ``k, v`` ``[B, H_kv, T, D]``; query head h reads KV head
    ``h // G`` (G = H / H_kv), sharing by index: view q as ``[B, H_kv, G, T, D]`` — no copies of K or V.
``mean_pool_kv_weight(weight, num_kv_heads, new_kv_heads)``
    a K or V projection weight ``[num_kv_heads·D, hidden]`` → ``[new_kv_heads·D, hidden]``; new head j is the mean
    of the old heads of group j (contiguous heads ``j·r … (j+1)·r − 1``, r = num_kv_heads / new_kv_heads).

References: :mod:`refimpl.gqa` (``repeat_kv``, ``grouped_attention``, ``mean_pool_kv_heads``) and PyTorch's
``scaled_dot_product_attention(..., enable_gqa=True)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..config import ModelConfig
from ..gqa import _sdpa_reference, mean_pool_kv_heads
from ..model import LlamaModel
from . import CheckResult, compare, run_check

__all__ = ["CHECKS", "check_grouped_query_attention", "check_mean_pool_kv_weight", "check_repeat_kv"]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def check_repeat_kv(fn: Callable[[Tensor, int], Tensor]) -> CheckResult:
    def body() -> None:
        for b, h_kv, t, d, n in [(2, 3, 5, 4, 2), (1, 2, 3, 6, 4), (2, 1, 4, 2, 5), (1, 4, 2, 3, 1)]:
            x = torch.randn(b, h_kv, t, d, generator=_gen(h_kv * 10 + n))
            compare(fn(x, n), torch.repeat_interleave(x, n, dim=1), f"repeat_kv(x of {tuple(x.shape)}, n_rep={n})",
                    "Output head h must be input head h // n_rep: [k0, k0, k1, k1, ...], not tiled [k0, k1, k0, "
                    "k1, ...]; repeat along dim 1 (heads), not dim 2 (tokens).")
    return run_check("repeat_kv", body)


def check_grouped_query_attention(fn: Callable[[Tensor, Tensor, Tensor], Tensor]) -> CheckResult:
    def body() -> None:
        for b, h, h_kv, t, d in [(2, 6, 2, 5, 4), (1, 4, 1, 7, 8), (2, 4, 4, 3, 4), (1, 8, 2, 6, 2)]:
            g = _gen(h * 10 + h_kv)
            q = torch.randn(b, h, t, d, generator=g)
            k, v = torch.randn(b, h_kv, t, d, generator=g), torch.randn(b, h_kv, t, d, generator=g)
            compare(fn(q, k, v), _sdpa_reference(q, k, v), f"grouped_query_attention with H={h}, H_kv={h_kv}",
                    "Query head h reads KV head h // G: view q as [B, H_kv, G, T, D] (not [B, G, H_kv, T, D], "
                    "which pairs head h with KV head h % H_kv); keep the causal mask and the 1/sqrt(D) scale.")
    return run_check("grouped_query_attention", body)


def _tiny_mha(seed: int = 0) -> LlamaModel:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=40, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=4, max_position_embeddings=32)
    return LlamaModel(cfg).eval()


def check_mean_pool_kv_weight(fn: Callable[[Tensor, int, int], Tensor]) -> CheckResult:
    def body() -> None:
        # known answer: 4 heads of dim 2 whose rows hold the head index -> group means 0.5 and 2.5
        w = torch.arange(4.0).repeat_interleave(2)[:, None].expand(8, 3).contiguous()
        compare(fn(w.clone(), 4, 2), torch.tensor([0.5, 0.5, 2.5, 2.5])[:, None].expand(4, 3),
                "mean_pool_kv_weight(w, 4, 2) on heads holding 0, 1, 2, 3",
                "Group j averages the CONTIGUOUS heads j*r .. (j+1)*r - 1 (here heads {0,1} and {2,3}); average, "
                "do not sum or keep the first head.")
        compare(fn(w.clone(), 4, 4), w, "mean_pool_kv_weight(w, 4, 4) (nothing to pool)")
        # a real model's projections, against refimpl.gqa.mean_pool_kv_heads
        model = _tiny_mha()
        for new in (2, 1):
            want = mean_pool_kv_heads(model, new)
            for i, (src, ref) in enumerate(zip(model.model.layers, want.model.layers)):
                for name in ("k_proj", "v_proj"):
                    got = fn(getattr(src.self_attn, name).weight.detach().clone(), 4, new)
                    compare(got, getattr(ref.self_attn, name).weight.detach(),
                            f"layer {i} {name}.weight pooled from 4 to {new} KV heads",
                            "View [H_kv*D, hidden] as [new, r, D, hidden] (rows are head-major: head 0's D rows "
                            "first) and average over r; not [D, H_kv, hidden].")
    return run_check("mean_pool_kv_weight", body)


CHECKS = {
    "repeat_kv": check_repeat_kv,
    "grouped_query_attention": check_grouped_query_attention,
    "mean_pool_kv_weight": check_mean_pool_kv_weight,
}
