"""Decode tokens/s with a 20% eviction budget against the full cache, at 8k–32k context (issue #7).

What one decoding step costs, on Llama-3-8B-shaped attention (32 layers, H_q = 32, H_kv = 8, D = 128, bf16,
batch B), for each cache, all measured in one run so the ratios are like for like:

* **full** — every token kept: ``kvkernels.decode_attention`` (split-KV) over T entries per layer;
* **static 20%** — what SnapKV / PyramidKV (same average budget) / StreamingLLM leave to decoding: the same kernel
  over 0.2·T entries (the selection happened once, at prefill, or is positional);
* **H2O 20%, kernel** — heavy 10% + recent 10% (the H2O README's setting).  Per layer and step: write the new
  token into the slot freed by the last eviction, ``kvkernels.decode_attention_mass`` (attention + each key's
  mass, added in place to the running scores), then the next slot to free = argmin score among the non-recent
  entries.  A fixed buffer of 0.2·T + 1 slots; order does not matter because keys carry RoPE;
* **H2O 20%, PyTorch** — the same step with ``refimpl.h2o.decode_attention_with_mass`` (explicit fp32
  probabilities): why the fused kernel exists.

Every step of every method (all layers) is captured in one CUDA graph and replayed, so Python launch overhead is
not in the numbers; time = median over replays (``benchmarks/common.time_cuda``, L2 flushed before each).
Two views: **attention only** (the part the cache changes) and **with weights**, where each layer also streams
Llama-3-8B-sized projection and MLP weights (4096 → 6144 qkv, 4096 → 4096 o, 4096 → 2·14336 → 4096 MLP, as
GEMMs on a [B, 4096] activation; no norms/RoPE/embeddings) — a fair stand-in for a whole decoding step.
tokens/s = B / step time.  The context is fixed per row (the cache does not grow during timing).

A second table times SnapKV's compression step at the end of a prompt: ``kvkernels.snapkv_window_votes`` vs the
PyTorch reference (``refimpl.snapkv.window_votes``, which materialises the [H, w, T] probabilities), one layer.

    python benchmarks/bench_eviction.py              # B = 8, T = 8k/16k/32k — under 4 min on an H100
    python benchmarks/bench_eviction.py --quick      # B = 4, T = 8k only
    TRITON_INTERPRET=1 python benchmarks/bench_eviction.py --cpu-smoke   # tiny shapes on the CPU: checks the code

Before timing, every kernel is checked against its PyTorch reference on the benchmark's own tensors.
Writes ``benchmarks/results/bench_eviction_<gpu>.md``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Table, gpu_info, require_cuda, time_cuda  # after the sys.path line on purpose

SCRIPT = "bench_eviction"


@dataclass
class Shape:
    layers: int = 32
    h_q: int = 32
    h_kv: int = 8
    d: int = 128
    hidden: int = 4096
    mlp: int = 14336
    window: int = 32  # SnapKV observation window


def _rand(*shape: int, dtype: torch.dtype, device: str, gen: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen, device=device, dtype=torch.float32) * scale).to(dtype)


# ---------------------------------------------------------------------------------------------------------
# One decoding step per method
# ---------------------------------------------------------------------------------------------------------
class Weights:
    """One layer's worth of Llama-3-8B-sized weights (HBM traffic ≫ L2, so reusing them per layer is honest)."""

    def __init__(self, s: Shape, dtype: torch.dtype, device: str, gen: torch.Generator):
        qkv = s.h_q * s.d + 2 * s.h_kv * s.d
        self.w_qkv = _rand(s.hidden, qkv, dtype=dtype, device=device, gen=gen, scale=0.02)
        self.w_o = _rand(s.h_q * s.d, s.hidden, dtype=dtype, device=device, gen=gen, scale=0.02)
        self.w_up = _rand(s.hidden, 2 * s.mlp, dtype=dtype, device=device, gen=gen, scale=0.02)
        self.w_down = _rand(s.mlp, s.hidden, dtype=dtype, device=device, gen=gen, scale=0.02)

    def layer(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        _ = x @ self.w_qkv
        x = x + attn.reshape(x.shape[0], -1) @ self.w_o
        gate_up = x @ self.w_up
        g, u = gate_up.chunk(2, dim=-1)
        return x + (torch.nn.functional.silu(g) * u) @ self.w_down


class Method:
    """Per-layer caches plus a ``step`` that runs one decoding step through all layers."""

    def __init__(self, s: Shape, b: int, entries: int, dtype: torch.dtype, device: str, gen: torch.Generator):
        self.s, self.b, self.n = s, b, entries
        self.k = [_rand(b, s.h_kv, entries, s.d, dtype=dtype, device=device, gen=gen) for _ in range(s.layers)]
        self.v = [_rand(b, s.h_kv, entries, s.d, dtype=dtype, device=device, gen=gen) for _ in range(s.layers)]
        self.q = _rand(s.layers, b, s.h_q, s.d, dtype=dtype, device=device, gen=gen, scale=2.0)
        self.k_new = _rand(s.layers, b, s.h_kv, 1, s.d, dtype=dtype, device=device, gen=gen)
        self.v_new = _rand(s.layers, b, s.h_kv, 1, s.d, dtype=dtype, device=device, gen=gen)
        self.x = _rand(b, s.hidden, dtype=dtype, device=device, gen=gen)

    def attend(self, layer: int) -> torch.Tensor:
        raise NotImplementedError

    def step(self, weights: Weights | None) -> torch.Tensor:
        x = self.x
        for layer in range(self.s.layers):
            o = self.attend(layer)
            if weights is not None:
                x = weights.layer(x, o)
        return x

    def kv_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


class Dense(Method):
    """Full or static-budget cache: write the new token into the last slot, split-KV decode over all slots."""

    def attend(self, layer: int) -> torch.Tensor:
        from kvkernels import decode_attention

        self.k[layer][:, :, -1:] = self.k_new[layer]
        self.v[layer][:, :, -1:] = self.v_new[layer]
        return decode_attention(self.q[layer], self.k[layer], self.v[layer])


class H2O(Method):
    """Fixed buffer of heavy + recent + 1 slots; one eviction per step by slot reuse."""

    def __init__(self, s, b, heavy, recent, dtype, device, gen, context: int, fused: bool = True):
        super().__init__(s, b, heavy + recent + 1, dtype, device, gen)
        self.recent, self.fused = recent, fused
        self.score = [torch.rand(b, s.h_kv, self.n, generator=gen, device=device) for _ in range(s.layers)]
        # slots hold positions < context; the last `recent` positions sit in the last slots
        base = torch.arange(context - self.n, context, device=device, dtype=torch.int32)
        self.pos = [base.expand(b, s.h_kv, self.n).clone() for _ in range(s.layers)]
        self.free = [torch.zeros(b, s.h_kv, 1, dtype=torch.int64, device=device) for _ in range(s.layers)]
        self.seen = torch.full((), context, dtype=torch.int32, device=device)  # device scalar: graph-safe

    def attend(self, layer: int) -> torch.Tensor:
        from kvkernels.decode_attention_mass import decode_attention_mass

        from refimpl.h2o import decode_attention_with_mass

        k, v, score, pos, free = self.k[layer], self.v[layer], self.score[layer], self.pos[layer], self.free[layer]
        slot = free[..., None].expand(-1, -1, 1, self.s.d)
        k.scatter_(2, slot, self.k_new[layer])
        v.scatter_(2, slot, self.v_new[layer])
        score.scatter_(2, free, 0.0)
        pos.scatter_(2, free, self.seen.expand(free.shape))
        if self.fused:
            o, _ = decode_attention_mass(self.q[layer], k, v, accumulate_into=score)
        else:
            o, mass = decode_attention_with_mass(self.q[layer], k, v)
            score.add_(mass)
        recent = pos > self.seen - self.recent  # the new token is at position `seen`
        free.copy_(score.masked_fill(recent, float("inf")).argmin(-1, keepdim=True))
        if layer == self.s.layers - 1:
            self.seen.add_(1)
        return o


# ---------------------------------------------------------------------------------------------------------
# Correctness of what is timed
# ---------------------------------------------------------------------------------------------------------
def check_kernels(dtype: torch.dtype, device: str) -> list[str]:
    """Kernel vs PyTorch reference on benchmark-like tensors; raises if they disagree."""
    from kvkernels import decode_attention
    from kvkernels.decode_attention_mass import decode_attention_mass
    from kvkernels.snapkv_score import snapkv_window_votes

    from refimpl.attention import decode_attention as ref_decode
    from refimpl.h2o import decode_attention_with_mass
    from refimpl.snapkv import window_votes

    gen = torch.Generator(device=device).manual_seed(1)
    b, h_q, h_kv, t, d = 2, 8, 2, 1000 if device == "cuda" else 70, 128 if device == "cuda" else 32
    q = _rand(b, h_q, d, dtype=dtype, device=device, gen=gen, scale=2.0)
    k = _rand(b, h_kv, t, d, dtype=dtype, device=device, gen=gen)
    v = _rand(b, h_kv, t, d, dtype=dtype, device=device, gen=gen)
    tol = {"atol": 2e-2, "rtol": 2e-2} if dtype == torch.bfloat16 else {"atol": 2e-3, "rtol": 2e-3}
    torch.testing.assert_close(decode_attention(q, k, v).float(), ref_decode(q, k, v).float(), **tol)
    o, mass = decode_attention_mass(q, k, v)
    o_ref, mass_ref = decode_attention_with_mass(q, k, v)
    torch.testing.assert_close(o.float(), o_ref.float(), **tol)
    torch.testing.assert_close(mass, mass_ref, atol=1e-4, rtol=1e-4)
    qw = _rand(b, h_q, 16, d, dtype=dtype, device=device, gen=gen, scale=2.0)
    torch.testing.assert_close(snapkv_window_votes(qw, k), window_votes(qw, k), atol=1e-4, rtol=1e-4)
    return [(f"kernels checked against refimpl ({str(dtype).replace('torch.', '')}, T={t}): "
             "decode_attention, decode_attention_mass (out + mass), snapkv_window_votes — "
             "all within tolerance")]


# ---------------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------------
def graph_timer(fn: Callable[[], object], reps: int) -> float:
    """Capture ``fn`` (one decoding step, all layers) in a CUDA graph; median replay time in ms."""
    fn()  # compile kernels, allocate
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return time_cuda(graph.replay, warmup=3, reps=reps)["median_ms"]


def cpu_timer(fn: Callable[[], object], reps: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps * 1e3


def run_decode(s: Shape, b: int, contexts: list[int], budget: float, dtype: torch.dtype, device: str, reps: int,
               timer: Callable[[Callable[[], object], int], float]) -> Table:
    cols = ["T", "method", "entries / layer", "KV GB", "attn ms/step", "attn tok/s", "attn × full",
            "+weights ms/step", "+weights tok/s", "+weights × full"]
    table = Table(f"Decode with a {budget:.0%} cache vs the full cache ({s.layers} layers, H_q={s.h_q}, "
                  f"H_kv={s.h_kv}, D={s.d}, B={b}, {str(dtype).replace('torch.', '')})", cols)
    gen = torch.Generator(device=device).manual_seed(0)
    weights = Weights(s, dtype, device, gen)
    for t in contexts:
        keep = max(2, round(budget * t))
        heavy, recent = keep // 2, keep - keep // 2
        # partial binds this iteration's t / keep / heavy / recent (each maker is called within the iteration)
        makers = [
            ("full", partial(Dense, s, b, t, dtype, device, gen)),
            (f"static {budget:.0%} (SnapKV/PyramidKV/StreamingLLM)",
             partial(Dense, s, b, keep, dtype, device, gen)),
            (f"H2O {budget:.0%} kernel", partial(H2O, s, b, heavy, recent, dtype, device, gen, t)),
            (f"H2O {budget:.0%} PyTorch ref",
             partial(H2O, s, b, heavy, recent, dtype, device, gen, t, fused=False)),
        ]
        base: dict[str, float] = {}
        for name, make in makers:
            m = make()
            ms_attn = timer(lambda m=m: m.step(None), reps)
            ms_full = timer(lambda m=m: m.step(weights), reps)
            if name == "full":
                base = {"attn": ms_attn, "full": ms_full}
            table.add(**{"T": t, "method": name, "entries / layer": m.n, "KV GB": m.kv_bytes() / 1e9,
                         "attn ms/step": ms_attn, "attn tok/s": b / ms_attn * 1e3,
                         "attn × full": base["attn"] / ms_attn, "+weights ms/step": ms_full,
                         "+weights tok/s": b / ms_full * 1e3, "+weights × full": base["full"] / ms_full})
            print(table.markdown().splitlines()[-1], flush=True)
            m = None  # free this method's caches before the next one allocates
            if device == "cuda":
                torch.cuda.empty_cache()
    return table


def run_snapkv(s: Shape, contexts: list[int], dtype: torch.dtype, device: str, reps: int,
               timer: Callable[[Callable[[], object], int], float]) -> Table:
    from kvkernels.snapkv_score import snapkv_window_votes

    from refimpl.snapkv import window_votes

    table = Table(f"SnapKV window votes at the end of the prompt (one layer, B=1, H_q={s.h_q}, H_kv={s.h_kv}, "
                  f"D={s.d}, w={s.window})", ["T", "kernel ms", "PyTorch ref ms", "speed-up",
                                              "ref peak extra MB", "kernel peak extra MB"])
    gen = torch.Generator(device=device).manual_seed(0)
    for t in contexts:
        q = _rand(1, s.h_q, s.window, s.d, dtype=dtype, device=device, gen=gen, scale=2.0)
        k = _rand(1, s.h_kv, t, s.d, dtype=dtype, device=device, gen=gen)
        kernel_fn, ref_fn = partial(snapkv_window_votes, q, k), partial(window_votes, q, k)
        peaks = []
        for fn in (kernel_fn, ref_fn):
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
                fn()
                torch.cuda.synchronize()
                peaks.append((torch.cuda.max_memory_allocated() - before) / 1e6)
            else:
                peaks.append(None)
        t_kernel = time_cuda(kernel_fn, reps=reps)["median_ms"] if device == "cuda" \
            else timer(kernel_fn, reps)
        t_ref = time_cuda(ref_fn, reps=reps)["median_ms"] if device == "cuda" \
            else timer(ref_fn, reps)
        table.add(**{"T": t, "kernel ms": t_kernel, "PyTorch ref ms": t_ref, "speed-up": t_ref / t_kernel,
                     "kernel peak extra MB": peaks[0], "ref peak extra MB": peaks[1]})
        print(table.markdown().splitlines()[-1], flush=True)
    return table


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--contexts", type=int, nargs="+", default=[8192, 16384, 32768])
    ap.add_argument("--budget", type=float, default=0.2, help="fraction of the context kept (default 0.2)")
    ap.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="B = 4, T = 8k only")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU (TRITON_INTERPRET=1)")
    args = ap.parse_args(argv)
    if not 0 < args.budget < 1:
        ap.error(f"--budget must be in (0, 1); got {args.budget}")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]

    if args.cpu_smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            print("--cpu-smoke needs TRITON_INTERPRET=1 in the environment", file=sys.stderr)
            return 2
        s = Shape(layers=2, h_q=4, h_kv=2, d=32, hidden=64, mlp=96, window=8)
        print("\n".join(check_kernels(torch.float16, "cpu")))
        print(run_decode(s, 2, [96], args.budget, torch.float16, "cpu", 1, cpu_timer).markdown())
        print(run_snapkv(s, [96], torch.float16, "cpu", 1, cpu_timer).markdown())
        return 0

    require_cuda(SCRIPT)
    torch.backends.cuda.matmul.allow_tf32 = True
    gpu = gpu_info()
    print(f"GPU: {gpu.name} ({gpu.sms} SMs, {gpu.memory_gb:.0f} GB)")
    batch, contexts = (4, [8192]) if args.quick else (args.batch, args.contexts)
    s = Shape()
    t0 = time.time()
    notes = check_kernels(dtype, "cuda")
    print(notes[0])
    decode = run_decode(s, batch, contexts, args.budget, dtype, "cuda", args.reps, graph_timer)
    snap = run_snapkv(s, contexts, dtype, "cuda", args.reps, graph_timer)
    meta = {"timing": f"CUDA graph of one decoding step (all layers), median of {args.reps} replays, L2 flushed (read)",
            "budget": f"{args.budget:.0%} of the context (H2O: half heavy, half recent)",
            "wall_s": f"{time.time() - t0:.0f}"}
    notes += ["", "× full = full-cache step time / this method's step time (higher is faster).",
              "attn = attention + cache bookkeeping only; +weights adds Llama-3-8B-sized projections and MLP.",
              "", "## " + snap.title, "", snap.markdown()]
    path = decode.write(SCRIPT, gpu, meta, notes)
    print(f"wrote {path} in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
