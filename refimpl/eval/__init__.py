"""Evaluation harness shared by the notebooks and the arena.

Every function takes a :class:`refimpl.LlamaModel` or a transformers causal LM, a ``cache_factory`` (a
zero-argument callable returning a fresh :class:`refimpl.cache.KVCache`; ``None`` = the dense baseline), is
seeded, shows a tqdm bar with ``progress=True``, and returns a small dataclass.

* :func:`perplexity` — NLL / perplexity / bits per byte in windows, the context prefilled through the cache.
* :func:`divergence` — per-step KL(full ‖ compressed) and top-1 agreement along a teacher-forced continuation.
* :func:`needle_grid` — needle-in-a-haystack accuracy over context length × depth (:meth:`NeedleGrid.plot`).
* :func:`theoretical_kv_bytes` / :func:`measured_kv_bytes` — the KV-size formula vs. the bytes a cache holds.
* :func:`decode_speed` — decode tokens/s and peak memory.
"""

from .divergence import DivergenceResult, divergence, kl_divergence
from .memory import measured_kv_bytes, theoretical_kv_bytes
from .needle import NeedleGrid, needle_correct, needle_grid
from .perplexity import PerplexityResult, perplexity
from .speed import SpeedResult, decode_speed

__all__ = [
    "DivergenceResult",
    "NeedleGrid",
    "PerplexityResult",
    "SpeedResult",
    "decode_speed",
    "divergence",
    "kl_divergence",
    "measured_kv_bytes",
    "needle_correct",
    "needle_grid",
    "perplexity",
    "theoretical_kv_bytes",
]
