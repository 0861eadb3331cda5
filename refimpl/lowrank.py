r"""Low-rank KV-head compression: convert MHA (or GQA) to GQA with fewer KV heads by PCA of the cache.

Yu, Yang, Li, Li & Wu 2024, "Effectively Compress KV Heads for LLM" (arXiv 2406.07056): the K and V caches of
the g heads of a group are *low-rank*, so one head of ``d`` dims can carry most of the group's ``g·d`` dims.

Values (exact algebra, any positional encoding).  Stack the group's values ``v = [v_1; …; v_g] ∈ R^{g·d}``.
With ``U ∈ R^{g·d×d}`` the top-d eigenvectors of the calibration second moment ``E[v vᵀ] = W̃ S W̃ᵀ``
(see :mod:`refimpl.calibration`), blocks ``U = [U_1; …; U_g]``:

    v' = Uᵀ v = Σ_s U_sᵀ v_s           → the new v_proj rows are ``Uᵀ [W_V1; …; W_Vg]``          (one KV head)
    v_s ≈ U_s v'                       → head h (reading v_s) outputs ``Σ_t p_ht U_s v'_t = U_s o'_h``,
                                          so ``U_s`` folds into head h's columns of ``W_O``: ``W_O^h ← W_O^h U_s``.

Retained energy ``Σ_{i≤d} λ_i / Σ_i λ_i = 1 − ‖V − V̂‖²_F / ‖V‖²_F`` (uncentered PCA = SVD of the cache).

Keys without RoPE work the same way, folding ``U_s`` into ``W_Q`` (``q·k_s ≈ q·U_s k' = (U_sᵀ q)·k'``).
With RoPE the score is ``⟨R_m q, R_n k_s⟩`` and the fold needs ``R_n U_s = U_s R_n`` for every position n —
false for a generic ``U_s``.  That is the "RoPE-unaware SVD" (``key_method="rope_unaware"``): exact on paper,
wrong in the model, even at full rank.

RoPE-aware keys (``key_method="rope_aware"``).  In the ``rotate_half`` layout coordinates ``(i, i + d/2)``
rotate together at frequency θ_i; write them as one complex number ``z_i = k_i + j·k_{i+d/2}``, then
``RoPE(k, n)_i = e^{j n θ_i} z_i``.  A real linear map commutes with every ``R_n`` iff it acts on each
frequency as a complex scalar (a 2×2 block ``[[a, −b], [b, a]]``; frequencies are distinct, so nothing may
mix them).  So we restrict ``U_s`` to that form, ``U_s = diag_i(c_{s,i})``: for every frequency i separately,

    C_i = E[z_i z_iᴴ] ∈ C^{g×g}   (z_i = the g heads' i-th complex coordinate),   c_i = top eigenvector of C_i,
    k'_i = c_iᴴ z_i,    z_{s,i} ≈ c_{s,i} k'_i,     W_Q^h ← U_sᵀ W_Q^h   (multiply query pair i by conj(c_{s,i}))

— a complex rank-1 PCA per frequency.  ``U = [U_1; …; U_g]`` again has orthonormal columns, so both methods
share one code path; only the *set* of allowed ``U`` differs.  Because ``|e^{jnθ}| = 1``, ``C_i`` is the same
for keys before and after RoPE: the RoPE-aware basis is a property of the cache the model actually stores.
``key_method="rope_aware_real"`` restricts ``c_i`` to real vectors (the same real combination of heads for
both coordinates of a pair: PCA of ``Re C_i``), a smaller commuting family kept for comparison.

The paper's abstract states "specialized strategies for key caches with RoPE"; its full text was not
available to us, so the per-frequency construction above is *our* closest construction that yields a
standard GQA checkpoint (see ``notebooks/02_low_rank_kv_heads.ipynb``).  The result is a plain
:class:`~refimpl.model.LlamaModel` with ``num_key_value_heads`` reduced: ``save_pretrained`` writes a
Hugging Face checkpoint that ``transformers`` loads with no custom code.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from .calibration import AttentionInputStats
from .gqa import valid_kv_head_counts
from .model import LlamaModel

__all__ = [
    "KEY_METHODS",
    "LayerPlan",
    "allowed_kv_heads",
    "apply_plan",
    "commuting_block",
    "convert_to_gqa",
    "cumulative_energy",
    "pca_basis",
    "plan_conversion",
    "rope_aware_basis",
    "rope_matrix",
    "singular_values",
]

KEY_METHODS = ("rope_aware", "rope_aware_real", "rope_unaware")


@dataclass
class LayerPlan:
    """One layer's conversion.  ``key_u``/``value_u``: ``[H_kv_new, g·d, d]`` float64 with orthonormal columns;
    block ``s`` (rows ``s·d:(s+1)·d``) maps the new head to source head ``s`` of the group.
    ``key_energy``/``value_energy``: fraction of the calibration cache energy the new heads keep."""

    key_u: Tensor
    value_u: Tensor
    key_energy: float
    value_energy: float


# ---------------------------------------------------------------------------------------------------------
# Linear algebra
# ---------------------------------------------------------------------------------------------------------
def singular_values(x: Tensor) -> Tensor:
    """Singular values of ``x`` ``[N, D]`` (descending, float64) — the spectrum of a cache matrix."""
    if x.dim() != 2:
        raise ValueError(f"x must be a matrix [tokens, dims]; got shape {tuple(x.shape)}")
    return torch.linalg.svdvals(x.double())


def cumulative_energy(s: Tensor) -> Tensor:
    """``E_r = Σ_{i≤r} σ_i² / Σ_i σ_i²`` for r = 1..len(s): the fraction a rank-r approximation keeps."""
    e = s.double().pow(2)
    return e.cumsum(0) / e.sum()


def pca_basis(c: Tensor, rank: int) -> tuple[Tensor, float]:
    """Top-``rank`` eigenvectors of the symmetric PSD second moment ``c`` and the energy fraction they keep."""
    if c.dim() != 2 or c.shape[0] != c.shape[1]:
        raise ValueError(f"c must be a square matrix; got shape {tuple(c.shape)}")
    if not 1 <= rank <= c.shape[0]:
        raise ValueError(f"rank must be in [1, {c.shape[0]}]; got {rank}")
    evals, evecs = torch.linalg.eigh(c.double())
    top = evals.flip(0)[:rank].clamp_min(0)
    total = evals.clamp_min(0).sum()
    return evecs.flip(1)[:, :rank].contiguous(), float(top.sum() / total) if total > 0 else 1.0


def commuting_block(c: Tensor) -> Tensor:
    """Real ``[d, d]`` matrix multiplying each rotary pair ``(i, i + d/2)`` by the complex scalar ``c[i]``.

    These are exactly the matrices that commute with every RoPE rotation (``rotate_half`` layout).
    """
    if not c.is_complex() or c.dim() != 1:
        raise ValueError(f"c must be a 1-D complex tensor of length head_dim/2; got {c.dtype} {tuple(c.shape)}")
    f = c.shape[0]
    a, b = c.real, c.imag
    m = torch.zeros(2 * f, 2 * f, dtype=a.dtype)
    i = torch.arange(f)
    m[i, i], m[i, i + f], m[i + f, i], m[i + f, i + f] = a, -b, b, a
    return m


def rope_matrix(inv_freq: Tensor, position: float) -> Tensor:
    """The RoPE rotation ``R_n`` as a real ``[d, d]`` matrix: ``RoPE(x, n) = R_n x`` for a column vector x."""
    ang = position * inv_freq.double()
    return commuting_block(torch.polar(torch.ones_like(ang), ang))


def _complex_moments(c: Tensor, g: int, d: int) -> Tensor:
    """``[d/2, g, g]`` Hermitian ``E[z_i z_iᴴ]`` per frequency from the real ``[g·d, g·d]`` second moment."""
    f = d // 2
    c4 = c.double().view(g, d, g, d)
    xx = c4[:, :f, :, :f].diagonal(dim1=1, dim2=3)  # [g, g, f]: E[x_s x_t] at the same frequency
    yy = c4[:, f:, :, f:].diagonal(dim1=1, dim2=3)
    yx = c4[:, f:, :, :f].diagonal(dim1=1, dim2=3)  # E[y_s x_t]
    xy = c4[:, :f, :, f:].diagonal(dim1=1, dim2=3)  # E[x_s y_t]
    # E[(x_s + j y_s)(x_t − j y_t)] = E[x_s x_t] + E[y_s y_t] + j (E[y_s x_t] − E[x_s y_t])
    return torch.complex(xx + yy, yx - xy).permute(2, 0, 1).contiguous()


def rope_aware_basis(c: Tensor, num_heads: int, head_dim: int, real: bool = False) -> tuple[Tensor, float]:
    """RoPE-commuting basis ``U = [diag(c_1); …; diag(c_g)]`` ``[g·d, d]`` from the group's key second moment.

    For each frequency, ``c_i`` is the top eigenvector of ``C_i = E[z_i z_iᴴ]`` (complex), or of ``Re C_i``
    with ``real=True``.  Returns the basis and the fraction of key energy it keeps.
    """
    g, d = num_heads, head_dim
    if d % 2:
        raise ValueError(f"head_dim must be even for RoPE; got {d}")
    if tuple(c.shape) != (g * d, g * d):
        raise ValueError(f"c must be [num_heads*head_dim]² = {(g * d, g * d)}; got {tuple(c.shape)}")
    cz = _complex_moments(c, g, d)
    if real:
        cz = cz.real
    evals, evecs = torch.linalg.eigh(cz)  # ascending; evecs [f, g, g] columns are eigenvectors
    top = evecs[:, :, -1]  # [f, g]
    if real:
        top = torch.complex(top, torch.zeros_like(top))
    blocks = [commuting_block(top[:, s]) for s in range(g)]
    total = torch.diagonal(c.double()).sum()
    kept = evals[:, -1].clamp_min(0).sum()
    return torch.cat(blocks, dim=0), float(kept / total) if total > 0 else 1.0


# ---------------------------------------------------------------------------------------------------------
# Planning and applying a conversion
# ---------------------------------------------------------------------------------------------------------
def allowed_kv_heads(model: LlamaModel) -> list[int]:
    """KV-head counts this model can be converted to (divisors of its current ``num_key_value_heads``)."""
    return valid_kv_head_counts(model.config.num_key_value_heads)


def _check_target(model: LlamaModel, num_key_value_heads: int) -> None:
    allowed = allowed_kv_heads(model)
    if not isinstance(num_key_value_heads, int) or isinstance(num_key_value_heads, bool) \
            or num_key_value_heads not in allowed:
        raise ValueError(
            f"num_key_value_heads must divide the model's current num_key_value_heads "
            f"({model.config.num_key_value_heads}) so that every group merges the same number of heads; "
            f"allowed values: {allowed}; got {num_key_value_heads!r}"
        )


def _augmented(lin: torch.nn.Linear) -> Tensor:
    """``[W | b]`` in float64 (b = 0 without bias), matching the ``[x; 1]`` of the calibration statistics."""
    w = lin.weight.detach().double().cpu()
    b = lin.bias.detach().double().cpu() if lin.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    return torch.cat([w, b[:, None]], dim=1)


@torch.no_grad()
def plan_conversion(model: LlamaModel, num_key_value_heads: int, stats: AttentionInputStats,
                    key_method: str = "rope_aware") -> list[LayerPlan]:
    """Choose, per layer and per new KV head, the key and value bases from the calibration statistics."""
    _check_target(model, num_key_value_heads)
    if key_method not in KEY_METHODS:
        raise ValueError(f"key_method must be one of {KEY_METHODS}; got {key_method!r}")
    cfg = model.config
    if not isinstance(stats, AttentionInputStats):
        raise TypeError(f"stats must be an AttentionInputStats from refimpl.calibration; got {type(stats).__name__}")
    if len(stats.gram) != cfg.num_hidden_layers or stats.hidden_size != cfg.hidden_size:
        raise ValueError(
            f"stats were collected on a model with {len(stats.gram)} layers and hidden_size {stats.hidden_size}; "
            f"this model has {cfg.num_hidden_layers} layers and hidden_size {cfg.hidden_size}"
        )
    d, n_src = cfg.head_dim, cfg.num_key_value_heads
    g = n_src // num_key_value_heads
    plans = []
    for layer, s in zip(model.model.layers, stats.gram):
        wk, wv = _augmented(layer.self_attn.k_proj), _augmented(layer.self_attn.v_proj)
        ku, vu, k_kept, v_kept, k_tot, v_tot = [], [], 0.0, 0.0, 0.0, 0.0
        for j in range(num_key_value_heads):
            rows = slice(j * g * d, (j + 1) * g * d)
            ck = wk[rows] @ s @ wk[rows].T  # E[k kᵀ] of the group's stacked pre-RoPE keys (summed over tokens)
            cv = wv[rows] @ s @ wv[rows].T
            if key_method == "rope_unaware":
                uk, ek = pca_basis(ck, d)
            else:
                uk, ek = rope_aware_basis(ck, g, d, real=key_method == "rope_aware_real")
            uv, ev = pca_basis(cv, d)
            ku.append(uk)
            vu.append(uv)
            tk, tv = float(torch.diagonal(ck).sum()), float(torch.diagonal(cv).sum())
            k_kept, v_kept, k_tot, v_tot = k_kept + ek * tk, v_kept + ev * tv, k_tot + tk, v_tot + tv
        plans.append(LayerPlan(torch.stack(ku), torch.stack(vu), k_kept / k_tot if k_tot else 1.0,
                               v_kept / v_tot if v_tot else 1.0))
    return plans


@torch.no_grad()
def apply_plan(model: LlamaModel, plans: list[LayerPlan]) -> LlamaModel:
    """A new :class:`LlamaModel` with ``plans[0].key_u.shape[0]`` KV heads and folded q/o projections."""
    cfg = model.config
    if len(plans) != cfg.num_hidden_layers:
        raise ValueError(f"plans must have one entry per layer ({cfg.num_hidden_layers}); got {len(plans)}")
    n_new = plans[0].key_u.shape[0]
    _check_target(model, n_new)
    d, h, n_src = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    g, g_src = n_src // n_new, h // n_src
    new_cfg = dataclasses.replace(cfg, num_key_value_heads=n_new)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for li, (layer, plan) in enumerate(zip(model.model.layers, plans)):
        if tuple(plan.key_u.shape) != (n_new, g * d, d) or tuple(plan.value_u.shape) != (n_new, g * d, d):
            raise ValueError(f"layer {li}: plan bases must be [{n_new}, {g * d}, {d}]")
        att = layer.self_attn
        p = f"model.layers.{li}.self_attn."
        for name, u in (("k_proj", plan.key_u), ("v_proj", plan.value_u)):
            w = _augmented(getattr(att, name)).view(n_new, g * d, -1)
            new = torch.einsum("jnd,jnc->jdc", u, w).reshape(n_new * d, -1)  # Uᵀ [W | b] per new head
            dt = state[p + name + ".weight"].dtype
            state[p + name + ".weight"] = new[:, :-1].to(dt).contiguous()
            if getattr(att, name).bias is not None:
                state[p + name + ".bias"] = new[:, -1].to(dt).contiguous()
        wq = _augmented(att.q_proj).view(h, d, -1)
        wo = att.o_proj.weight.detach().double().cpu().view(-1, h, d)
        for hq in range(h):
            src = hq // g_src
            j, local = divmod(src, g)
            a_k = plan.key_u[j, local * d:(local + 1) * d]  # k_src ≈ a_k k'  →  q ← a_kᵀ q
            a_v = plan.value_u[j, local * d:(local + 1) * d]  # v_src ≈ a_v v'  →  W_O^h ← W_O^h a_v
            wq[hq] = a_k.T @ wq[hq]
            wo[:, hq] = wo[:, hq] @ a_v
        dt = state[p + "q_proj.weight"].dtype
        wq = wq.reshape(h * d, -1)
        state[p + "q_proj.weight"] = wq[:, :-1].to(dt).contiguous()
        if att.q_proj.bias is not None:
            state[p + "q_proj.bias"] = wq[:, -1].to(dt).contiguous()
        state[p + "o_proj.weight"] = wo.reshape(wo.shape[0], h * d).to(dt).contiguous()
    ref = next(model.parameters())
    with torch.device("meta"):  # no random init: every parameter comes from `state`
        out = LlamaModel(new_cfg)
    out.load_state_dict({k: v.to(ref.device) for k, v in state.items()}, assign=True)
    if new_cfg.tie_word_embeddings:
        out.lm_head.weight = out.model.embed_tokens.weight
    out.inv_freq = model.inv_freq.clone()
    return out.eval()


def convert_to_gqa(model: LlamaModel, num_key_value_heads: int, stats: AttentionInputStats,
                   key_method: str = "rope_aware") -> LlamaModel:
    """MHA/GQA → GQA with ``num_key_value_heads`` KV heads by calibration PCA of the cache (arXiv 2406.07056).

    ``key_method``: ``"rope_aware"`` (per-frequency complex PCA; exact under RoPE when the rank suffices),
    ``"rope_aware_real"`` (same with real coefficients) or ``"rope_unaware"`` (plain PCA of the pre-RoPE keys
    folded into ``W_Q``; the foil that breaks under RoPE).  Values always use plain PCA folded into ``W_O``.
    """
    return apply_plan(model, plan_conversion(model, num_key_value_heads, stats, key_method))
