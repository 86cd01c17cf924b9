"""Seeded random allocation problems shared by the problem and solver tests."""

from __future__ import annotations

from typing import Any

import numpy as np

from mpsearch.problem import AllocationProblem

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
