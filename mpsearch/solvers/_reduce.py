"""Shrinking an allocation problem before CBC sees it, and the Lagrangian greedy start.

Shared by the ILP (which needs the bound and the start) and the heuristic solvers (which
reuse the normalisation, the prices and the hull moves). Two reductions keep the optimum:

1. options that alone break a budget, and options another option of the same unit
   beats on loss and every budgeted cost, are dropped (:func:`normalise`);
2. a Lagrangian bound (budgets priced into the loss) and a greedy allocation give a
   lower and an upper bound; an option whose Lagrangian reduced cost lifts the bound
   above the greedy loss cannot be in an optimum and is dropped too (reduced-cost
   fixing, :func:`reduce`). With one budget this typically leaves a few percent of the
   units free.

Budget rows are shifted by each unit's cheapest option and divided by the remaining
slack, so coefficients lie in [0, 1] whatever the cost's units (BOPs reach 1e12).

Shared charges (:class:`~mpsearch.problem.SharedCost`) are left out of the tables, which
then bound each cost from below: dropping options that alone break a budget stays exact,
the Lagrangian bound stays a bound, and the greedy start is taken from the conservative
problem, so it meets the real budgets. On the units of a shared group an option beats
another only with its charges counted in full (taking it may bring a charge of its own;
leaving the other never costs more). The ILP adds the charges back exactly
(:attr:`Model.shared`).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np

from mpsearch.errors import InfeasibleBudget
from mpsearch.problem import AllocationProblem, BoolArray, FloatArray, IntArray
from mpsearch.solvers._moves import budget_weight, upgrade

__all__ = [
    "REDUCE",
    "Model",
    "Start",
    "conservative",
    "dominated",
    "exact_bound",
    "joint_infeasible",
    "lagrangian",
    "lagrangian_greedy",
    "normalise",
    "reduce",
]

logger = logging.getLogger(__name__)

REDUCE = True  # tests switch the reductions off to check the bare model against brute force


def joint_infeasible(problem: AllocationProblem) -> InfeasibleBudget:
    smallest = {name: problem.min_cost(name) for name in problem.budgets}
    listed = ", ".join(
        f"{name}={limit:.6g} (smallest achievable alone {smallest[name]:.6g})"
        for name, limit in problem.budgets.items()
    )
    return InfeasibleBudget(
        f"the budgets cannot all be met together: {listed}; relax at least one", smallest
    )


def conservative(problem: AllocationProblem, solver: str) -> AllocationProblem:
    """``problem`` with its shared charges counted in full (what the heuristic solvers
    search); raises if that no longer meets the budgets."""
    folded = problem.conservative()
    if folded is not problem:
        try:
            folded.check_budgets()
        except InfeasibleBudget as exc:
            raise InfeasibleBudget(
                f"{solver} charges every layer of a shared group in full (the scales of a "
                f"Linear cut by input features, once per part) and then cannot meet the "
                f"budgets ({exc}); the ILP solver ('ilp') counts them exactly",
                exc.smallest) from None
    return folded


def exact_bound(exact: AllocationProblem, model: Model, bound: float) -> float:
    """A Lagrangian lower bound on ``exact``'s optimum in ``model``'s loss units, where
    ``model`` (and its ``bound``) are the conservative problem's: with shared charges, the
    bound of the tables without them (a lower bound on every cost)."""
    if not exact.shared:
        return bound
    lower = normalise(exact)
    return lagrangian(lower)[0] * lower.loss_scale / model.loss_scale


@dataclass
class Model:
    """The problem in unit space, normalised: loss scaled to max |coefficient| 1, each
    budget row shifted by the unit's cheapest option and divided by the slack."""

    allowed: BoolArray  # U x B, options still in play
    loss: FloatArray  # U x B, sensitivity / loss_scale
    loss_scale: float
    shares: list[FloatArray]  # per budget, U x B, >= 0 on allowed options
    capacity: list[float]  # per budget: 1.0, or 0.0 when the budget sits at its minimum
    slack: list[float]  # per budget, in cost units (for tightening)
    resolution: float = 1e-10  # loss differences CBC may ignore (normalised units)
    # per budget: (units of a shared group, charge per option / slack), paid once per
    # distinct option the units take
    shared: list[list[tuple[IntArray, FloatArray]]] = field(default_factory=list)


