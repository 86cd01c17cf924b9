"""Budgets: the limits an allocation must meet."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields


@dataclass(frozen=True, kw_only=True)
class Budget:
    """One or several limits an allocation must meet at once.

    Attributes:
        avg_bits: average weight bits, weighted by parameter count.
        size_bytes: bytes of the quantizable layers' weights, quantization scales and zero
            points included (biases and other parameters are not counted).
        bops: bit operations per sample: Σ MACs × weight bits × activation bits (32 for
            float activations).
    """

    avg_bits: float | None = None
    size_bytes: float | None = None
    bops: float | None = None

    def __post_init__(self) -> None:
        limits = self.limits()
        if not limits:
            raise ValueError("a Budget needs at least one limit: avg_bits=, size_bytes= or bops=")
        for name, value in limits.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")

    def limits(self) -> dict[str, float]:
        """The limits that are set, by cost name."""
        return {f.name: float(getattr(self, f.name)) for f in fields(self)
                if getattr(self, f.name) is not None}

    def __str__(self) -> str:
        return ", ".join(f"{k}={v:.6g}" for k, v in self.limits().items())

    @classmethod
    def coerce(cls, budget: Budget | float) -> Budget:
        """A Budget from a Budget, or from a number meaning average weight bits."""
        if isinstance(budget, Budget):
            return budget
        if isinstance(budget, (int, float)) and not isinstance(budget, bool):
            return cls(avg_bits=float(budget))
        raise TypeError(f"budget must be a number (average bits) or a Budget, "
                        f"got {type(budget).__name__}")
