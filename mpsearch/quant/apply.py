"""Apply a bit map to a model: simulated (fake) quantization of weights and activations."""

from __future__ import annotations

import copy
import logging
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from mpsearch.layers import layer_kind, layer_weight, quantizable_modules
from mpsearch.quant.quantizer import QuantConfig, fake_quantize, fake_quantize_activation

if TYPE_CHECKING:
    from mpsearch.bitmap import BitMap

log = logging.getLogger(__name__)


def quantize_weight(w: Tensor, kind: str | None, bits: int, cfg: QuantConfig) -> Tensor:
    """Fake-quantized copy of a layer weight, channels taken along the output dimension.

    Hugging Face ``Conv1D`` stores its weight ``(in, out)``; it is transposed so that
    channels are output channels for every layer kind.
    """
    if kind == "Conv1D":
        return fake_quantize(w.detach().t(), bits, cfg).t().contiguous()
    return fake_quantize(w.detach(), bits, cfg)


def weight_error_sq(w: Tensor, kind: str | None, bits: int, cfg: QuantConfig) -> float:
    """‖Q_b(W) − W‖² for a layer weight."""
    if bits >= 32:
        return 0.0
    diff = quantize_weight(w, kind, bits, cfg).double() - w.detach().double()
    return float(diff.pow(2).sum())


class ActivationQuantizer:
    """Forward pre-hook that fake-quantizes a layer's input (dynamic, per tensor)."""

    def __init__(self, bits: int, symmetric: bool = False) -> None:
        self.bits = bits
        self.symmetric = symmetric

    def __call__(self, _module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        if not args or not isinstance(args[0], Tensor) or not args[0].is_floating_point():
            return None
        return (fake_quantize_activation(args[0], self.bits, self.symmetric), *args[1:])

    def __repr__(self) -> str:
        return f"ActivationQuantizer(bits={self.bits}, symmetric={self.symmetric})"


def quantize_(model: nn.Module, bitmap: BitMap) -> nn.Module:
    """Quantize ``model`` in place as the bit map says, and return it.

    Weights are replaced by their fake-quantized values; layers with ``a_bits`` get a
    forward pre-hook that fake-quantizes their input.

    Raises:
        BitMapError: the bit map does not fit the model (naming the layers).
    """
    bitmap.check_model(model)
    modules = quantizable_modules(model)
    with torch.no_grad():
        for name, entry in bitmap.items():
            module = modules[name]
            if entry.w_bits < 32:
                weight = layer_weight(module)
                weight.copy_(quantize_weight(weight, entry.kind or layer_kind(module),
                                             entry.w_bits, entry.qconfig))
            if entry.a_bits is not None and entry.a_bits < 32:
                module.register_forward_pre_hook(ActivationQuantizer(entry.a_bits))
    return model


def quantize(model: nn.Module, bitmap: BitMap) -> nn.Module:
    """A quantized copy of ``model``; the argument is left untouched.

    Raises:
        BitMapError: the bit map does not fit the model (naming the layers).
    """
    bitmap.check_model(model)
    return quantize_(copy.deepcopy(model), bitmap)

