"""Exceptions raised by mpsearch."""

from __future__ import annotations

from collections.abc import Mapping


class InfeasibleBudget(ValueError):
    """No allocation meets the budget.

    Attributes:
        smallest: for each budgeted cost, the smallest value any allocation achieves
            (with the pins, ties and allowed options of the problem).
    """

    def __init__(self, message: str, smallest: Mapping[str, float] | None = None) -> None:
        super().__init__(message)
        self.smallest: dict[str, float] = dict(smallest or {})


class BitMapError(ValueError):
    """A bit map file is malformed, of an unknown version, or does not fit the model."""
