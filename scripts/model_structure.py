"""Measure the structure of the course model's attention and KV cache that the compression lessons rely on.

Runs a few seeded held-out windows (``refimpl.data.heldout_text``, never trained on) through the model with the
full dense cache and writes the numbers to ``structure.json`` and four small PNGs.  Every statistic is put next to
what *uniform causal attention* ``A[i, j] = 1/(i+1)`` would give, so "large" has a reference.

(a) **Attention sinks** (Xiao et al. 2024, StreamingLLM, arXiv 2309.17453): per layer and head, the mass that
    queries ``i ≥ min_query`` give to the first token, ``mean_i A[i, 0]`` (and to the first 4), against
    ``mean_i 1/(i+1)``; also the mass on the ``local_window`` most recent keys and on tokens holding a line break
    (the places this model parks attention instead); and whether StreamingLLM's sinks change perplexity
    (:func:`sink_ablation`).  Figure ``sinks.png``.
(b) **Heavy hitters** (Zhang et al. 2023, H2O, arXiv 2306.14048): the accumulated score
    ``score(j) = Σ_{i≥j} A[i, j]`` per head, sorted on log–log axes, and the share of the total held by the top
    10% of keys — against uniform attention, whose score ``Σ_{i≥j} 1/(i+1)`` is itself skewed (old keys are seen
    by more queries).  Also per query row: the share of ``A[i, :]`` held by its top 10% of visible keys (the
    sparsity that lets eviction work).  Figure ``heavy_hitters.png``.
(c) **Key-channel outliers** (Liu et al. 2024, KIVI, arXiv 2402.02750): per-channel mean magnitude
    ``m_c = mean_t |x_{t,c}|`` of the cached keys (post-RoPE; pre-RoPE too) and values; per head the ratio
    ``max_c m_c / median_c m_c``.  Keys have a few large fixed channels, values do not — why KIVI quantizes keys
    per channel and values per token.  Figure ``kv_channels.png``.
(d) **Low rank** (Yu et al. 2024, arXiv 2406.07056): singular values ``σ_r`` of the cache matrix (tokens ×
    channels, uncentered, as in ``refimpl.lowrank``) of one head and of ``g`` consecutive heads concatenated;
    cumulative energy ``E(r) = Σ_{s≤r} σ_s² / Σ_s σ_s²``, the rank reaching 90/95/99%, and ``E(head_dim)`` — the
    most that merging ``g`` heads into one KV head can keep.  Figure ``kv_spectrum.png``.

    KVCOURSE_DATA_DIR=/work/shared/data OMP_NUM_THREADS=2 python scripts/model_structure.py

Only the refimpl :class:`~refimpl.model.LlamaModel` is supported (attention probabilities from
``output_attentions=True``, post-RoPE K/V from the returned :class:`~refimpl.cache.DenseCache`, pre-RoPE keys from
a forward hook on ``k_proj``).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from torch import Tensor

THRESHOLDS = (0.90, 0.95, 0.99)
FIG_DPI = 90

__all__ = [
    "accumulated_attention",
    "channel_magnitude",
    "cumulative_energy",
    "group_spectra",
    "head_groups",
    "heldout_windows",
    "key_class_mass",
    "local_mass",
    "main",
    "measure",
    "newline_token_ids",
    "outlier_ratio",
    "plot_all",
    "rank_for_energy",
    "sink_mass",
    "summarize",
    "top_share",
    "uniform_accumulated_attention",
    "uniform_sink_mass",
]


# ---------------------------------------------------------------------------------------------------------
# Input
# ---------------------------------------------------------------------------------------------------------
def heldout_windows(tok, text: str, n_windows: int, length: int, seed: int = 0) -> tuple[Tensor, list[int]]:
    """``n_windows`` token windows of ``length`` tokens, one from each equal slice of ``text`` at a seeded offset
    (moved to the next line start).  Returns ``(ids [n_windows, length], character offsets)``."""
    if not isinstance(n_windows, int) or n_windows < 1:
        raise ValueError(f"n_windows must be a positive int; got {n_windows!r}")
    if not isinstance(length, int) or length < 2:
        raise ValueError(f"length must be an int >= 2; got {length!r}")
    chars = 6 * length  # held-out text is ~3.6 bytes/token: 6 characters per token is a safe margin
    stride = len(text) // n_windows
    if stride < chars:
        raise ValueError(f"text has {len(text)} characters: too short for n_windows={n_windows} windows of "
                         f"length={length} tokens (needs about {n_windows * chars})")
    rng = random.Random(seed)
    rows, offsets = [], []
    for w in range(n_windows):
        off = rng.randrange(w * stride, (w + 1) * stride - chars + 1)
        nl = text.find("\n", off, off + 2000)
        off = nl + 1 if nl >= 0 else off
        ids = tok.encode(text[off:off + chars], add_special_tokens=False)
        if len(ids) < length:
            raise ValueError(f"window {w} at character {off} gave only {len(ids)} tokens < length={length}")
        rows.append(ids[:length])
        offsets.append(off)
    return torch.tensor(rows), offsets


# ---------------------------------------------------------------------------------------------------------
# (a) sinks, (b) heavy hitters — from attention probabilities A [B, H, T, T] (rows sum to 1, causal)
# ---------------------------------------------------------------------------------------------------------
def _check_probs(probs: Tensor) -> None:
    if probs.dim() != 4 or probs.shape[-1] != probs.shape[-2]:
        raise ValueError(f"probs must be [batch, heads, T, T] self-attention probabilities; got {tuple(probs.shape)}")


def sink_mass(probs: Tensor, n_sink: int = 1, min_query: int = 32) -> Tensor:
    """``[B, H]``: mean over queries ``i ≥ min_query`` of ``Σ_{j<n_sink} A[i, j]``."""
    _check_probs(probs)
    t = probs.shape[-1]
    if not isinstance(n_sink, int) or not 1 <= n_sink <= t:
        raise ValueError(f"n_sink must be an int in [1, {t}]; got {n_sink!r}")
    if not isinstance(min_query, int) or not 0 <= min_query < t:
        raise ValueError(f"min_query must be an int in [0, {t - 1}]; got {min_query!r}")
    return probs[:, :, min_query:, :n_sink].sum(-1).mean(-1)


def uniform_sink_mass(t: int, n_sink: int = 1, min_query: int = 32) -> float:
    """What :func:`sink_mass` gives for uniform causal attention ``A[i, j] = 1/(i+1)``."""
    return sum(min(n_sink, i + 1) / (i + 1) for i in range(min_query, t)) / (t - min_query)


def local_mass(probs: Tensor, window: int = 16, min_query: int = 32) -> Tensor:
    """``[B, H]``: mean over queries ``i ≥ min_query`` of the mass on the ``window`` most recent keys
    ``i − window < j ≤ i`` (the query's own key included)."""
    _check_probs(probs)
    t = probs.shape[-1]
    if not isinstance(window, int) or not 1 <= window <= t:
        raise ValueError(f"window must be an int in [1, {t}]; got {window!r}")
    if not isinstance(min_query, int) or not 0 <= min_query < t:
        raise ValueError(f"min_query must be an int in [0, {t - 1}]; got {min_query!r}")
    i = torch.arange(t, device=probs.device)
    band = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)  # [T, T]
    return (probs * band).sum(-1)[:, :, min_query:].mean(-1)


