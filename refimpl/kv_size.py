"""How many bytes a model's KV cache takes, from its Hugging Face ``config.json`` alone.

Every layer caches, for every token of every sequence, one key and one value vector per KV head
(Vaswani et al. 2017 §3.2; the cache itself: Pope et al. 2022, "Efficiently Scaling Transformer Inference", §2):

    bytes = 2 · n_layers · n_kv_heads · head_dim · T · batch · bytes_per_element                       (1)

Each technique in the course shrinks one factor:

* **MQA / GQA** (Shazeer 2019; Ainslie et al. 2023): ``n_kv_heads = num_key_value_heads`` < ``num_attention_heads``.
* **MLA** (DeepSeek-V2, arXiv 2405.04434, eq. 9-10 and §2.1.3): a layer caches one joint latent
  ``c_t^KV ∈ R^{d_c}`` and one decoupled RoPE key ``k_t^R ∈ R^{d_h^R}`` shared by all heads, so (1) becomes

      bytes = n_layers · (kv_lora_rank + qk_rope_head_dim) · T · batch · bytes_per_element             (2)

  (``mla="expanded"`` counts what a naive implementation that caches per-head K and V holds instead:
  ``num_attention_heads · (qk_nope_head_dim + qk_rope_head_dim + v_head_dim)`` per token per layer).
* **Sliding-window layers** (Mistral 7B, arXiv 2310.06825 §2; Gemma 2/3) keep only the last ``W`` tokens, so such a
  layer holds ``min(T, W)`` entries.  Which layers slide comes from ``layer_types`` when the config has it, else
  from the family's rule (Gemma 2: every other layer; Gemma 3: ``sliding_window_pattern``; Qwen2: layers
  ``>= max_window_layers`` when ``use_sliding_window``; Mistral: all layers when ``sliding_window`` is set).
* **Quantised storage** (KIVI, arXiv 2402.02750): ``bits`` per element instead of 16, plus one scale (and, for
  asymmetric quantisation, one zero-point) per ``group_size`` elements, and optionally the ``residual_tokens`` most
  recent tokens kept in 16 bits.

Known answer (tested): Llama-2-70B, 4096 tokens, fp16 = 2·80·8·128·4096·2 B = 1,342,177,280 B = 1.34 GB per sequence.

Command line: ``kv-size CONFIG --context 4096 --batch 1 --dtype fp16`` (``python -m refimpl.kv_size --help``);
``CONFIG`` is a ``config.json``, a folder holding one, or the name of a bundled config (``kv-size --list``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "DTYPE_BITS",
    "KVSize",
    "KVSpec",
    "LayerSize",
    "bundled_configs",
    "format_bytes",
    "kv_bytes",
    "kv_cache_size",
    "load_config",
    "main",
    "read_kv_spec",
]

#: Storage formats and their bits per element.  An int bit width (1..32) is accepted too.
DTYPE_BITS: dict[str, int] = {
    "fp32": 32, "float32": 32,
    "fp16": 16, "float16": 16, "bf16": 16, "bfloat16": 16,
    "fp8": 8, "float8": 8, "int8": 8,
    "int4": 4, "4bit": 4,
    "int2": 2, "2bit": 2,
}
_FLOAT_FORMATS = {"fp32", "float32", "fp16", "float16", "bf16", "bfloat16"}
MLA_MODES = ("latent", "expanded")
LAYER_TYPES = {"full_attention": "full", "sliding_attention": "sliding"}

# Where bundled configs live: <repo>/configs/*.json (present in a source checkout / editable install).
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"

_ALIASES = {
    "num_hidden_layers": ("num_hidden_layers", "n_layer", "num_layers", "n_layers"),
    "num_attention_heads": ("num_attention_heads", "n_head", "num_heads", "n_heads"),
    "hidden_size": ("hidden_size", "n_embd", "d_model", "dim"),
}


# -------------------------------------------------------------------------------------------------- inputs
def bundled_configs() -> dict[str, Path]:
    """Name → path of the published configs shipped in ``configs/`` (e.g. ``"llama-2-70b"``)."""
    if not CONFIG_DIR.is_dir():
        return {}
    return {p.stem: p for p in sorted(CONFIG_DIR.glob("*.json"))}


def load_config(config: dict[str, Any] | str | os.PathLike | Any) -> dict[str, Any]:
    """A config dict from a dict, a ``PretrainedConfig``, a ``config.json`` path, a folder, or a bundled name."""
    if isinstance(config, dict):
        return dict(config)
    if hasattr(config, "to_dict"):
        return config.to_dict()
    if not isinstance(config, (str, os.PathLike)):
        raise TypeError(f"config must be a dict, a PretrainedConfig or a path; got {type(config).__name__}")
    path = Path(config)
    if path.is_dir():
        path = path / "config.json"
    if not path.exists():
        named = bundled_configs()
        if str(config) in named:
            path = named[str(config)]
        else:
            raise FileNotFoundError(
                f"config {str(config)!r} is neither a config.json, a folder holding one, nor a bundled config; "
                f"bundled configs: {sorted(named)}"
            )
    with open(path) as f:
        return json.load(f)


def _get(cfg: dict[str, Any], key: str) -> Any:
    for k in _ALIASES.get(key, (key,)):
        if cfg.get(k) is not None:
            return cfg[k]
    tried = _ALIASES.get(key, (key,))
    raise KeyError(
        f"config (model_type={cfg.get('model_type')!r}) is missing {key!r}"
        + (f" (also looked for {list(tried[1:])})" if len(tried) > 1 else "")
    )


def _positive_int(val: Any, name: str) -> int:
    if isinstance(val, bool) or not isinstance(val, int) or val < 1:
        raise ValueError(f"{name} must be a positive int; got {val!r}")
    return val


# ------------------------------------------------------------------------------------------ architecture
@dataclass(frozen=True)
class KVSpec:
    """What a config says about its KV cache.  ``layer_kinds[i]`` is ``"full"``, ``"sliding"`` or ``"mla"``.

    For MLA, ``num_kv_heads`` = 1 and ``head_dim`` = ``kv_lora_rank + qk_rope_head_dim``: with the up-projections
    absorbed, MLA decodes like MQA over one 576-wide "head" (DeepSeek-V2/V3: 512 + 64).
    """

    model_type: str
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    layer_kinds: tuple[str, ...]
    sliding_window: int | None = None
    kv_lora_rank: int | None = None  # MLA latent width d_c
    qk_rope_head_dim: int | None = None  # MLA decoupled RoPE key width d_h^R
    qk_nope_head_dim: int | None = None
    v_head_dim: int | None = None

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank is not None

    def elements_per_token(self, mla: str = "latent") -> int:
        """Cached elements per token per layer (one sequence)."""
        if mla not in MLA_MODES:
            raise ValueError(f"mla must be one of {MLA_MODES}; got {mla!r}")
        if self.is_mla:
            if mla == "latent":
                return self.kv_lora_rank + self.qk_rope_head_dim
            return self.num_attention_heads * (self.qk_nope_head_dim + self.qk_rope_head_dim + self.v_head_dim)
        return 2 * self.num_kv_heads * self.head_dim

    def describe(self) -> str:
        kinds = {k: self.layer_kinds.count(k) for k in dict.fromkeys(self.layer_kinds)}
        if self.is_mla:
            att = f"MLA latent {self.kv_lora_rank} + RoPE key {self.qk_rope_head_dim}"
        else:
            att = f"{self.num_attention_heads} query heads, {self.num_kv_heads} KV heads, head_dim {self.head_dim}"
        win = f", window {self.sliding_window}" if "sliding" in kinds else ""
        layer_txt = ", ".join(f"{n} {k}" for k, n in kinds.items())
        return f"{self.model_type}: {self.num_layers} layers ({layer_txt}{win}); {att}"


def _layer_kinds(cfg: dict[str, Any], n_layers: int) -> tuple[tuple[str, ...], int | None]:
    window = cfg.get("sliding_window")
    if cfg.get("use_sliding_window") is False:  # Qwen2/Qwen3: the window is only used when switched on
        window = None
    types = cfg.get("layer_types")
    if types is not None:
        if len(types) != n_layers:
            raise ValueError(f"layer_types has {len(types)} entries but num_hidden_layers is {n_layers}")
        bad = sorted({t for t in types if t not in LAYER_TYPES})
        if bad:
            raise ValueError(f"layer_types entries must be one of {sorted(LAYER_TYPES)}; got {bad}")
        kinds = tuple(LAYER_TYPES[t] for t in types)
        if "sliding" in kinds and window is None:
            raise ValueError("layer_types has sliding_attention layers but sliding_window is not set")
        return kinds, (window if "sliding" in kinds else None)
    if window is None:
        return ("full",) * n_layers, None
    mt = str(cfg.get("model_type", ""))
    pattern = cfg.get("sliding_window_pattern")
    if pattern is None and mt.startswith("gemma2"):
        pattern = 2
    if pattern is not None:  # Gemma: layer i is full when (i + 1) % pattern == 0
        pattern = _positive_int(pattern, "sliding_window_pattern")
        return tuple("full" if (i + 1) % pattern == 0 else "sliding" for i in range(n_layers)), window
    if "max_window_layers" in cfg and mt.startswith("qwen"):  # Qwen2: layers >= max_window_layers slide
        m = cfg["max_window_layers"]
        return tuple("sliding" if i >= m else "full" for i in range(n_layers)), window
    return ("sliding",) * n_layers, window


def read_kv_spec(config: dict[str, Any] | str | os.PathLike | Any) -> KVSpec:
    """Normalise a Hugging Face config (Llama, Mistral, Qwen2, Gemma, OPT, GPT-2 style, DeepSeek-V2/V3 MLA)."""
    cfg = load_config(config)
    if "text_config" in cfg and not any(k in cfg for k in _ALIASES["num_hidden_layers"]):
        cfg = {**cfg["text_config"], "model_type": cfg["text_config"].get("model_type", cfg.get("model_type"))}
    model_type = str(cfg.get("model_type", "unknown"))
    n_layers = _positive_int(_get(cfg, "num_hidden_layers"), "num_hidden_layers")
    n_heads = _positive_int(_get(cfg, "num_attention_heads"), "num_attention_heads")
    if cfg.get("kv_lora_rank") is not None:  # MLA (DeepSeek-V2/V3)
        for key in ("qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim"):
            if cfg.get(key) is None:
                raise KeyError(f"MLA config (kv_lora_rank set) is missing {key!r}")
        rank = _positive_int(cfg["kv_lora_rank"], "kv_lora_rank")
        rope = _positive_int(cfg["qk_rope_head_dim"], "qk_rope_head_dim")
        return KVSpec(model_type, n_layers, n_heads, 1, rank + rope, ("mla",) * n_layers, None, rank, rope,
                      _positive_int(cfg["qk_nope_head_dim"], "qk_nope_head_dim"),
                      _positive_int(cfg["v_head_dim"], "v_head_dim"))
    n_kv = cfg.get("num_key_value_heads", cfg.get("num_kv_heads", cfg.get("n_head_kv")))
    if n_kv is None:
        n_kv = 1 if cfg.get("multi_query") else n_heads
    n_kv = _positive_int(n_kv, "num_key_value_heads")
    if n_heads % n_kv:
        raise ValueError(f"num_key_value_heads ({n_kv}) must divide num_attention_heads ({n_heads})")
    head_dim = cfg.get("head_dim")
    if head_dim is None:
        hidden = _positive_int(_get(cfg, "hidden_size"), "hidden_size")
        if hidden % n_heads:
            raise ValueError(f"hidden_size ({hidden}) is not divisible by num_attention_heads ({n_heads}); "
                             "the config must give head_dim")
        head_dim = hidden // n_heads
    head_dim = _positive_int(head_dim, "head_dim")
    kinds, window = _layer_kinds(cfg, n_layers)
    if window is not None:
        window = _positive_int(window, "sliding_window")
    return KVSpec(model_type, n_layers, n_heads, n_kv, head_dim, kinds, window)


# ------------------------------------------------------------------------------------------------ sizes
def kv_bytes(num_layers: int, num_kv_heads: int, head_dim: int, tokens: int, batch: int = 1,
             bytes_per_element: float = 2) -> int:
    """Equation (1): ``2 · layers · kv_heads · head_dim · tokens · batch · bytes_per_element`` (rounded up)."""
    return math.ceil(2 * num_layers * num_kv_heads * head_dim * tokens * batch * bytes_per_element)


def _bits(dtype: str | int) -> float:
    if isinstance(dtype, bool):
        raise ValueError(  # noqa: TRY004 - every bad argument of this API raises ValueError
            f"dtype must be one of {sorted(DTYPE_BITS)} or an int bit width 1..32; got {dtype!r}")
    if isinstance(dtype, int):
        if not 1 <= dtype <= 32:
            raise ValueError(f"dtype as a bit width must be in 1..32; got {dtype}")
        return dtype
    if dtype not in DTYPE_BITS:
        raise ValueError(f"dtype must be one of {sorted(DTYPE_BITS)} or an int bit width 1..32; got {dtype!r}")
    return DTYPE_BITS[dtype]


@dataclass(frozen=True)
class LayerSize:
    """One layer for the whole batch: ``tokens`` entries held per sequence (``min(T, W)`` when sliding)."""

    index: int
    kind: str
    tokens: int
    elements_per_token: int
    value_bytes: int
    scale_bytes: int

    @property
    def bytes(self) -> int:
        return self.value_bytes + self.scale_bytes


@dataclass(frozen=True)
class KVSize:
    """Breakdown of a KV cache: per layer, totals, and human-readable strings."""

    spec: KVSpec
    context: int
    batch: int
    dtype: str
    bits: float
    group_size: int | None
    residual_tokens: int
    mla: str
    layers: tuple[LayerSize, ...]

    @property
    def value_bytes(self) -> int:
        return sum(layer.value_bytes for layer in self.layers)

    @property
    def scale_bytes(self) -> int:
        return sum(layer.scale_bytes for layer in self.layers)

    @property
    def total_bytes(self) -> int:
        return self.value_bytes + self.scale_bytes

    @property
    def per_sequence_bytes(self) -> float:
        return self.total_bytes / self.batch

    @property
    def bytes_per_token(self) -> float:
        """Average bytes per cached position of one sequence (all layers) at this context."""
        return self.total_bytes / (self.batch * self.context) if self.context else 0.0

    @property
    def human(self) -> str:
        return f"{format_bytes(self.total_bytes)} ({format_bytes(self.total_bytes, binary=True)})"

    def by_kind(self) -> dict[str, tuple[int, int, int]]:
        """kind → (number of layers, entries held per sequence, bytes of those layers)."""
        out: dict[str, tuple[int, int, int]] = {}
        for layer in self.layers:
            n, t, b = out.get(layer.kind, (0, layer.tokens, 0))
            out[layer.kind] = (n + 1, t, b + layer.bytes)
        return out

    def table(self, per_layer: bool = False) -> str:
        fmt = "{:<10} {:<8} {:>12} {:>14} {:>12} {:>12}"
        lines = [
            self.spec.describe(),
            f"context {self.context:,} tokens x batch {self.batch}, {self.dtype} ({self.bits:g} bits/element)"
            + (f", scales per {self.group_size} elements" if self.group_size else "")
            + (f", last {self.residual_tokens} tokens in 16 bits" if self.residual_tokens else "")
            + (f", MLA {self.mla}" if self.spec.is_mla else ""),
            "",
            fmt.format("layers", "kind", "tokens held", "elements/token", "bytes/layer", "subtotal"),
        ]
        if per_layer:
            for layer in self.layers:
                lines.append(fmt.format(str(layer.index), layer.kind, f"{layer.tokens:,}",
                                        f"{layer.elements_per_token:,}", format_bytes(layer.bytes),
                                        format_bytes(layer.bytes)))
        else:
            for kind, (n, t, b) in self.by_kind().items():
                ept = next(layer.elements_per_token for layer in self.layers if layer.kind == kind)
                lines.append(fmt.format(str(n), kind, f"{t:,}", f"{ept:,}", format_bytes(b / n), format_bytes(b)))
        lines.append("")
        lines.append(f"total: {self.total_bytes:,} B = {self.human}")
        if self.scale_bytes:
            lines.append(f"  of which scales/zero-points: {format_bytes(self.scale_bytes)}")
        lines.append(f"per sequence: {format_bytes(self.per_sequence_bytes)};  "
                     f"per token (all layers): {format_bytes(self.bytes_per_token, binary=True)}")
        return "\n".join(lines)


def kv_cache_size(config: dict[str, Any] | str | os.PathLike | KVSpec | Any, context: int = 4096,
                  batch: int = 1, dtype: str | int = "fp16", group_size: int | None = None,
                  zero_point: bool = True, scale_dtype: str = "fp16", residual_tokens: int = 0,
                  mla: str = "latent") -> KVSize:
    """KV-cache bytes of ``batch`` sequences of ``context`` tokens for the model described by ``config``.

    dtype:            storage format (``fp32 fp16 bf16 fp8 int8 int4 int2`` ...) or a bit width 1..32.
    group_size:       one ``scale_dtype`` scale (+ one zero-point if ``zero_point``) per ``group_size`` elements,
                      counted over each layer's tensor of one sequence (KIVI-style groups); only for ≤ 8 bits.
    residual_tokens:  the most recent tokens a KIVI cache keeps unquantised (in 16 bits).
    mla:              ``"latent"`` (what MLA caches) or ``"expanded"`` (per-head K/V of a naive implementation).
    """
    spec = config if isinstance(config, KVSpec) else read_kv_spec(config)
    if isinstance(context, bool) or not isinstance(context, int) or context < 0:
        raise ValueError(f"context must be a non-negative int (tokens); got {context!r}")
    batch = _positive_int(batch, "batch")
    bits = _bits(dtype)
    if mla not in MLA_MODES:
        raise ValueError(f"mla must be one of {MLA_MODES}; got {mla!r}")
    if scale_dtype not in DTYPE_BITS:
        raise ValueError(f"scale_dtype must be one of {sorted(DTYPE_BITS)}; got {scale_dtype!r}")
    if group_size is not None:
        group_size = _positive_int(group_size, "group_size")
        if bits > 8:
            raise ValueError(f"group_size (quantisation scales) needs a format of at most 8 bits; dtype {dtype!r} "
                             f"has {bits} bits")
    if isinstance(residual_tokens, bool) or not isinstance(residual_tokens, int) or residual_tokens < 0:
        raise ValueError(f"residual_tokens must be a non-negative int; got {residual_tokens!r}")
    ept = spec.elements_per_token(mla)
    scale_bits = DTYPE_BITS[scale_dtype] * (2 if zero_point else 1)
    layers = []
    for i, kind in enumerate(spec.layer_kinds):
        held = min(context, spec.sliding_window) if kind == "sliding" else context
        kept16 = min(residual_tokens, held)
        quant = held - kept16
        value = math.ceil(batch * quant * ept * bits / 8) + batch * kept16 * ept * 2
        scales = 0
        if group_size is not None:
            scales = math.ceil(batch * math.ceil(quant * ept / group_size) * scale_bits / 8)
        layers.append(LayerSize(i, kind, held, ept, value, scales))
    name = dtype if isinstance(dtype, str) else f"{dtype}-bit"
    return KVSize(spec, context, batch, name, bits, group_size, residual_tokens, mla, tuple(layers))


def format_bytes(n: float, binary: bool = False) -> str:
    """``1342177280 -> '1.34 GB'`` (powers of 1000) or ``'1.25 GiB'`` with ``binary=True`` (powers of 1024)."""
    base, units = (1024.0, ("B", "KiB", "MiB", "GiB", "TiB", "PiB")) if binary else \
        (1000.0, ("B", "kB", "MB", "GB", "TB", "PB"))
    x = float(n)
    for unit in units:
        if abs(x) < base or unit == units[-1]:
            return f"{int(x)} B" if unit == "B" else f"{x:.3g} {unit}" if abs(x) < 100 else f"{x:.0f} {unit}"
        x /= base
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kv-size",
        description="KV-cache size of a Hugging Face model config: 2 x layers x kv_heads x head_dim x tokens x "
                    "batch x bytes (GQA/MQA, MLA latents, sliding-window layers, quantised formats).",
    )
    p.add_argument("config", nargs="?", help="config.json, a folder holding one, or a bundled name (see --list)")
    p.add_argument("--context", "-t", type=int, default=4096, help="tokens per sequence (default 4096)")
    p.add_argument("--batch", "-b", type=int, default=1, help="sequences (default 1)")
    p.add_argument("--dtype", "-d", default="fp16",
                   help=f"storage format, one of {sorted(DTYPE_BITS)} or a bit width 1..32 (default fp16)")
    p.add_argument("--group-size", type=int, default=None, help="elements per quantisation scale (KIVI-style)")
    p.add_argument("--no-zero-point", action="store_true", help="symmetric quantisation: scales only")
    p.add_argument("--residual", type=int, default=0, help="recent tokens kept in 16 bits (KIVI residual)")
    p.add_argument("--mla", choices=MLA_MODES, default="latent", help="MLA: cache the latent or per-head K/V")
    p.add_argument("--per-layer", action="store_true", help="one row per layer")
    p.add_argument("--list", action="store_true", help="list the bundled configs and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.list:
        for name, path in bundled_configs().items():
            print(f"{name:<16} {read_kv_spec(path).describe()}")
        return 0
    if args.config is None:
        _parser().print_usage(sys.stderr)
        print("kv-size: error: give a CONFIG (or --list)", file=sys.stderr)
        return 2
    dtype: str | int = int(args.dtype) if args.dtype.isdigit() else args.dtype
    try:
        size = kv_cache_size(args.config, context=args.context, batch=args.batch, dtype=dtype,
                             group_size=args.group_size, zero_point=not args.no_zero_point,
                             residual_tokens=args.residual, mla=args.mla)
    except (ValueError, KeyError, FileNotFoundError, TypeError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"kv-size: error: {msg}", file=sys.stderr)
        return 2
    print(size.table(per_layer=args.per_layer))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
