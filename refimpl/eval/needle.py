"""Needle-in-a-haystack retrieval over a grid of context lengths × needle depths.

A sample hides a fact (e.g. a passkey) at relative depth δ ∈ [0, 1] of a filler text of ``length`` tokens and
ends right before the answer (Kamradt 2023, "Needle in a Haystack"; passkey retrieval: Mohtashami & Jaggi 2023,
arXiv 2305.16300).  The model greedily decodes ``len(answer_ids)`` tokens through the cache policy; a sample is
correct iff they equal ``answer_ids`` exactly.  Cell accuracy = correct / ``n_per_cell``.  Eviction policies
that drop the needle's entries fail at the depths where they evict — the heatmap shows where.

Samples come from :func:`refimpl.synthetic.make_needle_sample` (``input_ids`` ending right before the answer,
``answer_ids``); sample ``k`` of a grid uses seed ``seed + k`` so grids are reproducible.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ._runner import CacheFactory, Runner, as_batch

__all__ = ["NeedleGrid", "needle_correct", "needle_grid"]


class _Sample(Protocol):
    input_ids: list[int]
    answer_ids: list[int]


@dataclass
class NeedleGrid:
    lengths: list[int]
    depths: list[float]
    accuracy: np.ndarray  # [len(lengths), len(depths)] in [0, 1]
    n_per_cell: int

    @property
    def mean(self) -> float:
        return float(self.accuracy.mean())

    def plot(self, ax: Any = None, title: str | None = None, cmap: str = "RdYlGn") -> Any:
        """Heatmap (rows = context length, columns = depth) with the accuracy written in each cell."""
        if ax is None:
            import matplotlib.pyplot as plt

            ax = plt.gca()
        im = ax.imshow(self.accuracy, vmin=0.0, vmax=1.0, cmap=cmap, aspect="auto", origin="lower")
        ax.set_xticks(range(len(self.depths)), [f"{d:.0%}" for d in self.depths])
        ax.set_yticks(range(len(self.lengths)), [str(n) for n in self.lengths])
        ax.set_xlabel("needle depth")
        ax.set_ylabel("context length (tokens)")
        for i in range(len(self.lengths)):
            for j in range(len(self.depths)):
                ax.text(j, i, f"{self.accuracy[i, j]:.2f}", ha="center", va="center", fontsize=8)
        ax.set_title(title if title is not None else f"needle retrieval (mean {self.mean:.2f})")
        ax.figure.colorbar(im, ax=ax, label="accuracy")
        return ax


@torch.no_grad()
def needle_correct(model: nn.Module, sample: _Sample, cache_factory: CacheFactory | None = None) -> bool:
    """Greedy-decode ``len(sample.answer_ids)`` tokens after ``sample.input_ids``; True iff exact match."""
    runner = Runner(model)
    return _correct(runner, sample, cache_factory)


def _correct(runner: Runner, sample: _Sample, cache_factory: CacheFactory | None) -> bool:
    answer = list(sample.answer_ids)
    if not answer:
        raise ValueError("sample.answer_ids must be non-empty")
    ids = as_batch(sample.input_ids, "sample.input_ids", runner.device)
    got = runner.greedy(ids, len(answer), runner.new_cache(cache_factory))[0].tolist()
    return got == answer


@torch.no_grad()
def needle_grid(
    model: nn.Module,
    tokenizer: Any,
    filler_text: str | list[int],
    lengths: Sequence[int],
    depths: Sequence[float],
    n_per_cell: int = 1,
    cache_factory: CacheFactory | None = None,
    seed: int = 0,
    kind: str = "passkey",
    make_sample: Callable[..., _Sample] | None = None,
    progress: bool = False,
) -> NeedleGrid:
    """Accuracy of needle retrieval for every (length, depth) cell.

    filler_text: haystack text (or its token ids), passed to the generator.
    make_sample: the generator, ``make_sample(tokenizer, filler_text, length, depth, seed, kind=kind)``;
                 ``None`` = :func:`refimpl.synthetic.make_needle_sample`.
    """
    lengths, depths = list(lengths), list(depths)
    if not lengths or any(not isinstance(n, int) or n < 1 for n in lengths):
        raise ValueError(f"lengths must be a non-empty list of positive ints; got {lengths!r}")
    if not depths or any(not 0.0 <= float(d) <= 1.0 for d in depths):
        raise ValueError(f"depths must be a non-empty list of floats in [0, 1]; got {depths!r}")
    if not isinstance(n_per_cell, int) or n_per_cell < 1:
        raise ValueError(f"n_per_cell must be a positive int; got {n_per_cell!r}")
    if make_sample is None:
        from ..synthetic import make_needle_sample as make_sample
    runner = Runner(model)
    acc = np.zeros((len(lengths), len(depths)))
    bar = tqdm(total=len(lengths) * len(depths) * n_per_cell, desc="needle", disable=not progress)
    k = 0
    for i, length in enumerate(lengths):
        for j, depth in enumerate(depths):
            hits = 0
            for _ in range(n_per_cell):
                sample = make_sample(tokenizer, filler_text, length, float(depth), seed + k, kind=kind)
                hits += _correct(runner, sample, cache_factory)
                k += 1
                bar.update(1)
            acc[i, j] = hits / n_per_cell
    bar.close()
    return NeedleGrid(lengths=lengths, depths=[float(d) for d in depths], accuracy=acc, n_per_cell=n_per_cell)
