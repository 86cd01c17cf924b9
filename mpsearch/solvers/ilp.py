"""Exact allocation by integer linear programming (PuLP + CBC).

One binary ``x[u, b]`` per unit (tie group or lone layer) and open option, one option
per unit, ``sum cost <= budget`` per budget, minimise summed sensitivity. A shared charge
(:class:`~mpsearch.problem.SharedCost`, paid once per distinct option of a group) gets a
binary ``y[g, b] >= x[u, b]`` for each unit ``u`` of the group, charged in the budget row.

Before CBC sees the model it is shrunk without losing the optimum (dominated and
oversized options dropped, reduced-cost fixing between a Lagrangian bound and a greedy
start) and normalised so every coefficient lies in [0, 1]: see ``_reduce.py``.
Answers are checked exactly (:meth:`AllocationProblem.is_feasible`): an allocation
CBC's tolerance let slip over budget is cut off and the model solved again (after ten,
budgets are tightened instead and the lost ground is reported as a gap).

CBC 2.10 (bundled with PuLP) runs with preprocessing off (it returns wrong optima on
some of these models), cuts off (they barely move the bound and slow every node),
primal and integer tolerances of 1e-9, and a relative ``increment`` of 1e-10 (its
default ignores improvements under 1e-5 absolute).
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from mpsearch.errors import InfeasibleBudget
from mpsearch.problem import AllocationProblem, Front, IntArray, Solution
from mpsearch.solvers._cbc import absolute_gap as _absolute_gap
from mpsearch.solvers._cbc import cbc as _cbc
from mpsearch.solvers._reduce import Model, Start, joint_infeasible, reduce

__all__ = ["ILPSolver"]

logger = logging.getLogger(__name__)

_MAX_EXCLUDED = 10  # over-budget allocations cut off one by one before tightening
_MAX_RETRIES = 4  # budget tightenings after that
_CBC_TOLERANCE = 1e-9  # the primal tolerance CBC runs with, in scaled row units


@dataclass(frozen=True)
class _Outcome:
    unit_choice: IntArray | None  # None: no allocation found
    infeasible: bool
    proved: bool  # optimal, not merely within a gap or time limit
    absolute_gap: float | None  # in normalised loss units


@dataclass
class _Cuts:
    """What is added to the model after CBC's tolerance let an answer slip over budget."""

    margins: list[float]  # per budget, subtracted from the scaled capacity
    excluded: list[IntArray] = field(default_factory=list)  # over-budget unit choices


def _keep_better(start: Start, outcome: _Outcome, model: Model) -> _Outcome:
    """Keep the better of CBC's answer and the greedy one when CBC stopped early
    (or erred), with the tighter of CBC's and the Lagrangian bound."""
    if start.choice is None:
        return outcome
    rows = np.arange(len(start.choice))
    choice = outcome.unit_choice
    loss = math.inf if choice is None else math.fsum(model.loss[rows, choice].tolist())
    if outcome.proved and loss <= start.loss + start.allowance:
        return outcome
    if outcome.proved:
        logger.warning("ilp: CBC's optimum is worse than the greedy start; keeping that")
    if choice is None or loss > start.loss:
        choice, loss = start.choice, start.loss
    gaps = [g for g in (outcome.absolute_gap, max(loss - start.bound, 0.0)) if g is not None]
    return _Outcome(choice, infeasible=False, proved=False, absolute_gap=min(gaps))


