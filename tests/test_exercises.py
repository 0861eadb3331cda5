"""CI proof for every exercise: its check fails on the notebook's blank, fails on each plausible wrong answer,
and passes on the solution.

Convention (docs/CONTRIBUTING.md): ``exercises/NN_topic.ipynb`` cells tagged ``exercise`` define blank functions;
``refimpl.exercises.lesson_NN.CHECKS`` maps each function name to its check; ``exercises/solutions/NN_topic.py``
defines the solutions and ``exercises/solutions/NN_topic_wrong.py`` a dict ``WRONG`` of wrong answers.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
EXERCISES = sorted(ROOT.glob("exercises/[0-9][0-9]_*.ipynb"))


def _module(path: Path):
    spec = importlib.util.spec_from_file_location(f"_ex_{path.stem}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _blanks(nb_path: Path) -> dict:
    nb = json.loads(nb_path.read_text())
    ns: dict = {"torch": torch, "math": math, "F": F}
    for cell in nb["cells"]:
        if cell["cell_type"] == "code" and "exercise" in cell.get("metadata", {}).get("tags", []):
            # exec on purpose: runs the notebook's exercise cells (the blanks a learner fills in)
            exec(compile("".join(cell["source"]), str(nb_path), "exec"), ns)  # noqa: S102
    return ns


def _cases():
    for nb in EXERCISES:
        nn = nb.stem[:2]
        checks = importlib.import_module(f"refimpl.exercises.lesson_{nn}").CHECKS
        for name in checks:
            yield pytest.param(nb, name, id=f"{nb.stem}:{name}")


def test_every_exercise_notebook_has_checks_and_solutions():
    assert EXERCISES, "no exercise notebooks found"
    for nb in EXERCISES:
        nn = nb.stem[:2]
        checks = importlib.import_module(f"refimpl.exercises.lesson_{nn}").CHECKS
        assert checks, f"{nb.name}: lesson_{nn}.CHECKS is empty"
        assert (ROOT / "exercises/solutions" / f"{nb.stem}.py").exists(), f"no solution file for {nb.name}"
        assert (ROOT / "exercises/solutions" / f"{nb.stem}_wrong.py").exists(), f"no wrong-answer file for {nb.name}"
        blanks = _blanks(nb)
        missing = [n for n in checks if n not in blanks]
        assert not missing, f"{nb.name}: no blank (cell tagged 'exercise') for {missing}"


@pytest.mark.parametrize("nb,name", list(_cases()))
def test_check_fails_on_blank_and_wrong_passes_on_solution(nb: Path, name: str):
    nn = nb.stem[:2]
    check = importlib.import_module(f"refimpl.exercises.lesson_{nn}").CHECKS[name]
    blank = _blanks(nb)[name]
    assert not check(blank), f"{name}: the check passed on the blank"
    wrong = _module(ROOT / "exercises/solutions" / f"{nb.stem}_wrong.py").WRONG
    assert wrong.get(name), f"{name}: no plausible wrong answer in {nb.stem}_wrong.py"
    for w in wrong[name]:
        assert not check(w), f"{name}: the check passed on the wrong answer {w.__name__}"
    solution = getattr(_module(ROOT / "exercises/solutions" / f"{nb.stem}.py"), name)
    res = check(solution)
    assert res, f"{name}: the check failed on the solution: {res.message}"
