"""Kernel tests run compiled on a CUDA GPU, or through Triton's interpreter on the CPU.

Triton decides interpreted vs compiled when a ``@triton.jit`` function is *defined*, i.e. when ``kvkernels`` is
imported, so the choice is made here, before any test module imports it: without a GPU (and without an explicit
``TRITON_INTERPRET`` in the environment) we switch the interpreter on.  On a GPU, leave ``TRITON_INTERPRET``
unset to test the compiled kernels (``scripts/gpu_validate.sh`` does).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest
from kvkernels._utils import interpreting, kernel_device


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU running compiled Triton kernels (skipped elsewhere)")


def pytest_report_header(config: pytest.Config) -> str:
    mode = "interpreted (TRITON_INTERPRET=1)" if interpreting() else "compiled"
    dev = torch.cuda.get_device_name() if kernel_device().type == "cuda" else "cpu"
    return f"kvkernels: Triton kernels {mode} on {dev}"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if kernel_device().type == "cuda":
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU with compiled Triton kernels")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture
def device() -> torch.device:
    """Where kernel inputs live in this run: ``cuda`` (compiled) or ``cpu`` (interpreter)."""
    return kernel_device()


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def compile_without_gpu(tmp_path) -> Callable[[str], None]:
    """Run a script that compiles kernels ahead of time (``kvkernels._utils.compile_for_gpu``, Triton's bundled
    ptxas) in a subprocess without ``TRITON_INTERPRET`` and a fresh Triton cache; the script must print "compiled
    ok".  Skips on a GPU, where every kernel test runs compiled anyway."""
    if kernel_device().type == "cuda":
        pytest.skip("on a GPU every kernel test runs compiled")

    def run(script: str) -> None:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["TRITON_CACHE_DIR"] = str(tmp_path)
        res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600,
                             check=False)
        assert res.returncode == 0 and "compiled ok" in res.stdout, res.stderr[-4000:]

    return run
