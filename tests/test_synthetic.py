"""The retrieval-sample generator used for training and for the needle grid."""

from __future__ import annotations

import pytest

from refimpl.loading import load_model
from refimpl.synthetic import KINDS, make_needle_sample


@pytest.fixture(scope="module")
def tok():
    return load_model()[1]


FILLER = "It was the best of times, it was the worst of times, it was the age of wisdom. " * 200


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
def test_length_depth_and_answer(tok, kind, depth):
    s = make_needle_sample(tok, FILLER, 400, depth, seed=3, kind=kind)
    assert s.length == len(s.input_ids) == 400
    text = tok.decode(s.input_ids)
    assert s.answer in text  # the needle is in the prompt
    assert tok.decode(s.answer_ids).strip() == s.answer + "."
    # the queried needle sits at the requested fraction of the filler (±1 needle sentence)
    n_other = 400 - len(tok.encode(text.rsplit("\n", 1)[-1]))
    assert abs(s.needle_position - depth * n_other) <= 80


def test_seeded(tok):
    a = make_needle_sample(tok, FILLER, 300, 0.5, seed=7, kind="multi")
    b = make_needle_sample(tok, FILLER, 300, 0.5, seed=7, kind="multi")
    c = make_needle_sample(tok, FILLER, 300, 0.5, seed=8, kind="multi")
    assert a.input_ids == b.input_ids and a.answer == b.answer
    assert a.input_ids != c.input_ids


def test_digits_are_single_tokens(tok):
    s = make_needle_sample(tok, FILLER, 200, 0.5, seed=1)
    digits = [tok.decode([i]) for i in s.answer_ids if tok.decode([i]).isdigit()]
    assert len(digits) == 5 and all(len(d) == 1 for d in digits)


def test_bad_inputs(tok):
    with pytest.raises(ValueError, match=r"depth must be in \[0, 1\]"):
        make_needle_sample(tok, FILLER, 200, 1.5, seed=0)
    with pytest.raises(ValueError, match="kind must be one of"):
        make_needle_sample(tok, FILLER, 200, 0.5, seed=0, kind="haystack")
    with pytest.raises(ValueError, match="too short"):
        make_needle_sample(tok, FILLER, 10, 0.5, seed=0)
    with pytest.raises(ValueError, match="filler has"):
        make_needle_sample(tok, "short", 200, 0.5, seed=0)
