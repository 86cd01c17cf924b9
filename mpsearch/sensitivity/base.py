"""The sensitivity table and the estimator protocol.

Every estimator answers one question: how much does the calibration loss grow if layer l
alone is quantized to b bits? The answer, ``omega[l, b]``, comes with a standard error.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
import pandas as pd
import torch
from torch import nn

from mpsearch._io import dumps, write_text_atomic

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
        settings: the estimator's settings, JSON-ready; :func:`mpsearch.search` adds its
            quantizer's ``qconfig`` and, after a sliced search, the slice plan (``slices``,
            :meth:`mpsearch.SlicePlan.to_dict`), which a search given the table reuses.
        diagnostics: how the estimate went (probes used, convergence trace, time).
        model_fingerprint: sha256 of the shapes and values of the model's state_dict it was
            measured on — weights, biases, buffers such as BatchNorm statistics (set by
            :func:`mpsearch.search`; a table is reused only on the same state).
        data_fingerprint: sha256 of the calibration batches and the loss kind.
    """

    layers: tuple[str, ...]
    bits: tuple[int, ...]
    omega: np.ndarray
    omega_stderr: np.ndarray
    columns: Mapping[str, np.ndarray] = field(default_factory=dict)
    estimator: str = ""
    settings: Mapping[str, Any] = field(default_factory=dict)
    diagnostics: Mapping[str, Any] = field(default_factory=dict)
    model_fingerprint: str = ""
    data_fingerprint: str = ""

    def __post_init__(self) -> None:
        for what, values in (("layers", self.layers), ("bits", self.bits)):
            repeated = sorted(str(v) for v, k in Counter(values).items() if k > 1)
            if repeated:
                raise ValueError(f"{what} must be distinct; repeated: {repeated[:10]}")
        qconfig = self.settings.get("qconfig")
        if qconfig is not None and not isinstance(qconfig, Mapping):
            raise ValueError(f"settings['qconfig'] must be an object of the quantizer's "
                             f"fields, got {qconfig!r}")
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
            self.model_fingerprint, self.data_fingerprint,
        )

    def noisy_rows(self) -> np.ndarray:
        """Indices of the rows with an entry below zero: quantizing that layer alone
        *lowered* the calibration loss at some width (see :meth:`planning_omega`); by more
        than float rounding (1e-6 of the table's largest entry). None for a divergence
        from the float model (``kl``, ``mse``), which no quantization lowers: a value
        below zero there is rounding (-1e-8 at 16 bits)."""
        if self.diagnostics.get("loss") in ("kl", "mse"):
            return np.zeros(0, dtype=np.int64)
        finite = np.abs(self.omega[np.isfinite(self.omega)])
        tol = 1e-6 * float(finite.max()) if finite.size else 0.0
        return np.flatnonzero((self.omega < -tol).any(axis=1))

    def planning_omega(self) -> np.ndarray:
        """Ω as the solver reads it: the table itself, save for :meth:`noisy_rows`.

        A quantizer only adds noise to the weights; where a layer quantized alone measured
        a *lower* loss than the float model (the label loss or a custom ``loss_fn`` on a
        small calibration set can do that), the gain is noise, and taken at face value it
        makes the fewest bits look best, at any budget. In those rows each entry is charged
        at least its standard error (at least 0), as Hutchinson charges an unresolved
        trace; the row is made non-increasing in bits (no width rated less damaging than a
        wider one); and where entries tie, the wider width is rated lower by a margin of
        1e-9 of the table's largest entry, so a budget with room is spent on width rather
        than left to chance. Other rows are untouched.
        """
        return planning_rows(self.omega, self.omega_stderr, self.bits, self.noisy_rows())

    def to_dict(self) -> dict[str, Any]:
        """A plain-JSON document (non-finite numbers as the strings ``"inf"``/``"nan"``)."""
        return {
            "format": TABLE_FORMAT, "format_version": TABLE_FORMAT_VERSION,
            "layers": list(self.layers), "bits": list(self.bits),
            "omega": _json_numbers(self.omega), "omega_stderr": _json_numbers(self.omega_stderr),
            "columns": {k: _json_numbers(np.asarray(v, dtype=np.float64))
                        for k, v in self.columns.items()},
            "estimator": self.estimator, "settings": _json_value(self.settings),
            "diagnostics": _json_value(self.diagnostics),
            "model_fingerprint": self.model_fingerprint,
            "data_fingerprint": self.data_fingerprint,
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the table as JSON, atomically; reload it with :meth:`load`."""
        return write_text_atomic(path, dumps(self.to_dict()))

    @classmethod
    def from_dict(cls, doc: Any) -> SensitivityTable:
        """Validate a JSON document written by :meth:`to_dict`.

        Raises:
            ValueError: not a sensitivity table, another version, or malformed fields.
        """
        if not isinstance(doc, Mapping) or doc.get("format") != TABLE_FORMAT:
            found = doc.get("format") if isinstance(doc, Mapping) else type(doc).__name__
            raise ValueError(f"not an mpsearch sensitivity table (format {found!r}, "
                             f"expected {TABLE_FORMAT!r})")
        if (doc.get("format_version") != TABLE_FORMAT_VERSION
                or isinstance(doc.get("format_version"), bool)):  # true == 1 in Python
            raise ValueError(f"unknown sensitivity table format_version "
                             f"{doc.get('format_version')!r}; this mpsearch reads "
                             f"{TABLE_FORMAT_VERSION}")
        for key, kind in (("layers", list), ("bits", list), ("columns", Mapping),
                          ("settings", Mapping), ("diagnostics", Mapping)):
            if key in doc and not isinstance(doc[key], kind):
                raise ValueError(f"malformed sensitivity table: {key!r} must be "
                                 f"{'a list' if kind is list else 'an object'}, got "
                                 f"{type(doc[key]).__name__}")
        layers, bits = doc.get("layers", []), doc.get("bits", [])
        if not all(isinstance(n, str) for n in layers) or not all(
                isinstance(b, int) and not isinstance(b, bool) for b in bits):
            raise ValueError("malformed sensitivity table: 'layers' must be names and 'bits' "
                             f"integers, got {layers[:5]} and {bits}")
        try:
            return cls(
                tuple(doc["layers"]), tuple(doc["bits"]),
                _from_json_numbers(doc["omega"]), _from_json_numbers(doc["omega_stderr"]),
                {str(k): _from_json_numbers(v) for k, v in doc.get("columns", {}).items()},
                str(doc.get("estimator", "")), dict(doc.get("settings", {})),
                dict(doc.get("diagnostics", {})), str(doc.get("model_fingerprint", "")),
                str(doc.get("data_fingerprint", "")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed sensitivity table: {exc!r}") from None

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SensitivityTable:
        """Read a table written by :meth:`save`.

        Raises:
            ValueError: malformed JSON or not a sensitivity table (the message names the file).
        """
        try:
            doc = json.loads(Path(path).read_text(encoding="utf-8"))
            return cls.from_dict(doc)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path}: {exc}") from None


TABLE_FORMAT = "mpsearch.sensitivity"
TABLE_FORMAT_VERSION = 1


def planning_rows(omega: np.ndarray, stderr: np.ndarray | None, bits: Sequence[int],
                  rows: Sequence[int] | np.ndarray) -> np.ndarray:
    """``omega`` with ``rows`` charged at least their standard error (``stderr``; None: 0)
    and at least 0, made non-increasing in bits, ties broken toward the wider width
    (:meth:`SensitivityTable.planning_omega`)."""
    out = np.array(omega, dtype=np.float64)
    if not len(rows):
        return out
    floor = np.zeros_like(out) if stderr is None else np.nan_to_num(
        np.asarray(stderr, dtype=np.float64), nan=0.0, posinf=0.0)
    finite = np.abs(out[np.isfinite(out)])
    margin = 1e-9 * max(float(finite.max()) if finite.size else 0.0, 1e-30)
    wide_first = sorted(range(len(bits)), key=lambda j: -bits[j])
    for i in rows:
        running = -math.inf
        for step, j in enumerate(wide_first):
            value = max(out[i, j], floor[i, j], 0.0)
            running = max(value, running + margin) if step else value
            out[i, j] = running
    return out


def _json_numbers(arr: np.ndarray) -> Any:
    return [_json_numbers(a) for a in arr] if arr.ndim else (
        float(arr) if np.isfinite(arr) else str(float(arr)))


def _from_json_numbers(values: Any) -> np.ndarray:
    def conv(v: Any) -> Any:
        if isinstance(v, list):
            return [conv(x) for x in v]
        if isinstance(v, str) and v not in ("inf", "-inf", "nan"):
            raise ValueError(f"not a number: {v!r}")
        return float(v)
    return np.asarray(conv(values), dtype=np.float64)


def _json_value(value: Any) -> Any:
    """Diagnostics and settings as plain JSON (tuples → lists, numpy → Python numbers)."""
    if isinstance(value, Mapping):
        return {str(k): _json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    if isinstance(value, np.ndarray):
        return _json_value(value.tolist())
    if isinstance(value, (np.integer, np.floating)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


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
