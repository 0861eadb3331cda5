"""The shipped course model loads offline, identically in refimpl and in plain transformers."""

from __future__ import annotations

import json

import pytest
import torch

from refimpl.loading import load_model, model_path


def test_course_model_both_backends_agree():
    ours, tok = load_model()
    hf, _ = load_model(backend="hf")
    ids = torch.tensor([tok.encode("It was a dark and stormy night")])
    torch.testing.assert_close(ours(ids).logits, hf(ids).logits, atol=1e-5, rtol=1e-5)
    cfg = ours.config
    assert cfg.num_key_value_heads == cfg.num_attention_heads  # MHA, so the GQA lessons have heads to merge
    assert 10e6 <= ours.num_parameters() <= 30e6


def test_model_card_figures_exist():
    with open(f"{model_path('kvcourse-llama')}/eval.json") as f:
        card = json.load(f)
    assert card["heldout"]["perplexity"] > 1
    assert set(card["needle"]) == {"passkey", "kv", "multi"}


def test_bad_names():
    with pytest.raises(ValueError, match="backend must be one of"):
        load_model(backend="jax")
    with pytest.raises(FileNotFoundError, match="neither a shipped model"):
        load_model("no-such-model")
