"""End-to-end check on the shipped course model: load it offline, generate, measure the KV cache against the
size formula, score held-out perplexity and a few needle retrievals.  Every number printed is measured here.

    python scripts/quickstart.py            # the course model, on CPU
    python scripts/quickstart.py --model HuggingFaceTB/SmolLM2-135M --backend hf   # any hub model (internet)
"""

from __future__ import annotations

import argparse
import time

import torch

from refimpl.cache import DenseCache
from refimpl.data import heldout_text
from refimpl.eval import measured_kv_bytes, needle_grid, perplexity, theoretical_kv_bytes
from refimpl.loading import COURSE_MODEL, load_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=COURSE_MODEL)
    p.add_argument("--backend", default="refimpl", choices=["refimpl", "hf"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--ppl-tokens", type=int, default=8192)
    a = p.parse_args()
    torch.manual_seed(0)
    t0 = time.time()
    model, tok = load_model(a.model, backend=a.backend, device=a.device)
    cfg = model.config
    print(f"loaded {a.model} ({a.backend}) in {time.time() - t0:.1f}s: {cfg.num_hidden_layers} layers, "
          f"{cfg.num_attention_heads} query heads, {cfg.num_key_value_heads} KV heads")

    prompt = "It was a dark and stormy night, and"
    ids = torch.tensor([tok.encode(prompt)], device=a.device)
    with torch.no_grad():
        if a.backend == "refimpl":
            cache = DenseCache(cfg.num_hidden_layers)
            out = model.generate(ids, max_new_tokens=40, cache=cache)
        else:
            full = model.generate(ids, max_new_tokens=40, do_sample=False, return_dict_in_generate=True)
            out = full.sequences[:, ids.shape[1]:]
            cache = full["cache"] if "cache" in full else full["past_key_values"]  # renamed in transformers 5.24
    print(f"\n{prompt}{tok.decode(out[0].tolist())}\n")
    n_tok = cache.seq_length(0) if a.backend == "refimpl" else cache.get_seq_length()
    dtype = next(model.parameters()).dtype
    print(f"KV cache after {n_tok} tokens: measured {measured_kv_bytes(cache):,} B, "
          f"formula 2*L*H_kv*d*T*bytes = {theoretical_kv_bytes(cfg, n_tok, 1, dtype):,} B")

    text = heldout_text(a.ppl_tokens * 6)
    token_ids = tok.encode(text)[: a.ppl_tokens]
    window = min(1024, getattr(cfg, "max_position_embeddings", 1024))
    ppl = perplexity(model, token_ids, window=window, progress=True)
    print(f"held-out perplexity over {ppl.tokens} tokens (window {window}): {ppl.perplexity:.2f}")

    grid = needle_grid(model, tok, text, lengths=[256, 1024], depths=[0.25, 0.75], n_per_cell=2, progress=True)
    print(f"passkey retrieval, full cache: {grid.mean:.2f} over {grid.accuracy.size * 2} samples")
    print(f"done in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
