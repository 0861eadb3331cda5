"""Run any ``refimpl`` KV-cache policy inside a Hugging Face model's ``generate`` (transformers >= 5).

One adapter serves every technique in the course: :func:`make_hf_cache` wraps a :class:`refimpl.cache.KVCache`
into a ``transformers.Cache`` whose layer ``i`` forwards ``update(k, v)`` to ``policy.update(i, k, v, key_mask)``
and hands attention exactly what the policy returned.  Policies that score tokens by attention (H2O, SnapKV)
also need the step's probabilities; :func:`enable_kvcourse_attention` switches the model to the ``"kvcourse"``
attention function, registered with ``transformers.AttentionInterface``, which computes eager GQA attention

    P = softmax(q Kᵀ / √d + M),   out = P V,    q viewed as [B, H_kv, G, T_q, D], G = H / H_kv

(Vaswani et al. 2017, eq. 1; grouping as in Ainslie et al. 2023, GQA) and passes ``P`` ``[B, H, T_q, T_k]`` to
``policy.observe(i, P)`` after the step, as :class:`refimpl.model.LlamaModel` does.

Contract for policy authors (what the adapter relies on)
--------------------------------------------------------
* **Positions vs entries.** ``policy.seq_length(i)`` is the number of positions consumed; Hugging Face uses it
  for position ids (RoPE) and the query offset, exactly as for ``DynamicCache``.  ``policy.num_entries(i)`` is
  the number of entries kept.  Hugging Face sizes its masks with ``get_mask_sizes(T_new)`` =
  ``(kv_length, kv_offset) = (num_entries + T_new, seq_length − num_entries)``: the kept entries are treated as
  the positions just before the new tokens, so every kept entry is visible to every new query and the new
  tokens are causal among themselves — a correct causal mask even after eviction.
* **What ``update`` returns.** ``LayerKV(k, v, key_mask)`` with the new entries last, in order.
  ``key_mask`` ``[B, H_kv, T_k]`` may differ per head and per layer.
* **Default attention (``sdpa``/``eager``).**  The mask is built once per forward, before any update, from
  layer 0's sizes, and padding is read from the 2-D ``attention_mask`` *by position*.  So this path requires:
  ``update`` returns ``num_entries(0) + T_new`` entries in every layer (evict in ``observe`` or after the step),
  and no ``needs_attention``.  The adapter checks both and raises otherwise.  It also requires that padded batches
  are not combined with eviction (kept entries are no longer at their positions); this is checked when the
  ``kvcourse`` hook is installed, and cannot be seen without it — use the ``kvcourse`` attention for that case.
* **``kvcourse`` attention.**  Ignores Hugging Face's positional mask and builds its own from what the policy
  returned: the ``T_q`` new queries are the last ``T_q`` of the ``T_k`` entries (causal among themselves, all
  older entries visible) AND ``key_mask``.  Padding reaches the policy because a forward pre-hook on the model
  passes the new tokens' columns of ``attention_mask`` as ``key_mask`` to ``policy.update``.  Any policy works.
* **Unsupported** (clear errors): beam search and assisted decoding (they reorder, repeat or crop a filled
  cache), sliding-window or soft-capped attention layers.  Sampling with ``num_return_sequences > 1`` works
  (``generate`` expands the prompt before the first update).  ``is_compileable`` is False: no ``torch.compile``.

Example::

    model = enable_kvcourse_attention(AutoModelForCausalLM.from_pretrained(path))
    policy = DenseCache(model.config.num_hidden_layers)            # or any refimpl policy
    out = model.generate(ids, **cache_kwargs(model, make_hf_cache(policy)), max_new_tokens=32, do_sample=False)
    policy.nbytes()                                                # bytes the policy really holds

The cache argument is called ``cache`` from transformers 5.24 on and ``past_key_values`` before (5.24 still
accepts the old name, with a deprecation warning, until 5.40); :func:`cache_kwargs` picks the one the model's
``forward`` declares, so the same code runs on both.
"""

from __future__ import annotations

import inspect
import math
from contextvars import ContextVar, Token
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .cache import KVCache, LayerKV

