"""Sensitivity estimators: Ω[layer, bits], the predicted loss increase, with error bars."""

import functools
from collections.abc import Callable

from mpsearch.sensitivity.base import Estimator, SensitivityTable
from mpsearch.sensitivity.fisher import Fisher
from mpsearch.sensitivity.hutchinson import Hutchinson, TraceEstimate, hutchinson_traces
from mpsearch.sensitivity.qerror import QError

#: estimator names accepted by ``search(..., sensitivity=NAME)`` (CLI and JSON use names;
#: Python callers may pass an estimator object instead)
ESTIMATORS: dict[str, Callable[..., Estimator]] = {
    "fisher": Fisher,
    "fisher_block": functools.partial(Fisher, block=True),
    "hutchinson": Hutchinson,
    "qerror": QError,
}

__all__ = ["ESTIMATORS", "Estimator", "Fisher", "Hutchinson", "QError", "SensitivityTable",
           "TraceEstimate", "hutchinson_traces"]
