"""Sensitivity estimators: Ω[layer, bits], the predicted loss increase, with error bars."""

from mpsearch.sensitivity.base import Estimator, SensitivityTable
from mpsearch.sensitivity.hutchinson import Hutchinson, TraceEstimate, hutchinson_traces

#: estimator names accepted by ``search(..., sensitivity=NAME)`` (CLI and JSON use names;
#: Python callers may pass an estimator object instead)
ESTIMATORS: dict[str, type] = {"hutchinson": Hutchinson}

__all__ = ["ESTIMATORS", "Estimator", "Hutchinson", "SensitivityTable", "TraceEstimate",
           "hutchinson_traces"]
