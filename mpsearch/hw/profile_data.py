"""``HardwareProfile``: measured kernel latencies of one device, saved as JSON.

One profile holds, per distinct layer shape (:meth:`LayerSpec.key`), the latency of every
format that has a real kernel there (median, p10, p90 over interleaved calls, the per-call
``session.run`` overhead subtracted), warm and optionally cold cache, and for formats
without a kernel the reason. Per model (keyed by the bit map fingerprint) it records the
deployed shape of each layer and the measured end-to-end float latency, whose excess over
the summed float layers is the cost of everything that is not a quantizable layer
(``rest_us``: attention, norms, activations, pooling).

A layer shape the profile lacks is *estimated* from a least-squares fit of latency against
MACs over the measured shapes of the same format and layer family, and flagged as such.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mpsearch._io import write_text_atomic
from mpsearch.hw.formats import CONV_KINDS
from mpsearch.hw.kernels_ort import LayerSpec
from mpsearch.hw.timing import central

log = logging.getLogger(__name__)

FORMAT = "mpsearch.hw_profile"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Lookup:
    """One layer's latency in one format.

    Attributes:
        latency_us: latency (µs) per call (:func:`~mpsearch.hw.timing.central`), or None when the format has no kernel.
        estimated: True when the shape was not measured and the value comes from a fit.
        reason: why there is no kernel, or how the value was estimated.
    """

    latency_us: float | None
    estimated: bool = False
    reason: str = ""


class HardwareProfile:
    """Measured latencies of layer kernels on one device (see module docs).

    Build one with :func:`mpsearch.profile`; :meth:`save` / :meth:`load` it as JSON.

    Attributes:
        device: fingerprint (CPU model and flags, or GPU name; cores; cache size).
        backend: ``"onnxruntime"`` (CPU) or ``"torch"`` (CUDA).
        threads: intra-op threads the kernels ran with.
        versions: library versions.
        created: UTC date of the first measurement.
        settings: how timing was done (rounds, warm-up, spinning, overhead subtraction).
        shapes: layer key → ``{"spec", "macs", "formats": {fmt: {cache: stats}},
            "unsupported": {fmt: reason}, "overhead_us", "qdq_us"}``.
        models: bit map fingerprint → ``{"class", "inputs", "layers": {fqn: {"key",
            "calls"}}, "e2e_fp32_us": {cache: stats}, "rest_us": {cache: float},
            "graph_factor": {bits: {cache: float}}, "e2e_bits_us": {bits: {cache: stats}}}``
            (see :meth:`graph_factor`).
    """

    def __init__(self, *, device: Mapping[str, Any], backend: str, threads: int,
                 versions: Mapping[str, Any], created: str,
                 settings: Mapping[str, Any] | None = None,
                 shapes: Mapping[str, Any] | None = None,
                 models: Mapping[str, Any] | None = None) -> None:
        self.device = dict(device)
        self.backend = backend
        self.threads = int(threads)
        self.versions = dict(versions)
        self.created = created
        self.settings = dict(settings or {})
        self.shapes: dict[str, dict[str, Any]] = {k: dict(v) for k, v in (shapes or {}).items()}
        self.models: dict[str, dict[str, Any]] = {k: dict(v) for k, v in (models or {}).items()}

    def __repr__(self) -> str:
        return (f"HardwareProfile({self.device.get('name')!r}, {self.backend}, "
                f"threads={self.threads}, {len(self.shapes)} shapes, {len(self.models)} models)")

    # -- lookups ---------------------------------------------------------------------------

    def lookup(self, spec: LayerSpec, fmt: str, cache: str = "warm") -> Lookup:
        """Latency of one layer call in ``fmt``: measured if the shape was, else estimated."""
        rec = self.shapes.get(spec.key())
        if rec is not None:
            if fmt in rec.get("unsupported", {}):
                return Lookup(None, reason=rec["unsupported"][fmt])
            stats = rec.get("formats", {}).get(fmt, {}).get(cache)
            if stats is not None:
                return Lookup(central(stats))
        return self._estimate(spec, fmt, cache)

    def _estimate(self, spec: LayerSpec, fmt: str, cache: str) -> Lookup:
        family = spec.kind in CONV_KINDS
        xs, ys = [], []
        for rec in self.shapes.values():
            stats = rec.get("formats", {}).get(fmt, {}).get(cache)
            if stats is None or (rec["spec"]["kind"] in CONV_KINDS) != family:
                continue
            xs.append(float(rec["macs"]))
            ys.append(central(stats))
        what = "convolution" if family else "matmul"
        if not xs:
            raise ValueError(f"the profile has no measured {what} layer in format {fmt!r} "
                           f"({cache} cache) to estimate {spec.key()} from; measure it with "
                           "mpsearch.profile(model, batch, reuse=this_profile)")
        x, y = np.asarray(xs), np.asarray(ys)
        if len(x) >= 2 and np.ptp(x) > 0:
            slope, icept = np.polyfit(x, y, 1)
            slope, icept = max(float(slope), 0.0), max(float(icept), 0.0)
            if slope == 0.0:
                slope = float(np.sum(y) / np.sum(x))
        else:
            slope, icept = float(y[0] / max(x[0], 1.0)), 0.0
        value = icept + slope * spec.macs
        return Lookup(value, estimated=True,
                      reason=f"estimated: {icept:.3g} µs + {slope:.3g} µs/MAC fitted to {len(x)} "
                             f"measured {what} shapes ({fmt}, {cache} cache)")

    def model_record(self, fingerprint: str) -> dict[str, Any] | None:
        """What the profile measured for the model with this bit map fingerprint."""
        return self.models.get(fingerprint)

    def rest_us(self, fingerprint: str, cache: str = "warm") -> float | None:
        """Measured latency of a model's non-quantizable work, or None if never measured."""
        rec = self.models.get(fingerprint)
        if rec is None:
            return None
        value = rec.get("rest_us", {}).get(cache, rec.get("rest_us", {}).get("warm"))
        return None if value is None else float(value)

    def graph_factor(self, fingerprint: str, bits: int, cache: str = "warm") -> float:
        """How much slower ``bits``-bit kernels run in this model's whole graph than alone.

        Measured by :func:`mpsearch.profile` (``end_to_end``) from the model deployed with
        every layer that has a ``bits``-bit kernel at ``bits``; 1.0 for float layers and for
        models or bit-widths never measured.
        """
        rec = self.models.get(fingerprint)
        if rec is None or bits >= 32:
            return 1.0
        by_cache = rec.get("graph_factor", {}).get(str(int(bits)), {})
        value = by_cache.get(cache, by_cache.get("warm"))
        return 1.0 if value is None else float(value)

    def table(self) -> list[dict[str, Any]]:
        """One row per (shape, format): median/p10/p90 µs, or the reason there is no kernel."""
        rows = []
        for key, rec in sorted(self.shapes.items()):
            for fmt, modes in sorted(rec.get("formats", {}).items()):
                for cache, st in sorted(modes.items()):
                    rows.append({"shape": key, "format": fmt, "cache": cache, **st,
                                 "kernel": "measured"})
            for fmt, reason in sorted(rec.get("unsupported", {}).items()):
                rows.append({"shape": key, "format": fmt, "cache": "", "median_us": None,
                             "kernel": f"none: {reason}"})
        return rows

    # -- JSON ------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict."""
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "device": self.device,
                "backend": self.backend, "threads": self.threads, "versions": self.versions,
                "created": self.created, "settings": self.settings, "shapes": self.shapes,
                "models": self.models}

    @classmethod
    def from_dict(cls, doc: Any) -> HardwareProfile:
        """Validate and build a profile from :meth:`to_dict` output.

        Raises:
            ValueError: not a profile, an unknown version, or a malformed shape entry.
        """
        if not isinstance(doc, Mapping) or doc.get("format") != FORMAT:
            raise ValueError(f"not an mpsearch hardware profile (format="
                             f"{doc.get('format') if isinstance(doc, Mapping) else doc!r}); "
                             f"expected format={FORMAT!r}")
        if doc.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"hardware profile format_version {doc.get('format_version')!r} "
                             f"is not supported; this mpsearch reads {FORMAT_VERSION}")
        for key, rec in doc.get("shapes", {}).items():
            spec = LayerSpec.from_dict(rec["spec"])
            if spec.key() != key:
                raise ValueError(f"shape entry {key!r} does not match its spec {spec.key()!r}")
        return cls(device=doc["device"], backend=doc["backend"], threads=doc["threads"],
                   versions=doc.get("versions", {}), created=doc.get("created", ""),
                   settings=doc.get("settings"), shapes=doc.get("shapes"),
                   models=doc.get("models"))

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write sorted JSON atomically (temp file + rename) and return the path."""
        return write_text_atomic(path, json.dumps(self.to_dict(), indent=1, sort_keys=True)
                                 + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> HardwareProfile:
        """Read a profile saved by :meth:`save`."""
        return cls.from_dict(json.loads(Path(path).read_text()))


def require_profile(profile: object) -> None:
    """A TypeError unless ``profile`` is None or a :class:`HardwareProfile`."""
    if profile is not None and not isinstance(profile, HardwareProfile):
        raise TypeError(f"profile must be a HardwareProfile (mpsearch.profile(...) or "
                        f"HardwareProfile.load(path)), got {type(profile).__name__}")
