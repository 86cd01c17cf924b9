"""Budgets: the limits an allocation must meet."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np


@dataclass(frozen=True, kw_only=True)
class Budget:
    """One or several limits an allocation must meet at once.

    Attributes:
        avg_bits: average weight bits, weighted by parameter count.
        size_bytes: bytes of the quantizable layers' weights, quantization scales and zero
            points included (biases and other parameters are not counted).
            Like ``avg_bits`` and ``bops``, it covers the searched layers only: layers that
            ``include=``/``exclude=`` leave out stay float outside the budget
            (``validate``'s ``size_bytes_quantized`` counts them).
        bops: bit operations per sample: Σ MACs × weight bits × activation bits (32 for
            float activations).
        latency_us: predicted end-to-end latency (µs) from a measured hardware profile
            (``search(..., profile=...)``).
        latency_ratio: latency as a fraction of the all-INT8 predicted latency (HAWQ-V3
            style), e.g. 0.7; resolved to ``latency_us`` by :meth:`resolved`.
    """

    avg_bits: float | None = None
    size_bytes: float | None = None
    bops: float | None = None
    latency_us: float | None = None
    latency_ratio: float | None = None

    def __post_init__(self) -> None:
        limits = self._set()
        if not limits:
            raise ValueError("a Budget needs at least one limit: avg_bits=, size_bytes=, bops=, "
                             "latency_us= or latency_ratio=")
        if self.latency_us is not None and self.latency_ratio is not None:
            raise ValueError(f"give latency_us={self.latency_us!r} or latency_ratio="
                             f"{self.latency_ratio!r}, not both")
        for name, value in limits.items():
            if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) \
                    or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")
            if isinstance(value, np.number):  # as a plain float (JSON, repr)
                object.__setattr__(self, name, float(value))

    def _set(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(self)
                if getattr(self, f.name) is not None}

    def limits(self) -> dict[str, float]:
        """The limits that are set, by cost name (``latency_ratio`` is not a cost: see
        :meth:`resolved`)."""
        return {k: float(v) for k, v in self._set().items() if k != "latency_ratio"}

    def resolved(self, latency_int8_us: float | None) -> dict[str, float]:
        """The limits by cost name, ``latency_ratio`` turned into ``latency_us``.

        Args:
            latency_int8_us: predicted latency of the all-INT8 model (None: no profile).

        Raises:
            ValueError: a latency ratio without an all-INT8 latency to scale.
        """
        limits = self.limits()
        if self.latency_ratio is not None:
            if latency_int8_us is None:
                raise ValueError(f"latency_ratio={self.latency_ratio} needs a hardware profile "
                                 "(search(..., profile=mpsearch.profile(model, batch)))")
            limits["latency_us"] = float(self.latency_ratio) * float(latency_int8_us)
        return limits

    def __str__(self) -> str:
        return ", ".join(f"{k}={float(v):.6g}" for k, v in self._set().items())

    @classmethod
    def coerce(cls, budget: Budget | float) -> Budget:
        """A Budget from a Budget, or from a number meaning average weight bits."""
        if isinstance(budget, Budget):
            return budget
        if isinstance(budget, (int, float, np.number)) and not isinstance(budget, bool):
            return cls(avg_bits=float(budget))
        raise TypeError(f"budget must be a number (average bits) or a Budget, "
                        f"got {type(budget).__name__}")
