"""The bit map: per-layer quantization settings, as versioned plain JSON.

Plain JSON only: never pickle, never import a class named in a file. Loading validates
every field and rejects unknown versions with a clear message.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from mpsearch._io import dumps, json_safe, write_text_atomic
from mpsearch._version import __version__
from mpsearch.errors import BitMapError
from mpsearch.layers import (
    Patterns,
    copy_model,
    fingerprint,
    layer_kind,
    layer_weight,
    quantizable_modules,
)
from mpsearch.quant import SUPPORTED_BITS, QuantConfig
from mpsearch.slices import SlicePlan

FORMAT = "mpsearch.bitmap"
FORMAT_VERSION = 1
_ENTRY_KEYS = {"w_bits", "a_bits", "granularity", "group_size", "symmetric", "range_method",
               "percentile", "tie", "kind", "shape"}
_TOP_KEYS = {"format", "format_version", "model", "layers", "budget", "predicted", "provenance",
             "slices"}


@dataclass(frozen=True, kw_only=True)
class LayerEntry:
    """How one layer is quantized.

    Attributes:
        w_bits: weight bits: 2–8 integer, 16 half precision, 32 float (not quantized).
        a_bits: activation (input) bits, or None to leave activations in float.
        qconfig: scheme of the weight quantizer (symmetry, granularity, range method).
        tie: name of the tie group this layer shares its bits with, or None.
        kind: layer kind (``Linear``, ``Conv2d``, …), for readers and exporters.
        shape: weight shape as stored, to check the bit map fits a model.
    """

    w_bits: int
    a_bits: int | None = None
    qconfig: QuantConfig = field(default_factory=QuantConfig)
    tie: str | None = None
    kind: str | None = None
    shape: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("w_bits", "a_bits"):  # 4.0 (JSON from elsewhere) is 4; shifts need ints
            value = getattr(self, name)
            if (isinstance(value, (float, np.floating, np.integer))
                    and float(value).is_integer()):
                object.__setattr__(self, name, int(value))  # and JSON writes plain ints
        if isinstance(self.w_bits, bool) or self.w_bits not in SUPPORTED_BITS:
            raise ValueError(f"w_bits must be one of {SUPPORTED_BITS}, got {self.w_bits!r}")
        if self.a_bits is not None and (isinstance(self.a_bits, bool)
                                        or self.a_bits not in SUPPORTED_BITS):
            raise ValueError(f"a_bits must be None or one of {SUPPORTED_BITS}, got {self.a_bits!r}")
        if not isinstance(self.qconfig, QuantConfig):
            hint = ": build one, QuantConfig(**...)" if isinstance(self.qconfig, Mapping) else ""
            raise TypeError(f"qconfig must be a QuantConfig, got "
                            f"{type(self.qconfig).__name__}{hint}")
        if self.shape is not None:
            object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (the quantizer settings inline, as in the design's JSON)."""
        d: dict[str, Any] = {"w_bits": self.w_bits, "a_bits": self.a_bits}
        d.update(self.qconfig.to_dict())
        d.update({"tie": self.tie, "kind": self.kind,
                  "shape": list(self.shape) if self.shape is not None else None})
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LayerEntry:
        """Validate and build an entry from its JSON dict."""
        if not isinstance(d, Mapping):
            raise TypeError(f"a layer entry must be an object, got {type(d).__name__}")
        unknown = set(d) - _ENTRY_KEYS
        if unknown:
            raise ValueError(f"unknown key(s) {sorted(unknown)}; known: {sorted(_ENTRY_KEYS)}")
        if "w_bits" not in d:
            raise ValueError("missing 'w_bits'")
        qkeys = {k: d[k] for k in ("granularity", "group_size", "symmetric", "range_method",
                                   "percentile") if k in d}
        shape = d.get("shape")
        if shape is not None and (not isinstance(shape, list)
                                  or not all(isinstance(s, int) for s in shape)):
            raise ValueError(f"'shape' must be a list of integers, got {shape!r}")
        for key in ("tie", "kind"):
            if d.get(key) is not None and not isinstance(d[key], str):
                raise ValueError(f"'{key}' must be a string or null, got {d[key]!r}")
        return cls(w_bits=d["w_bits"], a_bits=d.get("a_bits"),
                   qconfig=QuantConfig.from_dict(qkeys), tie=d.get("tie"), kind=d.get("kind"),
                   shape=tuple(shape) if shape is not None else None)


