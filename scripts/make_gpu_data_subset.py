"""Write a small copy of the course's books for a GPU machine without internet.

The device tool carries at most 64 MiB with a checkout; the course's book folder (47 MB) plus the Jupyter wheels
(``scripts/fetch_gpu_wheels.sh``, ~16 MB) and the tracked tree do not fit.  The notebooks read the held-out books
(every perplexity) and some training-split text, so this writes a subset: the six held-out books and twelve widely
known others (12 M characters, ~3.5 MB compressed; the set the GPU validation runs in docs/gpu_validation_h100.md
used) as one ``gpu_subset.txt.xz`` with its ``gpu_subset_index.tsv.gz``, the layout ``refimpl.data`` reads.  Point ``KVCOURSE_DATA_DIR`` at the output folder
(git-ignored ``.data-gpu/`` by default) and name it in the device tool's ``carry``.

    KVCOURSE_DATA_DIR=../shared/data python scripts/make_gpu_data_subset.py [--out .data-gpu]
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import lzma
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from refimpl.data import HELDOUT_PG_NUMBERS, SEPARATOR, load_books

#: Besides the held-out books: Pride and Prejudice, Alice, A Tale of Two Cities, Great Expectations, David
#: Copperfield, Oliver Twist, Moby Dick, Huckleberry Finn, Tom Sawyer, Sherlock Holmes, The Hound of the
#: Baskervilles, Treasure Island.
EXTRA_PG_NUMBERS = (1342, 11, 98, 1400, 766, 730, 2701, 76, 74, 1661, 2852, 120)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=".data-gpu", help="output folder (default .data-gpu)")
    ap.add_argument("--source", default=None, help="book folder (default: $KVCOURSE_DATA_DIR)")
    args = ap.parse_args(argv)
    wanted = list(HELDOUT_PG_NUMBERS) + list(EXTRA_PG_NUMBERS)
    by_number = {b.pg_number: b for b in load_books("all", args.source)}
    missing = [n for n in wanted if n not in by_number]
    if missing:
        raise SystemExit(f"these Project Gutenberg numbers are not in the book folder: {missing}")
    books = [by_number[n] for n in wanted]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with lzma.open(out / "gpu_subset.txt.xz", "wt", encoding="utf-8", preset=9) as f:
        for b in books:
            f.write(b.text + SEPARATOR)
    rows = io.StringIO()
    w = csv.writer(rows, delimiter="\t", lineterminator="\n")
    w.writerow(["n", "pg_ebook_no", "title", "author", "chars"])
    for i, b in enumerate(books):
        w.writerow([i, b.pg_number, b.title, b.author, len(b.text)])
    with gzip.open(out / "gpu_subset_index.tsv.gz", "wt", encoding="utf-8") as f:
        f.write(rows.getvalue())
    size = sum(p.stat().st_size for p in out.iterdir())
    print(f"wrote {len(books)} books ({sum(len(b.text) for b in books) / 1e6:.1f} M chars, {size / 1e6:.1f} MB) "
          f"to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
