"""Plausible mistakes for exercise 02; every one must fail its check."""

from __future__ import annotations

import torch
from torch import Tensor


def _pairs(x: Tensor) -> Tensor:
    f = x.shape[-1] // 2
    return torch.complex(x[..., :f], x[..., f:])


def _block(c: Tensor, conj: bool = False, interleaved: bool = False) -> Tensor:
    f = c.shape[0]
    a = torch.zeros(2 * f, 2 * f, dtype=c.real.dtype)
    i = torch.arange(f)
    re, im = c.real, (-c.imag if conj else c.imag)
    x, y = (2 * i, 2 * i + 1) if interleaved else (i, i + f)
    a[x, x], a[x, y], a[y, x], a[y, y] = re, -im, im, re
    return a


# -- to_complex_pairs -----------------------------------------------------------------------------------
def pairs_interleaved(x: Tensor) -> Tensor:  # GPT-J layout (2i, 2i+1) instead of rotate_half (i, i+d/2)
    return torch.complex(x[..., 0::2], x[..., 1::2])


def pairs_swapped(x: Tensor) -> Tensor:  # second half as the real part
    f = x.shape[-1] // 2
    return torch.complex(x[..., f:], x[..., :f])


def pairs_real_concat(x: Tensor) -> Tensor:  # forgot to build a complex tensor at all
    return x


# -- commuting_matrix -----------------------------------------------------------------------------------
def block_conjugate(c: Tensor) -> Tensor:  # [[a, b], [-b, a]]: multiplies by conj(c)
    return _block(c, conj=True)


def block_interleaved(c: Tensor) -> Tensor:  # right blocks, wrong (GPT-J) pairing
    return _block(c, interleaved=True)


def block_real_only(c: Tensor) -> Tensor:  # dropped the imaginary part: a real scalar per frequency
    return _block(torch.complex(c.real, torch.zeros_like(c.real)))


# -- rope_aware_group_basis -----------------------------------------------------------------------------
def _stack(top: Tensor, g: int) -> Tensor:
    return torch.cat([_block(top[:, s]) for s in range(g)], dim=0)


def basis_plain_pca(keys: Tensor) -> Tensor:  # RoPE-unaware: top-d eigenvectors of the stacked keys
    n, g, d = keys.shape
    flat = keys.reshape(n, g * d)
    _, vecs = torch.linalg.eigh(flat.T @ flat)
    return vecs[:, -d:].flip(1)


def basis_real_coefficients(keys: Tensor) -> Tensor:  # one real combination per frequency (PCA of Re C)
    z = _pairs(keys)
    cov = torch.einsum("nsi,nti->ist", z, z.conj()).real
    _, vecs = torch.linalg.eigh(cov)
    top = vecs[:, :, -1]
    return _stack(torch.complex(top, torch.zeros_like(top)), keys.shape[1])


def basis_no_conjugate(keys: Tensor) -> Tensor:  # Σ z zᵀ is not Hermitian; eigh reads one triangle
    z = _pairs(keys)
    cov = torch.einsum("nsi,nti->ist", z, z)
    _, vecs = torch.linalg.eigh(cov)
    return _stack(vecs[:, :, -1], keys.shape[1])


def basis_smallest_eigenvector(keys: Tensor) -> Tensor:  # eigh sorts ascending: [:, :, 0] is the WORST
    z = _pairs(keys)
    cov = torch.einsum("nsi,nti->ist", z, z.conj())
    _, vecs = torch.linalg.eigh(cov)
    return _stack(vecs[:, :, 0], keys.shape[1])


def basis_mean_pool(keys: Tensor) -> Tensor:  # GQA mean-pooling: every head weighted 1/sqrt(g), no data used
    _, g, d = keys.shape
    return torch.cat([torch.eye(d, dtype=keys.dtype) / g ** 0.5] * g, dim=0)


# -- fold_into_query ------------------------------------------------------------------------------------
def fold_no_transpose(w_q: Tensor, a: Tensor) -> Tensor:
    return a @ w_q


def fold_inverse(w_q: Tensor, a: Tensor) -> Tensor:  # "undo" a instead of moving it across the dot product
    return torch.linalg.solve(a, w_q)


def fold_nothing(w_q: Tensor, a: Tensor) -> Tensor:
    return w_q


WRONG = {
    "to_complex_pairs": [pairs_interleaved, pairs_swapped, pairs_real_concat],
    "commuting_matrix": [block_conjugate, block_interleaved, block_real_only],
    "rope_aware_group_basis": [basis_plain_pca, basis_real_coefficients, basis_no_conjugate,
                               basis_smallest_eigenvector, basis_mean_pool],
    "fold_into_query": [fold_no_transpose, fold_inverse, fold_nothing],
}
