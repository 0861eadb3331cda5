"""Shared benchmark harness: which GPU, how fast its memory really is, how long a call takes, and a results table.

Decode kernels are memory-bound, so every benchmark reports against a **roofline**: the time the bytes a call
must move would take at the GPU's memory bandwidth,

    t_roofline = bytes_moved / bandwidth,        achieved = bytes_moved / t_measured,

with two bandwidths side by side: the datasheet figure (``DATASHEET_TBPS``) and the bandwidth of a measured
device-to-device copy (``torch.Tensor.copy_`` of ≥ 1 GB, counting bytes read + written), which is what a
well-written streaming kernel can actually reach (about 90 % of the datasheet on an H100).

Timing (:func:`time_cuda`): CUDA events around each call, the L2 cache flushed before every call by reading a
buffer 4x its size (otherwise small caches are served from L2 and beat HBM), warm-up first, median reported.
After the flush the GPU also spins for ~1 ms, so the host has queued the timed call before the GPU reaches it:
Python launch overhead is not in the number (as in a CUDA-graph-captured decode step), for our kernel and for the
baselines alike.

:class:`Table` prints a markdown table and writes it to ``benchmarks/results/<script>_<gpu>.md`` together with
the GPU name, the software versions, the date and the command line, so every number in the course can be traced.
"""

from __future__ import annotations

import datetime as _dt
import functools
import os
import platform
import re
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

__all__ = [
    "DATASHEET_TBPS",
    "RESULTS_DIR",
    "GpuInfo",
    "Table",
    "datasheet_tbps",
    "gpu_info",
    "measure_copy_bandwidth",
    "read_markdown_table",
    "require_cuda",
    "software_versions",
    "time_cuda",
]

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

# Peak memory bandwidth in TB/s (10^12 B/s) from NVIDIA's product datasheets.  Matched in order against the
# device name, so the more specific names come first.
DATASHEET_TBPS: list[tuple[str, str, float]] = [
    # (substring of torch.cuda.get_device_name(), slug, TB/s)
    ("H200", "h200", 4.8),
    ("H100 NVL", "h100-nvl", 3.9),
    ("H100 PCIe", "h100-pcie", 2.0),
    ("H100", "h100-sxm", 3.35),  # "NVIDIA H100 80GB HBM3" is the SXM part
    ("A100-SXM4-80GB", "a100-sxm-80gb", 2.039),
    ("A100 80GB PCIe", "a100-pcie-80gb", 1.935),
    ("A100", "a100-40gb", 1.555),
    ("L4", "l4", 0.3),
]


@dataclass
class GpuInfo:
    name: str
    slug: str
    sms: int
    memory_gb: float
    l2_mb: float
    datasheet_tbps: float | None
    extra: dict = field(default_factory=dict)


def datasheet_tbps(name: str) -> tuple[str, float | None]:
    """(slug, datasheet TB/s) for a device name; the slug is derived from the name when it is not in the table."""
    for key, slug, tbps in DATASHEET_TBPS:
        if key.lower() in name.lower():
            return slug, tbps
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower().replace("nvidia", "")).strip("-") or "gpu"
    return slug, None


def gpu_info(device: int | None = None) -> GpuInfo:
    """Name, SM count, memory, L2 size and datasheet bandwidth of the current CUDA device."""
    idx = torch.cuda.current_device() if device is None else device
    p = torch.cuda.get_device_properties(idx)
    slug, tbps = datasheet_tbps(p.name)
    l2 = getattr(p, "L2_cache_size", 0) / 2**20
    return GpuInfo(p.name, slug, p.multi_processor_count, p.total_memory / 1e9, l2, tbps)


def require_cuda(script: str) -> None:
    """Exit with a clear message (status 2) unless compiled kernels can run on a CUDA GPU."""
    if not torch.cuda.is_available():
        print(f"{script}: needs a CUDA GPU (torch.cuda.is_available() is False here); nothing was measured.",
              file=sys.stderr)
        sys.exit(2)
    if os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on"):
        print(f"{script}: TRITON_INTERPRET is set, so kernels would be interpreted, not compiled; unset it to "
              "benchmark.", file=sys.stderr)
        sys.exit(2)


def software_versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__,
           "cuda": str(torch.version.cuda) if torch.cuda.is_available() else "n/a"}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:  # pragma: no cover - triton is an optional extra
        out["triton"] = "not installed"
    return out


_FLUSH: dict[int, torch.Tensor] = {}
# GPU busy-wait before each timed call, so the host has queued the call before the GPU reaches it: otherwise the
# measured time includes host time.  ≈ 1 ms at 2 GHz; the 0.2 ms used until 2026-11-24 left little margin over the
# host time of one Python call of a split-KV kernel (argument checks, two launches).
HOST_HEAD_START_CYCLES = 2_000_000


