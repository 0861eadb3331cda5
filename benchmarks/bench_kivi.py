"""KIVI on a GPU: fused 2-bit decode attention against fp16 attention, and end-to-end decoding under a memory budget.

Part 1 — one decode step of one layer, MHA with H = 32 heads of D = 128 (Llama-2-7B's attention; KIVI's authors
recommend KIVI-2 for MHA models), G = 32, R = 128, fp16, batch 1–32 and contexts 4k–64k.  The KIVI cache is in the
state a fused decode step sees (R/2 fp keys, R + 1 fp values, the rest packed).  Timed side by side in one run:
``kvkernels.kivi_decode_attention`` (reads the packed codes; best of a few launch configs per shape),
``torch.nn.functional.scaled_dot_product_attention`` on the fp16 cache (torch's default backend and the fastest
single backend), and ``kvkernels.decode_attention`` (the same split-KV design reading fp16).  Target (issue #6):
KIVI-2 ≥ 4x faster than fp16 SDPA at 32k.

Part 2 — end to end: a random-weight Llama-architecture model (16 layers, 16 heads x 128, MHA, 1.1B parameters,
fp16; throughput does not depend on weight values) decodes greedily from caches pre-filled with 4096 entries per
layer (random contents of the right layout — prefill is not part of decode throughput).  For each cache:
the largest batch whose decode-phase peak memory (weights + cache + activations, ``max_memory_allocated``) fits
the budget, decode tokens/s at that batch, and tokens/s at the fp16 cache's largest batch.  Caches:
``DynamicCache`` (fp16), KIVI-2 with the fused kernel (``PreallocKIVICache`` + the ``kivi_fused`` attention below),
the same KIVI cache read through ``refimpl.hf_bridge`` (dequantize + SDPA: the bytes are saved, the time is not),
and transformers' ``QuantizedCache`` with each backend that imports here (``quanto``/``hqq`` need their packages,
``QUANTCACHE=1 scripts/fetch_gpu_wheels.sh``; ``fp8``, per-tensor fp8, only where the installed transformers has it —
5.17 answers "Unknown quantization backend").

    python benchmarks/bench_kivi.py              # both parts, about 2-3 minutes on an H100
    python benchmarks/bench_kivi.py --part attention|e2e
    TRITON_INTERPRET=1 python benchmarks/bench_kivi.py --smoke    # CPU: tiny shapes, checks the code paths only

Writes ``benchmarks/results/bench_kivi_attention_<gpu>.md`` and ``benchmarks/results/bench_kivi_e2e_<gpu>.md``.

This file also holds the glue that runs the fused kernel inside transformers (``PreallocKIVICache``,
``KIVIHFCache``, ``kivi_fused_attention``, ``enable_kivi_fused``); ``kernels/tests/test_kivi_hf_glue.py`` tests it.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any

_HERE = os.path.dirname(os.path.abspath(__file__))
for _p in (_HERE, os.path.dirname(_HERE), os.path.join(os.path.dirname(_HERE), "kernels")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch
import torch.nn.functional as F
from kvkernels.kivi_attention import KIVIDecodeConfig, kivi_cache_attention, kivi_decode_attention
from kvkernels.kivi_pack import quantize_pack as triton_quantize_pack
from torch import Tensor

from refimpl.hf_bridge import cache_kwargs
from refimpl.kivi import KIVICache
from refimpl.quant import codes_per_word

SCRIPT = "bench_kivi"
GB = 1e9


# =============================================================================================================
# Glue: KIVI storage in preallocated buffers, and the fused kernel inside a transformers model
# =============================================================================================================
class _Sliding:
    """A token window ``buf[:, :, start:end]`` that grows at the end and shrinks at the front without copying
    (a compaction copy of the live tokens happens only when the end reaches the capacity)."""

    def __init__(self, like: Tensor, capacity: int):
        self.capacity = capacity
        self.buf = like.new_empty((like.shape[0], like.shape[1], capacity, like.shape[3]))
        self.start = self.end = 0

    def view(self) -> Tensor:
        return self.buf[:, :, self.start:self.end]

    def append(self, x: Tensor) -> None:
        n, live = x.shape[2], self.end - self.start
        if self.end + n > self.capacity:
            if live + n > self.capacity:  # a long prefill: grow
                new = self.buf.new_empty((*self.buf.shape[:2], 2 * (live + n), self.buf.shape[3]))
                new[:, :, :live] = self.view()
                self.buf, self.capacity = new, new.shape[2]
            else:  # compact: move the live tokens to the front
                self.buf[:, :, :live] = self.view().clone()
            self.start, self.end = 0, live
        self.buf[:, :, self.end:self.end + n] = x
        self.end += n

    def drop(self, n: int, keep_capacity: int) -> None:
        self.start += n
        if self.start == self.end:
            self.start = self.end = 0
        if self.capacity > 2 * keep_capacity and self.end - self.start <= keep_capacity:  # after a long prefill
            live = self.view().clone()
            self.buf = self.buf.new_empty((*self.buf.shape[:2], keep_capacity, self.buf.shape[3]))
            self.capacity, self.start, self.end = keep_capacity, 0, 0
            self.append(live)


class PreallocKIVICache(KIVICache):
    """:class:`refimpl.kivi.KIVICache` with inference-stack storage: packed codes, scales and zeros live in buffers
    preallocated for ``capacity`` tokens and written in place; residuals live in sliding windows.  The KIVI rules
    (what is quantized when) are the base class's; only the three storage hooks change, so a decode step copies
    O(new tokens), not O(cache).  ``layer_state`` returns views of the buffers (the fused kernel takes strides)."""

    def __init__(self, num_layers: int, bits: int, group_size: int, residual_length: int, capacity: int,
                 quantizer=triton_quantize_pack):
        super().__init__(num_layers, bits, group_size, residual_length, quantizer)
        if capacity < 1:
            raise ValueError(f"capacity must be a positive number of tokens; got {capacity}")
        self.capacity = capacity
        self._bufs: list[dict[str, list]] = [{} for _ in range(num_layers)]
        self._res: list[dict[str, _Sliding]] = [{} for _ in range(num_layers)]

    def _rows(self, which: str, name: str) -> int:
        per_group = which == "k" and name != "codes" and self.per_channel_keys  # key scales: one row per G tokens
        return math.ceil(self.capacity / self.group_size) if per_group else self.capacity

    def _store_quantized(self, layer_idx, which, words, scale, zero):
        st, bufs = self.layers[layer_idx], self._bufs[layer_idx]
        for name, new in (("codes", words), ("scale", scale), ("zero", zero)):
            field = f"{which}_{name}"
            if field not in bufs:
                bufs[field] = [new.new_empty((*new.shape[:2], self._rows(which, name), new.shape[3])), 0]
            buf, used = bufs[field]
            n = new.shape[2]
            if used + n > buf.shape[2]:
                raise RuntimeError(f"PreallocKIVICache: capacity of {self.capacity} tokens exceeded")
            buf[:, :, used:used + n] = new
            bufs[field][1] = used + n
            setattr(st, field, buf[:, :, :used + n])

    def _append_residual(self, layer_idx, which, new):
        res = self._res[layer_idx]
        if which not in res:
            res[which] = _Sliding(new, max(2 * (self.residual_length + 1), new.shape[2]))
        res[which].append(new)
        setattr(self.layers[layer_idx], f"{which}_res", res[which].view())

    def _drop_residual(self, layer_idx, which, n):
        res = self._res[layer_idx][which]
        res.drop(n, 2 * (self.residual_length + 1))
        setattr(self.layers[layer_idx], f"{which}_res", res.view())

    def allocated_nbytes(self) -> int:
        """Bytes of every buffer held (capacity, not use): what counts against a memory budget."""
        total = sum(b[0].numel() * b[0].element_size() for layer in self._bufs for b in layer.values())
        return total + sum(s.buf.numel() * s.buf.element_size() for layer in self._res for s in layer.values())

    def reset(self) -> None:
        super().reset()
        self._bufs = [{} for _ in range(self.num_layers)]
        self._res = [{} for _ in range(self.num_layers)]

    @torch.no_grad()
    def fill_random(self, tokens: int, batch: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                    device: torch.device | str, seed: int = 0, magnitude: float = 0.1) -> None:
        """Put every layer in the state KIVI reaches after ``tokens`` tokens, with random codes, scales and
        residuals of about ``magnitude`` (a stand-in for a prefill: layout and byte counts are exact, the numbers
        are noise)."""
        if any(self._seen):
            raise RuntimeError("fill_random needs an empty cache")
        f, g, r = codes_per_word(self.bits), self.group_size, self.residual_length
        n_k, n_v = tokens - tokens % r, max(tokens - r, 0)
        gen = torch.Generator(device=device).manual_seed(seed)
        for i in range(self.num_layers):
            for which, n, scale_shape in (("k", n_k, (n_k // g, head_dim)), ("v", n_v, (n_v, head_dim // g))):
                if n == 0:
                    continue
                words = torch.randint(-2**31, 2**31 - 1, (batch, kv_heads, n, head_dim // f), dtype=torch.int32,
                                      device=device, generator=gen)
                scale = (torch.rand((batch, kv_heads, *scale_shape), device=device, generator=gen) + 0.2) * magnitude / 2
                zero = (torch.randn((batch, kv_heads, *scale_shape), device=device, generator=gen) - 0.5) * magnitude
                self._store_quantized(i, which, words, scale.half(), zero.half())
            for which, n in (("k", tokens - n_k), ("v", tokens - n_v)):
                x = (torch.randn((batch, kv_heads, n, head_dim), device=device, generator=gen) * magnitude).to(dtype)
                self._append_residual(i, which, x)
            self._seen[i] = tokens


def _hf_imports():
    from transformers.cache_utils import Cache, CacheLayerMixin
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import AttentionInterface

    return Cache, CacheLayerMixin, sdpa_attention_forward, AttentionMaskInterface, sdpa_mask, AttentionInterface


KIVI_ATTENTION = "kivi_fused"


def make_kivi_hf_cache(policy: KIVICache):
    """A ``transformers.Cache`` over ``policy`` for the ``kivi_fused`` attention.  Prefill (several new tokens):
    ``policy.update`` — exact K/V for SDPA, then quantization.  Decode (one new token): ``policy.append`` only;
    the attention reads the packed codes with the fused kernel, then calls ``policy.flush``."""
    Cache, CacheLayerMixin = _hf_imports()[:2]

    class _Layer(CacheLayerMixin):
        is_compileable = False
        is_sliding = False

        def __init__(self, i: int):
            super().__init__()
            self.i, self.pending = i, False

        def lazy_initialization(self, key_states, value_states):
            self.dtype, self.device = key_states.dtype, key_states.device
            self.is_initialized = True

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            if key_states.shape[2] == 1:
                policy.append(self.i, key_states, value_states)
                self.pending = True
                return key_states, value_states  # placeholders: kivi_fused_attention reads the cache itself
            kv = policy.update(self.i, key_states, value_states)
            return kv.k, kv.v

        def get_seq_length(self):
            return policy.seq_length(self.i)

        def get_mask_sizes(self, query_length):
            return policy.seq_length(self.i) + query_length, 0

        def get_max_length(self):
            return -1

        def reset(self):
            self.pending = False

    class KIVIHFCache(Cache):
        def __init__(self):
            self.policy = policy
            super().__init__(layers=[_Layer(i) for i in range(policy.num_layers)])

        def get_seq_length(self, layer_idx: int = 0) -> int:
            return policy.seq_length(layer_idx)

    return KIVIHFCache()


def kivi_fused_attention(module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                         scaling: float | None = None, dropout: float = 0.0, **kwargs: Any):
    """Decode (one query, a pending append): fused KIVI kernel on the packed cache, then quantize the overflow.
    Otherwise (prefill): transformers' SDPA on the exact keys/values the cache returned."""
    cache = getattr(module, "_kivi_cache", None)
    i = module.layer_idx
    if cache is not None and query.shape[2] == 1 and cache.layers[i].pending:
        cache.layers[i].pending = False
        out = kivi_cache_attention(query[:, :, 0], cache.policy, i, scale=scaling)
        cache.policy.flush(i)
        return out[:, None], None  # [B, 1, H, D]
    sdpa_attention_forward = _hf_imports()[2]
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