def key_class_mass(probs: Tensor, is_class: Tensor, min_query: int = 32) -> tuple[Tensor, Tensor]:
    """Mass on the keys of one class (e.g. tokens holding a line break), and what uniform attention would give.

    ``is_class [B, T]`` bool marks the class's keys.  Returns ``([B, H] mean over queries i ≥ min_query of
    Σ_{j ∈ class} A[i, j],  [B] the uniform value mean_i |class ∩ [0, i]| / (i+1))``.
    """
    _check_probs(probs)
    b, _, t, _ = probs.shape
    if is_class.shape != (b, t) or is_class.dtype != torch.bool:
        raise ValueError(f"is_class must be a bool tensor [batch, T] = {(b, t)}; got {is_class.dtype} "
                         f"{tuple(is_class.shape)}")
    if not isinstance(min_query, int) or not 0 <= min_query < t:
        raise ValueError(f"min_query must be an int in [0, {t - 1}]; got {min_query!r}")
    c = is_class.to(probs.dtype)
    mass = torch.einsum("bhij,bj->bhi", probs, c)[:, :, min_query:].mean(-1)
    uniform = (c.cumsum(-1) / torch.arange(1, t + 1, dtype=probs.dtype, device=probs.device))[:, min_query:].mean(-1)
    return mass, uniform


def accumulated_attention(probs: Tensor) -> Tensor:
    """H2O's score ``[B, H, T]``: attention each key received, summed over all queries (``Σ_{i≥j} A[i, j]``)."""
    _check_probs(probs)
    return probs.sum(-2)


def uniform_accumulated_attention(t: int) -> Tensor:
    """:func:`accumulated_attention` of uniform causal attention: ``Σ_{i=j}^{t-1} 1/(i+1)``, shape ``[t]``."""
    inv = 1.0 / torch.arange(1, t + 1, dtype=torch.float64)
    return inv.flip(0).cumsum(0).flip(0)


