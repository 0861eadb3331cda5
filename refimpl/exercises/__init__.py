"""Auto-checks for the course exercises.

Each lesson has a module ``refimpl.exercises.lesson_NN`` with functions ``check_<name>(fn) -> CheckResult``.
A check runs the learner's ``fn`` on seeded random inputs, compares it with the ``refimpl`` reference under
dtype-aware tolerances, and explains in plain words what is wrong.  Checks never raise, so an unfinished
exercise notebook still runs top to bottom; ``bool(result)`` tells whether it passed.

CI (``tests/test_exercises.py``) proves for every check that it fails on the blank from the notebook, fails on
every plausible wrong answer in ``exercises/solutions/NN_*_wrong.py`` and passes on ``exercises/solutions/NN_*.py``.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["TOLERANCES", "CheckResult", "compare", "run_check"]

# (atol, rtol) per dtype for comparing a learner's result with the reference.
TOLERANCES = {
    torch.float32: (1e-5, 1e-4),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (2e-2, 2e-2),
}


@dataclass
class CheckResult:
    name: str
    passed: bool
    message: str

    def __bool__(self) -> bool:
        return self.passed

    def __repr__(self) -> str:
        mark = "PASS" if self.passed else "FAIL"
        return f"[{mark}] {self.name}: {self.message}"


class Mismatch(AssertionError):
    """Raised inside a check body to report a learner-readable failure."""


def compare(got: torch.Tensor, want: torch.Tensor, what: str, hint: str = "") -> None:
    """Raise :class:`Mismatch` with a readable message if ``got`` differs from ``want``."""
    if not isinstance(got, torch.Tensor):
        raise Mismatch(f"{what} should be a torch.Tensor, but your function returned {type(got).__name__}.")
    if tuple(got.shape) != tuple(want.shape):
        raise Mismatch(f"{what} has shape {tuple(got.shape)} but should have shape {tuple(want.shape)}. {hint}".strip())
    if got.dtype != want.dtype:
        raise Mismatch(f"{what} has dtype {got.dtype} but should keep the input dtype {want.dtype}.")
    atol, rtol = TOLERANCES.get(want.dtype, (0.0, 0.0))
    if want.dtype.is_floating_point:
        ok = torch.allclose(got.float(), want.float(), atol=atol, rtol=rtol)
        err = (got.float() - want.float()).abs().max().item()
    else:
        ok = torch.equal(got, want)
        err = (got != want).sum().item()
    if not ok:
        raise Mismatch(f"{what} has the right shape but wrong values (max difference {err:.3g}). {hint}".strip())


def run_check(name: str, body: Callable[[], None], verbose: bool = True) -> CheckResult:
    """Run ``body``; turn exceptions into a failing :class:`CheckResult` with a friendly message."""
    try:
        body()
        res = CheckResult(name, True, "matches the reference implementation.")
    except NotImplementedError:
        res = CheckResult(name, False, "not implemented yet — replace the `raise NotImplementedError` with your code.")
    except Mismatch as e:
        res = CheckResult(name, False, str(e))
    except Exception as e:  # noqa: BLE001 - the learner's code crashed (any exception is a failed check)
        tb = traceback.format_exception_only(type(e), e)[-1].strip()
        res = CheckResult(name, False, f"your function raised {tb}")
    if verbose:
        print(repr(res))
    return res
