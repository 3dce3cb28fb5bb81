"""Solvers of the denoising chain, selectable by name."""

from __future__ import annotations

from policy_accel.errors import ConfigError
from policy_accel.schema import FieldError, check_mapping
from policy_accel.solvers.base import Solver
from policy_accel.solvers.newton import NewtonSolver
from policy_accel.solvers.paradigms import ParadigmsSolver
from policy_accel.solvers.parataa import ParaTAASolver
from policy_accel.solvers.sequential import SequentialSolver

SOLVERS: dict[str, type] = {
    "sequential": SequentialSolver,
    "paradigms": ParadigmsSolver,
    "parataa": ParaTAASolver,
    "newton": NewtonSolver,
}


CAPABILITIES = ("name", "exact_warm_start")  # what a solver is, never an option (it labels results exact or not)


def make_solver(name: str, /, **options) -> Solver:
    """Build a solver by name; unknown names and options fail here with a ``ConfigError`` naming the bad value."""
    if name not in SOLVERS:
        raise ConfigError(f"unknown solver {name!r}; valid: {', '.join(sorted(SOLVERS))}")
    for key in CAPABILITIES:
        if key in options:
            raise FieldError(key, options[key], f"not an option of solver {name!r}: a property of the solver itself")
    check_mapping(options, SOLVERS[name], owner=f"solver {name!r}")
    return SOLVERS[name](**options)
