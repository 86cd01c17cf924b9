"""What mpsearch logs while a search it may discard runs (``_report.HeldLogs``)."""

from __future__ import annotations

import logging
import threading

import pytest

from mpsearch._report import HeldLogs, warn_once

log = logging.getLogger("mpsearch.search")


def _said(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records]


def test_held_records_are_said_on_release_and_only_once_warnings_on_drop(
        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="mpsearch"):
        kept, dropped = HeldLogs(), HeldLogs()
        with kept:
            log.warning("kept: a warning")
        with dropped:
            log.warning("dropped: a warning")
            warn_once(log, "dropped: a once-a-process warning about the data")
        assert _said(caplog) == []
        kept.release()
        dropped.drop()
        assert _said(caplog) == ["kept: a warning",
                                 "dropped: a once-a-process warning about the data"]
        log.warning("after: said at once")
        assert _said(caplog)[-1] == "after: said at once"


def test_an_error_releases_and_blocks_nest(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="mpsearch"):
        outer = HeldLogs()
        with outer:
            inner = HeldLogs()
            with inner:
                log.warning("inner")
            inner.release()  # into the enclosing block, not out
            assert _said(caplog) == [] and len(outer.records) == 1
        with pytest.raises(ValueError, match="boom"), HeldLogs():
            log.warning("before the error")
            raise ValueError("boom")
        assert _said(caplog) == ["before the error"]
        outer.release()
        assert _said(caplog) == ["before the error", "inner"]


def test_other_threads_log_as_usual_and_interleaving_leaves_nothing_held(
        caplog: pytest.LogCaptureFixture) -> None:
    """The first version swapped the handlers of the global 'mpsearch' logger: two
    threads entering and leaving out of order left every later record silenced."""
    with caplog.at_level(logging.INFO, logger="mpsearch"):
        a, b = HeldLogs(), HeldLogs()
        a.__enter__()
        done = threading.Event()

        def other() -> None:
            with b:
                log.warning("held in the other thread")
            log.warning("said by the other thread")
            done.set()

        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
        a.__exit__(None, None, None)
        assert done.is_set() and _said(caplog) == ["said by the other thread"]
        assert [r.getMessage() for r in b.records] == ["held in the other thread"]
        log.warning("after both")
        assert _said(caplog)[-1] == "after both" and a.records == []
