"""Small helpers for the tables the CLI, demo and benchmarks write."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import pandas as pd


def some(names: Sequence[str], limit: int = 5) -> str:
    """The first ``limit`` names, comma-separated, and how many more there are."""
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown}, … ({len(names) - limit} more)"


_SAID: set[tuple[str, str]] = set()


def warn_once(logger: logging.Logger, message: str) -> None:
    """Log ``message`` as a warning the first time this process says it: a search looks at
    the model many times (each stage, each sliced copy), and one warning is enough."""
    if (logger.name, message) not in _SAID:
        _SAID.add((logger.name, message))
        logger.warning("%s", message)


def _fmt(value: object, floatfmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return format(value, floatfmt)
    return str(value)


def markdown_table(frame: pd.DataFrame, floatfmt: str = ".4g", index: bool = False) -> str:
    """A GitHub-flavoured Markdown table of a DataFrame (no extra dependency)."""
    df = frame.reset_index() if index else frame
    header = [str(c) for c in df.columns]
    rows = [[_fmt(v, floatfmt) for v in row] for row in df.itertuples(index=False)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)