def enable_kivi_fused(model, cache) -> None:
    """Register and select the ``kivi_fused`` attention and bind ``cache`` (from :func:`make_kivi_hf_cache`) to
    every attention module of ``model``.  Unpadded batches only (the kernel takes no mask)."""
    *_, AttentionMaskInterface, sdpa_mask, AttentionInterface = _hf_imports()
    AttentionInterface.register(KIVI_ATTENTION, kivi_fused_attention)
    AttentionMaskInterface.register(KIVI_ATTENTION, sdpa_mask)
    model.set_attn_implementation(KIVI_ATTENTION)
    for m in model.modules():
        if hasattr(m, "layer_idx") and hasattr(m, "q_proj"):
            m._kivi_cache = cache


def disable_kivi_fused(model) -> None:
    model.set_attn_implementation("sdpa")
    for m in model.modules():
        if hasattr(m, "_kivi_cache"):
            del m._kivi_cache


# =============================================================================================================
# Part 1: attention micro-benchmark
# =============================================================================================================
H, D, G, R = 32, 128, 32, 128
BATCHES = (1, 4, 8, 16, 32)
CONTEXTS = (4096, 8192, 16384, 32768, 65536)
ROUNDS = 4  # interleaved timing rounds per shape, order alternating (common.time_interleaved)
KIVI_CONFIGS = (KIVIDecodeConfig(8, 1, 128), KIVIDecodeConfig(16, 1, None), KIVIDecodeConfig(8, 1, None),
                KIVIDecodeConfig(32, 4, None))
