"""Hypervolume and the LP front: known answers, and the LP front bounding every choice."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from mpsearch.solvers.quality import front_points, hypervolume, lp_front
from mpsearch.solvers.synthetic import COSTS, synthetic_problem


def test_staircase_area_known_answers() -> None:
    assert hypervolume(np.array([[1.0, 1.0]]), (3.0, 4.0)) == 6.0
    # (1, 3) and (2, 1) under reference (4, 4): 1 x 1 from cost 1 to 2, 2 x 3 from 2 to 4.
    points = np.array([[2.0, 1.0], [1.0, 3.0]])
    assert hypervolume(points, (4.0, 4.0)) == pytest.approx(1 * 1 + 2 * 3)
    # Dominated and out-of-box points add nothing.
    more = np.vstack([points, [[3.0, 3.0], [5.0, 0.0], [0.5, 4.0]]])
    assert hypervolume(more, (4.0, 4.0)) == pytest.approx(7.0)
    assert hypervolume(np.empty((0, 2)), (1.0, 1.0)) == 0.0


def test_piecewise_linear_area_known_answers() -> None:
    # Segment (0, 2) -> (2, 0) under reference (3, 3): a trapezoid of heights 1 and 3 over
    # width 2, plus the rectangle 1 x 3 right of the last vertex.
    line = np.array([[0.0, 2.0], [2.0, 0.0]])
    assert hypervolume(line, (3.0, 3.0), piecewise_linear=True) == pytest.approx(4.0 + 3.0)
    # Clipped by the reference loss: only the part below loss 1 counts (a triangle).
    assert hypervolume(line, (2.0, 1.0), piecewise_linear=True) == pytest.approx(0.5)
    # A piecewise-linear front dominates more than its own vertices as a staircase.
    assert hypervolume(line, (3.0, 3.0), piecewise_linear=True) > hypervolume(line, (3.0, 3.0))


@pytest.mark.parametrize("seed", range(5))
def test_lp_front_lies_below_every_allocation(seed: int) -> None:
    problem = synthetic_problem(5, bits=(2, 3, 4, 6, 8), seed=seed)
    lp = lp_front(problem, "avg_bits")
    rows = np.arange(problem.n_layers)
    choices = np.array(list(itertools.product(range(problem.n_options), repeat=5)))
    cost = problem.costs["avg_bits"][rows, choices].sum(axis=1)
    loss = problem.sensitivity[rows, choices].sum(axis=1)
    below = np.interp(cost, lp[:, 0], lp[:, 1])
    assert (loss >= below - 1e-12 * np.abs(loss)).all()
    # Its vertices are allocations (the hull steps are whole moves): the ends are exact.
    assert lp[0, 0] == pytest.approx(problem.min_cost("avg_bits"))
    assert lp[-1, 1] == pytest.approx(problem.sensitivity.min(axis=1).sum())
    assert (np.diff(lp[:, 0]) > 0).all() and (np.diff(lp[:, 1]) < 0).all()


def test_front_points_and_errors() -> None:
    problem = synthetic_problem(5, seed=1)
    assert front_points([(1, 2), (3, 4)]).tolist() == [[1.0, 2.0], [3.0, 4.0]]
    from mpsearch.solvers import solve

    front = solve(problem, "ilp")
    assert front_points(front, "avg_bits").shape == (1, 2)
    with pytest.raises(ValueError, match="cost is needed"):
        front_points(front)
    with pytest.raises(ValueError, match="unknown cost 'x'"):
        lp_front(problem, "x")
    assert set(COSTS) == set(problem.costs)
