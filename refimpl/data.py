"""Text corpora for training and evaluation: public-domain books, loaded through 🤗 ``datasets``.

Where the text comes from, in order:

1. ``source`` argument or the ``KVCOURSE_DATA_DIR`` setting (environment variable): a local folder holding
   ``*.txt.xz`` files of books separated by ``<|endoftext|>`` lines, each with an ``*_index.tsv.gz`` (the course's
   small PG-19; see that folder's README).  ``.ci/run`` points it at ``../shared/data``.
2. Otherwise a data set on the Hugging Face hub, by name (default ``deepmind/pg19``), on a machine with internet.

Books are split by book, never by position: :data:`HELDOUT_PG_NUMBERS` lists the Project Gutenberg ebooks that
are never trained on and that every perplexity in the course is measured on.
"""

from __future__ import annotations

import csv
import gzip
import io
import lzma
import os
from dataclasses import dataclass
from pathlib import Path

DATA_ENV = "KVCOURSE_DATA_DIR"
HUB_DATASET = "deepmind/pg19"
SEPARATOR = "<|endoftext|>\n"

#: Project Gutenberg ebook numbers held out from training (title, author) — named in the model card.
HELDOUT_PG_NUMBERS: dict[int, str] = {
    121: "Northanger Abbey — Jane Austen",
    3044: "Desperate Remedies — Thomas Hardy",
    10947: "The Best American Humorous Short Stories — Various",
    19068: "Household Stories by the Brothers Grimm — Jacob and Wilhelm Grimm",
    5342: "The Story Girl — Lucy Maud Montgomery",
    836: "The Phoenix and the Carpet — E. Nesbit",
}

SPLITS = ("train", "heldout", "all")

__all__ = ["DATA_ENV", "HELDOUT_PG_NUMBERS", "Book", "data_dir", "heldout_text", "load_books", "load_corpus"]


@dataclass(frozen=True)
class Book:
    pg_number: int
    title: str
    author: str
    text: str


class DataNotFoundError(RuntimeError):
    pass


def data_dir(source: str | os.PathLike | None = None) -> Path | None:
    """The local data folder from ``source`` or ``$KVCOURSE_DATA_DIR``; ``None`` if neither is set.

    Raises :class:`DataNotFoundError` if the setting points at something that is not a folder of ``*.txt.xz``.
    """
    raw = source if source is not None else os.environ.get(DATA_ENV)
    if raw is None or raw == "":
        return None
    path = Path(raw).expanduser()
    if not path.is_dir():
        raise DataNotFoundError(
            f"{DATA_ENV if source is None else 'source'}={str(raw)!r} is not a folder. Set {DATA_ENV} to the folder "
            f"holding the *.txt.xz books (e.g. export {DATA_ENV}=../shared/data), or unset it to load "
            f"{HUB_DATASET!r} from the Hugging Face hub."
        )
    if not any(path.glob("*.txt.xz")):
        raise DataNotFoundError(f"{DATA_ENV}={str(raw)!r} holds no *.txt.xz files; expected the course's book corpus")
    return path


def _read_local(path: Path) -> list[Book]:
    books = []
    for txt in sorted(path.glob("*.txt.xz")):
        index = txt.with_name(txt.name.replace(".txt.xz", "_index.tsv.gz"))
        with lzma.open(txt, "rt", encoding="utf-8") as f:
            texts = f.read().split(SEPARATOR)
        if texts and texts[-1].strip() == "":
            texts = texts[:-1]
        meta = []
        if index.exists():
            with gzip.open(index, "rt", encoding="utf-8") as f:
                meta = list(csv.DictReader(io.StringIO(f.read()), delimiter="\t"))
        if meta and len(meta) != len(texts):
            raise DataNotFoundError(f"{index.name} lists {len(meta)} books but {txt.name} holds {len(texts)}")
        for i, text in enumerate(texts):
            m = meta[i] if meta else {}
            books.append(Book(int(m.get("pg_ebook_no", -(i + 1))), m.get("title", f"{txt.stem}#{i}"),
                              m.get("author", "unknown"), text))
    return books


def _read_hub(name: str) -> list[Book]:
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - datasets is a dependency
        raise DataNotFoundError("the `datasets` package is needed to load a hub data set") from e
    try:
        ds = datasets.load_dataset(name, split="train")
    except Exception as e:
        raise DataNotFoundError(
            f"could not load {name!r} from the Hugging Face hub ({type(e).__name__}). Without internet, set "
            f"{DATA_ENV} to a local folder of *.txt.xz books (e.g. export {DATA_ENV}=../shared/data)."
        ) from e
    out = []
    for i, row in enumerate(ds):
        url = str(row.get("url", ""))
        digits = "".join(c for c in url.rsplit("/", 1)[-1] if c.isdigit())
        out.append(Book(int(digits) if digits else -(i + 1), row.get("short_book_title", f"book {i}"),
                        "unknown", row["text"]))
    return out


def load_books(split: str = "train", source: str | os.PathLike | None = None,
               hub_name: str = HUB_DATASET) -> list[Book]:
    """All books of ``split`` (``"train"``, ``"heldout"`` or ``"all"``) as plain Python objects."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}; got {split!r}")
    path = data_dir(source)
    books = _read_local(path) if path is not None else _read_hub(hub_name)
    if split == "all":
        return books
    held = [b for b in books if b.pg_number in HELDOUT_PG_NUMBERS]
    return held if split == "heldout" else [b for b in books if b.pg_number not in HELDOUT_PG_NUMBERS]


def load_corpus(split: str = "train", source: str | os.PathLike | None = None, hub_name: str = HUB_DATASET):
    """The books of ``split`` as a 🤗 ``datasets.Dataset`` with columns ``pg_number, title, author, text``."""
    import datasets

    books = load_books(split, source, hub_name)
    return datasets.Dataset.from_dict({
        "pg_number": [b.pg_number for b in books], "title": [b.title for b in books],
        "author": [b.author for b in books], "text": [b.text for b in books]})


def heldout_text(n_chars: int | None = None, source: str | os.PathLike | None = None) -> str:
    """Concatenated held-out books (optionally the first ``n_chars`` characters), for evaluation."""
    if n_chars is not None and n_chars < 1:
        raise ValueError(f"n_chars must be a positive int or None; got {n_chars!r}")
    text = "\n\n".join(b.text for b in sorted(load_books("heldout", source), key=lambda b: b.pg_number))
    return text if n_chars is None else text[:n_chars]
