"""A Llama-architecture decoder written from scratch, in one file, that loads Hugging Face checkpoints.

Block (Touvron et al. 2023, "LLaMA", arXiv 2302.13971):

    h   = x + Attn(RMSNorm(x))            RMSNorm(x) = w ⊙ x / sqrt(mean(x²) + ε)      (Zhang & Sennrich 2019)
    out = h + W_down(SiLU(W_gate h') ⊙ W_up h'),  h' = RMSNorm(h)                     (SwiGLU, Shazeer 2020)

Attention with rotary position embeddings (RoPE, Su et al. 2021, eq. 34): for a head vector split into halves
(x₁, x₂) and frequencies θ_i = base^(-2i/d),

    RoPE(x, m) = x ⊙ cos(mθ) + rotate_half(x) ⊙ sin(mθ),    rotate_half(x) = (-x₂, x₁)

so that ⟨RoPE(q, m), RoPE(k, n)⟩ depends only on m − n.  Keys are rotated *before* they are cached.

Grouped-query attention (Ainslie et al. 2023, arXiv 2305.13245): ``num_key_value_heads`` = H_kv divides the
H query heads; query head h reads KV head ``h // G`` with G = H / H_kv.  MHA is G = 1, MQA is H_kv = 1.  We share
by index — the query is viewed as ``[B, H_kv, G, T, D]`` — and never copy K/V per query head.

All cache handling goes through :class:`refimpl.cache.KVCache`; the model never knows which policy it holds.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .cache import DenseCache, KVCache, LayerKV
from .config import ModelConfig

__all__ = ["CausalLMOutput", "LlamaModel", "RMSNorm", "apply_rope", "rope_frequencies", "rotate_half"]


# ---------------------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rope_frequencies(cfg: ModelConfig, device: torch.device | str | None = None) -> Tensor:
    """Inverse frequencies θ_i = base^(-2i/d), i < d/2, with Llama-3 long-context scaling when configured."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d))
    sc = cfg.rope_scaling
    if sc and sc.get("rope_type") == "llama3":
        # Llama 3.1 "frequency-dependent" scaling: long wavelengths are divided by `factor`, short ones kept,
        # and the band in between interpolated smoothly.
        factor, low, high = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
        old_ctx = sc["original_max_position_embeddings"]
        low_wl, high_wl = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wl, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wl) & (wavelen <= low_wl)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_cos_sin(inv_freq: Tensor, position_ids: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos/sin tables ``[B, T, D]`` for integer ``position_ids`` ``[B, T]``, computed in fp32."""
    freqs = position_ids[..., None].float() * inv_freq.float()  # [B, T, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x`` ``[B, H, T, D]`` by the tables ``[B, T, D]``."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


def causal_mask(t_q: int, t_k: int, device: torch.device) -> Tensor:
    """``[T_q, T_k]`` bool: the T_q new queries are the last T_q of the T_k keys."""
    q_pos = torch.arange(t_k - t_q, t_k, device=device)[:, None]
    return torch.arange(t_k, device=device)[None, :] <= q_pos


# ---------------------------------------------------------------------------------------------------------
# Attention, MLP, block
# ---------------------------------------------------------------------------------------------------------
class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.h, self.h_kv, self.d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        qkv_bias = cfg.attention_bias or cfg.qkv_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.h * self.d, bias=qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.h_kv * self.d, bias=qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.h_kv * self.d, bias=qkv_bias)
        self.o_proj = nn.Linear(self.h * self.d, cfg.hidden_size, bias=cfg.attention_bias)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None, key_mask: Tensor | None,
                want_probs: bool) -> tuple[Tensor, Tensor | None]:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.h, self.d).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.h_kv, self.d).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.h_kv, self.d).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # rotate BEFORE caching

        if cache is not None:
            kv = cache.update(self.layer_idx, k, v, key_mask)
        else:  # no cache (training, scoring): attend over this step's keys only
            kv = LayerKV(k, v, None if key_mask is None else key_mask[:, None, :].expand(-1, self.h_kv, -1))
        t_k = kv.k.shape[2]
        need_probs = want_probs or (cache is not None and cache.needs_attention(self.layer_idx))
        g = self.h // self.h_kv
        decode = kv.key_mask is None and t == 1  # one query per head sees every stored key: a GEMV
        if need_probs or kv.key_mask is not None or t not in (1, t_k):
            allowed = causal_mask(t, t_k, x.device)[None, None]  # [1, 1, T, T_k]
            if kv.key_mask is not None:
                allowed = allowed & kv.key_mask[:, :, None, :]  # [B, H_kv, T, T_k]
        probs = None
        if need_probs or decode:
            # Explicit path: share K/V by index — queries grouped as [B, H_kv, G, T, D].
            qg = q.view(b, self.h_kv, g, t, self.d)
            scores = torch.einsum("bkgtd,bksd->bkgts", qg, kv.k) / math.sqrt(self.d)
            if need_probs:
                scores = scores.masked_fill(~allowed[:, :, None], torch.finfo(scores.dtype).min)
            p = torch.softmax(scores.float(), dim=-1).to(q.dtype)
            out = torch.einsum("bkgts,bksd->bkgtd", p, kv.v).reshape(b, self.h, t, self.d)
            if need_probs:
                probs = p.reshape(b, self.h, t, t_k)
                if cache is not None:
                    cache.observe(self.layer_idx, probs)
        elif kv.key_mask is None and t == t_k:  # prefill from empty: plain causal (flash path on GPU)
            out = F.scaled_dot_product_attention(q, kv.k, kv.v, is_causal=True, enable_gqa=g > 1)
        else:
            mask = allowed if allowed.shape[1] == 1 else allowed.repeat_interleave(g, dim=1)
            bias = torch.zeros(mask.shape, dtype=q.dtype, device=x.device).masked_fill(~mask, torch.finfo(q.dtype).min)
            out = F.scaled_dot_product_attention(q, kv.k, kv.v, attn_mask=bias, enable_gqa=g > 1)
        out = out.transpose(1, 2).reshape(b, t, self.h * self.d)
        return self.o_proj(out), (probs if want_probs else None)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, cache, key_mask, want_probs):
        a, probs = self.self_attn(self.input_layernorm(x), cos, sin, cache, key_mask, want_probs)
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x)), probs


class Decoder(nn.Module):
    """``model.*`` in Hugging Face's parameter names."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


@dataclass
class CausalLMOutput:
    logits: Tensor  # [B, T, vocab] (or the last `logits_to_keep` positions)
    cache: KVCache | None
    attentions: list[Tensor] | None = None  # per layer [B, H, T_q, T_k] when requested
    hidden_states: list[Tensor] | None = None  # embeddings + every block's output when requested


# ---------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------
class LlamaModel(nn.Module):
    """Llama-family causal LM.  ``forward(input_ids, attention_mask=None, position_ids=None, cache=None)``.

    With ``cache=None`` a fresh :class:`DenseCache` is made and returned; ``use_cache=False`` runs without one
    (training and scoring: each call attends over its own tokens only).

    ``attention_mask`` follows Hugging Face: ``[B, T_past + T_new]`` with 1 for real tokens, 0 for padding.
    Positions default to ``cumsum(mask) - 1`` so left-padded rows get the same positions as when alone.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_frequencies(cfg), persistent=False)

    # -- inference -------------------------------------------------------------------------------------
    def new_cache(self) -> DenseCache:
        return DenseCache(self.config.num_hidden_layers)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                cache: KVCache | None = None, logits_to_keep: int = 0, output_attentions: bool = False,
                output_hidden_states: bool = False, use_cache: bool = True) -> CausalLMOutput:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, tokens]; got shape {tuple(input_ids.shape)}")
        b, t = input_ids.shape
        if cache is None and use_cache:
            cache = self.new_cache()
        past = cache.seq_length(0) if cache is not None else 0
        key_mask = None
        if attention_mask is not None:
            if attention_mask.shape != (b, past + t):
                raise ValueError(
                    f"attention_mask must be [batch, past + new tokens] = {(b, past + t)}; got {tuple(attention_mask.shape)}"
                )
            key_mask = attention_mask[:, -t:].bool()
            if position_ids is None:
                pos = attention_mask.long().cumsum(-1) - 1
                position_ids = pos.masked_fill(attention_mask == 0, 1)[:, -t:]
        if position_ids is None:
            position_ids = torch.arange(past, past + t, device=input_ids.device)[None].expand(b, -1)
        x = self.model.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(self.inv_freq, position_ids, x.dtype)
        attns, hiddens = [], [x] if output_hidden_states else None
        for layer in self.model.layers:
            x, probs = layer(x, cos, sin, cache, key_mask, output_attentions)
            if output_attentions:
                attns.append(probs)
            if output_hidden_states:
                hiddens.append(x)
        x = self.model.norm(x)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        return CausalLMOutput(self.lm_head(x), cache, attns if output_attentions else None, hiddens)

    @torch.no_grad()
    def generate(self, input_ids: Tensor, max_new_tokens: int, cache: KVCache | None = None,
                 attention_mask: Tensor | None = None, eos_token_id: int | None = None) -> Tensor:
        """Greedy decoding with the cache: prefill once, then one token per step.  Returns only new tokens."""
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0; got {max_new_tokens}")
        cache = cache if cache is not None else self.new_cache()
        out = self(input_ids, attention_mask=attention_mask, cache=cache, logits_to_keep=1)
        new = []
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for _ in range(max_new_tokens):
            nxt = out.logits[:, -1].argmax(-1)
            if eos_token_id is not None:
                nxt = nxt.masked_fill(done, eos_token_id)
                done |= nxt == eos_token_id
            new.append(nxt)
            if len(new) == max_new_tokens or (eos_token_id is not None and bool(done.all())):
                break  # the last token is returned, not fed back
            if attention_mask is not None:
                attention_mask = torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], 1)], 1)
            out = self(nxt[:, None], attention_mask=attention_mask, cache=cache, logits_to_keep=1)
        return torch.stack(new, 1) if new else input_ids.new_zeros(input_ids.shape[0], 0)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())

    # -- Hugging Face checkpoints ----------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: torch.dtype | str | None = None,
                        device: str | torch.device = "cpu") -> LlamaModel:
        """Load ``config.json`` + ``*.safetensors`` (single or sharded) written by Hugging Face or by us."""
        from safetensors.torch import load_file

        path = os.fspath(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{path!r} is not a directory holding config.json and safetensors weights")
        cfg = ModelConfig.from_hf(path)
        dtype = _resolve_dtype(dtype)
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors files in {path!r}")
        state = {}
        for f in files:
            state.update(load_file(os.path.join(path, f), device=str(device)))
        with torch.device("meta"):
            model = cls(cfg)
        if cfg.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        unexpected = model.load_state_dict(state, strict=False, assign=True).unexpected_keys
        unexpected = [k for k in unexpected if not k.endswith("rotary_emb.inv_freq")]
        if unexpected:
            raise ValueError(f"checkpoint {path!r} has tensors this {cfg.model_type} architecture does not use "
                             f"(unexpected: {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}); is its "
                             f"model_type right?")
        if cfg.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        missing = [n for n, p in model.named_parameters() if p.is_meta]
        if missing:
            raise ValueError(f"checkpoint {path!r} lacks parameters {missing[:5]}{'...' if len(missing) > 5 else ''}")
        model.inv_freq = rope_frequencies(cfg, device=device)
        if dtype is not None:
            model = model.to(dtype)
        return model.eval()

    def save_pretrained(self, path: str | os.PathLike, dtype: torch.dtype | str | None = None,
                        max_shard_bytes: int | None = None) -> None:
        """Write ``config.json`` + ``model.safetensors`` (sharded when ``max_shard_bytes`` is set)."""
        from safetensors.torch import save_file

        os.makedirs(path, exist_ok=True)
        dtype = _resolve_dtype(dtype)
        state = {k: v.detach().to(dtype or v.dtype).contiguous().cpu() for k, v in self.state_dict().items()}
        if self.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        hf = self.config.to_hf()
        hf["dtype"] = str(next(iter(state.values())).dtype).replace("torch.", "")
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(hf, f, indent=2, sort_keys=True)
        for f in os.listdir(path):
            if f.endswith(".safetensors") or f == "model.safetensors.index.json":
                os.remove(os.path.join(path, f))
        if not max_shard_bytes:
            save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
            return
        shards, cur, size = [], {}, 0
        for k, v in state.items():
            nb = v.numel() * v.element_size()
            if cur and size + nb > max_shard_bytes:
                shards.append(cur)
                cur, size = {}, 0
            cur[k], size = v, size + nb
        shards.append(cur)
        weight_map = {}
        for i, sh in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(sh, os.path.join(path, name), metadata={"format": "pt"})
            weight_map.update({k: name for k in sh})
        total = sum(v.numel() * v.element_size() for v in state.values())
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        if dtype is not None and dtype not in _DTYPES.values():
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}; got {dtype}")
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}; got {dtype!r}")
    return _DTYPES[dtype]