def _flush_l2() -> None:
    """Read a buffer several times larger than L2 so the next call starts with a cold cache.

    Read, not written: overwriting the buffer (``zero_()``, what this harness did until 2026-11-24) leaves L2 full
    of dirty lines, and the timed call then also pays for writing them back to HBM — about 10 µs on an H100
    (measured: fp16 SDPA decode at batch 1, 32k context, 194 µs after a write flush, 184 µs after a read flush).
    Between two attention calls of a real decode step L2 holds mostly clean lines (weights, KV just read)."""
    dev = torch.cuda.current_device()
    if dev not in _FLUSH:
        l2 = getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 50 * 2**20)
        _FLUSH[dev] = torch.zeros(max(256 * 2**20, 4 * l2) // 8, dtype=torch.int64, device="cuda")
    _FLUSH[dev].sum()


def time_cuda(fn: Callable[[], object], warmup: int = 5, reps: int = 30) -> dict[str, float]:
    """GPU time of ``fn()`` in milliseconds: median / min / max over ``reps`` calls, each after an L2 flush."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for s, e in zip(starts, ends):
        _flush_l2()
        if hasattr(torch.cuda, "_sleep"):
            torch.cuda._sleep(HOST_HEAD_START_CYCLES)  # GPU waits ~1 ms so the host queues fn() in time
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times)}


def time_interleaved(fns: dict[str, Callable[[], object]], rounds: int = 4, reps: int = 30,
                     timer: Callable[..., dict[str, float]] = time_cuda) -> dict[str, float]:
    """Median time (ms) of each of ``fns``, measured in ``rounds`` interleaved rounds (every function once per
    round, in the given order in even rounds and the reverse order in odd ones); the lowest round median is kept
    for each.  A transient slow spell of the GPU (seen on H100s as one shape's median coming out 1.2-2x its usual
    value) then costs a round, not the comparison, and every contender gets the same chances.  The order
    alternates because a fixed one biased a comparison on an H100: two copies of the same split-KV kernel (batch 8,
    2k tokens, ~29.5 µs) came out 1.7-2.0% apart in 3 repeats when always timed in the same order, and 0.1-0.4%
    apart with the order alternating (kivi_experiments_h100-sxm.md, run 16)."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1; got {rounds}")
    names = list(fns)
    best = {name: float("inf") for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            best[name] = min(best[name], timer(fns[name], reps=reps)["median_ms"])
    return best


def measure_copy_bandwidth(nbytes: int = 2 * 2**30, reps: int = 20) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting the bytes read *and* written (2·nbytes per copy)."""
    if nbytes < 2**30:
        raise ValueError(f"nbytes must be >= 1 GiB so the copy streams from HBM, not L2; got {nbytes}")
    src = torch.empty(nbytes // 2, dtype=torch.float16, device="cuda").normal_()
    dst = torch.empty_like(src)
    t = time_cuda(functools.partial(dst.copy_, src), warmup=3, reps=reps)["median_ms"]
    return 2 * nbytes / (t * 1e-3)


class Table:
    """Rows of results that print as markdown and are written with their provenance.

    >>> t = Table("demo", ["B", "µs"]); t.add(B=1, **{"µs": 2.5}); print(t.markdown().splitlines()[0])
    | B | µs |
    """

    def __init__(self, title: str, columns: Sequence[str]):
        self.title = title
        self.columns = list(columns)
        self.rows: list[dict[str, object]] = []

    def add(self, **row: object) -> None:
        unknown = set(row) - set(self.columns)
        if unknown:
            raise KeyError(f"unknown columns {sorted(unknown)}; the table has {self.columns}")
        self.rows.append(row)

    @staticmethod
    def _fmt(x: object) -> str:
        if x is None:
            return "n/a"
        if isinstance(x, float):
            return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"
        return str(x)

    def markdown(self) -> str:
        lines = ["| " + " | ".join(self.columns) + " |", "|" + "---|" * len(self.columns)]
        lines += ["| " + " | ".join(self._fmt(r.get(c)) for c in self.columns) + " |" for r in self.rows]
        return "\n".join(lines)

    def write(self, script: str, gpu: GpuInfo, meta: dict[str, object], notes: Sequence[str] = (),
              directory: str = RESULTS_DIR) -> str:
        """Write ``<directory>/<script>_<gpu slug>.md`` (default ``benchmarks/results/``) and return its path."""
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, f"{script}_{gpu.slug}.md")
        info = {"gpu": gpu.name, "sms": gpu.sms, "memory_gb": f"{gpu.memory_gb:.1f}",
                "datasheet_tbps": gpu.datasheet_tbps if gpu.datasheet_tbps is not None else "unknown",
                **software_versions(), "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M"),
                "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]), **meta}
        with open(path, "w") as f:
            f.write(f"# {self.title}\n\n")
            f.writelines(f"- {k}: {v}\n" for k, v in info.items())
            f.write("\n" + self.markdown() + "\n")
            if notes:
                f.write("\n" + "\n".join(notes) + "\n")
        return path


def read_markdown_table(path: str) -> tuple[dict[str, str], list[dict[str, str]]]:
    """Read a file written by :meth:`Table.write`: the ``- key: value`` header and the table rows as strings."""
    meta: dict[str, str] = {}
    rows: list[dict[str, str]] = []
    header: list[str] | None = None
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line.startswith("- ") and ":" in line and header is None:
                key, val = line[2:].split(":", 1)
                meta[key.strip()] = val.strip()
            elif line.startswith("|") and not line.startswith("|---"):
                cells = [c.strip() for c in line.strip("|").split("|")]
                if header is None:
                    header = cells
                else:
                    rows.append(dict(zip(header, cells)))
    return meta, rows
