"""Load the course model, or any hub model, by one name.

``load_model("kvcourse-llama")`` loads the model shipped in ``models/`` (offline).  Any other name is a local
folder or a Hugging Face hub id (e.g. ``"HuggingFaceTB/SmolLM2-135M"``), fetched on a machine with internet.
``backend="refimpl"`` returns our from-scratch :class:`~refimpl.model.LlamaModel` (Llama-family checkpoints);
``backend="hf"`` returns ``transformers``' own model, which :mod:`refimpl.eval` and :mod:`refimpl.hf_bridge` accept
as well.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

COURSE_MODEL = "kvcourse-llama"
MODELS_ENV = "KVCOURSE_MODELS_DIR"
BACKENDS = ("refimpl", "hf")

__all__ = ["COURSE_MODEL", "load_model", "model_path", "models_dir"]


def models_dir() -> Path:
    """Folder of shipped models: ``$KVCOURSE_MODELS_DIR`` or ``models/`` at the repository root."""
    env = os.environ.get(MODELS_ENV)
    return Path(env) if env else Path(__file__).resolve().parent.parent / "models"


def model_path(name: str) -> str:
    """A local folder for ``name``: a shipped model, an existing folder, or a hub download."""
    shipped = models_dir() / name
    if (shipped / "config.json").exists():
        return str(shipped)
    if os.path.isdir(name):
        return name
    if "/" not in name:
        have = sorted(p.name for p in models_dir().glob("*") if (p / "config.json").exists())
        raise FileNotFoundError(f"model {name!r} is neither a shipped model {have} nor a folder nor a hub id "
                                f"like 'HuggingFaceTB/SmolLM2-135M'")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"])
    except Exception as e:
        raise RuntimeError(f"could not download {name!r} from the Hugging Face hub ({type(e).__name__}: {e}). "
                           f"Without internet use the shipped model {COURSE_MODEL!r}.") from e


def load_model(name: str = COURSE_MODEL, backend: str = "refimpl", dtype: torch.dtype | str = torch.float32,
               device: str | torch.device = "cpu"):
    """``(model, tokenizer)`` for ``name``, in eval mode, on ``device``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    path = model_path(name)
    tok = AutoTokenizer.from_pretrained(path)
    if backend == "refimpl":
        from .model import LlamaModel

        model = LlamaModel.from_pretrained(path, dtype=dtype, device=device)
    else:
        from .model import _resolve_dtype

        model = AutoModelForCausalLM.from_pretrained(path, dtype=_resolve_dtype(dtype)).to(device).eval()
    return model, tok
