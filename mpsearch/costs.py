"""Per-layer cost of each bit-width: the C_k[layer, bits] tables of the design."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from mpsearch.layers import LayerInfo, weight_matrix_shape
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
    out_ch, red = weight_matrix_shape(info.kind, info.weight_shape)
    groups = n_scale_groups((out_ch, red), cfg)
    per_group = SCALE_BYTES + (0 if cfg.symmetric else ZERO_POINT_BYTES)
    return info.params * bits / 8 + groups * per_group


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
    act = [32 if a_bits is None or info.read_by else a_bits for info in layers]
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
