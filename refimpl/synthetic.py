"""Seeded synthetic long-range documents: passkey / needle retrieval, key–value lookup, several needles.

The same generator makes (a) a share of the course model's training mix, so that retrieval across the whole
context works with a full cache, and (b) the needle-in-a-haystack evaluation grid (length × depth) every
compression lesson reports.  Eviction and quantization lessons are meaningless unless the full-cache model can
retrieve; these documents teach and measure exactly that.

Every sample is built at the token level::

    filler[:a] + needle sentence(s) + filler[a:b] + question + answer

where ``depth`` ∈ [0, 1] places the (queried) needle at that fraction of the filler, and ``length`` is the number
of tokens *before the answer* (the prompt).  Scoring is greedy exact match on the answer tokens.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Protocol

KINDS = ("passkey", "kv", "multi")

_WORDS = ("amber", "birch", "cobalt", "delta", "ember", "falcon", "garnet", "harbor", "indigo", "juniper",
          "kestrel", "lantern", "meadow", "nectar", "onyx", "pepper", "quartz", "raven", "saffron", "tundra",
          "umber", "violet", "walnut", "yarrow", "zephyr", "maple", "cedar", "coral", "ivory", "orchid")

__all__ = ["KINDS", "NeedleSample", "make_needle_sample"]


class Tokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


@dataclass
class NeedleSample:
    input_ids: list[int]  # the prompt: ends right before the answer
    answer_ids: list[int]  # the tokens a model must produce
    answer: str
    depth: float  # requested depth in [0, 1]
    length: int  # len(input_ids)
    needle_position: int  # token index where the queried needle starts
    kind: str = "passkey"
    extra: dict = field(default_factory=dict)


def _enc(tok: Tokenizer, text: str) -> list[int]:
    try:
        return list(tok.encode(text, add_special_tokens=False))
    except TypeError:  # a raw `tokenizers.Tokenizer`
        return list(tok.encode(text).ids)


def _number(rng: random.Random, digits: int) -> str:
    return str(rng.randint(10 ** (digits - 1), 10**digits - 1))


def _needles(kind: str, rng: random.Random, n_distractors: int) -> tuple[list[str], str, str, int]:
    """Needle sentences, question, answer, and the index of the queried needle."""
    if kind == "passkey":
        key = _number(rng, 5)
        return [f"\nThe pass key is {key}. Remember it. {key} is the pass key.\n"], \
            "\nWhat is the pass key? The pass key is", f" {key}.", 0
    names = rng.sample(_WORDS, 1 + n_distractors)
    values = [_number(rng, 5) for _ in names]
    if kind == "kv":
        sents = [f"\nThe code for {n} is {v}.\n" for n, v in zip(names, values)]
        q = rng.randrange(len(names))
        return sents, f"\nWhat is the code for {names[q]}? The code for {names[q]} is", f" {values[q]}.", q
    if kind == "multi":
        sents = [f"\nThe special magic number for {n} is {v}.\n" for n, v in zip(names, values)]
        q = rng.randrange(len(names))
        return sents, (f"\nWhat is the special magic number for {names[q]}? The special magic number for "
                       f"{names[q]} is"), f" {values[q]}.", q
    raise ValueError(f"kind must be one of {KINDS}; got {kind!r}")


def make_needle_sample(tokenizer: Tokenizer, filler: str | list[int], length: int, depth: float, seed: int,
                       kind: str = "passkey", n_distractors: int = 3) -> NeedleSample:
    """One seeded retrieval sample whose prompt is exactly ``length`` tokens.

    ``filler`` is haystack text (or its token ids); a random slice of it fills the context.  For ``kind="kv"``
    and ``"multi"`` there are ``1 + n_distractors`` needles at random depths and the question asks for one of
    them, which is placed at ``depth``.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1]; got {depth!r}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}; got {kind!r}")
    rng = random.Random(seed)
    sents, question, answer, q_idx = _needles(kind, rng, n_distractors)
    sent_ids = [_enc(tokenizer, s) for s in sents]
    q_ids, a_ids = _enc(tokenizer, question), _enc(tokenizer, answer)
    n_fill = length - sum(map(len, sent_ids)) - len(q_ids)
    if n_fill < 0:
        raise ValueError(f"length={length} is too short for this needle; it needs at least "
                         f"{length - n_fill} tokens")
    fill_ids = _enc(tokenizer, filler) if isinstance(filler, str) else list(filler)
    if len(fill_ids) < n_fill:
        raise ValueError(f"filler has {len(fill_ids)} tokens but length={length} needs {n_fill}")
    start = rng.randrange(0, len(fill_ids) - n_fill + 1)
    hay = fill_ids[start:start + n_fill]
    # Insertion points in the filler: the queried needle at `depth`, distractors anywhere.
    points = [rng.randint(0, n_fill) for _ in sent_ids]
    points[q_idx] = round(depth * n_fill)
    order = sorted(range(len(sent_ids)), key=lambda i: (points[i], i != q_idx))
    ids: list[int] = []
    prev, needle_pos = 0, 0
    for i in order:
        ids += hay[prev:points[i]]
        if i == q_idx:
            needle_pos = len(ids)
        ids += sent_ids[i]
        prev = points[i]
    ids += hay[prev:] + q_ids
    assert len(ids) == length
    return NeedleSample(ids, a_ids, answer.strip().rstrip("."), depth, length, needle_pos, kind)