try:  # transformers >= 5: the layered cache API
    from transformers.cache_utils import Cache, CacheLayerMixin
    from transformers.modeling_utils import AttentionInterface
except ImportError as e:  # pragma: no cover - depends on the installed transformers
    raise ImportError(
        "refimpl.hf_bridge needs transformers >= 5 (Cache/CacheLayerMixin/AttentionInterface)"
    ) from e

__all__ = [
    "ATTENTION_NAME",
    "KVCourseHFCache",
    "cache_arg_name",
    "cache_kwargs",
    "disable_kvcourse_attention",
    "enable_kvcourse_attention",
    "is_kvcourse_enabled",
    "kvcourse_attention",
    "load_hf_with_kvcourse_attention",
    "make_hf_cache",
]

ATTENTION_NAME = "kvcourse"


# ---------------------------------------------------------------------------------------------------------
# What one forward of the model hands to the cache and to the attention function
# ---------------------------------------------------------------------------------------------------------
@dataclass
class _Step:
    cache: KVCourseHFCache | None  # the adapter passed as cache / past_key_values, if any
    attention_mask: Tensor | None  # 2-D [B, past + new] bool, True = real token
    kvcourse: bool  # the model runs the "kvcourse" attention


_STEP: ContextVar[_Step | None] = ContextVar("kvcourse_step", default=None)