def dominated(allowed: BoolArray, criteria: FloatArray,
              handicap: FloatArray | None = None) -> BoolArray:
    """Options another open option of the same unit weakly beats on every criterion
    (``criteria`` is ``U x B x C``); exact ties go to the lower option index.
    ``handicap`` (``U x B x C``, >= 0) is added to an option's criteria where it is the
    one beating: what taking it may cost beyond its row (a shared charge)."""
    ahead = criteria if handicap is None else criteria + handicap
    better, worse = ahead[:, :, None, :], criteria[:, None, :, :]
    weakly = (better <= worse).all(axis=-1)
    strictly = (better < worse).any(axis=-1)
    earlier = np.triu(np.ones((allowed.shape[1],) * 2, dtype=bool), k=1)
    beats = weakly & (strictly | earlier) & allowed[:, :, None]
    result: BoolArray = beats.any(axis=1) & allowed
    return result


def normalise(problem: AllocationProblem) -> Model:
    allowed = problem.unit_allowed.copy()
    sensitivity = problem.unit_table(problem.sensitivity)
    tables = [problem.unit_table(problem.costs[k]) for k in problem.budgets]
    limits = list(problem.budgets.values())
    criteria = np.stack([sensitivity, *tables], axis=-1)
    groups = [[(np.unique(problem.unit_of[members]), charge)
               for members, charge in problem.shared_charges(name)]
              for name in problem.budgets]
    # a unit of a shared group switching to an option may bring that option's charge
    # (no other unit of the group took it) and may save nothing: charged in full
    handicap = np.zeros_like(criteria)
    for k, per_budget in enumerate(groups):
        for units, charge in per_budget:
            handicap[units, :, 1 + k] += charge
    # Rounding allowance: keeping an option that is infeasible by a hair costs nothing
    # (CBC and the exact check reject it); dropping a feasible one costs optimality.
    tolerance = [
        1e-9 * (abs(limit) + float(np.abs(table).max(axis=1).sum())) + 1e-300
        for table, limit in zip(tables, limits)
    ]
    deltas, slack = [np.zeros_like(t) for t in tables], [0.0] * len(tables)
    for _ in range(50 if REDUCE else 1):
        before = int(allowed.sum())
        for k, (table, limit) in enumerate(zip(tables, limits)):
            cheapest = np.where(allowed, table, np.inf).min(axis=1)
            slack[k] = limit - math.fsum(cheapest.tolist())
            if slack[k] < -tolerance[k]:  # pruning for other budgets raised this minimum
                raise joint_infeasible(problem)
            deltas[k] = table - cheapest[:, None]
            if REDUCE:
                allowed &= ~(deltas[k] > max(slack[k], 0.0) + tolerance[k])
        if REDUCE:
            allowed &= ~dominated(allowed, criteria, handicap)
        if int(allowed.sum()) == before:
            break
    loss_scale = float(np.abs(sensitivity[allowed]).max()) or 1.0
    denominators = [max(s, tol) for s, tol in zip(slack, tolerance)]
    return Model(
        allowed=allowed,
        loss=sensitivity / loss_scale,
        loss_scale=loss_scale,
        shares=[d / den for d, den in zip(deltas, denominators)],
        capacity=[max(s, 0.0) / den for s, den in zip(slack, denominators)],
        slack=slack,
        shared=[[(units, charge / den) for units, charge in per_budget]
                for per_budget, den in zip(groups, denominators)],
    )


