"""The training command on a tiny configuration: runs on CPU, resumes exactly, saves a loadable HF model."""

from __future__ import annotations

import csv
import shutil

import pytest
import torch
from test_data import _write_corpus
from transformers import AutoModelForCausalLM, AutoTokenizer

from refimpl import LlamaModel
from refimpl.train import Batches, main

TEXT = ("The old house stood at the end of the lane, and every evening the children ran past it. "
        "Nobody knew who had lived there, and the garden had grown wild. ") * 300


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return _write_corpus(tmp_path_factory.mktemp("books"), [(1, "A", TEXT), (2, "B", TEXT[::-1]), (3, "C", TEXT.upper())])


def _args(corpus, out, run, steps):
    return ["--out", str(out), "--run-dir", str(run), "--preset", "tiny", "--data", str(corpus), "--steps", str(steps),
            "--batch", "2", "--seq-len", "128", "--warmup", "2", "--log-every", "1", "--ckpt-every", "3"]


def _losses(run):
    with open(run / "train_log.csv") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def test_train_resume_and_load(corpus, tmp_path):
    full_out, full_run = tmp_path / "full", tmp_path / "full_run"
    main(_args(corpus, full_out, full_run, 6))
    # the same run, interrupted after 3 steps and resumed
    part_out, part_run = tmp_path / "part", tmp_path / "part_run"
    shutil.copytree(full_out, part_out, ignore=shutil.ignore_patterns("*.safetensors*", "config.json"))
    main(_args(corpus, part_out, part_run, 3))
    main(_args(corpus, part_out, part_run, 6))
    assert _losses(full_run) == pytest.approx(_losses(part_run), abs=1e-4)
    assert len(_losses(full_run)) == 6

    ours = LlamaModel.from_pretrained(full_out)
    hf = AutoModelForCausalLM.from_pretrained(full_out).eval()
    tok = AutoTokenizer.from_pretrained(full_out)
    ids = torch.tensor([tok.encode("The old house")])
    torch.testing.assert_close(ours(ids).logits, hf(ids).logits, atol=1e-5, rtol=1e-5)


def test_batches_are_a_pure_function_of_the_step(corpus, tmp_path):
    main(_args(corpus, tmp_path / "m", tmp_path / "r", 1))
    tok = AutoTokenizer.from_pretrained(tmp_path / "m")
    stream = torch.randint(0, len(tok) - 2, (20000,)).numpy().astype("uint16")
    b = Batches(stream, tok, batch=4, seq_len=128, synthetic_frac=0.5, seed=0)
    assert torch.equal(b(5), b(5))
    assert not torch.equal(b(5), b(6))
    assert b(5).shape == (4, 129)


def test_bad_synthetic_fraction(corpus, tmp_path):
    with pytest.raises(SystemExit):
        main(_args(corpus, tmp_path / "m", tmp_path / "r", 1) + ["--synthetic-frac", "1.5"])
