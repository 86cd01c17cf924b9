"""NSGA-II (pymoo): the whole loss-versus-cost trade-off in one run.

Objectives: the summed sensitivity and every budgeted cost (2 objectives with one budget,
3 with two, ...); the budgets are constraints, so the front spans from the cheapest
allocation up to the budget. The genome holds one integer per free unit (tie group or
lone layer with a choice left): the index of its option among those still open, ordered
from cheapest to dearest so that neighbouring values are neighbouring bit-widths.

The initial population is seeded with exact and greedy answers: the ILP optimum at the
budget and at a few smaller budgets of the first budgeted cost, the path the greedy
climb takes from the cheapest allocation up to the budget (each step a point near the
front), and random genomes. Offspring over budget are repaired by greedy downgrades (the
unit move adding the least loss per over-spent budget freed, all offspring at once).
Every feasible genome seen is kept in an archive; its non-dominated set is the answer.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from mpsearch.errors import InfeasibleBudget
from mpsearch.problem import AllocationProblem, FloatArray, Front, IntArray, Solution
from mpsearch.solvers._moves import budget_weight, upgrade
from mpsearch.solvers._reduce import Model, conservative, exact_bound, lagrangian, normalise
from mpsearch.solvers.greedy import GreedySolver
from mpsearch.solvers.ilp import ILPSolver

__all__ = ["NSGA2Solver"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Encoding:
    """Genome <-> unit choice: ``options[i]`` are free unit ``free[i]``'s open options,
    cheapest first; ``base`` is the unit choice with every free unit at its first."""

    free: IntArray
    options: list[IntArray]
    base: IntArray
    table: IntArray  # n_free x max_options, option per gene value (padded with the last)

    @classmethod
    def build(cls, model: Model, weight: FloatArray) -> _Encoding:
        counts = model.allowed.sum(axis=1)
        free = np.flatnonzero(counts > 1)
        options = []
        for unit in free.tolist():
            open_ = np.flatnonzero(model.allowed[unit])
            options.append(open_[np.argsort(weight[unit, open_], kind="stable")])
        base = model.allowed.argmax(axis=1).astype(np.int64)
        width = max((len(o) for o in options), default=1)
        table = np.array([np.pad(o, (0, width - len(o)), mode="edge") for o in options],
                         dtype=np.int64).reshape(len(free), width)
        return cls(free, options, base, table)

    @property
    def upper(self) -> IntArray:
        return np.array([len(o) - 1 for o in self.options], dtype=np.int64)

    def decode(self, genomes: IntArray) -> IntArray:
        """``P x n_free`` genomes -> ``P x U`` unit choices."""
        choices = np.repeat(self.base[None, :], len(genomes), axis=0)
        if len(self.free):
            choices[:, self.free] = self.table[np.arange(len(self.free)), genomes]
        return choices

    def encode(self, choices: IntArray) -> IntArray:
        """``P x U`` unit choices -> ``P x n_free`` genomes."""
        width = int(self.table.max(initial=0)) + 1
        position = np.zeros((len(self.free), width), dtype=np.int64)
        for i, options in enumerate(self.options):
            position[i, options] = np.arange(len(options))
        result: IntArray = position[np.arange(len(self.free)), choices[:, self.free]]
        return result


def _repair(choices: IntArray, model: Model, prices: list[float], limits: FloatArray
            ) -> IntArray:
    """Greedy downgrades of every over-budget row at once: per row, the unit move adding
    the least loss per over-spent budget freed, until every budget holds."""
    choices = choices.copy()
    rows = np.arange(choices.shape[1])
    shares = np.stack(model.shares)  # K x U x B
    masked = np.where(model.allowed, model.loss, np.inf)
    floor = 1e-6 * max(max(prices, default=0.0), 1.0)
    price = np.asarray(prices) + floor
    for _ in range(choices.shape[1] * model.allowed.shape[1]):
        used = shares[:, rows[None, :], choices].sum(axis=2).T  # P x K
        over = used > limits[None, :]
        todo = np.flatnonzero(over.any(axis=1))
        if not len(todo):
            break
        picked = choices[todo]
        weight = np.einsum("pk,kub->pub", over[todo] * price, shares)
        now = np.take_along_axis(weight, picked[:, :, None], axis=2)
        freed = now - weight
        added = masked[None, :, :] - np.take_along_axis(
            np.broadcast_to(masked, weight.shape), picked[:, :, None], axis=2)
        rate = np.where((freed > 0) & np.isfinite(added), added / np.where(freed > 0, freed, 1),
                        np.inf)
        flat = rate.reshape(len(todo), -1)
        best = flat.argmin(axis=1)
        stuck = ~np.isfinite(flat[np.arange(len(todo)), best])
        unit, option = np.divmod(best, model.allowed.shape[1])
        moving = ~stuck
        choices[todo[moving], unit[moving]] = option[moving]
        if stuck.all():
            break
    return choices


@dataclass(frozen=True, kw_only=True)
class NSGA2Solver:
    """Pareto front of loss against every budgeted cost by NSGA-II (pymoo).

    The constructor only stores parameters; work happens in :meth:`solve`.

    Args:
        pop_size: population size.
        n_gen: generations (the run also stops at ``time_limit_s``).
        time_limit_s: wall-clock limit of the evolution (seeding not included); ``None``
            for none.
        ilp_points: exact ILP optima seeded into the first population: at the budget,
            and at ``ilp_points - 1`` smaller budgets of the first budgeted cost (0: no
            ILP, greedy seeds only).
        ilp_time_limit_s: time limit of each seeding ILP solve (its best answer is used).
        max_solutions: most solutions returned; a larger non-dominated set is thinned to
            points evenly spread along the first budgeted cost, extremes kept.
        patience: stop after this many generations without a change to the archive of
            non-dominated allocations (small problems converge in a few dozen); ``None``
            to always run ``n_gen``.
    """

    name: ClassVar[str] = "nsga2"
    pop_size: int = 100
    n_gen: int = 150
    time_limit_s: float | None = 60.0
    ilp_points: int = 5
    ilp_time_limit_s: float | None = 10.0
    max_solutions: int = 1000
    patience: int | None = 40

    def __post_init__(self) -> None:
        for name, least in (("pop_size", 4), ("n_gen", 1), ("ilp_points", 0),
                            ("max_solutions", 2), ("patience", 1)):
            value = getattr(self, name)
            if name == "patience" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
        for name in ("time_limit_s", "ilp_time_limit_s"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0 or None, got {value!r}")

    def solve(self, problem: AllocationProblem, *, seed: int = 0) -> Front:
        """The non-dominated allocations found, loss against each budgeted cost.

        Args:
            problem: the allocation problem; with no budget, the front is the single
                least-loss allocation.
            seed: seeds the evolution (and the seeding ILP runs).

        Returns:
            The front sorted by the first budgeted cost; status ``"feasible"``; ``gap``
            the relative distance of its lowest-loss point from the Lagrangian lower
            bound at the budget (0.0 when that point is a proved ILP optimum).

        Raises:
            InfeasibleBudget: the budgets cannot be met (alone or together).
        """
        clock = time.perf_counter()
        problem.check_budgets()
        # shared charges (scales of slices) counted in full: every sum it sees is one
        exact, problem = problem, conservative(problem, self.name)
        objectives = list(problem.budgets)
        if not objectives:
            front = GreedySolver().solve(exact)  # no trade-off: the least-loss choice
            return Front.build(front.solutions, solver=self.name, status=front.status,
                               time_s=time.perf_counter() - clock, gap=front.gap)
        model = normalise(problem)
        bound, _, prices_array = lagrangian(model)
        prices = prices_array.tolist()
        limits = np.array([c * (1.0 - 1e-11) for c in model.capacity])
        weight = budget_weight(model.allowed, model.shares, prices)
        encoding = _Encoding.build(model, weight)
        seeds, proved = self._seeds(problem, model, weight, limits, seed)
        archive = self._evolve(model, encoding, seeds, prices, limits, seed)
        solutions = [exact.solution(problem.expand(c)) for c in archive]
        solutions = [s for s in solutions if exact.is_feasible(s.choice)]
        if proved is not None:
            proved = exact.solution(proved.choice)
            solutions.append(proved)
        front = Front.build(solutions, objectives=objectives, solver=self.name,
                            status="feasible", time_s=0.0)
        kept = _thin(list(front.solutions), self.max_solutions)
        if not kept:
            raise InfeasibleBudget(
                f"nsga2 found no allocation meeting all of {dict(problem.budgets)} together; "
                "they may be jointly infeasible: the ILP solver ('ilp') decides exactly",
                {name: problem.min_cost(name) for name in problem.budgets},
            )
        best = min(kept, key=lambda s: s.loss)
        gap: float | None = None
        if proved is not None and best.loss >= proved.loss and not exact.shared:
            gap = 0.0
        elif best.loss != 0:
            bound = exact_bound(exact, model, bound)
            gap = max(best.loss - bound * model.loss_scale, 0.0) / abs(best.loss)
        elapsed = time.perf_counter() - clock
        logger.info("nsga2: %d solutions (of %d archived), best loss %.6g, %.2fs", len(kept),
                    len(archive), best.loss, elapsed)
        return Front.build(kept, objectives=objectives, solver=self.name, status="feasible",
                           time_s=elapsed, gap=gap)

    def _seeds(self, problem: AllocationProblem, model: Model, weight: FloatArray,
               limits: FloatArray, seed: int) -> tuple[list[IntArray], Solution | None]:
        """Unit choices for the first population, and the proved ILP optimum if any."""
        seeds: list[IntArray] = []
        proved: Solution | None = None
        first = next(iter(problem.budgets))
        if self.ilp_points:
            low, high = problem.min_cost(first), problem.budgets[first]
            ilp = ILPSolver(time_limit_s=self.ilp_time_limit_s)
            for level in np.linspace(high, low, self.ilp_points + 1)[:-1].tolist():
                try:
                    front = ilp.solve(problem.with_budgets({**problem.budgets, first: level}),
                                      seed=seed)
                except InfeasibleBudget:
                    if level == high:  # proved: the budgets cannot be met together
                        raise
                    continue
                if not len(front):
                    continue
                if level == high and front.status == "optimal":
                    proved = front.best
                seeds.append(_unit_choice(problem, front.best.choice))
        try:
            greedy = GreedySolver().solve(problem)
            seeds.append(_unit_choice(problem, greedy.best.choice))
        except InfeasibleBudget:  # it can miss budgets pulling apart; evolution may not
            logger.info("nsga2: the greedy seed found no allocation within the budgets")
        # The greedy climb from the cheapest allocation: each step is near the front.
        cheapest = np.where(model.allowed, weight, np.inf).argmin(axis=1).astype(np.int64)
        trail: list[tuple[int, int]] = []
        upgrade(cheapest, model.loss, model.allowed, weight, model.shares, limits.tolist(),
                trail=trail)
        stops = np.unique(np.linspace(0, len(trail), max(self.pop_size // 2, 2)).astype(int))
        current, done = cheapest.copy(), 0
        for stop in stops.tolist():
            for unit, to in trail[done:stop]:
                current[unit] = to
            done = stop
            seeds.append(current.copy())
        return seeds, proved

    def _evolve(self, model: Model, encoding: _Encoding, seeds: list[IntArray],
                prices: list[float], limits: FloatArray, seed: int) -> list[IntArray]:
        """Run NSGA-II; returns the non-dominated feasible unit choices seen."""
        try:
            from pymoo.algorithms.moo.nsga2 import NSGA2
        except ImportError as error:
            raise ImportError(
                "solver 'nsga2' needs pymoo: pip install 'mpsearch[nsga2]' (or pymoo>=0.6.1)"
            ) from error
        from pymoo.core.problem import Problem
        from pymoo.core.repair import Repair
        from pymoo.operators.crossover.pntx import TwoPointCrossover
        from pymoo.operators.mutation.pm import PM
        from pymoo.operators.repair.rounding import RoundingRepair
        from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

        shares = np.stack(model.shares)
        rows = np.arange(model.allowed.shape[0])
        if not len(encoding.free):  # nothing to choose
            return [encoding.base]

        def objectives(choices: IntArray) -> tuple[FloatArray, FloatArray]:
            loss = model.loss[rows[None, :], choices].sum(axis=1)
            used = shares[:, rows[None, :], choices].sum(axis=2).T
            return np.column_stack([loss, used]), used - limits[None, :]

        class _Allocation(Problem):
            def _evaluate(self, x: Any, out: dict[str, Any], *args: Any, **kwargs: Any) -> None:
                out["F"], out["G"] = objectives(encoding.decode(np.asarray(x, dtype=np.int64)))

        class _Downgrade(Repair):
            def _do(self, problem: Any, x: Any, **kwargs: Any) -> Any:
                genomes = np.clip(np.round(np.asarray(x)), 0, encoding.upper).astype(np.int64)
                choices = _repair(encoding.decode(genomes), model, prices, limits)
                return encoding.encode(choices)

        rng = np.random.default_rng(seed)
        seeded = encoding.encode(np.array(seeds, dtype=np.int64))
        if len(seeded) > self.pop_size:  # keep the ILP and greedy answers, thin the path
            keep = np.unique(np.linspace(0, len(seeded) - 1, self.pop_size).astype(int))
            seeded = seeded[keep]
        extra = self.pop_size - len(seeded)
        random = rng.integers(0, encoding.upper + 1, size=(max(extra, 0), len(encoding.free)))
        start = np.vstack([seeded, random]).astype(np.int64)
        start = encoding.encode(_repair(encoding.decode(start), model, prices, limits))
        problem = _Allocation(n_var=len(encoding.free), n_obj=1 + len(model.shares),
                              n_ieq_constr=len(model.shares), xl=0, xu=encoding.upper,
                              vtype=int)
        algorithm = NSGA2(
            pop_size=self.pop_size,
            sampling=start,
            crossover=TwoPointCrossover(prob=0.9),
            mutation=PM(eta=5.0, prob=1.0, repair=RoundingRepair()),
            repair=_Downgrade(),
            eliminate_duplicates=True,
        )
        algorithm.setup(problem, termination=("n_gen", self.n_gen), seed=seed, verbose=False)
        sorter = NonDominatedSorting()
        archive_x = np.empty((0, len(encoding.free)), dtype=np.int64)
        archive_f = np.empty((0, problem.n_obj))
        clock = time.perf_counter()
        generations = stalled = 0
        while algorithm.has_next():
            algorithm.next()
            generations += 1
            pop = algorithm.pop
            feasible = (np.asarray(pop.get("G")) <= 0).all(axis=1)
            x = np.vstack([archive_x, np.asarray(pop.get("X"), dtype=np.int64)[feasible]])
            f = np.vstack([archive_f, np.asarray(pop.get("F"))[feasible]])
            x, unique = np.unique(x, axis=0, return_index=True)
            f = f[unique]
            keep = np.sort(np.asarray(sorter.do(f, only_non_dominated_front=True)))
            same = len(keep) == len(archive_x) and np.array_equal(x[keep], archive_x)
            archive_x, archive_f = x[keep], f[keep]
            stalled = stalled + 1 if same else 0
            if self.patience is not None and stalled >= self.patience:
                break
            if self.time_limit_s is not None and time.perf_counter() - clock > self.time_limit_s:
                break
        logger.debug("nsga2: %d generations (%d without change) in %.2fs, archive %d",
                     generations, stalled, time.perf_counter() - clock, len(archive_x))
        return list(encoding.decode(archive_x))


def _unit_choice(problem: AllocationProblem, choice: IntArray) -> IntArray:
    """A layer choice as one option per unit (every tie group takes one option)."""
    first = np.zeros(problem.n_units, dtype=np.int64)
    first[problem.unit_of[::-1]] = np.arange(problem.n_layers)[::-1]
    result: IntArray = np.asarray(choice, dtype=np.int64)[first]
    return result


def _thin(solutions: list[Solution], count: int) -> list[Solution]:
    """At most ``count`` solutions spread evenly along the front's order, ends kept."""
    if len(solutions) <= count:
        return solutions
    picks = np.unique(np.round(np.linspace(0, len(solutions) - 1, count)).astype(int))
    return [solutions[i] for i in picks.tolist()]

