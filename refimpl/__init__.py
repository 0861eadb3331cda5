"""kvcourse reference implementation: a from-scratch Llama decoder and one module per KV-cache technique."""

from .cache import DenseCache, KVCache, LayerKV
from .config import ModelConfig
from .h2o import H2OCache
from .kivi import KIVICache, NaiveQuantCache
from .model import LlamaModel
from .pyramidkv import PyramidKVCache
from .snapkv import SnapKVCache
from .streaming import StreamingLLMCache

__all__ = ["DenseCache", "H2OCache", "KIVICache", "KVCache", "LayerKV", "LlamaModel", "ModelConfig",
           "NaiveQuantCache", "PyramidKVCache", "SnapKVCache", "StreamingLLMCache"]
__version__ = "0.1.0"
