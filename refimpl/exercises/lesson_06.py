"""Checks for exercise 06: SnapKV selection and PyramidKV budgets (arXiv 2404.14469, 2406.02069).

The learner writes three functions (one sequence, multi-head attention, to keep the shapes small):

``window_votes(q_window, k)``
    ``q_window [H, w, D]`` (the last w prompt queries, query i at position T − w + i) and ``k [H, T, D]`` →
    ``[H, T − w]``: for every prefix key j < T − w, the sum over the w window queries of its softmax probability,
    where each window query attends causally (to keys 0 … T − w + i), scaled by 1/√D.
``snapkv_select(votes, window, capacity, kernel_size)``
    ``votes [H, T − window]`` → ``[H, capacity]`` sorted indices of the kept entries out of T: max-pool the votes
    (stride 1, padding kernel_size // 2), take the top ``capacity − window`` prefix positions per head, and always
    keep the ``window`` last positions T − window … T − 1.
``pyramid_budgets(num_layers, capacity, window, prompt_len, beta)``
    PyramidKV's per-layer budget (window included), as a list of ints: see :func:`refimpl.pyramidkv.pyramid_budgets`.

References: :mod:`refimpl.snapkv`, :mod:`refimpl.pyramidkv`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..pyramidkv import pyramid_budgets as _pyramid_budgets
from ..snapkv import pool_votes, snapkv_keep_mask
from ..snapkv import window_votes as _window_votes
from . import CheckResult, Mismatch, compare, run_check

__all__ = ["CHECKS", "check_pyramid_budgets", "check_snapkv_select", "check_window_votes"]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def check_window_votes(fn: Callable[[Tensor, Tensor], Tensor]) -> CheckResult:
    def body() -> None:
        for h, t, w, d in [(2, 9, 3, 4), (1, 6, 1, 8), (3, 12, 5, 2), (2, 7, 6, 4)]:
            g = _gen(t * 10 + w)
            q, k = torch.randn(h, w, d, generator=g) * 2, torch.randn(h, t, d, generator=g)
            compare(fn(q, k), _window_votes(q[None], k[None])[0], f"window_votes with H={h}, T={t}, w={w}, D={d}",
                    "Scores q·k/sqrt(D) over ALL T keys; window query i must not see keys after position T-w+i "
                    "(causal inside the window); softmax over keys; then SUM the probabilities over the w queries "
                    "and keep the first T-w keys.")
    return run_check("window_votes", body)


def _check_selection(got: object, votes: Tensor, window: int, capacity: int, kernel_size: int, what: str) -> None:
    """Compare with the reference up to ties: max-pooling makes plateaus, and any top-k among equals is right."""
    h, prefix = votes.shape
    valid = torch.ones(1, h, prefix + window, dtype=torch.bool)
    want = snapkv_keep_mask(votes[None], valid, capacity, window, kernel_size, "maxpool")[0].nonzero()[:, 1]
    want = want.view(h, -1)
    if not isinstance(got, Tensor) or got.dtype not in (torch.int64, torch.int32):
        raise Mismatch(f"{what} should return an integer tensor of indices; got {getattr(got, 'dtype', type(got))}")
    if tuple(got.shape) != tuple(want.shape):
        raise Mismatch(f"{what} has shape {tuple(got.shape)} but should have shape {tuple(want.shape)}: "
                       f"capacity = {capacity} indices per head, the window included.")
    got = got.long()
    if not bool((got[:, 1:] > got[:, :-1]).all()):
        raise Mismatch(f"{what}: the indices of each head must be sorted ascending and distinct.")
    if not torch.equal(got[:, capacity - window:], want[:, capacity - window:]):
        raise Mismatch(f"{what}: the last `window` = {window} positions ({prefix} .. {prefix + window - 1}) must "
                       f"always be kept; got {got[0, capacity - window:].tolist()} in head 0.")
    pooled = pool_votes(votes, kernel_size, "maxpool")
    got_vals = pooled.gather(1, got[:, : capacity - window].clamp(0, prefix - 1)).sort(-1).values
    want_vals = pooled.gather(1, want[:, : capacity - window]).sort(-1).values
    if bool((got[:, : capacity - window] >= prefix).any()) or not torch.allclose(got_vals, want_vals):
        raise Mismatch(f"{what}: the prefix positions you kept are not the top capacity - window of the max-pooled "
                       f"votes of their head. Per head: max_pool1d(kernel_size, stride=1, padding=kernel_size//2), "
                       f"then topk(capacity - window); pool BEFORE choosing, and choose per head.")


def check_snapkv_select(fn: Callable[[Tensor, int, int, int], Tensor]) -> CheckResult:
    def body() -> None:
        # known answer: one spike at 5; max-pooling with kernel 3 spreads it to 4, 5, 6
        votes = torch.zeros(1, 10)
        votes[0, 5] = 1.0
        votes[0, 0] = 0.5
        compare(fn(votes, 2, 5, 3), torch.tensor([[4, 5, 6, 10, 11]]), "snapkv_select(spike at 5, window=2, "
                "capacity=5, kernel_size=3)", "Pool first (neighbours of a strong vote survive with it), keep "
                "capacity - window prefix entries, and ALWAYS the last `window` positions (here 10, 11).")
        for h, prefix, window, capacity, ks in [(3, 20, 4, 10, 5), (2, 15, 3, 6, 3), (1, 30, 8, 20, 7)]:
            v = torch.rand(h, prefix, generator=_gen(prefix + ks)) ** 4  # a few strong votes per head
            _check_selection(fn(v, window, capacity, ks), v, window, capacity, ks,
                             f"snapkv_select on [{h}, {prefix}] votes, window={window}, capacity={capacity}, "
                             f"kernel_size={ks}")
    return run_check("snapkv_select", body)


def check_pyramid_budgets(fn: Callable[[int, int, int, int, int], list[int]]) -> CheckResult:
    def body() -> None:
        cases = [((4, 40, 8, 1000, 4), "k = 32, min = 8, max = 56, step = 16"),
                 ((3, 20, 4, 34, 20), "max would exceed T - w = 30: clamp it and set min = 2k - max"),
                 ((3, 20, 4, 31, 20), "T < 2k: too short for a pyramid, every layer gets `capacity`"),
                 ((6, 129, 32, 4000, 20), "the defaults of the lesson")]
        for args, hint in cases:
            got = fn(*args)
            if not isinstance(got, (list, tuple)) or not all(isinstance(x, int) for x in got):
                raise Mismatch(f"pyramid_budgets{args} should return a list of ints; got {got!r}")
            compare(torch.tensor(list(got)), torch.tensor(_pyramid_budgets(*args)), f"pyramid_budgets{args}", hint)
    return run_check("pyramid_budgets", body)


CHECKS = {
    "window_votes": check_window_votes,
    "snapkv_select": check_snapkv_select,
    "pyramid_budgets": check_pyramid_budgets,
}
