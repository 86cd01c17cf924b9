"""One contract, every registered solver (scikit-learn's ``parametrize_with_checks`` idea)."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
from problem_instances import brute_force, model_like

import mpsearch
from mpsearch import AllocationProblem, Hutchinson, InfeasibleBudget
from mpsearch.front import Front
from mpsearch.solvers import SOLVERS, Solver, solve
from mpsearch.solvers.synthetic import synthetic_problem

#: options that keep each solver quick on the small problems below
QUICK: dict[str, dict[str, Any]] = {"nsga2": {"pop_size": 24, "n_gen": 15, "ilp_points": 1}}


def make(name: str) -> Solver:
    solver: Solver = SOLVERS[name](**QUICK.get(name, {}))
    return solver


def _anti() -> AllocationProblem:
    grow = np.array([[2.0, 4.0, 8.0]] * 3)
    return AllocationProblem(["x", "y", "z"], [2, 4, 8], np.array([[3.0, 2.0, 1.0]] * 3),
                             {"a": grow, "b": 10.0 - grow}, {})


@pytest.fixture(params=sorted(SOLVERS))
def name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_constructor_only_stores_parameters(name: str) -> None:
    cls = SOLVERS[name]
    solver = cls()
    assert cls.name == name and isinstance(solver, Solver)
    assert dataclasses.is_dataclass(solver)
    fields = {f.name: getattr(solver, f.name) for f in dataclasses.fields(solver)}
    assert cls(**fields) == solver  # parameters round-trip; no hidden state
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(solver, next(iter(fields)), None)
    with pytest.raises(TypeError):
        cls(0)  # keyword-only


@pytest.mark.parametrize("seed", range(4))
def test_front_is_feasible_and_reaches_the_optimum(name: str, seed: int) -> None:
    problem = model_like(seed + 100)
    front = make(name).solve(problem, seed=seed)
    assert isinstance(front, Front) and front.solver == name and len(front) >= 1
    assert front.status in ("optimal", "feasible") and front.time_s >= 0
    assert all(problem.is_feasible(s.choice) for s in front.solutions)
    assert front.best.loss <= brute_force(problem) * 1.25  # type: ignore[operator]
    frame = front.to_frame()
    assert len(frame) == len(front) and {"loss", "bits", *problem.costs} <= set(frame.columns)


def test_ties_pins_and_mask(name: str) -> None:
    base = synthetic_problem(12, seed=8)
    allowed = np.ones((12, 4), dtype=bool)
    allowed[5, 3] = False
    problem = AllocationProblem(base.layers, base.bits, base.sensitivity, base.costs,
                                base.budgets, ties=[["layer.0", "layer.1", "layer.2"]],
                                pinned={"layer.3": 8, "layer.4": 2}, allowed=allowed)
    for solution in make(name).solve(problem, seed=0).solutions:
        bits = solution.bits
        assert bits["layer.0"] == bits["layer.1"] == bits["layer.2"]
        assert bits["layer.3"] == 8 and bits["layer.4"] == 2 and bits["layer.5"] != 8


def test_infeasible_budgets_raise(name: str) -> None:
    with pytest.raises(InfeasibleBudget) as info:
        make(name).solve(_anti().with_budgets({"a": 5.0}))
    assert info.value.smallest == {"a": 6.0}
    with pytest.raises(InfeasibleBudget, match="together"):
        make(name).solve(_anti().with_budgets({"a": 14.0, "b": 14.0}))


def test_same_seed_same_answer(name: str) -> None:
    problem = synthetic_problem(30, n_budgets=2, seed=9)
    a, b = make(name).solve(problem, seed=4), make(name).solve(problem, seed=4)
    assert [s.choice.tolist() for s in a.solutions] == [s.choice.tolist() for s in b.solutions]


def test_solve_by_name(name: str) -> None:
    problem = _anti().with_budgets({"a": 16.0})
    front = solve(problem, name, seed=1, **QUICK.get(name, {}))
    assert front.solver == name and front.best.loss == pytest.approx(5.0)
    with pytest.raises(ValueError, match="bad options"):
        solve(problem, name, no_such_option=1)


@pytest.mark.slow
def test_fused_ties_on_minilm(minilm: Any) -> None:  # type: ignore[misc]
    # q/k/v read the same input: tie="fused" makes every solver give them one bit-width.
    from mpsearch.zoo.minilm import text_batches

    model, tok = minilm
    calib = text_batches(tok, "calib", n_batches=2, batch_size=4, max_length=32)
    first = mpsearch.search(model, 4.0, data=calib, tie="fused", progress=False,
                            sensitivity=Hutchinson(tol=0.3, min_probes=4, max_probes=8), slices=None)
    assert len(first.problem.ties) == 6  # one q/k/v group per encoder layer
    for solver in sorted(SOLVERS):
        res = mpsearch.search(model, 4.0, data=calib, tie="fused", solver=make(solver),
                              sensitivity=first.sensitivity, progress=False, slices=None)
        for group in res.problem.ties:
            for index in range(len(res.front)):
                bitmap = res.bitmap_at(index)
                assert len({bitmap[layer].w_bits for layer in group}) == 1
                assert bitmap[group[0]].tie is not None
        assert res.bitmap.avg_bits() <= 4.0 + 1e-9
