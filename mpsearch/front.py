"""What solvers hand back: solutions and the non-dominated front they form.

Plain numpy and pandas; no torch.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from numpy.typing import NDArray

__all__ = ["BoolArray", "FloatArray", "Front", "IntArray", "Solution"]

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]
BoolArray = NDArray[np.bool_]


@dataclass(frozen=True, eq=False)
class Solution:
    """One allocation.

    Attributes:
        choice: length-``L`` read-only int array, the option index (into the problem's
            ``bits``) per layer.
        bits: layer name -> bits.
        loss: predicted loss increase (summed sensitivity).
        costs: every cost of the problem, summed over layers.
    """

    choice: IntArray
    bits: dict[str, int]
    loss: float
    costs: dict[str, float]


def _non_dominated(points: FloatArray) -> list[int]:
    """Indices of rows no other row weakly beats everywhere and strictly somewhere."""
    keep = []
    for i, point in enumerate(points):
        beaten = (points <= point).all(axis=1) & (points < point).any(axis=1)
        if not beaten.any():
            keep.append(i)
    return keep


@dataclass(frozen=True, eq=False)
class Front:
    """What a solver returns: non-dominated solutions plus how the search ended.

    Attributes:
        solutions: non-dominated solutions, sorted by the first objective cost ascending
            (the first budgeted cost, or the swept cost), or by loss when there is none.
        solver: the solver's name.
        status: ``"optimal"`` (proved), ``"feasible"`` (stopped early by a time or gap
            limit, or a heuristic, with solutions), ``"timeout"`` (stopped with none),
            ``"infeasible"`` (none exists).
        time_s: wall time of the search.
        gap: relative optimality gap of the loss where known; ``0.0`` when proved
            optimal, ``None`` when unknown.
    """

    solutions: tuple[Solution, ...]
    solver: str
    status: str
    time_s: float
    gap: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "solutions", tuple(self.solutions))
        if self.gap is not None and not self.gap >= 0:
            raise ValueError(f"gap must be >= 0 or None, got {self.gap}")

    @classmethod
    def build(
        cls,
        solutions: Iterable[Solution],
        *,
        objectives: Sequence[str] = (),
        solver: str,
        status: str,
        time_s: float,
        gap: float | None = None,
    ) -> Front:
        """Deduplicate, keep the non-dominated solutions and sort them.

        Args:
            solutions: candidate solutions, in any order.
            objectives: cost names minimised alongside loss (usually the budgeted costs);
                the first one is the sort key.
            solver: see the attributes.
            status: see the attributes.
            time_s: see the attributes.
            gap: see the attributes.
        """
        unique: dict[bytes, Solution] = {}
        for solution in solutions:
            unique.setdefault(np.asarray(solution.choice, dtype=np.int64).tobytes(), solution)
        pool = list(unique.values())
        points = np.array(
            [[s.loss, *(s.costs[k] for k in objectives)] for s in pool], dtype=np.float64
        ).reshape(len(pool), 1 + len(objectives))
        # Equal objective vectors are kept once (the first seen).
        _, first = np.unique(points, axis=0, return_index=True)
        distinct = sorted(first.tolist())
        kept = [pool[distinct[j]] for j in _non_dominated(points[distinct])]
        if objectives:
            kept.sort(key=lambda s: (s.costs[objectives[0]], s.loss))
        else:
            kept.sort(key=lambda s: s.loss)
        return cls(tuple(kept), solver=solver, status=status, time_s=time_s, gap=gap)

    def __len__(self) -> int:
        return len(self.solutions)

    @property
    def best(self) -> Solution:
        """The lowest-loss solution.

        Raises:
            ValueError: the front is empty.
        """
        if not self.solutions:
            raise ValueError(
                f"front from {self.solver!r} is empty (status {self.status!r}); relax the "
                "budgets or give the solver more time"
            )
        return min(self.solutions, key=lambda s: s.loss)

    def to_frame(self) -> pd.DataFrame:
        """One row per solution: ``loss``, each cost, and ``bits`` (the layer->bits dict)."""
        costs = list(self.solutions[0].costs) if self.solutions else []
        rows = [{"loss": s.loss, **s.costs, "bits": dict(s.bits)} for s in self.solutions]
        return pd.DataFrame(rows, columns=["loss", *costs, "bits"])