ATT_COLUMNS = ["bits", "B", "context", "fp16 K+V MB", "KIVI MB", "KIVI µs", "KIVI config", "KIVI % of copy BW",
               "SDPA default µs", "SDPA best µs", "fp16 split-KV µs", "× vs SDPA default", "× vs SDPA best",
               "× vs fp16 split-KV"]


def random_kivi_state(b: int, t_ctx: int, bits: int, device, seed: int = 0) -> tuple[list[Tensor], int]:
    """The 8 storage tensors of one layer mid-decode-step: N_k = t_ctx packed keys + R/2 fp, R + 1 fp values."""
    cache = PreallocKIVICache(1, bits, G, R, capacity=t_ctx + R)
    t = t_ctx + R // 2
    cache.fill_random(t - 1, b, H, D, torch.float16, device, seed)
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    x = torch.randn((b, H, 1, D), device=device, generator=gen).half() * 0.1
    cache.append(0, x, x)
    st = cache.layer_state(0)
    return [st.k_codes, st.k_scale, st.k_zero, st.k_res, st.v_codes, st.v_scale, st.v_zero, st.v_res], t


def kivi_bytes(state: list[Tensor]) -> int:
    return sum(x.numel() * x.element_size() for x in state if x is not None)


def sdpa_fns(q4: Tensor, k: Tensor, v: Tensor) -> dict[str, Callable[[], Tensor]]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    fns = {"default": lambda: F.scaled_dot_product_attention(q4, k, v)}
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                          ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        def fn(backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q4, k, v)
        try:
            fn()
        except RuntimeError:
            continue
        fns[name] = fn
    return fns


