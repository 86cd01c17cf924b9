"""AllocationProblem, Solution and Front: validation, exact sums, known answers."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from problem_instances import random_structure

from mpsearch.errors import InfeasibleBudget
from mpsearch.problem import AllocationProblem, Front, Solution

BITS = (2, 4, 8)


def _uniform(n_layers: int = 3, **kwargs: Any) -> AllocationProblem:
    """n_layers layers of equal size; avg_bits of a choice is the mean bits."""
    layers = [f"l{i}" for i in range(n_layers)]
    sensitivity = np.tile([4.0, 1.0, 0.0], (n_layers, 1)) * np.arange(1, n_layers + 1)[:, None]
    costs = {"avg_bits": np.tile(np.array(BITS, dtype=float) / n_layers, (n_layers, 1))}
    kwargs.setdefault("budgets", {"avg_bits": 4.0})
    return AllocationProblem(layers, BITS, sensitivity, costs, **kwargs)


def _random(seed: int) -> tuple[AllocationProblem, dict[str, Any]]:
    """A small random problem with ties, pins and a mask, plus its raw inputs."""
    problem, raw, _ = random_structure(seed, tie_p=0.6, pin_p=0.3)
    return problem, raw


def structural_choices(raw: dict[str, Any]) -> Iterator[tuple[int, ...]]:
    """Every choice that respects allowed, ties and pins, by plain enumeration."""
    layers, bits, allowed = raw["layers"], raw["bits"], raw["allowed"]
    for choice in itertools.product(range(len(bits)), repeat=len(layers)):
        if not all(allowed[i, c] for i, c in enumerate(choice)):
            continue
        if any(len({choice[layers.index(n)] for n in group}) > 1 for group in raw["ties"]):
            continue
        if any(bits[choice[layers.index(n)]] != b for n, b in raw["pinned"].items()):
            continue
        yield choice


def total(table: np.ndarray, choice: tuple[int, ...]) -> float:
    return math.fsum(table[i, c] for i, c in enumerate(choice))


def test_stores_read_only_copies() -> None:
    sensitivity = np.ones((3, 3))
    problem = _uniform()
    copy = AllocationProblem(
        problem.layers, BITS, sensitivity, dict(problem.costs), {"avg_bits": 4.0}
    )
    sensitivity[0, 0] = 99.0
    assert copy.sensitivity[0, 0] == 1.0
    assert copy.sensitivity.dtype == np.float64
    with pytest.raises(ValueError):
        copy.sensitivity[0, 0] = 2.0
    with pytest.raises(ValueError):
        copy.allowed[0, 0] = False
    assert (problem.n_layers, problem.n_options, problem.n_units) == (3, 3, 3)


def test_evaluate_and_is_feasible() -> None:
    problem = _uniform(ties=[("l0", "l1")], pinned={"l2": 4})
    values = problem.evaluate(np.array([2, 2, 1]))
    assert values == {"loss": 0.0 + 0.0 + 3.0, "avg_bits": pytest.approx(20 / 3)}
    assert not problem.is_feasible(np.array([2, 2, 1]))  # avg_bits 6.67 > 4
    assert problem.is_feasible(np.array([0, 0, 1]))
    assert not problem.is_feasible(np.array([0, 1, 1]))  # tie broken
    assert not problem.is_feasible(np.array([0, 0, 0]))  # pin broken
    masked = _uniform(allowed=[[True, False, True]] * 3)
    assert not masked.is_feasible(np.array([1, 0, 0]))
    with pytest.raises(ValueError, match="integer option indices"):
        problem.evaluate([0.0, 1.0, 2.0])
    with pytest.raises(ValueError, match=r"lie in \[0, 3\)"):
        problem.evaluate([0, 1, 3])


def test_units_merge_ties_and_sum_tables() -> None:
    problem = _uniform(4, ties=[("l2", "l0"), ("l0", "l3")])  # overlapping: merged
    assert problem.ties == (("l0", "l2", "l3"),)
    assert problem.units == (("l0", "l2", "l3"), ("l1",))
    assert problem.unit_of.tolist() == [0, 1, 0, 0]
    table = problem.unit_table(problem.sensitivity)
    np.testing.assert_allclose(table[0], problem.sensitivity[[0, 2, 3]].sum(axis=0))
    assert problem.expand([2, 0]).tolist() == [2, 0, 2, 2]


def test_solution_and_with_budgets() -> None:
    problem = _uniform()
    solution = problem.solution([0, 1, 2])
    assert solution.bits == {"l0": 2, "l1": 4, "l2": 8}
    assert solution.loss == 4.0 + 2.0 + 0.0
    assert solution.costs == {"avg_bits": pytest.approx(14 / 3)}
    assert not solution.choice.flags.writeable
    relaxed = problem.with_budgets({"avg_bits": 8.0})
    assert relaxed.budgets == {"avg_bits": 8.0} and problem.budgets == {"avg_bits": 4.0}


@pytest.mark.parametrize("seed", range(60))
def test_min_max_cost_match_brute_force(seed: int) -> None:
    problem, raw = _random(seed)
    choices = list(structural_choices(raw))
    assert choices, "generator must produce a structurally feasible problem"
    for name, table in raw["costs"].items():
        sums = [total(table, c) for c in choices]
        assert problem.min_cost(name) == pytest.approx(min(sums), rel=1e-12)
        assert problem.max_cost(name) == pytest.approx(max(sums), rel=1e-12)
    feasible = {tuple(c) for c in choices}
    for choice in itertools.product(range(problem.n_options), repeat=problem.n_layers):
        assert problem.is_feasible(np.array(choice)) == (choice in feasible)


def test_min_cost_is_met_exactly_at_budget() -> None:
    rng = np.random.default_rng(0)
    costs = {"bops": rng.random((50, 3)) * 1e12}
    problem = AllocationProblem([f"l{i}" for i in range(50)], BITS, rng.random((50, 3)), costs, {})
    smallest = problem.min_cost("bops")
    at_min = problem.with_budgets({"bops": smallest})
    at_min.check_budgets()
    assert at_min.is_feasible(np.asarray(costs["bops"].argmin(axis=1)))


def test_single_budget_below_minimum_raises_with_smallest() -> None:
    problem = _uniform(budgets={"avg_bits": 1.5})
    with pytest.raises(InfeasibleBudget) as info:
        problem.check_budgets()
    assert "avg_bits=1.5 is below the smallest achievable 2 (all layers at 2 bits)" in str(
        info.value
    )
    assert info.value.smallest == {"avg_bits": pytest.approx(2.0)}
    pinned = _uniform(budgets={"avg_bits": 3.0}, pinned={"l0": 8})
    with pytest.raises(InfeasibleBudget, match=r"avg_bits=3 is below the smallest achievable 4$"):
        pinned.check_budgets()
    _uniform(budgets={"avg_bits": 2.0}).check_budgets()  # exactly the minimum is fine


GOOD: dict[str, Any] = {
    "layers": ["a", "b"],
    "bits": [2, 4],
    "sensitivity": np.ones((2, 2)),
    "costs": {"avg_bits": np.ones((2, 2))},
    "budgets": {"avg_bits": 3.0},
}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"layers": ["a", "a"]}, r"unique; repeated: \['a'\]"),
        ({"layers": []}, "non-empty sequence of names"),
        ({"bits": [2, 2]}, r"unique, got \(2, 2\)"),
        ({"bits": [2, 4.5]}, "sequence of ints"),
        ({"sensitivity": np.ones((2, 3))}, r"shape \(2, 3\); expected .* \(2, 2\)"),
        ({"sensitivity": [[1, np.nan], [1, 1]]}, r"sensitivity\['a', 4 bits\] is nan"),
        ({"sensitivity": [["x", 1], [1, 1]]}, "numeric 2x2 array"),
        ({"costs": {"avg_bits": [[1, np.inf], [1, 1]]}}, "must be finite everywhere"),
        ({"costs": {"loss": np.ones((2, 2))}, "budgets": {}}, "other than 'loss'"),
        ({"budgets": {"latency_us": 1.0}}, r"no cost table; budgets must name one of"),
        ({"budgets": {"avg_bits": math.inf}}, "must be finite; leave 'avg_bits' out"),
        ({"allowed": np.ones((2, 3), bool)}, "allowed must be a 2x2 bool array"),
        ({"allowed": [[0, 0], [1, 1]]}, r"layers \['a'\] have no allowed bits option"),
        ({"ties": [["a", "zz"]]}, r"ties\[0\] names unknown layers \['zz'\]"),
        ({"ties": [[]]}, r"ties\[0\] is \[\]; each tie group must be a non-empty"),
        ({"ties": ["ab"]}, "non-empty sequence of layer names"),
        ({"pinned": {"zz": 4}}, "pinned layer 'zz' is not one of the layers"),
        ({"pinned": {"a": 3}}, r"pinned 'a' to 3 bits; bits options are \(2, 4\)"),
        ({"pinned": {"a": 4}, "allowed": [[1, 0], [1, 1]]}, r"unavailable for it; it allows \[2\]"),
        ({"ties": [["a", "b"]], "allowed": [[1, 0], [0, 1]]}, "no bits option allowed for all"),
        ({"ties": [["a", "b"]], "pinned": {"a": 2, "b": 4}}, "pins inside tie group .* disagree"),
        (
            {"ties": [["a", "b"]], "pinned": {"a": 4}, "allowed": [[1, 1], [1, 0]]},
            r"not allowed for all of them; common options: \[2\]",
        ),
    ],
)
def test_validation_errors(change: dict[str, Any], message: str) -> None:
    arguments = {**GOOD, **change}
    keywords = {k: arguments.pop(k) for k in ("ties", "pinned", "allowed") if k in arguments}
    with pytest.raises(ValueError, match=message):
        AllocationProblem(*arguments.values(), **keywords)


def _solution(loss: float, cost: float, choice: list[int]) -> Solution:
    return Solution(np.array(choice), {"a": 2}, loss, {"avg_bits": cost, "bops": 1.0})


def test_front_build_filters_sorts_and_frames() -> None:
    candidates = [
        _solution(3.0, 2.0, [0]),
        _solution(1.0, 4.0, [1]),
        _solution(2.0, 5.0, [2]),  # dominated by the second
        _solution(1.0, 4.0, [1]),  # repeated choice
        _solution(1.0, 4.0, [3]),  # same objectives, other choice
        _solution(0.5, 8.0, [4]),
    ]
    front = Front.build(
        candidates, objectives=["avg_bits"], solver="x", status="optimal", time_s=0.1, gap=0.0
    )
    assert [s.costs["avg_bits"] for s in front.solutions] == [2.0, 4.0, 8.0]
    assert front.best.loss == 0.5 and len(front) == 3
    frame = front.to_frame()
    assert list(frame.columns) == ["loss", "avg_bits", "bops", "bits"]
    assert frame["bits"].iloc[0] == {"a": 2} and frame["loss"].tolist() == [3.0, 1.0, 0.5]
    by_loss = Front.build(candidates, solver="x", status="feasible", time_s=0.0)
    assert [s.loss for s in by_loss.solutions] == [0.5]


def test_empty_front() -> None:
    front = Front((), solver="ilp", status="timeout", time_s=1.0)
    assert list(front.to_frame().columns) == ["loss", "bits"]
    with pytest.raises(ValueError, match="empty .*timeout"):
        _ = front.best
    with pytest.raises(ValueError, match="gap must be"):
        Front((), solver="ilp", status="optimal", time_s=0.0, gap=-1.0)
