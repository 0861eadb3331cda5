"""Packaging drift: pyproject.toml and environment.yml list the same requirements; the kernels folder does not
shadow Hugging Face's ``kernels`` package."""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = None


def normalize(req: str) -> str:
    """``'Transformers >= 5.0, <6'`` -> ``'transformers<6,>=5.0'``: lower-case name, sorted specifier parts."""
    m = re.match(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*(.*?)\s*$", req)
    if not m:
        raise ValueError(f"cannot parse requirement {req!r}")
    name = re.sub(r"[-_.]+", "-", m.group(1)).lower()
    extras = m.group(2) or ""
    spec = ",".join(sorted(p.strip() for p in m.group(3).replace(" ", "").split(",") if p.strip()))
    return f"{name}{extras}{spec}"


def pyproject() -> dict:
    if tomllib is None:
        pytest.skip("tomllib needs Python >= 3.11")
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def pyproject_requirements() -> set[str]:
    proj = pyproject()["project"]
    reqs = list(proj["dependencies"])
    for extra in ("triton", "dev"):
        reqs += proj["optional-dependencies"][extra]
    return {normalize(r) for r in reqs}


def environment_pip_section(text: str) -> list[str]:
    """The items of ``dependencies: - pip: [...]`` in a conda environment.yml (a tiny reader for this shape only)."""
    items, in_pip, pip_indent = [], False, None
    for raw in text.splitlines():
        line = raw.split(" #", 1)[0].rstrip() if not raw.lstrip().startswith("#") else ""
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        stripped = line.strip()
        if stripped in ("- pip:", "-  pip:"):
            in_pip, pip_indent = True, indent
            continue
        if in_pip:
            if indent <= pip_indent:
                in_pip = False
                continue
            if not stripped.startswith("- "):
                raise ValueError(f"unexpected line in the pip section of environment.yml: {raw!r}")
            items.append(stripped[2:].strip().strip("'\""))
    return items


def test_yaml_reader_on_a_known_document():
    doc = "name: x\ndependencies:\n  - python>=3.10\n  - pip\n  - pip:\n      - a>=1  # comment\n      - 'b<2,>=1'\n" \
          "      - -e .\nvariables:\n  X: 1\n"
    assert environment_pip_section(doc) == ["a>=1", "b<2,>=1", "-e ."]
    assert normalize("B >= 1, < 2") == normalize("b<2,>=1") == "b<2,>=1"


def test_environment_yml_matches_pyproject():
    items = environment_pip_section((ROOT / "environment.yml").read_text())
    assert "-e ." in items, "environment.yml must install the course package itself with `-e .`"
    env = {normalize(i) for i in items if not i.startswith("-")}
    proj = pyproject_requirements()
    assert env == proj, (f"only in environment.yml: {sorted(env - proj)}; only in pyproject.toml (base + triton + "
                         f"dev): {sorted(proj - env)}")


def test_environment_yml_cross_check_with_pyyaml_if_installed():
    yaml = pytest.importorskip("yaml")
    data = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in data["dependencies"] if isinstance(d, dict) and "pip" in d)
    assert pip == environment_pip_section((ROOT / "environment.yml").read_text())


def test_python_version_agrees():
    requires = pyproject()["project"]["requires-python"].replace(" ", "")
    text = (ROOT / "environment.yml").read_text()
    assert re.search(rf"^\s*-\s*python{re.escape(requires)}\s*$", text, re.MULTILINE), \
        f"environment.yml should pin python{requires} like pyproject's requires-python"


def test_console_scripts_point_at_existing_functions():
    scripts = pyproject()["project"]["scripts"]
    for name, target in scripts.items():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func)), f"{name} -> {target}"


def test_no_top_level_kernels_package():
    # a regular `kernels` package at the repository root would shadow Hugging Face's `kernels` (hub kernels)
    assert not (ROOT / "kernels" / "__init__.py").exists()
    assert (ROOT / "kernels" / "kvkernels" / "__init__.py").exists()


def test_transformers_kernels_probe_does_not_raise(monkeypatch):
    # With the repository root first on sys.path (as in notebooks started from the repo), `kernels` resolves at
    # most to a namespace folder; transformers must neither raise nor mistake it for the hub-kernels package.
    monkeypatch.syspath_prepend(str(ROOT))
    importlib.invalidate_caches()
    iu = pytest.importorskip("transformers.utils.import_utils")
    fn = iu.is_kernels_available
    if hasattr(fn, "cache_clear"):
        fn.cache_clear()
    available = fn()
    assert isinstance(available, bool)
    spec = importlib.util.find_spec("kernels")
    ours = spec is not None and any(Path(p).resolve() == ROOT / "kernels"
                                    for p in (spec.submodule_search_locations or []))
    if ours:
        assert spec.origin in (None, "namespace"), "our kernels/ folder must stay a namespace folder, not a package"
        assert available is False
    sys.modules.pop("kernels", None)


def test_readme_shows_the_ci_commands():
    """The README's lint and test commands are the ones ``.ci/run`` runs (so the README's second command stays
    true): every ``ruff check`` / ``pytest`` line of ``.ci/run`` appears in the README, without ``python -m``."""
    readme = (ROOT / "README.md").read_text()
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line.strip().startswith("python -m") and (" ruff check " in line or line.strip() == "python -m pytest")]
    assert len(ci) == 2, f".ci/run should run one `ruff check` and one `pytest`; found {ci}"
    for line in ci:
        assert line.removeprefix("python -m ") in readme, f"README.md does not show .ci/run's command {line!r}"
