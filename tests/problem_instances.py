"""Seeded random allocation problems shared by the problem and solver tests."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np

from mpsearch.problem import AllocationProblem
from mpsearch.solvers.synthetic import BITS_5, synthetic_problem

#: cost names and scales: budgets from O(1) to O(1e12), as real avg_bits / bytes / BOPs
COSTS = {"avg_bits": 1.0, "size_bytes": 1e6, "bops": 1e12}


def random_structure(seed: int, *, tie_p: float = 0.5, pin_p: float = 0.25
                     ) -> tuple[AllocationProblem, dict[str, Any], np.random.Generator]:
    """A small problem (≤ 6 layers × ≤ 4 options) with random ties, pins, mask and no budget.

    Returns the problem, its raw inputs (for brute force) and the generator, so callers can
    draw budgets from the same stream.
    """
    rng = np.random.default_rng(seed)
    n_layers, n_options = int(rng.integers(1, 7)), int(rng.integers(1, 5))
    layers = [f"m.{i}" for i in range(n_layers)]
    bits = sorted(rng.choice([2, 3, 4, 5, 6, 8], n_options, replace=False).tolist())
    allowed = rng.random((n_layers, n_options)) < 0.8
    allowed[np.arange(n_layers), rng.integers(0, n_options, n_layers)] = True
    ties: list[list[str]] = []
    if n_layers >= 2 and rng.random() < tie_p:
        group = rng.choice(n_layers, int(rng.integers(2, min(3, n_layers) + 1)), replace=False)
        allowed[group, rng.integers(0, n_options)] = True
        ties.append([layers[i] for i in sorted(group)])
    pinned: dict[str, int] = {}
    if rng.random() < pin_p:
        layer = int(rng.integers(0, n_layers))
        tied = next((g for g in ties if layers[layer] in g), [layers[layer]])
        common = np.flatnonzero(allowed[[layers.index(n) for n in tied]].all(axis=0))
        pinned[layers[layer]] = bits[int(rng.choice(common))]
    costs = {k: rng.random((n_layers, n_options)) * s for k, s in COSTS.items()}
    # estimators can report small negative increases
    sensitivity = rng.random((n_layers, n_options)) - (0.3 if rng.random() < 0.2 else 0.0)
    raw = {"layers": layers, "bits": bits, "allowed": allowed, "ties": ties, "pinned": pinned,
           "costs": costs, "sensitivity": sensitivity}
    problem = AllocationProblem(layers, bits, sensitivity, costs, {}, ties=ties, pinned=pinned,
                                allowed=allowed)
    return problem, raw, rng


def random_budgeted(seed: int) -> tuple[AllocationProblem, dict[str, Any]]:
    """Random tables (no structure), random ties/pins/mask, 1-3 budgets near a choice."""
    structural, raw, rng = random_structure(seed)
    names = rng.choice(list(COSTS), int(rng.integers(1, 4)), replace=False).tolist()
    anchor = structural.evaluate(
        structural.expand([rng.choice(np.flatnonzero(row)) for row in structural.unit_allowed])
    )
    budgets = {}
    for name in names:
        high = structural.max_cost(name)
        budgets[name] = anchor[name] + float(rng.random()) ** 2 * (high - anchor[name]) * 0.3
    return structural.with_budgets(budgets), raw


def brute_force(problem: AllocationProblem) -> float | None:
    """Least loss over every unit choice (ties, pins, mask, budgets), or None.

    Enumerated with numpy; the winner is confirmed with the exact (fsum) check, walking
    on in loss order past any choice that only numpy's rounding let through.
    """
    options = [np.flatnonzero(row) for row in problem.unit_allowed]
    units = np.array(list(itertools.product(*options)), dtype=np.int64)
    choices = units[:, problem.unit_of]
    rows = np.arange(problem.n_layers)
    loss = problem.sensitivity[rows, choices].sum(axis=1)
    near = np.ones(len(choices), dtype=bool)
    for name, limit in problem.budgets.items():
        near &= problem.costs[name][rows, choices].sum(axis=1) <= limit + 1e-9 * abs(limit)
    for index in np.flatnonzero(near)[np.argsort(loss[near], kind="stable")]:
        if problem.is_feasible(choices[index]):
            return problem.evaluate(choices[index])["loss"]
    return None


def model_like(seed: int) -> AllocationProblem:
    """A small synthetic model-like problem (monotone tables) with 1-3 budgets."""
    rng = np.random.default_rng(seed)
    count = int(rng.integers(1, 4))
    names = ["avg_bits", "bops", "latency_us"][:count]
    levels = dict(zip(names, rng.uniform(0.05, 0.9, count).tolist()))
    bits = BITS_5 if seed % 2 else (2, 3, 4, 8)
    return synthetic_problem(int(rng.integers(2, 7)), bits=bits, levels=levels, seed=seed)
