"""Checks for exercise 02: low-rank KV heads that stay exact under RoPE (arXiv 2406.07056; refimpl.lowrank).

The learner writes four functions:

``to_complex_pairs(x)``
    ``[..., d]`` real → ``[..., d/2]`` complex with ``z_i = x_i + j·x_{i+d/2}`` (the ``rotate_half`` layout, in
    which RoPE multiplies ``z_i`` by ``e^{j n θ_i}``).
``commuting_matrix(c)``
    complex ``[d/2]`` → real ``[d, d]`` matrix ``A`` with ``A x`` ≙ ``c ⊙ z`` — the only kind of map that
    commutes with every RoPE rotation.
``rope_aware_group_basis(keys)``
    pre-RoPE keys ``[N, g, d]`` of the g heads of one group → ``U`` ``[g·d, d]``: orthonormal columns, every
    ``d×d`` block of the commuting form, keeping as much key energy as such a basis can (one complex PCA per
    frequency).
``fold_into_query(w_q, a)``
    a query head's weight ``[d, hidden]`` and its key block ``a`` (``k ≈ a k'``) → the new query weight such
    that ``q'·k' = q·(a k')``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..lowrank import commuting_block, rope_aware_basis, rope_matrix
from . import CheckResult, Mismatch, compare, run_check

__all__ = [
    "CHECKS",
    "check_commuting_matrix",
    "check_fold_into_query",
    "check_rope_aware_group_basis",
    "check_to_complex_pairs",
]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _inv_freq(d: int) -> Tensor:
    return 1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))


def _ref_complex(x: Tensor) -> Tensor:
    f = x.shape[-1] // 2
    return torch.complex(x[..., :f], x[..., f:])


def _compare_complex(got, want: Tensor, what: str, hint: str) -> None:
    if not isinstance(got, Tensor):
        raise Mismatch(f"{what} should be a torch.Tensor, but your function returned {type(got).__name__}.")
    if not got.is_complex():
        raise Mismatch(f"{what} should be a complex tensor (torch.complex(real, imag)); got dtype {got.dtype}.")
    if tuple(got.shape) != tuple(want.shape):
        raise Mismatch(f"{what} has shape {tuple(got.shape)} but should have shape {tuple(want.shape)}. {hint}")
    compare(torch.view_as_real(got), torch.view_as_real(want), what, hint)


def check_to_complex_pairs(fn: Callable[[Tensor], Tensor]) -> CheckResult:
    def body() -> None:
        x = torch.randn(3, 5, 8, generator=_gen(0))
        _compare_complex(fn(x), _ref_complex(x), "to_complex_pairs(x)",
                         "Pair coordinate i with i + d/2 (rotate_half layout), real part first — not neighbours "
                         "(2i, 2i+1), which is the GPT-J/interleaved layout.")
        # The point of the representation: RoPE becomes multiplication by e^{j n θ}.
        d, n = 8, 13.0
        r = rope_matrix(_inv_freq(d), n).float()
        xr = x @ r.T  # RoPE(x, n) for row vectors
        rot = torch.polar(torch.ones(d // 2), n * _inv_freq(d).float())
        _compare_complex(fn(xr), fn(x) * rot, "to_complex_pairs(RoPE(x, n))",
                         "In your layout RoPE should be multiplication by e^{j·n·θ_i}.")
    return run_check("to_complex_pairs", body)


def check_commuting_matrix(fn: Callable[[Tensor], Tensor]) -> CheckResult:
    def body() -> None:
        g = _gen(1)
        c = torch.complex(torch.randn(4, generator=g), torch.randn(4, generator=g))
        a = fn(c)
        want = commuting_block(c.to(torch.complex128)).float()
        compare(a, want, "commuting_matrix(c)",
                "Rows/cols i and i + d/2 form the 2×2 block [[Re c, −Im c], [Im c, Re c]]; all other entries 0.")
        x = torch.randn(8, generator=g)
        got = _ref_complex(a @ x)
        if not torch.allclose(got, c * _ref_complex(x), atol=1e-5):
            raise Mismatch("A @ x should equal the complex product c ⊙ z in the rotate_half pairing.")
        r = rope_matrix(_inv_freq(8), 777.0).float()
        if (r @ a - a @ r).abs().max() > 1e-4:
            raise Mismatch("your matrix does not commute with the RoPE rotation R_777.")
    return run_check("commuting_matrix", body)


def _group_keys(seed: int, n: int = 400, g: int = 3, d: int = 8) -> Tensor:
    gen = _gen(seed)
    base = torch.randn(n, g * d, generator=gen, dtype=torch.float64)
    mix = torch.randn(g * d, g * d, generator=gen, dtype=torch.float64) * torch.linspace(2.0, 0.1, g * d,
                                                                                         dtype=torch.float64)
    return (base @ mix).view(n, g, d)


def check_rope_aware_group_basis(fn: Callable[[Tensor], Tensor]) -> CheckResult:
    def body() -> None:
        keys = _group_keys(2)
        n, g, d = keys.shape
        flat = keys.reshape(n, g * d)
        want, energy = rope_aware_basis(flat.T @ flat, g, d)
        u = fn(keys.clone())
        if not isinstance(u, Tensor):
            raise Mismatch(f"return a torch.Tensor U of shape [g·d, d]; got {type(u).__name__}")
        if tuple(u.shape) != (g * d, d):
            raise Mismatch(f"U has shape {tuple(u.shape)} but should be [g·d, d] = {(g * d, d)}: one block "
                           "per head of the group, stacked in head order.")
        u = u.to(torch.float64)
        if not torch.allclose(u.T @ u, torch.eye(d, dtype=torch.float64), atol=1e-6):
            raise Mismatch("U's columns are not orthonormal (Uᵀ U ≠ I): normalise each frequency's eigenvector "
                           "over the g heads.")
        inv = _inv_freq(d)
        for pos in (1.0, 50.0, 1234.5):
            r = rope_matrix(inv, pos)
            for s in range(g):
                blk = u[s * d:(s + 1) * d]
                if (r @ blk - blk @ r).abs().max() > 1e-6:
                    raise Mismatch(f"block {s} of U does not commute with RoPE at position {pos}: each block must "
                                   "act on every rotary pair (i, i + d/2) as one complex scalar — a plain PCA of "
                                   "the stacked keys does not.")
        kept = float(torch.trace(u.T @ flat.T @ flat @ u) / (flat ** 2).sum())
        if kept < energy - 1e-6:
            raise Mismatch(f"your basis keeps {kept:.4f} of the key energy but the best RoPE-commuting basis keeps "
                           f"{energy:.4f}: per frequency take the TOP eigenvector of the complex g×g matrix "
                           "Σ z zᴴ (with the conjugate), not a real or a mean combination.")
        compare((u @ u.T).float(), (want @ want.T).float(), "the projector U Uᵀ", "")
    return run_check("rope_aware_group_basis", body)


def check_fold_into_query(fn: Callable[[Tensor, Tensor], Tensor]) -> CheckResult:
    def body() -> None:
        gen = _gen(3)
        d, hidden = 8, 12
        w_q = torch.randn(d, hidden, generator=gen)
        a = torch.randn(d, d, generator=gen)
        got = fn(w_q.clone(), a.clone())
        compare(got, a.T @ w_q, "fold_into_query(w_q, a)",
                "The score q·(a k') equals (aᵀ q)·k', so the new weight is aᵀ W_Q (shape [d, hidden]).")
        x, kp = torch.randn(hidden, generator=gen), torch.randn(d, generator=gen)
        if not torch.allclose((got @ x) @ kp, (w_q @ x) @ (a @ kp), atol=1e-4):
            raise Mismatch("q'·k' must equal q·(a k') for every input.")
    return run_check("fold_into_query", body)


CHECKS = {
    "to_complex_pairs": check_to_complex_pairs,
    "commuting_matrix": check_commuting_matrix,
    "rope_aware_group_basis": check_rope_aware_group_basis,
    "fold_into_query": check_fold_into_query,
}
