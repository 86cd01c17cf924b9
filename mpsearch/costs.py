"""Per-layer cost of each bit-width: the C_k[layer, bits] tables of the design."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from mpsearch.layers import LayerInfo, weight_matrix_shape
from mpsearch.problem import SharedCost
from mpsearch.quant import QuantConfig, n_scale_groups

if TYPE_CHECKING:
    from torch import nn

    from mpsearch.hw.cost import LatencyTable
    from mpsearch.hw.profile_data import HardwareProfile

#: bytes stored per quantization group: an fp16 scale, and a zero point where asymmetric
SCALE_BYTES = 2
ZERO_POINT_BYTES = 1


def weight_bytes(info: LayerInfo, bits: int, cfg: QuantConfig) -> float:
    """Bytes of one layer's weight at ``bits``, scales and zero points included."""
    if bits >= 16:
        return info.params * bits / 8
    return info.params * bits / 8 + _scale_bytes(info, cfg)


def _scale_bytes(info: LayerInfo, cfg: QuantConfig) -> float:
    """Bytes of a layer's scales and zero points at one width."""
    out_ch, red = weight_matrix_shape(info.kind, info.weight_shape)
    groups = n_scale_groups((out_ch, red), cfg)
    return groups * (SCALE_BYTES + (0 if cfg.symmetric else ZERO_POINT_BYTES))


def sliced_weight_bytes(layers: Sequence[LayerInfo], modules: Mapping[str, nn.Module],
                        widths: Mapping[str, int],
                        configs: Mapping[str, QuantConfig]) -> float:
    """Bytes of a model's quantized weights as deployed, scales and zero points included.

    The parts of a Linear sliced by input features keep the whole layer's row ranges (one
    scale per row at each width), so its rows store one scale per distinct width among its
    parts — what ``export_onnx`` writes once it has merged the parts of equal width
    (:func:`~mpsearch.coalesce`). The search counts them the same way
    (:func:`shared_scales`)."""
    total = 0.0
    owners: dict[int, tuple[LayerInfo, QuantConfig, set[int]]] = {}
    for info in layers:
        b, cfg = widths[info.name], configs[info.name]
        part = getattr(modules.get(info.name), "slice_of", None)
        if part is None or b >= 16:
            total += weight_bytes(info, b, cfg)
            continue
        total += info.params * b / 8
        owner = owners.setdefault(id(part.parent), (info, cfg, set()))
        owner[2].add(b)
    for info, cfg, used in owners.values():
        total += len(used) * _scale_bytes(info, cfg)  # every part has the layer's rows
    return total


def shared_scales(layers: Sequence[LayerInfo], modules: Mapping[str, nn.Module],
                  bits: Sequence[int], cfg: QuantConfig,
                  size: np.ndarray) -> list[SharedCost]:
    """The scales of each Linear cut by input features, as a shared ``size_bytes`` charge:
    its parts keep the layer's rows, so a row stores a scale (and zero point) once per
    width its parts use (as :func:`sliced_weight_bytes` counts). Takes them out of the
    parts' rows of ``size`` (in place)."""
    groups: dict[int, list[int]] = {}
    for i, info in enumerate(layers):
        part = getattr(modules.get(info.name), "slice_of", None)
        if part is not None:
            groups.setdefault(id(part.parent), []).append(i)
    shared = []
    for members in groups.values():
        scales = _scale_bytes(layers[members[0]], cfg)
        charge = tuple(0.0 if b >= 16 else scales for b in bits)
        for i in members:
            size[i] = [layers[i].params * b / 8 for b in bits]
        shared.append(SharedCost("size_bytes", tuple(layers[i].name for i in members), charge))
    return shared


def cost_tables(layers: Sequence[LayerInfo], bits: Sequence[int], cfg: QuantConfig,
                a_bits: int | None = None) -> dict[str, np.ndarray]:
    """``avg_bits``, ``size_bytes`` and ``bops`` tables, each L×B.

    ``avg_bits`` is each layer's share of the parameter-weighted average, so the sum over
    layers is the model's average weight bits.
    """
    total = sum(info.params for info in layers)
    avg = np.array([[info.params * b / total for b in bits] for info in layers], dtype=float)
    size = np.array([[weight_bytes(info, b, cfg) for b in bits] for info in layers], dtype=float)
    # a layer whose weight its parent reads directly keeps float inputs (see search)
    act = [a_bits if a_bits is not None and info.input_quantizable else 32 for info in layers]
    bops = np.array([[float(info.macs) * b * a for b in bits] for info, a in zip(layers, act,
                                                                                 strict=True)],
                    dtype=float)
    return {"avg_bits": avg, "size_bytes": size, "bops": bops}


def latency_cost_table(profile: HardwareProfile, model: nn.Module, layers: Sequence[LayerInfo],
                       bits: Sequence[int], cfg: QuantConfig) -> LatencyTable:
    """The ``latency_us`` table (L×B µs; a choice's sum is its predicted end-to-end latency)
    from a measured profile, with the ``allowed`` mask of options that have a real kernel."""
    from mpsearch.hw.cost import latency_table

    return latency_table(profile, model, layers, bits, cfg)
