"""Bit maps with varied per-layer settings for the exporter tests (real models' layers)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from mpsearch.bitmap import BitMap, LayerEntry
from mpsearch.quant import QuantConfig


def cycled(model: nn.Module, bits: Sequence[int], *, qconfig: QuantConfig | None = None,
           a_bits: int | None = None) -> BitMap:
    """Layer i (in FQN order) gets ``bits[i % len(bits)]``; 16/32 layers get no a_bits."""
    names = list(BitMap.uniform(model, 8))
    bm = BitMap.from_bits(model, {n: bits[i % len(bits)] for i, n in enumerate(names)},
                          qconfig=qconfig, a_bits=a_bits)
    if a_bits is None:
        return bm
    return BitMap({n: e if e.w_bits < 16 else LayerEntry(w_bits=e.w_bits, qconfig=e.qconfig,
                                                         kind=e.kind, shape=e.shape)
                   for n, e in bm.items()},
                  model_class=bm.model_class, fingerprint=bm.fingerprint,
                  provenance=bm.provenance)


def with_bits(bitmap: BitMap, bits: dict[str, int]) -> BitMap:
    """A copy with some layers' weight bits changed."""
    from dataclasses import replace

    return BitMap({n: replace(e, w_bits=bits.get(n, e.w_bits)) for n, e in bitmap.items()},
                  model_class=bitmap.model_class, fingerprint=bitmap.fingerprint,
                  provenance=bitmap.provenance)
