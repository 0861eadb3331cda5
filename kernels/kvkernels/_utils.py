"""Helpers shared by the Triton kernels: interpreter detection, device checks, launch arithmetic.

Triton kernels run in two ways in this course:

* **compiled** on a CUDA GPU (the real thing, and what the benchmarks time);
* **interpreted** on the CPU when ``TRITON_INTERPRET=1`` is set *before* ``triton`` is imported: every program
  instance runs one after the other through NumPy.  That is how CI tests the kernels without a GPU.  The
  interpreter has no bf16 arithmetic, so kernels cast tiles to fp32 (see ``compute_in_fp32``).

Kernel authors import from here; nothing in this module launches a kernel.
"""

from __future__ import annotations

import functools
import os

import torch
from torch import Tensor

__all__ = [
    "INTERPRETER_NUM_SMS",
    "cdiv",
    "check_launchable",
    "compute_in_fp32",
    "interpreting",
    "kernel_device",
    "next_power_of_2",
    "num_sms",
    "use_pdl",
]

# The interpreter runs programs one at a time; pretend to have a tiny GPU so split heuristics still split.
INTERPRETER_NUM_SMS = 2


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET`` set to a true value)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def kernel_device() -> torch.device:
    """Where kernel inputs should live: the GPU when compiled kernels can run, else the CPU (interpreter)."""
    if torch.cuda.is_available() and not interpreting():
        return torch.device("cuda")
    return torch.device("cpu")


def check_launchable(*tensors: Tensor) -> None:
    """Raise a clear error if a kernel cannot run on these tensors here.

    Compiled kernels need CUDA tensors; CPU tensors need the interpreter (``TRITON_INTERPRET=1`` set before
    ``triton`` is imported, e.g. ``TRITON_INTERPRET=1 pytest kernels/tests``).
    """
    devices = {t.device.type for t in tensors}
    if devices - {"cuda", "cpu"}:
        raise ValueError(f"Triton kernels take CUDA tensors (or CPU tensors under TRITON_INTERPRET=1); got {devices}")
    if "cpu" in devices and not interpreting():
        raise RuntimeError(
            "CPU tensors need Triton's interpreter: set TRITON_INTERPRET=1 before importing triton/kvkernels "
            "(or move the tensors to a CUDA device)"
        )


def _cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.cache
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.cache
def _cuda_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def device_name(device: torch.device | str) -> str:
    """The CUDA device's name (e.g. ``"NVIDIA H200"``), or ``""`` under the interpreter / on CPU."""
    device = torch.device(device)
    if device.type != "cuda" or interpreting():
        return ""
    return _cuda_name(_cuda_index(device))


def num_sms(device: torch.device | str) -> int:
    """Streaming multiprocessors of ``device``; :data:`INTERPRETER_NUM_SMS` under the interpreter / on CPU."""
    device = torch.device(device)
    if device.type != "cuda" or interpreting():
        return INTERPRETER_NUM_SMS
    return _cuda_sms(_cuda_index(device))


# Programmatic dependent launch (compute capability >= 9.0): a split-KV kernel lets the combine kernel that follows
# it launch while it still runs (``gdc_launch_dependents``); the combine programs wait in ``gdc_wait`` until the
# split kernel has finished and its writes are visible.  That hides one kernel-launch latency per call (what
# matters for short decode calls).  Set ``kvkernels._utils.PDL = False`` to launch the two phases one after the
# other, e.g. to time the difference.
PDL = True


@functools.cache
def _cuda_cc_major(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


def use_pdl(device: torch.device | str) -> bool:
    """Whether to launch a split kernel's combine kernel with programmatic dependent launch (see :data:`PDL`):
    compiled kernels on a CUDA GPU of compute capability 9.0 or newer, and :data:`PDL` true."""
    device = torch.device(device)
    if not PDL or device.type != "cuda" or interpreting():
        return False
    return _cuda_cc_major(_cuda_index(device)) >= 9


def compute_in_fp32(dtype: torch.dtype) -> bool:
    """Whether a kernel should upcast tiles to fp32 before arithmetic: fp32 inputs, or bf16 under the interpreter.

    Compiled fp16/bf16 kernels keep tiles in their storage type for ``tl.dot`` (tensor cores, fp32 accumulate).
    The interpreter runs fp16 the same way (NumPy has float16), so CPU tests cover that code path too, but NumPy
    has no bfloat16, so interpreted bf16 tiles are upcast to fp32.
    """
    return dtype == torch.float32 or (dtype == torch.bfloat16 and interpreting())


def cdiv(a: int, b: int) -> int:
    """Ceiling division for non-negative ints."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """Smallest power of two ≥ ``n`` (1 for ``n ≤ 1``)."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def compile_for_gpu(kernel, arg_types: dict[str, str], constexprs: dict[str, object], arch: int = 90,
                    num_warps: int = 4, num_stages: int = 3, divisible_by_16: tuple[str, ...] | str = "pointers"):
    """Compile a ``@triton.jit`` kernel ahead of time for an NVIDIA GPU of compute capability ``arch`` (90 = H100/H200).

    Needs no GPU: Triton's wheel ships ``ptxas``.  CI uses it to catch errors in the *compiled* code path, which
    the interpreter never exercises.  ``arg_types`` maps every non-constexpr argument to a Triton type string
    (``"*fp16"``, ``"*u8"``, ``"i32"``, ``"fp32"``, ...); ``constexprs`` gives the constexpr values (and may pin
    ints such as a unit stride, as the JIT would specialise them; constexprs with a default may be left out).
    ``divisible_by_16`` names the arguments the JIT would see as multiples of 16 (aligned pointers, strides of
    contiguous tensors) — without it loads are not vectorised or pipelined; the default ``"pointers"`` marks every
    pointer argument.  Returns the compiled kernel
    (``.asm["ptx"]``, ``.metadata.shared``).  Must run without ``TRITON_INTERPRET``.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if interpreting():
        raise RuntimeError("compile_for_gpu needs compiled kernels: run it in a process without TRITON_INTERPRET=1")
    import inspect

    defaults = {n: p.default for n, p in inspect.signature(kernel.fn).parameters.items()
                if p.default is not inspect.Parameter.empty}
    constexprs = {**{n: v for n, v in defaults.items() if n not in arg_types}, **constexprs}
    missing = [a for a in kernel.arg_names if a not in constexprs and a not in arg_types]
    if missing:
        raise ValueError(f"arg_types must give a type for every non-constexpr argument; missing {missing}")
    signature = {a: "constexpr" if a in constexprs else arg_types[a] for a in kernel.arg_names}
    if divisible_by_16 == "pointers":
        divisible_by_16 = tuple(a for a, t in signature.items() if t.startswith("*"))
    attrs = {(kernel.arg_names.index(a),): [["tt.divisibility", 16]] for a in divisible_by_16}
    src = ASTSource(kernel, signature, constexprs, attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})
