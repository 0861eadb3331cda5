"""The glue in ``benchmarks/bench_kivi.py`` that runs the fused KIVI kernel inside transformers.

* ``PreallocKIVICache`` (preallocated buffers + sliding residual windows) stores exactly what the reference
  ``refimpl.kivi.KIVICache`` stores, step after step, through a long prefill, compactions and flushes.
* Greedy decoding with the ``kivi_fused`` attention (the kernel reads packed codes) gives the logits of the
  reference path (``refimpl.hf_bridge``: dequantize + SDPA) from the same cache state, across a key flush.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from kvkernels._utils import kernel_device

from refimpl.kivi import KIVICache, kivi_nbytes

DEV = kernel_device()
_PATH = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "bench_kivi.py")


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny tensors: torch's thread pool only adds overhead (and stalls on shared CI cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_kivi", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_prealloc_storage_equals_reference(bench):
    from refimpl.quant import quantize_pack

    g = torch.Generator().manual_seed(0)
    ref = KIVICache(2, bits=2, group_size=16, residual_length=32)
    pre = bench.PreallocKIVICache(2, 2, 16, 32, capacity=300, quantizer=quantize_pack)
    t = 0
    for n in [150] + [1] * 40 + [5, 1, 1]:  # long prefill (buffers shrink after it), then many decode steps
        for layer in range(2):
            k, v = torch.randn(2, 3, n, 32, generator=g), torch.randn(2, 3, n, 32, generator=g)
            a, b = ref.update(layer, k, v), pre.update(layer, k, v)
            assert torch.equal(a.k, b.k) and torch.equal(a.v, b.v)
        t += n
        for layer in range(2):
            for x, y in zip(ref.layer_state(layer).tensors(), pre.layer_state(layer).tensors()):
                assert (x is None and y is None) or torch.equal(x, y)
    assert pre.nbytes() == ref.nbytes() == kivi_nbytes(t, batch=2, kv_heads=3, head_dim=32, num_layers=2, bits=2,
                                                       group_size=16, residual_length=32, dtype_bytes=4)
    assert pre.allocated_nbytes() >= pre.nbytes()
    with pytest.raises(RuntimeError, match="capacity of 300 tokens exceeded"):
        pre.update(0, torch.randn(2, 3, 200, 32), torch.randn(2, 3, 200, 32))


def test_fill_random_gives_the_kivi_split(bench):
    pre = bench.PreallocKIVICache(1, 2, 32, 128, capacity=400)
    pre.fill_random(300, 1, 2, 64, torch.float16, "cpu", seed=0)
    assert pre.split(0) == (256, 44, 172, 128) and pre.seq_length(0) == 300


def test_fused_decoding_matches_reference_path(bench):
    msg = bench.check_e2e(DEV.type, torch.float32)  # raises if the logits differ by more than 1e-3
    assert "matches" in msg
