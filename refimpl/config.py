"""Model configuration for the from-scratch decoder, read from and written to Hugging Face ``config.json``.

Supported families are the ones whose decoder is exactly the Llama block (RMSNorm → attention with RoPE →
RMSNorm → SwiGLU MLP): ``llama``, ``mistral`` (without a sliding window) and ``qwen2`` (bias on q/k/v).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "llama3")

__all__ = ["SUPPORTED_MODEL_TYPES", "SUPPORTED_ROPE_TYPES", "ModelConfig"]


@dataclass
class ModelConfig:
    vocab_size: int = 8192
    hidden_size: int = 384
    intermediate_size: int = 1024
    num_hidden_layers: int = 6
    num_attention_heads: int = 6
    num_key_value_heads: int | None = None  # None → = num_attention_heads (MHA)
    head_dim: int | None = None  # None → hidden_size // num_attention_heads
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3", "factor": .., ...} or None
    tie_word_embeddings: bool = True
    attention_bias: bool = False  # bias on q, k, v, o (Llama's flag)
    qkv_bias: bool = False  # bias on q, k, v only (Qwen2)
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    extra: dict = field(default_factory=dict, repr=False)  # other keys of the HF config, written back on save

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                    f"({self.num_attention_heads}) unless head_dim is given"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim"):
            val = getattr(self, name)
            if not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be a positive int; got {val!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be divisible by num_key_value_heads "
                f"({self.num_key_value_heads}); allowed num_key_value_heads: "
                f"{[d for d in range(1, self.num_attention_heads + 1) if self.num_attention_heads % d == 0]}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE; got {self.head_dim}")
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type must be one of {SUPPORTED_MODEL_TYPES}; got {self.model_type!r}")
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"rope_scaling.rope_type must be one of {SUPPORTED_ROPE_TYPES}; got {rope_type!r}")

    @property
    def num_groups(self) -> int:
        """Query heads per KV head (G in the GQA paper): 1 = MHA, num_attention_heads = MQA."""
        return self.num_attention_heads // self.num_key_value_heads

    # -- Hugging Face config.json --------------------------------------------------------------------
    @classmethod
    def from_hf(cls, cfg: dict[str, Any] | Any) -> ModelConfig:
        """Build from a Hugging Face config (a dict, a ``PretrainedConfig`` or a path to ``config.json``)."""
        if isinstance(cfg, (str, os.PathLike)):
            path = os.fspath(cfg)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            if not os.path.exists(path):
                raise FileNotFoundError(f"no config.json at {path!r}")
            with open(path) as f:
                cfg = json.load(f)
        elif not isinstance(cfg, dict):
            cfg = cfg.to_dict()
        cfg = dict(cfg)
        model_type = cfg.get("model_type", "llama")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"checkpoint model_type {model_type!r} is not a Llama-family decoder; supported model_type values: "
                f"{SUPPORTED_MODEL_TYPES}. Use transformers' AutoModelForCausalLM (and refimpl.hf_bridge) for it."
            )
        if model_type == "mistral" and cfg.get("sliding_window") is not None:
            raise ValueError("mistral checkpoints with sliding_window set are not supported; sliding_window must be None")
        if model_type == "qwen2" and cfg.get("use_sliding_window"):
            raise ValueError("qwen2 checkpoints with use_sliding_window=True are not supported")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act must be 'silu' (SwiGLU); got {cfg.get('hidden_act')!r}")
        if cfg.get("mlp_bias"):
            raise ValueError("mlp_bias=True is not supported; it must be False")
        # transformers v5 keeps rope settings in `rope_parameters`; v4 used rope_theta + rope_scaling.
        rope = cfg.get("rope_parameters") or {}
        theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
        scaling = cfg.get("rope_scaling")
        if rope.get("rope_type", "default") != "default":
            scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        if scaling is not None and scaling.get("rope_type", scaling.get("type", "default")) == "default":
            scaling = None
        if scaling is not None and "rope_type" not in scaling:
            scaling = dict(scaling, rope_type=scaling.get("type"))
        known = {f.name for f in fields(cls)}
        kw = {k: cfg[k] for k in known if k in cfg and k not in ("rope_theta", "rope_scaling", "extra", "qkv_bias")}
        kw["rope_theta"] = float(theta)
        kw["rope_scaling"] = scaling
        kw["qkv_bias"] = model_type == "qwen2"
        kw.setdefault("tie_word_embeddings", cfg.get("tie_word_embeddings", False))
        kw["extra"] = {k: v for k, v in cfg.items() if k not in known}
        return cls(**kw)

    def to_hf(self) -> dict[str, Any]:
        """A ``config.json`` dict that ``transformers.AutoConfig`` reads as the same architecture."""
        d = asdict(self)
        extra = d.pop("extra")
        d.pop("qkv_bias")
        theta = d.pop("rope_theta")
        scaling = d.pop("rope_scaling")
        d["rope_parameters"] = {"rope_theta": theta, "rope_type": "default", **(scaling or {})}
        d.update({"hidden_act": "silu", "mlp_bias": False, "attention_dropout": 0.0})
        d["architectures"] = [{"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                               "qwen2": "Qwen2ForCausalLM"}[self.model_type]]
        out = {**extra, **d}
        out.pop("rope_theta", None)
        out.pop("rope_scaling", None)
        return out