def top_share(scores: Tensor, frac: float = 0.1) -> Tensor:
    """Share of ``scores.sum(-1)`` held by the largest ``ceil(frac · n)`` entries of the last dim."""
    if not 0.0 < frac <= 1.0:
        raise ValueError(f"frac must be in (0, 1]; got {frac!r}")
    k = math.ceil(frac * scores.shape[-1])
    return scores.topk(k, dim=-1).values.sum(-1) / scores.sum(-1)


def row_top_share(probs: Tensor, frac: float = 0.1, min_query: int = 32) -> Tensor:
    """``[B, H]``: per query ``i ≥ min_query``, the share of its row held by its top ``ceil(frac·(i+1))`` keys
    (of the ``i+1`` it may see), averaged over those queries.  Uniform attention gives about ``frac``."""
    _check_probs(probs)
    t = probs.shape[-1]
    if not 0.0 < frac <= 1.0:
        raise ValueError(f"frac must be in (0, 1]; got {frac!r}")
    if not isinstance(min_query, int) or not 0 <= min_query < t:
        raise ValueError(f"min_query must be an int in [0, {t - 1}]; got {min_query!r}")
    rows = probs[:, :, min_query:]
    k = torch.ceil(frac * torch.arange(min_query + 1, t + 1, dtype=torch.float64, device=probs.device)).long()
    cum = rows.sort(-1, descending=True).values.cumsum(-1)
    return cum.gather(-1, (k - 1).view(1, 1, -1, 1).expand(*rows.shape[:3], 1))[..., 0].mean(-1)


def sink_ablation(model, ids: Tensor, budget: int = 64, sinks: int = 4, chunk: int = 16) -> dict:
    """Does the model *need* its first tokens?  Perplexity of the rows of ``ids [W, T]`` (pooled over rows) fed
    ``chunk`` tokens at a time through: the full cache; a window of the last ``budget`` entries; ``sinks`` first
    tokens + the last ``budget − sinks`` (StreamingLLM, ``refimpl.streaming.StreamingLLMCache``)."""
    from refimpl.eval.perplexity import perplexity
    from refimpl.streaming import StreamingLLMCache

    if not isinstance(sinks, int) or not 1 <= sinks < budget:
        raise ValueError(f"sinks must be an int in [1, budget={budget}); got {sinks!r}")
    n_layers = model.config.num_hidden_layers
    configs = {"full": None,
               f"window_{budget}": lambda: StreamingLLMCache(n_layers, sink_tokens=0, recent_tokens=budget),
               f"sinks_{sinks}_window_{budget - sinks}":
                   lambda: StreamingLLMCache(n_layers, sink_tokens=sinks, recent_tokens=budget - sinks)}
    out = {}
    for name, factory in configs.items():
        nll = tok = 0.0
        for row in ids:
            r = perplexity(model, row, window=len(row), cache_factory=factory,
                           chunk=None if factory is None else chunk)  # dense: one forward gives the same numbers
            nll, tok = nll + r.nll * r.tokens, tok + r.tokens
        out[name] = math.exp(nll / tok)
    return out


# ---------------------------------------------------------------------------------------------------------
# (c) channel magnitudes, (d) spectra — from cached tensors x [B, H, T, D]
# ---------------------------------------------------------------------------------------------------------
def channel_magnitude(x: Tensor) -> Tensor:
    """``[H, D]``: mean over batch and tokens of ``|x|`` per head and channel."""
    if x.dim() != 4:
        raise ValueError(f"x must be [batch, heads, tokens, head_dim]; got {tuple(x.shape)}")
    return x.abs().mean(dim=(0, 2))


def outlier_ratio(mag: Tensor) -> Tensor:
    """``[H]``: largest over median channel magnitude, per head (``mag`` from :func:`channel_magnitude`)."""
    if mag.dim() != 2:
        raise ValueError(f"mag must be [heads, head_dim]; got {tuple(mag.shape)}")
    return mag.max(-1).values / mag.median(-1).values


