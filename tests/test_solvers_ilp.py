"""ILPSolver and solve(): exact optima against brute force, infeasibility, sweeps."""

from __future__ import annotations

import itertools
import math
import time
from typing import Any

import numpy as np
import pytest
from problem_instances import COSTS, random_structure

from mpsearch.errors import InfeasibleBudget
from mpsearch.problem import AllocationProblem, Front
from mpsearch.solvers import SOLVERS, ILPSolver, Solver, solve
from mpsearch.solvers import _reduce as reduce_module
from mpsearch.solvers import ilp as ilp_module


def random_problem(seed: int) -> tuple[AllocationProblem, dict[str, Any]]:
    """A small seeded problem with 1-3 budgets, random ties, pins and mask."""
    structural, raw, rng = random_structure(seed)
    names = rng.choice(list(COSTS), int(rng.integers(1, 4)), replace=False).tolist()
    # Mostly budgets just above a random allocation (jointly feasible, often binding),
    # sometimes anywhere in range (often jointly infeasible).
    anchor = structural.evaluate(
        structural.expand([rng.choice(np.flatnonzero(row)) for row in structural.unit_allowed])
    )
    anywhere = rng.random() < 0.2
    budgets = {}
    for name in names:
        low, high = structural.min_cost(name), structural.max_cost(name)
        start = low if anywhere else anchor[name]
        budgets[name] = start + float(rng.random()) ** 2 * (high - start) * (1 if anywhere else 0.3)
    return structural.with_budgets(budgets), raw


def brute_force(raw: dict[str, Any], budgets: dict[str, float]) -> float | None:
    """Least loss over every choice, by enumeration; None if nothing is feasible."""
    layers, bits = raw["layers"], raw["bits"]
    best = None
    for choice in itertools.product(range(len(bits)), repeat=len(layers)):
        if not all(raw["allowed"][i, c] for i, c in enumerate(choice)):
            continue
        if any(len({choice[layers.index(n)] for n in group}) > 1 for group in raw["ties"]):
            continue
        if any(bits[choice[layers.index(n)]] != b for n, b in raw["pinned"].items()):
            continue
        if any(
            math.fsum(raw["costs"][k][i, c] for i, c in enumerate(choice)) > limit
            for k, limit in budgets.items()
        ):
            continue
        loss = math.fsum(raw["sensitivity"][i, c] for i, c in enumerate(choice))
        best = loss if best is None else min(best, loss)
    return best


def _check_against_brute_force(seed: int) -> None:
    problem, raw = random_problem(seed)
    expected = brute_force(raw, dict(problem.budgets))
    if expected is None:
        with pytest.raises(InfeasibleBudget):
            ILPSolver().solve(problem, seed=seed)
        return
    front = ILPSolver().solve(problem, seed=seed)
    assert (front.status, front.gap, front.solver) == ("optimal", 0.0, "ilp")
    assert len(front) == 1
    assert problem.is_feasible(front.best.choice)
    assert front.best.loss == pytest.approx(expected, rel=1e-9, abs=1e-12)
    values = problem.evaluate(front.best.choice)
    assert {"loss": front.best.loss, **front.best.costs} == values


@pytest.mark.parametrize("seed", range(120))
def test_optimum_matches_brute_force(seed: int) -> None:
    _check_against_brute_force(seed)


