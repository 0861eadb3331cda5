"""Train the course model: a small multi-head-attention Llama on public-domain books plus synthetic retrieval.

One command (``python -m refimpl.train --out models/kvcourse-llama``) does everything: trains the byte-level BPE
tokenizer on the training books (if ``--out`` has none), tokenizes the corpus, trains with AdamW + cosine schedule
in bf16 autocast on a GPU (fp32 on CPU), logs loss to ``<run-dir>/train_log.csv``, writes resumable checkpoints
every ``--ckpt-every`` steps, and saves the final weights in Hugging Face format.

The training mix (per row of a batch): with probability ``--synthetic-frac`` a row is packed with synthetic
long-range documents from :mod:`refimpl.synthetic` (passkey, key–value lookup, several needles; random lengths up
to the context), otherwise it is a random ``seq_len``-token window of book text.  Every batch is a pure function
of ``(seed, step)``, so a resumed run sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import random
import time
from dataclasses import asdict

import numpy as np
import torch
import torch.nn.functional as F

from .config import ModelConfig
from .data import load_books
from .model import LlamaModel
from .synthetic import make_needle_sample
from .tokenizer import EOS, train_tokenizer

PRESETS = {
    # ~13.8M parameters: 6 layers, 6 heads x 64 (MHA: as many KV heads as query heads), context 2048.
    "course": {"vocab_size": 8192, "hidden_size": 384, "intermediate_size": 1024, "num_hidden_layers": 6,
               "num_attention_heads": 6, "num_key_value_heads": 6, "max_position_embeddings": 2048},
    # For CPU tests: trains in seconds.
    "tiny": {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 256},
}
SYNTH_KINDS = (("passkey", 0.2), ("kv", 0.4), ("multi", 0.4))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="folder for the final HF-format model and tokenizer")
    p.add_argument("--run-dir", default="runs/course", help="checkpoints, token cache and logs")
    p.add_argument("--preset", choices=sorted(PRESETS), default="course")
    p.add_argument("--data", default=None, help="local data folder (default: $KVCOURSE_DATA_DIR, else the hub)")
    p.add_argument("--max-books", type=int, default=None, help="use only the first N training books (tests)")
    p.add_argument("--steps", type=int, default=8000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=None, help="default: the preset's context")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr-frac", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=150)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--synthetic-frac", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ckpt-every", type=int, default=400)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--time-limit", type=float, default=None, help="stop (and save) after this many seconds")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds of training: after 30 steps the step count is set from the measured step time "
                        "(never above --steps) so the schedule completes; the final count is saved")
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=0, help="processes generating batches ahead of the GPU")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (GPU)")
    p.add_argument("--tokenizer-only", action="store_true", help="train and save the tokenizer, then exit")
    p.add_argument("--max-shard-mb", type=float, default=15.0, help="shard the saved weights (0 = one file)")
    a = p.parse_args(argv)
    if not 0.0 <= a.synthetic_frac <= 1.0:
        p.error(f"--synthetic-frac must be in [0, 1]; got {a.synthetic_frac}")
    return a


# ---------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------
def tokenizer_texts(books, seed: int, chunk: int = 65536, per_book: int = 2) -> list[str]:
    rng = random.Random(seed)
    out = []
    for b in books:
        for _ in range(per_book):
            s = rng.randrange(0, max(1, len(b.text) - chunk))
            out.append(b.text[s:s + chunk])
    return out


def tokenize_books(tok, books, cache_path: str | None) -> np.ndarray:
    """All books as one uint16 token stream with EOS between books (cached as .npy)."""
    if cache_path and os.path.exists(cache_path):
        return np.load(cache_path)
    eos = tok.convert_tokens_to_ids(EOS)
    encs = tok._tokenizer.encode_batch([b.text for b in books], add_special_tokens=False)
    parts = []
    for e in encs:
        parts.append(np.asarray(e.ids, dtype=np.uint16))
        parts.append(np.asarray([eos], dtype=np.uint16))
    stream = np.concatenate(parts)
    if cache_path:
        os.makedirs(os.path.dirname(cache_path), exist_ok=True)
        np.save(cache_path, stream)
    return stream


class Batches:
    """Batch ``step`` is a pure function of (seed, step): book windows and packed synthetic documents."""

    def __init__(self, stream: np.ndarray, tok, batch: int, seq_len: int, synthetic_frac: float, seed: int):
        self.stream, self.tok, self.batch, self.seq_len = stream, tok, batch, seq_len
        self.frac, self.seed = synthetic_frac, seed
        self.eos = tok.convert_tokens_to_ids(EOS)
        self.min_len = min(128, seq_len)

    def _synthetic_row(self, rng: random.Random) -> list[int]:
        row: list[int] = []
        need = self.seq_len + 1
        while len(row) < need:
            length = rng.randint(self.min_len, self.seq_len)
            kind = rng.choices([k for k, _ in SYNTH_KINDS], [w for _, w in SYNTH_KINDS])[0]
            start = rng.randrange(0, len(self.stream) - 2 * length)
            filler = self.stream[start:start + 2 * length].tolist()
            try:
                s = make_needle_sample(self.tok, filler, length, rng.random(), rng.randrange(2**31), kind,
                                       n_distractors=rng.randint(1, 4))
            except ValueError:  # too short for this needle at this length; draw again
                continue
            row += s.input_ids + s.answer_ids + [self.eos]
        return row[:need]

    def __call__(self, step: int) -> torch.Tensor:
        rng = random.Random(self.seed * 1_000_003 + step)
        rows = []
        for _ in range(self.batch):
            if rng.random() < self.frac:
                rows.append(self._synthetic_row(rng))
            else:
                s = rng.randrange(0, len(self.stream) - self.seq_len - 1)
                rows.append(self.stream[s:s + self.seq_len + 1].astype(np.int64).tolist())
        return torch.tensor(rows, dtype=torch.long)


class _Steps(torch.utils.data.Dataset):
    def __init__(self, fn, start: int, stop: int):
        self.fn, self.start, self.stop = fn, start, stop

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __getitem__(self, i: int):
        return self.start + i, self.fn(self.start + i)


def prefetch(fn, start: int, stop: int, workers: int = 0):
    """Yield ``(step, fn(step))`` for steps in [start, stop), in order, computed ahead by ``workers`` processes.

    Batches are a pure function of the step, so the result does not depend on the number of workers.
    """
    if workers <= 0:
        for s in range(start, stop):
            yield s, fn(s)
        return
    loader = torch.utils.data.DataLoader(_Steps(fn, start, stop), batch_size=None, shuffle=False,
                                         num_workers=workers, prefetch_factor=4, pin_memory=torch.cuda.is_available())
    yield from loader


# ---------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------
def init_weights(model: LlamaModel, seed: int, std: float = 0.02) -> None:
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() == 2:
            # GPT-2 style: residual output projections scaled by 1/sqrt(2 * layers)
            s = std / math.sqrt(2 * model.config.num_hidden_layers) if name.endswith(("o_proj.weight", "down_proj.weight")) else std
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * s)


def lr_at(step: int, a: argparse.Namespace) -> float:
    if step < a.warmup:
        return a.lr * (step + 1) / a.warmup
    prog = min(1.0, (step - a.warmup) / max(1, a.steps - a.warmup))
    return a.lr * (a.min_lr_frac + (1 - a.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * prog)))


def main(argv=None) -> None:
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    a = parse_args(argv)
    torch.manual_seed(a.seed)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device)
    preset = dict(PRESETS[a.preset])
    seq_len = a.seq_len or preset["max_position_embeddings"]
    os.makedirs(a.run_dir, exist_ok=True)

    books = load_books("train", a.data)
    if a.max_books:
        books = books[: a.max_books]
    if not os.path.exists(os.path.join(a.out, "tokenizer.json")):
        print(f"training a {preset['vocab_size']}-token byte-level BPE on {len(books)} books ...", flush=True)
        train_tokenizer(tokenizer_texts(books, a.seed), preset["vocab_size"], a.out, model_max_length=seq_len)
    tok = AutoTokenizer.from_pretrained(a.out)
    if a.tokenizer_only:
        return
    preset["vocab_size"] = len(tok)
    preset["eos_token_id"] = preset["bos_token_id"] = tok.eos_token_id
    preset["pad_token_id"] = tok.pad_token_id
    cfg = ModelConfig(**preset, tie_word_embeddings=True)

    t0 = time.time()
    stream = tokenize_books(tok, books, os.path.join(a.run_dir, f"tokens_train_{len(books)}.npy"))
    print(f"{len(stream):,} training tokens from {len(books)} books (tokenized in {time.time() - t0:.0f}s)", flush=True)
    batches = Batches(stream, tok, a.batch, seq_len, a.synthetic_frac, a.seed)

    model = LlamaModel(cfg)
    init_weights(model, a.seed)
    model.to(device).train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": a.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=a.lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda")
    step = 0
    ckpt = os.path.join(a.run_dir, "checkpoint.pt")
    if os.path.exists(ckpt):
        state = torch.load(ckpt, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step = state["step"]
        print(f"resumed from {ckpt} at step {step}", flush=True)
    fwd = torch.compile(model) if a.compile else model
    if a.compile:  # compile lazily fails on the first call; fall back to eager rather than lose the run
        try:
            with torch.no_grad(), (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)):
                fwd(batches(0)[:2, :-1].to(device), use_cache=False)
        except Exception as e:  # noqa: BLE001  # pragma: no cover - depends on the GPU toolchain
            print(f"torch.compile failed ({type(e).__name__}: {e}); training eagerly", flush=True)
            fwd = model
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)

    log_path = os.path.join(a.run_dir, "train_log.csv")
    new_log = not os.path.exists(log_path) or step == 0
    logf = open(log_path, "w" if new_log else "a", newline="")  # noqa: SIM115 - closed after the loop
    log = csv.writer(logf)
    if new_log:
        log.writerow(["step", "tokens", "loss", "lr", "elapsed_s"])
    print(f"model: {model.num_parameters():,} parameters; {a.steps} steps x {a.batch} x {seq_len} tokens on {device}",
          flush=True)
    start, stopped_early = time.time(), False
    bar = tqdm(total=a.steps, initial=step, desc="train", mininterval=5)
    for s, batch in prefetch(batches, step, a.steps, a.workers):
        if s >= a.steps:  # --time-budget lowered the step count
            break
        batch = batch.to(device, non_blocking=True)
        for group in opt.param_groups:
            group["lr"] = lr_at(s, a)
        with amp:
            logits = fwd(batch[:, :-1], use_cache=False).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step = s + 1
        bar.update(1)
        if a.time_budget and step == 10:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t10 = time.time()
        if a.time_budget and step == 30:
            if device.type == "cuda":
                torch.cuda.synchronize()
            per_step = (time.time() - t10) / 20
            a.steps = max(31, min(a.steps, int(a.time_budget / per_step)))
            bar.total = a.steps
            print(f"\nmeasured {per_step * 1000:.0f} ms/step -> training {a.steps} steps", flush=True)
        if step % a.log_every == 0 or step == a.steps:
            lv = loss.item()
            bar.set_postfix(loss=f"{lv:.3f}")
            log.writerow([step, step * a.batch * seq_len, f"{lv:.4f}", f"{lr_at(s, a):.3e}", f"{time.time() - start:.1f}"])
            logf.flush()
        if step % a.ckpt_every == 0 or step == a.steps:
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "args": vars(a)}, ckpt)
        if a.time_limit and time.time() - start > a.time_limit:
            stopped_early = True
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "args": vars(a)}, ckpt)
            print(f"time limit reached at step {step}", flush=True)
            break
    bar.close()
    logf.close()
    model.eval()
    dtype = torch.bfloat16 if device.type == "cuda" else None
    model.save_pretrained(a.out, dtype=dtype, max_shard_bytes=int(a.max_shard_mb * 2**20) or None)
    tok.save_pretrained(a.out)
    with open(os.path.join(a.out, "training_args.json"), "w") as f:
        json.dump({**vars(a), "final_step": step, "stopped_early": stopped_early, "train_tokens": len(stream),
                   "train_books": len(books), "parameters": model.num_parameters(), "config": asdict(cfg),
                   "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                   "wall_s": round(time.time() - start, 1)}, f, indent=2, default=str)
    import shutil
    shutil.copy(log_path, os.path.join(a.out, "train_log.csv"))
    print(f"saved {a.out} at step {step} ({time.time() - start:.0f}s)", flush=True)


if __name__ == "__main__":
    main()
