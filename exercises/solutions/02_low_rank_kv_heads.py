"""Solutions to exercise 02 (low-rank KV heads that stay exact under RoPE)."""

from __future__ import annotations

import torch
from torch import Tensor


def to_complex_pairs(x: Tensor) -> Tensor:
    """``[..., d]`` → ``[..., d/2]`` complex, ``z_i = x_i + j·x_{i+d/2}`` (rotate_half layout)."""
    f = x.shape[-1] // 2
    return torch.complex(x[..., :f], x[..., f:])


def commuting_matrix(c: Tensor) -> Tensor:
    """Real ``[d, d]`` matrix that multiplies rotary pair i by the complex scalar ``c[i]``."""
    f = c.shape[0]
    a = torch.zeros(2 * f, 2 * f, dtype=c.real.dtype)
    i = torch.arange(f)
    a[i, i] = c.real
    a[i, i + f] = -c.imag
    a[i + f, i] = c.imag
    a[i + f, i + f] = c.real
    return a


def rope_aware_group_basis(keys: Tensor) -> Tensor:
    """Pre-RoPE keys ``[N, g, d]`` → ``U`` ``[g·d, d]``: per frequency the top eigenvector of Σ z zᴴ."""
    g = keys.shape[1]
    z = to_complex_pairs(keys)  # [N, g, d/2]
    cov = torch.einsum("nsi,nti->ist", z, z.conj())  # [d/2, g, g] Hermitian
    _, vecs = torch.linalg.eigh(cov)  # ascending eigenvalues
    top = vecs[:, :, -1]  # [d/2, g]: the best complex combination of the g heads, per frequency
    return torch.cat([commuting_matrix(top[:, s]) for s in range(g)], dim=0)


def fold_into_query(w_q: Tensor, a: Tensor) -> Tensor:
    """``q·(a k') = (aᵀ q)·k'``: the new query weight is ``aᵀ W_Q``."""
    return a.T @ w_q
