"""The data setting, the book split, and the hub fallback error."""

from __future__ import annotations

import gzip
import lzma

import pytest

from refimpl import data


def _write_corpus(folder, books):
    folder.mkdir(parents=True, exist_ok=True)
    with lzma.open(folder / "mini.txt.xz", "wt", encoding="utf-8") as f:
        for _, _, text in books:
            f.write(text + "\n" + data.SEPARATOR)
    with gzip.open(folder / "mini_index.tsv.gz", "wt", encoding="utf-8") as f:
        f.write("n\tpg_ebook_no\ttitle\tauthor\tsource_path\tblob_sha1\tbyte_offset\tbytes\tchars\n")
        for i, (pg, title, text) in enumerate(books):
            f.write(f"{i}\t{pg}\t{title}\tAnon\tx\ty\t0\t{len(text)}\t{len(text)}\n")
    return folder


@pytest.fixture
def corpus(tmp_path):
    held = next(iter(data.HELDOUT_PG_NUMBERS))
    return _write_corpus(tmp_path / "books", [(1, "One", "first book text"), (held, "Held", "held out text"),
                                             (2, "Two", "second book text")])


def test_split_by_book(corpus):
    train = data.load_books("train", corpus)
    held = data.load_books("heldout", corpus)
    assert [b.title for b in train] == ["One", "Two"]
    assert [b.title for b in held] == ["Held"]
    assert {b.pg_number for b in train}.isdisjoint(data.HELDOUT_PG_NUMBERS)
    assert len(data.load_books("all", corpus)) == 3
    assert train[0].text.startswith("first book text")


def test_env_setting_is_read(corpus, monkeypatch):
    monkeypatch.setenv(data.DATA_ENV, str(corpus))
    assert data.data_dir() == corpus
    assert data.heldout_text().startswith("held out text")
    assert data.heldout_text(4) == "held"


def test_load_corpus_is_a_datasets_dataset(corpus):
    ds = data.load_corpus("train", corpus)
    assert ds.column_names == ["pg_number", "title", "author", "text"]
    assert ds.num_rows == 2


def test_setting_pointing_nowhere_says_which_setting(tmp_path, monkeypatch):
    monkeypatch.setenv(data.DATA_ENV, str(tmp_path / "missing"))
    with pytest.raises(data.DataNotFoundError, match=data.DATA_ENV):
        data.load_books()
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv(data.DATA_ENV, str(tmp_path / "empty"))
    with pytest.raises(data.DataNotFoundError, match=r"no \*\.txt\.xz"):
        data.load_books()


def test_no_setting_and_no_hub_names_the_setting(monkeypatch):
    monkeypatch.delenv(data.DATA_ENV, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(data.DataNotFoundError, match=data.DATA_ENV):
        data.load_books(hub_name="kvcourse/definitely-not-a-dataset")


def test_bad_split(corpus):
    with pytest.raises(ValueError, match="split must be one of"):
        data.load_books("validation", corpus)


@pytest.mark.skipif(data.data_dir() is None, reason="KVCOURSE_DATA_DIR not set")
def test_shared_corpus_heldout_books_present():
    held = data.load_books("heldout")
    assert {b.pg_number for b in held} == set(data.HELDOUT_PG_NUMBERS)


def _subset_script():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "make_gpu_data_subset.py"
    spec = importlib.util.spec_from_file_location("make_gpu_data_subset", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_subset_keeps_the_named_books_in_order(tmp_path):
    """scripts/make_gpu_data_subset.py: every held-out book and the named extras, nothing else, readable by
    refimpl.data with the same texts and split."""
    script = _subset_script()
    wanted = list(data.HELDOUT_PG_NUMBERS) + list(script.EXTRA_PG_NUMBERS)
    books = [(n, f"Book {n}", f"text of book {n}") for n in reversed(wanted)] + [(99999, "Other", "not wanted")]
    src = _write_corpus(tmp_path / "all", books)
    assert script.main(["--source", str(src), "--out", str(tmp_path / "sub")]) == 0
    got = data.load_books("all", tmp_path / "sub")
    assert [b.pg_number for b in got] == wanted
    assert all(b.text == f"text of book {b.pg_number}\n" and b.title == f"Book {b.pg_number}" for b in got)
    assert {b.pg_number for b in data.load_books("heldout", tmp_path / "sub")} == set(data.HELDOUT_PG_NUMBERS)


def test_gpu_subset_names_missing_books(tmp_path):
    src = _write_corpus(tmp_path / "all", [(1, "One", "x")])
    with pytest.raises(SystemExit, match="not in the book folder"):
        _subset_script().main(["--source", str(src), "--out", str(tmp_path / "sub")])
