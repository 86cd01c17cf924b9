"""Model-like random allocation problems, for benchmarks and tests of the solvers.

Shaped like real sensitivity and cost tables: layer sizes and curvatures log-normal
(a few huge layers, many small ones), the loss increase falling about 4x per extra bit
(quantization noise power falls 4x per bit) with per-entry noise but still monotone,
BOPs from MACs, and a latency that is partly memory-bound (grows with bits) and partly
compute-bound (does not), in proportions that differ per layer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from mpsearch.problem import AllocationProblem

__all__ = ["BITS_4", "BITS_5", "COSTS", "synthetic_problem"]

BITS_4 = (2, 3, 4, 8)
BITS_5 = (2, 3, 4, 6, 8)
#: the cost tables every synthetic problem has, in the order budgets are added
COSTS = ("avg_bits", "bops", "latency_us", "size_bytes")


def synthetic_problem(
    n_layers: int,
    *,
    bits: Sequence[int] = BITS_4,
    levels: Mapping[str, float] | None = None,
    n_budgets: int | None = None,
    seed: int = 0,
) -> AllocationProblem:
    """A seeded, model-like allocation problem.

    Args:
        n_layers: number of layers (``layer.0`` ...).
        bits: bits options.
        levels: cost name -> budget level in [0, 1]: the budget is the smallest
            achievable sum plus ``level`` times the achievable range. Default: the first
            ``n_budgets`` of ``avg_bits`` 0.35, ``bops`` 0.4, ``latency_us`` 0.5.
        n_budgets: with ``levels`` None, how many of the default budgets (1-3; default 1).
        seed: seed of every random draw.

    Returns:
        The problem, with costs ``avg_bits``, ``bops``, ``latency_us``, ``size_bytes``.

    Raises:
        ValueError: bad sizes, levels or budget count.
    """
    if not (isinstance(n_layers, int) and n_layers >= 1):
        raise ValueError(f"n_layers must be an int >= 1, got {n_layers!r}")
    if levels is not None and n_budgets is not None:
        raise ValueError("give levels or n_budgets, not both")
    if levels is None:
        count = 1 if n_budgets is None else n_budgets
        if count not in (0, 1, 2, 3):
            raise ValueError(f"n_budgets must be 0-3, got {n_budgets!r}")
        defaults = {"avg_bits": 0.35, "bops": 0.4, "latency_us": 0.5}
        levels = dict(list(defaults.items())[:count])
    bad = {k: v for k, v in levels.items() if k not in COSTS or not 0.0 <= v <= 1.0}
    if bad:
        raise ValueError(f"levels must map costs {COSTS} to values in [0, 1], got {bad}")
    rng = np.random.default_rng(seed)
    b = np.asarray(sorted(int(x) for x in bits), dtype=np.float64)
    params = np.clip(np.round(rng.lognormal(11.0, 1.5, n_layers)), 256, 5e8)
    out_channels = np.maximum(np.round(np.sqrt(params) * rng.uniform(0.5, 2.0, n_layers)), 1)
    spatial = np.where(rng.random(n_layers) < 0.3, rng.lognormal(5.0, 1.5, n_layers), 1.0)
    macs = params * np.maximum(np.round(spatial), 1.0)
    # Loss increase: curvature x size x noise power; noise falls ~4x per bit.
    curvature = rng.lognormal(-12.0, 1.5, n_layers)
    per_bit = rng.uniform(3.0, 5.0, (n_layers, 1)) ** -(b - b[0])
    noise = rng.uniform(0.7, 1.3, (n_layers, len(b)))
    omega = curvature[:, None] * params[:, None] * per_bit * noise
    omega = np.minimum.accumulate(omega, axis=1)  # more bits never hurt
    memory = rng.lognormal(0.0, 1.0, n_layers) * params * 1e-4  # us per byte-ish
    compute = rng.lognormal(0.0, 1.0, n_layers) * macs * 1e-5
    costs = {
        "avg_bits": params[:, None] * b / params.sum(),
        "bops": macs[:, None] * b * 32.0,
        "latency_us": memory[:, None] * b / 8.0 + compute[:, None],
        "size_bytes": params[:, None] * b / 8.0 + 2.0 * out_channels[:, None],
    }
    problem = AllocationProblem(
        [f"layer.{i}" for i in range(n_layers)], b.astype(int).tolist(), omega, costs, {}
    )
    budgets = {
        name: problem.min_cost(name) + level * (problem.max_cost(name) - problem.min_cost(name))
        for name, level in levels.items()
    }
    return problem.with_budgets(budgets)