def lagrangian(model: Model) -> tuple[float, FloatArray, FloatArray]:
    """Lower bound, reduced costs and budget prices, the prices by coordinate ascent.

    Any prices give a valid bound; exact maximisation is not needed.
    """
    rows = np.arange(model.allowed.shape[0])
    base = np.where(model.allowed, model.loss, np.inf)
    prices = np.zeros(len(model.shares))

    def priced(k: int, price: float, rest: FloatArray) -> tuple[float, float]:
        value = rest + price * model.shares[k]
        pick = value.argmin(axis=1)
        return float(value[rows, pick].sum()), float(model.shares[k][rows, pick].sum())

    def bound_at(values: FloatArray) -> float:
        value = base + sum((p * s for p, s in zip(values, model.shares)), np.zeros_like(base))
        return float(value.min(axis=1).sum()) - float(np.dot(values, model.capacity))

    previous = -np.inf
    for _ in range(1 if len(prices) == 1 else 200):
        for k, capacity in enumerate(model.capacity):
            rest = base + sum(
                (p * s for j, (p, s) in enumerate(zip(prices, model.shares)) if j != k),
                np.zeros_like(base),
            )
            if priced(k, 0.0, rest)[1] <= capacity:
                prices[k] = 0.0
                continue
            low, high = 0.0, 1.0
            while priced(k, high, rest)[1] > capacity and high < 1e30:
                low, high = high, 4.0 * high
            for _ in range(40):  # the best price is where the used share crosses capacity
                middle = 0.5 * (low + high)
                if priced(k, middle, rest)[1] > capacity:
                    low = middle
                else:
                    high = middle
            prices[k] = max((low, high), key=lambda p: priced(k, p, rest)[0] - p * capacity)
        current = bound_at(prices)
        if current - previous <= 1e-9 * abs(current):
            break
        previous = current
    value = base + sum((p * s for p, s in zip(prices, model.shares)), np.zeros_like(base))
    least = value.min(axis=1)
    bound = math.fsum(least.tolist()) - float(np.dot(prices, model.capacity))
    reduced_costs: FloatArray = value - least[:, None]
    return bound, reduced_costs, prices


def lagrangian_greedy(model: Model, prices: FloatArray) -> IntArray | None:
    """A feasible allocation: the Lagrangian choice made feasible, then greedy upgrades
    along each unit's loss/price hull. ``None`` if even the cheapest is over budget."""
    allowed, loss, shares = model.allowed, model.loss, model.shares
    rows = np.arange(allowed.shape[0])
    # Budget use at the Lagrangian prices.
    weight = budget_weight(allowed, shares, prices.tolist())
    masked = np.where(allowed, loss, np.inf)
    limits = [c * (1.0 - 1e-11) for c in model.capacity]

    def pick(scale: float) -> IntArray:
        result: IntArray = (masked + scale * weight).argmin(axis=1)
        return result

    def fits(choice: IntArray) -> bool:
        return all(s[rows, choice].sum() <= c for s, c in zip(shares, limits))

    low, high = 0.0, 1.0
    while not fits(pick(high)):
        low, high = high, 4.0 * high
        if high > 1e30:
            return None
    for _ in range(40):
        middle = 0.5 * (low + high)
        low, high = (low, middle) if fits(pick(middle)) else (middle, high)
    return upgrade(pick(high).astype(np.int64), loss, allowed, weight, shares, limits)


def _conservative_start(problem: AllocationProblem) -> IntArray | None:
    """The greedy start of the problem with every shared charge paid by every member (it
    meets the exact budgets, but overpays: by a third of a 4-bit slice's bytes where a
    layer cut in 16 pays its rows' scales in every part)."""
    try:
        safe = normalise(problem.conservative())
    except InfeasibleBudget:  # only the shared charges counted exactly fit
        return None
    choice = lagrangian_greedy(safe, lagrangian(safe)[2])
    return choice if choice is not None and problem.is_feasible(problem.expand(choice)) else None


#: rounds of :func:`_lowered_start`
_LOWERING_ROUNDS = 8


