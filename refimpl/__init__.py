"""kvcourse reference implementation: a from-scratch Llama decoder and one module per KV-cache technique."""

from .cache import DenseCache, KVCache, LayerKV
from .config import ModelConfig
from .model import LlamaModel

__all__ = ["DenseCache", "KVCache", "LayerKV", "ModelConfig", "LlamaModel"]
__version__ = "0.1.0"