@dataclass(frozen=True, kw_only=True)
class ILPSolver:
    """Exact solver: integer linear program solved by CBC through PuLP.

    The constructor only stores parameters; work happens in :meth:`solve` and
    :meth:`sweep`.

    Args:
        time_limit_s: wall-clock limit for each CBC run (CBC may overrun it while
            preprocessing a large model), after which the best allocation found is
            returned with status ``"feasible"`` and its gap; ``None`` for none. CBC
            proves most problems in a second (5,000 layers in under 10 s,
            ``results/solvers.md``), but it can stall on many slices of equal size:
            16 slices of each of 37 layers under a size budget, with losses close to
            4^-b, ran past 160 s unproved.
        gap_rel: stop once the incumbent is provably within this relative gap of the
            optimum (0 for a proved optimum).
        threads: CBC threads; ``None`` for CBC's default (one). Several threads run in
            CBC's repeatable mode (``100 + threads``).
        msg: show CBC's own log on stdout; the gap of a stopped run is then unknown.
    """

    name: ClassVar[str] = "ilp"
    time_limit_s: float | None = 120.0
    gap_rel: float = 0.0
    threads: int | None = None
    msg: bool = False

    def __post_init__(self) -> None:
        if self.time_limit_s is not None and not self.time_limit_s > 0:
            raise ValueError(f"time_limit_s must be > 0 or None, got {self.time_limit_s}")
        if not 0.0 <= self.gap_rel < 1.0:
            raise ValueError(f"gap_rel must be in [0, 1), got {self.gap_rel}")
        if self.threads is not None and not (isinstance(self.threads, int) and self.threads >= 1):
            raise ValueError(f"threads must be an int >= 1 or None, got {self.threads!r}")

    def solve(self, problem: AllocationProblem, *, seed: int = 0) -> Front:
        """The least-loss allocation within all budgets at once.

        Args:
            problem: the allocation problem.
            seed: seeds CBC's heuristics; the optimal loss does not depend on it, but
                which of several equal-loss allocations is returned may.

        Returns:
            A front of one solution with status ``"optimal"`` (gap 0.0) or
            ``"feasible"`` (stopped by ``time_limit_s`` or ``gap_rel``; gap where
            known), or of none with status ``"timeout"``.

        Raises:
            InfeasibleBudget: a budget is below its smallest achievable value, or the
                budgets cannot all be met together; ``.smallest`` holds each budgeted
                cost's smallest achievable value.
        """
        start = time.perf_counter()
        solution, status, gap = self._solve(problem, seed)
        elapsed = time.perf_counter() - start
        logger.info(
            "ilp: %s, loss %s, gap %s, %d units, %.2fs",
            status,
            None if solution is None else f"{solution.loss:.6g}",
            gap,
            problem.n_units,
            elapsed,
        )
        return Front.build(
            [solution] if solution is not None else [],
            objectives=list(problem.budgets),
            solver=self.name,
            status=status,
            time_s=elapsed,
            gap=gap,
        )

    def sweep(
        self, problem: AllocationProblem, cost: str, n_points: int = 10, *, seed: int = 0
    ) -> Front:
        """Loss-versus-cost Pareto front from optima at evenly spaced budgets of ``cost``.

        The budget of ``cost`` takes ``n_points`` values from its smallest to its largest
        achievable sum (replacing any budget it had); other budgets stay. Budgets that
        cannot be met together with the others are skipped; repeated and dominated (on
        loss and ``cost``) solutions are dropped.

        Args:
            problem: the allocation problem.
            cost: the cost to sweep.
            n_points: number of budgets, at least 2.
            seed: see :meth:`solve`.

        Returns:
            The front, sorted by ``cost``; status ``"optimal"`` if every point was,
            gap the largest of the points' gaps.

        Raises:
            InfeasibleBudget: the other budgets alone, or with every budget of ``cost``,
                cannot be met.
        """
        if cost not in problem.costs:
            raise ValueError(f"unknown cost {cost!r}; costs are {sorted(problem.costs)}")
        if not (isinstance(n_points, int) and n_points >= 2):
            raise ValueError(f"n_points must be an int >= 2, got {n_points!r}")
        start = time.perf_counter()
        others = {k: v for k, v in problem.budgets.items() if k != cost}
        problem.with_budgets(others).check_budgets()
        low, high = problem.min_cost(cost), problem.max_cost(cost)
        solutions: list[Solution] = []
        statuses: list[str] = []
        gaps: list[float | None] = []
        for limit in sorted(set(np.linspace(low, high, n_points).tolist())):
            try:
                solution, status, gap = self._solve(
                    problem.with_budgets({cost: limit, **others}), seed
                )
            except InfeasibleBudget:
                logger.debug("ilp sweep: %s=%.6g cannot be met with %s", cost, limit, others)
                continue
            statuses.append(status)
            gaps.append(gap)
            if solution is not None:
                solutions.append(solution)
        if not statuses:
            raise InfeasibleBudget(
                f"no {cost} budget from {low:.6g} to {high:.6g} can be met together with {others}",
                {k: problem.min_cost(k) for k in (cost, *others)},
            )
        if all(s == "optimal" for s in statuses):
            status = "optimal"
        else:
            status = "feasible" if solutions else "timeout"
        return Front.build(
            solutions,
            objectives=[cost],
            solver=self.name,
            status=status,
            time_s=time.perf_counter() - start,
            gap=None if None in gaps else max(g for g in gaps if g is not None),
        )

    def _solve(
        self, problem: AllocationProblem, seed: int
    ) -> tuple[Solution | None, str, float | None]:
        problem.check_budgets()
        model, start = reduce(problem)
        cuts = _Cuts(margins=[0.0] * len(model.shares))
        relaxed: float | None = None  # an optimum before tightening: a bound after it
        for attempt in range(_MAX_EXCLUDED + _MAX_RETRIES):
            outcome = self._run_cbc(model, start.choice, cuts, seed)
            if outcome.infeasible:
                if attempt == 0 or not any(cuts.margins):  # only over-budget ones excluded
                    raise joint_infeasible(problem)
                raise InfeasibleBudget(
                    "CBC's tolerance admitted only allocations over budget, and none is left "
                    f"after tightening the budgets by {cuts.margins} (of their slack); "
                    + str(joint_infeasible(problem)),
                    {name: problem.min_cost(name) for name in problem.budgets},
                )
            outcome = _keep_better(start, outcome, model)
            if outcome.unit_choice is None:
                return None, "timeout", None
            solution = problem.solution(problem.expand(outcome.unit_choice))
            over = {
                k: (solution.costs[name] - limit) / max(model.slack[k], 1e-300)
                for k, (name, limit) in enumerate(problem.budgets.items())
                if solution.costs[name] > limit
            }
            if not over:
                gap = None
                if outcome.proved and relaxed is None:
                    return solution, "optimal", 0.0
                if outcome.proved and relaxed is not None:
                    # Tightening may have cut off allocations that use the last sliver
                    # of a budget; the optimum before it bounds what was lost.
                    if solution.loss - relaxed <= 1e-12 * abs(solution.loss):
                        return solution, "optimal", 0.0
                    gap = (solution.loss - relaxed) / abs(solution.loss)
                elif outcome.absolute_gap is not None and solution.loss != 0:
                    gap = outcome.absolute_gap * model.loss_scale / abs(solution.loss)
                return solution, "feasible", gap
            if (model.allowed.sum(axis=1) == 1).all():  # nothing else left to try
                raise joint_infeasible(problem)
            logger.debug("ilp: CBC's tolerance let budgets slip by %s (of slack)", over)
            if len(cuts.excluded) < _MAX_EXCLUDED:
                # Excluding just this allocation keeps the search exact.
                cuts.excluded.append(outcome.unit_choice)
                continue
            if outcome.proved and relaxed is None:
                relaxed = solution.loss
            for k, excess in over.items():
                cuts.margins[k] += 2.0 * max(excess, _CBC_TOLERANCE)
        raise RuntimeError(
            f"CBC kept returning allocations over budget after {_MAX_RETRIES} tightenings"
        )

    def _run_cbc(
        self, model: Model, incumbent: IntArray | None, cuts: _Cuts, seed: int
    ) -> _Outcome:
        import pulp

        clock = time.perf_counter()
        units, options = np.nonzero(model.allowed)
        counts = model.allowed.sum(axis=1)
        if (counts == 1).all():  # reduction settled every unit
            choice = model.allowed.argmax(axis=1).astype(np.int64)
            return _Outcome(choice, infeasible=False, proved=True, absolute_gap=0.0)
        lp = pulp.LpProblem("mpsearch_allocation", pulp.LpMinimize)
        x = [lp.add_variable(f"x{i}", cat=pulp.LpBinary) for i in range(len(units))]
        lp.setObjective(pulp.LpAffineExpression(zip(x, model.loss[units, options].tolist())))
        for unit, stop in enumerate(np.cumsum(counts).tolist()):
            row = pulp.LpAffineExpression([(x[i], 1.0) for i in range(stop - counts[unit], stop)])
            lp.addConstraint(pulp.LpConstraint(row, pulp.LpConstraintEQ, f"one{unit}", 1.0))
        for k, (shares, capacity) in enumerate(zip(model.shares, model.capacity)):
            coefficients = shares[units, options]
            largest = np.zeros(len(counts))
            np.maximum.at(largest, units, coefficients)
            charged = model.shared[k] if model.shared else []
            most = largest.sum() + sum(float(charge.sum()) for _, charge in charged)
            if most <= capacity - 1e-9 and cuts.margins[k] == 0.0:
                continue  # cannot bind
            terms = [(x[i], c) for i, c in enumerate(coefficients.tolist()) if c != 0.0]
            terms += self._shared_terms(lp, x, units, options, charged, f"{k}")
            if not terms:
                continue
            row = pulp.LpAffineExpression(terms)
            lp.addConstraint(
                pulp.LpConstraint(
                    row, pulp.LpConstraintLE, f"budget{k}", capacity - cuts.margins[k]
                )
            )
        position = {(u, o): i for i, (u, o) in enumerate(zip(units.tolist(), options.tolist()))}
        free = counts > 1
        for number, excluded in enumerate(cuts.excluded):
            chosen = [position[(u, int(excluded[u]))] for u in np.flatnonzero(free).tolist()]
            row = pulp.LpAffineExpression([(x[i], 1.0) for i in chosen])
            lp.addConstraint(
                pulp.LpConstraint(row, pulp.LpConstraintLE, f"exclude{number}", len(chosen) - 1)
            )
        if incumbent is not None:
            for variable, unit, option in zip(x, units.tolist(), options.tolist()):
                variable.setInitialValue(1.0 if incumbent[unit] == option else 0.0)
        built = time.perf_counter()

        def call(preprocess: bool) -> tuple[bool, str]:
            return self._call_cbc(
                lp,
                warm=incumbent is not None,
                seed=seed,
                resolution=model.resolution,
                preprocess=preprocess,
            )

        crashed, log = call(preprocess=False)
        trusted = True
        if crashed and "Problem is infeasible" in log:
            # CBC 2.10 without preprocessing crashes right after proving infeasibility.
            return _Outcome(None, infeasible=True, proved=True, absolute_gap=None)
        if crashed:
            # Seen only on infeasible models (the message above is lost in CBC's buffer);
            # its preprocessing then answers correctly, but an optimum it finds is not
            # trusted as proved.
            logger.info("ilp: CBC crashed; solving again with its preprocessing on")
            crashed, log = call(preprocess=True)
            trusted = False
            if crashed:
                raise RuntimeError("CBC crashed twice on this model; run with msg=True to see why")
        logger.debug(
            "ilp: %d variables, %d rows built in %.3fs; CBC took %.3fs",
            len(x),
            len(lp.constraints()),
            built - clock,
            time.perf_counter() - built,
        )
        if lp.status == pulp.LpStatusInfeasible:
            return _Outcome(None, infeasible=True, proved=True, absolute_gap=None)
        picked = np.zeros(model.allowed.shape)
        picked[units, options] = [v.varValue or 0.0 for v in x]
        # A stopped CBC without an incumbent still reports "objective value" to PuLP.
        if (
            "No feasible solution found" in log
            or lp.status != pulp.LpStatusOptimal
            or not (picked.max(axis=1) > 0.5).all()
        ):
            return _Outcome(None, infeasible=False, proved=False, absolute_gap=None)
        # CBC calls a stop within gap_rel "Optimal"; only its log tells (Cbc0011I, beyond
        # the resolution). Without a log (msg=True) trust it when no gap was allowed.
        gap = _absolute_gap(log)
        if log:
            within_gap = "gap tolerance" in log or (
                "Exiting as integer gap" in log and gap is not None and gap > model.resolution
            )
        else:
            within_gap = self.gap_rel > 0
        proved = trusted and lp.sol_status == pulp.LpSolutionOptimal and not within_gap
        return _Outcome(
            picked.argmax(axis=1).astype(np.int64),
            infeasible=False,
            proved=proved,
            absolute_gap=gap,
        )

    @staticmethod
    def _shared_terms(lp: Any, x: list[Any], units: IntArray, options: IntArray,
                      charged: list[tuple[IntArray, Any]], tag: str) -> list[tuple[Any, float]]:
        """Budget-row terms of shared charges: ``y[g, o]`` is 1 when a unit of group ``g``
        takes option ``o`` (forced by ``y >= x``; the budget keeps it 0 otherwise)."""
        import pulp

        terms: list[tuple[Any, float]] = []
        for g, (members, charge) in enumerate(charged):
            inside = np.isin(units, members)
            for o in np.unique(options[inside]).tolist():
                if charge[o] == 0.0:
                    continue
                y = lp.add_variable(f"y{tag}_{g}_{o}", cat=pulp.LpBinary)
                terms.append((y, float(charge[o])))
                for n, i in enumerate(np.flatnonzero(inside & (options == o)).tolist()):
                    lp.addConstraint(pulp.LpConstraint(
                        pulp.LpAffineExpression([(y, 1.0), (x[i], -1.0)]),
                        pulp.LpConstraintGE, f"share{tag}_{g}_{o}_{n}", 0.0))
        return terms

    def _call_cbc(
        self, lp: Any, *, warm: bool, seed: int, resolution: float, preprocess: bool
    ) -> tuple[bool, str]:
        """Run CBC on ``lp``; returns whether it crashed, and its log (empty with msg)."""
        import pulp

        with tempfile.TemporaryDirectory(prefix="mpsearch_cbc_") as folder:
            log_path = None if self.msg else os.path.join(folder, "cbc.log")
            solver = _cbc(
                msg=self.msg,
                timeLimit=self.time_limit_s,
                gapRel=self.gap_rel,
                threads=None if self.threads in (None, 1) else 100 + (self.threads or 0),
                logPath=log_path,
                warmStart=warm,
                # CBC 2.10's preprocessing returns wrong "optimal" answers on some small
                # models of this shape (cf. coin-or/Cbc#283), so it is off unless CBC
                # crashes without it. A seed of 0 would mean "use the clock".
                options=[
                    f"preprocess {'sos' if preprocess else 'off'}",
                    f"randomCbcSeed {seed % (2**31 - 2) + 1}",
                    # Rows are scaled to a right-hand side of 1: CBC's default 1e-7
                    # tolerances let answers slip over budget, so they are tightened.
                    "primalTolerance 1e-9",
                    "integerTolerance 1e-9",
                    f"increment {resolution:.6g}",
                    f"allowableGap {resolution:.6g}",
                    # Cuts barely move the bound of these multiple-choice knapsacks but
                    # slow every node: off, several budgets solve 4-15x faster.
                    "cuts off",
                ],
            )
            solver.tmpDir = folder  # PuLP leaves its files behind when CBC crashes
            try:
                lp.solve(solver)
                crashed = False
            except pulp.PulpSolverError:
                crashed = True
            log = ""
            if log_path is not None and os.path.exists(log_path):
                with open(log_path) as handle:
                    log = handle.read()
        return crashed, log
