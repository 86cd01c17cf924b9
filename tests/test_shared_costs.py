"""Shared charges (SharedCost): paid once per distinct option of a group of layers."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from problem_instances import brute_force, random_budgeted

from mpsearch.errors import InfeasibleBudget
from mpsearch.problem import AllocationProblem, SharedCost
from mpsearch.solvers import GreedySolver, ILPSolver, NSGA2Solver
from mpsearch.solvers import _reduce as reduce_module


def _two_parts(limit: float) -> AllocationProblem:
    """A layer cut into two parts of 100 weights each, a third layer of 100, bits 2/4:
    weight bytes in the table, 10 bytes of scales per width the two parts use."""
    layers = ["fc.part0", "fc.part1", "head"]
    bits = (2, 4)
    size = np.array([[25.0, 50.0], [25.0, 50.0], [35.0, 60.0]])  # head: scales inside
    sensitivity = np.array([[4.0, 0.0], [3.0, 0.0], [1.0, 0.0]])
    return AllocationProblem(layers, bits, sensitivity, {"size_bytes": size},
                             {"size_bytes": limit},
                             shared=[SharedCost("size_bytes", ("fc.part0", "fc.part1"),
                                                (10.0, 10.0))])


def test_charge_paid_once_per_distinct_width() -> None:
    problem = _two_parts(1e9)
    assert problem.evaluate(np.array([1, 1, 1]))["size_bytes"] == 50 + 50 + 60 + 10
    assert problem.evaluate(np.array([0, 1, 1]))["size_bytes"] == 25 + 50 + 60 + 20
    assert problem.min_cost("size_bytes") == 25 + 25 + 35 + 10
    assert problem.max_cost("size_bytes") == 50 + 50 + 60 + 10
    folded = problem.conservative()
    assert not folded.shared
    assert folded.evaluate(np.array([1, 1, 1]))["size_bytes"] == 50 + 50 + 60 + 20
    assert "shared=1" in repr(problem)


def test_ilp_uses_what_the_exact_charge_leaves() -> None:
    # 170 bytes: both parts at 4 bits with one set of scales (160 + 10), the head at 4
    # too. Charged per part (180) that does not fit; the head would have to drop instead.
    problem = _two_parts(170.0)
    front = ILPSolver().solve(problem)
    assert front.status == "optimal"
    assert front.best.bits == {"fc.part0": 4, "fc.part1": 4, "head": 4}
    assert front.best.costs["size_bytes"] == 170.0
    assert front.best.loss == 0.0
    # the heuristic solvers search the conservative problem: a feasible, worse answer
    for solver in (GreedySolver(), NSGA2Solver(pop_size=8, n_gen=5)):
        best = solver.solve(problem).best
        assert problem.is_feasible(best.choice)
        assert best.loss > 0.0


def test_heuristic_solvers_say_when_only_the_exact_count_fits() -> None:
    problem = _two_parts(95.0)  # all at 2 bits: 85 + 10; charged per part 105
    assert ILPSolver().solve(problem).best.costs["size_bytes"] == 95.0
    with pytest.raises(InfeasibleBudget, match="counts them exactly"):
        GreedySolver().solve(problem)


def test_shared_cost_validation() -> None:
    def problem(shared: SharedCost) -> AllocationProblem:
        return AllocationProblem(["a", "b"], (2, 4), np.zeros((2, 2)),
                                 {"size_bytes": np.ones((2, 2))}, {}, shared=[shared])

    with pytest.raises(ValueError, match="one of the costs"):
        problem(SharedCost("bops", ("a", "b"), (1.0, 1.0)))
    with pytest.raises(ValueError, match="unknown or repeated"):
        problem(SharedCost("size_bytes", ("a", "c"), (1.0, 1.0)))
    with pytest.raises(ValueError, match="one finite charge"):
        problem(SharedCost("size_bytes", ("a", "b"), (1.0,)))
    with pytest.raises(ValueError, match=">= 0"):
        problem(SharedCost("size_bytes", ("a", "b"), (1.0, -1.0)))


def test_smallest_cost_when_the_cheapest_options_differ() -> None:
    """A pinned part, or a width without scales (16 bits), makes the cheapest choice use
    one width less than each part's cheapest option alone: the minimum counts that."""
    sensitivity = np.array([[1.0, 0.0], [1.0, 0.0]])
    pinned = AllocationProblem(["p0", "p1"], (4, 8), sensitivity,
                               {"size_bytes": np.array([[10.0, 20.0], [10.0, 20.0]])},
                               {"size_bytes": 56.0}, pinned={"p0": 8},
                               shared=[SharedCost("size_bytes", ("p0", "p1"), (15.0, 15.0))])
    assert pinned.min_cost("size_bytes") == 55.0  # both at 8: one set of scales
    front = ILPSolver().solve(pinned)
    assert front.status == "optimal" and front.best.bits == {"p0": 8, "p1": 8}
    wide = AllocationProblem(["p0", "p1"], (4, 16), sensitivity,
                             {"size_bytes": np.array([[10.0, 40.0], [10.0, 12.0]])},
                             {"size_bytes": 36.0},
                             shared=[SharedCost("size_bytes", ("p0", "p1"), (15.0, 0.0))])
    assert wide.min_cost("size_bytes") == 35.0
    assert wide.max_cost("size_bytes") == 52.0
    sweep = ILPSolver().sweep(wide, "size_bytes", n_points=3)
    assert min(s.costs["size_bytes"] for s in sweep.solutions) == 35.0


