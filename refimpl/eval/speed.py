"""Decode throughput and peak memory of a model with a KV-cache policy.

Decoding one token reads every cached key and value once, so at long contexts a step is memory-bound:

    t_step ≈ (weight bytes + KV bytes) / memory bandwidth,     tokens/s = batch / t_step

which is why shrinking the cache speeds up decoding (Pope et al. 2022, "Efficiently Scaling Transformer
Inference", arXiv 2211.05102).  :func:`decode_speed` prefills a random prompt, then times ``new_tokens`` greedy steps.

Timing: ``warmup`` untimed runs first (allocator, kernels, caches); on CUDA every timestamp is taken after
``torch.cuda.synchronize``.  Peak memory:

* CUDA — ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus the memory allocated before
  the run (so: activations + cache + logits of the run, not the weights).
* CPU — the growth of the process' resident set size, sampled after the prefill and after every decode step
  (``/proc/self/statm``; where that file does not exist, ``resource.getrusage`` peak RSS).  An estimate: it misses
  transient peaks inside a step and includes allocator caching.  ``kv_bytes`` (exact, from the cache tensors) is
  reported next to it.
"""

from __future__ import annotations

import gc
import os
import resource
import sys
import time
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ._runner import CacheFactory, Runner
from .memory import measured_kv_bytes

__all__ = ["SpeedResult", "decode_speed"]


@dataclass
class SpeedResult:
    tokens_per_s: float  # generated tokens per second over the decode phase, summed over the batch
    ms_per_step: float  # wall time of one decode step (all rows)
    prefill_s: float  # wall time of the prompt forward
    peak_memory_bytes: int  # see memory_method
    memory_method: str
    kv_bytes: int  # bytes held by the cache at the end (exact)
    device: str
    batch: int
    prompt_len: int
    new_tokens: int


def _rss_bytes() -> tuple[int, str]:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf(
                "SC_PAGE_SIZE"
            ), "cpu: resident-set growth (/proc/self/statm)"
    except (OSError, ValueError, IndexError):
        scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale, "cpu: peak RSS growth (getrusage)"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def decode_speed(
    model: nn.Module,
    prompt_len: int,
    new_tokens: int,
    batch: int = 1,
    cache_factory: CacheFactory | None = None,
    device: torch.device | str | None = None,
    warmup: int = 1,
    seed: int = 0,
    progress: bool = False,
) -> SpeedResult:
    """Time greedy decoding of ``new_tokens`` after a random ``[batch, prompt_len]`` prompt (seeded).

    device: where the model lives (default: its parameters' device); the model is not moved.
    """
    for name, val, lo in (
        ("prompt_len", prompt_len, 1),
        ("new_tokens", new_tokens, 1),
        ("batch", batch, 1),
        ("warmup", warmup, 0),
    ):
        if not isinstance(val, int) or val < lo:
            raise ValueError(f"{name} must be an int >= {lo}; got {val!r}")
    runner = Runner(model)
    dev = runner.device if device is None else torch.device(device)
    if dev.type != runner.device.type or (dev.index is not None and dev != runner.device):
        raise ValueError(
            f"device must be where the model lives ({runner.device}); got {dev}. Move the model first."
        )
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, runner.vocab_size, (batch, prompt_len), generator=gen).to(runner.device)

    def run(steps: int, sample: bool):
        cache = runner.new_cache(cache_factory)
        _sync(runner.device)
        t0 = time.perf_counter()
        logits = runner.logits(prompt, cache, last_only=True)
        _sync(runner.device)
        t1 = time.perf_counter()
        peak = _rss_bytes()[0] if sample else 0
        for _ in tqdm(range(steps), desc="decode", disable=not (progress and sample)):
            logits = runner.logits(logits[:, -1].argmax(-1, keepdim=True), cache, last_only=True)
            if sample:
                peak = max(peak, _rss_bytes()[0])
        _sync(runner.device)
        return cache, t1 - t0, time.perf_counter() - t1, peak

    for _ in range(warmup):
        run(min(new_tokens, 4), sample=False)
    gc.collect()
    if runner.device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(runner.device)
        base = torch.cuda.memory_allocated(runner.device)
        method = "cuda: torch.cuda.max_memory_allocated growth"
    else:
        base, method = _rss_bytes()
    cache, prefill_s, decode_s, rss_peak = run(new_tokens, sample=runner.device.type != "cuda")
    if runner.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(runner.device) - base
    else:
        peak = max(0, rss_peak - base)
    return SpeedResult(
        tokens_per_s=batch * new_tokens / decode_s,
        ms_per_step=1000 * decode_s / new_tokens,
        prefill_s=prefill_s,
        peak_memory_bytes=int(peak),
        memory_method=method,
        kv_bytes=measured_kv_bytes(cache),
        device=str(runner.device),
        batch=batch,
        prompt_len=prompt_len,
        new_tokens=new_tokens,
    )