def check_attention(device, tol: float = 2e-3) -> str:
    """Kernel vs PyTorch reference on a real quantized cache (Triton quantizer) and on a random 32k state."""
    from kvkernels.kivi_attention import kivi_decode_attention_ref

    from refimpl.quant import quantize_pack as ref_quantize_pack

    gen = torch.Generator(device=device).manual_seed(0)
    k = torch.randn(2, 4, 1000, D, device=device, generator=gen).half()
    v = torch.randn(2, 4, 1000, D, device=device, generator=gen).half()
    for dim in (-1, -2):
        a = triton_quantize_pack(k[:, :, :992], 2, G, dim)
        b = ref_quantize_pack(k[:, :, :992], 2, G, dim)
        if not all(torch.equal(x, y) for x, y in zip(a, b)):
            raise AssertionError(f"Triton quantize_pack differs from refimpl (dim={dim})")
    cache = KIVICache(1, 2, G, R, quantizer=triton_quantize_pack)
    cache.update(0, k, v)
    q = torch.randn(2, 8, D, device=device, generator=gen).half()  # GQA group of 2
    cases = [cache.layer_state(0).tensors()]
    state, _ = random_kivi_state(2, 1024 if device == "cpu" else 32768, 2, device)
    cases.append(state)
    worst = 0.0
    for args in cases:
        qq = q if args[3].shape[1] == 4 else torch.randn(2, H, D, device=device, generator=gen).half()
        got = kivi_decode_attention(qq, *args, bits=2, group_size=G)
        want = kivi_decode_attention_ref(qq, *args, bits=2, group_size=G)
        worst = max(worst, (got.float() - want.float()).abs().max().item())
    if worst > tol:
        raise AssertionError(f"fused KIVI attention differs from the reference by {worst:.3g} > {tol}")
    return f"fused KIVI attention matches the PyTorch reference (max |Δ| {worst:.2g}); Triton quantizer bit-exact"