def _lowered_start(problem: AllocationProblem) -> IntArray | None:
    """The greedy start of the tables without the shared charges, under budgets lowered
    by the charges its own answer pays, until that answer meets the exact budgets: a
    group pays its charge once per option its members take, a few times, not once per
    member as the conservative problem has it. None if no round fits."""
    bare = AllocationProblem(problem.layers, problem.bits, problem.sensitivity, problem.costs,
                             problem.budgets, ties=problem.ties, pinned=problem.pinned,
                             allowed=problem.allowed)
    limits = dict(problem.budgets)
    for _ in range(_LOWERING_ROUNDS):
        try:
            model = normalise(bare.with_budgets(limits))
        except InfeasibleBudget:
            return None
        choice = lagrangian_greedy(model, lagrangian(model)[2])
        if choice is None:
            return None
        exact = problem.evaluate(problem.expand(choice))
        if problem.is_feasible(problem.expand(choice)):
            return choice
        tables = bare.evaluate(bare.expand(choice))
        # what this answer pays in charges comes off the budget the tables get
        limits = {name: min(limits[name], limit - (exact[name] - tables[name]))
                  for name, limit in problem.budgets.items()}
    return None


@dataclass(frozen=True)
class Start:
    """The greedy allocation (if any) and the Lagrangian bound, in normalised units."""

    choice: IntArray | None
    loss: float  # inf without a choice
    bound: float
    allowance: float  # rounding allowance on loss sums


def reduce(problem: AllocationProblem) -> tuple[Model, Start]:
    """Normalise, bound, find a greedy start, and fix options by reduced cost."""
    clock = time.perf_counter()
    model = normalise(problem)
    bound, reduced_costs, prices = lagrangian(model)
    rows = np.arange(problem.n_units)
    if any(model.shared):  # the tables are lower bounds: starts that meet the exact budgets
        starts = [_conservative_start(problem), _lowered_start(problem)]
        feasible = [c for c in starts if c is not None]
        choice = min(feasible, key=lambda c: math.fsum(model.loss[rows, c].tolist()),
                     default=None)
    else:
        choice = lagrangian_greedy(model, prices)
    if choice is not None and not problem.is_feasible(problem.expand(choice)):
        choice = None
    allowance = 1e-9 * float(np.abs(np.where(model.allowed, model.loss, 0)).max(1).sum())
    loss = math.inf if choice is None else math.fsum(model.loss[rows, choice].tolist())
    # CBC by default ignores improvements under 1e-5 (absolute): make it relative and tiny.
    magnitude = max(abs(bound), abs(loss) if choice is not None else 0.0)
    model.resolution = 1e-10 * (magnitude or 1.0)
    if choice is not None and REDUCE:
        # bound + reduced cost is a lower bound on any allocation using that option.
        model.allowed &= bound + reduced_costs <= loss + allowance
        model.allowed[rows, choice] = True
    logger.debug(
        "ilp: %d units, %d of %d options left after reduction (%.3fs); bound %.6g, greedy %.6g",
        problem.n_units,
        int(model.allowed.sum()),
        int(problem.unit_allowed.sum()),
        time.perf_counter() - clock,
        bound * model.loss_scale,
        loss * model.loss_scale,
    )
    if choice is not None and loss > bound:
        # CBC's tolerances are absolute (1e-7 to 1e-9 of the objective), while the losses
        # that decide between allocations near the optimum differ by ~1e-8 of it. Counted
        # from the greedy start and in units of its gap to the bound they differ by O(1):
        # on a 5,000-layer model CBC then proves the optimum in seconds instead of
        # stalling for minutes at a gap of 8e-5.
        scale = max(loss - bound, 1e-6 * magnitude)
        shift = model.loss[rows, choice]
        model.loss = (model.loss - shift[:, None]) / scale
        model.loss_scale *= scale
        model.resolution /= scale
        bound, allowance = (bound - loss) / scale, allowance / scale
        loss = math.fsum(model.loss[rows, choice].tolist())
    return model, Start(choice, loss, bound, allowance)
