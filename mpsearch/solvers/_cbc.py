"""Running CBC through PuLP: finding the binary, reading the gap from its log."""

from __future__ import annotations

import re
import warnings
from typing import Any

__all__ = ["absolute_gap", "cbc"]


def cbc(**options: Any) -> Any:
    """CBC as shipped with PuLP where present (reproducible), else a ``cbc`` on PATH."""
    import pulp

    bundled = getattr(pulp, "PULP_CBC_CMD", None)
    if bundled is not None:
        with warnings.catch_warnings():
            # PuLP 3.3 deprecates the bundled binary ahead of 4.0; COIN_CMD is the fallback.
            warnings.simplefilter("ignore", DeprecationWarning)
            solver = bundled(**options)
        if solver.available():
            return solver
    solver = pulp.COIN_CMD(**options)
    if not solver.available():
        raise RuntimeError(
            "no CBC binary found: PuLP's bundled CBC is missing; install one with "
            "`pip install pulp[cbc]` or put `cbc` on PATH"
        )
    return solver


NUMBER = r"([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)"


def absolute_gap(log: str) -> float | None:
    """Incumbent minus best bound, in model objective units, from a CBC log."""
    found = re.search(r"Exiting as integer gap of " + NUMBER, log)
    if found:
        return float(found.group(1))
    objective = re.search(r"Objective value:\s+" + NUMBER, log)
    bound = re.search(r"Lower bound:\s+" + NUMBER, log)
    if objective and bound:
        # CBC prints the bound rounded; widen by half a printed digit to stay an upper bound.
        text = bound.group(1).lower()
        digits = len(text.split(".")[1]) if "." in text and "e" not in text else 0
        rounding = 0.5 * 10.0**-digits if digits else 0.0
        return max(float(objective.group(1)) - float(bound.group(1)) + rounding, 0.0)
    found = re.search(r"best objective " + NUMBER + r" \(best possible " + NUMBER, log)
    if found:
        return max(float(found.group(1)) - float(found.group(2)), 0.0)
    return None
