"""Triton kernels for the kvcourse KV-cache techniques (import name ``kvkernels``).

Set ``TRITON_INTERPRET=1`` *before* importing this package to run the kernels on the CPU through Triton's
interpreter (slow; small shapes).  On a CUDA GPU leave it unset and the kernels compile.
"""

from .decode_attention import DecodeConfig, choose_num_splits, decode_attention
from .decode_attention_mass import decode_attention_mass
from .kivi_attention import (
    KIVIDecodeConfig,
    kivi_cache_attention,
    kivi_decode_attention,
    kivi_decode_attention_ref,
)
from .kivi_pack import quantize_pack as kivi_quantize_pack
from .snapkv_score import snapkv_window_votes

__all__ = ["DecodeConfig", "KIVIDecodeConfig", "choose_num_splits", "decode_attention", "decode_attention_mass",
           "kivi_cache_attention", "kivi_decode_attention", "kivi_decode_attention_ref", "kivi_quantize_pack",
           "snapkv_window_votes"]
