"""Latency from a profile: the ``latency_us`` cost table and end-to-end predictions.

Predicted end-to-end latency = ``rest_us`` (the model's measured non-quantizable work)
+ Σ over the layers the deployed graph runs of (calls × the layer's latency in its
format × the model's in-graph factor for its bit-width,
:meth:`~mpsearch.HardwareProfile.graph_factor`). Each layer latency is float-in,
float-out, so precision changes are charged.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import nn

from mpsearch._report import some
from mpsearch.bitmap import BitMap
from mpsearch.hw.formats import format_for
from mpsearch.hw.kernels_ort import LayerSpec
from mpsearch.hw.profile_data import HardwareProfile
from mpsearch.hw.specs import layer_spec
from mpsearch.layers import LayerInfo, fingerprint, model_shapes, quantizable_modules
from mpsearch.quant import QuantConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LatencyTable:
    """Per-layer latency of each bits option, and which options have a kernel.

    Attributes:
        table: L×B µs; where a profile records the model's ``rest_us``, ``rest_us / L`` is
            added to every cell so a choice's sum is its predicted end-to-end latency.
            Cells without a kernel hold 0 and are False in ``allowed``.
        allowed: L×B bool, False where no real kernel runs that layer at those bits.
        reasons: ``"fqn@bits"`` → why that option is not offered.
        estimated: layers whose latency was estimated (shape not measured), not measured.
        rest_us: the model's measured non-quantizable latency, or None if not profiled.
        shapes_from: ``"profile"`` (the profiled deployment shapes) or ``"data"``.
    """

    table: np.ndarray
    allowed: np.ndarray
    reasons: dict[str, str] = field(default_factory=dict)
    estimated: tuple[str, ...] = ()
    rest_us: float | None = None
    shapes_from: str = "profile"


def _device(profile: HardwareProfile) -> tuple[str, str]:
    return str(profile.device.get("kind", "cpu")), profile.backend


def deployed_specs(profile: HardwareProfile, model: nn.Module,
                   layers: Sequence[LayerInfo] | None = None) -> tuple[dict[str, tuple[LayerSpec,
                                                                                        int]], str]:
    """FQN → (spec, calls) of the deployed layers, and where the shapes came from.

    From the profile's record of this model when it has one (layers the deployed graph
    does not run are absent); else from ``layers`` (shapes of the data they were found on).

    Raises:
        ValueError: the profile never saw this model and no layers are given.
    """
    rec = profile.model_record(fingerprint(model_shapes(model)))
    if rec is not None:
        return ({n: (LayerSpec.from_dict(profile.shapes[v["key"]]["spec"]), int(v["calls"]))
                 for n, v in rec["layers"].items()}, "profile")
    if layers is None:
        raise ValueError(f"the profile has no record of this {type(model).__name__} (run "
                         "mpsearch.profile(model, batch, reuse=profile)) and no layers were given")
    modules = quantizable_modules(model)
    log.warning("profile has no record of %s: latency at the shapes of the search data, "
                "without the model's non-layer latency", type(model).__name__)
    return ({i.name: (layer_spec(modules[i.name], i.input_shape), i.calls) for i in layers
             if i.input_shape is not None and i.calls}, "data")


def latency_table(profile: HardwareProfile, model: nn.Module, layers: Sequence[LayerInfo],
                  bits: Sequence[int], qconfig: QuantConfig, cache: str = "warm") -> LatencyTable:
    """The ``latency_us`` cost table of ``layers`` × ``bits`` and its ``allowed`` mask."""
    device, backend = _device(profile)
    specs, source = deployed_specs(profile, model, layers)
    modules = quantizable_modules(model)
    fp = fingerprint(model_shapes(model))
    factor = lambda b: profile.graph_factor(fp, b, cache) if source == "profile" else 1.0
    n_l, n_b = len(layers), len(bits)
    table, allowed = np.zeros((n_l, n_b)), np.ones((n_l, n_b), dtype=bool)
    reasons: dict[str, str] = {}
    estimated: list[str] = []
    for i, info in enumerate(layers):
        spec, calls = specs.get(info.name, (None, 0))
        probe = spec or layer_spec(modules[info.name], info.input_shape or (1, 1))
        for j, b in enumerate(bits):
            if info.read_by and b != 32:  # no call of its own: no kernel to swap in
                allowed[i, j] = False
                reasons[f"{info.name}@{b}"] = (f"{info.read_by} reads its weight directly; "
                                               "the deployed graph runs it in float")
                continue
            choice = format_for(probe.kind, probe.reduction, b, qconfig, device=device,
                                backend=backend)
            if choice.name is None:
                allowed[i, j] = False
                reasons[f"{info.name}@{b}"] = choice.reason
                continue
            if spec is None:  # the deployed graph does not run this layer
                continue
            look = profile.lookup(spec, choice.name, cache)
            if look.latency_us is None:
                allowed[i, j] = False
                reasons[f"{info.name}@{b}"] = look.reason
                continue
            table[i, j] = look.latency_us * calls * factor(b)
            if look.estimated and info.name not in estimated:
                estimated.append(info.name)
    rest = profile.rest_us(fp, cache) if source == "profile" else None
    if rest is not None and n_l:
        table += rest / n_l
    if estimated:
        log.warning("latency of %d layer(s) estimated (shape not in the profile): %s",
                    len(estimated), some(estimated))
    return LatencyTable(table, allowed, reasons, tuple(estimated), rest, source)


def predict_latency(profile: HardwareProfile, model: nn.Module, bitmap: BitMap,
                    cache: str = "warm",
                    layers: Sequence[LayerInfo] | None = None) -> dict[str, Any]:
    """Predicted end-to-end latency of ``model`` deployed as ``bitmap``.

    Returns:
        ``{"latency_us", "rest_us", "layers_us": {fqn: µs}, "formats": {fqn: fmt},
        "estimated": [fqn…], "shapes_from"}``.

    Raises:
        ValueError: a layer's bits have no kernel, or the model was never profiled and no
            ``layers`` are given.
    """
    device, backend = _device(profile)
    specs, source = deployed_specs(profile, model, layers)
    fp = fingerprint(model_shapes(model))
    per: dict[str, float] = {}
    fmts: dict[str, str] = {}
    estimated = []
    for name, (spec, calls) in specs.items():
        entry = bitmap[name]
        choice = format_for(spec.kind, spec.reduction, entry.w_bits, entry.qconfig,
                            device=device, backend=backend)
        if choice.name is None:
            raise ValueError(f"layer {name!r} at {entry.w_bits} bits: {choice.reason}")
        look = profile.lookup(spec, choice.name, cache)
        if look.latency_us is None:
            raise ValueError(f"layer {name!r} in {choice.name}: {look.reason}")
        factor = profile.graph_factor(fp, entry.w_bits, cache) if source == "profile" else 1.0
        per[name] = look.latency_us * calls * factor
        fmts[name] = choice.name
        if look.estimated:
            estimated.append(name)
    rest = profile.rest_us(fp, cache) if source == "profile" else None
    return {"latency_us": float(sum(per.values()) + (rest or 0.0)), "rest_us": rest,
            "layers_us": per, "formats": fmts, "estimated": estimated, "shapes_from": source}