def test_heuristic_solvers_report_exact_costs_and_valid_gaps() -> None:
    problem = _two_parts(1e9).with_budgets({})
    for solver in (GreedySolver(), NSGA2Solver(pop_size=8, n_gen=5)):
        best = solver.solve(problem).best
        assert best.costs["size_bytes"] == problem.evaluate(best.choice)["size_bytes"] == 170.0
    front = GreedySolver().solve(_two_parts(170.0))
    # the gap is measured from a bound on the exact problem: the exact optimum is 0 loss
    assert front.gap is not None and front.gap > 0 and front.status == "feasible"


def _with_shared(seed: int) -> AllocationProblem:
    problem, _ = random_budgeted(seed)
    rng = np.random.default_rng(1000 + seed)
    shared = []
    for name in problem.budgets:
        if problem.n_layers < 2 or rng.random() < 0.3:
            continue
        size = int(rng.integers(2, problem.n_layers + 1))
        members = sorted(rng.choice(problem.n_layers, size, replace=False).tolist())
        scale = float(np.abs(problem.costs[name]).max())
        shared.append(SharedCost(name, tuple(problem.layers[i] for i in members),
                                 tuple((rng.random(problem.n_options) * scale).tolist())))
    return AllocationProblem(problem.layers, problem.bits, problem.sensitivity, problem.costs,
                             problem.budgets, ties=problem.ties, pinned=problem.pinned,
                             allowed=problem.allowed, shared=shared)


def _disjoint(seed: int) -> AllocationProblem:
    """Like :func:`_with_shared`, with groups that share no unit (as slices' scales are)
    and budgets anywhere from the smallest achievable cost up: :meth:`min_cost` is exact
    there, so no feasible budget may be refused."""
    problem = _with_shared(seed)
    seen: set[int] = set()
    kept = []
    for part in problem.shared:
        units = {int(problem.unit_of[problem.layers.index(n)]) for n in part.layers}
        if not units & seen:
            kept.append(part)
            seen |= units
    problem = AllocationProblem(problem.layers, problem.bits, problem.sensitivity,
                                problem.costs, {}, ties=problem.ties, pinned=problem.pinned,
                                allowed=problem.allowed, shared=kept)
    rng = np.random.default_rng(2000 + seed)
    budgets = {}
    for name in _with_shared(seed).budgets:
        low, high = problem.min_cost(name), problem.max_cost(name)
        budgets[name] = low + float(rng.random()) ** 3 * (high - low)
    return problem.with_budgets(budgets)