class BitMap(Mapping[str, LayerEntry]):
    """Per-layer bit-widths for one model: a read-only mapping of layer FQN → entry.

    Build one with :meth:`uniform`, :meth:`from_bits`, or :func:`mpsearch.search`; share
    it with :meth:`save` / :meth:`load`.
    """

    def __init__(self, layers: Mapping[str, LayerEntry], *, model_class: str | None = None,
                 fingerprint: str | None = None, budget: Mapping[str, Any] | None = None,
                 predicted: Mapping[str, Any] | None = None,
                 provenance: Mapping[str, Any] | None = None,
                 slices: SlicePlan | None = None) -> None:
        if not layers:
            raise ValueError("a bit map needs at least one layer")
        self._layers = {k: layers[k] for k in sorted(layers)}
        self.model_class = model_class
        self.fingerprint = fingerprint
        self.budget = dict(budget or {})
        self.predicted = dict(predicted or {})
        self.provenance = dict(provenance or {})
        self.slices = slices
        """The channel-slice plan of a sliced search (``search(..., slices=n)``): the
        entries name slices ``<layer>.parts.<k>`` of the model :func:`mpsearch.slice_model`
        builds from the original and this bit map. None for an ordinary bit map."""

    def __getitem__(self, name: str) -> LayerEntry:
        try:
            return self._layers[name]
        except KeyError:
            raise KeyError(f"no layer {name!r} in the bit map") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._layers)

    def __len__(self) -> int:
        return len(self._layers)

    def __repr__(self) -> str:
        counts: dict[int, int] = {}
        for e in self._layers.values():
            counts[e.w_bits] = counts.get(e.w_bits, 0) + 1
        hist = ", ".join(f"{b}b×{n}" for b, n in sorted(counts.items()))
        units = f"{len(self)} layers"
        if self.slices is not None:
            units = (f"{len(self)} units, {sum(len(p) for p in self.slices.layers.values())} "
                     f"of them channel slices of {len(self.slices.layers)} layers")
        return f"BitMap({units}: {hist}; model={self.model_class})"

    # -- constructors ---------------------------------------------------------------------

    @classmethod
    def uniform(cls, model: nn.Module, bits: int, *, a_bits: int | None = None,
                qconfig: QuantConfig | None = None, include: Patterns = None,
                exclude: Patterns = None) -> BitMap:
        """Every quantizable layer at ``bits``."""
        return cls.from_bits(model, {}, default=bits, a_bits=a_bits, qconfig=qconfig,
                             include=include, exclude=exclude)

    @classmethod
    def from_bits(cls, model: nn.Module, bits: Mapping[str, int], *, default: int | None = None,
                  a_bits: int | None = None, qconfig: QuantConfig | None = None,
                  include: Patterns = None, exclude: Patterns = None) -> BitMap:
        """Bits per layer from a dict of FQN → bits; other layers take ``default``.

        Layers left out by ``include`` / ``exclude`` stay in float (``w_bits=32``): a bit map
        always covers every quantizable layer of its model.

        Raises:
            ValueError: a name is not a quantizable layer, or a layer has no bits and no
                default is given.
        """
        if not isinstance(bits, Mapping):
            raise TypeError(f"bits must map layer names to bits, got {type(bits).__name__}")
        modules = quantizable_modules(model)
        selected = quantizable_modules(model, include, exclude)
        unknown = [n for n in bits if n not in selected]
        if unknown:
            raise ValueError(f"not quantizable (or excluded) layers of {type(model).__name__}: "
                             f"{unknown[:10]}")
        missing = [n for n in selected if n not in bits]
        if missing and default is None:
            raise ValueError(f"no bits for {len(missing)} layer(s) ({missing[:5]}); "
                             "give them in the dict or pass default=")
        qc = qconfig or QuantConfig()
        entries = {}
        for n, m in modules.items():
            # default is not None where a layer misses (checked); LayerEntry checks values
            w_bits: Any = bits.get(n, default) if n in selected else 32
            entries[n] = LayerEntry(w_bits=w_bits, a_bits=a_bits if w_bits < 32 else None,
                                    qconfig=qc, kind=layer_kind(m), shape=tuple(layer_weight(m).shape))
        shapes = {n: tuple(layer_weight(m).shape) for n, m in modules.items()}
        return cls(entries, model_class=type(model).__name__, fingerprint=fingerprint(shapes),
                   provenance=_provenance(solver="manual"))

    # -- queries ----------------------------------------------------------------------

    def bits(self) -> dict[str, int]:
        """FQN → weight bits."""
        return {n: e.w_bits for n, e in self._layers.items()}

    def avg_bits(self) -> float:
        """Average weight bits weighted by parameter count (needs every entry's shape).

        Every entry counts, layers kept float (32) included: a search with ``exclude=``
        meets its ``avg_bits`` budget over the searched layers (``predicted["avg_bits"]``),
        which this whole-map figure then exceeds.
        """
        total = weighted = 0
        for n, e in self._layers.items():
            if e.shape is None:
                raise ValueError(f"layer {n!r} has no shape; avg_bits needs shapes")
            count = 1
            for s in e.shape:
                count *= s
            total += count
            weighted += count * e.w_bits
        return weighted / total

    def with_entries(self, **changes: Any) -> BitMap:
        """A copy with every entry changed (e.g. ``a_bits=8``)."""
        return BitMap({n: replace(e, **changes) for n, e in self._layers.items()},
                      model_class=self.model_class, fingerprint=self.fingerprint,
                      budget=self.budget, predicted=self.predicted, provenance=self.provenance,
                      slices=self.slices)

    def check_model(self, model: nn.Module, *, as_is: bool = False) -> None:
        """Raise :class:`BitMapError` naming every layer that does not fit ``model``.

        A bit map of a sliced search fits the original model where its slice plan cuts
        it (checked on a sliced copy of its shapes, on the meta device) and a sliced model
        only if sliced by the same plan: same channels in each slice.

        Args:
            as_is: the bit map must name ``model``'s own layers (a sliced search's map
                fits only the sliced model): for code that uses it on the model as it is.
        """
        from mpsearch.slices import plan_of, slice_model

        own = plan_of(model)
        if self.slices is not None and self.slices.layers and own is None and not as_is:
            try:
                skeleton = copy_model(model, meta=True)
            except Exception:  # noqa: BLE001 (a module deepcopy refuses on meta: the model)
                skeleton = model
            # BitMapError where the plan misfits
            self.check_model(slice_model(skeleton, self), as_is=True)
            return
        try:
            modules = quantizable_modules(model)
        except ValueError as exc:
            raise BitMapError(str(exc)) from None
        shapes = {n: tuple(layer_weight(m).shape) for n, m in modules.items()}
        missing = [n for n in self._layers if n not in shapes]
        extra = [n for n in shapes if n not in self._layers]
        changed = [f"{n} (bit map {list(e.shape)}, model {list(shapes[n])})"
                   for n, e in self._layers.items()
                   if n in shapes and e.shape is not None and tuple(e.shape) != shapes[n]]
        changed += [f"{n} (bit map {e.kind}, model {layer_kind(modules[n])})"
                    for n, e in self._layers.items()
                    if n in modules and e.kind and e.kind != layer_kind(modules[n])]
        problems = []
        if missing:
            problems.append(f"layers not in the model: {missing[:10]}")
        if extra:
            problems.append(f"model layers not in the bit map: {extra[:10]}")
        if changed:
            problems.append(f"shape or kind changed: {changed[:10]}")
        hint = ""
        if self.slices is not None and own is not None:
            other = sorted(n for n, rows in self.slices.layers.items() if n in own.layers and (
                own.layers[n] != rows or (n in own.inputs) != (n in self.slices.inputs)))
            if other:
                problems.append(f"the model was sliced by another plan: the slices of "
                                f"{other[:10]} hold other channels")
                hint = ("; slice the original model with this bit map "
                        "(mpsearch.slice_model(model, bitmap)), or quantize the original")
        if problems:
            if self.slices is not None and self.slices.layers and own is None and missing:
                hint = ("; this bit map is from a sliced search: build the model it "
                        "describes with mpsearch.slice_model(model, bitmap)")
            raise BitMapError(f"the bit map does not fit {type(model).__name__}: "
                              + "; ".join(problems) + hint)

    # -- JSON -----------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The JSON document, as plain dicts and lists."""
        doc = {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "model": {"class": self.model_class, "fingerprint": self.fingerprint},
            "layers": {n: e.to_dict() for n, e in self._layers.items()},
            "budget": json_safe(self.budget), "predicted": json_safe(self.predicted),
            "provenance": json_safe(self.provenance),
        }
        if self.slices is not None:
            doc["slices"] = self.slices.to_dict()
        return doc

    def to_json(self) -> str:
        """Sorted, indented JSON text."""
        return dumps(self.to_dict())

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the JSON atomically (temp file + rename); returns the path."""
        return write_text_atomic(path, self.to_json())

    @classmethod
    def from_dict(cls, doc: Any) -> BitMap:
        """Validate a JSON document and build the bit map.

        Raises:
            BitMapError: anything malformed, or an unknown format or version.
        """
        if not isinstance(doc, Mapping):
            raise BitMapError(f"a bit map must be a JSON object, got {type(doc).__name__}")
        if doc.get("format") != FORMAT:
            raise BitMapError(f"not an mpsearch bit map: format is {doc.get('format')!r}, "
                              f"expected {FORMAT!r}")
        version = doc.get("format_version")
        if version != FORMAT_VERSION or isinstance(version, bool):  # true == 1 in Python
            raise BitMapError(f"unknown format_version {version!r}: this mpsearch "
                              f"({__version__}) reads version {FORMAT_VERSION}")
        unknown = set(doc) - _TOP_KEYS
        if unknown:
            raise BitMapError(f"unknown top-level key(s) {sorted(unknown)}")
        layers = doc.get("layers")
        if not isinstance(layers, Mapping) or not layers:
            raise BitMapError("'layers' must be a non-empty object of FQN -> entry")
        entries = {}
        for name, d in layers.items():
            try:
                entries[name] = LayerEntry.from_dict(d)
            except (ValueError, TypeError) as exc:
                raise BitMapError(f"layer {name!r}: {exc}") from None
        model = doc.get("model") or {}
        if not isinstance(model, Mapping):
            raise BitMapError("'model' must be an object")
        for key in ("budget", "predicted", "provenance"):
            if not isinstance(doc.get(key, {}), Mapping):
                raise BitMapError(f"'{key}' must be an object")
        for key in ("budget", "predicted"):
            bad = {k: v for k, v in (doc.get(key) or {}).items() if v is not None and (
                isinstance(v, bool) or not isinstance(v, (int, float))
                or (key == "budget" and not math.isfinite(v)))}
            if bad:
                raise BitMapError(f"'{key}' must map names to {'finite ' * (key == 'budget')}"
                                  f"numbers, got {bad}")
        slices = None
        if doc.get("slices") is not None:
            try:
                slices = SlicePlan.from_dict(doc["slices"])
            except (TypeError, ValueError) as exc:
                raise BitMapError(str(exc)) from None
        return cls(entries, model_class=model.get("class"), fingerprint=model.get("fingerprint"),
                   budget=doc.get("budget"), predicted=doc.get("predicted"),
                   provenance=doc.get("provenance"), slices=slices)

    @classmethod
    def from_json(cls, text: str) -> BitMap:
        """Parse and validate JSON text (see :meth:`from_dict`)."""
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise BitMapError(f"malformed JSON at line {exc.lineno}, column {exc.colno}: "
                              f"{exc.msg}") from None
        return cls.from_dict(doc)

    # -- other tools' formats ----------------------------------------------------------------

    def export(self, fmt: str, **options: Any) -> Any:
        """This bit map in another tool's format (see :mod:`mpsearch.export` for the list).

        Example: ``bitmap.export("onnxruntime", onnx_model="model.onnx")``.
        """
        from mpsearch.export import export

        return export(self, fmt, **options)

    @classmethod
    def from_format(cls, fmt: str, obj: Any, **options: Any) -> BitMap:
        """Read a bit map from another tool's format (``model=`` fills shapes, resolves patterns).

        Example: ``BitMap.from_format("hawq", bit_config, model=model)``.
        """
        from mpsearch.export import import_bitmap

        return import_bitmap(fmt, obj, **options)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> BitMap:
        """Read a bit map file (see :meth:`from_dict`)."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise BitMapError(f"{path}: not a UTF-8 text file") from None
        try:
            return cls.from_json(text)
        except BitMapError as exc:
            raise BitMapError(f"{path}: {exc}") from None


def require_bitmap(bitmap: object) -> BitMap:
    """``bitmap``, checked to be a :class:`BitMap` (a TypeError saying how to get one)."""
    if isinstance(bitmap, BitMap):
        return bitmap
    hint = ("pass the search result's .bitmap" if hasattr(bitmap, "bitmap")
            else "read it with BitMap.load(path)" if isinstance(bitmap, (str, os.PathLike))
            else "build it with BitMap.from_dict(...) or BitMap.from_bits(model, ...)"
            if isinstance(bitmap, Mapping) else "")
    raise TypeError(f"bitmap must be a BitMap, got {type(bitmap).__name__}"
                    + (f": {hint}" if hint else ""))


def _provenance(**fields: Any) -> dict[str, Any]:
    import torch

    out = {"mpsearch": __version__, "torch": torch.__version__,
           "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    out.update(fields)
    return out
