"""PyramidKV — layer-wise budgets for SnapKV-style selection (Cai et al., arXiv 2406.02069, COLM 2025;
code Zefan-Cai/KVCache-Factory, ``pyramidkv/pyramidkv_utils.py`` ``PyramidKVCluster.update_kv``).

Observation ("pyramidal information funneling"): lower layers spread attention over the whole prompt, upper
layers concentrate on a few tokens.  So give lower layers more entries and upper layers fewer, with the same
total as uniform SnapKV.  With average prefix budget k = capacity - w, L layers and β (default 20):

    min = ⌊k / β⌋,   max = 2k - min;    if max ≥ T - w:  max = T - w,  min = 2k - max          (1)
    step = ⌊(max - min) / (L - 1)⌋,    budget_l = max - l · step   (+ the w window tokens)        (2)

so Σ_l budget_l ≈ L · capacity and budgets never increase with depth.  Selection in each layer is SnapKV's
(window votes, pooling, per-head top-k; see :mod:`refimpl.snapkv`).

The official code falls back to the uniform SnapKV budget when T < 2k ("not enough tokens to form a pyramid")
and compresses nothing when T < capacity; we reproduce both.  Defaults here follow our SnapKV (window 32,
kernel 7, maxpool); the official PyramidKV class defaults are window 64 / kernel 5 / avgpool.
"""

from __future__ import annotations

from .eviction import check_int
from .snapkv import SnapKVCache

__all__ = ["PyramidKVCache", "pyramid_budgets"]


def pyramid_budgets(num_layers: int, capacity: int, window: int, prompt_len: int, beta: int = 20) -> list[int]:
    """Eqs. (1)–(2): entries (window included) each layer keeps after a prompt of ``prompt_len`` tokens.

    >>> pyramid_budgets(num_layers=4, capacity=40, window=8, prompt_len=1000, beta=4)
    [64, 48, 32, 16]
    """
    check_int("num_layers", num_layers, 1)
    check_int("window", window, 1)
    check_int("capacity", capacity, window + 1)
    check_int("prompt_len", prompt_len, 0)
    check_int("beta", beta, 1)
    k = capacity - window
    if num_layers == 1 or prompt_len < 2 * k:
        return [capacity] * num_layers
    lo = k // beta
    hi = 2 * k - lo
    if hi >= prompt_len - window:
        hi = prompt_len - window
        lo = 2 * k - hi
    step = (hi - lo) // (num_layers - 1)
    return [hi - layer * step + window for layer in range(num_layers)]


class PyramidKVCache(SnapKVCache):
    """SnapKV with a budget that shrinks linearly from the bottom layer to the top one (same average)."""

    def __init__(self, num_layers: int, capacity: int, window: int = 32, kernel_size: int = 7,
                 pooling: str = "maxpool", gqa_reduce: str = "mean", beta: int = 20):
        super().__init__(num_layers, capacity, window, kernel_size, pooling, gqa_reduce)
        self.beta = check_int("beta", beta, 1)

    def capacity_for(self, layer_idx: int, prompt_len: int) -> int:
        return pyramid_budgets(self.num_layers, self.capacity, self.window, prompt_len, self.beta)[layer_idx]

    def _init_kwargs(self) -> dict:
        return {**super()._init_kwargs(), "beta": self.beta}
