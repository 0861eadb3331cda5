"""Check that this machine can run the course, and print a report to paste into bug reports.

    kvcourse-check-env            (or: python -m refimpl.check_env, python scripts/check_env.py)

One line per package: ``[OK]`` with the installed version, or ``[FAIL]`` with the reason (not installed, too old,
import error).  Requirements are read from ``pyproject.toml`` in a source checkout, else from the installed
``kvcourse`` metadata, so this script never drifts from the package.  The base dependencies are required;
the ``triton`` and ``dev`` extras are listed as optional (``--strict`` makes them required).  Then: Python version,
torch's CUDA status and device name, ``TRITON_INTERPRET``, ``KVCOURSE_DATA_DIR``, and whether the course model
loads and produces finite logits.

Exit status: 0 when every required package and the course model are OK, 1 otherwise.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata as md
import os
import platform
import re
import sys
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Check", "check_model", "check_package", "check_python", "collect", "format_report", "main",
           "read_requirements", "torch_report"]

PROJECT = "kvcourse"
COURSE_MODEL = "kvcourse-llama"
ROOT = Path(__file__).resolve().parent.parent
IMPORT_NAMES = {"pyyaml": "yaml", "scikit-learn": "sklearn"}  # distribution name -> module, where they differ
_REQ = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*([^;]*?)\s*(?:;\s*(.*))?$")


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    required: bool = True

    def line(self) -> str:
        mark = "[OK]  " if self.ok else "[FAIL]" if self.required else "[WARN]"
        return f"{mark} {self.name:<14} {self.detail}"


# ----------------------------------------------------------------------------------------- requirements
def _split(req: str) -> tuple[str, str, str | None]:
    """``'triton>=3.0; extra == "triton"'`` -> ``('triton', '>=3.0', 'triton')``."""
    m = _REQ.match(req)
    if not m:
        raise ValueError(f"cannot parse requirement {req!r}")
    name, _, spec, marker = m.groups()
    extra = None
    if marker:
        em = re.search(r"extra\s*==\s*['\"]([^'\"]+)['\"]", marker)
        extra = em.group(1) if em else None
    return name, spec.replace(" ", ""), extra


def read_requirements(pyproject: Path | None = None) -> tuple[str, list[tuple[str, str, str | None]]]:
    """``(requires_python, [(name, specifier, extra or None), ...])`` from pyproject.toml or installed metadata."""
    pyproject = pyproject or ROOT / "pyproject.toml"
    if pyproject.is_file():
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            tomllib = None
        if tomllib is not None:
            with open(pyproject, "rb") as f:
                proj = tomllib.load(f).get("project", {})
            if proj.get("name") == PROJECT:
                reqs = [_split(r) for r in proj.get("dependencies", [])]
                for extra, lst in proj.get("optional-dependencies", {}).items():
                    reqs += [(n, s, extra) for n, s, _ in map(_split, lst)]
                return proj.get("requires-python", ""), reqs
    meta = md.metadata(PROJECT)  # raises PackageNotFoundError when neither source nor install is found
    return meta.get("Requires-Python", ""), [_split(r) for r in (md.requires(PROJECT) or [])]


def _version_ok(version: str, spec: str) -> bool | None:
    """Whether ``version`` satisfies ``spec``; None if ``packaging`` is unavailable to decide."""
    if not spec:
        return True
    try:
        from packaging.specifiers import SpecifierSet
        from packaging.version import Version
    except ModuleNotFoundError:
        return None
    return Version(version) in SpecifierSet(spec, prereleases=True)


def check_package(name: str, spec: str = "", required: bool = True, extra: str | None = None) -> Check:
    """Installed version satisfies ``spec`` and the module imports."""
    hint = f"pip install -e '.[{extra}]'" if extra else "pip install -e ."
    need = f" (needs {spec})" if spec else ""
    try:
        version = md.version(name)
    except md.PackageNotFoundError:
        return Check(name, False, f"not installed{need}; {hint}", required)
    ok = _version_ok(version, spec)
    if ok is False:
        return Check(name, False, f"{version} installed but {spec} is needed; {hint}", required)
    module = IMPORT_NAMES.get(name.lower(), name.replace("-", "_"))
    try:
        importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - a broken install: wrong CUDA build, missing shared library...
        return Check(name, False, f"{version} installed but `import {module}` fails: {type(e).__name__}: {e}",
                     required)
    return Check(name, True, version + ("" if ok else f" (could not compare with {spec}: no `packaging`)"), required)


def check_python(requires_python: str) -> Check:
    v = platform.python_version()
    ok = _version_ok(v, requires_python)
    return Check("python", ok is not False, f"{v} ({sys.executable})" + (
        "" if ok is not False else f"; the course needs Python {requires_python}"))


# ------------------------------------------------------------------------------------------ environment
def torch_report() -> list[str]:
    try:
        import torch
    except Exception as e:  # noqa: BLE001 - a broken torch is reported, not raised
        return [f"torch CUDA:    unknown (torch does not import: {type(e).__name__})"]
    lines = [(f"torch build:   {torch.__version__}, CUDA {torch.version.cuda or 'none'}, "
              f"{torch.get_num_threads()} CPU threads")]
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(n))
        lines.append(f"torch CUDA:    available, {n} device(s): {names}")
    else:
        lines.append("torch CUDA:    not available (CPU only; Triton kernels need TRITON_INTERPRET=1)")
    return lines


def env_report() -> list[str]:
    lines = []
    ti = os.environ.get("TRITON_INTERPRET")
    lines.append(f"TRITON_INTERPRET={ti!r}" if ti is not None else "TRITON_INTERPRET unset")
    dd = os.environ.get("KVCOURSE_DATA_DIR")
    if dd is None:
        lines.append("KVCOURSE_DATA_DIR unset (the course text is downloaded from the hub)")
    else:
        lines.append(f"KVCOURSE_DATA_DIR={dd!r} ({'exists' if Path(dd).is_dir() else 'MISSING: no such folder'})")
    lines.append(f"platform:      {platform.platform()}")
    return lines


def check_model(name: str = COURSE_MODEL) -> Check:
    """Load the course model with ``refimpl.loading.load_model`` and run one short forward pass."""
    try:
        import torch

        from refimpl.loading import load_model

        model, tok = load_model(name)
        ids = torch.tensor([tok.encode("The cache") if hasattr(tok, "encode") else [1, 2, 3]])
        with torch.no_grad():
            logits = model(ids).logits
        if not torch.isfinite(logits).all():
            return Check("course model", False, f"{name}: logits are not finite")
        n = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
        return Check("course model", True, f"{name}: loads, {n / 1e6:.1f}M parameters, finite logits")
    except Exception as e:  # noqa: BLE001 - any failure to load or run is the check's result
        return Check("course model", False, f"{name} does not load: {type(e).__name__}: {e}")


# ---------------------------------------------------------------------------------------------- report
def collect(strict: bool = False, model: bool = True) -> list[Check]:
    try:
        requires_python, reqs = read_requirements()
    except Exception as e:  # noqa: BLE001 - reported as a failed check, like every other problem
        return [Check(PROJECT, False, f"cannot read the requirements ({type(e).__name__}: {e}); run "
                                       f"`pip install -e .` in the course folder")]
    checks = [check_python(requires_python)]
    for name, spec, extra in reqs:
        checks.append(check_package(name, spec, required=strict or extra is None, extra=extra))
    if model:
        checks.append(check_model())
    return checks


def format_report(checks: list[Check]) -> tuple[str, int]:
    failed = [c for c in checks if not c.ok and c.required]
    lines = ["kvcourse environment check (paste everything below into bug reports)", "-" * 70]
    lines += [c.line() for c in checks]
    lines += ["-" * 70] + torch_report() + env_report() + ["-" * 70]
    if failed:
        lines.append(f"RESULT: FAIL ({len(failed)} required: {', '.join(c.name for c in failed)})")
    else:
        warn = [c.name for c in checks if not c.ok]
        lines.append("RESULT: OK" + (f" (optional missing: {', '.join(warn)})" if warn else ""))
    return "\n".join(lines), 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kvcourse-check-env", description=__doc__.splitlines()[0])
    p.add_argument("--strict", action="store_true", help="treat the triton and dev extras as required too")
    p.add_argument("--skip-model", action="store_true", help="do not try to load the course model")
    args = p.parse_args(argv)
    text, code = format_report(collect(strict=args.strict, model=not args.skip_model))
    print(text)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