@pytest.mark.parametrize("seed", range(60))
def test_tight_budgets_with_disjoint_shared_groups_match_brute_force(seed: int) -> None:
    problem = _disjoint(seed)
    for name in problem.budgets:  # the minimum is achieved by some choice
        options = [np.flatnonzero(row) for row in problem.unit_allowed]
        costs = [problem.evaluate(problem.expand(np.array(c)))[name]
                 for c in itertools.product(*options)]
        assert problem.min_cost(name) == pytest.approx(min(costs), rel=1e-12)
    _check_optimum(problem)


@pytest.mark.parametrize("reduced", [True, False])
@pytest.mark.parametrize("seed", range(60))
def test_ilp_optimum_with_shared_charges_matches_brute_force(
        seed: int, reduced: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reduce_module, "REDUCE", reduced)
    _check_optimum(_with_shared(seed))


def _check_optimum(problem: AllocationProblem) -> None:
    """The ILP's answer is the brute-force optimum, exactly costed, or both say none."""
    expected = brute_force(problem)
    if expected is None:
        with pytest.raises(InfeasibleBudget):
            ILPSolver().solve(problem)
        return
    front = ILPSolver().solve(problem)
    assert front.status == "optimal"
    assert problem.is_feasible(front.best.choice)
    assert front.best.loss == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert front.best.costs == {k: v for k, v in problem.evaluate(front.best.choice).items()
                                if k != "loss"}


def _sliced_layers(n_layers: int, n_parts: int, limit_share: float) -> AllocationProblem:
    """Layers cut into parts of equal size that pay their rows' scales once per width
    (as ``costs.shared_scales`` charges a Linear cut by input features), losses 4^-b."""
    rng = np.random.default_rng(7)
    bits = (2, 4, 8)
    names, loss, size, shared = [], [], [], []
    for layer in range(n_layers):
        parts = [f"l{layer}.parts.{k}" for k in range(n_parts)]
        names += parts
        for _ in parts:
            s = float(rng.lognormal(0.0, 1.5))
            loss.append([s * 4.0 ** (2 - b) for b in bits])
            size.append([64.0 * b / 8 for b in bits])
        shared.append(SharedCost("size_bytes", tuple(parts), (16.0, 16.0, 16.0)))
    at4 = float(np.array(size)[:, 1].sum()) + 16.0 * n_layers
    return AllocationProblem(names, bits, np.array(loss), {"size_bytes": np.array(size)},
                             {"size_bytes": limit_share * at4}, shared=shared)


def test_ilp_starts_from_charges_paid_once_per_width() -> None:
    # The conservative start pays every part its layer's scales: half a 4-bit part's
    # bytes here. The start from the tables under budgets lowered by the charges its own
    # answer pays meets the exact budget with far less loss.
    problem = _sliced_layers(2, 4, 1.0)
    rows = np.arange(problem.n_units)
    model, start = reduce_module.reduce(problem)
    conservative = reduce_module._conservative_start(problem)
    lowered = reduce_module._lowered_start(problem)
    assert conservative is not None and lowered is not None
    assert problem.is_feasible(problem.expand(lowered))
    assert problem.evaluate(problem.expand(lowered))["loss"] < 0.5 * problem.evaluate(
        problem.expand(conservative))["loss"]
    assert start.choice is not None
    assert (start.choice == lowered).all() or problem.evaluate(
        problem.expand(start.choice))["loss"] <= problem.evaluate(problem.expand(lowered))["loss"]
    assert model.loss[rows, start.choice].sum() == pytest.approx(start.loss)
    _check_optimum(problem)


@pytest.mark.parametrize("share", [0.6, 0.8, 1.0, 1.2])
def test_sliced_layers_optimum_under_shared_scales(share: float) -> None:
    _check_optimum(_sliced_layers(2, 4, share))
