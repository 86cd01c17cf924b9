"""The sensitivity table and the estimator protocol.

Every estimator answers one question: how much does the calibration loss grow if layer l
alone is quantized to b bits? The answer, ``omega[l, b]``, comes with a standard error.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
import pandas as pd
import torch
from torch import nn

if TYPE_CHECKING:
    from mpsearch.layers import LayerInfo
    from mpsearch.losses import Objective
    from mpsearch.quant import QuantConfig


@dataclass(frozen=True)
class SensitivityTable:
    """Ω[layer, bits]: predicted loss increase of quantizing each layer alone.

    Attributes:
        layers: layer FQNs (rows).
        bits: candidate bit-widths (columns).
        omega: L×B predicted loss increase.
        omega_stderr: L×B standard error of ``omega``.
        columns: extra per-layer columns (e.g. ``trace``, ``trace_stderr``).
        estimator: the estimator's name.
        settings: the estimator's settings, JSON-ready.
        diagnostics: how the estimate went (probes used, convergence trace, time).
    """

    layers: tuple[str, ...]
    bits: tuple[int, ...]
    omega: np.ndarray
    omega_stderr: np.ndarray
    columns: Mapping[str, np.ndarray] = field(default_factory=dict)
    estimator: str = ""
    settings: Mapping[str, Any] = field(default_factory=dict)
    diagnostics: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        shape = (len(self.layers), len(self.bits))
        for name in ("omega", "omega_stderr"):
            arr = np.asarray(getattr(self, name), dtype=np.float64)
            if arr.shape != shape:
                raise ValueError(f"{name} must have shape {shape}, got {arr.shape}")
            object.__setattr__(self, name, arr)
        for key, col in self.columns.items():
            if np.asarray(col).shape != (len(self.layers),):
                raise ValueError(f"column {key!r} must have length {len(self.layers)}")

    def to_frame(self) -> pd.DataFrame:
        """One row per layer: ``omega_<b>``, ``omega_<b>_stderr`` and the extra columns."""
        frame = pd.DataFrame(index=pd.Index(self.layers, name="layer"))
        for key, col in self.columns.items():
            frame[key] = np.asarray(col)
        for j, b in enumerate(self.bits):
            frame[f"omega_{b}"] = self.omega[:, j]
        for j, b in enumerate(self.bits):
            frame[f"omega_{b}_stderr"] = self.omega_stderr[:, j]
        return frame

    def select(self, layers: Sequence[str], bits: Sequence[int]) -> SensitivityTable:
        """The sub-table for these layers and bit-widths, in this order.

        Raises:
            ValueError: a layer or bit-width is not in the table.
        """
        rows = {n: i for i, n in enumerate(self.layers)}
        cols = {b: j for j, b in enumerate(self.bits)}
        missing = [n for n in layers if n not in rows]
        if missing:
            raise ValueError(f"sensitivity table has no row for layer(s) {missing[:5]}")
        missing_b = [b for b in bits if b not in cols]
        if missing_b:
            raise ValueError(f"sensitivity table has no column for bits {missing_b}; "
                             f"it covers {list(self.bits)}")
        r = [rows[n] for n in layers]
        c = [cols[b] for b in bits]
        return SensitivityTable(
            tuple(layers), tuple(bits), self.omega[np.ix_(r, c)], self.omega_stderr[np.ix_(r, c)],
            {k: np.asarray(v)[r] for k, v in self.columns.items()},
            self.estimator, dict(self.settings), dict(self.diagnostics),
        )


@runtime_checkable
class Estimator(Protocol):
    """What a sensitivity estimator provides.

    ``estimate`` must leave the model's weights as it found them; the caller restores
    modes, ``requires_grad`` and hooks.
    """

    @property
    def name(self) -> str:
        """The estimator's name (recorded in tables and bit maps)."""
        ...

    def estimate(self, model: nn.Module, modules: Mapping[str, nn.Module],
                 layers: Sequence[LayerInfo], objective: Objective, bits: Sequence[int],
                 qconfig: QuantConfig, *, device: torch.device, seed: int,
                 progress: bool) -> SensitivityTable:
        """Score every layer at every bit-width."""
        ...
