"""How good a front is: hypervolume, and the LP bound every front lies above.

For two objectives (loss and one cost, both minimised). The *hypervolume* of a front is
the area it dominates up to a reference point; larger is better. The LP relaxation of
the allocation problem (each unit may mix two options) has a convex piecewise-linear
front no allocation can beat, so its area bounds the exact front's from above: a
front's area divided by it is a lower bound on the fraction of the exact area reached.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import numpy as np

from mpsearch.problem import AllocationProblem, FloatArray, Front

__all__ = ["front_points", "hypervolume", "lp_front"]


def front_points(front: Front | Iterable[tuple[float, float]], cost: str | None = None
                 ) -> FloatArray:
    """``N x 2`` array of (cost, loss) from a front (``cost`` needed) or from pairs."""
    if isinstance(front, Front):
        if cost is None:
            raise ValueError("cost is needed to read points from a Front, e.g. 'avg_bits'")
        pairs = [(s.costs[cost], s.loss) for s in front.solutions]
    else:
        pairs = [(float(c), float(v)) for c, v in front]
    return np.array(pairs, dtype=np.float64).reshape(len(pairs), 2)


def hypervolume(points: FloatArray, reference: tuple[float, float], *,
                piecewise_linear: bool = False) -> float:
    """Area dominated by ``points`` (cost, loss) and bounded by ``reference``.

    Args:
        points: ``N x 2`` (cost, loss) pairs; points not strictly better than the
            reference in both objectives add nothing.
        reference: (cost, loss) reference point.
        piecewise_linear: treat the points as vertices of a continuous front joined by
            straight segments (the LP front) instead of a staircase.

    Returns:
        The area (0.0 for no point inside the reference box).
    """
    ref_cost, ref_loss = reference
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if not piecewise_linear:
        pts = pts[(pts[:, 0] < ref_cost) & (pts[:, 1] < ref_loss)]
        if not len(pts):
            return 0.0
        pts = pts[np.lexsort((pts[:, 1], pts[:, 0]))]
        best = np.minimum.accumulate(pts[:, 1])  # staircase: best loss so far by cost
        right = np.append(pts[1:, 0], ref_cost)
        return float(((right - pts[:, 0]) * (ref_loss - best)).sum())
    pts = pts[np.argsort(pts[:, 0], kind="stable")]
    # Clip the segments to the reference box and integrate (ref_loss - loss)+ exactly.
    area = 0.0
    for (c0, l0), (c1, l1) in itertools.pairwise(pts):
        if c1 <= c0 or c0 >= ref_cost:
            continue
        if c1 > ref_cost:
            l1 = l0 + (l1 - l0) * (ref_cost - c0) / (c1 - c0)
            c1 = ref_cost
        h0, h1 = ref_loss - l0, ref_loss - l1
        if h0 <= 0 and h1 <= 0:
            continue
        if h0 >= 0 and h1 >= 0:
            area += 0.5 * (h0 + h1) * (c1 - c0)
        else:  # crosses the reference loss: keep the positive triangle
            cross = c0 + (c1 - c0) * h0 / (h0 - h1)
            area += 0.5 * max(h0, h1) * ((cross - c0) if h0 > 0 else (c1 - cross))
    last_cost, last_loss = pts[-1]
    if last_cost < ref_cost and last_loss < ref_loss:
        area += (ref_cost - last_cost) * (ref_loss - last_loss)
    return area


def lp_front(problem: AllocationProblem, cost: str) -> FloatArray:
    """Vertices (cost, loss) of the LP relaxation's front of loss against ``cost``.

    Each unit climbs the lower convex hull of its open options (ties, pins and
    ``allowed`` respected; other budgets ignored); merging every unit's hull steps by
    loss saved per cost gives the convex front no allocation lies below.

    Returns:
        ``N x 2`` array from the cheapest allocation to the least-loss one.
    """
    if cost not in problem.costs:
        raise ValueError(f"unknown cost {cost!r}; costs are {sorted(problem.costs)}")
    loss = problem.unit_table(problem.sensitivity)
    price = problem.unit_table(problem.costs[cost])
    allowed = problem.unit_allowed
    steps: list[tuple[float, float, float]] = []  # (-rate, d_cost, d_loss)
    start_cost = start_loss = 0.0
    for unit in range(problem.n_units):
        open_ = np.flatnonzero(allowed[unit])
        c, v = price[unit, open_], loss[unit, open_]
        order = np.lexsort((v, c))
        c, v = c[order], v[order]
        start_cost += float(c[0])
        start_loss += float(v[0])
        at = 0
        while True:  # next vertex of the lower hull: the steepest loss drop per cost
            later = np.flatnonzero((c > c[at]) & (v < v[at]))
            if not len(later):
                break
            rates = (v[at] - v[later]) / (c[later] - c[at])
            nxt = int(later[np.argmax(rates)])
            steps.append((-float(rates.max()), float(c[nxt] - c[at]), float(v[nxt] - v[at])))
            at = nxt
    steps.sort()
    deltas = np.array([(d_cost, d_loss) for _, d_cost, d_loss in steps]).reshape(-1, 2)
    vertices = np.vstack([[start_cost, start_loss], deltas]).cumsum(axis=0)
    return vertices