@pytest.mark.parametrize("seed", range(120, 200))
def test_bare_model_matches_brute_force(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # Without the reductions CBC does all the work: checks the model itself.
    monkeypatch.setattr(reduce_module, "REDUCE", False)
    _check_against_brute_force(seed)


@pytest.mark.parametrize("seed", range(200, 240))
def test_optimum_without_greedy_start(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reduce_module, "lagrangian_greedy", lambda model, prices: None)
    _check_against_brute_force(seed)


def _anti() -> AllocationProblem:
    """Two layers; cost a grows with bits, cost b shrinks."""
    bits = [2, 4, 8]
    grow = np.array([[2.0, 4.0, 8.0]] * 2)
    return AllocationProblem(
        ["x", "y"], bits, np.array([[3.0, 2.0, 1.0]] * 2), {"a": grow, "b": 10.0 - grow}, {}
    )


def test_single_infeasible_budget_states_smallest() -> None:
    problem = _anti().with_budgets({"a": 3.0, "b": 100.0})
    with pytest.raises(InfeasibleBudget) as info:
        solve(problem)
    assert "a=3 is below the smallest achievable 4 (all layers at 2 bits)" in str(info.value)
    assert info.value.smallest == {"a": 4.0, "b": 4.0}


def test_jointly_infeasible_budgets() -> None:
    problem = _anti().with_budgets({"a": 6.0, "b": 6.0})  # each alone is fine
    with pytest.raises(InfeasibleBudget, match="cannot all be met together: a=6 .*alone 4") as info:
        solve(problem)
    assert info.value.smallest == {"a": 4.0, "b": 4.0}
    assert isinstance(info.value, ValueError)


def test_budget_exactly_at_minimum_on_bops_scale() -> None:
    rng = np.random.default_rng(3)
    bops = rng.random((40, 4)) * 1e12
    problem = AllocationProblem(
        [f"l{i}" for i in range(40)], [2, 3, 4, 8], rng.random((40, 4)), {"bops": bops}, {}
    )
    tight = problem.with_budgets({"bops": problem.min_cost("bops")})
    front = ILPSolver().solve(tight)
    assert tight.is_feasible(front.best.choice) and front.status == "optimal"
    # A hair below a reachable total must still be met exactly, not within CBC's 1e-7.
    target = problem.min_cost("bops") + 0.37 * (problem.max_cost("bops") - problem.min_cost("bops"))
    hair = problem.with_budgets({"bops": target * (1 - 1e-13)})
    assert hair.is_feasible(ILPSolver().solve(hair).best.choice)


def _sweep_case(seed: int) -> tuple[AllocationProblem, dict[str, Any]]:
    problem, raw = random_problem(seed)
    while brute_force(raw, dict(problem.budgets)) is None or problem.n_layers < 3:
        seed += 1000
        problem, raw = random_problem(seed)
    return problem, raw


@pytest.mark.parametrize("seed", range(6))
def test_sweep_points_are_brute_force_optima(seed: int) -> None:
    problem, raw = _sweep_case(seed)
    cost = "size_bytes"
    others = {k: v for k, v in problem.budgets.items() if k != cost}
    front = ILPSolver().sweep(problem, cost, n_points=7, seed=seed)
    assert front.status == "optimal" and front.gap == 0.0
    costs = [s.costs[cost] for s in front.solutions]
    losses = [s.loss for s in front.solutions]
    assert costs == sorted(costs)
    assert all(a > b for a, b in itertools.pairwise(losses)), "loss must fall as cost grows"
    assert all(problem.with_budgets(others).is_feasible(s.choice) for s in front.solutions)
    grid = np.linspace(problem.min_cost(cost), problem.max_cost(cost), 7)
    for limit in grid:
        expected = brute_force(raw, {**others, cost: float(limit)})
        reachable = [s.loss for s in front.solutions if s.costs[cost] <= limit]
        if expected is None:
            assert not reachable
        else:
            assert min(reachable) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_sweep_rejects_bad_arguments() -> None:
    problem = _anti()
    with pytest.raises(ValueError, match="unknown cost 'c'"):
        ILPSolver().sweep(problem, "c")
    with pytest.raises(ValueError, match="n_points must be an int >= 2"):
        ILPSolver().sweep(problem, "a", n_points=1)
    with pytest.raises(InfeasibleBudget, match="b=1 is below"):
        ILPSolver().sweep(problem.with_budgets({"b": 1.0}), "a")


def test_solve_front_and_frame() -> None:
    problem = _anti().with_budgets({"a": 12.0})
    front = solve(problem, "ilp", seed=1, time_limit_s=10)
    assert isinstance(front, Front)
    assert front.best.bits == {"x": 8, "y": 4} or front.best.bits == {"x": 4, "y": 8}
    assert front.best.loss == 3.0
    frame = front.to_frame()
    assert list(frame.columns) == ["loss", "a", "b", "bits"] and len(frame) == 1


def test_solver_registry_and_options() -> None:
    assert SOLVERS["ilp"] is ILPSolver
    assert isinstance(ILPSolver(), Solver)
    problem = _anti().with_budgets({"a": 12.0})
    with pytest.raises(ValueError, match=r"unknown solver 'cplex'; known solvers: \[.*'ilp'"):
        solve(problem, "cplex")
    with pytest.raises(ValueError, match="bad options .* 'ilp'"):
        solve(problem, "ilp", time_limit=3)
    with pytest.raises(ValueError, match="only go with a solver name"):
        solve(problem, ILPSolver(), time_limit_s=3)
    assert solve(problem, ILPSolver(gap_rel=0.0)).best.loss == 3.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"time_limit_s": 0}, "time_limit_s must be > 0"),
        ({"gap_rel": 1.0}, r"gap_rel must be in \[0, 1\)"),
        ({"threads": 0}, "threads must be an int >= 1"),
    ],
)
def test_ilp_parameters_validate(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ILPSolver(**kwargs)


def test_gap_parsed_from_cbc_logs() -> None:
    stopped = "Result - Stopped on time limit\n\nObjective value:  10.5\nLower bound:  10.000\n"
    assert ilp_module._absolute_gap(stopped) == pytest.approx(0.5005)
    within = "Cbc0011I Exiting as integer gap of 0.091259591 less than 1e-10 or 0.01%\n"
    assert ilp_module._absolute_gap(within) == pytest.approx(0.091259591)
    partial = "Partial search - best objective 12.5 (best possible 12.25), took 3"
    assert ilp_module._absolute_gap(partial) == pytest.approx(0.25)
    assert ilp_module._absolute_gap("Result - Optimal solution found") is None


def _large(n_layers: int, seed: int = 0, n_budgets: int = 1) -> AllocationProblem:
    """A model-like problem: sensitivity falls 4x per bit, costs grow with bits."""
    rng = np.random.default_rng(seed)
    bits = np.array([2, 3, 4, 6, 8])
    params = rng.integers(1_000, 1_000_000, n_layers)
    sensitivity = rng.random((n_layers, 1)) * 4.0**-bits * rng.uniform(0.5, 1.5, (n_layers, 5))
    costs = {
        "avg_bits": params[:, None] * bits / params.sum(),
        "bops": (params * rng.integers(10, 1000, n_layers))[:, None] * bits * 8.0,
        "latency_us": rng.random((n_layers, 1)) * [5.0, 6, 4, 7, 9] * rng.uniform(0.8, 1.2, 5),
    }
    budgets = {"avg_bits": 4.3}
    if n_budgets == 3:
        budgets["bops"] = 0.5 * costs["bops"][:, -1].sum()
        budgets["latency_us"] = 0.6 * costs["latency_us"][:, -1].sum()
    return AllocationProblem(
        [f"layer.{i}" for i in range(n_layers)], bits.tolist(), sensitivity, costs, budgets
    )


def test_thousand_layers_solve_optimal() -> None:
    problem = _large(1000)
    start = time.perf_counter()
    front = ILPSolver().solve(problem, seed=0)
    elapsed = time.perf_counter() - start
    assert front.status == "optimal" and front.gap == 0.0
    assert problem.is_feasible(front.best.choice)
    assert front.best.costs["avg_bits"] <= 4.3
    assert elapsed < 30.0  # ~0.2 s on two idle cores; generous for loaded CI machines
    again = ILPSolver().solve(problem, seed=0)
    assert np.array_equal(again.best.choice, front.best.choice)


def test_gap_limited_run_is_within_its_gap() -> None:
    problem = _large(200, seed=1, n_budgets=3)
    exact = ILPSolver().solve(problem)
    assert exact.status == "optimal"
    rough = ILPSolver(gap_rel=1e-3).solve(problem)
    assert rough.status in ("optimal", "feasible") and rough.gap is not None
    assert problem.is_feasible(rough.best.choice)
    assert rough.gap <= 1e-3 + 1e-12
    true_gap = (rough.best.loss - exact.best.loss) / rough.best.loss
    assert -1e-12 <= true_gap <= rough.gap + 1e-12


def test_time_limited_run_keeps_an_answer() -> None:
    problem = _large(1000, seed=2, n_budgets=3)
    front = ILPSolver(time_limit_s=0.2).solve(problem)
    assert front.status in ("optimal", "feasible")
    assert problem.is_feasible(front.best.choice)
    if front.status == "feasible":  # the Lagrangian bound always gives a gap
        assert front.gap is not None and 0.0 <= front.gap < 0.01


@pytest.mark.parametrize("exclude", [True, False])
def test_tolerance_slip_is_cut_off(exclude: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    # {8, 4} bits (a=12, loss 3) is over this budget by 1e-9: the optimum has loss 4.
    problem = _anti().with_budgets({"a": 12.0 - 1e-9})
    calls: list[tuple[list[float], int]] = []
    original = ILPSolver._run_cbc

    def slipping(self: ILPSolver, model: Any, incumbent: Any, cuts: Any, seed: int) -> Any:
        calls.append((list(cuts.margins), len(cuts.excluded)))
        if len(calls) == 1:  # as if CBC's tolerance had let {8, 4} through
            return ilp_module._Outcome(np.array([2, 1]), False, True, 0.0)
        return original(self, model, incumbent, cuts, seed)

    monkeypatch.setattr(ILPSolver, "_run_cbc", slipping)
    if not exclude:
        monkeypatch.setattr(ilp_module, "_MAX_EXCLUDED", 0)
    front = ILPSolver().solve(problem)
    assert front.best.loss == 4.0 and problem.is_feasible(front.best.choice)
    assert calls[0] == ([0.0], 0)
    if exclude:  # that one allocation is cut off: the search stays exact
        assert calls[1] == ([0.0], 1)
        assert front.status == "optimal" and front.gap == 0.0
    else:  # the budget is tightened; the optimum before (3) bounds what that cut off
        assert 0.0 < calls[1][0][0] < 1e-8 and calls[1][1] == 0
        assert front.status == "feasible" and front.gap == pytest.approx(0.25)


def test_cbc_crash_falls_back_to_preprocessing(monkeypatch: pytest.MonkeyPatch) -> None:
    original = ILPSolver._call_cbc
    seen: list[bool] = []

    def crashing(self: ILPSolver, lp: Any, *, preprocess: bool, **call: Any) -> tuple[bool, str]:
        seen.append(preprocess)
        if not preprocess:
            return True, ""
        return original(self, lp, preprocess=preprocess, **call)

    monkeypatch.setattr(ILPSolver, "_call_cbc", crashing)
    monkeypatch.setattr(reduce_module, "REDUCE", False)
    front = ILPSolver().solve(_anti().with_budgets({"a": 12.0}))
    assert seen == [False, True]
    assert front.best.loss == 3.0 and front.status == "feasible"  # not trusted as proof
    with pytest.raises(InfeasibleBudget, match="cannot all be met together"):
        ILPSolver().solve(_anti().with_budgets({"a": 6.0, "b": 6.0}))


@pytest.mark.parametrize("seed", range(40))
def test_budgets_on_reachable_totals_match_brute_force(seed: int) -> None:
    # Budgets exactly at, or one float below, the totals of some allocation: the
    # boundary cases where solver tolerances and summation order would show.
    problem, raw = random_problem(seed)
    rng = np.random.default_rng(seed)
    anchor = problem.evaluate(
        problem.expand([rng.choice(np.flatnonzero(row)) for row in problem.unit_allowed])
    )
    budgets = {
        k: anchor[k] if rng.random() < 0.5 else float(np.nextafter(anchor[k], -np.inf))
        for k in problem.budgets
    }
    problem = problem.with_budgets(budgets)
    expected = brute_force(raw, budgets)
    if expected is None:
        with pytest.raises(InfeasibleBudget):
            ILPSolver().solve(problem)
        return
    front = ILPSolver().solve(problem)
    assert front.status == "optimal" and problem.is_feasible(front.best.choice)
    assert front.best.loss == pytest.approx(expected, rel=1e-9, abs=1e-12)