def head_groups(x: Tensor, g: int) -> list[Tensor]:
    """Split ``x [B, H, T, D]`` into ``H/g`` groups of ``g`` consecutive heads, each as ``[B·T, g·D]``
    (a token's channels of the group side by side, the matrix ``refimpl.lowrank`` compresses)."""
    if x.dim() != 4:
        raise ValueError(f"x must be [batch, heads, tokens, head_dim]; got {tuple(x.shape)}")
    b, h, t, d = x.shape
    if not isinstance(g, int) or g < 1 or h % g:
        raise ValueError(f"g must be a positive divisor of the number of heads ({h}); got {g!r}")
    y = x.permute(0, 2, 1, 3).reshape(b * t, h // g, g * d)
    return [y[:, i] for i in range(h // g)]


def cumulative_energy(m: Tensor) -> Tensor:
    """``E(r)`` for ``r = 1 … min(m.shape)``: cumulative share of ``‖m‖_F²`` in the top ``r`` singular values."""
    if m.dim() != 2:
        raise ValueError(f"m must be a 2-D [tokens, channels] matrix; got {tuple(m.shape)}")
    s2 = torch.linalg.svdvals(m.double()) ** 2
    return s2.cumsum(0) / s2.sum()


def group_spectra(x: Tensor, g: int) -> Tensor:
    """``[H/g, g·D]``: :func:`cumulative_energy` of every group of :func:`head_groups`, from the Gram matrix.

    The squared singular values of a group's matrix ``M`` are the eigenvalues of ``MᵀM``, a diagonal block of
    the Gram matrix of all heads — one ``[H·D, H·D]`` product serves every grouping (float64)."""
    if x.dim() != 4:
        raise ValueError(f"x must be [batch, heads, tokens, head_dim]; got {tuple(x.shape)}")
    b, h, t, d = x.shape
    if not isinstance(g, int) or g < 1 or h % g:
        raise ValueError(f"g must be a positive divisor of the number of heads ({h}); got {g!r}")
    m = x.permute(0, 2, 1, 3).reshape(b * t, h * d).double()
    gram = m.T @ m
    out = []
    for i in range(h // g):
        sl = slice(i * g * d, (i + 1) * g * d)
        ev = torch.linalg.eigvalsh(gram[sl, sl]).flip(0).clamp_min(0)
        out.append(ev.cumsum(0) / ev.sum())
    return torch.stack(out)


def rank_for_energy(cum: Tensor, threshold: float) -> int:
    """Smallest ``r`` with ``E(r) ≥ threshold`` (``cum`` from :func:`cumulative_energy`)."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1]; got {threshold!r}")
    return int((cum < threshold - 1e-12).sum().item()) + 1


# ---------------------------------------------------------------------------------------------------------
# The measurement
# ---------------------------------------------------------------------------------------------------------
@torch.no_grad()
def measure(model, ids: Tensor, newline_ids: Tensor | None = None, n_sink: int = 1, n_sink_wide: int = 4,
            min_query: int = 32, local_window: int = 16, top_frac: float = 0.1, profile_keys: int = 16) -> dict:
    """Run each row of ``ids [W, T]`` through ``model`` (full cache, one window at a time) and collect every
    statistic as tensors (``L`` layers, ``H`` heads, ``W`` windows).

    ``newline_ids``: bool ``[vocab]`` marking tokens that hold a line break (their attention share is measured
    against their frequency); ``None`` skips that statistic.  Returned keys: ``sink``, ``sink_wide``, ``local``,
    ``top``, ``top_no_sink``, ``row_top`` ``[W, L, H]``; ``newline`` ``[W, L, H]`` and ``newline_uniform`` ``[W]`` (if asked);
    ``profile [L, profile_keys]`` (mean attention to key positions 0, 1, …); ``sorted_scores [L, T]`` (normalised
    H2O scores, descending, mean over heads and windows); ``k``, ``k_pre``, ``v``: per layer ``[W, H, T, D]``;
    ``spectra[name][g]``: per layer ``[H/g, g·D]`` cumulative energies; the uniform-attention baselines; ``params``.
    """
    if ids.dim() != 2:
        raise ValueError(f"ids must be [windows, tokens]; got {tuple(ids.shape)}")
    if newline_ids is not None and (newline_ids.dtype != torch.bool or newline_ids.shape != (model.config.vocab_size,)):
        raise ValueError(f"newline_ids must be a bool tensor [vocab_size] = [{model.config.vocab_size}]; got "
                         f"{newline_ids.dtype} {tuple(newline_ids.shape)}")
    n_layers, t = model.config.num_hidden_layers, ids.shape[1]
    pre: list[Tensor] = []
    hooks = [layer.self_attn.k_proj.register_forward_hook(lambda _m, _i, out: pre.append(out.detach()))
             for layer in model.model.layers]
    names = ["sink", "sink_wide", "local", "top", "top_no_sink", "row_top"] + (["newline"] if newline_ids is not None else [])
    stats: dict[str, list] = {k: [] for k in names}
    nl_uniform = []
    profile = torch.zeros(n_layers, profile_keys, dtype=torch.float64)
    sorted_scores = torch.zeros(n_layers, t, dtype=torch.float64)
    kv: dict[str, list[list[Tensor]]] = {n: [[] for _ in range(n_layers)] for n in ("k", "k_pre", "v")}
    try:
        for row in ids:
            pre.clear()
            out = model(row[None], output_attentions=True)
            per: dict[str, list] = {k: [] for k in names}
            for li, probs in enumerate(out.attentions):
                probs = probs.double()
                per["sink"].append(sink_mass(probs, n_sink, min_query)[0])
                per["sink_wide"].append(sink_mass(probs, n_sink_wide, min_query)[0])
                per["local"].append(local_mass(probs, local_window, min_query)[0])
                if newline_ids is not None:
                    mass, uni = key_class_mass(probs, newline_ids[row][None], min_query)
                    per["newline"].append(mass[0])
                profile[li] += probs[0, :, min_query:, :profile_keys].mean(dim=(0, 1)) / len(ids)
                score = accumulated_attention(probs)[0]  # [H, T]
                per["top"].append(top_share(score, top_frac))
                per["top_no_sink"].append(top_share(score[:, n_sink_wide:], top_frac))
                per["row_top"].append(row_top_share(probs, top_frac, min_query)[0])
                norm = (score / score.sum(-1, keepdim=True)).sort(-1, descending=True).values
                sorted_scores[li] += norm.mean(0) / len(ids)
                b, h_kv, _, d = out.cache.k[li].shape
                kv["k"][li].append(out.cache.k[li].float())
                kv["v"][li].append(out.cache.v[li].float())
                kv["k_pre"][li].append(pre[li].float().view(b, t, h_kv, d).transpose(1, 2))
            if newline_ids is not None:
                nl_uniform.append(uni[0])
            for k in names:
                stats[k].append(torch.stack(per[k]))
    finally:
        for hk in hooks:
            hk.remove()
    res: dict = {k: torch.stack(v) for k, v in stats.items()}
    if newline_ids is not None:
        res["newline_uniform"] = torch.stack(nl_uniform)
    for name, per_layer in kv.items():
        res[name] = [torch.cat(x) for x in per_layer]
    h = res["k"][0].shape[1]
    groups = [g for g in range(1, h + 1) if h % g == 0]
    res["spectra"] = {name: {g: [group_spectra(x, g) for x in res[name]] for g in groups} for name in kv}
    u_acc = uniform_accumulated_attention(t)
    u_first = sum(1 / (i + 1) for i in range(min_query, t)) / (t - min_query)
    res.update(profile=profile, sorted_scores=sorted_scores,
               uniform_sink=uniform_sink_mass(t, n_sink, min_query),
               uniform_sink_wide=uniform_sink_mass(t, n_sink_wide, min_query),
               uniform_local=sum(min(local_window, i + 1) / (i + 1) for i in range(min_query, t)) / (t - min_query),
               uniform_profile=torch.full((profile_keys,), u_first),
               uniform_sorted=u_acc / u_acc.sum(),
               uniform_top=float(top_share(u_acc, top_frac)),
               uniform_top_no_sink=float(top_share(u_acc[n_sink_wide:], top_frac)),
               uniform_row_top=sum(math.ceil(top_frac * (i + 1)) / (i + 1) for i in range(min_query, t)) / (t - min_query),
               params={"n_sink": n_sink, "n_sink_wide": n_sink_wide, "min_query": min_query, "local_window": local_window,
                           "top_frac": top_frac, "windows": int(ids.shape[0]), "window_tokens": int(t), "groups": groups})
    return res


def _r(x, nd: int = 4):
    if isinstance(x, Tensor):
        x = x.tolist()
    if isinstance(x, (list, tuple)):
        return [_r(v, nd) for v in x]
    return round(float(x), nd)


LABELS = {"k": "k_post_rope", "k_pre": "k_pre_rope", "v": "v"}


def summarize(res: dict) -> dict:
    """JSON-ready numbers from :func:`measure`: per layer (mean over heads and windows) and per layer × head."""
    p = res["params"]
    sw = p["n_sink_wide"]
    sinks = {
        "what": f"mean over queries i >= {p['min_query']} (and over windows) of the attention on the first token, "
                f"the first {sw} tokens, the {p['local_window']} most recent keys, tokens holding a line break; "
                "uniform_* = the same for uniform causal attention A[i, j] = 1/(i+1)",
        "first_token_mass_layer_head": _r(res["sink"].mean(0)),
        "first_token_mass_per_layer": _r(res["sink"].mean(dim=(0, 2))),
        "first_token_mass_max_head": _r(res["sink"].mean(0).max()),
        "first_token_mass_mean": _r(res["sink"].mean()),
        "uniform_first_token_mass": _r(res["uniform_sink"], 5),
        f"first_{sw}_mass_per_layer": _r(res["sink_wide"].mean(dim=(0, 2))),
        f"first_{sw}_mass_mean": _r(res["sink_wide"].mean()),
        f"uniform_first_{sw}_mass": _r(res["uniform_sink_wide"], 5),
        "mean_attention_by_key_position_per_layer": _r(res["profile"], 5),
        f"recent_{p['local_window']}_mass_per_layer": _r(res["local"].mean(dim=(0, 2))),
        f"uniform_recent_{p['local_window']}_mass": _r(res["uniform_local"]),
    }
    if "newline" in res:
        sinks["newline_token_mass_per_layer"] = _r(res["newline"].mean(dim=(0, 2)))
        sinks["newline_token_mass_max_head_per_layer"] = _r(res["newline"].mean(0).max(-1).values)
        sinks["uniform_newline_token_mass"] = _r(res["newline_uniform"].mean())
    out: dict = {"params": p, "sinks": sinks}
    out["heavy_hitters"] = {
        "what": f"share of the accumulated attention (H2O score: sum over all queries of the attention a key "
                f"received) held by the top {p['top_frac']:.0%} of keys, per head; mean over heads and windows",
        "top_share_per_layer": _r(res["top"].mean(dim=(0, 2))),
        "top_share_layer_head": _r(res["top"].mean(0)),
        "top_share_mean": _r(res["top"].mean()),
        "uniform_attention_top_share": _r(res["uniform_top"]),
        f"top_share_without_first_{sw}_per_layer": _r(res["top_no_sink"].mean(dim=(0, 2))),
        f"top_share_without_first_{sw}_mean": _r(res["top_no_sink"].mean()),
        f"uniform_attention_top_share_without_first_{sw}": _r(res["uniform_top_no_sink"]),
        "per_query_top_share_per_layer": _r(res["row_top"].mean(dim=(0, 2))),
        "per_query_top_share_layer_head": _r(res["row_top"].mean(0)),
        "per_query_top_share_mean": _r(res["row_top"].mean()),
        "uniform_attention_per_query_top_share": _r(res["uniform_row_top"]),
        "per_query_what": f"per query i >= {p['min_query']}: share of its attention row held by its top "
                          f"{p['top_frac']:.0%} of visible keys; mean over queries, heads and windows",
    }
    ch: dict = {"what": "per head: max over median of the per-channel mean |x| over tokens; per layer: mean and "
                        "max over heads"}
    for name, label in LABELS.items():
        ratios = torch.stack([outlier_ratio(channel_magnitude(x)) for x in res[name]])  # [L, H]
        ch[label] = {"max_over_median_per_layer": _r(ratios.mean(1), 2),
                     "max_over_median_max_head_per_layer": _r(ratios.max(1).values, 2),
                     "max_over_median_layer_head": _r(ratios, 2)}
    out["channels"] = ch
    d = res["k"][0].shape[-1]
    lr: dict = {"what": "uncentered SVD of the cache matrix (tokens of all windows x channels) of g consecutive "
                        "heads concatenated: rank reaching each energy threshold (mean over the H/g groups), and "
                        "the energy kept at rank head_dim (one head's worth: the best a merge of the g heads into "
                        "one KV head can keep)",
                "thresholds": list(THRESHOLDS), "head_dim": d, "groups": p["groups"]}
    for name, label in LABELS.items():
        lr[label] = {}
        for g, per_layer in res["spectra"][name].items():
            ranks = {f"{th:.2f}": _r([sum(rank_for_energy(c, th) for c in cums) / len(cums) for cums in per_layer], 1)
                     for th in THRESHOLDS}
            at_d = [float(cums[:, d - 1].mean()) for cums in per_layer]
            lr[label][f"g{g}"] = {"dims": g * d, "rank_per_layer": ranks, "energy_at_head_dim_per_layer": _r(at_d)}
    out["low_rank"] = lr
    return out


# ---------------------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------------------
def _layer_colors(n: int):
    cmap = plt.get_cmap("viridis")
    return [cmap(i / max(1, n - 1) * 0.9) for i in range(n)]


def plot_sinks(res: dict, path: Path) -> None:
    p = res["params"]
    n_layers = res["sink"].shape[1]
    bars = [("token 0", res["sink"], res["uniform_sink"]),
            (f"tokens 0–{p['n_sink_wide'] - 1}", res["sink_wide"], res["uniform_sink_wide"]),
            (f"{p['local_window']} most recent", res["local"], res["uniform_local"])]
    if "newline" in res:
        bars.insert(2, ("line-break tokens", res["newline"], float(res["newline_uniform"].mean())))
    fig, (a0, a1) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [1.3, 1]})
    w = 0.8 / len(bars)
    for bi, (label, val, uni) in enumerate(bars):
        ratio = val.mean(dim=(0, 2)) / uni  # [L]
        best = val.mean(0).max(-1).values / uni  # strongest head per layer
        xs = [li + (bi - (len(bars) - 1) / 2) * w for li in range(n_layers)]
        a0.bar(xs, ratio.numpy(), w, color=f"C{bi}", label=label)
        a0.plot(xs, best.numpy(), "_", color="k", ms=7)
    a0.axhline(1, color="k", lw=0.8, ls="--")
    a0.plot([], [], "_", color="k", label="strongest head")
    a0.set(yscale="log", xlabel="layer", xticks=range(n_layers), ylabel="attention mass / uniform",
           title=f"where queries ≥ {p['min_query']} put attention (1 = uniform)")
    a0.legend(fontsize=7, ncol=2)
    prof = res["profile"].numpy()
    for li, c in enumerate(_layer_colors(n_layers)):
        a1.plot(range(prof.shape[1]), prof[li], "o-", ms=3, color=c, label=f"layer {li}")
    a1.plot(range(prof.shape[1]), res["uniform_profile"].numpy(), "k--", lw=1, label="uniform")
    a1.set(yscale="log", xlabel="key position", ylabel="mean attention received",
           title="the first keys: no spike at token 0")
    a1.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=FIG_DPI)
    plt.close(fig)


def plot_heavy_hitters(res: dict, path: Path) -> None:
    s = res["sorted_scores"].numpy()
    n_layers = s.shape[0]
    top, row = res["top"].mean(dim=(0, 2)), res["row_top"].mean(dim=(0, 2))
    x = range(1, s.shape[1] + 1)
    frac = res["params"]["top_frac"]
    fig, (a0, a1) = plt.subplots(1, 2, figsize=(11, 3.9), gridspec_kw={"width_ratios": [1.3, 1]})
    for li, c in enumerate(_layer_colors(n_layers)):
        a0.plot(x, s[li], color=c, label=f"layer {li}")
    a0.plot(x, res["uniform_sorted"].numpy(), "k--", lw=1, label="uniform attention")
    a0.axvline(math.ceil(frac * s.shape[1]), color="grey", lw=0.5, ls=":")
    a0.set(xscale="log", yscale="log", xlabel="key rank (by accumulated attention)",
           ylabel="share of accumulated attention", title="sorted H2O scores (mean over heads, windows)")
    a0.legend(fontsize=7, ncol=2)
    w = 0.38
    a1.bar([li - w / 2 for li in range(n_layers)], row.numpy(), w, color="C1", label="per query row")
    a1.bar([li + w / 2 for li in range(n_layers)], top.numpy(), w, color="C0", label="accumulated (H2O score)")
    a1.axhline(res["uniform_row_top"], color="C1", ls="--", lw=1, label="uniform, per row")
    a1.axhline(res["uniform_top"], color="C0", ls="--", lw=1, label="uniform, accumulated")
    a1.set(ylim=(0, 1), xlabel="layer", xticks=range(n_layers), ylabel=f"share held by top {frac:.0%} of keys",
           title=f"mass in the top {frac:.0%} of keys")
    a1.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=FIG_DPI)
    plt.close(fig)


def plot_channels(res: dict, path: Path) -> None:
    n_layers = len(res["k"])
    cols = 3
    rows = math.ceil(n_layers / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(11, 2.4 * rows), sharex=True, squeeze=False)
    for li in range(n_layers):
        ax = axes[li // cols][li % cols]
        mk, mv = channel_magnitude(res["k"][li]), channel_magnitude(res["v"][li])
        h, d = mk.shape
        ax.plot(mk.flatten().numpy(), lw=0.8, color="C3", label="K (post-RoPE)")
        ax.plot(mv.flatten().numpy(), lw=0.8, color="C0", label="V")
        for b in range(1, h):
            ax.axvline(b * d, color="grey", lw=0.5, ls=":")
        rk, rv = outlier_ratio(mk).mean(), outlier_ratio(mv).mean()
        ax.set_title(f"layer {li}: max/median K {rk:.1f}, V {rv:.1f}", fontsize=9)
        if li % cols == 0:
            ax.set_ylabel("mean |x|")
        if li // cols == rows - 1:
            ax.set_xlabel(f"channel ({h} heads × {d})")
    for j in range(n_layers, rows * cols):
        axes[j // cols][j % cols].axis("off")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=FIG_DPI)
    plt.close(fig)


def plot_spectrum(res: dict, path: Path) -> None:
    groups = res["params"]["groups"]
    g_all = groups[-1]
    n_layers = len(res["k"])
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.6), sharey=True)
    for ax, name, title in zip(axes, ("k", "k_pre", "v"), ("K post-RoPE (as cached)", "K pre-RoPE", "V")):
        for li, c in enumerate(_layer_colors(n_layers)):
            cum_all = res["spectra"][name][g_all][li][0].numpy()
            cum_head = res["spectra"][name][1][li].mean(0).numpy()
            ax.plot(range(1, len(cum_all) + 1), cum_all, color=c, label=f"layer {li}")
            ax.plot(range(1, len(cum_head) + 1), cum_head, color=c, ls="--", lw=0.9)
        for th in THRESHOLDS:
            ax.axhline(th, color="grey", lw=0.5, ls=":")
        ax.set(xscale="log", xlabel="rank r", title=title, ylim=(0, 1.01))
    axes[0].set_ylabel("cumulative energy E(r)")
    axes[0].plot([], [], "k-", label=f"{g_all} heads concatenated")
    axes[0].plot([], [], "k--", label="one head (mean)")
    axes[0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=FIG_DPI)
    plt.close(fig)


def plot_all(res: dict, fig_dir: str | Path) -> list[Path]:
    """Write ``sinks.png``, ``heavy_hitters.png``, ``kv_channels.png``, ``kv_spectrum.png`` to ``fig_dir``."""
    fig_dir = Path(fig_dir)
    fig_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, fn in (("sinks", plot_sinks), ("heavy_hitters", plot_heavy_hitters), ("kv_channels", plot_channels),
                     ("kv_spectrum", plot_spectrum)):
        paths.append(fig_dir / f"{name}.png")
        fn(res, paths[-1])
    return paths


def newline_token_ids(tok, vocab_size: int) -> Tensor:
    """Bool ``[vocab_size]``: tokens whose text holds a line break."""
    return torch.tensor(["\n" in tok.decode([i]) for i in range(vocab_size)])


# ---------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="kvcourse-llama", help="shipped model name or folder (refimpl backend)")
    p.add_argument("--out", default="models/kvcourse-llama/structure.json")
    p.add_argument("--fig-dir", default="models/kvcourse-llama/figures")
    p.add_argument("--windows", type=int, default=6)
    p.add_argument("--window-tokens", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ablation-windows", type=int, default=1, help="windows for the StreamingLLM sink ablation")
    a = p.parse_args(argv)
    from refimpl.data import HELDOUT_PG_NUMBERS, heldout_text
    from refimpl.loading import load_model

    t0 = time.perf_counter()
    torch.manual_seed(a.seed)
    model, tok = load_model(a.model, dtype=torch.float32)
    text = heldout_text()
    ids, offsets = heldout_windows(tok, text, a.windows, a.window_tokens, a.seed)
    t1 = time.perf_counter()
    res = measure(model, ids, newline_token_ids(tok, model.config.vocab_size))
    summary = summarize(res)
    n_abl = min(a.ablation_windows, len(ids))
    summary["sinks"]["streaming_perplexity"] = {
        "what": f"perplexity of {n_abl * a.window_tokens} held-out tokens (the first {n_abl} window(s)) fed 16 at "
                "a time through the full cache, a sliding window, and StreamingLLM (sinks + window)",
        **{k: round(v, 2) for k, v in sink_ablation(model, ids[:n_abl]).items()}}
    t2 = time.perf_counter()
    paths = plot_all(res, a.fig_dir)
    out = {"model": a.model, "device": "cpu", "dtype": "float32", "seed": a.seed,
           "heldout_books": HELDOUT_PG_NUMBERS, "window_char_offsets": offsets,
           "window_first_tokens": [tok.decode(r[:8].tolist()) for r in ids], **summary,
           "runtime_s": {"load": round(t1 - t0, 1), "measure": round(t2 - t1, 1),
                         "plot": round(time.perf_counter() - t2, 1), "torch_threads": torch.get_num_threads()}}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1, ensure_ascii=False)
    s, hh, ch, lr = out["sinks"], out["heavy_hitters"], out["channels"], out["low_rank"]
    g_all = f"g{lr['groups'][-1]}"
    print("attention on token 0 per layer:", s["first_token_mass_per_layer"], "uniform", s["uniform_first_token_mass"])
    print("streaming perplexity:", s["streaming_perplexity"])
    print("top-10% share per layer:", hh["top_share_per_layer"], "uniform", hh["uniform_attention_top_share"])
    print("K max/median per layer:", ch["k_post_rope"]["max_over_median_per_layer"],
          "V:", ch["v"]["max_over_median_per_layer"])
    print(f"rank for 90% energy, all heads ({lr['k_post_rope'][g_all]['dims']} dims), K:",
          lr["k_post_rope"][g_all]["rank_per_layer"]["0.90"], "V:", lr["v"][g_all]["rank_per_layer"]["0.90"])
    print("wrote", a.out, *map(str, paths), f"in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
