"""Solvers: turn an :class:`~mpsearch.problem.AllocationProblem` into a :class:`Front`.

Python callers pass solver objects (``solve(problem, ILPSolver(time_limit_s=5))``);
names in :data:`SOLVERS` are for the CLI and JSON configs.
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol, runtime_checkable

from mpsearch.problem import AllocationProblem, Front
from mpsearch.solvers.greedy import GreedySolver
from mpsearch.solvers.ilp import ILPSolver
from mpsearch.solvers.nsga2 import NSGA2Solver

__all__ = ["SOLVERS", "GreedySolver", "ILPSolver", "NSGA2Solver", "Solver", "check_solver",
           "solve"]


@runtime_checkable
class Solver(Protocol):
    """What every solver provides. Constructors only store parameters."""

    name: ClassVar[str]

    def solve(self, problem: AllocationProblem, *, seed: int = 0) -> Front:
        """Search ``problem``; ``seed`` drives any randomness."""
        ...


SOLVERS: dict[str, type[Any]] = {
    ILPSolver.name: ILPSolver,
    GreedySolver.name: GreedySolver,
    NSGA2Solver.name: NSGA2Solver,
}
"""Registered solver classes by name; each is built as ``SOLVERS[name](**options)``."""


def check_solver(solver: object) -> None:
    """A clear error for what :func:`solve` cannot use: an unknown name, a class (not an
    instance), or an object without ``.solve``.

    Raises:
        ValueError: an unknown name.
        TypeError: anything else that is no solver.
    """
    if isinstance(solver, str):
        if solver not in SOLVERS:
            raise ValueError(f"unknown solver {solver!r}; known solvers: {sorted(SOLVERS)}")
        return
    if isinstance(solver, type):
        raise TypeError(f"solver={solver.__name__} is a class: pass an instance, e.g. "
                        f"solver={solver.__name__}()")
    if not callable(getattr(solver, "solve", None)):
        raise TypeError(f"solver must be a name ({sorted(SOLVERS)}) or an object with "
                        f".solve(problem, seed=), got {solver!r}")


def solve(
    problem: AllocationProblem, solver: str | Solver = "ilp", *, seed: int = 0, **options: Any
) -> Front:
    """Solve an allocation problem.

    Args:
        problem: the allocation problem.
        solver: a solver object, or the name of a registered one (see :data:`SOLVERS`):
            ``"ilp"`` (exact), ``"greedy"`` (fast, proved gap), ``"nsga2"`` (a front).
        seed: seed for the solver's randomness.
        **options: constructor parameters, only with a solver name, e.g.
            ``solve(problem, "ilp", time_limit_s=10)``.

    Returns:
        The solver's :class:`~mpsearch.problem.Front`.

    Raises:
        ValueError: unknown solver name, bad options, or options given with an object.
        InfeasibleBudget: the budgets cannot be met.
    """
    check_solver(solver)
    if isinstance(solver, str):
        try:
            instance: Solver = SOLVERS[solver](**options)
        except TypeError as error:
            raise ValueError(f"bad options {options} for solver {solver!r}: {error}") from error
    else:
        if options:
            raise ValueError(
                f"options {sorted(options)} only go with a solver name; set them on the "
                f"solver object instead, e.g. {type(solver).__name__}(...)"
            )
        instance = solver
    return instance.solve(problem, seed=seed)
