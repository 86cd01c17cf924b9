"""Bidirectional greedy allocation: fast, near-optimal, with a certified gap.

From a uniform map (every unit at the same bits where it can take them):

1. **down**: while a budget is over, take the move (one unit to a cheaper option) that
   adds the least loss per unit of over-spent budget freed;
2. **up**: while moves fit, take the one that saves the most loss per unit of budget
   used (each unit climbs its loss/cost hull);
3. **swap**: take the loss-reducing moves that fit, else the best pairs (one unit up,
   another down to pay for it), until neither improves;
4. **exchange** (on the best answer): one unit up, paid for by greedy downgrades of any
   number of others (or one unit down, the room filled by greedy upgrades), then swaps
   again, until that does not improve either.

Three starts are tried: the uniform maps either side of the budget (the most bits that
fit, and the next up) and the ILP's start (the Lagrangian choice made feasible, which
also covers budgets pulling apart, where descending from uniform can fail). Budgets are
combined by the Lagrangian prices of the relaxation (what a unit of each is worth at its
optimum), which also give a lower bound: the reported gap is proved. Options are pruned
first exactly as for the ILP (dominated or alone over budget), so ties, pins and
``allowed`` hold by construction.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from mpsearch.errors import InfeasibleBudget
from mpsearch.problem import AllocationProblem, Front, IntArray
from mpsearch.solvers._moves import (
    budget_weight,
    descend,
    eject,
    eject_down,
    improve,
    reduce_excess,
    upgrade,
    used_shares,
)
from mpsearch.solvers._reduce import (
    Model,
    conservative,
    exact_bound,
    lagrangian,
    lagrangian_greedy,
    normalise,
)

__all__ = ["GreedySolver"]

logger = logging.getLogger(__name__)


def uniform_start(problem: AllocationProblem, model: Model, column: int) -> IntArray:
    """Every unit at option ``column`` where it is open, else at its open option with the
    nearest bits (the fewer bits on a tie)."""
    bits = np.asarray(problem.bits, dtype=np.float64)
    distance = np.abs(bits - bits[column]) + 1e-3 * (bits > bits[column])
    start: IntArray = np.where(model.allowed, distance[None, :], np.inf).argmin(axis=1)
    return start.astype(np.int64)


@dataclass(frozen=True, kw_only=True)
class GreedySolver:
    """Bidirectional greedy search with a final swap pass (see the module docstring).

    The constructor only stores parameters; work happens in :meth:`solve`.

    Args:
        start_bits: bits of the uniform starting map; ``None`` tries the uniform maps
            either side of the budget (the most bits that fit, and the next up) and
            keeps the better answer.
        swaps: run the swap pass (single and paired moves) after the climb.
        swap_candidates: up moves paired with every freeing move in the swap pass: this
            many saving the most loss, and this many saving the most per budget used.
        max_swaps: cap on moves taken by the swap pass.
        gap_tol: the exchanges stop once the loss is provably within this relative gap
            of the optimum (of the Lagrangian bound); 0 to run them until none helps.
        polish_all_max_units: up to this many units every start's climb gets the swaps
            and exchanges; above it only the best climb does.
    """

    name: ClassVar[str] = "greedy"
    start_bits: int | None = None
    swaps: bool = True
    swap_candidates: int = 32
    max_swaps: int = 100_000
    gap_tol: float = 1e-6
    polish_all_max_units: int = 500

    def __post_init__(self) -> None:
        if not 0.0 <= self.gap_tol < 1.0:
            raise ValueError(f"gap_tol must be in [0, 1), got {self.gap_tol!r}")
        if self.start_bits is not None and (
            isinstance(self.start_bits, bool) or not isinstance(self.start_bits, int)
        ):
            raise ValueError(f"start_bits must be an int or None, got {self.start_bits!r}")
        if not (isinstance(self.swap_candidates, int) and self.swap_candidates >= 1):
            raise ValueError(f"swap_candidates must be an int >= 1, got {self.swap_candidates!r}")
        if not (isinstance(self.polish_all_max_units, int) and self.polish_all_max_units >= 0):
            raise ValueError("polish_all_max_units must be an int >= 0, got "
                             f"{self.polish_all_max_units!r}")
        if not (isinstance(self.max_swaps, int) and self.max_swaps >= 0):
            raise ValueError(f"max_swaps must be an int >= 0, got {self.max_swaps!r}")

    def solve(self, problem: AllocationProblem, *, seed: int = 0) -> Front:
        """A near-optimal allocation within all budgets.

        Args:
            problem: the allocation problem.
            seed: unused (the search is deterministic); accepted for the solver protocol.

        Returns:
            A front of one solution: status ``"optimal"`` when it meets the Lagrangian
            lower bound, else ``"feasible"`` with ``gap`` the proved relative distance to
            that bound (an upper bound on the distance to the optimum).

        Raises:
            InfeasibleBudget: a budget is below its smallest achievable value, the budgets
                provably cannot be met together, or the greedy found no allocation that
                meets them together (the ILP solver decides that case exactly).
            ValueError: ``start_bits`` is not one of the problem's bits.
        """
        if self.start_bits is not None and self.start_bits not in problem.bits:
            raise ValueError(
                f"start_bits={self.start_bits} is not one of the bits options {problem.bits}"
            )
        clock = time.perf_counter()
        problem.check_budgets()
        # shared charges (scales of slices) counted in full: every sum it sees is one
        exact, problem = problem, conservative(problem, self.name)
        model = normalise(problem)
        bound, _, prices = lagrangian(model)
        # Budgets exactly at a reachable total are common (a limit set to a uniform map's
        # cost), and normalised sums are off by rounding: search with limits a hair
        # loose, check exactly, and search again a hair tight if an answer slipped over.
        best, slipped = self._search(problem, model, prices.tolist(), bound, margin=-1e-9)
        if slipped or best is None:
            strict, _ = self._search(problem, model, prices.tolist(), bound, margin=1e-9)
            if strict is not None and (best is None or strict[0] < best[0]):
                best = strict
        if best is None:
            raise InfeasibleBudget(
                f"greedy found no allocation meeting all of {dict(problem.budgets)} together; "
                "they may be jointly infeasible: the ILP solver ('ilp') decides exactly",
                {name: problem.min_cost(name) for name in problem.budgets},
            )
        choice = best[1]
        solution = exact.solution(problem.expand(choice))
        rows = np.arange(problem.n_units)
        loss = math.fsum(model.loss[rows, choice].tolist())
        allowance = 1e-9 * float(np.abs(np.where(model.allowed, model.loss, 0)).max(1).sum())
        status, gap = "feasible", None
        bound = exact_bound(exact, model, bound)
        if loss - bound <= allowance:
            status, gap = "optimal", 0.0
        elif loss != 0:
            gap = (loss - bound) / abs(loss)
        elapsed = time.perf_counter() - clock
        logger.info("greedy: %s, loss %.6g, gap %s, %d units, %.3fs", status, solution.loss,
                    gap, problem.n_units, elapsed)
        return Front.build([solution], objectives=list(problem.budgets), solver=self.name,
                           status=status, time_s=elapsed, gap=gap)

    def _search(self, problem: AllocationProblem, model: Model, prices: list[float],
                bound: float, *, margin: float
                ) -> tuple[tuple[float, IntArray] | None, bool]:
        """The best feasible answer over the starts (or None), and whether any answer
        was dropped for slipping over a budget by rounding."""
        limits = [c * (1.0 - margin) + (1e-12 if margin < 0 else 0.0) for c in model.capacity]
        if not model.shares:
            masked = np.where(model.allowed, model.loss, np.inf)
            least: IntArray = masked.argmin(axis=1).astype(np.int64)
            return _better(problem, model, None, least)
        weight = budget_weight(model.allowed, model.shares, prices)
        candidates = []
        for start in self._starts(problem, model, limits):
            choice = descend(start, model.loss, model.allowed, model.shares, limits, prices)
            if choice is None:
                choice = reduce_excess(start, model.loss, model.allowed, model.shares, limits)
            if choice is not None:
                candidates.append(upgrade(choice, model.loss, model.allowed, weight,
                                          model.shares, limits))
        # The Lagrangian choice made feasible (the ILP's start) is a third start: it
        # also covers budgets pulling apart, where descending from uniform can fail.
        lagrange = lagrangian_greedy(model, np.asarray(prices))
        if lagrange is not None:
            candidates.append(upgrade(lagrange, model.loss, model.allowed, weight,
                                      model.shares, limits))
        best: tuple[float, IntArray] | None = None
        slipped = False
        for choice in candidates:
            best, dropped = _better(problem, model, best, choice)
            slipped |= dropped
        if best is not None and self.swaps and self.max_swaps:
            # Each start's climb is polished on small models (different starts end in
            # different local optima); on large ones only the best climb, as polishing
            # the others costs many times the climbs and gains nothing measurable.
            polish = candidates if problem.n_units <= self.polish_all_max_units else [best[1]]
            for choice in polish:
                best, dropped = _better(problem, model, best, self._polish(
                    choice, model, weight, limits, prices, bound))
                slipped |= dropped
        return best, slipped

    def _starts(self, problem: AllocationProblem, model: Model, limits: list[float]
                ) -> list[IntArray]:
        order = np.argsort(problem.bits)
        if self.start_bits is not None:
            return [uniform_start(problem, model, problem.bits.index(self.start_bits))]
        maps = [uniform_start(problem, model, int(j)) for j in order]
        fits = [all(u <= c for u, c in zip(used_shares(model.shares, m), limits)) for m in maps]
        if not any(fits):
            return [maps[0]]
        top = max(i for i, ok in enumerate(fits) if ok)
        return maps[top:top + 2]

    def _polish(self, choice: IntArray, model: Model, weight: np.ndarray,
                limits: list[float], prices: list[float], bound: float) -> IntArray:
        """Swaps, then exchanges, unless the climb is already provably within
        ``gap_tol`` of the optimum (common on large models: the swaps cost more than
        the climb there)."""
        loss = float(model.loss[np.arange(len(choice)), choice].sum())
        if loss - bound <= self.gap_tol * abs(loss):
            return choice
        choice, _ = improve(choice, model.loss, model.allowed, model.shares, limits,
                            candidates=self.swap_candidates, max_rounds=self.max_swaps)
        return self._exchange(choice, model, weight, limits, prices, bound)

    def _exchange(self, choice: IntArray, model: Model, weight: np.ndarray,
                  limits: list[float], prices: list[float], bound: float) -> IntArray:
        """Exchanges of any number of units (one up, greedy downgrades to pay for it),
        each followed by the swap pass, until none helps or the gap is proved small."""
        rows = np.arange(len(choice))
        taken = 0
        while taken < self.max_swaps:
            loss = float(model.loss[rows, choice].sum())
            if loss - bound <= self.gap_tol * abs(loss):
                break
            ejected = eject(choice, model.loss, model.allowed, model.shares, limits, prices,
                            candidates=self.swap_candidates)
            if ejected is None:  # the mirror: one unit down, any number up into the room
                ejected = eject_down(choice, model.loss, model.allowed, weight, model.shares,
                                     limits, candidates=self.swap_candidates)
            if ejected is None:
                break
            choice, count = improve(ejected, model.loss, model.allowed, model.shares, limits,
                                    candidates=self.swap_candidates,
                                    max_rounds=self.max_swaps - taken)
            taken += count + 1
        logger.debug("greedy: %d moves after the exchanges began", taken)
        return choice


def _better(problem: AllocationProblem, model: Model, best: tuple[float, IntArray] | None,
            choice: IntArray) -> tuple[tuple[float, IntArray] | None, bool]:
    """The lower-loss of ``best`` and ``choice`` (``choice`` only if feasible), and
    whether ``choice`` was dropped as infeasible."""
    if not problem.is_feasible(problem.expand(choice)):
        return best, True
    loss = math.fsum(model.loss[np.arange(len(choice)), choice].tolist())
    if best is None or loss < best[0]:
        return (loss, choice), False
    return best, False
