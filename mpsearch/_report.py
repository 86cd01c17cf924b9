"""Small helpers for the tables the CLI, demo and benchmarks write."""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import pandas as pd

if TYPE_CHECKING:
    from typing_extensions import Self


def some(names: Sequence[str], limit: int = 5) -> str:
    """The first ``limit`` names, comma-separated, and how many more there are."""
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown}, … ({len(names) - limit} more)"


def width_name(bits: int) -> str:
    """A map's width as a reader says it: ``INT4``, ``FP16``, ``float`` (32 bits)."""
    return "float" if bits >= 32 else "FP16" if bits == 16 else f"INT{bits}"


_SAID: set[tuple[str, str]] = set()


def warn_once(logger: logging.Logger, message: str) -> None:
    """Log ``message`` as a warning the first time this process says it: a search looks at
    the model many times (each stage, each sliced copy), and one warning is enough."""
    if (logger.name, message) not in _SAID:
        _SAID.add((logger.name, message))
        logger.warning("%s", message, extra={"said_once": True})


_HOLDING = threading.local()


class _Hold(logging.Filter):
    """On every mpsearch logger: a record logged in a thread inside a :class:`HeldLogs`
    block is kept by the innermost one instead of being logged."""

    def filter(self, record: logging.LogRecord) -> bool:
        stack = getattr(_HOLDING, "stack", None)
        if stack:
            stack[-1].append(record)
            return False
        return True


_HOLD = _Hold()


class HeldLogs:
    """Hold back what mpsearch logs in this thread while a search that may be discarded
    runs (``slices="auto"`` runs a per-layer and a sliced search and keeps one): on
    :meth:`release` the records are logged as they would have been; on :meth:`drop` only
    those of :func:`warn_once` (about the model or data, said once a process) are, not the
    rest (a discarded table's unconverged traces, its map's layers). Leaving the block by
    an error releases them. Other threads log as usual; blocks nest."""

    def __init__(self) -> None:
        self.records: list[logging.LogRecord] = []

    def __enter__(self) -> Self:
        for name, logger in list(logging.Logger.manager.loggerDict.items()):
            if ((name == "mpsearch" or name.startswith("mpsearch."))
                    and isinstance(logger, logging.Logger) and _HOLD not in logger.filters):
                logger.addFilter(_HOLD)
        if not hasattr(_HOLDING, "stack"):
            _HOLDING.stack = []
        _HOLDING.stack.append(self.records)
        return self

    def __exit__(self, kind: object, *_: object) -> None:
        stack = _HOLDING.stack
        for k in range(len(stack) - 1, -1, -1):  # this block's own list (by identity)
            if stack[k] is self.records:
                del stack[k]
                break
        if kind is not None:
            self.release()

    def release(self) -> None:
        """Log the held records (into an enclosing block, if this thread is in one)."""
        self._emit(lambda _: True)

    def drop(self) -> None:
        """Log only the held :func:`warn_once` records."""
        self._emit(lambda r: bool(getattr(r, "said_once", False)))

    def _emit(self, keep: Callable[[logging.LogRecord], bool]) -> None:
        records, self.records[:] = list(self.records), []
        for record in records:
            if keep(record):
                logging.getLogger(record.name).handle(record)


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
