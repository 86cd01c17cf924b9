"""mpsearch: mixed-precision bit-allocation search for PyTorch.

The verbs: :func:`search` finds a bit map within a budget, :func:`quantize` applies it,
:func:`validate` measures it; :class:`BitMap` is the artefact users keep and share.
"""

from mpsearch._version import __version__
from mpsearch.bitmap import BitMap, LayerEntry
from mpsearch.budget import Budget
from mpsearch.errors import BitMapError, InfeasibleBudget
from mpsearch.hw import HardwareProfile, export_onnx, profile
from mpsearch.layers import LayerInfo, discover
from mpsearch.plot import plot_bitmap, plot_front, plot_sensitivity
from mpsearch.problem import AllocationProblem, Front, Solution
from mpsearch.quant import QuantConfig
from mpsearch.quant.apply import quantize, quantize_
from mpsearch.search import SearchResult, search
from mpsearch.sensitivity import Fisher, Hutchinson, QError, SensitivityTable
from mpsearch.slices import SlicePlan, coalesce, merge_slices, slice_model
from mpsearch.solvers import GreedySolver, ILPSolver, NSGA2Solver, solve
from mpsearch.validate import ValidationReport, validate

__all__ = [
    "AllocationProblem",
    "BitMap",
    "BitMapError",
    "Budget",
    "Fisher",
    "Front",
    "GreedySolver",
    "HardwareProfile",
    "Hutchinson",
    "ILPSolver",
    "InfeasibleBudget",
    "LayerEntry",
    "LayerInfo",
    "NSGA2Solver",
    "QError",
    "QuantConfig",
    "SearchResult",
    "SensitivityTable",
    "SlicePlan",
    "Solution",
    "ValidationReport",
    "__version__",
    "coalesce",
    "discover",
    "export_onnx",
    "merge_slices",
    "plot_bitmap",
    "plot_front",
    "plot_sensitivity",
    "profile",
    "quantize",
    "quantize_",
    "search",
    "slice_model",
    "solve",
    "validate",
]
