"""Measure every figure in the course model's card: held-out loss / perplexity / bits per byte, needle accuracy
over a length × depth grid (full cache), decode tokens/s, and sample generations.  Writes JSON.

    python scripts/eval_course_model.py --model models/kvcourse-llama --out models/kvcourse-llama/eval.json

Held-out text: the books in ``refimpl.data.HELDOUT_PG_NUMBERS`` (never trained on), read through
``KVCOURSE_DATA_DIR``.  Perplexity uses non-overlapping windows of the model's context.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from refimpl import LlamaModel
from refimpl.data import HELDOUT_PG_NUMBERS, heldout_text
from refimpl.synthetic import make_needle_sample

PROMPTS = ["It was a dark and stormy night, and", "The little princess looked at the old king and said",
           "\"Where are you going?\" asked Tom."]


@torch.no_grad()
def heldout_metrics(model, tok, text: str, window: int, batch: int, device) -> dict:
    ids = torch.tensor(tok.encode(text, add_special_tokens=False))
    n_win = (len(ids) - 1) // window
    nll, count = 0.0, 0
    for i in tqdm(range(0, n_win, batch), desc="held-out"):
        rows = [ids[j * window: j * window + window + 1] for j in range(i, min(i + batch, n_win))]
        x = torch.stack(rows).to(device)
        logits = model(x[:, :-1], use_cache=False).logits.float()
        nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum").item()
        count += x[:, 1:].numel()
    # bytes covered by the scored tokens
    scored_text = tok.decode(ids[1: n_win * window + 1].tolist())
    n_bytes = len(scored_text.encode("utf-8"))
    return {"tokens": count, "bytes": n_bytes, "loss_nats_per_token": nll / count, "perplexity": math.exp(nll / count),
            "bits_per_byte": nll / math.log(2) / n_bytes, "window": window}


@torch.no_grad()
def needle_grid(model, tok, filler_ids, lengths, depths, n, kind, device, batch=32) -> dict:
    acc = {}
    for length in tqdm(lengths, desc=f"needle[{kind}]"):
        for depth in depths:
            samples = [make_needle_sample(tok, filler_ids, length, depth, seed=1000 * length + 100 * int(depth * 100) + s,
                                          kind=kind) for s in range(n)]
            correct = 0
            for i in range(0, n, batch):
                chunk = samples[i:i + batch]
                x = torch.tensor([s.input_ids for s in chunk], device=device)
                out = model.generate(x, max_new_tokens=len(chunk[0].answer_ids))
                correct += sum(o.tolist() == s.answer_ids for o, s in zip(out, chunk))
            acc[f"{length}@{depth}"] = correct / n
    return {"kind": kind, "lengths": lengths, "depths": depths, "n_per_cell": n, "accuracy": acc,
            "min_accuracy": min(acc.values()), "mean_accuracy": sum(acc.values()) / len(acc)}


@torch.no_grad()
def decode_speed(model, device, prompt_len=512, new_tokens=128, batch=1) -> dict:
    x = torch.randint(0, model.config.vocab_size, (batch, prompt_len), device=device, generator=torch.Generator(device).manual_seed(0))
    model.generate(x[:, :32], max_new_tokens=8)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    model.generate(x, max_new_tokens=new_tokens)
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t
    return {"prompt_len": prompt_len, "new_tokens": new_tokens, "batch": batch, "seconds": round(dt, 3),
            "tokens_per_s": round(batch * new_tokens / dt, 1),
            "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads, {platform.processor() or platform.machine()})"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="models/kvcourse-llama")
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="auto")
    p.add_argument("--parts", default="heldout,needle,speed,samples")
    p.add_argument("--needle-n", type=int, default=20)
    p.add_argument("--heldout-chars", type=int, default=None)
    a = p.parse_args()
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = LlamaModel.from_pretrained(a.model, dtype=dtype, device=device)
    tok = AutoTokenizer.from_pretrained(a.model)
    parts = set(a.parts.split(","))
    res: dict = {"model": a.model, "dtype": str(dtype), "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                 "heldout_books": HELDOUT_PG_NUMBERS, "parameters": model.num_parameters()}
    text = heldout_text(a.heldout_chars)
    if "heldout" in parts:
        res["heldout"] = heldout_metrics(model, tok, text, model.config.max_position_embeddings, 16, device)
        print(json.dumps(res["heldout"]), flush=True)
    if "needle" in parts:
        filler = tok.encode(text, add_special_tokens=False)
        ctx = model.config.max_position_embeddings
        lengths = [L for L in (128, 256, 512, 1024, 1536, 2048) if L <= ctx]
        depths = [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0]
        res["needle"] = {k: needle_grid(model, tok, filler, lengths if k == "passkey" else [lengths[len(lengths) // 2], lengths[-1]],
                                        depths, a.needle_n, k, device) for k in ("passkey", "kv", "multi")}
        for k, v in res["needle"].items():
            print(k, "min", v["min_accuracy"], "mean", round(v["mean_accuracy"], 3), flush=True)
    if "speed" in parts:
        res["decode_speed"] = [decode_speed(model, device, batch=b) for b in (1, 8)]
        print(res["decode_speed"], flush=True)
    if "samples" in parts:
        res["samples"] = []
        for prompt in PROMPTS:
            x = torch.tensor([tok.encode(prompt)], device=device)
            out = model.generate(x, max_new_tokens=48)
            res["samples"].append({"prompt": prompt, "greedy_continuation": tok.decode(out[0].tolist())})
    with open(a.out, "w") as f:
        json.dump(res, f, indent=2)
    print("wrote", a.out)


if __name__ == "__main__":
    main()