def run_attention(device, timer, batches, contexts, copy_bw: float | None, reps: int):
    from kvkernels.decode_attention import decode_attention

    sys.path.insert(0, _HERE)
    from common import Table, time_interleaved

    table = Table(f"KIVI fused decode attention vs fp16 (H={H}, D={D}, MHA, G={G}, R={R}, fp16)", ATT_COLUMNS)
    records = []
    free = torch.cuda.mem_get_info()[0] if device == "cuda" else float("inf")
    grid = [(2, b, c) for c in contexts for b in batches]
    grid += [(4, b, 32768) for b in (1, 8, 32) if 32768 in contexts and b in batches]
    for bits, b, ctx in grid:
        fp16_bytes = 2 * b * H * (ctx + R // 2) * D * 2
        if fp16_bytes * 1.25 > 0.8 * free:
            print(f"skip B={b} context={ctx}: {fp16_bytes / GB:.1f} GB of fp16 K+V does not fit comfortably")
            continue
        state, t = random_kivi_state(b, ctx, bits, device, seed=b + ctx)
        gen = torch.Generator(device=device).manual_seed(1)
        q = torch.randn((b, H, D), device=device, generator=gen).half()
        fns = {}
        for cfg in KIVI_CONFIGS if device == "cuda" else (None,):
            def kivi_call(q=q, state=state, bits=bits, cfg=cfg):
                return kivi_decode_attention(q, *state, bits=bits, group_size=G, config=cfg)
            try:
                kivi_call()
            except Exception as e:  # noqa: BLE001 - a config the GPU cannot run (shared memory): try the next
                print(f"KIVI config {cfg} failed: {type(e).__name__}: {str(e)[:100]}")
                continue
            fns[cfg] = kivi_call
        k = torch.randn((b, H, t, D), device=device, generator=gen, dtype=torch.float16)
        v = torch.randn((b, H, t, D), device=device, generator=gen, dtype=torch.float16)
        q4 = q[:, :, None, :]
        for name, fn in sdpa_fns(q4, k, v).items():
            fns["sdpa " + name] = fn
        fns["split"] = lambda q=q, k=k, v=v: decode_attention(q, k, v)
        # every contender once per round (order reversed every other round), ROUNDS rounds, each keeps its lowest
        # round median (common.time_interleaved)
        us = {name: ms * 1e3 for name, ms in time_interleaved(fns, rounds=ROUNDS, reps=reps, timer=timer).items()}
        best_cfg = min((c for c in us if not isinstance(c, str)), key=lambda c: us[c])
        best_us = us[best_cfg]
        kv = {name[5:]: x for name, x in us.items() if isinstance(name, str) and name.startswith("sdpa ")}
        t_split = us["split"]
        del k, v, q4, fns
        kb = kivi_bytes(state)
        rec = {"bits": bits, "B": b, "context": ctx, "fp16_mb": fp16_bytes / 1e6, "kivi_mb": kb / 1e6,
               "kivi_us": best_us,
               "cfg": (None if best_cfg is None
                       else f"{best_cfg.block_t}/{best_cfg.num_warps}/{best_cfg.maxnreg or '-'}"),
               "sdpa_default": kv["default"], "sdpa_best": min(kv.values()), "split": t_split}
        rec["pct"] = None if copy_bw is None else 100 * kb / (best_us * 1e-6) / copy_bw
        rec["x_default"], rec["x_best"], rec["x_split"] = (rec["sdpa_default"] / best_us, rec["sdpa_best"] / best_us,
                                                           t_split / best_us)
        records.append(rec)
        table.add(**{"bits": bits, "B": b, "context": ctx, "fp16 K+V MB": rec["fp16_mb"], "KIVI MB": rec["kivi_mb"],
                     "KIVI µs": best_us, "KIVI config": rec["cfg"], "KIVI % of copy BW": rec["pct"],
                     "SDPA default µs": rec["sdpa_default"], "SDPA best µs": rec["sdpa_best"],
                     "fp16 split-KV µs": t_split, "× vs SDPA default": rec["x_default"],
                     "× vs SDPA best": rec["x_best"], "× vs fp16 split-KV": rec["x_split"]})
        print(table.markdown().splitlines()[-1], flush=True)
        del state, q
        if device == "cuda":
            torch.cuda.empty_cache()
    return table, records


def attention_summary(records: list[dict]) -> list[str]:
    at32 = [r for r in records if r["context"] == 32768 and r["bits"] == 2]
    if not at32:
        return []
    worst = min(at32, key=lambda r: r["x_default"])
    ok = worst["x_default"] >= 4
    return [(f"- KIVI-2 at 32k context: speed-up over fp16 SDPA (default backend) from "
             f"{worst['x_default']:.2f}x (B={worst['B']}) to {max(r['x_default'] for r in at32):.2f}x; "
             f"over the fastest SDPA backend from {min(r['x_best'] for r in at32):.2f}x; "
             f"target >= 4x at every batch: {'MET' if ok else 'MISSED'}")]


# =============================================================================================================
# Part 2: end-to-end decoding under a memory budget
# =============================================================================================================
E2E_MODEL = {"vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 16,
             "num_attention_heads": 16, "num_key_value_heads": 16, "head_dim": 128,
             "max_position_embeddings": 8192}
E2E_CONTEXT, E2E_STEPS, E2E_BUDGET_GB, MAX_BATCH = 4096, 16, 40.0, 1024


def build_model(cfg_kwargs: dict, device, dtype=torch.float16):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**cfg_kwargs, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None,
                      pad_token_id=None, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    return model.to(dtype).eval()


def make_cache(kind: str, model, batch: int, context: int, steps: int, device, smoke: bool):
    """Return (cache, attention implementation, description) pre-filled with ``context`` entries per layer."""
    from transformers import DynamicCache, QuantizedCache

    cfg = model.config
    L, h, d = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
    dtype = next(model.parameters()).dtype
    gen = torch.Generator(device=device).manual_seed(batch)
    if kind.startswith("kivi"):
        policy = PreallocKIVICache(L, 2, G, R, capacity=context + steps + 8,
                                   quantizer=triton_quantize_pack)
        policy.fill_random(context, batch, h, d, dtype, device, seed=batch)
        if kind == "kivi-fused":
            cache = make_kivi_hf_cache(policy)
            return cache, KIVI_ATTENTION
        from refimpl.hf_bridge import make_hf_cache

        return make_hf_cache(policy), "sdpa"
    if kind == "dynamic":
        cache = DynamicCache(config=cfg)
    else:
        backend = kind.split("-", 1)[1]
        cache = (QuantizedCache(backend, cfg) if backend == "fp8" else
                 QuantizedCache(backend, cfg, nbits=2, q_group_size=32, residual_length=R))
    for i in range(L):
        k = torch.randn((batch, h, context, d), device=device, generator=gen).to(dtype) * 0.1
        v = torch.randn((batch, h, context, d), device=device, generator=gen).to(dtype) * 0.1
        cache.update(k, v, i)
        del k, v
    return cache, "sdpa"


@torch.no_grad()
def decode(model, cache, attn: str, batch: int, steps: int, device, warmup: int = 2):
    """Greedy decoding of ``steps`` tokens after ``warmup``; returns (seconds, last logits)."""
    if attn == KIVI_ATTENTION:
        enable_kivi_fused(model, cache)
    else:
        disable_kivi_fused(model)
    tok = torch.randint(0, model.config.vocab_size, (batch, 1), device=device,
                        generator=torch.Generator(device=device).manual_seed(7))
    logits = None
    cache_kw = cache_kwargs(model, cache)  # one inspect.signature, outside the timed steps
    try:
        for s in range(warmup + steps):
            if s == warmup:
                if device == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
            logits = model(input_ids=tok, **cache_kw, use_cache=True, logits_to_keep=1).logits
            tok = logits[:, -1:].argmax(-1)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0, logits
    finally:
        disable_kivi_fused(model)


def measure(model, kind: str, batch: int, context: int, steps: int, device, smoke: bool) -> dict:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    cache, attn = make_cache(kind, model, batch, context, steps, device, smoke)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    secs, _ = decode(model, cache, attn, batch, steps, device)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else 0
    del cache
    return {"batch": batch, "tok_s": batch * steps / secs, "ms_step": 1e3 * secs / steps,
            "peak_gb": peak / GB}


def largest_batch(model, kind: str, context: int, budget_gb: float, weights_gb: float, device) -> tuple[int, dict]:
    """Probe at batch 8, extrapolate linearly, run at the predicted batch (and once more if it overshot)."""
    probe = measure(model, kind, 8, context, 2, device, False)
    per_seq = (probe["peak_gb"] - weights_gb) / 8
    b = max(1, min(MAX_BATCH, int((budget_gb - weights_gb) / per_seq)))
    for _ in range(3):
        try:
            res = measure(model, kind, b, context, E2E_STEPS, device, False)
        except torch.cuda.OutOfMemoryError:
            res = {"peak_gb": float("inf")}
        if res["peak_gb"] <= budget_gb:
            return b, res
        b = max(1, int(b * 0.9 * (budget_gb - weights_gb) / max(res["peak_gb"] - weights_gb, 1e-9)))
    raise RuntimeError(f"{kind}: no batch found under {budget_gb} GB")


E2E_KINDS = [("dynamic", "DynamicCache (fp16)"),
             ("kivi-fused", "KIVI-2 fused kernel (ours)"),
             ("kivi-bridge", "KIVI-2 via hf_bridge: dequantize + SDPA"),
             ("quantized-quanto", "QuantizedCache quanto int2 (G=32, R=128)"),
             ("quantized-hqq", "QuantizedCache hqq 2-bit (G=32, R=128)"),
             ("quantized-fp8", "QuantizedCache fp8 (per-tensor)")]
E2E_COLUMNS = ["cache", "largest batch in budget", "decode peak GB", "tok/s at that batch", "ms/step",
               "tok/s at fp16's batch", "× fp16 tok/s (own batch)", "note"]


def backend_available(kind: str) -> str | None:
    """None if the cache kind can run here, else why not."""
    if kind == "quantized-quanto":
        try:
            import optimum.quanto  # noqa: F401
        except ImportError:
            return "optimum-quanto not installed"
    if kind == "quantized-hqq":
        try:
            import hqq  # noqa: F401
        except ImportError:
            return "hqq not installed"
    return None


def backend_versions() -> str:
    """The installed versions of QuantizedCache's optional backends (bring them to an offline GPU machine with
    ``QUANTCACHE=1 bash scripts/fetch_gpu_wheels.sh``)."""
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for dist in ("optimum-quanto", "hqq"):
        try:
            found.append(f"{dist} {version(dist)}")
        except PackageNotFoundError:
            found.append(f"{dist} not installed")
    return ", ".join(found)


def run_e2e(device, budget_gb: float, context: int):
    sys.path.insert(0, _HERE)
    from common import Table

    model = build_model(E2E_MODEL, device)
    weights_gb = sum(p.numel() * p.element_size() for p in model.parameters()) / GB
    params = sum(p.numel() for p in model.parameters()) / 1e9
    table = Table(f"End-to-end greedy decoding, random-weight Llama ({params:.2f}B params, 16 x MHA 16x128, fp16), "
                  f"{context} cached tokens, budget {budget_gb:.0f} GB", E2E_COLUMNS)
    rows = {}
    fp16_batch = None
    for kind, label in E2E_KINDS:
        why = backend_available(kind)
        if why is not None:
            table.add(cache=label, note=f"skipped: {why}")
            print(f"{label}: skipped ({why})")
            continue
        try:
            if kind == "kivi-bridge":  # dequantizes the whole cache every step: only at fp16's batch, 4 steps
                if fp16_batch is None:
                    raise RuntimeError("needs the fp16 batch size, which was not measured")
                b_own, res = None, measure(model, kind, fp16_batch, context, 4, device, False)
                same = res
            else:
                b_own, res = largest_batch(model, kind, context, budget_gb, weights_gb, device)
                if kind == "dynamic":
                    fp16_batch = b_own
                same = (res if b_own == fp16_batch or fp16_batch is None
                        else measure(model, kind, fp16_batch, context, E2E_STEPS, device, False))
        except Exception as e:  # noqa: BLE001 - one cache failing must not lose the others' numbers
            table.add(cache=label, note=f"failed: {type(e).__name__}: {str(e)[:80]}")
            print(f"{label}: failed: {type(e).__name__}: {e}")
            continue
        rows[kind] = (b_own, res, same)
        base = rows.get("dynamic")
        table.add(cache=label, **{"largest batch in budget": b_own if b_own is not None else "n/a",
                                  "decode peak GB": res["peak_gb"] if b_own is not None else None,
                                  "tok/s at that batch": res["tok_s"] if b_own is not None else None,
                                  "ms/step": res["ms_step"],
                                  "tok/s at fp16's batch": None if fp16_batch is None else same["tok_s"],
                                  "× fp16 tok/s (own batch)": (res["tok_s"] / base[1]["tok_s"]
                                                               if base and b_own is not None else None),
                                  "note": "" if b_own is not None else f"run at batch {fp16_batch} only"})
        print(table.markdown().splitlines()[-1], flush=True)
    meta = {"model": f"LlamaConfig {E2E_MODEL}", "weights_gb": f"{weights_gb:.2f}", "cached_tokens": context,
            "timed_steps": E2E_STEPS, "budget_gb": budget_gb,
            "memory": "decode-phase peak of torch.cuda.max_memory_allocated (weights + cache + activations)",
            "kivi": f"bits=2 G={G} R={R}, Triton quantizer, preallocated buffers",
            "quantized_cache_backends": backend_versions()}
    return table, meta


@torch.no_grad()
def check_e2e(device, dtype) -> str:
    """Fused-kernel decoding gives the logits of the reference KIVI path (dequantize + SDPA) from the same state."""
    tiny = {"vocab_size": 101, "hidden_size": 128, "intermediate_size": 192, "num_hidden_layers": 2,
            "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 64,
            "max_position_embeddings": 512}
    model = build_model(tiny, device, dtype)
    g = torch.Generator().manual_seed(1)
    for p in model.parameters():  # larger than the default init: peaked attention, so errors show in the logits
        if p.dim() == 2:
            p.data.copy_(torch.randn(p.shape, generator=g) * 1.5 / p.shape[-1] ** 0.5)
    from refimpl.hf_bridge import make_hf_cache

    outs = []
    for fused in (True, False):
        policy = PreallocKIVICache(2, 2, 16, 16, capacity=200, quantizer=triton_quantize_pack)
        policy.fill_random(58, 2, 2, 64, dtype, device, seed=3, magnitude=1.0)
        cache = make_kivi_hf_cache(policy) if fused else make_hf_cache(policy)
        if fused:
            enable_kivi_fused(model, cache)
        tokens = torch.randint(0, 101, (2, 7), generator=torch.Generator().manual_seed(5)).to(device)
        logits = []
        cache_kw = cache_kwargs(model, cache)
        for s in range(7):  # crosses a key flush (fp keys 10 -> 16 at step 6); a value leaves the FIFO each step
            out = model(input_ids=tokens[:, s:s + 1], **cache_kw, use_cache=True).logits[:, -1]
            logits.append(out.float())
        disable_kivi_fused(model)
        outs.append(torch.stack(logits, 1))
    err = (outs[0] - outs[1]).abs().max().item()
    tol = 1e-3 if dtype == torch.float32 else 2e-2 * max(1.0, outs[1].abs().max().item())  # fp16: K/V rounding
    if err > tol:
        raise AssertionError(f"fused decoding differs from the reference KIVI path by {err:.3g} > {tol}")
    return f"fused decoding matches dequantize + SDPA (max |Δ logits| {err:.2g} over 7 steps)"


# =============================================================================================================
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=("all", "attention", "e2e"), default="all")
    ap.add_argument("--reps", type=int, default=20, help="timed calls per attention measurement (median)")
    ap.add_argument("--budget-gb", type=float, default=E2E_BUDGET_GB)
    ap.add_argument("--smoke", action="store_true", help="CPU + TRITON_INTERPRET=1: tiny shapes, checks only")
    args = ap.parse_args(argv)

    if args.smoke:
        def cpu_timer(fn, reps=1):
            t0 = time.perf_counter()
            fn()
            return {"median_ms": 1e3 * (time.perf_counter() - t0)}
        global H, D
        H, D = 2, 64
        print(check_attention("cpu"))
        run_attention("cpu", cpu_timer, (1, 2), (256,), None, 1)
        print(check_e2e("cpu", torch.float32))
        tiny = dict(E2E_MODEL, vocab_size=101, hidden_size=128, intermediate_size=192, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=2, head_dim=64)
        model = build_model(tiny, "cpu", torch.float32)
        for kind, label in E2E_KINDS:
            why = backend_available(kind)
            res = "skipped: " + why if why else measure(model, kind, 2, 200, 2, "cpu", True)
            print(f"{label}: {res}")
        print("smoke run done (CPU timings are meaningless)")
        return 0

    sys.path.insert(0, _HERE)
    from common import gpu_info, measure_copy_bandwidth, require_cuda, time_cuda

    require_cuda(SCRIPT)
    gpu = gpu_info()
    t_start = time.time()
    print(f"GPU: {gpu.name} ({gpu.sms} SMs, {gpu.memory_gb:.0f} GB)")
    checks = []
    for check, check_args in ((check_attention, ("cuda",)), (check_e2e, ("cuda", torch.float16))):
        try:
            checks.append("- check: " + check(*check_args))
        except AssertionError as e:  # keep measuring, but the tables say loudly that a check failed
            checks.append(f"- CHECK FAILED: {e}")
        print(checks[-1])
    if args.part in ("all", "attention"):
        copy_bw = measure_copy_bandwidth()
        print(f"measured copy bandwidth {copy_bw / 1e12:.2f} TB/s")
        table, records = run_attention("cuda", time_cuda, BATCHES, CONTEXTS, copy_bw, args.reps)
        notes = [("KIVI MB = packed codes + fp16 scales/zeros + fp16 residuals actually read. "
                  "× = time of the fp16 baseline / time of KIVI (same run, same GPU)."),
                 ("KIVI config = block_t/num_warps/maxnreg, the fastest of "
                  f"{[(c.block_t, c.num_warps, c.maxnreg) for c in KIVI_CONFIGS]} on that shape."), ""]
        notes += attention_summary(records) + checks
        meta = {"copy_bandwidth_tbps": f"{copy_bw / 1e12:.3f}",
                "timing": f"median of {args.reps} calls, L2 flushed (read) before each, CUDA events; lowest median "
                          f"of {ROUNDS} interleaved rounds (every KIVI config, SDPA backend and the fp16 split-KV "
                          "kernel per round, the order reversed every other round; benchmarks/common.py)",
                "cache_state": "mid decode step: context packed keys + 64 fp keys, 129 fp values, rest packed values"}
        print(f"wrote {table.write(SCRIPT + '_attention', gpu, meta, notes)}")
        print("\n".join(notes))
    if args.part in ("all", "e2e"):
        table, meta = run_e2e("cuda", args.budget_gb, E2E_CONTEXT)
        notes = [("Decode tokens/s = batch x timed steps / wall time of the steps (after 2 warm-up steps), "
                  "greedy, one model forward per step (transformers eager loop, no CUDA graphs)."),
                 ("Caches are pre-filled with random contents of the exact layout (no prefill forward): "
                  "the largest batch is the decode-phase limit."), ""] + checks
        print(f"wrote {table.write(SCRIPT + '_e2e', gpu, meta, notes)}")
    print(f"total {time.time() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
