"""GreedySolver: feasible, near the brute-force optimum, with a gap it can prove."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from problem_instances import brute_force, model_like, random_budgeted

from mpsearch import AllocationProblem, GreedySolver, ILPSolver, InfeasibleBudget
from mpsearch.solvers import SOLVERS, solve
from mpsearch.solvers.synthetic import BITS_5, synthetic_problem


@pytest.mark.parametrize("seed", range(80))
def test_random_tables_against_brute_force(seed: int) -> None:
    # Unstructured tables are the hard case for a greedy: it must stay feasible and its
    # proved gap must hold; an "optimal" status must be the brute-force optimum.
    problem, _ = random_budgeted(seed)
    expected = brute_force(problem)
    if expected is None:
        with pytest.raises(InfeasibleBudget):
            GreedySolver().solve(problem)
        return
    try:
        front = GreedySolver().solve(problem)
    except InfeasibleBudget:  # allowed (documented) only where budgets pull apart
        assert len(problem.budgets) > 1
        return
    best = front.best
    assert len(front) == 1 and front.solver == "greedy"
    assert problem.is_feasible(best.choice)
    assert best.loss >= expected - 1e-9 * abs(expected) - 1e-12
    if front.status == "optimal":
        assert front.gap == 0.0
        assert best.loss == pytest.approx(expected, rel=1e-8, abs=1e-12)
    else:
        assert front.status == "feasible" and front.gap is not None
        assert best.loss - expected <= front.gap * abs(best.loss) + 1e-9


def test_random_tables_mostly_optimal() -> None:
    # Over 120 unstructured instances the greedy finds the optimum almost always.
    solved = exact = 0
    for seed in range(120):
        problem, _ = random_budgeted(seed)
        expected = brute_force(problem)
        if expected is None:
            continue
        try:
            loss = GreedySolver().solve(problem).best.loss
        except InfeasibleBudget:
            continue
        solved += 1
        exact += loss <= expected + 1e-9 * abs(expected) + 1e-12
    assert solved >= 80 and exact >= 0.95 * solved


@pytest.mark.parametrize("seed", range(60))
def test_model_like_tables_within_two_percent(seed: int) -> None:
    problem = model_like(seed)
    expected = brute_force(problem)
    assert expected is not None
    front = GreedySolver().solve(problem)
    assert problem.is_feasible(front.best.choice)
    if len(problem.budgets) == 1:
        assert front.best.loss <= expected * 1.02
    else:  # several budgets pulling apart: looser, and checked on average below
        assert front.best.loss <= expected * 1.25


def test_model_like_average_gap() -> None:
    gaps = []
    for seed in range(60):
        problem = model_like(seed)
        expected = brute_force(problem)
        assert expected is not None
        gaps.append(GreedySolver().solve(problem).best.loss / expected - 1)
    assert float(np.mean(gaps)) < 0.01 and float(np.median(gaps)) < 1e-9


@pytest.mark.parametrize(("n_budgets", "bits"), [(1, (2, 3, 4, 8)), (3, BITS_5)])
def test_thousand_layers_near_ilp(n_budgets: int, bits: tuple[int, ...]) -> None:
    problem = synthetic_problem(1000, bits=bits, n_budgets=n_budgets, seed=4)
    exact = ILPSolver().solve(problem)
    front = GreedySolver().solve(problem)
    assert exact.status == "optimal"
    assert problem.is_feasible(front.best.choice)
    gap = (front.best.loss - exact.best.loss) / exact.best.loss
    assert -1e-9 <= gap <= 1e-3
    assert front.gap is not None and gap <= front.gap + 1e-12


def test_ties_pins_and_mask_hold() -> None:
    rng = np.random.default_rng(7)
    layers = [f"b.{i}.{p}" for i in range(6) for p in ("q", "k", "v", "o")]
    sensitivity = rng.lognormal(0, 1, (len(layers), 1)) * 4.0 ** -np.arange(4)
    params = rng.integers(100, 10_000, len(layers)).astype(float)
    costs = {"avg_bits": params[:, None] * np.array([2, 3, 4, 8]) / params.sum()}
    allowed = np.ones((len(layers), 4), dtype=bool)
    allowed[layers.index("b.2.o"), 3] = False  # no 8-bit kernel for this one
    ties = [[f"b.{i}.q", f"b.{i}.k", f"b.{i}.v"] for i in range(6)]
    problem = AllocationProblem(layers, (2, 3, 4, 8), sensitivity, costs, {"avg_bits": 4.0},
                                ties=ties, pinned={"b.0.o": 8, "b.1.q": 2}, allowed=allowed)
    best = GreedySolver().solve(problem).best
    for group in ties:
        assert len({best.bits[name] for name in group}) == 1
    assert best.bits["b.0.o"] == 8 and best.bits["b.1.k"] == 2
    assert best.bits["b.2.o"] != 8
    assert best.costs["avg_bits"] <= 4.0
    assert best.loss <= ILPSolver().solve(problem).best.loss * 1.02


def test_infeasible_budgets_raise() -> None:
    grow = np.array([[2.0, 4.0, 8.0]] * 2)
    problem = AllocationProblem(["x", "y"], [2, 4, 8], np.array([[3.0, 2.0, 1.0]] * 2),
                                {"a": grow, "b": 10.0 - grow}, {})
    with pytest.raises(InfeasibleBudget, match="a=3 is below the smallest achievable 4"):
        GreedySolver().solve(problem.with_budgets({"a": 3.0}))
    with pytest.raises(InfeasibleBudget, match="cannot all be met together"):
        GreedySolver().solve(problem.with_budgets({"a": 6.0, "b": 6.0}))


def test_budget_at_a_reachable_total_is_met_exactly() -> None:
    # The uniform 4-bit map's own cost as the budget: the answer may use all of it.
    problem = synthetic_problem(50, seed=3)
    uniform = problem.evaluate(np.full(50, problem.bits.index(4)))
    tight = problem.with_budgets({"avg_bits": uniform["avg_bits"]})
    front = GreedySolver().solve(tight)
    assert tight.is_feasible(front.best.choice)
    assert front.best.loss <= uniform["loss"]


def test_no_budget_is_the_least_loss_choice() -> None:
    problem = synthetic_problem(20, n_budgets=0, seed=1)
    front = GreedySolver().solve(problem)
    assert front.status == "optimal" and front.gap == 0.0
    assert front.best.loss == pytest.approx(problem.sensitivity.min(axis=1).sum())


def test_deterministic_and_registered() -> None:
    problem = synthetic_problem(300, n_budgets=2, seed=5)
    first = solve(problem, "greedy", seed=0)
    again = solve(problem, GreedySolver(), seed=123)
    assert np.array_equal(first.best.choice, again.best.choice)
    assert SOLVERS["greedy"] is GreedySolver


def test_start_and_swap_options() -> None:
    problem = synthetic_problem(200, seed=2)
    plain = GreedySolver(swaps=False).solve(problem).best
    full = GreedySolver().solve(problem).best
    assert problem.is_feasible(plain.choice) and full.loss <= plain.loss
    from_two = GreedySolver(start_bits=2).solve(problem).best
    assert problem.is_feasible(from_two.choice)
    with pytest.raises(ValueError, match=r"start_bits=5 is not one of the bits options"):
        GreedySolver(start_bits=5).solve(problem)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"start_bits": 2.5}, "start_bits must be an int or None"),
        ({"swap_candidates": 0}, "swap_candidates must be an int >= 1"),
        ({"max_swaps": -1}, "max_swaps must be an int >= 0"),
        ({"gap_tol": 1.0}, r"gap_tol must be in \[0, 1\)"),
        ({"polish_all_max_units": -1}, "polish_all_max_units must be an int >= 0"),
    ],
)
def test_parameters_validate(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GreedySolver(**kwargs)
