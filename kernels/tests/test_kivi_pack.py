"""Triton quantize-and-pack (``kvkernels.kivi_pack``) against the PyTorch reference ``refimpl.quant.quantize_pack``.

Both compute the group min/max, the fp16 scale and zero, the IEEE division and round-half-even in fp32, so the
codes, scales and zeros must be *bit-identical* — under the interpreter and compiled alike (no tolerance).
Shapes: odd token counts, head dims that are not powers of two (96), one token, every bit width, every dtype.
"""

from __future__ import annotations

import pytest
import torch
from kvkernels._utils import kernel_device
from kvkernels.kivi_pack import quantize_pack

from refimpl.kivi import KIVICache
from refimpl.quant import quantize_pack as ref_quantize_pack

DEV = kernel_device()
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny tensors: torch's thread pool only adds overhead (and stalls on shared CI cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def rand(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    x[..., 3] = x[..., 3] * 10 + 5  # an outlier channel
    return x.to(dtype).to(DEV)


def assert_identical(got, want) -> None:
    for name, a, b in zip(("words", "scale", "zero"), got, want):
        assert a.dtype == b.dtype and a.shape == b.shape, (name, a.dtype, b.dtype, a.shape, b.shape)
        assert torch.equal(a.cpu(), b.cpu()), f"{name} differs at {(a.cpu() != b.cpu()).sum().item()} places"


@pytest.mark.parametrize("dtype", [F32, F16, BF16])
@pytest.mark.parametrize("bits,group", [(2, 32), (4, 16), (8, 32)])
@pytest.mark.parametrize("shape", [(2, 3, 37, 64), (1, 1, 1, 96)])
def test_per_token_groups_match_reference(dtype, bits, group, shape):
    x = rand(shape, dtype, seed=sum(shape) + bits)
    assert_identical(quantize_pack(x, bits, group, -1), ref_quantize_pack(x.cpu(), bits, group, -1))


@pytest.mark.parametrize("dtype", [F32, F16, BF16])
@pytest.mark.parametrize("bits,group", [(2, 32), (4, 16), (8, 16)])
@pytest.mark.parametrize("shape", [(1, 3, 64, 64), (1, 1, 32, 96)])
def test_per_channel_groups_match_reference(dtype, bits, group, shape):
    x = rand(shape, dtype, seed=sum(shape) + 7 * bits)
    assert_identical(quantize_pack(x, bits, group, -2), ref_quantize_pack(x.cpu(), bits, group, -2))


def test_constant_groups_and_ties():
    x = torch.full((1, 1, 32, 32), 0.5)
    x[0, 0, 0, :16] = torch.arange(16.0) / 5  # ties after scaling do occur: (k/5) / (3/15) = k
    x[0, 0, 1] = torch.tensor([0.0, 0.5, 1.5, 2.5, 3.0] + [3.0] * 27)  # 2-bit steps of 1: ties at .5
    x = x.to(DEV)
    for dim in (-1, -2):
        got = quantize_pack(x, 2, 32, dim)
        assert_identical(got, ref_quantize_pack(x.cpu(), 2, 32, dim))
        assert torch.isfinite(got[1].float()).all() and torch.isfinite(got[2].float()).all()


def test_non_contiguous_input_and_empty():
    x = rand((2, 40, 3, 64), F16, seed=3).transpose(1, 2)  # [2, 3, 40, 64] with permuted strides
    assert_identical(quantize_pack(x, 2, 32, -1), ref_quantize_pack(x.cpu(), 2, 32, -1))
    w, s, z = quantize_pack(torch.zeros(1, 2, 0, 64, device=DEV), 2, 32, -1)
    assert w.shape == (1, 2, 0, 4) and s.shape == z.shape == (1, 2, 0, 2)


def test_as_kivi_cache_quantizer_gives_identical_cache():
    g = torch.Generator().manual_seed(0)
    a = KIVICache(1, bits=2, group_size=16, residual_length=32, quantizer=quantize_pack)
    b = KIVICache(1, bits=2, group_size=16, residual_length=32)
    for t in (45, 1, 1, 20):
        k, v = torch.randn(2, 2, t, 32, generator=g), torch.randn(2, 2, t, 32, generator=g)
        a.update(0, k.to(DEV), v.to(DEV))
        b.update(0, k, v)
    for x, y in zip(a.layer_state(0).tensors(), b.layer_state(0).tensors()):
        assert torch.equal(x.cpu(), y)


def test_bad_arguments():
    x = torch.zeros(1, 1, 32, 64, device=DEV)
    with pytest.raises(ValueError, match="bits must be one of"):
        quantize_pack(x, 3, 32)
    with pytest.raises(ValueError, match="dim must be -1"):
        quantize_pack(x, 2, 32, 0)
    with pytest.raises(ValueError, match=r"tokens \(20\) must be a multiple of group_size \(16\)"):
        quantize_pack(torch.zeros(1, 20, 64, device=DEV), 2, 16, -2)
    with pytest.raises(ValueError, match=r"head_dim \(48\) must be a multiple of group_size \(32\)"):
        quantize_pack(torch.zeros(1, 4, 48, device=DEV), 2, 32, -1)
    with pytest.raises(TypeError, match="float32/float16/bfloat16"):
        quantize_pack(torch.zeros(1, 4, 64, dtype=torch.int32, device=DEV), 2, 32)
