"""Triton kernels for the kvcourse KV-cache techniques (import name ``kvkernels``).

Set ``TRITON_INTERPRET=1`` *before* importing this package to run the kernels on the CPU through Triton's
interpreter (slow; small shapes).  On a CUDA GPU leave it unset and the kernels compile.
"""

from .decode_attention import DecodeConfig, choose_num_splits, decode_attention

__all__ = ["DecodeConfig", "choose_num_splits", "decode_attention"]
