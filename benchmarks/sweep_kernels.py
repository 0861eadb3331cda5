"""Launch-configuration sweep for the two decode kernels on the shapes their issues judge (a tuning aid).

* ``kvkernels.kivi_decode_attention`` (KIVI-2, MHA H = 32, D = 128, G = 32, R = 128, fp16) at 32k context,
  batch 1 / 4 / 8 / 32: tokens per tile × warps × register cap × split count (8 … 256 programs per SM),
  against fp16 SDPA on the same shape.
* ``kvkernels.decode_attention`` (H_q = 32, H_kv = 8, D = 128, fp16) on the shapes where it trailed SDPA:
  tile × pipeline stages (2-4; an H200 wanted one more than an H100, ``STAGES_BY_GPU``) × split count (about 1
  and 2 programs per SM).

Every row is timed in this run (median of ``--reps`` calls, L2 flushed before each, ``common.time_cuda``); the
fastest configuration per shape is marked.  ``default_config`` / ``choose_num_splits`` / ``choose_kivi_splits`` are set
from these tables.

    python benchmarks/sweep_kernels.py [--part kivi|decode] [--reps 20]

Writes ``benchmarks/results/sweep_kivi_<gpu>.md`` and ``benchmarks/results/sweep_decode_attention_<gpu>.md``.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
for _p in (_HERE, os.path.dirname(_HERE), os.path.join(os.path.dirname(_HERE), "kernels")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch
import torch.nn.functional as F
from common import Table, gpu_info, measure_copy_bandwidth, require_cuda, time_cuda


def _us(fn, reps: int) -> float | None:
    try:
        return time_cuda(fn, reps=reps)["median_ms"] * 1e3
    except Exception as e:  # noqa: BLE001 - a config the GPU cannot run (shared memory, registers): skip it
        print(f"  failed: {type(e).__name__}: {str(e)[:100]}")
        torch.cuda.empty_cache()
        return None


def _time_configs(table: Table, label: str, configs, call, reps: int, nbytes: int, copy_bw: float,
                  baseline_us: float | None, ratio_col: str, **base) -> None:
    """Time every (row fields, config, automatic split count[, split counts to try]) of ``configs`` — by default at
    half, once and twice the automatic split count (``call(config=…, num_splits=…)`` runs the kernel once) — mark
    the fastest row, add the rows to ``table``."""
    rows = []
    for fields, cfg, auto, *tries in configs:
        for splits in sorted(set(tries[0] if tries else (max(1, auto // 2), auto * 2)) | {auto}):
            us = _us(functools.partial(call, config=cfg, num_splits=splits), reps)
            rows.append({**base, **fields, "num_splits": f"{splits}{' (auto)' if splits == auto else ''}", "µs": us,
                         "% of copy BW": None if us is None else 100 * nbytes / (us * 1e-6) / copy_bw,
                         ratio_col: None if us is None or baseline_us is None else baseline_us / us})
    best = min((r for r in rows if r["µs"] is not None), key=lambda r: r["µs"], default=None)
    for r in rows:
        table.add(**r, **{"best?": r is best})
    if best is not None:
        knobs = "/".join(str(best[k]) for k in configs[0][0])
        print(f"{label}: best {best['µs']:.1f} µs ({knobs}, splits {best['num_splits']}); {ratio_col}: "
              f"{Table._fmt(best[ratio_col])}", flush=True)


def sweep_kivi(copy_bw: float, reps: int, batches=(1, 4, 8, 32), ctx: int = 32768) -> Table:
    from bench_kivi import D, G, H, kivi_bytes, random_kivi_state
    from kvkernels.kivi_attention import KIVIDecodeConfig, choose_kivi_splits, kivi_decode_attention

    cols = ["B", "context", "block_t", "num_warps", "maxnreg", "num_splits", "µs", "% of copy BW",
            "× vs SDPA", "best?"]
    table = Table(f"KIVI-2 fused decode attention: launch-config sweep (H={H}, D={D}, G={G}, fp16)", cols)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for b in batches:
        state, t = random_kivi_state(b, ctx, 2, "cuda", seed=b)
        q = torch.randn((b, H, D), device="cuda", dtype=torch.float16)
        k = torch.randn((b, H, t, D), device="cuda", dtype=torch.float16)
        v = torch.randn_like(k)
        sdpa = _us(functools.partial(F.scaled_dot_product_attention, q[:, :, None], k, v), reps)
        del k, v  # free the fp16 cache before timing KIVI
        torch.cuda.empty_cache()
        configs = []
        for bt, nw, mr in ((8, 1, 128), (8, 1, None), (8, 1, 96), (16, 1, None), (16, 1, 128), (4, 1, 80),
                           (32, 4, None)):
            # split counts giving 8 … 256 programs per SM (at most 2 tiles per split, as choose_kivi_splits)
            tries = {max(1, min(round(p * sms / (b * H)), t // (2 * bt), 1024)) for p in (8, 16, 32, 64, 128, 256)}
            configs.append(({"block_t": bt, "num_warps": nw, "maxnreg": mr},
                            KIVIDecodeConfig(block_t=bt, num_warps=nw, maxnreg=mr),
                            choose_kivi_splits(b, H, t, bt, sms), tries))
        _time_configs(table, f"KIVI B={b}", configs,
                      functools.partial(kivi_decode_attention, q, *state, bits=2, group_size=G),
                      reps, kivi_bytes(state), copy_bw, sdpa, "× vs SDPA", B=b, context=ctx)
        del state, q
        torch.cuda.empty_cache()
    return table


def sweep_decode(copy_bw: float, reps: int, shapes=((1, 4096), (1, 16384), (1, 131072), (4, 16384), (4, 65536),
                                                     (16, 4096), (16, 16384), (16, 65536), (32, 16384))) -> Table:
    from bench_decode_attention import H_KV, H_Q, HEAD_DIM, bytes_moved, sdpa_callables
    from kvkernels.decode_attention import DecodeConfig, choose_num_splits, decode_attention

    cols = ["B", "T", "block_n", "num_stages", "num_splits", "µs", "% of copy BW", "× vs SDPA best", "best?"]
    table = Table(f"Split-KV decode attention: launch sweep (H_q={H_Q}, H_kv={H_KV}, D={HEAD_DIM}, fp16, 4 warps)",
                  cols)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for b, t in shapes:
        q = torch.randn(b, H_Q, HEAD_DIM, device="cuda", dtype=torch.float16)
        k = torch.randn(b, H_KV, t, HEAD_DIM, device="cuda", dtype=torch.float16)
        v = torch.randn_like(k)
        sdpa = min(x for x in (_us(fn, reps) for fn in sdpa_callables(q[:, :, None], k, v).values()) if x)
        # about 1 (rounded down and to the nearest) and 2 programs per SM
        per_sm = sorted({max(1, min(f(n * sms / (b * H_KV)), 128)) for n, f in ((1, int), (1, round), (2, round))})
        configs = [({"block_n": bn, "num_stages": ns}, DecodeConfig(block_n=bn, num_warps=4, num_stages=ns),
                    choose_num_splits(b, H_KV, t, bn, sms), per_sm)
                   for bn, ns in itertools.product((64, 128), (2, 3, 4))]
        _time_configs(table, f"decode B={b} T={t}", configs,
                      functools.partial(decode_attention, q, k, v),
                      reps, bytes_moved(b, t, 2), copy_bw, sdpa, "× vs SDPA best", B=b, T=t)
        del q, k, v
        torch.cuda.empty_cache()
    return table


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=("kivi", "decode", "both"), default="both")
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args(argv)
    require_cuda("sweep_kernels")
    gpu = gpu_info()
    copy_bw = measure_copy_bandwidth()
    meta = {"copy_bandwidth_tbps": f"{copy_bw / 1e12:.3f}",
            "timing": f"median of {args.reps} calls, L2 flushed (read) before each, CUDA events"}
    if args.part in ("kivi", "both"):
        t = sweep_kivi(copy_bw, args.reps)
        print(f"wrote {t.write('sweep_kivi', gpu, meta)}")
    if args.part in ("decode", "both"):
        t = sweep_decode(copy_bw, args.reps)
        print(f"wrote {t.write('sweep_decode_attention', gpu, meta)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
