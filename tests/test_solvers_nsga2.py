"""NSGA2Solver: feasible, non-dominated fronts that reach the exact ones."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pytest
from problem_instances import brute_force, model_like, random_budgeted

from mpsearch import AllocationProblem, ILPSolver, InfeasibleBudget, NSGA2Solver
from mpsearch.front import Front
from mpsearch.solvers import SOLVERS, solve
from mpsearch.solvers.quality import front_points, hypervolume, lp_front
from mpsearch.solvers.synthetic import synthetic_problem

FAST = NSGA2Solver(pop_size=40, n_gen=40, ilp_points=2, time_limit_s=None, patience=None)


def exact_front(problem: AllocationProblem) -> np.ndarray:
    """Objective vectors (loss, budgeted costs) of every Pareto-optimal feasible choice,
    by enumeration (numpy sums, then the exact check on the non-dominated ones)."""
    from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

    options = [np.flatnonzero(row) for row in problem.unit_allowed]
    choices = np.array(list(itertools.product(*options)), dtype=np.int64)[:, problem.unit_of]
    rows = np.arange(problem.n_layers)
    values = np.column_stack([problem.sensitivity[rows, choices].sum(axis=1)]
                             + [problem.costs[k][rows, choices].sum(axis=1)
                                for k in problem.budgets])
    near = (values[:, 1:] <= np.array(list(problem.budgets.values())) * (1 + 1e-9)).all(axis=1)
    choices, values = choices[near], values[near]
    exact = np.array([problem.is_feasible(c) for c in choices], dtype=bool)
    choices = choices[exact]
    values = np.array([[v["loss"], *(v[k] for k in problem.budgets)]
                       for v in map(problem.evaluate, choices)]).reshape(-1, values.shape[1])
    front = NonDominatedSorting().do(values, only_non_dominated_front=True)
    return np.unique(values[front], axis=0)


def objectives(front: Front, problem: AllocationProblem) -> np.ndarray:
    return np.array([[s.loss, *(s.costs[k] for k in problem.budgets)] for s in front.solutions])


def _check_front(front: Front, problem: AllocationProblem) -> np.ndarray:
    assert front.solver == "nsga2" and front.status == "feasible" and len(front) >= 1
    for solution in front.solutions:
        assert problem.is_feasible(solution.choice)
        assert problem.evaluate(solution.choice) == {"loss": solution.loss, **solution.costs}
    points = objectives(front, problem)
    for p in points:  # no returned point dominates another
        assert not ((points <= p).all(axis=1) & (points < p).any(axis=1)).any()
    first = next(iter(problem.budgets))
    assert [s.costs[first] for s in front.solutions] == sorted(
        s.costs[first] for s in front.solutions)
    return points


def _coverage(front: Front, problem: AllocationProblem, exact: np.ndarray) -> tuple[int, int]:
    """(returned points that are Pareto-optimal among all feasible allocations, exact
    Pareto points found)."""
    points = objectives(front, problem)
    optimal = sum(
        not ((exact <= p).all(axis=1) & (exact < p - 1e-12 * np.abs(p)).any(axis=1)).any()
        for p in points)
    found = {tuple(np.round(p, 9)) for p in points}
    hits = sum(tuple(np.round(p, 9)) in found for p in exact)
    return optimal, hits


@pytest.mark.parametrize("seed", range(6))
def test_tiny_two_objective_fronts_near_exact(seed: int) -> None:
    rng = np.random.default_rng(seed)
    problem = synthetic_problem(int(rng.integers(3, 7)), levels={"avg_bits": rng.uniform(0.2, 1)},
                                bits=(2, 3, 4, 6, 8) if seed % 2 else (2, 3, 4, 8), seed=seed)
    front = FAST.solve(problem, seed=seed)
    _check_front(front, problem)
    # Seeded with the ILP: the least-loss point is the brute-force optimum at the budget.
    assert front.best.loss == pytest.approx(brute_force(problem), rel=1e-9)
    assert front.gap == 0.0
    # Exact fronts of 45-550 points, 40 individuals: nearly all the exact area, and most
    # returned points truly Pareto-optimal.
    exact = exact_front(problem)
    pairs = exact[:, [1, 0]]  # (cost, loss)
    reference = (1.01 * pairs[:, 0].max(), 1.01 * pairs[:, 1].max())
    ratio = hypervolume(front_points(front, "avg_bits"), reference) / hypervolume(pairs,
                                                                                 reference)
    assert 0.995 <= ratio <= 1.0 + 1e-12
    optimal, hits = _coverage(front, problem, exact)
    assert optimal >= 0.8 * len(front) and hits == optimal


@pytest.mark.parametrize("seed", range(6))
def test_tiny_many_objective_fronts(seed: int) -> None:
    problem = model_like(seed)
    front = FAST.solve(problem, seed=seed)
    _check_front(front, problem)
    assert front.best.loss == pytest.approx(brute_force(problem), rel=1e-9)
    exact = exact_front(problem)
    optimal, hits = _coverage(front, problem, exact)
    total = len(exact)
    # 3-4 objectives, up to ~400 exact points for 40 individuals: nearly every returned
    # point is truly Pareto-optimal, and most of the exact front is found.
    assert optimal >= 0.95 * len(front) and hits >= 0.5 * total


@pytest.mark.parametrize("seed", range(8))
def test_random_tables_with_ties_and_pins(seed: int) -> None:
    problem, _ = random_budgeted(seed)
    expected = brute_force(problem)
    if expected is None:
        with pytest.raises(InfeasibleBudget):
            FAST.solve(problem, seed=seed)
        return
    front = FAST.solve(problem, seed=seed)
    _check_front(front, problem)  # is_feasible covers ties, pins and the mask
    assert front.best.loss == pytest.approx(expected, rel=1e-9, abs=1e-12)
    exact = exact_front(problem)
    for p in objectives(front, problem):  # nothing feasible dominates a returned point
        assert not ((exact <= p - 1e-12).all(axis=1)).any()


def test_hypervolume_reaches_the_exact_front() -> None:
    problem = synthetic_problem(100, levels={"avg_bits": 1.0}, seed=3)
    front = NSGA2Solver(pop_size=60, n_gen=60, ilp_points=3).solve(problem, seed=0)
    _check_front(front, problem)
    sweep = ILPSolver().sweep(problem, "avg_bits", n_points=25)
    lp = lp_front(problem, "avg_bits")
    low, high = problem.min_cost("avg_bits"), problem.max_cost("avg_bits")
    reference = (high + 0.01 * (high - low), lp[0, 1] + 0.01 * (lp[0, 1] - lp[-1, 1]))
    exact_bound = hypervolume(lp, reference, piecewise_linear=True)
    found = hypervolume(front_points(front, "avg_bits"), reference)
    swept = hypervolume(front_points(sweep, "avg_bits"), reference)
    assert swept <= exact_bound and found <= exact_bound * (1 + 1e-12)
    assert found >= 0.99 * exact_bound  # so >= 99 % of the exact front's area too
    assert found >= swept
    assert len(front) > 3 * len(sweep)


def test_two_budgets_three_objectives() -> None:
    problem = synthetic_problem(60, n_budgets=2, seed=1)
    front = FAST.solve(problem, seed=1)
    points = _check_front(front, problem)
    assert points.shape[1] == 3 and len(front) > 5
    exact = ILPSolver().solve(problem)
    assert front.best.loss == pytest.approx(exact.best.loss, rel=1e-12)


def test_seeded_runs_repeat() -> None:
    problem = synthetic_problem(40, seed=6)
    a, b = FAST.solve(problem, seed=3), FAST.solve(problem, seed=3)
    assert [s.choice.tolist() for s in a.solutions] == [s.choice.tolist() for s in b.solutions]


def test_greedy_seeds_only_and_fixed_units() -> None:
    # No ILP in the seeds; every unit but two is pinned: a 2-gene genome.
    problem = synthetic_problem(8, seed=2)
    pinned = {name: 4 for name in problem.layers[2:]}
    problem = AllocationProblem(problem.layers, problem.bits, problem.sensitivity,
                                problem.costs, {"avg_bits": problem.max_cost("avg_bits")},
                                pinned=pinned)
    front = NSGA2Solver(pop_size=10, n_gen=10, ilp_points=0).solve(problem, seed=0)
    _check_front(front, problem)
    assert all(s.bits[name] == 4 for s in front.solutions for name in pinned)
    assert len(front) == len(exact_front(problem))  # 2 free units: the whole front


def test_no_budget_and_infeasible() -> None:
    problem = synthetic_problem(10, n_budgets=0, seed=1)
    front = solve(problem, "nsga2")
    assert len(front) == 1 and front.status == "optimal"
    with pytest.raises(InfeasibleBudget, match="below the smallest achievable"):
        FAST.solve(problem.with_budgets({"avg_bits": 1.0}))


def test_thinning_keeps_the_ends() -> None:
    problem = synthetic_problem(80, levels={"avg_bits": 1.0}, seed=4)
    full = FAST.solve(problem, seed=0)
    thin = NSGA2Solver(pop_size=40, n_gen=40, ilp_points=2, time_limit_s=None,
                       max_solutions=10).solve(problem, seed=0)
    assert len(thin) <= 10 < len(full)
    assert thin.solutions[0].costs["avg_bits"] == full.solutions[0].costs["avg_bits"]
    assert thin.best.loss == full.best.loss


def test_registered() -> None:
    assert SOLVERS["nsga2"] is NSGA2Solver


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"pop_size": 2}, "pop_size must be an int >= 4"),
        ({"n_gen": 0}, "n_gen must be an int >= 1"),
        ({"ilp_points": -1}, "ilp_points must be an int >= 0"),
        ({"max_solutions": 1}, "max_solutions must be an int >= 2"),
        ({"time_limit_s": 0}, "time_limit_s must be > 0 or None"),
        ({"patience": 0}, "patience must be an int >= 1"),
    ],
)
def test_parameters_validate(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        NSGA2Solver(**kwargs)


def test_search_gives_a_front_of_bit_maps(mnist_cnn: Any, mnist_calib: Any,
                                          tmp_path: Any) -> None:
    import mpsearch
    from mpsearch import BitMap, Hutchinson

    table = mpsearch.search(mnist_cnn, 4.0, data=mnist_calib, progress=False,
                            sensitivity=Hutchinson(tol=0.2, min_probes=5, max_probes=20), slices=None).sensitivity
    # refine=False: the front's own best point (refinement may replace it by a measured map)
    res = mpsearch.search(mnist_cnn, 4.0, data=mnist_calib, sensitivity=table, solver="nsga2",
                          progress=False, refine=False, slices=None)
    frame = res.front.to_frame()
    assert len(frame) == len(res.front) > 3  # a trade-off, not one point
    assert (frame["avg_bits"] <= 4.0 + 1e-9).all()
    exact = mpsearch.search(mnist_cnn, 4.0, data=mnist_calib, sensitivity=table,
                            progress=False, refine=False, slices=None)
    assert res.bitmap.predicted["loss_increase"] == pytest.approx(
        exact.bitmap.predicted["loss_increase"], rel=1e-9)
    for i in (0, len(frame) // 2, -1):
        bitmap = res.bitmap_at(i)
        row = frame.iloc[i]
        assert bitmap.bits() == {**res.bitmap.bits(), **row["bits"]}
        assert bitmap.predicted["loss_increase"] == pytest.approx(row["loss"])
        assert bitmap.predicted["avg_bits"] == pytest.approx(bitmap.avg_bits())
        assert bitmap.fingerprint == res.bitmap.fingerprint
        loaded = BitMap.load(bitmap.save(tmp_path / f"front_{i}.json"))
        assert loaded.bits() == bitmap.bits()
    best = int(frame["loss"].idxmin())
    assert res.bitmap_at(best).bits() == res.bitmap.bits()
    with pytest.raises(IndexError, match="outside"):
        res.bitmap_at(len(frame))
    # a refined search measured its own map only: other front points carry no measurement
    refined = mpsearch.search(mnist_cnn, 4.0, data=mnist_calib, sensitivity=table,
                              solver="nsga2", progress=False, slices=None,
                              refine=mpsearch.refine.Refine(max_evals=6))
    assert "calibration_loss_increase" in refined.bitmap.predicted
    for i in range(len(refined.front)):
        point = refined.bitmap_at(i)
        assert point.provenance["front_index"] == i
        assert ("calibration_loss_increase" in point.predicted) == (
            point.bits() == refined.bitmap.bits())
    greedy = mpsearch.search(mnist_cnn, 4.0, data=mnist_calib, sensitivity=table,
                             solver="greedy", progress=False, slices=None)
    assert greedy.bitmap.provenance["solver"] == "greedy"
    assert greedy.bitmap.avg_bits() <= 4.0 + 1e-9