# ---------------------------------------------------------------------------------------------------------
# The cache adapter
# ---------------------------------------------------------------------------------------------------------
class _PolicyLayer(CacheLayerMixin):
    """Hugging Face's view of layer ``layer_idx`` of a refimpl policy; it stores nothing itself."""

    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(self, owner: KVCourseHFCache, layer_idx: int):
        super().__init__()
        self.owner, self.layer_idx = owner, layer_idx
        # [B, H_kv, T_k] validity of the entries returned this step; read by the kvcourse attention
        self.step_key_mask: Tensor | None = None

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(
        self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any
    ) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        return self.owner._update(self.layer_idx, key_states, value_states)

    def get_seq_length(self) -> int:
        return self.owner.policy.seq_length(self.layer_idx)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        seen, kept = self.get_seq_length(), self.owner.policy.num_entries(self.layer_idx)
        return kept + query_length, seen - kept

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.step_key_mask = None

    def _unsupported(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError(
            "refimpl policies behind make_hf_cache support greedy decoding and sampling; beam search and assisted "
            "decoding (which reorder, repeat or crop a filled cache) are not supported"
        )

    reorder_cache = crop = batch_repeat_interleave = batch_select_indices = _unsupported
    offload = prefetch = _unsupported


class KVCourseHFCache(Cache):
    """A ``transformers.Cache`` backed by a :class:`refimpl.cache.KVCache` policy (see the module docstring)."""

    def __init__(self, policy: KVCache):
        if not isinstance(policy, KVCache):
            raise TypeError(f"policy must be a refimpl.cache.KVCache; got {type(policy).__name__}")
        self.policy = policy
        self._mask_kv_len: int | None = None  # kv length of Hugging Face's mask for the current step
        super().__init__(layers=[_PolicyLayer(self, i) for i in range(policy.num_layers)])

    def __repr__(self) -> str:
        return f"KVCourseHFCache({type(self.policy).__name__}, layers={self.policy.num_layers})"

    def nbytes(self) -> int:
        """Bytes the wrapped policy holds (``policy.nbytes()``)."""
        return self.policy.nbytes()

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.policy.seq_length(layer_idx) if layer_idx < self.policy.num_layers else 0

    def reset(self) -> None:
        self.policy.reset()
        for layer in self.layers:
            layer.reset()

    def update(
        self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[Tensor, Tensor]:
        if not 0 <= layer_idx < self.policy.num_layers:
            raise ValueError(
                f"the model updated cache layer {layer_idx} but the policy has num_layers={self.policy.num_layers}; "
                f"build the policy with num_layers = config.num_hidden_layers"
            )
        return self.layers[layer_idx].update(key_states, value_states)

    # -- the one place where Hugging Face meets the policy -------------------------------------------------
    def _update(self, i: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        step = _STEP.get()
        attached = step is not None and step.cache is self
        kvcourse = attached and step.kvcourse
        t_new, seen, kept = k.shape[2], self.policy.seq_length(i), self.policy.num_entries(i)
        if self.policy.needs_attention(i) and not kvcourse:
            raise RuntimeError(
                f"{type(self.policy).__name__}.needs_attention({i}) is True: it needs the step's attention "
                f"probabilities, which only the '{ATTENTION_NAME}' attention provides; call "
                f"refimpl.hf_bridge.enable_kvcourse_attention(model) before generate/forward"
            )
        key_mask = None
        if attached and step.attention_mask is not None:
            am = step.attention_mask
            if am.shape != (k.shape[0], seen + t_new):
                raise ValueError(
                    f"attention_mask must be [batch, past + new tokens] = {(k.shape[0], seen + t_new)}; "
                    f"got {tuple(am.shape)}"
                )
            key_mask = am[:, seen:]
        if i == 0:  # Hugging Face sized its mask from layer 0 before any layer ran
            self._mask_kv_len = kept + t_new
        kv: LayerKV = self.policy.update(i, k, v, key_mask)
        if not kvcourse:
            self._check_positional_mask(i, kv, seen, kept, step if attached else None)
        self.layers[i].step_key_mask = kv.key_mask
        return kv.k, kv.v

    def _check_positional_mask(self, i: int, kv: LayerKV, seen: int, kept: int, step: _Step | None) -> None:
        """sdpa/eager read Hugging Face's positional mask: refuse the cases where it would be wrong."""
        t_k = kv.k.shape[2]
        if t_k != self._mask_kv_len:
            raise RuntimeError(
                f"layer {i}: {type(self.policy).__name__}.update returned {t_k} entries but the attention mask was "
                f"built for {self._mask_kv_len} (layer 0's kept entries + new tokens); policies that drop entries "
                f"inside update or keep different counts per layer need enable_kvcourse_attention(model)"
            )
        if (
            kv.key_mask is not None
            and kv.key_mask.shape[1] > 1
            and not bool((kv.key_mask == kv.key_mask[:, :1]).all())
        ):
            raise RuntimeError(
                f"layer {i}: {type(self.policy).__name__} returned a key_mask that differs between KV heads; "
                f"that needs enable_kvcourse_attention(model)"
            )
        if (
            step is not None
            and step.attention_mask is not None
            and kept < seen
            and not bool(step.attention_mask.all())
        ):
            raise RuntimeError(
                f"layer {i}: padded batch after eviction ({kept} of {seen} positions kept): the positional padding "
                f"mask of sdpa/eager no longer matches the kept entries; use enable_kvcourse_attention(model)"
            )


def make_hf_cache(policy: KVCache) -> KVCourseHFCache:
    """Wrap ``policy`` for ``model(..., **cache_kwargs(model, cache))`` / ``model.generate(...)`` (the argument
    ``cache`` from transformers 5.24 on, ``past_key_values`` before).

    Build the policy with ``num_layers = config.num_hidden_layers``; start ``generate`` from a fresh (or
    ``reset()``) policy.  The adapter keeps no state of its own: wrapping the same policy again for the next
    ``forward`` continues where it stopped (positions come from ``policy.seq_length()``).
    """
    return KVCourseHFCache(policy)


_CACHE_ARG_NAMES = ("cache", "past_key_values")  # transformers >= 5.24, then the name before it


def cache_arg_name(model: nn.Module) -> str:
    """``"cache"`` if ``model.forward`` takes it (transformers >= 5.24), else ``"past_key_values"`` (one
    ``inspect.signature``: callers that run many forwards can look it up once)."""
    params = inspect.signature(model.forward).parameters
    name = next((n for n in _CACHE_ARG_NAMES if n in params), None)
    if name is None:
        raise TypeError(
            f"{type(model).__name__}.forward takes neither of {_CACHE_ARG_NAMES}; it cannot use a KV cache"
        )
    return name


def cache_kwargs(model: nn.Module, cache: Any) -> dict[str, Any]:
    """``{"cache": cache}`` if ``model.forward`` takes ``cache`` (transformers >= 5.24), else
    ``{"past_key_values": cache}``: pass it as ``model(ids, **cache_kwargs(model, c))`` or to ``generate``."""
    return {cache_arg_name(model): cache}


# ---------------------------------------------------------------------------------------------------------
# The "kvcourse" attention function
# ---------------------------------------------------------------------------------------------------------
_UNSUPPORTED_KWARGS = ("sliding_window", "softcap", "s_aux")


def kvcourse_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[Tensor, Tensor]:
    """Eager GQA attention that builds its mask from the policy's entries and feeds ``policy.observe``.

    ``query`` ``[B, H, T_q, D]``; ``key``/``value`` ``[B, H_kv, T_k, D]`` as returned by the cache.  Returns
    ``(out [B, T_q, H, D], probs [B, H, T_q, T_k])`` like Hugging Face's eager attention.  Hugging Face's own
    ``attention_mask`` is not used (no mask function is registered for this name, so it is ``None``).
    """
    step = _STEP.get()
    if step is None:
        raise RuntimeError(
            f"the '{ATTENTION_NAME}' attention runs only through a model prepared with "
            f"refimpl.hf_bridge.enable_kvcourse_attention(model) (its forward hook supplies the padding mask)"
        )
    for name in _UNSUPPORTED_KWARGS:
        if kwargs.get(name) is not None:
            raise NotImplementedError(
                f"the '{ATTENTION_NAME}' attention does not support {name}={kwargs[name]!r}"
            )
    if dropout and module.training:
        raise NotImplementedError(f"the '{ATTENTION_NAME}' attention is for inference; got dropout={dropout}")
    b, h, t_q, d = query.shape
    h_kv, t_k = key.shape[1], key.shape[2]
    if h % h_kv:
        raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({h_kv})")
    g = h // h_kv
    layer_idx = getattr(module, "layer_idx", None)
    if step.cache is not None and layer_idx is None:
        raise ValueError(
            f"{type(module).__name__} has no layer_idx; the kvcourse attention needs it to find the cache"
        )

    if step.cache is not None:  # a refimpl policy: validity of each returned entry comes with it
        key_mask = step.cache.layers[layer_idx].step_key_mask
    elif step.attention_mask is not None:  # DynamicCache or no cache: the keys are the last t_k positions
        key_mask = step.attention_mask[:, -t_k:][:, None, :].expand(b, h_kv, t_k)
    else:
        key_mask = None
    q_pos = torch.arange(t_k - t_q, t_k, device=query.device)[:, None]
    allowed = (torch.arange(t_k, device=query.device)[None, :] <= q_pos)[None, None]  # [1, 1, T_q, T_k]
    if key_mask is not None:
        allowed = allowed & key_mask[:, :, None, :]  # [B, H_kv, T_q, T_k]

    scale = scaling if scaling is not None else 1.0 / math.sqrt(d)
    qg = query.view(b, h_kv, g, t_q, d)
    scores = torch.einsum("bkgtd,bksd->bkgts", qg, key).float() * scale
    scores = scores.masked_fill(~allowed[:, :, None], torch.finfo(torch.float32).min)
    probs = torch.softmax(scores, dim=-1).to(query.dtype)
    out = torch.einsum("bkgts,bksd->bkgtd", probs, value).reshape(b, h, t_q, d)
    probs = probs.reshape(b, h, t_q, t_k)
    if step.cache is not None and step.cache.policy.needs_attention(layer_idx):
        step.cache.policy.observe(layer_idx, probs)
    return out.transpose(1, 2).contiguous(), probs


AttentionInterface.register(ATTENTION_NAME, kvcourse_attention)


# ---------------------------------------------------------------------------------------------------------
# Switching a model on and off
# ---------------------------------------------------------------------------------------------------------
def _check_supported(model: nn.Module) -> None:
    cfg = (
        model.config.get_text_config(decoder=True)
        if hasattr(model.config, "get_text_config")
        else model.config
    )
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types is not None and any(t != "full_attention" for t in layer_types):
        bad = sorted({t for t in layer_types if t != "full_attention"})
        raise ValueError(f"layer_types must all be 'full_attention' for the kvcourse attention; got {bad}")
    if layer_types is None and getattr(cfg, "sliding_window", None) is not None:
        raise ValueError(f"sliding_window must be None for the kvcourse attention; got {cfg.sliding_window}")


def _pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
    module._kvcourse_tokens.append(_STEP.set(None))  # first, so the post-hook can always undo it
    bound = module._kvcourse_signature.bind_partial(*args, **kwargs).arguments
    am = bound.get("attention_mask")
    if am is not None and am.dim() != 2:
        raise ValueError(
            f"attention_mask must be 2-D [batch, past + new tokens] for kvcourse; got {tuple(am.shape)}"
        )
    extra = bound.get("kwargs") or {}
    # the cache argument: ``cache`` from transformers 5.24 on, ``past_key_values`` before (and still accepted)
    pkv = next((x for x in (bound.get(n, extra.get(n)) for n in _CACHE_ARG_NAMES) if x is not None), None)
    _STEP.set(
        _Step(
            cache=pkv if isinstance(pkv, KVCourseHFCache) else None,
            attention_mask=None if am is None else am.bool(),
            kvcourse=module.config._attn_implementation == ATTENTION_NAME,
        )
    )


def _post_hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
    token: Token = module._kvcourse_tokens.pop()
    step = _STEP.get()
    if step is not None and step.cache is not None:
        for layer in step.cache.layers:  # release references to this step's tensors
            layer.step_key_mask = None
    _STEP.reset(token)


def _body(model: nn.Module) -> nn.Module:
    body = getattr(model, "base_model", model)
    if not hasattr(body, "config"):
        raise TypeError(f"model must be a transformers PreTrainedModel; got {type(model).__name__}")
    return body


def enable_kvcourse_attention(model: nn.Module) -> nn.Module:
    """Switch ``model`` (a transformers causal LM) to the ``"kvcourse"`` attention; returns ``model``.

    Installs (once) a forward pre-hook on the decoder that hands the 2-D ``attention_mask`` to the adapter and to
    the attention function.  Works with any cache: :func:`make_hf_cache`, ``DynamicCache`` or none.
    """
    if not hasattr(model, "set_attn_implementation"):
        raise TypeError(f"model must be a transformers PreTrainedModel; got {type(model).__name__}")
    _check_supported(model)
    body = _body(model)
    if not hasattr(body, "_kvcourse_hooks"):
        body._kvcourse_previous = model.config._attn_implementation
        body._kvcourse_signature = inspect.signature(body.forward)
        body._kvcourse_tokens = []
        body._kvcourse_hooks = (
            body.register_forward_pre_hook(_pre_hook, with_kwargs=True),
            body.register_forward_hook(_post_hook, with_kwargs=True, always_call=True),
        )
    model.set_attn_implementation(ATTENTION_NAME)
    return model


def disable_kvcourse_attention(model: nn.Module, attn_implementation: str | None = None) -> nn.Module:
    """Undo :func:`enable_kvcourse_attention`: remove the hook and restore the previous attention implementation
    (or ``attn_implementation`` when given, e.g. ``"eager"``)."""
    body = _body(model)
    previous = getattr(body, "_kvcourse_previous", None)
    for handle in getattr(body, "_kvcourse_hooks", ()):
        handle.remove()
    for name in ("_kvcourse_hooks", "_kvcourse_signature", "_kvcourse_tokens", "_kvcourse_previous"):
        if hasattr(body, name):
            delattr(body, name)
    target = attn_implementation or (previous if previous not in (None, ATTENTION_NAME) else "sdpa")
    model.set_attn_implementation(target)
    return model


def is_kvcourse_enabled(model: nn.Module) -> bool:
    """True if ``model`` runs the ``"kvcourse"`` attention with its hook installed."""
    body = getattr(model, "base_model", model)
    return (
        hasattr(body, "_kvcourse_hooks")
        and getattr(model.config, "_attn_implementation", None) == ATTENTION_NAME
    )


def load_hf_with_kvcourse_attention(name_or_path: str, **from_pretrained_kwargs: Any) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)`` with the kvcourse attention enabled."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(name_or_path, **from_pretrained_kwargs)
    return enable_kvcourse_attention(model.eval())
